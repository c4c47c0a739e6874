//! The decision for one packet, shared by both hooks.
//!
//! A packet belongs to an established flow, is a reply, opens a new connection,
//! is rejected, or is not ours.
use aya_log_ebpf::{debug, warn};
use lb_common::{
    CT_REPLY, ConntrackValue, FRONTEND_DROP_WHEN_EMPTY, FRONTEND_SNAT, Reason, VIP_CLUSTER_IP,
};

use crate::{
    conntrack::{self, RecordError},
    context::Packet,
    family::Family,
    fragments, icmp,
    nat,
    parse::{self, Flow, Parsed},
    reject::RejectError,
    service, stats,
};

/// What the hook does with the packet afterwards.
pub enum Action {
    Pass,
    Drop,
    /// Send it back out of the interface it arrived on (a reject reply).
    Bounce,
}

#[inline(always)]
pub fn process<P: Packet>(pkt: &P) -> Action {
    let (action, reason) = decide(pkt);
    stats::count_reason(reason);
    action
}

#[inline(always)]
fn decide<P: Packet>(pkt: &P) -> (Action, Reason) {
    match parse::parse(pkt) {
        Parsed::Flow(flow) => decide_flow(pkt, &flow),
        Parsed::Flow6(flow) => decide_flow(pkt, &flow),
        Parsed::NotIp => (Action::Pass, Reason::PassNotIp),
        Parsed::OtherProtocol => (Action::Pass, Reason::PassNotService),
        Parsed::Icmp { icmp_off, ip_len } => match icmp::translate_error(pkt, icmp_off) {
            Some(service_id) => {
                stats::count_service_packet(service_id, u32::from(ip_len), false);
                (Action::Pass, Reason::IcmpErrorTranslated)
            }
            None if icmp::answer_echo(pkt, icmp_off) => (Action::Bounce, Reason::EchoAnswered),
            None => (Action::Pass, Reason::PassNotService),
        },
        Parsed::Malformed { dst: Some(dst) } if service::is_cluster_ip(dst) => (Action::Drop, Reason::DropMalformed),
        Parsed::Malformed6 { dst: Some(dst) } if service::is_cluster_ip(dst) => (Action::Drop, Reason::DropMalformed),
        Parsed::Malformed { .. } | Parsed::Malformed6 { .. } => (Action::Pass, Reason::PassMalformed),
        Parsed::Fragment(fragment) => match fragments::translate(pkt, &fragment) {
            Some(reason) => (Action::Pass, reason),
            None if service::is_cluster_ip(fragment.key.dst_ip) => (Action::Drop, Reason::DropFragment),
            None => (Action::Pass, Reason::PassNotService),
        },
        Parsed::Fragment6 { dst } if service::is_cluster_ip(dst) => (Action::Drop, Reason::DropFragment),
        Parsed::Fragment6 { .. } => (Action::Pass, Reason::PassNotService),
    }
}

/// The decision for a TCP segment or UDP datagram of either family.
#[inline(always)]
fn decide_flow<P: Packet, A: Family>(pkt: &P, flow: &Flow<A>) -> (Action, Reason) {
    // Conntrack first: one lookup settles both established flows and
    // replies, the packets that matter most. Only packets without an entry
    // (or with one that no longer serves them) pay for the service address
    // check.
    let mut rescheduled = false;
    if let Some(entry) = conntrack::lookup(&flow.tuple, flow.tcp_flags) {
        // The clock only for packets with an entry (and new flows, below):
        // traffic that is not a service's does not read it.
        let now = conntrack::now();
        let ct = entry.value();
        if entry.serves(flow.tcp_flags, now) {
            if let Some((reason, moved_to)) = established_translation(ct) {
                let verdict = translate(pkt, flow, ct, false, reason);
                if let Some(current) = moved_to {
                    entry.remember_backend_set(current);
                }
                entry.track(flow, now);
                return verdict;
            }
            // The backend left: the flow gets a new one, like a new connection.
            rescheduled = true;
        }
        // Placed afresh below (or not ours at all: a reply entry that no
        // longer serves leaves the packet to the kernel).
        if ct.direction != CT_REPLY {
            conntrack::forget(&flow.tuple, entry);
        }
    }
    new_flow(pkt, flow, rescheduled)
}

/// A packet without an entry that serves it: a new connection to a
/// service, a reject, or not ours. In a BPF function of its own, so that
/// its keys and values (the reply entry, the forward entry, the source NAT
/// search's keys) take a stack frame of their own rather than adding to
/// the established path's: both families' paths inlined into one program
/// would not fit its 512 bytes. Only first packets pay the call.
#[inline(always)]
fn new_flow<P: Packet, A: Family>(pkt: &P, flow: &Flow<A>, rescheduled: bool) -> (Action, Reason) {
    let Some(vip) = service::vip(flow.tuple.dst_ip) else {
        if service::is_unallocated_cluster_ip(flow.tuple.dst_ip) {
            return (Action::Drop, Reason::DropUnallocatedClusterIp);
        }
        return (Action::Pass, Reason::PassNotService);
    };
    // Logging happens only off the fast path: rejects and drops at debug
    // (off unless the agent runs at debug), failures that should not
    // happen at warn.
    let t = &flow.tuple;
    let Some(fe) = service::frontend(t) else {
        if vip.flags & VIP_CLUSTER_IP == 0 {
            // A node address or an external IP: other ports are the node's.
            return (Action::Pass, Reason::PassNotService);
        }
        debug!(pkt, "reject {:i}:{} -> {:i}:{} proto {}: the service address has no such port",
            t.src_ip.logged(), u16::from_be(t.src_port), t.dst_ip.logged(), u16::from_be(t.dst_port), t.proto);
        return reject(pkt, flow, None, Reason::RejectUnknownPort);
    };
    if !service::source_allowed(&fe, t.src_ip) {
        debug!(pkt, "drop {:i}:{} -> {:i}:{}: not in service {}'s loadBalancerSourceRanges",
            t.src_ip.logged(), u16::from_be(t.src_port), t.dst_ip.logged(), u16::from_be(t.dst_port), fe.service_id);
        return (Action::Drop, Reason::DropSourceRange);
    }
    let fe = service::serving_frontend(fe, t);
    let Some(backend) = service::pick_backend_for(&fe, A::client(t.src_ip)) else {
        if fe.flags & FRONTEND_DROP_WHEN_EMPTY != 0 {
            debug!(pkt, "drop {:i}:{} -> {:i}:{}: service {} has no local endpoint",
                t.src_ip.logged(), u16::from_be(t.src_port), t.dst_ip.logged(), u16::from_be(t.dst_port), fe.service_id);
            return (Action::Drop, Reason::DropNoLocalEndpoint);
        }
        debug!(pkt, "reject {:i}:{} -> {:i}:{}: service {} has no endpoints",
            t.src_ip.logged(), u16::from_be(t.src_port), t.dst_ip.logged(), u16::from_be(t.dst_port), fe.service_id);
        return reject(pkt, flow, Some(fe.service_id), Reason::RejectNoBackend);
    };
    // Source NAT for external traffic with externalTrafficPolicy Cluster,
    // for hairpin (a pod sent to itself would otherwise get a packet from
    // its own address, and answer it without going through the node), and
    // for clients of a cluster IP that kube-proxy masquerades.
    let now = conntrack::now();
    let start = conntrack::Start::of(flow, now);
    let masquerade = vip.flags & VIP_CLUSTER_IP != 0 && service::masquerades_cluster_ip_client(t.src_ip);
    let translate_source = fe.flags & FRONTEND_SNAT != 0 || backend.ip == t.src_ip || masquerade;
    let placed = conntrack::Placement { service_id: fe.service_id, backend, backend_set: fe.backend_set, start, now };
    let recorded = if translate_source {
        Err(RecordError::Clash)
    } else {
        conntrack::record(t, &placed)
    };
    // One call site for the source-translating record, whose search for a
    // free port is the largest piece of the new-connection path: a clash
    // keeps the client's address, the others get the node's.
    let recorded = match recorded {
        Err(RecordError::Clash) => {
            let source = if translate_source { A::node_address() } else { t.src_ip };
            conntrack::record_with_snat(t, &placed, source)
        }
        recorded => recorded,
    };
    let forward = match recorded {
        Ok(forward) => forward,
        Err(RecordError::Full) => {
            warn!(pkt, "drop {:i}:{} -> {:i}:{}: the conntrack entry could not be stored",
                t.src_ip.logged(), u16::from_be(t.src_port), t.dst_ip.logged(), u16::from_be(t.dst_port));
            return (Action::Drop, Reason::DropConntrackFull);
        }
        Err(RecordError::NoSnatPort | RecordError::Clash) => {
            warn!(pkt, "drop {:i}:{} -> {:i}:{}: source NAT needed, and no node address is configured or no port is free",
                t.src_ip.logged(), u16::from_be(t.src_port), t.dst_ip.logged(), u16::from_be(t.dst_port));
            return (Action::Drop, Reason::DropNoSnatPort);
        }
    };
    let reason = if rescheduled { Reason::ForwardRescheduled } else { Reason::ForwardNew };
    translate(pkt, flow, forward, true, reason)
}

/// How a packet of a tracked flow is counted, and the backend set to
/// remember when its backend was found in a newer one; `None` when the
/// backend left (the flow is placed afresh). Replies need no check.
#[inline(always)]
fn established_translation<A: Family>(ct: &ConntrackValue<A>) -> Option<(Reason, Option<u32>)> {
    if ct.direction == CT_REPLY {
        return Some((Reason::ReplyTranslated, None));
    }
    match backend_status(ct) {
        BackendStatus::InCurrentSet => Some((Reason::ForwardEstablished, None)),
        BackendStatus::MovedTo(current) => Some((Reason::ForwardEstablished, Some(current))),
        BackendStatus::Left => None,
    }
}

/// Whether an established flow's backend still serves its service.
enum BackendStatus {
    /// Found in the service's current backend set when it last was checked.
    InCurrentSet,
    /// A member of the current set, which is newer than the one the flow
    /// remembers: remembered from now on, so later packets skip the
    /// membership lookup.
    MovedTo(u32),
    /// Gone from the current set: the flow is placed afresh.
    Left,
}

/// At once when the set the backend was last found in is still the
/// service's current set, else by one membership lookup in the current set.
#[inline(always)]
fn backend_status<A: Family>(ct: &ConntrackValue<A>) -> BackendStatus {
    let current = service::current_backend_set(ct.service_id);
    if ct.backend_set == current {
        BackendStatus::InCurrentSet
    } else if service::is_member(current, ct.destination().into()) {
        BackendStatus::MovedTo(current)
    } else {
        BackendStatus::Left
    }
}

/// Rewrites the packet as the flow's conntrack entry `to` says.
#[inline(always)]
fn translate<P: Packet, A: Family>(pkt: &P, flow: &Flow<A>, to: &ConntrackValue<A>, new_flow: bool, reason: Reason) -> (Action, Reason) {
    if nat::rewrite(pkt, flow, to).is_err() {
        let t = &flow.tuple;
        warn!(pkt, "drop {:i}:{} -> {:i}:{}: a kernel helper failed while rewriting the packet",
            t.src_ip.logged(), u16::from_be(t.src_port), t.dst_ip.logged(), u16::from_be(t.dst_port));
        return (Action::Drop, Reason::DropRewriteFailed);
    }
    stats::count_service_packet(to.service_id, flow.ip_len, new_flow);
    if flow.first_fragment() {
        A::remember_fragment(flow);
    }
    (Action::Pass, reason)
}

#[inline(always)]
fn reject<P: Packet, A: Family>(pkt: &P, flow: &Flow<A>, service_id: Option<u32>, reason: Reason) -> (Action, Reason) {
    match answer_reject(pkt, flow) {
        Ok(()) => {
            if let Some(id) = service_id {
                stats::count_service_reject(id);
            }
            (Action::Bounce, reason)
        }
        Err(RejectError::Unanswerable) => (Action::Drop, Reason::DropUnanswerable),
        Err(RejectError::HelperFailed) => (Action::Drop, Reason::DropRewriteFailed),
    }
}

/// The packet turned into its reject answer. In a BPF function of its own:
/// building the answer takes stack that the new-connection path's deeper
/// calls (recording the flow) need, and the two never run together.
#[inline(always)]
fn answer_reject<P: Packet, A: Family>(pkt: &P, flow: &Flow<A>) -> Result<(), RejectError> {
    A::reject(pkt, flow)
}
