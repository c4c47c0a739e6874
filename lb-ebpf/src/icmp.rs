//! ICMP errors about translated flows (RFC 792, RFC 1812 §4.3.2.6 and
//! 5.2.7.1): a router's "fragmentation needed" for a packet sent to a
//! backend, or a backend's "port unreachable", quotes the packet as it left
//! the datapath. Unless the quote and the error's own addresses are
//! translated back, the client never matches it to its socket: path MTU
//! discovery stalls and UDP clients wait instead of failing at once.
use lb_common::{ConntrackValue, IPPROTO_TCP, IPPROTO_UDP, checksum, reply::ETH_HLEN};

use crate::{
    conntrack,
    context::{Packet, ptr_at},
    nat,
    parse::{self, Ipv4Header},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// An ICMP error message: its header, the quoted IPv4 header (without
/// options) and the first 8 bytes of the quoted TCP/UDP header, which
/// every error carries (RFC 792).
#[repr(C, packed)]
struct IcmpError {
    icmp_type: u8,
    code: u8,
    check: u16,
    rest_of_header: u32,
    quoted_ip: Ipv4Header,
    /// The two ports, in header order.
    quoted_ports: u32,
    /// UDP: the length, then the checksum; TCP: the sequence number.
    quoted_word2: u32,
}

/// Translates an ICMP error whose quoted packet belongs to a tracked flow;
/// returns the flow's service id, or `None` (nothing changed) for any other
/// ICMP message.
#[inline(always)]
pub fn translate_error<P: Packet>(pkt: &P, icmp_off: usize) -> Option<u32> {
    let outer = ptr_at::<_, Ipv4Header>(pkt, ETH_HLEN)?;
    let msg = ptr_at::<_, IcmpError>(pkt, icmp_off)?;
    // SAFETY: both bounds-checked by ptr_at; unaligned reads because packet
    // data has no alignment guarantee.
    let (outer_ip, m) = unsafe { (outer.read_unaligned(), msg.read_unaligned()) };
    let quoted = m.quoted_ip;
    if !matches!(m.icmp_type, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM)
        || quoted.version_ihl != 0x45
        || !matches!(quoted.proto, IPPROTO_TCP | IPPROTO_UDP)
    {
        return None;
    }
    // The quoted packet travelled the other way: its reverse is the tuple of
    // the direction this error travels, and that direction's entry says how
    // the error must look.
    // Rotating the ports word swaps the two ports.
    let reverse = parse::tuple(quoted.dst, quoted.src, m.quoted_ports.rotate_left(16), quoted.proto);
    let entry = conntrack::lookup(&reverse)?;
    let ct = entry.value();
    rewrite(outer, msg, &outer_ip, &m, ct);
    Some(ct.service_id)
}

/// The quote's source becomes the entry's destination and its destination
/// the entry's source: the same address and port changes as the entry's,
/// so its checksum deltas apply unchanged. The error's own source and
/// destination follow when they are the quoted packet's endpoints.
#[inline(always)]
fn rewrite(outer: *mut Ipv4Header, msg: *mut IcmpError, outer_ip: &Ipv4Header, m: &IcmpError, ct: &ConntrackValue) {
    let quoted = m.quoted_ip;
    let addr_delta = u32::from(ct.addr_csum_delta);
    let port_delta = u32::from(ct.port_csum_delta);
    let quoted_check = checksum::apply(quoted.check, addr_delta);
    let mut message_delta = addr_delta + port_delta + checksum::delta_u16(quoted.check, quoted_check);
    let word2 = m.quoted_word2;
    let mut new_word2 = word2;
    let udp_check = (word2 >> 16) as u16;
    if quoted.proto == IPPROTO_UDP && udp_check != 0 {
        let new_check = checksum::udp_nonzero(checksum::apply(udp_check, addr_delta + port_delta));
        message_delta += checksum::delta_u16(udp_check, new_check);
        new_word2 = (word2 & 0xffff) | u32::from(new_check) << 16;
    }
    // A quoted TCP checksum, when a longer quote carries it, stays as it
    // was: it lies beyond the 8 bytes every error quotes, and no receiver
    // checks it.
    let outer_src = if outer_ip.src == quoted.dst { ct.src_ip } else { outer_ip.src };
    let outer_dst = if outer_ip.dst == quoted.src { ct.dst_ip } else { outer_ip.dst };
    let outer_delta = checksum::delta_u32(outer_ip.src, outer_src) + checksum::delta_u32(outer_ip.dst, outer_dst);

    // SAFETY: both pointers were bounds-checked by the caller, and no
    // helper that moves packet data ran since; unaligned writes into packet
    // data (and a packed struct). Every change is paired with its checksum's
    // change in the same region, so a device checksum over the packet
    // (CHECKSUM_COMPLETE on tc) stays right without helpers.
    unsafe {
        (&raw mut (*outer).check).write_unaligned(checksum::apply(outer_ip.check, outer_delta));
        (&raw mut (*outer).src).write_unaligned(outer_src);
        (&raw mut (*outer).dst).write_unaligned(outer_dst);
        (&raw mut (*msg).check).write_unaligned(checksum::apply(m.check, message_delta));
        (&raw mut (*msg).quoted_ip.check).write_unaligned(quoted_check);
        (&raw mut (*msg).quoted_ip.src).write_unaligned(ct.dst_ip);
        (&raw mut (*msg).quoted_ip.dst).write_unaligned(ct.src_ip);
        (&raw mut (*msg).quoted_ports).write_unaligned(nat::ports_word(ct.dst_port, ct.src_port));
        (&raw mut (*msg).quoted_word2).write_unaligned(new_word2);
    }
}
