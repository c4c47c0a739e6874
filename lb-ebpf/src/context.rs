//! The `Packet` interface over both hooks, so the datapath is written once for XDP and tc.
//!
//! What differs between an XDP buffer and an skb is how the L4 checksum is
//! updated and how a packet is resized.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::generated::{
        bpf_skb_change_tail, bpf_skb_pull_data, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};
use lb_common::{ConntrackValue, checksum};

/// A helper failed; the packet is dropped and counted.
pub struct HelperFailed;

pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// `data()` and `data_end()` read afresh from the context, where LLVM
    /// may not reuse an earlier read (see `ptr_at_reloaded`).
    fn bounds_reloaded(&self) -> (usize, usize);
    /// The whole packet's length, linear or not.
    fn len(&self) -> usize;

    /// Makes at least the first `len` bytes (or the whole packet, if
    /// shorter) readable through `data()..data_end()`.
    fn pull_headers(&self, len: u32);

    /// Adds to the L4 checksum at `check_off` what the translation `to`
    /// (of either family) changed in the addresses (covered through the pseudo-header) and in
    /// the ports. UDP's "no checksum" zero is kept as it is.
    fn update_l4_checksum<A>(&self, check_off: usize, udp: bool, to: &ConntrackValue<A>) -> Result<(), HelperFailed>;

    /// Makes the packet exactly `len` bytes long. The content afterwards is
    /// unspecified: the caller rewrites all of it.
    fn set_len(&self, len: usize) -> Result<(), HelperFailed>;
}

/// As `ptr_at`, with the packet's bounds read afresh: in a loop LLVM keeps
/// `data_end` in a register across iterations and compares against a
/// zero-extended copy of it, which the verifier no longer knows as the
/// packet's end, and then refuses the access.
#[inline(always)]
pub fn ptr_at_reloaded<P: Packet, T>(pkt: &P, offset: usize) -> Option<*mut T> {
    let (start, end) = pkt.bounds_reloaded();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// A bounds-checked pointer to a `T` at `offset` bytes into the packet.
#[inline(always)]
pub fn ptr_at<P: Packet, T>(pkt: &P, offset: usize) -> Option<*mut T> {
    let start = pkt.data();
    if start + offset + size_of::<T>() > pkt.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

pub struct XdpPacket<'a> {
    ctx: &'a XdpContext,
}

impl<'a> XdpPacket<'a> {
    pub fn new(ctx: &'a XdpContext) -> Self {
        Self { ctx }
    }
}

impl Packet for XdpPacket<'_> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.ctx.data()
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        self.ctx.data_end()
    }

    #[inline(always)]
    fn bounds_reloaded(&self) -> (usize, usize) {
        let md = self.ctx.ctx;
        // SAFETY: the program's own context; volatile so that each call
        // loads the fields again.
        unsafe { ((&raw const (*md).data).read_volatile() as usize, (&raw const (*md).data_end).read_volatile() as usize) }
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }

    #[inline(always)]
    fn pull_headers(&self, _len: u32) {
        // An XDP buffer's first fragment is linear already.
    }

    /// XDP sees packets as they came off the wire, with complete checksums,
    /// so the RFC 1624 update is done here directly.
    #[inline(always)]
    fn update_l4_checksum<A>(&self, check_off: usize, udp: bool, to: &ConntrackValue<A>) -> Result<(), HelperFailed> {
        let check_ptr = ptr_at::<_, u16>(self, check_off).ok_or(HelperFailed)?;
        // SAFETY: bounds-checked just above; read_unaligned because the L4
        // header follows a 14-byte Ethernet header.
        let check = unsafe { check_ptr.read_unaligned() };
        if udp && check == 0 {
            return Ok(());
        }
        // One delta for both changes: a complete checksum covers both.
        let mut check = checksum::add(check, to.l4_csum_delta);
        if udp {
            check = checksum::udp_nonzero(check);
        }
        // SAFETY: as above.
        unsafe { check_ptr.write_unaligned(check) };
        Ok(())
    }

    #[inline(always)]
    fn set_len(&self, len: usize) -> Result<(), HelperFailed> {
        let current = self.data_end() - self.data();
        let ret = if len > current {
            // Grow at the front: the headroom is always there, and the
            // content is rewritten from the start anyway.
            // SAFETY: a helper call on this program's own context.
            unsafe { bpf_xdp_adjust_head(self.ctx.ctx, -((len - current) as i32)) }
        } else if len < current {
            // SAFETY: as above.
            unsafe { bpf_xdp_adjust_tail(self.ctx.ctx, -((current - len) as i32)) }
        } else {
            0
        };
        if ret == 0 { Ok(()) } else { Err(HelperFailed) }
    }
}

pub struct TcPacket<'a> {
    ctx: &'a TcContext,
}

impl<'a> TcPacket<'a> {
    pub fn new(ctx: &'a TcContext) -> Self {
        Self { ctx }
    }

    #[inline(always)]
    pub fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of this program's own context.
        unsafe { (*self.ctx.skb.skb).ifindex }
    }
}

impl Packet for TcPacket<'_> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.ctx.data()
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        self.ctx.data_end()
    }

    #[inline(always)]
    fn bounds_reloaded(&self) -> (usize, usize) {
        let skb = self.ctx.skb.skb;
        // SAFETY: the program's own context; volatile so that each call
        // loads the fields again.
        unsafe { ((&raw const (*skb).data).read_volatile() as usize, (&raw const (*skb).data_end).read_volatile() as usize) }
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.ctx.len() as usize
    }

    #[inline(always)]
    fn pull_headers(&self, len: u32) {
        let len = if self.ctx.len() < len { self.ctx.len() } else { len };
        if self.data_end() - self.data() < len as usize {
            // Failure leaves the packet as it was; the parser then sees a
            // short packet and leaves it to the kernel.
            // SAFETY: a helper call on this program's own context.
            let _unpulled = unsafe { bpf_skb_pull_data(self.ctx.skb.skb, len) };
        }
    }

    /// An skb may carry a partial checksum (CHECKSUM_PARTIAL, from a local
    /// sender with offload) or a device-computed one (CHECKSUM_COMPLETE):
    /// only the kernel's helper updates each kind correctly.
    #[inline(always)]
    fn update_l4_checksum<A>(&self, check_off: usize, udp: bool, to: &ConntrackValue<A>) -> Result<(), HelperFailed> {
        let mangled = if udp { u64::from(BPF_F_MARK_MANGLED_0) } else { 0 };
        // Field size 0: `to` is a delta to add (from must be 0). The address
        // delta goes with BPF_F_PSEUDO_HDR, which a partial checksum takes
        // in; the port delta without, since a partial checksum covers no
        // ports, so the two cannot be one call.
        self.ctx
            .l4_csum_replace(check_off, 0, u64::from(to.addr_csum_delta), u64::from(BPF_F_PSEUDO_HDR) | mangled)
            .map_err(|_| HelperFailed)?;
        self.ctx.l4_csum_replace(check_off, 0, u64::from(to.port_csum_delta), mangled).map_err(|_| HelperFailed)
    }

    #[inline(always)]
    fn set_len(&self, len: usize) -> Result<(), HelperFailed> {
        // SAFETY: a helper call on this program's own context.
        if unsafe { bpf_skb_change_tail(self.ctx.skb.skb, len as u32, 0) } != 0 {
            return Err(HelperFailed);
        }
        self.pull_headers(len as u32);
        Ok(())
    }
}
