//! The node agent's library, one set of pieces for `lb-agent`, `lbctl`, the tests and benchmarks.
//!
//! Loading and attaching the datapath, the desired service state and its
//! source, and the syncer that keeps the BPF maps equal to it. `lb-agent`
//! (main.rs, its loop in agent.rs) wires them together.
pub mod cli;
pub mod conntrack;
pub mod datapath;
pub mod error;
pub mod explain;
pub mod features;
pub mod http;
pub mod iface_watch;
pub mod inspect;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod node_addresses;
pub mod sockets;
pub mod source;
pub mod sync;

pub use error::Error;

/// The compiled eBPF object (built by build.rs from lb-ebpf).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

/// The benchmark's empty XDP program (`PROG_XDP_FLOOR`), an object of its
/// own: only `cargo xtask bench` loads it.
pub static BENCH_FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench-floor.o"));
