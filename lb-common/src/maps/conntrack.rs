//! Conntrack entries: a flow direction's wire 5-tuple and the translation its packets get.
use bytemuck::Zeroable;
use core::net::SocketAddrV4;

use super::{Backend, IpAddress, ip_be};
use crate::checksum;

/// `ConntrackValue::direction`: the client → service direction, translated
/// to the backend.
pub const CT_FORWARD: u8 = 1;
/// `ConntrackValue::direction`: the backend → client direction, translated
/// back to the service address.
pub const CT_REPLY: u8 = 2;

/// A packet's 5-tuple as seen on the wire at the hook; `A` is the family's
/// address (`u32` for IPv4, `Ipv6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Zeroable)]
pub struct ConntrackKey<A = u32> {
    /// Network byte order.
    pub src_ip: A,
    /// Network byte order.
    pub dst_ip: A,
    /// Network byte order.
    pub src_port: u16,
    /// Network byte order.
    pub dst_port: u16,
    pub proto: u8,
    // Two fields rather than [u8; 3]: zeroing an odd-sized array compiles to
    // a memset call on BPF, two plain stores here.
    pub _pad: u8,
    pub _pad2: u16,
}
const _: () = assert!(align_of::<ConntrackKey>() == 4);

/// What to do with a packet whose 5-tuple matches the key: the addresses
/// and ports it leaves with, and what rewriting them changes in the
/// checksums, worked out once when the flow is recorded so that every
/// later packet only copies and adds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Zeroable)]
pub struct ConntrackValue<A = u32> {
    /// The source after translation: unchanged, the service frontend
    /// (`CT_REPLY`), or the node's address (`CT_FORWARD` with source NAT).
    /// Network byte order; the two addresses in IP header order.
    pub src_ip: A,
    /// The destination after translation: the backend (`CT_FORWARD`), or
    /// the client again (`CT_REPLY` with source NAT). Network byte order.
    pub dst_ip: A,
    /// Network byte order; the two ports in TCP/UDP header order.
    pub src_port: u16,
    /// Network byte order.
    pub dst_port: u16,
    /// What the address rewrite adds to the IPv4 header checksum (IPv6 has
    /// none) and, through the pseudo-header, to the TCP/UDP checksum (folded one's
    /// complement, see `checksum`).
    pub addr_csum_delta: u16,
    /// What the port rewrite adds to the TCP/UDP checksum.
    pub port_csum_delta: u16,
    pub service_id: u32,
    /// `CT_FORWARD`: the backend set the backend was last found in; while
    /// it is the service's current set, the backend still serves.
    pub backend_set: u32,
    /// `CT_FORWARD` or `CT_REPLY`.
    pub direction: u8,
    /// The flow's state, `lifecycle::FLOW_*` bits; the same in both of its
    /// entries.
    pub flow_flags: u8,
    /// Both changes as one, for a complete TCP/UDP checksum (XDP); a
    /// partial one (tc) takes the two apart.
    pub l4_csum_delta: u16,
    /// When the entry dies without further traffic, in monotonic clock
    /// ticks (`lifecycle`): at or after it the entry is a miss, and the
    /// agent's garbage collection deletes it.
    pub expires: u32,
}

/// An address and port, network byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint<A = u32> {
    pub ip: A,
    pub port: u16,
}

impl ConntrackKey {
    /// The key of a packet from `src` to `dst`.
    pub const fn new(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> Self {
        Self { src_ip: ip_be(*src.ip()), dst_ip: ip_be(*dst.ip()), src_port: src.port().to_be(), dst_port: dst.port().to_be(), proto, _pad: 0, _pad2: 0 }
    }
}

impl<A: IpAddress> ConntrackKey<A> {
    /// The key of a packet from `src` to `dst`, network byte order.
    #[inline(always)]
    pub const fn of(src: Endpoint<A>, dst: Endpoint<A>, proto: u8) -> Self {
        Self { src_ip: src.ip, dst_ip: dst.ip, src_port: src.port, dst_port: dst.port, proto, _pad: 0, _pad2: 0 }
    }

    /// Where the packet comes from.
    #[inline(always)]
    pub const fn source(&self) -> Endpoint<A> {
        Endpoint { ip: self.src_ip, port: self.src_port }
    }

    /// Where the packet goes.
    #[inline(always)]
    pub const fn destination(&self) -> Endpoint<A> {
        Endpoint { ip: self.dst_ip, port: self.dst_port }
    }
}

impl From<SocketAddrV4> for Endpoint {
    fn from(addr: SocketAddrV4) -> Self {
        Endpoint { ip: ip_be(*addr.ip()), port: addr.port().to_be() }
    }
}

impl<A: IpAddress> From<Backend<A>> for Endpoint<A> {
    #[inline(always)]
    fn from(backend: Backend<A>) -> Self {
        Endpoint { ip: backend.ip, port: backend.port }
    }
}

impl<A: IpAddress> From<Endpoint<A>> for Backend<A> {
    #[inline(always)]
    fn from(endpoint: Endpoint<A>) -> Self {
        Backend { ip: endpoint.ip, port: endpoint.port, _pad: 0, _pad_v6: A::Pad::default() }
    }
}

impl<A: IpAddress> ConntrackValue<A> {
    /// The entry that rewrites packets of `key` to come from `src` and go
    /// to `dst`, with the checksum changes that rewrite makes.
    #[inline(always)]
    pub fn translating(key: &ConntrackKey<A>, src: Endpoint<A>, dst: Endpoint<A>, service_id: u32, backend_set: u32, direction: u8) -> Self {
        let addr_csum_delta = checksum::fold(key.src_ip.csum_delta(src.ip) + key.dst_ip.csum_delta(dst.ip));
        let port_csum_delta = checksum::fold(checksum::delta_u16(key.src_port, src.port) + checksum::delta_u16(key.dst_port, dst.port));
        ConntrackValue {
            src_ip: src.ip,
            dst_ip: dst.ip,
            src_port: src.port,
            dst_port: dst.port,
            addr_csum_delta,
            port_csum_delta,
            service_id,
            backend_set,
            direction,
            flow_flags: 0,
            l4_csum_delta: checksum::fold(addr_csum_delta as u32 + port_csum_delta as u32),
            expires: 0,
        }
    }

    /// The conntrack key of the flow's other direction: the packets that
    /// answer this entry's translated ones.
    #[inline(always)]
    pub const fn partner_key(&self, proto: u8) -> ConntrackKey<A> {
        ConntrackKey { src_ip: self.dst_ip, dst_ip: self.src_ip, src_port: self.dst_port, dst_port: self.src_port, proto, _pad: 0, _pad2: 0 }
    }

    /// The entry of the flow's other direction, for an entry of `key`: its
    /// packets leave as the reverse of `key`.
    #[inline(always)]
    pub fn partner(&self, key: &ConntrackKey<A>) -> ConntrackValue<A> {
        let direction = if self.direction == CT_REPLY { CT_FORWARD } else { CT_REPLY };
        let mut partner = Self::translating(&self.partner_key(key.proto), key.destination(), key.source(), self.service_id, 0, direction);
        partner.flow_flags = self.flow_flags;
        partner.expires = self.expires;
        partner
    }

    /// Whether `other`, found under this entry's `partner_key`, is this
    /// flow's other direction (and not another flow's that took the tuple).
    #[inline(always)]
    pub fn pairs_with(&self, key: &ConntrackKey<A>, other: &ConntrackValue<A>) -> bool {
        other.src_ip == key.dst_ip && other.dst_ip == key.src_ip && other.src_port == key.dst_port && other.dst_port == key.src_port
    }

    /// Where a packet of this entry's flow goes after translation (the
    /// backend, for `CT_FORWARD`).
    #[inline(always)]
    pub const fn destination(&self) -> Endpoint<A> {
        Endpoint { ip: self.dst_ip, port: self.dst_port }
    }

    /// Where a packet of this entry's flow seems to come from after
    /// translation (the service frontend, for `CT_REPLY`).
    #[inline(always)]
    pub const fn source(&self) -> Endpoint<A> {
        Endpoint { ip: self.src_ip, port: self.src_port }
    }
}

pod_for_both_families! {
    ConntrackKey: 16, 40;
    ConntrackValue: 32, 56;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        IPPROTO_TCP,
        checksum::{add, apply, finish, pseudo_header_sum, sum_words},
    };

    /// An IPv4 header (20 bytes) and a TCP segment (header and payload)
    /// with correct checksums for `tuple`.
    fn segment(tuple: &ConntrackKey) -> ([u8; 20], [u8; 24]) {
        let mut ip = [0x45, 0, 0, 44, 0, 1, 0x40, 0, 64, IPPROTO_TCP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        ip[12..16].copy_from_slice(&tuple.src_ip.to_ne_bytes());
        ip[16..20].copy_from_slice(&tuple.dst_ip.to_ne_bytes());
        let ip_check = finish(sum_words(&ip, 0));
        ip[10..12].copy_from_slice(&ip_check.to_ne_bytes());
        let mut tcp = [0u8; 24];
        tcp[0..2].copy_from_slice(&tuple.src_port.to_ne_bytes());
        tcp[2..4].copy_from_slice(&tuple.dst_port.to_ne_bytes());
        tcp[12] = 5 << 4;
        tcp[20..24].copy_from_slice(b"data");
        let l4_check = finish(sum_words(&tcp, pseudo_header_sum(tuple.src_ip, tuple.dst_ip, IPPROTO_TCP, 24)));
        tcp[16..18].copy_from_slice(&l4_check.to_ne_bytes());
        (ip, tcp)
    }

    fn check_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([bytes[at], bytes[at + 1]])
    }

    fn tuple(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> ConntrackKey {
        ConntrackKey {
            src_ip: ip_be(src.0.into()),
            dst_ip: ip_be(dst.0.into()),
            src_port: src.1.to_be(),
            dst_port: dst.1.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
            _pad2: 0,
        }
    }

    /// The stored checksum changes, applied to a packet of the flow, give
    /// the checksums of the translated packet computed from scratch.
    #[test]
    fn translation_checksum_deltas_equal_recomputed_checksums() {
        let client = ([10, 0, 0, 2], 40000);
        let vip = ([10, 96, 0, 10], 80);
        let backend = ([10, 244, 1, 7], 8080);
        let node = ([10, 201, 0, 1], 61234);
        let cases = [
            ("destination NAT (forward)", tuple(client, vip), client, backend),
            ("reverse NAT (reply)", tuple(backend, client), vip, client),
            ("destination and source NAT (forward)", tuple(client, vip), node, backend),
            ("both reversed (reply with source NAT)", tuple(backend, node), vip, client),
            ("nothing changes", tuple(vip, client), vip, client),
            ("all bits flip", tuple(([0xff; 4], 0xffff), ([0xff; 4], 0xffff)), ([0; 4], 0), ([0; 4], 0)),
        ];
        for (rule, key, src, dst) in cases {
            let to = tuple(src, dst);
            let value = ConntrackValue::translating(&key, to.source(), to.destination(), 1, 1, CT_FORWARD);
            let (ip, tcp) = segment(&key);
            let (want_ip, want_tcp) = segment(&to);
            let ip_check = apply(check_at(&ip, 10), value.addr_csum_delta.into());
            let l4_check = apply(check_at(&tcp, 16), u32::from(value.addr_csum_delta) + u32::from(value.port_csum_delta));
            let l4_check_at_once = add(check_at(&tcp, 16), value.l4_csum_delta);
            // 0x0000 and 0xffff are one value in one's complement; the
            // datapath may produce either for a sum that is all ones.
            let same = |a: u16, b: u16| a == b || a | b == 0xffff && a & b == 0;
            assert!(same(ip_check, check_at(&want_ip, 10)), "{rule}: IPv4 checksum {ip_check:#x}, want {:#x}", check_at(&want_ip, 10));
            assert!(same(l4_check, check_at(&want_tcp, 16)), "{rule}: TCP checksum {l4_check:#x}, want {:#x}", check_at(&want_tcp, 16));
            assert!(same(l4_check_at_once, check_at(&want_tcp, 16)), "{rule}: TCP checksum by the combined delta {l4_check_at_once:#x}");
            assert_eq!((value.source(), value.destination()), (to.source(), to.destination()), "{rule}");
        }
    }
}
