//! Test packets, inputs and expected outputs, built with etherparse.
//!
//! Their lengths and checksums are computed independently of the datapath's own
//! code.
use std::net::SocketAddrV4;

use etherparse::{
    EtherType, Ethernet2Header, IcmpEchoHeader, Icmpv4Header, Icmpv4Type, IpNumber, Ipv4Header, Ipv4Options,
    TcpHeader, UdpHeader, icmpv4::DestUnreachableHeader,
};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp(TcpHeader),
    Udp(UdpHeader),
}

/// The TCP and UDP headers of the test packets, for both families.
impl L4 {
    /// A client's SYN.
    pub fn tcp_syn(src_port: u16, dst_port: u16) -> Self {
        let mut tcp = TcpHeader::new(src_port, dst_port, 1000, 64240);
        tcp.syn = true;
        L4::Tcp(tcp)
    }

    /// A backend's SYN-ACK answering `tcp_syn`.
    pub fn tcp_syn_ack(src_port: u16, dst_port: u16) -> Self {
        let mut tcp = TcpHeader::new(src_port, dst_port, 5000, 64240);
        tcp.syn = true;
        tcp.ack = true;
        tcp.acknowledgment_number = 1001;
        L4::Tcp(tcp)
    }

    /// A segment with ACK (and PSH when `has_payload`).
    pub fn tcp_data(src_port: u16, dst_port: u16, has_payload: bool) -> Self {
        let mut tcp = TcpHeader::new(src_port, dst_port, 1001, 64240);
        tcp.ack = true;
        tcp.acknowledgment_number = 5001;
        tcp.psh = has_payload;
        L4::Tcp(tcp)
    }

    pub fn udp(src_port: u16, dst_port: u16) -> Self {
        L4::Udp(UdpHeader { source_port: src_port, destination_port: dst_port, length: 0, checksum: 0 })
    }

    pub fn set_src_port(&mut self, port: u16) {
        match self {
            L4::Tcp(t) => t.source_port = port,
            L4::Udp(u) => u.source_port = port,
        }
    }

    pub fn set_dst_port(&mut self, port: u16) {
        match self {
            L4::Tcp(t) => t.destination_port = port,
            L4::Udp(u) => u.destination_port = port,
        }
    }

    /// The IP protocol number of the header.
    pub fn protocol(&self) -> IpNumber {
        match self {
            L4::Tcp(_) => IpNumber::TCP,
            L4::Udp(_) => IpNumber::UDP,
        }
    }
}

/// An Ethernet + IPv4 + TCP/UDP frame, serialised with fresh lengths and
/// checksums by `bytes()`.
#[derive(Clone, Debug)]
pub struct Frame {
    pub eth: Ethernet2Header,
    pub ip: Ipv4Header,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Frame {
    fn new(src: SocketAddrV4, dst: SocketAddrV4, l4: L4, payload: &[u8]) -> Self {
        let mut ip = Ipv4Header::new(0, 64, l4.protocol(), src.ip().octets(), dst.ip().octets())
            .expect("zero payload length is valid");
        ip.identification = 0x1234;
        Self {
            eth: Ethernet2Header { source: CLIENT_MAC, destination: NODE_MAC, ether_type: EtherType::IPV4 },
            ip,
            l4,
            payload: payload.to_vec(),
        }
    }

    /// A TCP SYN from `src` to `dst`.
    pub fn tcp_syn(src: &str, dst: &str) -> Self {
        let (src, dst) = (addr(src), addr(dst));
        Self::new(src, dst, L4::tcp_syn(src.port(), dst.port()), &[])
    }

    /// The frame as IP fragments of at most `chunk` payload bytes each (a
    /// multiple of 8), each with fresh lengths, flags, offsets and header
    /// checksums: the first carries the TCP/UDP header.
    pub fn fragments(&self, chunk: usize) -> Vec<Vec<u8>> {
        assert!(chunk.is_multiple_of(8), "fragment offsets count 8-byte units");
        let whole = self.bytes();
        let ip_len = self.ip.header_len();
        let (head, payload) = whole.split_at(14 + ip_len);
        let pieces: Vec<&[u8]> = payload.chunks(chunk).collect();
        pieces
            .iter()
            .enumerate()
            .map(|(i, piece)| {
                let mut frame = head.to_vec();
                frame.extend_from_slice(piece);
                let (mut ip, _) = Ipv4Header::from_slice(&frame[14..]).expect("an IPv4 header");
                ip.total_len = (ip_len + piece.len()) as u16;
                ip.more_fragments = i + 1 < pieces.len();
                ip.fragment_offset = etherparse::IpFragOffset::try_new((i * chunk / 8) as u16).expect("a fragment offset");
                ip.header_checksum = ip.calc_header_checksum();
                frame[14..14 + ip_len].copy_from_slice(&ip.to_bytes());
                frame
            })
            .collect()
    }

    /// A backend's SYN-ACK from `src` to `dst`: what confirms a connection.
    pub fn tcp_syn_ack(src: &str, dst: &str) -> Self {
        let (src, dst) = (addr(src), addr(dst));
        Self::new(src, dst, L4::tcp_syn_ack(src.port(), dst.port()), &[])
    }

    /// A TCP segment with ACK (and PSH when there is data).
    pub fn tcp_data(src: &str, dst: &str, payload: &[u8]) -> Self {
        let (src, dst) = (addr(src), addr(dst));
        Self::new(src, dst, L4::tcp_data(src.port(), dst.port(), !payload.is_empty()), payload)
    }

    pub fn udp(src: &str, dst: &str, payload: &[u8]) -> Self {
        let (src, dst) = (addr(src), addr(dst));
        Self::new(src, dst, L4::udp(src.port(), dst.port()), payload)
    }

    pub fn with_src(mut self, src: &str) -> Self {
        let src = addr(src);
        self.ip.source = src.ip().octets();
        self.l4.set_src_port(src.port());
        self
    }

    pub fn with_dst(mut self, dst: &str) -> Self {
        let dst = addr(dst);
        self.ip.destination = dst.ip().octets();
        self.l4.set_dst_port(dst.port());
        self
    }

    pub fn with_ip_options(mut self, options: &[u8]) -> Self {
        self.ip.options = Ipv4Options::try_from(options).expect("options of a multiple of 4 bytes, at most 40");
        self
    }

    pub fn with_tcp(mut self, edit: impl FnOnce(&mut TcpHeader)) -> Self {
        if let L4::Tcp(t) = &mut self.l4 {
            edit(t);
        }
        self
    }

    /// The frame with lengths and checksums computed by etherparse.
    pub fn bytes(&self) -> Vec<u8> {
        let mut ip = self.ip.clone();
        let l4_bytes = match &self.l4 {
            L4::Tcp(t) => {
                ip.set_payload_len(t.header_len() + self.payload.len()).expect("small packet");
                let mut t = t.clone();
                t.checksum = t.calc_checksum_ipv4(&ip, &self.payload).expect("small packet");
                t.to_bytes().to_vec()
            }
            L4::Udp(u) => {
                ip.set_payload_len(8 + self.payload.len()).expect("small packet");
                let u = UdpHeader::with_ipv4_checksum(u.source_port, u.destination_port, &ip, &self.payload)
                    .expect("small packet");
                u.to_bytes().to_vec()
            }
        };
        ip.header_checksum = ip.calc_header_checksum();
        let mut out = self.eth.to_bytes().to_vec();
        out.extend_from_slice(&ip.to_bytes());
        out.extend_from_slice(&l4_bytes);
        out.extend_from_slice(&self.payload);
        out
    }

    /// Offset of the L4 header in `bytes()`.
    pub fn l4_offset(&self) -> usize {
        14 + self.ip.header_len()
    }

    /// `bytes()` with the UDP checksum zeroed ("no checksum").
    pub fn bytes_without_udp_checksum(&self) -> Vec<u8> {
        let mut out = self.bytes();
        let check = self.l4_offset() + 6;
        out[check..check + 2].copy_from_slice(&[0, 0]);
        out
    }

    /// The TCP reset the datapath must send back for this segment, built by
    /// etherparse from RFC 9293's rules.
    pub fn expected_reset(&self) -> Vec<u8> {
        let L4::Tcp(seg) = &self.l4 else { panic!("a reset answers TCP") };
        let mut rst = TcpHeader::new(seg.destination_port, seg.source_port, 0, 0);
        rst.rst = true;
        if seg.ack {
            rst.sequence_number = seg.acknowledgment_number;
        } else {
            rst.ack = true;
            rst.acknowledgment_number =
                seg.sequence_number + self.payload.len() as u32 + u32::from(seg.syn) + u32::from(seg.fin);
        }
        let mut ip = reply_ip(self.ip.destination, self.ip.source, IpNumber::TCP);
        ip.set_payload_len(rst.header_len()).expect("small packet");
        rst.checksum = rst.calc_checksum_ipv4(&ip, &[]).expect("small packet");
        ip.header_checksum = ip.calc_header_checksum();
        let mut out = reply_eth(&self.eth).to_bytes().to_vec();
        out.extend_from_slice(&ip.to_bytes());
        out.extend_from_slice(&rst.to_bytes());
        out
    }

    /// The ICMP port unreachable the datapath must send back for this
    /// datagram, quoting its IP header and first 8 payload bytes.
    pub fn expected_port_unreachable(&self) -> Vec<u8> {
        self.icmp_error(self.ip.destination, self.ip.source, Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port))
    }

    /// An ICMP error of `kind` about this frame, from `from` to `to`, quoting
    /// its IP header and first 8 payload bytes (RFC 792), as a router or the
    /// destination host sends it back.
    pub fn icmp_error(&self, from: [u8; 4], to: [u8; 4], kind: Icmpv4Type) -> Vec<u8> {
        let original = self.bytes();
        let quote = &original[14..14 + self.ip.header_len() + 8];
        let icmp = Icmpv4Header::with_checksum(kind, quote);
        let mut ip = reply_ip(from, to, IpNumber::ICMP);
        ip.set_payload_len(icmp.header_len() + quote.len()).expect("small packet");
        ip.header_checksum = ip.calc_header_checksum();
        let mut out = reply_eth(&self.eth).to_bytes().to_vec();
        out.extend_from_slice(&ip.to_bytes());
        out.extend_from_slice(&icmp.to_bytes());
        out.extend_from_slice(quote);
        out
    }
}

/// An ICMP echo request from the client's MAC to the node's, `from` to
/// `to`, with `ttl`, an identifier, a sequence number and 16 bytes of data.
pub fn echo_request(from: [u8; 4], to: [u8; 4], ttl: u8) -> Vec<u8> {
    echo(Ethernet2Header { source: CLIENT_MAC, destination: NODE_MAC, ether_type: EtherType::IPV4 }, from, to, ttl, false)
}

/// The echo reply answering `echo_request(to, from, _)` from the node's
/// MAC, with `ttl`.
pub fn echo_reply(from: [u8; 4], to: [u8; 4], ttl: u8) -> Vec<u8> {
    echo(Ethernet2Header { source: NODE_MAC, destination: CLIENT_MAC, ether_type: EtherType::IPV4 }, from, to, ttl, true)
}

fn echo(eth: Ethernet2Header, from: [u8; 4], to: [u8; 4], ttl: u8, reply: bool) -> Vec<u8> {
    let data = b"ping the service";
    let header = IcmpEchoHeader { id: 0x4242, seq: 7 };
    let kind = if reply { Icmpv4Type::EchoReply(header) } else { Icmpv4Type::EchoRequest(header) };
    let icmp = Icmpv4Header::with_checksum(kind, data);
    let mut ip = Ipv4Header::new(0, ttl, IpNumber::ICMP, from, to).expect("valid header");
    ip.identification = 0x1234;
    ip.set_payload_len(icmp.header_len() + data.len()).expect("small packet");
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = eth.to_bytes().to_vec();
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&icmp.to_bytes());
    out.extend_from_slice(data);
    out
}

fn reply_eth(request: &Ethernet2Header) -> Ethernet2Header {
    Ethernet2Header { source: request.destination, destination: request.source, ether_type: EtherType::IPV4 }
}

/// An IPv4 header as the datapath's replies (and the ICMP errors of the
/// tests) carry it: DF set, identification 0.
fn reply_ip(from: [u8; 4], to: [u8; 4], proto: IpNumber) -> Ipv4Header {
    let mut ip = Ipv4Header::new(0, 64, proto, from, to).expect("valid header");
    ip.dont_fragment = true;
    ip.identification = 0;
    ip
}

pub fn addr(s: &str) -> SocketAddrV4 {
    s.parse().unwrap_or_else(|_| panic!("{s} is not ip:port"))
}
