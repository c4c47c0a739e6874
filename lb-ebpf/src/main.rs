//! The service load balancer's datapath: thin entry points for the tc (tcx)
//! and XDP hooks over one packet-processing routine (`datapath::process`).
//! See docs/architecture.md for which hook serves which traffic.
#![no_std]
#![no_main]

mod conntrack;
mod context;
mod datapath;
mod maps;
mod nat;
mod parse;
mod reject;
mod service;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::generated::bpf_redirect,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use context::{TcPacket, XdpPacket};
use datapath::Action;

/// tc ingress: service traffic from pods and from the node's interfaces.
#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    let pkt = TcPacket::new(&ctx);
    match datapath::process(&pkt) {
        Action::Pass => TC_ACT_OK as i32,
        Action::Drop => TC_ACT_SHOT as i32,
        // Back out of the interface the packet came in on.
        // SAFETY: a plain helper call with scalar arguments.
        Action::Bounce => unsafe { bpf_redirect(pkt.ifindex(), 0) as i32 },
    }
}

/// XDP: the same processing, before the kernel allocates an skb.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match datapath::process(&XdpPacket::new(&ctx)) {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Bounce => xdp_action::XDP_TX,
    }
}

/// The benchmark floor: an XDP program that does nothing at all.
#[xdp]
pub fn lb_xdp_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}
