//! The decision for one packet, shared by both hooks: established flow,
//! reply, new connection, reject, or not ours.
use lb_common::{Backend, CT_REPLY, Reason};

use crate::{
    conntrack,
    context::Packet,
    nat::{self, Side},
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
        Parsed::Malformed { dst: Some(dst) } if service::is_service_address(dst) => {
            return (Action::Drop, Reason::DropMalformed);
        }
        Parsed::Malformed { .. } => return (Action::Pass, Reason::PassMalformed),
        Parsed::Fragment { dst } if service::is_service_address(dst) => {
            return (Action::Drop, Reason::DropFragment);
        }
        Parsed::Fragment { .. } => return (Action::Pass, Reason::PassNotService),
    };

    let mut rescheduled = false;
    if let Some(ct) = conntrack::lookup(&flow.tuple) {
        if ct.direction == CT_REPLY {
            return translate(pkt, &flow, Side::Source, ct.nat_ip, ct.nat_port, ct.service_id, false, Reason::ReplyTranslated);
        }
        let backend = Backend { ip: ct.nat_ip, port: ct.nat_port, _pad: 0 };
        if service::still_serves(ct.service_id, backend) {
            return translate(pkt, &flow, Side::Destination, backend.ip, backend.port, ct.service_id, false, Reason::ForwardEstablished);
        }
        // The backend left: the flow gets a new one, like a new connection.
        rescheduled = true;
    }

    let Some(fe) = service::frontend(&flow.tuple) else {
        if service::is_service_address(flow.tuple.dst_ip) {
            return reject(pkt, &flow, None, Reason::RejectUnknownPort);
        }
        return (Action::Pass, Reason::PassNotService);
    };
    let Some(backend) = service::pick_backend(&fe) else {
        return reject(pkt, &flow, Some(fe.service_id), Reason::RejectNoBackend);
    };
    if conntrack::record(&flow.tuple, fe.service_id, backend).is_err() {
        return (Action::Drop, Reason::DropConntrackFull);
    }
    let reason = if rescheduled { Reason::ForwardRescheduled } else { Reason::ForwardNew };
    translate(pkt, &flow, Side::Destination, backend.ip, backend.port, fe.service_id, true, reason)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn translate<P: Packet>(
    pkt: &P,
    flow: &Flow,
    side: Side,
    new_ip: u32,
    new_port: u16,
    service_id: u32,
    new_flow: bool,
    reason: Reason,
) -> (Action, Reason) {
    if nat::rewrite(pkt, flow, side, new_ip, new_port).is_err() {
        return (Action::Drop, Reason::DropRewriteFailed);
    }
    stats::count_service_packet(service_id, flow.ip_len, new_flow);
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
