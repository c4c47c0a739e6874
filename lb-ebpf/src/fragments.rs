//! IP fragments of tracked flows: every fragment translated, not only the first.
//!
//! Only a datagram's first fragment carries the TCP/UDP header, so its ports
//! are remembered (`FRAGMENT_PORTS`, keyed by the addresses, IP id and protocol
//! all fragments share) and the later fragments find the flow's conntrack entry
//! through them: their addresses are translated like the first fragment's. A
//! later fragment that arrives before its first is not known: left to the
//! kernel, or dropped when it is addressed to a cluster IP.
use lb_common::{CT_REPLY, FragmentKey, Reason};

use crate::{
    conntrack,
    context::Packet,
    family::Family,
    maps::FRAGMENT_PORTS,
    nat,
    parse::{self, Flow, Fragment},
    stats,
};

/// Remembers the ports of a translated first fragment for the later ones.
#[inline(always)]
pub fn remember(flow: &Flow) {
    let t = &flow.tuple;
    let key = FragmentKey { src_ip: t.src_ip, dst_ip: t.dst_ip, id: flow.ip_id, proto: t.proto, _pad: 0 };
    // A datagram whose ports cannot be stored loses its later fragments, as
    // without this map.
    let _best_effort = FRAGMENT_PORTS.insert(key, nat::ports_word(t.src_port, t.dst_port), 0);
}

/// Translates a later fragment as its first fragment was; `None` when its
/// first fragment was not seen (or not translated).
#[inline(always)]
pub fn translate<P: Packet>(pkt: &P, fragment: &Fragment) -> Option<Reason> {
    let key = &fragment.key;
    // SAFETY: a value copied out at once.
    let ports = unsafe { *FRAGMENT_PORTS.get_ptr(key)? };
    let entry = conntrack::lookup(&parse::tuple(key.src_ip, key.dst_ip, ports, key.proto), 0)?;
    if !entry.serves(0, conntrack::now()) {
        return None;
    }
    let ct = entry.value();
    Family::rewrite_addresses(pkt, ct).ok()?;
    stats::count_service_packet(ct.service_id, u32::from(fragment.ip_len), false);
    Some(if ct.direction == CT_REPLY { Reason::ReplyTranslated } else { Reason::ForwardEstablished })
}
