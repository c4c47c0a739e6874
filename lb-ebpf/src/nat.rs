//! Address and port translation with checksum updates.
use lb_common::{IPPROTO_UDP, checksum, reply::ETH_HLEN};

use crate::{
    context::{HelperFailed, L4Change, Packet, ptr_at},
    parse::Flow,
};

/// Which end of the packet is translated.
#[derive(Clone, Copy)]
pub enum Side {
    /// Replies: the backend becomes the service frontend again. Requests
    /// with source NAT: the client becomes the node.
    Source,
    /// Requests: the service frontend becomes the backend. Replies with
    /// source NAT: the node becomes the client again.
    Destination,
}

impl Side {
    #[inline(always)]
    pub const fn other(self) -> Self {
        match self {
            Side::Source => Side::Destination,
            Side::Destination => Side::Source,
        }
    }
}

const IP_CHECK_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const TCP_CHECK_OFF: usize = 16;
const UDP_CHECK_OFF: usize = 6;

/// Rewrites one side's address and port (network byte order) and fixes the
/// IPv4 and L4 checksums.
#[inline(always)]
pub fn rewrite<P: Packet>(
    pkt: &P,
    flow: &Flow,
    side: Side,
    new_ip: u32,
    new_port: u16,
) -> Result<(), HelperFailed> {
    let (ip_off, port_off, old_ip, old_port) = match side {
        Side::Source => (IP_SRC_OFF, flow.l4_off, flow.tuple.src_ip, flow.tuple.src_port),
        Side::Destination => {
            (IP_DST_OFF, flow.l4_off + 2, flow.tuple.dst_ip, flow.tuple.dst_port)
        }
    };
    let udp = flow.tuple.proto == IPPROTO_UDP;
    let check_off = flow.l4_off + if udp { UDP_CHECK_OFF } else { TCP_CHECK_OFF };

    // The IPv4 header checksum is never offloaded: updated directly, with
    // the address delta the L4 checksum needs as well.
    let ip_delta = checksum::delta_u32(old_ip, new_ip);
    let ip_check = ptr_at::<_, u16>(pkt, IP_CHECK_OFF).ok_or(HelperFailed)?;
    let ip_addr = ptr_at::<_, u32>(pkt, ip_off).ok_or(HelperFailed)?;
    let port = ptr_at::<_, u16>(pkt, port_off).ok_or(HelperFailed)?;
    // SAFETY: each pointer was bounds-checked by ptr_at; unaligned writes
    // because the IP header sits 14 bytes into the frame.
    unsafe {
        let check = ip_check.read_unaligned();
        ip_check.write_unaligned(checksum::apply(check, ip_delta));
        ip_addr.write_unaligned(new_ip);
        port.write_unaligned(new_port);
    }
    // Last, because on tc the helpers invalidate the packet pointers.
    let change = L4Change { ip: (old_ip, new_ip), ip_delta, port: (old_port, new_port) };
    pkt.update_l4_checksum(check_off, udp, &change)
}
