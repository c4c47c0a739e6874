//! What a packet is, read from its Ethernet, IPv4 or IPv6, and TCP/UDP headers.
//!
//! Every length the packet claims is checked against the bytes it has.
//!
//! IPv6 extension headers: Hop-by-Hop Options, Routing, Destination Options
//! and an atomic Fragment header are followed, up to
//! `MAX_IPV6_EXTENSION_HEADERS` of them within the first
//! `MAX_IPV6_HEADERS_LEN` bytes (what real stacks send fits). A packet with
//! more, or a fragment of a fragmented packet (`Parsed::Fragment6`), is not
//! translated: dropped when it is for a cluster IP, left to the kernel
//! otherwise. Any other header before the TCP/UDP one (AH, ESP, Mobility,
//! HIP, Shim6) makes it another protocol's packet, left to the kernel.
use lb_common::{
    ConntrackKey, FragmentKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Ipv6,
    reply::{ETH_HLEN, ETH_P_IPV4, IPV4_HLEN, TCP_HLEN, UDP_HLEN},
};

use crate::context::{Packet, ptr_at, ptr_at_reloaded};

/// The most header bytes the datapath reads: Ethernet, IPv4 with the longest
/// options, and a TCP header without options.
pub const MAX_HEADERS_LEN: u32 = (ETH_HLEN + 60 + TCP_HLEN) as u32;

const IP_FRAGMENT_OFFSET: u16 = 0x1fff;
const IP_MORE_FRAGMENTS: u16 = 0x2000;

const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
/// The IPv6 extension headers followed before the TCP/UDP header.
const MAX_IPV6_EXTENSION_HEADERS: usize = 4;
/// How far into the packet IPv6 headers are looked for: Ethernet, the
/// fixed header, 256 bytes of extension headers and a TCP header.
const MAX_IPV6_HEADERS_LEN: usize = ETH_HLEN + IPV6_HLEN + 256 + TCP_HLEN;
/// The fragment offset bits of an IPv6 Fragment header's second word.
const IPV6_FRAGMENT_OFFSET: u16 = 0xfff8;
const IPV6_MORE_FRAGMENTS: u16 = 1;

/// What a packet turned out to be.
pub enum Parsed {
    /// Neither IPv4 nor IPv6 (ARP, VLAN-tagged, ...).
    NotIp,
    /// The headers contradict themselves or the packet's length. `dst` is the
    /// destination address when the IPv4 header was there to read it.
    Malformed { dst: Option<u32> },
    /// A fragment after the first: no TCP/UDP header of its own.
    Fragment(Fragment),
    /// ICMP, its message `icmp_off` bytes into the packet; `ip_len` is the
    /// IPv4 total length.
    Icmp { icmp_off: usize, ip_len: u16 },
    /// IPv4 or IPv6, neither TCP, UDP nor ICMP (or ICMPv6, left to the
    /// kernel, neighbour discovery included).
    OtherProtocol,
    Flow(Flow<u32>),
    Flow6(Flow<Ipv6>),
    /// IPv6 headers that contradict themselves or the packet's length, or
    /// that are not followed (see the module's comment); `dst` as for
    /// `Malformed`.
    Malformed6 { dst: Option<Ipv6> },
    /// A later fragment of a fragmented IPv6 packet (or a first one whose
    /// ports are not in it), to `dst`: its fragments are not translated.
    Fragment6 { dst: Ipv6 },
}

/// A later fragment of a fragmented IP packet. 8-aligned, so that the
/// 12-byte key starts 8-aligned wherever the enum puts it: LLVM writes it
/// with an 8-byte store, which the verifier refuses at a 4-aligned offset.
#[repr(C, align(8))]
pub struct Fragment {
    /// The fields all of the packet's fragments share on the wire.
    pub key: FragmentKey,
    /// IPv4 total length of this fragment.
    pub ip_len: u16,
}

/// A TCP segment or UDP datagram with complete, consistent headers (the
/// first fragment of a fragmented one has its header, not all its data).
///
/// `repr(C)`, its small fields packed into one 8-byte group: LLVM merges
/// neighbouring stack stores into wider ones (misaligned access is
/// allowed), and the verifier refuses a merged store that straddles an
/// alignment boundary, as two `bool`s at odd offsets would give.
#[repr(C)]
pub struct Flow<A = u32> {
    /// The 5-tuple as on the wire.
    pub tuple: ConntrackKey<A>,
    /// Offset of the TCP/UDP header from the start of the packet.
    pub l4_off: usize,
    /// IPv4 total length, or the IPv6 header and payload lengths: the bytes
    /// counted for the service.
    pub ip_len: u32,
    /// The IPv4 identification, network byte order.
    pub ip_id: u16,
    /// The TCP header's flags (`lifecycle::TCP_*`); 0 for UDP.
    pub tcp_flags: u8,
    /// `FLOW_*` bits.
    pub facts: u8,
}

/// `Flow::facts`: the IPv4 header carries options.
pub const FLOW_HAS_IP_OPTIONS: u8 = 1;
/// `Flow::facts`: the first fragment of a fragmented IPv4 packet; its
/// ports are remembered for the later ones, by `ip_id`.
pub const FLOW_FIRST_FRAGMENT: u8 = 2;

impl<A> Flow<A> {
    #[inline(always)]
    pub fn has_ip_options(&self) -> bool {
        self.facts & FLOW_HAS_IP_OPTIONS != 0
    }

    #[inline(always)]
    pub fn first_fragment(&self) -> bool {
        self.facts & FLOW_FIRST_FRAGMENT != 0
    }
}

/// The fixed IPv6 header, fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Header {
    pub version_class_flow: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: Ipv6,
    pub dst: Ipv6,
}
const _: () = assert!(size_of::<Ipv6Header>() == IPV6_HLEN);

/// The fixed part of an IPv4 header, fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Header {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src: u32,
    pub dst: u32,
}

/// An Ethernet header followed by the fixed part of an IPv4 header, as one
/// bounds check reads them (and an echo answer rewrites them).
#[repr(C, packed)]
pub struct EthIpv4 {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ethertype: u16,
    pub ip: Ipv4Header,
}

/// A TCP header without options, as 32-bit words: the ports, the sequence
/// and acknowledgment numbers, then the data offset in the low byte of
/// the fourth and the flags in the next.
type TcpWords = [u32; TCP_HLEN / 4];

/// A UDP header as 32-bit words: the ports, then the length in the low
/// half of the second.
type UdpWords = [u32; UDP_HLEN / 4];

/// Parses with one bounds check for the Ethernet and IPv4 headers and one
/// for the TCP or UDP header: each check is a compare the hot path pays.
#[inline(always)]
pub fn parse<P: Packet>(pkt: &P) -> Parsed {
    pkt.pull_headers(MAX_HEADERS_LEN);
    let Some(headers) = ptr_at::<_, EthIpv4>(pkt, 0) else {
        return short_frame(pkt);
    };
    // SAFETY: bounds-checked by ptr_at; unaligned reads because packet data
    // has no alignment guarantee (and the struct is packed).
    let headers = unsafe { headers.read_unaligned() };
    if headers.ethertype != ETH_P_IPV4.to_be() {
        return if headers.ethertype == ETH_P_IPV6.to_be() { parse_ipv6(pkt) } else { Parsed::NotIp };
    }
    let ip = headers.ip;
    let malformed = Parsed::Malformed { dst: Some(ip.dst) };
    let ihl_bytes = usize::from(ip.version_ihl & 0x0f) * 4;
    let total_len = usize::from(u16::from_be(ip.total_len));
    if ip.version_ihl >> 4 != 4
        || ihl_bytes < IPV4_HLEN
        || total_len < ihl_bytes
        || ETH_HLEN + total_len > pkt.len()
    {
        return malformed;
    }
    let frag_off = u16::from_be(ip.frag_off);
    if frag_off & IP_FRAGMENT_OFFSET != 0 {
        let key = FragmentKey { src_ip: ip.src, dst_ip: ip.dst, id: ip.id, proto: ip.proto, _pad: 0 };
        return Parsed::Fragment(Fragment { key, ip_len: total_len as u16 });
    }
    let first_fragment = frag_off & IP_MORE_FRAGMENTS != 0;
    let l4_off = ETH_HLEN + ihl_bytes;
    let l4_len = total_len - ihl_bytes;
    if ip.proto == IPPROTO_ICMP {
        return Parsed::Icmp { icmp_off: l4_off, ip_len: total_len as u16 };
    }
    let Some((ports, tcp_flags)) = transport(pkt, ip.proto, l4_off, l4_len, first_fragment) else {
        return malformed;
    };
    let Some(ports) = ports else {
        return Parsed::OtherProtocol;
    };
    Parsed::Flow(Flow {
        tuple: tuple(ip.src, ip.dst, ports, ip.proto),
        l4_off,
        ip_len: total_len as u32,
        ip_id: ip.id,
        tcp_flags,
        facts: if ihl_bytes != IPV4_HLEN { FLOW_HAS_IP_OPTIONS } else { 0 } | if first_fragment { FLOW_FIRST_FRAGMENT } else { 0 },
    })
}

/// The ports word and TCP flags of the TCP or UDP header at `l4_off`, of a
/// transport payload of `l4_len` bytes (all of it in the packet unless
/// `first_fragment`); `Some((None, 0))` for another protocol, `None` when
/// the header is cut short or claims more than there is.
#[inline(always)]
fn transport<P: Packet>(pkt: &P, proto: u8, l4_off: usize, l4_len: usize, first_fragment: bool) -> Option<(Option<u32>, u8)> {
    let (ports, tcp_flags) = match proto {
        IPPROTO_TCP => {
            // The whole fixed header: its checksum field must be writable in
            // the linear part.
            let tcp = ptr_at::<_, TcpWords>(pkt, l4_off)?;
            // SAFETY: bounds-checked by ptr_at; unaligned reads because
            // packet data has no alignment guarantee.
            let tcp = unsafe { tcp.read_unaligned() };
            let tcp_header_len = usize::from(tcp[3] as u8 >> 4) * 4;
            if tcp_header_len < TCP_HLEN || tcp_header_len > l4_len {
                return None;
            }
            (tcp[0], (tcp[3] >> 8) as u8)
        }
        IPPROTO_UDP => {
            let udp = ptr_at::<_, UdpWords>(pkt, l4_off)?;
            // SAFETY: as above.
            let udp = unsafe { udp.read_unaligned() };
            let udp_len = usize::from(u16::from_be(udp[1] as u16));
            // A first fragment holds the header, not the whole datagram.
            if udp_len < UDP_HLEN || (udp_len > l4_len && !first_fragment) {
                return None;
            }
            (udp[0], 0)
        }
        _ => return Some((None, 0)),
    };
    Some((Some(ports), tcp_flags))
}

/// An IPv6 packet: its extension headers followed (see the module's
/// comment) to its TCP or UDP header.
#[inline(always)]
fn parse_ipv6<P: Packet>(pkt: &P) -> Parsed {
    let Some(ip) = ptr_at::<_, Ipv6Header>(pkt, ETH_HLEN) else {
        return Parsed::Malformed6 { dst: None };
    };
    // SAFETY: bounds-checked by ptr_at; the fields are read one by one,
    // unaligned: a copy of the whole header on the stack would be 4-aligned
    // and read back with 8-byte loads, which the verifier refuses.
    let (version_class_flow, payload_len, next_header, src, dst) = unsafe {
        (
            (&raw const (*ip).version_class_flow).read_unaligned(),
            (&raw const (*ip).payload_len).read_unaligned(),
            (&raw const (*ip).next_header).read_unaligned(),
            (&raw const (*ip).src).read_unaligned(),
            (&raw const (*ip).dst).read_unaligned(),
        )
    };
    let malformed = Parsed::Malformed6 { dst: Some(dst) };
    let payload_len = usize::from(u16::from_be(payload_len));
    // A payload length of 0 is a jumbogram's (RFC 2675), never a service's.
    if u32::from_be(version_class_flow) >> 28 != 6 || payload_len == 0 || ETH_HLEN + IPV6_HLEN + payload_len > pkt.len() {
        return malformed;
    }
    let mut next = next_header;
    let mut l4_off = ETH_HLEN + IPV6_HLEN;
    if matches!(next, IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_DSTOPTS) {
        pkt.pull_headers(MAX_IPV6_HEADERS_LEN as u32);
    }
    // A counted loop the verifier can bound; each header's length is at
    // most 2,048 bytes, so the offset stays bounded too.
    let mut i = 0;
    while i < MAX_IPV6_EXTENSION_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                // Next header, then the length in 8-byte units past the first 8.
                let Some(header) = ptr_at_reloaded::<_, [u8; 2]>(pkt, l4_off) else {
                    return malformed;
                };
                // SAFETY: bounds-checked by ptr_at.
                let [following, len] = unsafe { header.read_unaligned() };
                next = following;
                l4_off += (usize::from(len) + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let Some(header) = ptr_at_reloaded::<_, [u16; 2]>(pkt, l4_off) else {
                    return malformed;
                };
                // SAFETY: bounds-checked by ptr_at.
                let [following, offset_flags] = unsafe { header.read_unaligned() };
                let offset_flags = u16::from_be(offset_flags);
                if offset_flags & (IPV6_FRAGMENT_OFFSET | IPV6_MORE_FRAGMENTS) != 0 {
                    // Only the first fragment has the ports, and the later
                    // ones cannot be matched to it without a fragment map.
                    return Parsed::Fragment6 { dst };
                }
                // An atomic fragment (RFC 6946): a whole packet.
                next = following.to_ne_bytes()[0];
                l4_off += 8;
            }
            _ => break,
        }
        i += 1;
    }
    let headers_len = l4_off - ETH_HLEN - IPV6_HLEN;
    if headers_len > payload_len || l4_off > MAX_IPV6_HEADERS_LEN - TCP_HLEN {
        return malformed;
    }
    if next == IPPROTO_ICMPV6 {
        return Parsed::OtherProtocol;
    }
    let Some((ports, tcp_flags)) = transport(pkt, next, l4_off, payload_len - headers_len, false) else {
        return malformed;
    };
    let Some(ports) = ports else {
        // Still an extension header: more of them than are followed.
        return if matches!(next, IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_DSTOPTS) {
            malformed
        } else {
            Parsed::OtherProtocol
        };
    };
    let [src_port, dst_port] = split_ports(ports);
    Parsed::Flow6(Flow {
        tuple: ConntrackKey { src_ip: src, dst_ip: dst, src_port, dst_port, proto: next, _pad: 0, _pad2: 0 },
        l4_off,
        ip_len: (IPV6_HLEN + payload_len) as u32,
        ip_id: 0,
        tcp_flags,
        facts: 0,
    })
}

/// The two ports (network byte order) of a ports word as read from the
/// header: the source in the low half on little-endian BPF.
#[inline(always)]
const fn split_ports(ports: u32) -> [u16; 2] {
    [ports as u16, (ports >> 16) as u16]
}

/// A frame too short for Ethernet and IPv4 headers: not IPv4, or IPv4 cut
/// short.
#[inline(always)]
fn short_frame<P: Packet>(pkt: &P) -> Parsed {
    let Some(ethertype) = ptr_at::<_, u16>(pkt, 12) else {
        return Parsed::Malformed { dst: None };
    };
    // SAFETY: bounds-checked by ptr_at.
    let ethertype = unsafe { ethertype.read_unaligned() };
    if ethertype == ETH_P_IPV6.to_be() {
        return Parsed::Malformed6 { dst: None };
    }
    if ethertype != ETH_P_IPV4.to_be() {
        return Parsed::NotIp;
    }
    Parsed::Malformed { dst: None }
}

/// The conntrack key of the addresses and the two ports as they sit in the
/// headers, built as two 8-byte words: two stores for the lookup instead of
/// one per field.
#[inline(always)]
pub fn tuple(src_ip: u32, dst_ip: u32, ports: u32, proto: u8) -> ConntrackKey {
    const _: () = assert!(size_of::<ConntrackKey>() == 16 && cfg!(target_endian = "little"));
    let words = [u64::from(src_ip) | u64::from(dst_ip) << 32, u64::from(ports) | u64::from(proto) << 32];
    // SAFETY: ConntrackKey is 16 bytes of plain data, any bit pattern valid:
    // on little-endian BPF the first word is src_ip then dst_ip, the second
    // the two ports, then proto and zero padding.
    unsafe { core::mem::transmute::<[u64; 2], ConntrackKey>(words) }
}
