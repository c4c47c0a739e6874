//! IP fragments: the key under which a datagram's later fragments find their ports.
use bytemuck::{Pod, Zeroable};

/// A fragmented IP packet, as its fragments all carry it on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragmentKey {
    /// Network byte order.
    pub src_ip: u32,
    /// Network byte order.
    pub dst_ip: u32,
    /// The IP identification, network byte order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<FragmentKey>() == 12);

user_pod!(FragmentKey);
