//! Translating back ICMP errors about translated flows, so clients match them to their sockets.
//!
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
    parse::{self, EthIpv4, Ipv4Header},
    service,
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// An echo answer's TTL: Linux's default (net.ipv4.ip_default_ttl).
const ECHO_REPLY_TTL: u8 = 64;

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
    let entry = conntrack::lookup_any(&reverse)?;
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

/// Turns an echo request to a cluster IP into the echo reply from it, when
/// the agent enables it (`--answer-ping`: "I can't ping my service IP" is
/// the first thing users try): MACs and addresses swapped, type 0, TTL 64,
/// both checksums updated. The caller sends it back where it came from.
#[inline(always)]
pub fn answer_echo<P: Packet>(pkt: &P, icmp_off: usize) -> bool {
    let Some(headers) = ptr_at::<_, EthIpv4>(pkt, 0) else { return false };
    // The type and code, then the checksum, as native-order words.
    let Some(icmp) = ptr_at::<_, [u16; 2]>(pkt, icmp_off) else { return false };
    // SAFETY: both bounds-checked by ptr_at; unaligned because packet data
    // has no alignment guarantee (and the struct is packed).
    let (h, [type_code, icmp_check]) = unsafe { (headers.read_unaligned(), icmp.read_unaligned()) };
    let request = u16::from_ne_bytes([ICMP_ECHO_REQUEST, 0]);
    let ip = h.ip;
    if type_code != request || !service::answers_echo(ip.dst) {
        return false;
    }
    let reply = u16::from_ne_bytes([ICMP_ECHO_REPLY, 0]);
    // Swapped addresses leave the IPv4 sum as it was; the TTL shares a word
    // with the protocol.
    let ttl_delta = checksum::delta_u16(u16::from_ne_bytes([ip.ttl, ip.proto]), u16::from_ne_bytes([ECHO_REPLY_TTL, ip.proto]));
    let answer = EthIpv4 {
        dst_mac: h.src_mac,
        src_mac: h.dst_mac,
        ethertype: h.ethertype,
        ip: Ipv4Header { ttl: ECHO_REPLY_TTL, check: checksum::apply(ip.check, ttl_delta), src: ip.dst, dst: ip.src, ..ip },
    };
    // SAFETY: as above.
    unsafe {
        headers.write_unaligned(answer);
        icmp.write_unaligned([reply, checksum::apply(icmp_check, checksum::delta_u16(type_code, reply))]);
    }
    true
}
