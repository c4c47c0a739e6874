//! Types and pure functions that the eBPF datapath and user space share.
//!
//! Map keys and values, verdict reasons, and the pure packet math (checksums,
//! reply packets) that both sides rely on: the eBPF datapath (`lb-ebpf`) and
//! user space (`lb-userspace`).
//!
//! Every map type is `#[repr(C)]`, has explicit `_pad` fields, derives
//! bytemuck's `Pod` (which rejects hidden padding) and carries a
//! compile-time size check, so the two sides of the kernel boundary can never
//! disagree on a layout. Addresses and ports are stored in network byte order,
//! exactly as they appear on the wire, so the fast path never converts.
#![no_std]

pub mod checksum;
pub mod lifecycle;
pub mod maps;
pub mod reply;
pub mod verdict;

pub use maps::*;
pub use verdict::Reason;
