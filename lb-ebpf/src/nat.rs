//! Address and port translation with checksum updates.
use lb_common::{ConntrackValue, IPPROTO_UDP};

use crate::{
    context::{HelperFailed, Packet, ptr_at},
    family::Family,
    parse::Flow,
};

const TCP_CHECK_OFF: usize = 16;
const UDP_CHECK_OFF: usize = 6;

// The words below put the first field in the low bytes, which is where a
// little-endian store writes them: the header order.
const _: () = assert!(cfg!(target_endian = "little"), "the datapath assumes little-endian BPF");

/// Two ports (network byte order) as the 4 bytes of a TCP/UDP header that
/// hold them, read or written as one word.
#[inline(always)]
pub const fn ports_word(src_port: u16, dst_port: u16) -> u32 {
    src_port as u32 | (dst_port as u32) << 16
}

/// Rewrites the packet's addresses and ports to the ones `to` holds and
/// adds `to`'s precomputed changes to the IPv4 and L4 checksums: every
/// packet of a flow gets the same rewrite, so it is worked out once, when
/// the flow is recorded.
#[inline(always)]
pub fn rewrite<P: Packet, A: Family>(pkt: &P, flow: &Flow<A>, to: &ConntrackValue<A>) -> Result<(), HelperFailed> {
    A::rewrite_addresses(pkt, to)?;
    let ports = ptr_at::<_, u32>(pkt, flow.l4_off).ok_or(HelperFailed)?;
    // SAFETY: bounds-checked by ptr_at; unaligned, as packet data is.
    unsafe { ports.write_unaligned(ports_word(to.src_port, to.dst_port)) };
    // Last, because on tc the helpers invalidate the packet pointers.
    let udp = flow.tuple.proto == IPPROTO_UDP;
    let check_off = flow.l4_off + if udp { UDP_CHECK_OFF } else { TCP_CHECK_OFF };
    pkt.update_l4_checksum(check_off, udp, to)
}
