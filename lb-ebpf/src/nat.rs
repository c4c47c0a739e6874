//! Address and port translation with checksum updates.
use lb_common::{ConntrackValue, IPPROTO_UDP, checksum, reply::ETH_HLEN};

use crate::{
    context::{HelperFailed, Packet, ptr_at},
    parse::{Flow, Ipv4Header},
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

/// Rewrites only the IPv4 addresses (and header checksum) to the ones `to`
/// holds: a later fragment of a translated datagram, whose TCP/UDP header
/// (and checksum, over the whole datagram) travelled in the first.
#[inline(always)]
pub fn rewrite_addresses<P: Packet>(pkt: &P, to: &ConntrackValue) -> Result<(), HelperFailed> {
    let ip = ptr_at::<_, Ipv4Header>(pkt, ETH_HLEN).ok_or(HelperFailed)?;
    let addresses = u64::from(to.src_ip) | u64::from(to.dst_ip) << 32;
    // SAFETY: bounds-checked by ptr_at for all 20 bytes of the header, so
    // its fields and the 8 address bytes from `src` on are inside the
    // packet; unaligned accesses because the IP header sits 14 bytes into
    // the frame.
    unsafe {
        let check = &raw mut (*ip).check;
        check.write_unaligned(checksum::add(check.read_unaligned(), to.addr_csum_delta));
        (&raw mut (*ip).src).cast::<u64>().write_unaligned(addresses);
    }
    Ok(())
}

/// Rewrites the packet's addresses and ports to the ones `to` holds and
/// adds `to`'s precomputed changes to the IPv4 and L4 checksums: every
/// packet of a flow gets the same rewrite, so it is worked out once, when
/// the flow is recorded.
#[inline(always)]
pub fn rewrite<P: Packet>(pkt: &P, flow: &Flow, to: &ConntrackValue) -> Result<(), HelperFailed> {
    rewrite_addresses(pkt, to)?;
    let ports = ptr_at::<_, u32>(pkt, flow.l4_off).ok_or(HelperFailed)?;
    // SAFETY: bounds-checked by ptr_at; unaligned, as packet data is.
    unsafe { ports.write_unaligned(ports_word(to.src_port, to.dst_port)) };
    // Last, because on tc the helpers invalidate the packet pointers.
    let udp = flow.tuple.proto == IPPROTO_UDP;
    let check_off = flow.l4_off + if udp { UDP_CHECK_OFF } else { TCP_CHECK_OFF };
    pkt.update_l4_checksum(check_off, udp, to)
}
