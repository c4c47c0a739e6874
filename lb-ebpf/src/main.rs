//! The service load balancer's datapath: the eBPF programs' entry points.
//!
//! Thin entry points for the tc (tcx) and XDP hooks over one packet-processing
//! routine (`datapath::process`), and the cgroup socket hooks for the node's
//! own processes (`sock`). See docs/architecture.md for which hook serves which
//! traffic.
#![no_std]
#![no_main]

mod conntrack;
mod context;
mod datapath;
mod family;
mod fragments;
mod icmp;
mod maps;
mod nat;
mod parse;
mod reject;
mod service;
mod sock;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::generated::bpf_redirect,
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

use context::{TcPacket, XdpPacket};
use datapath::Action;

/// tc ingress: service traffic from pods and from the node's interfaces.
/// Inlined into the entry point the macro wraps it in: a BPF call there
/// would cost every packet and stack the frames.
#[classifier]
#[inline(always)]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    let pkt = TcPacket::new(&ctx);
    match datapath::process(&pkt) {
        Action::Pass => TC_ACT_OK,
        Action::Drop => TC_ACT_SHOT,
        // Back out of the interface the packet came in on.
        // SAFETY: a plain helper call with scalar arguments.
        Action::Bounce => unsafe { bpf_redirect(pkt.ifindex(), 0) as i32 },
    }
}

/// XDP: the same processing, before the kernel allocates an skb.
#[xdp]
#[inline(always)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match datapath::process(&XdpPacket::new(&ctx)) {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Bounce => xdp_action::XDP_TX,
    }
}

/// The node's own TCP connects and connected UDP sockets to a service.
#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate_destination(&ctx, sock::Call::Connect)
}

/// The node's own unconnected UDP datagrams to a service.
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate_destination(&ctx, sock::Call::SendTo)
}

/// Datagrams from a backend show the service as their source.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::restore_source(&ctx)
}

/// getpeername shows the service, not the backend.
#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::restore_source(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}
