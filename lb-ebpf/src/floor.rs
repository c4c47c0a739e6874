//! The benchmark floor: an XDP program that does nothing at all.
//!
//! An object of its own, so that no agent loads it; `cargo xtask bench` times
//! it beside the datapath.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn lb_xdp_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Nothing here can panic; the verifier would reject a program that could.
    loop {}
}
