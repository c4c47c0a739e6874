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
    fragments, icmp,
    nat,
    parse::{self, Flow, Parsed},
    reject::{self, RejectError},
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
    let flow = match parse::parse(pkt) {
        Parsed::Flow(flow) => flow,
        Parsed::NotIpv4 => return (Action::Pass, Reason::PassNotIpv4),
        Parsed::OtherProtocol => return (Action::Pass, Reason::PassNotService),
        Parsed::Icmp { icmp_off, ip_len } => {
            return match icmp::translate_error(pkt, icmp_off) {
                Some(service_id) => {
                    stats::count_service_packet(service_id, ip_len, false);
                    (Action::Pass, Reason::IcmpErrorTranslated)
                }
                None if icmp::answer_echo(pkt, icmp_off) => (Action::Bounce, Reason::EchoAnswered),
                None => (Action::Pass, Reason::PassNotService),
            };
        }
        Parsed::Malformed { dst: Some(dst) } if service::is_cluster_ip(dst) => {
            return (Action::Drop, Reason::DropMalformed);
        }
        Parsed::Malformed { .. } => return (Action::Pass, Reason::PassMalformed),
        Parsed::Fragment(fragment) => {
            return match fragments::translate(pkt, &fragment) {
                Some(reason) => (Action::Pass, reason),
                None if service::is_cluster_ip(fragment.key.dst_ip) => (Action::Drop, Reason::DropFragment),
                None => (Action::Pass, Reason::PassNotService),
            };
        }
    };

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
                let verdict = translate(pkt, &flow, ct, false, reason);
                if let Some(current) = moved_to {
                    entry.remember_backend_set(current);
                }
                entry.track(&flow, now);
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
            u32::from_be(t.src_ip), u16::from_be(t.src_port), u32::from_be(t.dst_ip), u16::from_be(t.dst_port), t.proto);
        return reject(pkt, &flow, None, Reason::RejectUnknownPort);
    };
    if !service::source_allowed(&fe, t.src_ip) {
        debug!(pkt, "drop {:i}:{} -> {:i}:{}: not in service {}'s loadBalancerSourceRanges",
            u32::from_be(t.src_ip), u16::from_be(t.src_port), u32::from_be(t.dst_ip), u16::from_be(t.dst_port), fe.service_id);
        return (Action::Drop, Reason::DropSourceRange);
    }
    let fe = service::serving_frontend(fe, t);
    let Some(backend) = service::pick_backend_for(&fe, u64::from(t.src_ip)) else {
        if fe.flags & FRONTEND_DROP_WHEN_EMPTY != 0 {
            debug!(pkt, "drop {:i}:{} -> {:i}:{}: service {} has no local endpoint",
                u32::from_be(t.src_ip), u16::from_be(t.src_port), u32::from_be(t.dst_ip), u16::from_be(t.dst_port), fe.service_id);
            return (Action::Drop, Reason::DropNoLocalEndpoint);
        }
        debug!(pkt, "reject {:i}:{} -> {:i}:{}: service {} has no endpoints",
            u32::from_be(t.src_ip), u16::from_be(t.src_port), u32::from_be(t.dst_ip), u16::from_be(t.dst_port), fe.service_id);
        return reject(pkt, &flow, Some(fe.service_id), Reason::RejectNoBackend);
    };
    // Source NAT for external traffic with externalTrafficPolicy Cluster,
    // for hairpin (a pod sent to itself would otherwise get a packet from
    // its own address, and answer it without going through the node), and
    // for clients of a cluster IP that kube-proxy masquerades.
    let now = conntrack::now();
    let start = conntrack::Start::of(&flow, now);
    let masquerade = vip.flags & VIP_CLUSTER_IP != 0 && service::masquerades_cluster_ip_client(t.src_ip);
    let recorded = if fe.flags & FRONTEND_SNAT != 0 || backend.ip == t.src_ip || masquerade {
        conntrack::record_with_snat(t, fe.service_id, backend, fe.backend_set, start, now, service::node_address())
    } else {
        conntrack::record(t, fe.service_id, backend, fe.backend_set, start, now)
    };
    let forward = match recorded {
        Ok(forward) => forward,
        Err(RecordError::Full) => {
            warn!(pkt, "drop {:i}:{} -> {:i}:{}: the conntrack entry could not be stored",
                u32::from_be(t.src_ip), u16::from_be(t.src_port), u32::from_be(t.dst_ip), u16::from_be(t.dst_port));
            return (Action::Drop, Reason::DropConntrackFull);
        }
        Err(RecordError::NoSnatPort) => {
            warn!(pkt, "drop {:i}:{} -> {:i}:{}: source NAT needed, and no node address is configured or no port is free",
                u32::from_be(t.src_ip), u16::from_be(t.src_port), u32::from_be(t.dst_ip), u16::from_be(t.dst_port));
            return (Action::Drop, Reason::DropNoSnatPort);
        }
    };
    let reason = if rescheduled { Reason::ForwardRescheduled } else { Reason::ForwardNew };
    translate(pkt, &flow, &forward, true, reason)
}

/// How a packet of a tracked flow is counted, and the backend set to
/// remember when its backend was found in a newer one; `None` when the
/// backend left (the flow is placed afresh). Replies need no check.
#[inline(always)]
fn established_translation(ct: &ConntrackValue) -> Option<(Reason, Option<u32>)> {
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
fn backend_status(ct: &ConntrackValue) -> BackendStatus {
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
fn translate<P: Packet>(pkt: &P, flow: &Flow, to: &ConntrackValue, new_flow: bool, reason: Reason) -> (Action, Reason) {
    if nat::rewrite(pkt, flow, to).is_err() {
        let t = &flow.tuple;
        warn!(pkt, "drop {:i}:{} -> {:i}:{}: a kernel helper failed while rewriting the packet",
            u32::from_be(t.src_ip), u16::from_be(t.src_port), u32::from_be(t.dst_ip), u16::from_be(t.dst_port));
        return (Action::Drop, Reason::DropRewriteFailed);
    }
    stats::count_service_packet(to.service_id, flow.ip_len, new_flow);
    if flow.first_fragment {
        fragments::remember(flow);
    }
    (Action::Pass, reason)
}

#[inline(always)]
fn reject<P: Packet>(pkt: &P, flow: &Flow, service_id: Option<u32>, reason: Reason) -> (Action, Reason) {
    match reject::reject(pkt, flow) {
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
