//! Socket-level load balancing for the node's own processes.
//!
//! Packets from the node's own processes (hostNetwork pods, the kubelet) to a
//! service never pass an ingress hook, so the destination is translated when
//! the socket connects (TCP, connected UDP) or sends (unconnected UDP), and
//! translated back where the application reads the peer (received datagrams,
//! getpeername).
use aya_ebpf::{
    EbpfContext, Global,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use lb_common::{
    AFFINITY_CLIENT_NETNS, AffinityValue, Backend, FrontendKey, FrontendValue, IPPROTO_UDP, SocketBackendKey, SocketRevNatKey,
    SocketRevNatValue, lifecycle,
};

use crate::{
    family::Family,
    maps::{SOCKET_BACKENDS, SOCKET_REVNAT},
    service, stats,
};

/// Which call a translation is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// connect: a TCP or connected UDP socket picks once.
    Connect,
    /// sendmsg on an unconnected UDP socket: every datagram asks, and gets
    /// the socket's backend for that frontend.
    SendTo,
}

/// What a sock_addr program returns: go on, or fail the call (with EPERM,
/// unless the program set another error).
pub const ALLOW: i32 = 1;
pub const REFUSE: i32 = 0;

const ECONNREFUSED: i32 = 111;

/// 1 where the kernel has `bpf_set_retval` (Linux 5.18), set by the agent
/// before loading (`lb_common::GLOBAL_SOCK_SET_RETVAL`). It lives in the
/// object's frozen read-only data, which the verifier reads as a constant:
/// with 0 it never walks the helper call, which older kernels reject.
#[unsafe(no_mangle)]
static LB_SOCK_SET_RETVAL: Global<u8> = Global::new(0);

/// connect4 and sendmsg4: a service frontend becomes one of its backends.
#[inline(always)]
pub fn translate_destination(ctx: &SockAddrContext, call: Call) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: the kernel hands the program a valid bpf_sock_addr; these are
    // plain field reads. user_port holds the port in network byte order in
    // its low 16 bits.
    let (ip, port, proto) = unsafe { ((*addr).user_ip4, (*addr).user_port as u16, (*addr).protocol as u8) };
    let key = FrontendKey { ip, port, proto, _pad: 0, _pad_v6: () };
    let Some(fe) = Family::frontend(&key) else { return ALLOW };
    let (host, host_only) = service::socket_scope();
    // SAFETY: a helper taking the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let of_the_node = host == 0 || netns == host;
    if host_only && !of_the_node {
        // A pod's socket, left to the per-packet translation at tc.
        return ALLOW;
    }
    // The node's processes connect from the node's address, which
    // loadBalancerSourceRanges may leave out (EPERM, as kube-proxy's
    // firewall drop fails such a connect).
    let node = <u32 as Family>::node_address();
    if !service::source_allowed(&fe, node) {
        return REFUSE;
    }
    // The node is inside the cluster: an externalTrafficPolicy Local
    // service's external address serves it as its cluster IP does.
    let fe = service::in_cluster_frontend(&fe, proto).unwrap_or(fe);
    // SAFETY: a helper taking the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // For sessionAffinity ClientIP the node's processes are one client,
    // known by the node's address as their packets would show it; a socket
    // of another network namespace (a pod whose processes sit in a child
    // cgroup) is a client of its own, known by its namespace's cookie.
    let client = if of_the_node { u64::from(node) } else { netns | AFFINITY_CLIENT_NETNS };
    let picked = match call {
        Call::SendTo => socket_backend(SocketBackendKey { cookie, frontend_ip: ip, frontend_port: port, _pad: 0 }, &fe, client),
        Call::Connect => service::pick_backend_for(&fe, client),
    };
    let Some(backend) = picked else {
        // No endpoints: fail at once with "connection refused", as a reject
        // does for packets (and kube-proxy's REJECT rule).
        stats::count_service_reject(fe.service_id);
        if LB_SOCK_SET_RETVAL.load() != 0 {
            // SAFETY: a helper call with a scalar argument; its result only
            // says whether the error was set, and EPERM is the fallback
            // either way.
            let _fallback_eperm = unsafe { bpf_set_retval(-ECONNREFUSED) };
        }
        return REFUSE;
    };
    let reverse_key = SocketRevNatKey { cookie, backend_ip: backend.ip, backend_port: backend.port, _pad: 0 };
    let reverse = SocketRevNatValue { frontend_ip: ip, frontend_port: port, proto, _pad: 0 };
    // Without the reverse entry a UDP reply would not be recognised: refuse
    // rather than half-translate.
    if SOCKET_REVNAT.insert(reverse_key, reverse, 0).is_err() {
        return REFUSE;
    }
    stats::count_service_connection(fe.service_id);
    // SAFETY: connect4 and sendmsg4 may write the destination.
    unsafe {
        (*addr).user_ip4 = backend.ip;
        (*addr).user_port = u32::from(backend.port);
    }
    ALLOW
}

/// The backend an unconnected UDP socket sends this frontend's datagrams
/// to: the one it used last, while a UDP flow would live (the conntrack UDP
/// lifetime since its last datagram) and the backend still belongs to the
/// service; else a new pick, remembered.
#[inline(always)]
fn socket_backend(key: SocketBackendKey, fe: &FrontendValue, client: u64) -> Option<Backend> {
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let lifetime_ns = u64::from(service::ct_lifetime(IPPROTO_UDP, 0)) << lifecycle::TICK_SHIFT;
    if let Some(entry) = SOCKET_BACKENDS.get_ptr_mut(key) {
        // SAFETY: a pointer from a successful lookup, valid for this run.
        let remembered = unsafe { *entry };
        let current = service::current_backend_set(fe.service_id);
        if now.saturating_sub(remembered.last_used_ns()) <= lifetime_ns && service::is_member(current, remembered.backend) {
            // SAFETY: as above; the entry rewritten in place.
            unsafe { *entry = AffinityValue::new(remembered.backend, now) };
            return Some(remembered.backend);
        }
    }
    let backend = service::pick_backend_for(fe, client)?;
    // A socket whose choice cannot be stored still gets its backend.
    let _best_effort = SOCKET_BACKENDS.insert(key, AffinityValue::new(backend, now), 0);
    Some(backend)
}

/// recvmsg4 and getpeername4: a backend the socket was sent to by
/// `translate_destination` shows as the service frontend again.
#[inline(always)]
pub fn restore_source(ctx: &SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: as above.
    let (ip, port) = unsafe { ((*addr).user_ip4, (*addr).user_port as u16) };
    // SAFETY: a helper taking the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SocketRevNatKey { cookie, backend_ip: ip, backend_port: port, _pad: 0 };
    if let Some(frontend) = SOCKET_REVNAT.get_ptr(key) {
        // SAFETY: a pointer from a successful lookup; recvmsg4 and
        // getpeername4 may write the address.
        unsafe {
            (*addr).user_ip4 = (*frontend).frontend_ip;
            (*addr).user_port = u32::from((*frontend).frontend_port);
        }
    }
    ALLOW
}
