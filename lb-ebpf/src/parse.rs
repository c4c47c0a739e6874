//! Parsing Ethernet + IPv4 + TCP/UDP headers, with every length the
//! packet claims checked against the bytes it has.
use lb_common::{
    ConntrackKey, IPPROTO_TCP, IPPROTO_UDP,
    reply::{ETH_HLEN, ETH_P_IPV4, IPV4_HLEN, TCP_HLEN, UDP_HLEN},
};

use crate::context::{Packet, ptr_at};

/// The most header bytes the datapath reads: Ethernet, IPv4 with the longest
/// options, and a TCP header without options.
pub const MAX_HEADERS_LEN: u32 = (ETH_HLEN + 60 + TCP_HLEN) as u32;

const IP_FRAGMENT_MASK: u16 = 0x3fff; // More Fragments flag and offset

/// What a packet turned out to be.
pub enum Parsed {
    NotIpv4,
    /// The headers contradict themselves or the packet's length. `dst` is the
    /// destination address when the IPv4 header was there to read it.
    Malformed { dst: Option<u32> },
    Fragment { dst: u32 },
    /// IPv4, neither TCP nor UDP.
    OtherProtocol,
    Flow(Flow),
}

/// A TCP segment or UDP datagram with complete, consistent headers.
pub struct Flow {
    /// The 5-tuple as on the wire.
    pub tuple: ConntrackKey,
    /// Offset of the TCP/UDP header from the start of the packet.
    pub l4_off: usize,
    /// IPv4 total length: the bytes counted for the service.
    pub ip_len: u16,
    /// Whether the IPv4 header carries options.
    pub has_ip_options: bool,
}

/// The fixed part of an IPv4 header, fields in network byte order.
#[repr(C)]
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

#[inline(always)]
pub fn parse<P: Packet>(pkt: &P) -> Parsed {
    pkt.pull_headers(MAX_HEADERS_LEN);
    let Some(ethertype) = ptr_at::<_, u16>(pkt, 12) else {
        return Parsed::Malformed { dst: None };
    };
    // SAFETY: bounds-checked by ptr_at; unaligned reads because packet data
    // has no alignment guarantee.
    if unsafe { ethertype.read_unaligned() } != ETH_P_IPV4.to_be() {
        return Parsed::NotIpv4;
    }
    let Some(ip) = ptr_at::<_, Ipv4Header>(pkt, ETH_HLEN) else {
        return Parsed::Malformed { dst: None };
    };
    // SAFETY: as above.
    let ip = unsafe { ip.read_unaligned() };
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
    if u16::from_be(ip.frag_off) & IP_FRAGMENT_MASK != 0 {
        return Parsed::Fragment { dst: ip.dst };
    }
    let l4_min = match ip.proto {
        IPPROTO_TCP => TCP_HLEN,
        IPPROTO_UDP => UDP_HLEN,
        _ => return Parsed::OtherProtocol,
    };
    let l4_off = ETH_HLEN + ihl_bytes;
    if total_len < ihl_bytes + l4_min {
        return malformed;
    }
    let Some(ports) = ptr_at::<_, [u16; 4]>(pkt, l4_off) else {
        return malformed;
    };
    // SAFETY: as above. Words: source port, destination port, then for UDP
    // length and checksum, for TCP the sequence number.
    let ports = unsafe { ports.read_unaligned() };
    if ip.proto == IPPROTO_TCP {
        let Some(offset_byte) = ptr_at::<_, u8>(pkt, l4_off + 12) else {
            return malformed;
        };
        // SAFETY: as above.
        let tcp_header_len = usize::from(unsafe { *offset_byte } >> 4) * 4;
        if tcp_header_len < TCP_HLEN || ihl_bytes + tcp_header_len > total_len {
            return malformed;
        }
        // The checksum field must be writable in the linear part.
        if ptr_at::<_, [u8; TCP_HLEN]>(pkt, l4_off).is_none() {
            return malformed;
        }
    } else {
        let udp_len = usize::from(u16::from_be(ports[2]));
        if udp_len < UDP_HLEN || udp_len > total_len - ihl_bytes {
            return malformed;
        }
    }
    Parsed::Flow(Flow {
        tuple: ConntrackKey {
            src_ip: ip.src,
            dst_ip: ip.dst,
            src_port: ports[0],
            dst_port: ports[1],
            proto: ip.proto,
            _pad: 0,
            _pad2: 0,
        },
        l4_off,
        ip_len: total_len as u16,
        has_ip_options: ihl_bytes != IPV4_HLEN,
    })
}
