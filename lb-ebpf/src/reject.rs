//! Rejecting a connection as kube-proxy does.
//!
//! The packet is turned into a TCP reset or ICMP port unreachable and sent back
//! where it came from.
use lb_common::{
    IPPROTO_TCP,
    reply::{
        ETH_HLEN, IPV4_HLEN, PORT_UNREACHABLE_LEN, TCP_HLEN, TcpSegment,
        UDP_HLEN, UdpDatagram, port_unreachable, tcp_reset,
    },
};

use crate::{
    context::{HelperFailed, Packet, ptr_at},
    parse::Flow,
};

pub enum RejectError {
    /// No reply may or can be built: a reset is never answered, and ICMP
    /// quoting of headers with IP options is not supported.
    Unanswerable,
    HelperFailed,
}

impl From<HelperFailed> for RejectError {
    fn from(_: HelperFailed) -> Self {
        RejectError::HelperFailed
    }
}

/// Rewrites the packet into the reply that rejects it; the caller then
/// bounces it out of the interface it came in on.
#[inline(always)]
pub fn reject<P: Packet>(pkt: &P, flow: &Flow) -> Result<(), RejectError> {
    if flow.tuple.proto == IPPROTO_TCP {
        let reply = tcp_reset(&tcp_segment(pkt, flow)?).ok_or(RejectError::Unanswerable)?;
        write_reply(pkt, &reply)
    } else {
        if flow.has_ip_options() {
            return Err(RejectError::Unanswerable);
        }
        let headers = ptr_at::<_, [u8; ETH_HLEN + IPV4_HLEN + UDP_HLEN]>(pkt, 0)
            .ok_or(RejectError::Unanswerable)?;
        // SAFETY: bounds-checked by ptr_at.
        let h = unsafe { headers.read_unaligned() };
        let mut dgram = UdpDatagram {
            eth_src: [0; 6],
            eth_dst: [0; 6],
            ip_header: [0; IPV4_HLEN],
            udp_header: [0; UDP_HLEN],
        };
        dgram.eth_dst.copy_from_slice(&h[0..6]);
        dgram.eth_src.copy_from_slice(&h[6..12]);
        dgram.ip_header.copy_from_slice(&h[ETH_HLEN..ETH_HLEN + IPV4_HLEN]);
        dgram.udp_header.copy_from_slice(&h[ETH_HLEN + IPV4_HLEN..]);
        write_reply::<P, PORT_UNREACHABLE_LEN>(pkt, &port_unreachable(&dgram))
    }
}

#[inline(always)]
fn tcp_segment<P: Packet>(pkt: &P, flow: &Flow) -> Result<TcpSegment, RejectError> {
    let eth = ptr_at::<_, [u8; 12]>(pkt, 0).ok_or(RejectError::Unanswerable)?;
    let tcp = ptr_at::<_, [u8; TCP_HLEN]>(pkt, flow.l4_off).ok_or(RejectError::Unanswerable)?;
    // SAFETY: both bounds-checked by ptr_at.
    let (eth, tcp) = unsafe { (eth.read_unaligned(), tcp.read_unaligned()) };
    let headers_len = (flow.l4_off - ETH_HLEN) as u32 + u32::from(tcp[12] >> 4) * 4;
    let mut seg = TcpSegment {
        src_ip: flow.tuple.src_ip,
        dst_ip: flow.tuple.dst_ip,
        src_port: flow.tuple.src_port,
        dst_port: flow.tuple.dst_port,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        ack: u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
        flags: tcp[13],
        payload_len: flow.ip_len.saturating_sub(headers_len),
        ..TcpSegment::default()
    };
    seg.eth_dst.copy_from_slice(&eth[0..6]);
    seg.eth_src.copy_from_slice(&eth[6..12]);
    Ok(seg)
}

#[inline(always)]
fn write_reply<P: Packet, const N: usize>(pkt: &P, reply: &[u8; N]) -> Result<(), RejectError> {
    pkt.set_len(N)?;
    let out = ptr_at::<_, [u8; N]>(pkt, 0).ok_or(RejectError::HelperFailed)?;
    // SAFETY: bounds-checked by ptr_at after the resize.
    unsafe { out.write_unaligned(*reply) };
    Ok(())
}
