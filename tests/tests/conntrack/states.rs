//! A flow's states: what its packets do to both entries, how long each state lives, and that expired entries are misses.
use lb_common::{
    DatapathConfig, IPPROTO_TCP, Reason,
    lifecycle::{ConntrackLifetimes, FLOW_BACKEND_FIN, FLOW_CLIENT_FIN, FLOW_RESET, FLOW_SEEN_REPLY},
};
use lb_tests::{fixture::Fixture, packets::Frame};
use lb_userspace::conntrack::now_ticks;

use crate::{
    DNS, HOOKS, Step, WEB, ack, assert_lives, expect_pass, expect_untouched, fin, flow_entries, rst, run_steps,
    services, set_expires, ticks_left,
};

#[test]
fn tcp_flags_move_both_entries_through_their_states() {
    let (vip, backend) = (WEB.frontend, WEB.backend);
    let seen = FLOW_SEEN_REPLY;
    for hook in HOOKS {
        let fixture = Fixture::new(&services());
        let client = "10.0.0.2:40000";
        let to_backend = |f: Frame| f.with_dst(backend);
        let to_client = |f: Frame| f.with_src(vip);
        #[rustfmt::skip]
        let close = vec![
            Step { what: "the client's SYN", input: Frame::tcp_syn(client, vip), output: to_backend(Frame::tcp_syn(client, vip)), reason: Reason::ForwardNew, state: "syn_sent", flags: 0, secs: 60 },
            Step { what: "the backend's SYN-ACK", input: Frame::tcp_syn_ack(backend, client), output: to_client(Frame::tcp_syn_ack(backend, client)), reason: Reason::ReplyTranslated, state: "established", flags: seen, secs: 86_400 },
            Step { what: "the client's data", input: WEB.request(client), output: to_backend(WEB.request(client)), reason: Reason::ForwardEstablished, state: "established", flags: seen, secs: 86_400 },
            Step { what: "the client's FIN", input: fin(client, vip), output: to_backend(fin(client, vip)), reason: Reason::ForwardEstablished, state: "half_closed", flags: seen | FLOW_CLIENT_FIN, secs: 3_600 },
            Step { what: "the backend's data after the client's FIN", input: WEB.response(client), output: to_client(WEB.response(client)), reason: Reason::ReplyTranslated, state: "half_closed", flags: seen | FLOW_CLIENT_FIN, secs: 3_600 },
            Step { what: "the backend's FIN", input: fin(backend, client), output: to_client(fin(backend, client)), reason: Reason::ReplyTranslated, state: "closed", flags: seen | FLOW_CLIENT_FIN | FLOW_BACKEND_FIN, secs: 10 },
            Step { what: "the client's last ACK", input: ack(client, vip), output: to_backend(ack(client, vip)), reason: Reason::ForwardEstablished, state: "closed", flags: seen | FLOW_CLIENT_FIN | FLOW_BACKEND_FIN, secs: 10 },
        ];
        run_steps(&fixture, hook, "closed by both FINs", &WEB.forward_key(client), close);

        let client = "10.0.0.2:40001";
        #[rustfmt::skip]
        let reset = vec![
            Step { what: "another SYN", input: Frame::tcp_syn(client, vip), output: to_backend(Frame::tcp_syn(client, vip)), reason: Reason::ForwardNew, state: "syn_sent", flags: 0, secs: 60 },
            Step { what: "its SYN-ACK", input: Frame::tcp_syn_ack(backend, client), output: to_client(Frame::tcp_syn_ack(backend, client)), reason: Reason::ReplyTranslated, state: "established", flags: seen, secs: 86_400 },
            Step { what: "a RST from the client", input: rst(client, vip), output: to_backend(rst(client, vip)), reason: Reason::ForwardEstablished, state: "reset", flags: seen | FLOW_RESET, secs: 10 },
        ];
        run_steps(&fixture, hook, "reset", &WEB.forward_key(client), reset);
    }
}

#[test]
fn expired_entries_are_misses() {
    for hook in HOOKS {
        let mut fixture = Fixture::new(&services());
        for svc in [WEB, DNS] {
            let name = format!("{hook:?} {}", svc.name());

            // The forward entry expired: the client's next packet opens a
            // new flow.
            let client = "10.0.0.2:40000";
            svc.open(&fixture, hook, client);
            let forward = svc.forward_key(client);
            set_expires(&mut fixture, &forward, now_ticks() - 1);
            let request = svc.request(client);
            expect_pass(&fixture, hook, &format!("{name}: a packet on an expired forward entry"), &request, &request.clone().with_dst(svc.backend), Reason::ForwardNew);
            let (fwd, reply) = flow_entries(&fixture, &forward, &format!("{name}: the new flow"));
            for (side, value) in [("forward", fwd), ("reply", reply)] {
                assert!(ticks_left(&value) > 0, "{name}: the new {side} entry expires in the future: {value:?}");
                assert_eq!(value.flow_flags, 0, "{name}: the new {side} entry is unanswered");
            }
            assert_lives(&fwd, if svc.proto == IPPROTO_TCP { 60 } else { 30 }, &format!("{name}: the new forward entry"));
            let response = svc.response(client);
            expect_pass(&fixture, hook, &format!("{name}: the new flow's answer"), &response, &response.clone().with_src(svc.frontend), Reason::ReplyTranslated);

            // The reply entry expired: the backend's packet is not the
            // service's.
            let client = "10.0.0.2:40001";
            svc.open(&fixture, hook, client);
            set_expires(&mut fixture, &svc.reply_key(client), now_ticks() - 1);
            expect_untouched(&fixture, hook, &format!("{name}: a packet on an expired reply entry"), &svc.response(client));

            // Short of expiring (by two ticks: the datapath's clock, from
            // jiffies, may stand a timer tick apart from user space's), an
            // entry still serves.
            let client = "10.0.0.2:40002";
            svc.open(&fixture, hook, client);
            set_expires(&mut fixture, &svc.forward_key(client), now_ticks() + 2);
            let request = svc.request(client);
            expect_pass(&fixture, hook, &format!("{name}: a packet on a forward entry two ticks from expiring"), &request, &request.clone().with_dst(svc.backend), Reason::ForwardEstablished);
            set_expires(&mut fixture, &svc.reply_key(client), now_ticks() + 2);
            let response = svc.response(client);
            expect_pass(&fixture, hook, &format!("{name}: a packet on a reply entry two ticks from expiring"), &response, &response.clone().with_src(svc.frontend), Reason::ReplyTranslated);
        }
    }
}

#[test]
fn entries_live_as_long_as_their_state_says() {
    let configured = [7, 600, 300, 3, 5, 50];
    for (lifetimes, secs) in [("default lifetimes", ConntrackLifetimes::DEFAULT_SECS), ("configured lifetimes", configured)] {
        for hook in HOOKS {
            let mut fixture = Fixture::new(&services());
            if secs != ConntrackLifetimes::DEFAULT_SECS {
                let config = DatapathConfig { ct_lifetimes: ConntrackLifetimes::from_secs(secs), ..DatapathConfig::default() };
                fixture.datapath.maps.set_config(config).expect("config");
            }
            let [syn_secs, established, half_closed, closed, udp, udp_stream] = secs;
            let (vip, backend, client) = (WEB.frontend, WEB.backend, "10.0.0.2:40000");
            let seen = FLOW_SEEN_REPLY;
            #[rustfmt::skip]
            let tcp = vec![
                Step { what: "a SYN", input: Frame::tcp_syn(client, vip), output: Frame::tcp_syn(client, vip).with_dst(backend), reason: Reason::ForwardNew, state: "syn_sent", flags: 0, secs: syn_secs },
                Step { what: "its SYN-ACK", input: Frame::tcp_syn_ack(backend, client), output: Frame::tcp_syn_ack(backend, client).with_src(vip), reason: Reason::ReplyTranslated, state: "established", flags: seen, secs: established },
                Step { what: "the backend's FIN", input: fin(backend, client), output: fin(backend, client).with_src(vip), reason: Reason::ReplyTranslated, state: "half_closed", flags: seen | FLOW_BACKEND_FIN, secs: half_closed },
                Step { what: "the client's FIN", input: fin(client, vip), output: fin(client, vip).with_dst(backend), reason: Reason::ForwardEstablished, state: "closed", flags: seen | FLOW_CLIENT_FIN | FLOW_BACKEND_FIN, secs: closed },
            ];
            run_steps(&fixture, hook, lifetimes, &WEB.forward_key(client), tcp);

            let (dns_vip, dns_backend, client) = (DNS.frontend, DNS.backend, "10.0.0.2:5000");
            #[rustfmt::skip]
            let udp = vec![
                Step { what: "a UDP query", input: DNS.request(client), output: DNS.request(client).with_dst(dns_backend), reason: Reason::ForwardNew, state: "udp_unanswered", flags: 0, secs: udp },
                Step { what: "a second query before the answer", input: DNS.request(client), output: DNS.request(client).with_dst(dns_backend), reason: Reason::ForwardEstablished, state: "udp_unanswered", flags: 0, secs: udp },
                Step { what: "its answer", input: DNS.response(client), output: DNS.response(client).with_src(dns_vip), reason: Reason::ReplyTranslated, state: "udp_answered", flags: seen, secs: udp_stream },
                Step { what: "the next query", input: DNS.request(client), output: DNS.request(client).with_dst(dns_backend), reason: Reason::ForwardEstablished, state: "udp_answered", flags: seen, secs: udp_stream },
            ];
            run_steps(&fixture, hook, lifetimes, &DNS.forward_key(client), udp);
        }
    }
}
