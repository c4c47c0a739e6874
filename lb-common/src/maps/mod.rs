//! Keys and values of the BPF maps, and the names and sizes both sides use.
//!
//! The maps, and how they fit together (docs/maps.md has their layouts,
//! docs/architecture.md the picture). The eBPF object declares all but the
//! last (lb-ebpf's maps.rs):
//! - `SERVICE_FRONTENDS`: (address, port, protocol) → which service and which
//!   backend set. One entry per frontend.
//! - `SERVICE_VIPS`: address → number of frontends on it and whether traffic
//!   to a port it does not serve is rejected (cluster IPs) or passed on
//!   (node addresses, load balancer and external IPs).
//! - `BACKEND_SLOTS`: (backend set, slot) → backend address and port. A set is
//!   written whole under a fresh id before a frontend points at it, so a
//!   reader sees either the old or the new set, never half of one.
//! - `BACKEND_SET_MEMBERS`: (backend, backend set) → its slot. Whether a
//!   backend belongs to a set, without scanning it. Draining endpoints
//!   (listed but taking no new connections: not ready or terminating) are
//!   members without a slot (slot `DRAINING_SLOT`): they keep their
//!   established flows but get no new ones.
//! - `SERVICE_BACKEND_SETS`: array, service id → the service's current
//!   backend set. An established flow remembers the set its backend was
//!   checked against; while that is still the current set (one array read)
//!   the backend still serves, otherwise one `BACKEND_SET_MEMBERS` lookup
//!   decides.
//! - `LB_SOURCE_RANGES`: LPM trie, (service id, address range) → 1: the
//!   `loadBalancerSourceRanges` that new connections to a frontend with
//!   `FRONTEND_SOURCE_RANGES` must come from.
//! - `SESSION_AFFINITY`: LRU, (client, service) → the backend its new
//!   connections stick to and when it last opened one.
//! - `CONNTRACK_TCP`, `CONNTRACK_UDP`: LRU, wire 5-tuple → the translation
//!   for that direction, two entries per flow. One table per protocol, so
//!   the churn of short UDP flows (DNS) never evicts an idle TCP
//!   connection's entry, as Cilium keeps its TCP and "any" tables apart.
//! - `CONNTRACK_TCP_PENDING`: LRU, as `CONNTRACK_TCP`, for TCP flows opened
//!   by a SYN that the backend has not answered yet; its SYN-ACK moves them
//!   to `CONNTRACK_TCP`. A table of their own, so a SYN flood never evicts
//!   an established connection.
//! - `SNAT_PORT_CURSOR`: per-CPU, one entry: where the search for a free
//!   source NAT port starts, so ports are handed out in turn.
//! - `FRAGMENT_PORTS`: LRU, what a fragmented datagram's fragments share →
//!   the ports of its first fragment, the only one with a TCP/UDP header,
//!   so that the later ones of a tracked flow are translated too.
//! - `SOCKET_REVNAT`: LRU, (socket cookie, backend) → frontend, for the
//!   node's own sockets translated at connect/send time.
//! - `SOCKET_BACKENDS`: LRU, (socket cookie, frontend) → the backend an
//!   unconnected UDP socket of the node's sends that frontend's datagrams
//!   to and when it last did, so that an exchange of several datagrams
//!   stays on one backend.
//! - `SERVICE_COUNTERS`: per-CPU array, service id → its packets, bytes,
//!   new flows and rejects.
//! - `VERDICT_COUNTERS`: per-CPU array, verdict `Reason` → packets.
//! - `DATAPATH_CONFIG`: one entry, the node's settings (the address source
//!   NAT uses and its port range, the pod and service address ranges,
//!   conntrack lifetimes, the clock).
//! - `SERVICE_NAMES`: service id → name, for inspection tools; created and
//!   written by the agent, never read by the datapath.
//!
//! IPv6 has twins of the maps that hold addresses (`*_V6`, the same generic
//! types over `Ipv6`) and `DATAPATH_CONFIG_V6` for the node's IPv6
//! settings; the rest serve both families.
use core::net::Ipv4Addr;

/// Implements `aya::Pod`, which user space's map handles require, for map
/// types of this module.
macro_rules! user_pod {
    ($($ty:ty),+ $(,)?) => {
        #[cfg(feature = "user")]
        const _: () = {
            // The safety argument below rests on this bound, so it is checked.
            const fn derives_pod<T: bytemuck::Pod>() {}
            $(derives_pod::<$ty>();)+
            // SAFETY: all of these are `bytemuck::Pod`: plain old data with no
            // padding, valid for any bit pattern.
            $(unsafe impl aya::Pod for $ty {})+
        };
    };
}

/// Implements `bytemuck::Pod` (and `aya::Pod` in user space) for the IPv4
/// and IPv6 versions of a map type generic over its address. The derive
/// cannot check a generic struct for padding, so each version's size is
/// asserted against the sum of its fields' sizes (`$v4`, `$v6` bytes):
/// with no padding, any bit pattern is a valid value.
macro_rules! pod_for_both_families {
    ($($ty:ident: $v4:expr, $v6:expr;)+) => {
        $(
            const _: () = assert!(size_of::<$ty<u32>>() == $v4, "IPv4 layout has padding or changed");
            const _: () = assert!(size_of::<$ty<$crate::Ipv6>>() == $v6, "IPv6 layout has padding or changed");
            // SAFETY: `#[repr(C)]`, every field `Pod`, and the sizes above
            // equal the sums of the field sizes: no padding bytes.
            unsafe impl bytemuck::Pod for $ty<u32> {}
            // SAFETY: as above.
            unsafe impl bytemuck::Pod for $ty<$crate::Ipv6> {}
            user_pod!($ty<u32>, $ty<$crate::Ipv6>);
        )+
    };
}

mod address;
mod config;
mod conntrack;
mod fragments;
mod service;
mod socket;

pub use address::*;
pub use config::*;
pub use conntrack::*;
pub use fragments::*;
pub use service::*;
pub use socket::*;

/// The maps' names: as lb-ebpf declares them (all but `SERVICE_NAMES`) and
/// as the agent pins them.
pub const MAP_SERVICE_FRONTENDS: &str = "SERVICE_FRONTENDS";
pub const MAP_SERVICE_VIPS: &str = "SERVICE_VIPS";
pub const MAP_BACKEND_SLOTS: &str = "BACKEND_SLOTS";
pub const MAP_BACKEND_SET_MEMBERS: &str = "BACKEND_SET_MEMBERS";
pub const MAP_SERVICE_BACKEND_SETS: &str = "SERVICE_BACKEND_SETS";
pub const MAP_CONNTRACK_TCP: &str = "CONNTRACK_TCP";
pub const MAP_CONNTRACK_UDP: &str = "CONNTRACK_UDP";
pub const MAP_CONNTRACK_TCP_PENDING: &str = "CONNTRACK_TCP_PENDING";
/// The conntrack tables, with the protocol each holds.
pub const CONNTRACK_MAPS: [(&str, u8); 3] =
    [(MAP_CONNTRACK_TCP, IPPROTO_TCP), (MAP_CONNTRACK_UDP, IPPROTO_UDP), (MAP_CONNTRACK_TCP_PENDING, IPPROTO_TCP)];
pub const MAP_SNAT_PORT_CURSOR: &str = "SNAT_PORT_CURSOR";
pub const MAP_FRAGMENT_PORTS: &str = "FRAGMENT_PORTS";
pub const MAP_SERVICE_COUNTERS: &str = "SERVICE_COUNTERS";
pub const MAP_VERDICT_COUNTERS: &str = "VERDICT_COUNTERS";
pub const MAP_DATAPATH_CONFIG: &str = "DATAPATH_CONFIG";
pub const MAP_SESSION_AFFINITY: &str = "SESSION_AFFINITY";
pub const MAP_LB_SOURCE_RANGES: &str = "LB_SOURCE_RANGES";
pub const MAP_SOCKET_REVNAT: &str = "SOCKET_REVNAT";
pub const MAP_SOCKET_BACKENDS: &str = "SOCKET_BACKENDS";
pub const MAP_SERVICE_NAMES: &str = "SERVICE_NAMES";

/// The IPv6 twins of the maps keyed or valued by an address: the same
/// types over `Ipv6`, the same meaning. Service ids and backend set ids are
/// one space over both families (a dual-stack service's two families are
/// two services to the datapath, as to kube-proxy's two proxiers), so
/// `SERVICE_BACKEND_SETS`, the counters and `SERVICE_NAMES` serve both.
pub const MAP_SERVICE_FRONTENDS_V6: &str = "SERVICE_FRONTENDS_V6";
pub const MAP_SERVICE_VIPS_V6: &str = "SERVICE_VIPS_V6";
pub const MAP_BACKEND_SLOTS_V6: &str = "BACKEND_SLOTS_V6";
pub const MAP_BACKEND_SET_MEMBERS_V6: &str = "BACKEND_SET_MEMBERS_V6";
pub const MAP_CONNTRACK_TCP_V6: &str = "CONNTRACK_TCP_V6";
pub const MAP_CONNTRACK_UDP_V6: &str = "CONNTRACK_UDP_V6";
pub const MAP_CONNTRACK_TCP_PENDING_V6: &str = "CONNTRACK_TCP_PENDING_V6";
/// The IPv6 conntrack tables, with the protocol each holds.
pub const CONNTRACK_MAPS_V6: [(&str, u8); 3] =
    [(MAP_CONNTRACK_TCP_V6, IPPROTO_TCP), (MAP_CONNTRACK_UDP_V6, IPPROTO_UDP), (MAP_CONNTRACK_TCP_PENDING_V6, IPPROTO_TCP)];
pub const MAP_SESSION_AFFINITY_V6: &str = "SESSION_AFFINITY_V6";
pub const MAP_LB_SOURCE_RANGES_V6: &str = "LB_SOURCE_RANGES_V6";
pub const MAP_DATAPATH_CONFIG_V6: &str = "DATAPATH_CONFIG_V6";
/// Every map of the IPv6 twins.
pub const IPV6_MAPS: [&str; 10] = [
    MAP_SERVICE_FRONTENDS_V6,
    MAP_SERVICE_VIPS_V6,
    MAP_BACKEND_SLOTS_V6,
    MAP_BACKEND_SET_MEMBERS_V6,
    MAP_CONNTRACK_TCP_V6,
    MAP_CONNTRACK_UDP_V6,
    MAP_CONNTRACK_TCP_PENDING_V6,
    MAP_SESSION_AFFINITY_V6,
    MAP_LB_SOURCE_RANGES_V6,
    MAP_DATAPATH_CONFIG_V6,
];
/// Each CPU's room for building a new flow's entries, per family: no
/// state outlives a program run.
pub const MAP_NEW_FLOW_SCRATCH: &str = "NEW_FLOW_SCRATCH";
pub const MAP_NEW_FLOW_SCRATCH_V6: &str = "NEW_FLOW_SCRATCH_V6";

/// Program names, as the `#[classifier]`/`#[xdp]` functions are called.
pub const PROG_TC_INGRESS: &str = "lb_tc_ingress";
pub const PROG_XDP: &str = "lb_xdp";
/// An XDP program that returns XDP_PASS at once: the benchmark floor.
pub const PROG_XDP_FLOOR: &str = "lb_xdp_floor";
/// The socket-level programs for the node's own processes (cgroup hooks).
pub const PROG_SOCK_CONNECT4: &str = "lb_sock_connect4";
pub const PROG_SOCK_SENDMSG4: &str = "lb_sock_sendmsg4";
pub const PROG_SOCK_RECVMSG4: &str = "lb_sock_recvmsg4";
pub const PROG_SOCK_GETPEERNAME4: &str = "lb_sock_getpeername4";

/// A read-only global of the socket programs, set before loading: 1 where
/// the kernel has `bpf_set_retval` (5.18). The verifier reads it as a
/// constant, so on older kernels it never reaches the call it would reject.
pub const GLOBAL_SOCK_SET_RETVAL: &str = "LB_SOCK_SET_RETVAL";

pub const MAX_FRONTENDS: u32 = 65_536;
pub const MAX_VIPS: u32 = 65_536;
pub const MAX_BACKEND_SLOTS: u32 = 262_144;
/// Service ids index `SERVICE_COUNTERS`, so they are below this bound.
pub const MAX_SERVICES: u32 = 65_536;
/// Entries of each conntrack table (two per translated flow).
pub const MAX_CONNTRACK_ENTRIES: u32 = 524_288;
/// Entries of `CONNTRACK_TCP_PENDING` (two per unanswered connection).
pub const MAX_PENDING_ENTRIES: u32 = 131_072;
pub const MAX_AFFINITY_ENTRIES: u32 = 131_072;
/// Fragmented datagrams in flight whose later fragments can be translated.
pub const MAX_FRAGMENT_ENTRIES: u32 = 8_192;
pub const MAX_SOCKET_REVNAT_ENTRIES: u32 = 131_072;
/// Unconnected UDP sockets' backends, per (socket, frontend).
pub const MAX_SOCKET_BACKEND_ENTRIES: u32 = 131_072;
/// Address ranges of `loadBalancerSourceRanges`, over all services.
pub const MAX_SOURCE_RANGES: u32 = 16_384;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// An IPv4 address in network byte order, as stored in the maps.
#[inline(always)]
pub const fn ip_be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// The address behind a network-byte-order value from the maps.
#[inline(always)]
pub const fn ip_from_be(ip: u32) -> Ipv4Addr {
    let o = ip.to_ne_bytes();
    Ipv4Addr::new(o[0], o[1], o[2], o[3])
}
