//! A conntrack entry's life, tested through BPF_PROG_TEST_RUN.
//!
//! What a flow's packets do to the state and expiry of both of its entries, how
//! long each state lives, what a closed or expired flow's entries still
//! translate and what they leave alone (a SYN on a closed tuple is a new
//! connection, a direct connection from the backend's port is not the closed
//! flow's), how a forward hit (or a pending connection's retransmitted SYN)
//! restores a missing reply entry, how closed and expired flows give their
//! source NAT ports back, and how a garbage collection leaves alone the flows
//! that took expired tuples while it ran. Packets are built by etherparse and
//! checked byte for byte; the entries are read from the maps. Every test runs
//! through both hooks, XDP and tc, each with a fresh datapath. Needs root.
//!
//! The tests are grouped by concern, one module each; the flows, packets and
//! checks below are shared by them.
mod closed_flows;
mod fragments;
mod garbage_collection;
mod source_nat;
mod states;

use lb_common::{
    CT_FORWARD, CT_REPLY, ConntrackKey, ConntrackValue, Endpoint, IPPROTO_TCP, IPPROTO_UDP, MAP_CONNTRACK_TCP,
    MAP_CONNTRACK_UDP, Reason,
    lifecycle::{state_name, ticks_from_secs},
};
use lb_tests::{
    fixture::{Fixture, Hook, RunResult, Verdict, desired, service},
    packets::{Frame, addr},
};
use lb_userspace::{
    conntrack::now_ticks,
    maps::ConntrackTable,
    model::{DesiredState, Protocol},
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
