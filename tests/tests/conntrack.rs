//! A conntrack entry's life, through BPF_PROG_TEST_RUN: what a flow's
//! packets do to the state and expiry of both of its entries, how long each
//! state lives, what a closed or expired flow's entries still translate and
//! what they leave alone (a SYN on a closed tuple is a new connection, a
//! direct connection from the backend's port is not the closed flow's), how
//! a forward hit (or a pending connection's retransmitted SYN) restores a
//! missing reply entry, how closed and expired flows give their source NAT
//! ports back, and how a garbage collection leaves alone the flows that
//! took expired tuples while it ran. Packets are built by etherparse and
//! checked byte for byte; the entries are read from the maps. Every
//! test runs through both hooks, XDP and tc, each with a fresh datapath.
//! Needs root.
use std::collections::BTreeSet;

use aya::programs::{TestRun, TestRunOptions};

use lb_common::{
    CT_FORWARD, CT_REPLY, ConntrackKey, ConntrackValue, DatapathConfig, Endpoint, IPPROTO_TCP, IPPROTO_UDP, MAP_CONNTRACK_TCP, MAP_CONNTRACK_UDP, Reason, ip_be,
    lifecycle::{
        ConntrackLifetimes, FLOW_BACKEND_FIN, FLOW_CLIENT_FIN, FLOW_RESET, FLOW_SEEN_REPLY, state_name,
        ticks_from_secs,
    },
};
use lb_tests::{
    fixture::{Fixture, Hook, RunResult, Verdict, desired, service},
    packets::{Frame, addr},
};
use lb_userspace::{
    conntrack::now_ticks,
    maps::ConntrackTable,
    model::{DesiredState, Protocol, ServicePort, ServicePortName},
};

const HOOKS: [Hook; 2] = [Hook::Xdp, Hook::Tc];

/// A service port of one protocol: the frontend clients send to, and its
/// one backend.
#[derive(Clone, Copy)]
struct Svc {
    proto: u8,
    frontend: &'static str,
    backend: &'static str,
}

const WEB: Svc = Svc { proto: IPPROTO_TCP, frontend: "10.96.0.10:80", backend: "10.244.1.2:8080" };
const DNS: Svc = Svc { proto: IPPROTO_UDP, frontend: "10.96.0.10:53", backend: "10.244.1.2:5353" };

fn services() -> DesiredState {
    desired([
        service("web", [10, 96, 0, 10], 80, Protocol::Tcp, &[([10, 244, 1, 2], 8080)]),
        service("dns", [10, 96, 0, 10], 53, Protocol::Udp, &[([10, 244, 1, 2], 5353)]),
    ])
}

impl Svc {
    fn name(self) -> &'static str {
        if self.proto == IPPROTO_TCP { "TCP" } else { "UDP" }
    }

    /// A packet of the flow from `client` to the frontend, without SYN.
    fn request(self, client: &str) -> Frame {
        if self.proto == IPPROTO_TCP {
            Frame::tcp_data(client, self.frontend, b"request")
        } else {
            Frame::udp(client, self.frontend, b"request")
        }
    }

    /// A packet of the flow from the backend to `client`, without SYN.
    fn response(self, client: &str) -> Frame {
        if self.proto == IPPROTO_TCP {
            Frame::tcp_data(self.backend, client, b"response")
        } else {
            Frame::udp(self.backend, client, b"response")
        }
    }

    /// The key of the flow's forward entry.
    fn forward_key(self, client: &str) -> ConntrackKey {
        key(client, self.frontend, self.proto)
    }

    /// The key of the flow's reply entry (no source NAT).
    fn reply_key(self, client: &str) -> ConntrackKey {
        key(self.backend, client, self.proto)
    }

    /// Opens a flow from `client` and has the backend answer: a SYN and
    /// its SYN-ACK, or a request and its response.
    fn open(self, fixture: &Fixture, hook: Hook, client: &str) {
        let (first, answer) = if self.proto == IPPROTO_TCP {
            (Frame::tcp_syn(client, self.frontend), Frame::tcp_syn_ack(self.backend, client))
        } else {
            (self.request(client), self.response(client))
        };
        let what = format!("{} flow from {client}", self.name());
        expect_pass(fixture, hook, &format!("{what}: first packet"), &first, &first.clone().with_dst(self.backend), Reason::ForwardNew);
        expect_pass(fixture, hook, &format!("{what}: answer"), &answer, &answer.clone().with_src(self.frontend), Reason::ReplyTranslated);
    }
}

/// An ACK without data: the last packet of a close.
fn ack(src: &str, dst: &str) -> Frame {
    Frame::tcp_data(src, dst, b"")
}

fn fin(src: &str, dst: &str) -> Frame {
    Frame::tcp_data(src, dst, b"").with_tcp(|t| t.fin = true)
}

fn rst(src: &str, dst: &str) -> Frame {
    Frame::tcp_data(src, dst, b"").with_tcp(|t| t.rst = true)
}

fn key(src: &str, dst: &str, proto: u8) -> ConntrackKey {
    ConntrackKey::new(addr(src), addr(dst), proto)
}

fn endpoint(s: &str) -> Endpoint {
    addr(s).into()
}

/// The stored entry for `key`, if any, in whichever table holds it (a
/// connection not answered yet is in the pending table).
fn entry(fixture: &Fixture, key: &ConntrackKey) -> Option<ConntrackValue> {
    fixture.datapath.maps.conntrack.find(key).map(|(_, value)| value)
}

/// The table holding `key`'s entry (the confirmed one of its protocol when
/// none does).
fn table_of<'a>(fixture: &'a mut Fixture, key: &ConntrackKey) -> &'a mut ConntrackTable {
    let conntrack = &mut fixture.datapath.maps.conntrack;
    let name = conntrack.find(key).map_or(if key.proto == IPPROTO_TCP { MAP_CONNTRACK_TCP } else { MAP_CONNTRACK_UDP }, |(name, _)| name);
    conntrack.named_mut(name).expect("a conntrack table")
}

fn expect_entry(fixture: &Fixture, key: &ConntrackKey, what: &str) -> ConntrackValue {
    entry(fixture, key).unwrap_or_else(|| panic!("{what}: no conntrack entry for {key:?}"))
}

fn store(fixture: &mut Fixture, key: &ConntrackKey, value: ConntrackValue) {
    table_of(fixture, key).insert(key, value, 0).expect("writing a conntrack entry");
}

fn remove(fixture: &mut Fixture, key: &ConntrackKey) {
    table_of(fixture, key).remove(key).expect("removing a conntrack entry");
}

fn set_expires(fixture: &mut Fixture, key: &ConntrackKey, expires: u32) {
    let value = expect_entry(fixture, key, "setting an expiry");
    store(fixture, key, ConntrackValue { expires, ..value });
}

/// Ticks until the entry expires, by user space's clock.
fn ticks_left(value: &ConntrackValue) -> i64 {
    i64::from(value.expires) - i64::from(now_ticks())
}

/// Asserts that an entry expires `secs` seconds from now: written by the
/// datapath at most two ticks ago, and never later than that.
fn assert_lives(value: &ConntrackValue, secs: u64, what: &str) {
    let want = i64::from(ticks_from_secs(secs));
    let left = ticks_left(value);
    assert!((want - 2..=want + 1).contains(&left), "{what}: expires in {left} ticks, want {want} ({secs} s)");
}

/// Runs one packet and returns its result and the one reason it was
/// counted under.
fn send(fixture: &Fixture, hook: Hook, what: &str, input: &[u8]) -> (RunResult, Reason) {
    let before = fixture.reason_totals();
    let result = fixture.run(hook, input);
    let after = fixture.reason_totals();
    let counted: Vec<Reason> = Reason::ALL.into_iter().filter(|r| after[*r as usize] != before[*r as usize]).collect();
    match counted[..] {
        [reason] if after[reason as usize] == before[reason as usize] + 1 => (result, reason),
        _ => panic!("{hook:?}: {what}: counted under {counted:?}, not once under one reason"),
    }
}

/// Sends `input` and checks that it passes as `output`, byte for byte,
/// counted under `reason`.
fn expect_pass(fixture: &Fixture, hook: Hook, what: &str, input: &Frame, output: &Frame, reason: Reason) {
    let (result, counted) = send(fixture, hook, what, &input.bytes());
    assert_eq!((result.verdict, counted), (Verdict::Pass, reason), "{hook:?}: {what}");
    assert_eq!(result.output, output.bytes(), "{hook:?}: {what}: output");
}

/// Sends `input` and checks that it passes untouched, as not the
/// datapath's: no entry translated it.
fn expect_untouched(fixture: &Fixture, hook: Hook, what: &str, input: &Frame) {
    expect_pass(fixture, hook, what, input, input, Reason::PassNotService);
}

/// The two entries of the flow whose forward entry is under `forward`:
/// that one, and the reply entry under its partner key, which must be its
/// other direction.
fn flow_entries(fixture: &Fixture, forward: &ConntrackKey, what: &str) -> (ConntrackValue, ConntrackValue) {
    let fwd = expect_entry(fixture, forward, &format!("{what}: forward entry"));
    assert_eq!(fwd.direction, CT_FORWARD, "{what}: forward entry's direction");
    let reply = expect_entry(fixture, &fwd.partner_key(forward.proto), &format!("{what}: reply entry"));
    assert_eq!(reply.direction, CT_REPLY, "{what}: reply entry's direction");
    assert!(fwd.pairs_with(forward, &reply), "{what}: the reply entry {reply:?} is not the forward entry's {fwd:?}");
    (fwd, reply)
}

/// Asserts that both entries of the flow are in `state` (with exactly
/// `flags`) and expire together, `secs` seconds from now.
fn assert_flow(fixture: &Fixture, forward: &ConntrackKey, what: &str, state: &str, flags: u8, secs: u64) {
    let (fwd, reply) = flow_entries(fixture, forward, what);
    for (side, value) in [("forward", &fwd), ("reply", &reply)] {
        assert_eq!(state_name(forward.proto, value.flow_flags), state, "{what}: {side} entry's state");
        assert_eq!(value.flow_flags, flags, "{what}: {side} entry's flags");
        assert_lives(value, secs, &format!("{what}: {side} entry"));
    }
    assert_eq!(fwd.expires, reply.expires, "{what}: both entries expire together");
}

/// The destination of a packet the datapath sent on, as "ip:port".
fn destination_of(frame: &Frame, output: &[u8]) -> String {
    let l4 = frame.l4_offset();
    let ip: [u8; 4] = output[30..34].try_into().expect("an IPv4 address");
    format!("{}:{}", std::net::Ipv4Addr::from(ip), u16::from_be_bytes([output[l4 + 2], output[l4 + 3]]))
}

/// One packet of a flow, what it must leave as, and the state both of the
/// flow's entries are in afterwards, with their lifetime in seconds.
struct Step {
    what: &'static str,
    input: Frame,
    output: Frame,
    reason: Reason,
    state: &'static str,
    flags: u8,
    secs: u64,
}

/// Runs the steps of the flow whose forward entry is under `forward`;
/// `label` says which run failed.
fn run_steps(fixture: &Fixture, hook: Hook, label: &str, forward: &ConntrackKey, steps: Vec<Step>) {
    for step in steps {
        let what = format!("{label}: {}", step.what);
        expect_pass(fixture, hook, &what, &step.input, &step.output, step.reason);
        assert_flow(fixture, forward, &format!("{hook:?}: after {what}"), step.state, step.flags, step.secs);
    }
}

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

const NODE_IP: [u8; 4] = [192, 168, 0, 1];
const NODE_PORT: &str = "192.168.0.1:30080";
const UDP_NODE_PORT: &str = "192.168.0.1:30053";
/// A source NAT range of four ports.
const SNAT_PORTS: std::ops::RangeInclusive<u16> = 62_000..=62_003;

/// Node ports 30080 (TCP) and 30053 (UDP) with externalTrafficPolicy
/// Cluster: new flows get the node's address and a port of the range as
/// their source.
fn node_port_fixture() -> Fixture {
    let external = |(name, port): (ServicePortName, ServicePort)| (name.to_external(), ServicePort { snat: true, ..port });
    let mut fixture = Fixture::new(&desired([
        external(service("cluster", NODE_IP, 30080, Protocol::Tcp, &[([10, 244, 1, 2], 8080)])),
        external(service("cluster", NODE_IP, 30053, Protocol::Udp, &[([10, 244, 1, 2], 5353)])),
    ]));
    let config = DatapathConfig {
        snat_ip: ip_be(NODE_IP.into()),
        snat_port_min: *SNAT_PORTS.start(),
        snat_port_max: *SNAT_PORTS.end(),
        ..DatapathConfig::default()
    };
    fixture.datapath.maps.set_config(config).expect("config");
    fixture
}

/// The node port service of `proto`, as the backend sees it from the node.
fn node_port(proto: u8) -> Svc {
    if proto == IPPROTO_TCP {
        Svc { proto, frontend: NODE_PORT, backend: WEB.backend }
    } else {
        Svc { proto, frontend: UDP_NODE_PORT, backend: DNS.backend }
    }
}

/// Opens a source-translated flow from `client` and returns the node's
/// source port it got; checks the output and that the backend's answer
/// goes back to the client.
fn open_translated(fixture: &Fixture, hook: Hook, svc: Svc, client: &str) -> u16 {
    let first = if svc.proto == IPPROTO_TCP { Frame::tcp_syn(client, svc.frontend) } else { svc.request(client) };
    let what = format!("{} flow from {client}", svc.name());
    let (result, reason) = send(fixture, hook, &what, &first.bytes());
    assert_eq!((result.verdict, reason), (Verdict::Pass, Reason::ForwardNew), "{hook:?}: {what}");
    let l4 = first.l4_offset();
    let port = u16::from_be_bytes([result.output[l4], result.output[l4 + 1]]);
    assert!(SNAT_PORTS.contains(&port), "{hook:?}: {what}: source port {port}");
    let node = format!("192.168.0.1:{port}");
    assert_eq!(result.output, first.clone().with_src(&node).with_dst(svc.backend).bytes(), "{hook:?}: {what}: output");
    let answer = if svc.proto == IPPROTO_TCP { Frame::tcp_syn_ack(svc.backend, &node) } else { svc.response(&node) };
    expect_pass(fixture, hook, &format!("{what}: answer"), &answer, &answer.clone().with_src(svc.frontend).with_dst(client), Reason::ReplyTranslated);
    port
}

/// Four clients' flows take the four ports.
fn fill_ports(fixture: &Fixture, hook: Hook, svc: Svc, clients: &[String]) -> Vec<u16> {
    let ports: Vec<u16> = clients.iter().map(|client| open_translated(fixture, hook, svc, client)).collect();
    let distinct: BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct, SNAT_PORTS.collect(), "{hook:?} {}: every port of the range, once: {ports:?}", svc.name());
    ports
}

fn expect_no_port(fixture: &Fixture, hook: Hook, svc: Svc, client: &str, what: &str) {
    let first = if svc.proto == IPPROTO_TCP { Frame::tcp_syn(client, svc.frontend) } else { svc.request(client) };
    let (result, reason) = send(fixture, hook, what, &first.bytes());
    assert_eq!((result.verdict, reason), (Verdict::Drop, Reason::DropNoSnatPort), "{hook:?} {}: {what}", svc.name());
}

/// Makes both entries of each source-translated flow (`clients[i]` on the
/// node's port `ports[i]`) expired.
fn expire_translated(fixture: &mut Fixture, svc: Svc, clients: &[String], ports: &[u16]) {
    for (client, port) in clients.iter().zip(ports) {
        set_expires(fixture, &key(client, svc.frontend, svc.proto), now_ticks() - 1);
        set_expires(fixture, &key(svc.backend, &format!("192.168.0.1:{port}"), svc.proto), now_ticks() - 1);
    }
}

fn clients(net: u8) -> Vec<String> {
    (2..6).map(|host| format!("10.0.{net}.{host}:40000")).collect()
}

#[test]
fn closed_flows_free_their_source_nat_ports() {
    for hook in HOOKS {
        let mut fixture = node_port_fixture();
        let web = node_port(IPPROTO_TCP);

        let first = clients(0);
        let ports = fill_ports(&fixture, hook, web, &first);
        expect_no_port(&fixture, hook, web, "10.0.9.9:40000", "a fifth flow while four live flows hold the ports");

        // Two reset by their clients, two closed by both FINs.
        for (i, (client, port)) in first.iter().zip(&ports).enumerate() {
            let node = format!("192.168.0.1:{port}");
            if i < 2 {
                let reset = rst(client, NODE_PORT);
                expect_pass(&fixture, hook, "the client's RST", &reset, &reset.clone().with_src(&node).with_dst(web.backend), Reason::ForwardEstablished);
            } else {
                let client_fin = fin(client, NODE_PORT);
                expect_pass(&fixture, hook, "the client's FIN", &client_fin, &client_fin.clone().with_src(&node).with_dst(web.backend), Reason::ForwardEstablished);
                let backend_fin = fin(web.backend, &node);
                expect_pass(&fixture, hook, "the backend's FIN", &backend_fin, &backend_fin.clone().with_src(NODE_PORT).with_dst(client), Reason::ReplyTranslated);
            }
        }

        // Four new clients take the closed flows' ports (and their replies
        // go to the new clients); a fifth finds them held again.
        let second = clients(1);
        let reused = fill_ports(&fixture, hook, web, &second);
        expect_no_port(&fixture, hook, web, "10.0.9.9:40000", "a fifth flow after the ports were reused");

        // A late RST of a closed flow (a state change, so both of its
        // entries are written) leaves the flow that took its port alone.
        let (old, port) = (&first[2], ports[2]);
        let new = &second[reused.iter().position(|p| *p == port).expect("the port was reused")];
        let node = format!("192.168.0.1:{port}");
        let late = rst(old, NODE_PORT);
        expect_pass(&fixture, hook, "a late RST of a closed flow", &late, &late.clone().with_src(&node).with_dst(web.backend), Reason::ForwardEstablished);
        assert_eq!(state_name(IPPROTO_TCP, expect_entry(&fixture, &key(old, NODE_PORT, IPPROTO_TCP), "the old flow").flow_flags), "reset", "{hook:?}");
        let (_, reply) = flow_entries(&fixture, &key(new, NODE_PORT, IPPROTO_TCP), &format!("{hook:?}: the flow on port {port}"));
        assert_eq!((state_name(IPPROTO_TCP, reply.flow_flags), reply.destination()), ("established", endpoint(new)), "{hook:?}: the port's new flow keeps its state");
        expect_no_port(&fixture, hook, web, "10.0.9.9:40000", "a fifth flow after the late RST");

        // Live flows whose entries expired hold nothing.
        expire_translated(&mut fixture, web, &second, &reused);
        fill_ports(&fixture, hook, web, &clients(2));
        expect_no_port(&fixture, hook, web, "10.0.9.9:40000", "a fifth flow after the expired ports were reused");
    }
}

/// The garbage collector reads a table, then deletes what it found
/// expired. A flow that took one of those tuples in between (here new
/// clients' flows, given the expired flows' source NAT ports, and for TCP
/// answered, so back in the same table) keeps its entries through the
/// deletion, and the backend's answers still reach its client; only the
/// old flows' own entries go.
#[test]
fn a_collection_leaves_alone_the_flows_that_took_expired_tuples_meanwhile() {
    use lb_common::lifecycle::is_alive;
    use lb_userspace::{conntrack, maps::table_fd};
    for hook in HOOKS {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let mut fixture = node_port_fixture();
            let svc = node_port(proto);
            let old = clients(0);
            let ports = fill_ports(&fixture, hook, svc, &old);
            expire_translated(&mut fixture, svc, &old, &ports);

            let now = now_ticks();
            let read: Vec<(&str, Vec<ConntrackKey>)> = fixture
                .datapath
                .maps
                .conntrack
                .tables()
                .iter()
                .map(|(name, _, table)| {
                    let entries = conntrack::read_all(table_fd(table)).expect("the collector's read");
                    (*name, entries.into_iter().filter(|(_, v)| !is_alive(v.expires, now)).map(|(k, _)| k).collect())
                })
                .collect();
            assert_eq!(read.iter().map(|(_, keys)| keys.len()).sum::<usize>(), 8, "{hook:?} {}: both entries of the four flows read expired", svc.name());

            let new = clients(1);
            let reused = fill_ports(&fixture, hook, svc, &new);
            let mut deleted = 0;
            for (name, keys) in &read {
                let table = fixture.datapath.maps.conntrack.named(name).expect("table");
                deleted += conntrack::delete_if(table_fd(table), keys, |_, v: &ConntrackValue| !is_alive(v.expires, now)).expect("the collector's deletion");
            }
            assert_eq!(deleted, 4, "{hook:?} {}: the old flows' forward entries went, their reply tuples are the new flows'", svc.name());
            for (client, port) in new.iter().zip(&reused) {
                let what = format!("{hook:?} {}: the flow from {client} on port {port} after the collection", svc.name());
                flow_entries(&fixture, &svc.forward_key(client), &what);
                let answer = svc.response(&format!("192.168.0.1:{port}"));
                expect_pass(&fixture, hook, &what, &answer, &answer.clone().with_src(svc.frontend).with_dst(client), Reason::ReplyTranslated);
            }
        }
    }
}

#[test]
fn expired_udp_flows_free_their_source_nat_ports() {
    for hook in HOOKS {
        let mut fixture = node_port_fixture();
        let dns = node_port(IPPROTO_UDP);
        let first = clients(0);
        let ports = fill_ports(&fixture, hook, dns, &first);
        expect_no_port(&fixture, hook, dns, "10.0.9.9:40000", "a fifth UDP flow while four live flows hold the ports");
        expire_translated(&mut fixture, dns, &first, &ports);
        fill_ports(&fixture, hook, dns, &clients(1));
        expect_no_port(&fixture, hook, dns, "10.0.9.9:40000", "a fifth UDP flow after the expired ports were reused");
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

/// A SYN flood never evicts an established connection: connections not
/// answered yet wait in their own table (`CONNTRACK_TCP_PENDING`), so more
/// new flows than this CPU's share of the TCP table (all recorded on one
/// CPU, which evicts from its own LRU list) leave an idle established flow
/// in place; the pressure shows in the garbage collector's figures, the
/// pending table at its CPU share.
#[test]
fn a_syn_flood_does_not_evict_an_idle_established_connection() {
    use lb_common::{MAP_CONNTRACK_TCP_PENDING, MAX_CONNTRACK_ENTRIES, MAX_PENDING_ENTRIES};
    lb_tests::fixture::pin_to_one_cpu();
    let fixture = Fixture::new(&desired([service("web", [10, 96, 0, 10], 80, Protocol::Tcp, &[([10, 244, 1, 2], 8080)])]));
    let syn = Frame::tcp_syn("10.0.0.2:40000", "10.96.0.10:80");
    assert_eq!(fixture.run(Hook::Xdp, &syn.bytes()).verdict, Verdict::Pass);
    assert_eq!(fixture.run(Hook::Xdp, &Frame::tcp_syn_ack("10.244.1.2:8080", "10.0.0.2:40000").bytes()).verdict, Verdict::Pass);

    let cpus = aya::util::nr_cpus().expect("possible CPUs") as u32;
    let share = MAX_CONNTRACK_ENTRIES / cpus;
    // Two entries per flow: more flows than this CPU's share of the TCP table.
    let flows = (share / 2 + 10_000) as usize;
    let program = fixture.datapath.xdp_program().expect("xdp program");
    let mut output = vec![0u8; 256];
    for flow in 0..flows {
        // Spoofed sources: 60,000 ports from each of as many addresses as it takes.
        let client = format!("10.1.0.{}:{}", flow / 60_000 + 1, 1024 + flow % 60_000);
        let bytes = Frame::tcp_syn(&client, "10.96.0.10:80").bytes();
        let opts = TestRunOptions { data_in: Some(&bytes), data_out: Some(&mut output), repeat: 1, ..Default::default() };
        let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
        assert_eq!(Hook::Xdp.verdict(result.return_value), Some(Verdict::Pass), "SYN {flow}");
    }
    assert_eq!(fixture.reason_totals()[Reason::ForwardNew as usize], flows as u64 + 1, "every SYN was a new flow");

    let data = Frame::tcp_data("10.0.0.2:40000", "10.96.0.10:80", b"still there?");
    let before = fixture.reason_totals();
    let out = fixture.run(Hook::Xdp, &data.bytes());
    assert_eq!(out.output, data.clone().with_dst("10.244.1.2:8080").bytes(), "the idle connection reaches its backend");
    let after = fixture.reason_totals();
    assert_eq!(after[Reason::ForwardEstablished as usize], before[Reason::ForwardEstablished as usize] + 1, "and is still tracked");

    let pass = collect(&fixture);
    let live = |table: &str| pass.tables.iter().find(|(name, _)| *name == table).map_or(0, |(_, n)| *n);
    let pending_share = u64::from(MAX_PENDING_ENTRIES / cpus);
    println!(
        "{flows} SYNs on one CPU: pending table {} entries (its CPU share {pending_share}), TCP table {}",
        live(MAP_CONNTRACK_TCP_PENDING),
        live(MAP_CONNTRACK_TCP)
    );
    assert!(live(MAP_CONNTRACK_TCP_PENDING) >= pending_share * 9 / 10, "the flood fills the pending table: {:?}", pass.tables);
    assert_eq!(live(MAP_CONNTRACK_TCP), 2, "only the established connection is confirmed: {:?}", pass.tables);
    let syn_sent = pass.entries.iter().find(|(p, s, _)| *p == "TCP" && *s == "syn_sent").map_or(0, |e| e.2);
    assert!(syn_sent >= pending_share * 9 / 10, "the pressure shows as syn_sent entries: {:?}", pass.entries);
}

/// A fragmented datagram of a tracked flow is translated fragment by
/// fragment: the first (with the UDP header) like any packet of the flow,
/// the later ones by the ports the first left in `FRAGMENT_PORTS`. A large
/// DNS answer from the backend reaches the client from the service, and a
/// large query reaches the backend. A later fragment whose first was never
/// seen is dropped when it is for a cluster IP, and left alone otherwise.
#[test]
fn fragments_of_a_tracked_flow_are_translated() {
    for hook in HOOKS {
        let fixture = Fixture::new(&desired([service("dns", [10, 96, 0, 10], 53, Protocol::Udp, &[([10, 244, 1, 2], 5353)])]));
        let big: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        let query = Frame::udp("10.0.0.2:5000", "10.96.0.10:53", &big);
        let sent = query.clone().with_dst("10.244.1.2:5353");
        let answer = Frame::udp("10.244.1.2:5353", "10.0.0.2:5000", &big);
        let delivered = answer.clone().with_src("10.96.0.10:53");
        for (what, input, output) in [("query", &query, &sent), ("answer", &answer, &delivered)] {
            let (fragments, expected) = (input.fragments(1480), output.fragments(1480));
            assert_eq!(fragments.len(), 3, "{what}: 3008 bytes of UDP in 1480-byte pieces");
            for (i, (fragment, want)) in fragments.iter().zip(&expected).enumerate() {
                let before = fixture.reason_totals();
                let out = fixture.run(hook, fragment);
                assert_eq!(out.verdict, Verdict::Pass, "{hook:?} {what} fragment {i}");
                assert_eq!(&out.output, want, "{hook:?} {what} fragment {i}: translated, checksums and all");
                let after = fixture.reason_totals();
                let counted: Vec<Reason> = Reason::ALL.into_iter().filter(|r| after[*r as usize] != before[*r as usize]).collect();
                let reason = match (what, i) {
                    ("query", 0) => Reason::ForwardNew,
                    ("query", _) => Reason::ForwardEstablished,
                    _ => Reason::ReplyTranslated,
                };
                assert_eq!(counted, vec![reason], "{hook:?} {what} fragment {i}");
            }
        }
        let orphan = Frame::udp("10.0.0.3:5000", "10.96.0.10:53", &big).fragments(1480);
        let out = fixture.run(hook, &orphan[1]);
        assert_eq!(out.verdict, Verdict::Drop, "{hook:?}: a later fragment to a cluster IP without its first");
        let elsewhere = Frame::udp("10.0.0.3:5000", "10.0.0.9:53", &big).fragments(1480);
        let out = fixture.run(hook, &elsewhere[1]);
        assert_eq!((out.verdict, &out.output), (Verdict::Pass, &elsewhere[1]), "{hook:?}: not a service's: unchanged");
    }
}

/// The agent's garbage collection deletes the entries that expired and only
/// those, and counts the live ones by table and state: one TCP and one UDP
/// flow expired, one of each still live.
#[test]
fn garbage_collection_deletes_expired_entries_and_counts_the_rest() {
    let mut fixture = Fixture::new(&services());
    let (expired, live) = ("10.0.0.2:40000", "10.0.0.2:40001");
    for svc in [WEB, DNS] {
        svc.open(&fixture, Hook::Xdp, expired);
        svc.open(&fixture, Hook::Xdp, live);
        set_expires(&mut fixture, &svc.forward_key(expired), now_ticks() - 1);
        set_expires(&mut fixture, &svc.reply_key(expired), now_ticks() - 1);
    }
    let pass = collect(&fixture);
    assert_eq!(pass.deleted, 4, "both entries of both expired flows");
    for svc in [WEB, DNS] {
        for (what, key, alive) in [
            ("expired forward", svc.forward_key(expired), false),
            ("expired reply", svc.reply_key(expired), false),
            ("live forward", svc.forward_key(live), true),
            ("live reply", svc.reply_key(live), true),
        ] {
            assert_eq!(entry(&fixture, &key).is_some(), alive, "{} {what}", svc.name());
        }
    }
    let count = |protocol: &str, state: &str| pass.entries.iter().find(|(p, s, _)| *p == protocol && *s == state).map_or(0, |e| e.2);
    assert_eq!((count("TCP", "established"), count("UDP", "udp_answered")), (2, 2), "live entries by state: {:?}", pass.entries);
    assert_eq!(pass.tables.iter().map(|(_, n)| n).sum::<u64>(), 4, "live entries by table: {:?}", pass.tables);
}

/// One garbage collection pass over the fixture's tables, as the agent's
/// collector makes over the pinned ones.
fn collect(fixture: &Fixture) -> lb_userspace::conntrack::GcPass {
    use lb_common::{MAP_CONNTRACK_TCP_PENDING, MAX_CONNTRACK_ENTRIES, MAX_PENDING_ENTRIES};
    use lb_userspace::{conntrack::{Table, collect_tables}, maps::table_fd};
    let tables: Vec<Table<'_>> = fixture
        .datapath
        .maps
        .conntrack
        .tables()
        .into_iter()
        .map(|(name, proto, table)| Table {
            name,
            proto,
            fd: table_fd(table),
            capacity: if name == MAP_CONNTRACK_TCP_PENDING { MAX_PENDING_ENTRIES } else { MAX_CONNTRACK_ENTRIES },
        })
        .collect();
    collect_tables(&tables, now_ticks()).expect("a collection pass")
}
