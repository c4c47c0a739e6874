//! Building the packets the datapath sends back when it rejects a connection.
//!
//! As kube-proxy does for a service without endpoints, the reply is a TCP reset
//! (RFC 9293 §3.10.7.1) or an ICMP port unreachable (RFC 792, RFC 1812
//! §4.3.2.3). Pure functions from the fields of the offending packet to the
//! reply's bytes, Ethernet header included, so they are testable on the host
//! and need nothing but a copy on the fast path.
use crate::checksum;

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const ICMP_HLEN: usize = 8;
pub const ETH_P_IPV4: u16 = 0x0800;

/// Length of a TCP reset with no options or payload.
pub const TCP_RESET_LEN: usize = ETH_HLEN + IPV4_HLEN + TCP_HLEN;
/// Length of an ICMP port unreachable quoting a 20-byte IP header and the
/// 8-byte UDP header.
pub const PORT_UNREACHABLE_LEN: usize = ETH_HLEN + IPV4_HLEN + ICMP_HLEN + IPV4_HLEN + UDP_HLEN;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const REPLY_TTL: u8 = 64;
const IP_DONT_FRAGMENT: u16 = 0x4000;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_PORT_UNREACHABLE: u8 = 3;

/// What a TCP reset needs from the segment it answers.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpSegment {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    /// Network byte order, as are the ports.
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// Host byte order.
    pub seq: u32,
    /// Host byte order.
    pub ack: u32,
    pub flags: u8,
    /// Payload bytes after the TCP header.
    pub payload_len: u32,
}

/// What an ICMP port unreachable needs from the datagram it answers.
#[derive(Clone, Copy, Debug)]
pub struct UdpDatagram {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    /// The datagram's IP header (without options) and UDP header, quoted.
    pub ip_header: [u8; IPV4_HLEN],
    pub udp_header: [u8; UDP_HLEN],
}

/// The reset answering `seg`, or `None` when `seg` is itself a reset
/// (which is never answered).
pub fn tcp_reset(seg: &TcpSegment) -> Option<[u8; TCP_RESET_LEN]> {
    if seg.flags & TCP_RST != 0 {
        return None;
    }
    // RFC 9293: with ACK set the reset takes its sequence number from the
    // ACK field; otherwise seq 0 and it acknowledges everything received,
    // SYN and FIN counting one each.
    let (seq, ack, flags) = if seg.flags & TCP_ACK != 0 {
        (seg.ack, 0, TCP_RST)
    } else {
        let mut len = seg.payload_len;
        if seg.flags & TCP_SYN != 0 {
            len += 1;
        }
        if seg.flags & TCP_FIN != 0 {
            len += 1;
        }
        (0, seg.seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };
    let mut out = [0u8; TCP_RESET_LEN];
    write_ethernet(&mut out, seg.eth_src, seg.eth_dst);
    let ip = ipv4_header((IPV4_HLEN + TCP_HLEN) as u16, 6, seg.dst_ip, seg.src_ip);
    out[ETH_HLEN..ETH_HLEN + IPV4_HLEN].copy_from_slice(&ip);

    let tcp = ETH_HLEN + IPV4_HLEN;
    out[tcp..tcp + 2].copy_from_slice(&seg.dst_port.to_ne_bytes());
    out[tcp + 2..tcp + 4].copy_from_slice(&seg.src_port.to_ne_bytes());
    out[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
    out[tcp + 8..tcp + 12].copy_from_slice(&ack.to_be_bytes());
    out[tcp + 12] = ((TCP_HLEN / 4) as u8) << 4;
    out[tcp + 13] = flags;
    // Window, checksum and urgent pointer start at zero.
    let pseudo = checksum::pseudo_header_sum(seg.dst_ip, seg.src_ip, 6, TCP_HLEN as u16);
    let check = checksum::finish(checksum::sum_words(&out[tcp..tcp + TCP_HLEN], pseudo));
    out[tcp + 16..tcp + 18].copy_from_slice(&check.to_ne_bytes());
    Some(out)
}

/// The ICMP port unreachable answering `dgram`, from the address it was
/// sent to.
pub fn port_unreachable(dgram: &UdpDatagram) -> [u8; PORT_UNREACHABLE_LEN] {
    let h = &dgram.ip_header;
    let src_ip = u32::from_ne_bytes([h[12], h[13], h[14], h[15]]);
    let dst_ip = u32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
    let mut out = [0u8; PORT_UNREACHABLE_LEN];
    write_ethernet(&mut out, dgram.eth_src, dgram.eth_dst);
    let icmp_len = ICMP_HLEN + IPV4_HLEN + UDP_HLEN;
    let ip = ipv4_header((IPV4_HLEN + icmp_len) as u16, 1, dst_ip, src_ip);
    out[ETH_HLEN..ETH_HLEN + IPV4_HLEN].copy_from_slice(&ip);

    let icmp = ETH_HLEN + IPV4_HLEN;
    out[icmp] = ICMP_DEST_UNREACHABLE;
    out[icmp + 1] = ICMP_PORT_UNREACHABLE;
    let quote = icmp + ICMP_HLEN;
    out[quote..quote + IPV4_HLEN].copy_from_slice(h);
    out[quote + IPV4_HLEN..quote + IPV4_HLEN + UDP_HLEN].copy_from_slice(&dgram.udp_header);
    let check = checksum::finish(checksum::sum_words(&out[icmp..icmp + icmp_len], 0));
    out[icmp + 2..icmp + 4].copy_from_slice(&check.to_ne_bytes());
    out
}

/// Ethernet header of a reply: back to where the packet came from.
fn write_ethernet(out: &mut [u8], request_src: [u8; 6], request_dst: [u8; 6]) {
    out[0..6].copy_from_slice(&request_src);
    out[6..12].copy_from_slice(&request_dst);
    out[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
}

/// A 20-byte IPv4 header with its checksum.
fn ipv4_header(total_len: u16, proto: u8, src_ip: u32, dst_ip: u32) -> [u8; IPV4_HLEN] {
    let mut ip = [0u8; IPV4_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total_len.to_be_bytes());
    ip[6..8].copy_from_slice(&IP_DONT_FRAGMENT.to_be_bytes());
    ip[8] = REPLY_TTL;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src_ip.to_ne_bytes());
    ip[16..20].copy_from_slice(&dst_ip.to_ne_bytes());
    let check = checksum::finish(checksum::sum_words(&ip, 0));
    ip[10..12].copy_from_slice(&check.to_ne_bytes());
    ip
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syn() -> TcpSegment {
        TcpSegment {
            eth_src: [2, 0, 0, 0, 0, 1],
            eth_dst: [2, 0, 0, 0, 0, 2],
            src_ip: u32::from_ne_bytes([10, 0, 0, 1]),
            dst_ip: u32::from_ne_bytes([10, 96, 0, 10]),
            src_port: 40000u16.to_be(),
            dst_port: 80u16.to_be(),
            seq: 1000,
            ack: 0,
            flags: TCP_SYN,
            payload_len: 0,
        }
    }

    #[test]
    fn reset_to_syn_acknowledges_the_syn_from_the_service_address() {
        let out = tcp_reset(&syn()).expect("a SYN is answered");
        assert_eq!(&out[0..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(&out[26..30], &[10, 96, 0, 10], "source is the address the SYN was sent to");
        assert_eq!(&out[30..34], &[10, 0, 0, 1]);
        assert_eq!(u16::from_be_bytes([out[34], out[35]]), 80);
        assert_eq!(u16::from_be_bytes([out[36], out[37]]), 40000);
        assert_eq!(u32::from_be_bytes([out[38], out[39], out[40], out[41]]), 0);
        assert_eq!(u32::from_be_bytes([out[42], out[43], out[44], out[45]]), 1001);
        assert_eq!(out[47], TCP_RST | TCP_ACK);
        assert_eq!(checksum::fold(checksum::sum_words(&out[14..34], 0)), 0xffff);
    }

    #[test]
    fn reset_to_ack_takes_its_sequence_from_the_ack() {
        let seg = TcpSegment { flags: TCP_ACK, ack: 77, payload_len: 10, ..syn() };
        let out = tcp_reset(&seg).expect("an ACK is answered");
        assert_eq!(u32::from_be_bytes([out[38], out[39], out[40], out[41]]), 77);
        assert_eq!(out[47], TCP_RST);
    }

    #[test]
    fn reset_is_never_answered() {
        let seg = TcpSegment { flags: TCP_RST | TCP_ACK, ..syn() };
        assert!(tcp_reset(&seg).is_none());
    }

    #[test]
    fn port_unreachable_quotes_the_datagram_headers() {
        let mut ip_header = [0u8; IPV4_HLEN];
        ip_header[0] = 0x45;
        ip_header[9] = 17;
        ip_header[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip_header[16..20].copy_from_slice(&[10, 96, 0, 10]);
        let dgram = UdpDatagram {
            eth_src: [2, 0, 0, 0, 0, 1],
            eth_dst: [2, 0, 0, 0, 0, 2],
            ip_header,
            udp_header: [0x9c, 0x40, 0, 53, 0, 12, 0, 0],
        };
        let out = port_unreachable(&dgram);
        assert_eq!(&out[26..30], &[10, 96, 0, 10]);
        assert_eq!(&out[30..34], &[10, 0, 0, 1]);
        assert_eq!((out[34], out[35]), (3, 3));
        assert_eq!(&out[42..62], &ip_header);
        assert_eq!(&out[62..70], &dgram.udp_header);
        assert_eq!(checksum::fold(checksum::sum_words(&out[34..70], 0)), 0xffff);
    }
}
