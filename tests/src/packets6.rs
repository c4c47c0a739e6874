//! IPv6 test packets, inputs and expected outputs, built with etherparse.
//!
//! As `packets` for IPv4: lengths and TCP/UDP checksums (over the IPv6
//! pseudo-header) are computed independently of the datapath's own code.
use std::net::SocketAddrV6;

use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv6FlowLabel, Ipv6Header, UdpHeader};

use crate::packets::{CLIENT_MAC, L4, NODE_MAC};

/// An Ethernet + IPv6 (+ extension headers) + TCP/UDP frame, serialised
/// with fresh lengths and checksums by `bytes()`.
#[derive(Clone, Debug)]
pub struct Frame6 {
    pub eth: Ethernet2Header,
    pub ip: Ipv6Header,
    /// Extension headers between the IPv6 header and the TCP/UDP header,
    /// as bytes, and the type of the first.
    pub extensions: Option<(IpNumber, Vec<u8>)>,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Frame6 {
    fn new(src: SocketAddrV6, dst: SocketAddrV6, l4: L4, payload: &[u8]) -> Self {
        let ip = Ipv6Header {
            traffic_class: 0,
            flow_label: Ipv6FlowLabel::ZERO,
            payload_length: 0,
            next_header: l4.protocol(),
            hop_limit: 64,
            source: src.ip().octets(),
            destination: dst.ip().octets(),
        };
        Self {
            eth: Ethernet2Header { source: CLIENT_MAC, destination: NODE_MAC, ether_type: EtherType::IPV6 },
            ip,
            extensions: None,
            l4,
            payload: payload.to_vec(),
        }
    }

    /// A TCP SYN from `src` to `dst` (`[address]:port`).
    pub fn tcp_syn(src: &str, dst: &str) -> Self {
        let (src, dst) = (addr6(src), addr6(dst));
        Self::new(src, dst, L4::tcp_syn(src.port(), dst.port()), &[])
    }

    /// A backend's SYN-ACK from `src` to `dst`.
    pub fn tcp_syn_ack(src: &str, dst: &str) -> Self {
        let (src, dst) = (addr6(src), addr6(dst));
        Self::new(src, dst, L4::tcp_syn_ack(src.port(), dst.port()), &[])
    }

    /// A TCP segment with ACK (and PSH when there is data).
    pub fn tcp_data(src: &str, dst: &str, payload: &[u8]) -> Self {
        let (src, dst) = (addr6(src), addr6(dst));
        Self::new(src, dst, L4::tcp_data(src.port(), dst.port(), !payload.is_empty()), payload)
    }

    pub fn udp(src: &str, dst: &str, payload: &[u8]) -> Self {
        let (src, dst) = (addr6(src), addr6(dst));
        Self::new(src, dst, L4::udp(src.port(), dst.port()), payload)
    }

    pub fn with_src(mut self, src: &str) -> Self {
        let src = addr6(src);
        self.ip.source = src.ip().octets();
        self.l4.set_src_port(src.port());
        self
    }

    pub fn with_dst(mut self, dst: &str) -> Self {
        let dst = addr6(dst);
        self.ip.destination = dst.ip().octets();
        self.l4.set_dst_port(dst.port());
        self
    }

    /// With a Destination Options header (8 bytes: a PadN option) before
    /// the TCP/UDP header.
    pub fn with_destination_options(mut self) -> Self {
        self.extensions = Some((IpNumber::IPV6_DESTINATION_OPTIONS, vec![self.l4.protocol().0, 0, 1, 4, 0, 0, 0, 0]));
        self
    }

    /// With a Fragment header before the TCP/UDP header: fragment `offset`
    /// (in 8-byte units), more fragments to come or not, identification 7.
    pub fn with_fragment_header(mut self, offset: u16, more: bool) -> Self {
        let offset_flags = (offset << 3) | u16::from(more);
        let [hi, lo] = offset_flags.to_be_bytes();
        self.extensions = Some((IpNumber::IPV6_FRAGMENTATION_HEADER, vec![self.l4.protocol().0, 0, hi, lo, 0, 0, 0, 7]));
        self
    }

    /// The frame with lengths and checksums computed by etherparse.
    pub fn bytes(&self) -> Vec<u8> {
        let mut ip = self.ip.clone();
        let l4_bytes = match &self.l4 {
            L4::Tcp(t) => {
                let mut t = t.clone();
                t.checksum = t.calc_checksum_ipv6(&ip, &self.payload).expect("small packet");
                t.to_bytes().to_vec()
            }
            L4::Udp(u) => UdpHeader::with_ipv6_checksum(u.source_port, u.destination_port, &ip, &self.payload)
                .expect("small packet")
                .to_bytes()
                .to_vec(),
        };
        let extensions = self.extensions.as_ref().map_or(&[][..], |(_, bytes)| bytes.as_slice());
        if let Some((first, _)) = &self.extensions {
            ip.next_header = *first;
        }
        ip.set_payload_length(extensions.len() + l4_bytes.len() + self.payload.len()).expect("small packet");
        let mut out = self.eth.to_bytes().to_vec();
        out.extend_from_slice(&ip.to_bytes());
        out.extend_from_slice(extensions);
        out.extend_from_slice(&l4_bytes);
        out.extend_from_slice(&self.payload);
        out
    }
}

pub fn addr6(s: &str) -> SocketAddrV6 {
    s.parse().unwrap_or_else(|_| panic!("{s} is not [ip]:port"))
}
