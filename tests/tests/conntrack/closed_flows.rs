//! Closed flows: what their entries still translate and leave alone, and a forward hit restoring a missing reply entry.
use lb_common::{
    IPPROTO_TCP, Reason,
    lifecycle::{FLOW_CLIENT_FIN, FLOW_SEEN_REPLY, state_name},
};
use lb_tests::{
    fixture::{Fixture, Hook, Verdict, desired, service},
    packets::Frame,
};
use lb_userspace::{conntrack::now_ticks, model::Protocol};

use crate::{
    DNS, HOOKS, WEB, ack, assert_flow, assert_lives, destination_of, endpoint, entry, expect_entry, expect_pass,
    expect_untouched, fin, flow_entries, key, remove, rst, send, services, set_expires,
};

#[test]
fn a_syn_on_a_closed_tuple_is_a_new_connection() {
    let vip = WEB.frontend;
    let backends = ["10.244.1.2:8080", "10.244.2.2:8080"];
    let web_on = |endpoints: &[([u8; 4], u16)]| desired([service("web", [10, 96, 0, 10], 80, Protocol::Tcp, endpoints)]);
    let endpoints = [([10, 244, 1, 2], 8080), ([10, 244, 2, 2], 8080)];
    let syn_to_either = |fixture: &Fixture, hook: Hook, what: &str, syn: &Frame, reason: Reason| -> String {
        let (result, counted) = send(fixture, hook, what, &syn.bytes());
        assert_eq!((result.verdict, counted), (Verdict::Pass, reason), "{hook:?}: {what}");
        let backend = destination_of(syn, &result.output);
        assert!(backends.contains(&backend.as_str()), "{hook:?}: {what}: sent to {backend}");
        assert_eq!(result.output, syn.clone().with_dst(&backend).bytes(), "{hook:?}: {what}: output");
        backend
    };
    type Closer = fn(&str, &str) -> Vec<Frame>;
    let closers: [(&str, Closer); 3] = [
        ("closed by both FINs", |client, backend| vec![fin(client, WEB.frontend), fin(backend, client)]),
        ("reset by the client", |client, _| vec![rst(client, WEB.frontend)]),
        ("reset by the backend", |client, backend| vec![rst(backend, client)]),
    ];
    for hook in HOOKS {
        let mut fixture = Fixture::new(&web_on(&endpoints));
        for (i, (closed, closing)) in closers.into_iter().enumerate() {
            let client = format!("10.0.0.2:{}", 40000 + i);
            let client = client.as_str();
            let syn = Frame::tcp_syn(client, vip);
            let old = syn_to_either(&fixture, hook, &format!("{closed}: first SYN"), &syn, Reason::ForwardNew);
            expect_pass(&fixture, hook, &format!("{closed}: SYN-ACK"), &Frame::tcp_syn_ack(&old, client), &Frame::tcp_syn_ack(&old, client).with_src(vip), Reason::ReplyTranslated);
            for packet in closing(client, &old) {
                let (result, _) = send(&fixture, hook, closed, &packet.bytes());
                assert_eq!(result.verdict, Verdict::Pass, "{hook:?}: {closed}: closing packet");
            }
            let forward = WEB.forward_key(client);
            let (before, _) = flow_entries(&fixture, &forward, &format!("{hook:?}: {closed}"));
            assert_lives(&before, 10, &format!("{hook:?}: {closed}: the closed flow"));

            // The client opens a new connection from the same port.
            let what = format!("{closed}: a new SYN from the same port");
            let new = syn_to_either(&fixture, hook, &what, &syn, Reason::ForwardNew);
            assert_flow(&fixture, &forward, &format!("{hook:?}: {what}"), "syn_sent", 0, 60);
            if new != old {
                assert_eq!(entry(&fixture, &key(&old, client, IPPROTO_TCP)), None, "{hook:?}: {what}: the old backend's reply entry is gone");
            }
            expect_pass(&fixture, hook, &format!("{what}: its SYN-ACK"), &Frame::tcp_syn_ack(&new, client), &Frame::tcp_syn_ack(&new, client).with_src(vip), Reason::ReplyTranslated);
            assert_flow(&fixture, &forward, &format!("{hook:?}: {what}: answered"), "established", FLOW_SEEN_REPLY, 86_400);
        }

        // The new connection goes to another backend (the old one left
        // since the flow closed): the closed flow's reply entry goes with
        // it, and the new one is answered.
        let client = "10.0.0.4:40000";
        let syn = Frame::tcp_syn(client, vip);
        let old = syn_to_either(&fixture, hook, "a SYN", &syn, Reason::ForwardNew);
        expect_pass(&fixture, hook, "SYN-ACK", &Frame::tcp_syn_ack(&old, client), &Frame::tcp_syn_ack(&old, client).with_src(vip), Reason::ReplyTranslated);
        expect_pass(&fixture, hook, "a RST from the client", &rst(client, vip), &rst(client, vip).with_dst(&old), Reason::ForwardEstablished);
        let other = endpoints[usize::from(old == backends[0])];
        fixture.program(&web_on(&[other]));
        let new = syn_to_either(&fixture, hook, "a new SYN after the old backend left", &syn, Reason::ForwardNew);
        assert_ne!(new, old, "{hook:?}: the new connection goes to the remaining backend");
        assert_eq!(entry(&fixture, &key(&old, client, IPPROTO_TCP)), None, "{hook:?}: the closed flow's reply entry is gone");
        assert_flow(&fixture, &WEB.forward_key(client), &format!("{hook:?}: the new connection to {new}"), "syn_sent", 0, 60);
        expect_pass(&fixture, hook, "the new backend's SYN-ACK", &Frame::tcp_syn_ack(&new, client), &Frame::tcp_syn_ack(&new, client).with_src(vip), Reason::ReplyTranslated);
        expect_untouched(&fixture, hook, "a stray ACK from the old backend", &ack(&old, client));
        fixture.program(&web_on(&endpoints));

        // A SYN retransmitted on a flow that is not closed is the same
        // connection, at the same backend: unanswered, half closed, or
        // answered (a late duplicate).
        let client = "10.0.0.3:40000";
        let syn = Frame::tcp_syn(client, vip);
        let backend = syn_to_either(&fixture, hook, "a SYN", &syn, Reason::ForwardNew);
        for i in 0..8 {
            expect_pass(&fixture, hook, &format!("SYN retransmission {i}"), &syn, &syn.clone().with_dst(&backend), Reason::ForwardEstablished);
        }
        assert_flow(&fixture, &WEB.forward_key(client), &format!("{hook:?}: after the retransmissions"), "syn_sent", 0, 60);
        expect_pass(&fixture, hook, "SYN-ACK", &Frame::tcp_syn_ack(&backend, client), &Frame::tcp_syn_ack(&backend, client).with_src(vip), Reason::ReplyTranslated);
        expect_pass(&fixture, hook, "a late SYN on the established flow", &syn, &syn.clone().with_dst(&backend), Reason::ForwardEstablished);
        expect_pass(&fixture, hook, "the client's FIN", &fin(client, vip), &fin(client, vip).with_dst(&backend), Reason::ForwardEstablished);
        expect_pass(&fixture, hook, "a late SYN on the half-closed flow", &syn, &syn.clone().with_dst(&backend), Reason::ForwardEstablished);
        assert_flow(&fixture, &WEB.forward_key(client), &format!("{hook:?}: after the late SYNs"), "half_closed", FLOW_SEEN_REPLY | FLOW_CLIENT_FIN, 3_600);
    }
}

#[test]
fn a_closed_flows_reply_entry_leaves_a_direct_connection_alone() {
    let (vip, backend) = (WEB.frontend, WEB.backend);
    type Closer = fn(&str) -> Vec<Frame>;
    let closers: [(&str, Closer); 2] = [
        ("closed by both FINs", |client| vec![fin(client, WEB.frontend), fin(WEB.backend, client)]),
        ("reset by the backend", |client| vec![rst(WEB.backend, client)]),
    ];
    for hook in HOOKS {
        let fixture = Fixture::new(&services());
        for (i, (closed, closing)) in closers.into_iter().enumerate() {
            let client = format!("10.0.0.2:{}", 40000 + i);
            let client = client.as_str();
            WEB.open(&fixture, hook, client);
            for packet in closing(client) {
                let (result, _) = send(&fixture, hook, closed, &packet.bytes());
                assert_eq!(result.verdict, Verdict::Pass, "{hook:?}: {closed}: closing packet");
            }

            // Stray packets of the closed flow are still its own.
            let last_ack = ack(client, vip);
            expect_pass(&fixture, hook, &format!("{closed}: the client's last ACK"), &last_ack, &last_ack.clone().with_dst(backend), Reason::ForwardEstablished);
            let stray = ack(backend, client);
            expect_pass(&fixture, hook, &format!("{closed}: a stray ACK from the backend"), &stray, &stray.clone().with_src(vip), Reason::ReplyTranslated);
            let (_, reply_before) = flow_entries(&fixture, &WEB.forward_key(client), &format!("{hook:?}: {closed}"));
            assert!(lb_common::lifecycle::is_closed(reply_before.flow_flags), "{hook:?}: {closed}: the flow is over: {reply_before:?}");

            // The backend answering a direct connection from the client's
            // port is not the service's flow.
            let direct = Frame::tcp_syn_ack(backend, client);
            expect_untouched(&fixture, hook, &format!("{closed}: a SYN-ACK from the backend on the same ports"), &direct);
            let reply_after = expect_entry(&fixture, &WEB.reply_key(client), &format!("{hook:?}: {closed}: after the direct SYN-ACK"));
            assert_eq!(reply_after, reply_before, "{hook:?}: {closed}: the closed flow's reply entry is left as it was");
            let direct_data = WEB.response(client).with_tcp(|t| t.syn = true);
            expect_untouched(&fixture, hook, &format!("{closed}: a SYN with data from the backend"), &direct_data);
        }
    }
}

#[test]
fn a_forward_hit_restores_its_reply_entry() {
    for hook in HOOKS {
        let mut fixture = Fixture::new(&services());
        for svc in [DNS, WEB] {
            let name = format!("{hook:?} {}", svc.name());

            // Due a refresh: the forward hit writes both entries, and puts
            // the missing one back.
            let client = "10.0.0.2:40000";
            svc.open(&fixture, hook, client);
            let forward = svc.forward_key(client);
            let reply_key = svc.reply_key(client);
            remove(&mut fixture, &reply_key);
            set_expires(&mut fixture, &forward, now_ticks() + 2);
            let request = svc.request(client);
            expect_pass(&fixture, hook, &format!("{name}: a forward packet due a refresh"), &request, &request.clone().with_dst(svc.backend), Reason::ForwardEstablished);
            let (fwd, reply) = flow_entries(&fixture, &forward, &format!("{name}: restored"));
            assert_eq!(fwd.partner_key(svc.proto), reply_key, "{name}: restored under the backend's reply tuple");
            assert_eq!((reply.source(), reply.destination()), (endpoint(svc.frontend), endpoint(client)), "{name}: the restored entry translates from the frontend to the client");
            assert_eq!(reply.service_id, fwd.service_id, "{name}: counted for the same service");
            assert_eq!((reply.flow_flags, reply.expires), (fwd.flow_flags, fwd.expires), "{name}: the restored entry is in the flow's state");
            assert_eq!(state_name(svc.proto, reply.flow_flags), if svc.proto == IPPROTO_TCP { "established" } else { "udp_answered" }, "{name}");
            assert_lives(&reply, if svc.proto == IPPROTO_TCP { 86_400 } else { 120 }, &format!("{name}: the restored entry"));
            let response = svc.response(client);
            expect_pass(&fixture, hook, &format!("{name}: the backend's answer after the restore"), &response, &response.clone().with_src(svc.frontend), Reason::ReplyTranslated);

            // Not due a refresh (the expiry just written): the hit writes
            // nothing, and the reply entry stays missing until the next
            // refresh.
            let client = "10.0.0.2:40001";
            svc.open(&fixture, hook, client);
            remove(&mut fixture, &svc.reply_key(client));
            let request = svc.request(client);
            expect_pass(&fixture, hook, &format!("{name}: a forward packet not due a refresh"), &request, &request.clone().with_dst(svc.backend), Reason::ForwardEstablished);
            assert_eq!(entry(&fixture, &svc.reply_key(client)), None, "{name}: restoring rides on the refresh");
            expect_untouched(&fixture, hook, &format!("{name}: the backend's answer without a reply entry"), &svc.response(client));
        }

        // A connection not answered yet: its retransmitted SYN puts a
        // missing reply entry back at once, so the SYN-ACK that follows is
        // translated.
        let (client, name) = ("10.0.0.2:40002", format!("{hook:?} pending TCP"));
        let syn = Frame::tcp_syn(client, WEB.frontend);
        expect_pass(&fixture, hook, &format!("{name}: a SYN"), &syn, &syn.clone().with_dst(WEB.backend), Reason::ForwardNew);
        remove(&mut fixture, &WEB.reply_key(client));
        expect_pass(&fixture, hook, &format!("{name}: the SYN again"), &syn, &syn.clone().with_dst(WEB.backend), Reason::ForwardEstablished);
        assert_flow(&fixture, &WEB.forward_key(client), &format!("{name}: restored"), "syn_sent", 0, 60);
        let syn_ack = Frame::tcp_syn_ack(WEB.backend, client);
        expect_pass(&fixture, hook, &format!("{name}: the SYN-ACK"), &syn_ack, &syn_ack.clone().with_src(WEB.frontend), Reason::ReplyTranslated);
    }
}
