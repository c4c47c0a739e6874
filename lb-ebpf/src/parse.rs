//! What a packet is, read from its Ethernet, IPv4 and TCP/UDP headers.
//!
//! Every length the packet claims is checked against the bytes it has.
use lb_common::{
    ConntrackKey, FragmentKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
    reply::{ETH_HLEN, ETH_P_IPV4, IPV4_HLEN, TCP_HLEN, UDP_HLEN},
};

use crate::context::{Packet, ptr_at};

/// The most header bytes the datapath reads: Ethernet, IPv4 with the longest
/// options, and a TCP header without options.
pub const MAX_HEADERS_LEN: u32 = (ETH_HLEN + 60 + TCP_HLEN) as u32;

const IP_FRAGMENT_OFFSET: u16 = 0x1fff;
const IP_MORE_FRAGMENTS: u16 = 0x2000;

/// What a packet turned out to be.
pub enum Parsed {
    NotIpv4,
    /// The headers contradict themselves or the packet's length. `dst` is the
    /// destination address when the IPv4 header was there to read it.
    Malformed { dst: Option<u32> },
    /// A fragment after the first: no TCP/UDP header of its own.
    Fragment(Fragment),
    /// ICMP, its message `icmp_off` bytes into the packet; `ip_len` is the
    /// IPv4 total length.
    Icmp { icmp_off: usize, ip_len: u16 },
    /// IPv4, neither TCP, UDP nor ICMP.
    OtherProtocol,
    Flow(Flow),
}

/// A later fragment of a fragmented IP packet.
pub struct Fragment {
    /// The fields all of the packet's fragments share on the wire.
    pub key: FragmentKey,
    /// IPv4 total length of this fragment.
    pub ip_len: u16,
}

/// A TCP segment or UDP datagram with complete, consistent headers (the
/// first fragment of a fragmented one has its header, not all its data).
pub struct Flow {
    /// The 5-tuple as on the wire.
    pub tuple: ConntrackKey,
    /// Offset of the TCP/UDP header from the start of the packet.
    pub l4_off: usize,
    /// IPv4 total length: the bytes counted for the service.
    pub ip_len: u16,
    /// Whether the IPv4 header carries options.
    pub has_ip_options: bool,
    /// The TCP header's flags (`lifecycle::TCP_*`); 0 for UDP.
    pub tcp_flags: u8,
    /// The first fragment of a fragmented packet: its ports are remembered
    /// for the later ones, by `ip_id`.
    pub first_fragment: bool,
    /// The IP identification, network byte order.
    pub ip_id: u16,
}

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
        return Parsed::NotIpv4;
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
    let (ports, tcp_flags) = match ip.proto {
        IPPROTO_TCP => {
            // The whole fixed header: its checksum field must be writable in
            // the linear part.
            let Some(tcp) = ptr_at::<_, TcpWords>(pkt, l4_off) else {
                return malformed;
            };
            // SAFETY: as above.
            let tcp = unsafe { tcp.read_unaligned() };
            let tcp_header_len = usize::from(tcp[3] as u8 >> 4) * 4;
            if tcp_header_len < TCP_HLEN || tcp_header_len > l4_len {
                return malformed;
            }
            (tcp[0], (tcp[3] >> 8) as u8)
        }
        IPPROTO_UDP => {
            let Some(udp) = ptr_at::<_, UdpWords>(pkt, l4_off) else {
                return malformed;
            };
            // SAFETY: as above.
            let udp = unsafe { udp.read_unaligned() };
            let udp_len = usize::from(u16::from_be(udp[1] as u16));
            // A first fragment holds the header, not the whole datagram.
            if udp_len < UDP_HLEN || (udp_len > l4_len && !first_fragment) {
                return malformed;
            }
            (udp[0], 0)
        }
        IPPROTO_ICMP => return Parsed::Icmp { icmp_off: l4_off, ip_len: total_len as u16 },
        _ => return Parsed::OtherProtocol,
    };
    Parsed::Flow(Flow {
        tuple: tuple(ip.src, ip.dst, ports, ip.proto),
        l4_off,
        ip_len: total_len as u16,
        has_ip_options: ihl_bytes != IPV4_HLEN,
        tcp_flags,
        first_fragment,
        ip_id: ip.id,
    })
}

/// A frame too short for Ethernet and IPv4 headers: not IPv4, or IPv4 cut
/// short.
#[inline(always)]
fn short_frame<P: Packet>(pkt: &P) -> Parsed {
    let Some(ethertype) = ptr_at::<_, u16>(pkt, 12) else {
        return Parsed::Malformed { dst: None };
    };
    // SAFETY: bounds-checked by ptr_at.
    if unsafe { ethertype.read_unaligned() } != ETH_P_IPV4.to_be() {
        return Parsed::NotIpv4;
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
