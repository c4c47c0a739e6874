//! The socket programs' maps: the frontend a node's socket asked for, an unconnected UDP socket's backend.
use bytemuck::{Pod, Zeroable};

/// One of the node's own sockets, translated to `backend_*` at connect or
/// send time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SocketRevNatKey {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    /// Network byte order.
    pub backend_ip: u32,
    /// Network byte order.
    pub backend_port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<SocketRevNatKey>() == 16);

/// An unconnected UDP socket of the node's and a frontend it sends to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SocketBackendKey {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    /// Network byte order.
    pub frontend_ip: u32,
    /// Network byte order.
    pub frontend_port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<SocketBackendKey>() == 16);

/// The frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SocketRevNatValue {
    /// Network byte order.
    pub frontend_ip: u32,
    /// Network byte order.
    pub frontend_port: u16,
    /// The socket's protocol (`IPPROTO_TCP` or `IPPROTO_UDP`): a port
    /// served over both is two frontends, whose endpoints differ (a TCP
    /// port keeps draining endpoints for its established connections, a
    /// UDP port does not). 0 in entries written before it was recorded
    /// (the byte was padding): either protocol.
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<SocketRevNatValue>() == 8);

user_pod!(SocketRevNatKey, SocketBackendKey, SocketRevNatValue);
