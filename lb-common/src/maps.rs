//! Keys and values of the BPF maps, and the map names both sides use.
//!
//! How the maps fit together (see docs/architecture.md):
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
//! - `CONNTRACK`: LRU, wire 5-tuple → the translation for that direction.
//! - `SERVICE_COUNTERS`, `VERDICT_COUNTERS`: per-CPU counters.
//! - `SESSION_AFFINITY`: LRU, (client, service) → the backend its new
//!   connections stick to and when it last opened one.
//! - `SOCKET_REVNAT`: LRU, (socket cookie, backend) → frontend, for the
//!   node's own sockets translated at connect/send time.
//! - `DATAPATH_CONFIG`: one entry, the node's settings (the address source
//!   NAT uses and its port range).
use bytemuck::{Pod, Zeroable};
use core::net::{Ipv4Addr, SocketAddrV4};

use crate::{checksum, lifecycle::ConntrackLifetimes};

pub const MAP_SERVICE_FRONTENDS: &str = "SERVICE_FRONTENDS";
pub const MAP_SERVICE_VIPS: &str = "SERVICE_VIPS";
pub const MAP_BACKEND_SLOTS: &str = "BACKEND_SLOTS";
pub const MAP_BACKEND_SET_MEMBERS: &str = "BACKEND_SET_MEMBERS";
pub const MAP_SERVICE_BACKEND_SETS: &str = "SERVICE_BACKEND_SETS";
/// Conntrack, one table per protocol: the churn of short UDP flows (DNS)
/// never evicts an idle TCP connection's entry, as Cilium keeps its TCP
/// and "any" tables apart.
pub const MAP_CONNTRACK_TCP: &str = "CONNTRACK_TCP";
pub const MAP_CONNTRACK_UDP: &str = "CONNTRACK_UDP";
/// TCP flows opened by a SYN and not answered yet: their own table, so a
/// SYN flood never evicts an established connection.
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
/// Service id → name, for inspection tools; created and written by the
/// agent, never read by the datapath.
pub const MAP_SERVICE_NAMES: &str = "SERVICE_NAMES";

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

/// `ConntrackValue::direction`: the client → service direction, translated
/// to the backend.
pub const CT_FORWARD: u8 = 1;
/// `ConntrackValue::direction`: the backend → client direction, translated
/// back to the service address.
pub const CT_REPLY: u8 = 2;

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

/// A service frontend: the address, port and protocol clients connect to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FrontendKey {
    /// Network byte order.
    pub ip: u32,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl FrontendKey {
    pub const fn new(ip: Ipv4Addr, port: u16, proto: u8) -> Self {
        Self { ip: ip_be(ip), port: port.to_be(), proto, _pad: 0 }
    }
}

/// Which service a frontend belongs to and the backend set it uses now.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FrontendValue {
    /// Index into `SERVICE_COUNTERS`; key prefix of `SERVICE_BACKENDS`.
    pub service_id: u32,
    /// Key prefix of `BACKEND_SLOTS`.
    pub backend_set: u32,
    /// Slots `0..backend_count` of the set are filled; with 0, traffic is
    /// rejected (or dropped, with `FRONTEND_DROP_WHEN_EMPTY`).
    pub backend_count: u32,
    /// `FRONTEND_*` bits.
    pub flags: u32,
    /// sessionAffinity ClientIP: a client's new connections go to the
    /// backend of its last one while no more than this many seconds passed
    /// between them; 0 without affinity.
    pub affinity_seconds: u32,
    /// The external side of an externalTrafficPolicy Local service: clients
    /// inside the cluster (pods, by `DatapathConfig::cluster_cidrs`, and the
    /// node's own processes) are served as through the service's cluster
    /// IP frontend, this address and port (network byte order), as
    /// kube-proxy sends "pod traffic for external destinations" to the
    /// cluster policy. 0: everyone is served by this frontend.
    pub in_cluster_ip: u32,
    pub in_cluster_port: u16,
    pub _pad: u16,
}

/// `FrontendValue::flags`: with no backends, drop instead of rejecting
/// (kube-proxy's behaviour for internalTrafficPolicy Local without a local
/// endpoint).
pub const FRONTEND_DROP_WHEN_EMPTY: u32 = 1;
/// `FrontendValue::flags`: translate the source of new flows to the node's
/// address (`DatapathConfig::snat_ip`), so that replies come back through
/// this node: external traffic with externalTrafficPolicy Cluster.
pub const FRONTEND_SNAT: u32 = 2;
/// `FrontendValue::flags`: a load balancer IP of a service with
/// `loadBalancerSourceRanges`: new connections only from a source in one of
/// the service's ranges (`LB_SOURCE_RANGES`), others are dropped.
pub const FRONTEND_SOURCE_RANGES: u32 = 4;

/// `LB_SOURCE_RANGES` key data, behind the LPM trie's prefix length: the
/// service id, then the address (network byte order). An entry's prefix
/// length is 32 (the whole id) plus the range's; a lookup's is 64, so the
/// longest match is within the service's own ranges.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SourceRangeKey {
    pub service_id: u32,
    pub ip: u32,
}

impl SourceRangeKey {
    /// The LPM trie prefix length of a range of `range_len` bits.
    pub const fn prefix_len(range_len: u8) -> u32 {
        32 + range_len as u32
    }
}

/// A client of a service with session affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    /// The client: its address (network byte order) for packets and the
    /// node's own processes; for a socket of another network namespace (a
    /// pod in a child cgroup of the socket programs'), that namespace's
    /// cookie with `AFFINITY_CLIENT_NETNS` set.
    pub client: u64,
    pub service_id: u32,
    pub _pad: u32,
}

/// `AffinityKey::client` of a network namespace's sockets, not an address.
pub const AFFINITY_CLIENT_NETNS: u64 = 1 << 63;

/// The backend a client's connections stick to, and when it last opened
/// one (`bpf_ktime_get_ns`, monotonic).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct AffinityValue {
    pub backend: Backend,
    pub last_used_ns: u64,
}

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

/// The frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SocketRevNatValue {
    /// Network byte order.
    pub frontend_ip: u32,
    /// Network byte order.
    pub frontend_port: u16,
    pub _pad: u16,
}

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

/// A service address: how many frontends it has, and `VIP_*` bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct VipValue {
    pub frontends: u32,
    pub flags: u32,
}

/// `VipValue::flags`: traffic to a port the address does not serve is
/// rejected, and malformed packets and fragments to it dropped (cluster
/// IPs, which nothing else answers). Without it such packets pass, for the
/// node itself or whatever else owns the address.
pub const VIP_CLUSTER_IP: u32 = 1;

/// The node's datapath settings: `DATAPATH_CONFIG`'s one entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DatapathConfig {
    /// The address external traffic (externalTrafficPolicy Cluster) and
    /// hairpin traffic is translated to, network byte order; 0: no source
    /// translation configured, such flows are dropped.
    pub snat_ip: u32,
    /// Source ports for translated flows, host byte order, inclusive. Above
    /// Linux's default ephemeral range (32768-60999), so they do not collide
    /// with the node's own connections.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `DATAPATH_*` bits.
    pub flags: u32,
    /// The pod address ranges: sources in them are inside the cluster
    /// (`FrontendValue::in_cluster_ip`).
    pub cluster_cidrs: Ipv4Cidrs,
    /// The service address ranges: a new connection to an address in them
    /// that no service has is dropped (kube-proxy's "Drop traffic to
    /// unallocated ClusterIPs").
    pub service_cidrs: Ipv4Cidrs,
    /// How long conntrack entries live without traffic, by state.
    pub ct_lifetimes: ConntrackLifetimes,
    /// `KERNEL_FALLBACK_*` bits: the older mechanisms the agent uses where
    /// the kernel lacks a feature (or was told to), for inspection tools;
    /// the datapath does not read it.
    pub kernel_fallbacks: u32,
    /// How the datapath reads the monotonic clock: from jiffies, which the
    /// verifier inlines into one load.
    pub clock: DatapathClock,
    /// The node's own network namespace cookie (SO_NETNS_COOKIE, Linux
    /// 5.14): sockets of other namespaces are clients of their own for
    /// session affinity. 0 where unknown: every socket is the node's.
    pub host_netns_cookie: u64,
}

/// jiffies → monotonic clock ticks (`lifecycle`): `(jiffies -
/// jiffies_base) * ns_per_jiffy >> TICK_SHIFT`, the kernel's tick
/// counter turned into CLOCK_MONOTONIC time (to within one tick). Found by
/// the agent, which knows the kernel's HZ; with `ns_per_jiffy` 0 the
/// datapath reads the monotonic clock instead (`bpf_ktime_get_ns`, a
/// helper call).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DatapathClock {
    /// jiffies when CLOCK_MONOTONIC read 0.
    pub jiffies_base: u64,
    /// 1e9 / HZ, rounded as the kernel's TICK_NSEC.
    pub ns_per_jiffy: u32,
    pub _pad: u32,
}

impl DatapathClock {
    /// The monotonic clock in ticks at `jiffies`.
    #[inline(always)]
    pub const fn ticks(&self, jiffies: u64) -> u32 {
        ((jiffies.wrapping_sub(self.jiffies_base).wrapping_mul(self.ns_per_jiffy as u64)) >> crate::lifecycle::TICK_SHIFT) as u32
    }
}

/// `DatapathConfig::flags`: answer ICMP echo requests to cluster IPs.
pub const DATAPATH_ANSWER_ECHO: u32 = 1;
/// `DatapathConfig::flags`: translate the source of every new flow to a
/// cluster IP to the node (kube-proxy's `--masquerade-all`). Without it,
/// only sources outside `cluster_cidrs` are (when ranges are configured).
pub const DATAPATH_MASQUERADE_ALL: u32 = 2;
/// `DatapathConfig::flags`: the socket programs translate only the node's
/// own sockets (`host_netns_cookie`'s namespace); pods' connections are
/// translated per packet at tc, so they keep the cluster IP as their peer
/// (what a service mesh's sidecar needs to see).
pub const DATAPATH_SOCKET_LB_HOST_ONLY: u32 = 4;

/// `DatapathConfig::kernel_fallbacks`: tc programs attached as a cls_bpf
/// filter on a clsact qdisc, not with tcx links (Linux 6.6).
pub const KERNEL_FALLBACK_TC_NETLINK: u32 = 1;
/// A refused connect fails with EPERM, not ECONNREFUSED: no
/// `bpf_set_retval` (Linux 5.18).
pub const KERNEL_FALLBACK_CONNECT_EPERM: u32 = 1 << 1;
/// The socket programs could not be loaded: the node's own processes do
/// not reach services.
pub const KERNEL_FALLBACK_NO_SOCKET_LB: u32 = 1 << 2;

/// How many address ranges an `Ipv4Cidrs` holds.
pub const MAX_CIDRS: usize = 4;

/// An IPv4 address range, network byte order: `ip & mask == network`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Ipv4Cidr {
    pub network: u32,
    pub mask: u32,
}

impl Ipv4Cidr {
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Self {
        let mask = if prefix_len == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix_len.min(32))) };
        Self { network: (u32::from(network) & mask).to_be(), mask: mask.to_be() }
    }

    #[inline(always)]
    pub const fn contains(&self, ip_be: u32) -> bool {
        ip_be & self.mask == self.network
    }
}

/// As written: `10.96.0.0/12`.
impl core::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let network = Ipv4Addr::from(u32::from_be(self.network));
        write!(f, "{network}/{}", u32::from_be(self.mask).count_ones())
    }
}

/// Up to `MAX_CIDRS` address ranges: the first `count` are used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Ipv4Cidrs {
    pub count: u32,
    pub ranges: [Ipv4Cidr; MAX_CIDRS],
}

impl Ipv4Cidrs {
    /// The ranges, at most `MAX_CIDRS` of them (the caller checks).
    pub fn new(ranges: impl IntoIterator<Item = Ipv4Cidr>) -> Self {
        let mut cidrs = Self::default();
        for (slot, range) in cidrs.ranges.iter_mut().zip(ranges) {
            *slot = range;
            cidrs.count += 1;
        }
        cidrs
    }

    /// Whether `ip` (network byte order) is in one of the ranges.
    #[inline(always)]
    pub fn contains(&self, ip: u32) -> bool {
        let mut i = 0;
        // A counted loop the verifier can bound.
        while i < MAX_CIDRS {
            if (i as u32) < self.count && self.ranges[i].contains(ip) {
                return true;
            }
            i += 1;
        }
        false
    }
}

pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct BackendSlotKey {
    pub backend_set: u32,
    pub slot: u32,
}

/// A backend endpoint: the address and target port traffic is sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Backend {
    /// Network byte order.
    pub ip: u32,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

impl Backend {
    pub const fn new(ip: Ipv4Addr, port: u16) -> Self {
        Self { ip: ip_be(ip), port: port.to_be(), _pad: 0 }
    }
}

/// A backend's membership in a backend set; the value is its slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct BackendSetMemberKey {
    pub backend: Backend,
    pub backend_set: u32,
}

/// `BACKEND_SET_MEMBERS` value of a draining endpoint: a member for its
/// established flows, not in any slot.
pub const DRAINING_SLOT: u32 = u32::MAX;

/// `SERVICE_BACKEND_SETS` value of a service id not in use: set ids start
/// at 1, so no flow's remembered set matches it.
pub const NO_BACKEND_SET: u32 = 0;

/// A packet's 5-tuple as seen on the wire at the hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ConntrackKey {
    /// Network byte order.
    pub src_ip: u32,
    /// Network byte order.
    pub dst_ip: u32,
    /// Network byte order.
    pub src_port: u16,
    /// Network byte order.
    pub dst_port: u16,
    pub proto: u8,
    // Two fields rather than [u8; 3]: zeroing an odd-sized array compiles to
    // a memset call on BPF, two plain stores here.
    pub _pad: u8,
    pub _pad2: u16,
}

/// What to do with a packet whose 5-tuple matches the key: the addresses
/// and ports it leaves with, and what rewriting them changes in the
/// checksums, worked out once when the flow is recorded so that every
/// later packet only copies and adds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ConntrackValue {
    /// The source after translation: unchanged, the service frontend
    /// (`CT_REPLY`), or the node's address (`CT_FORWARD` with source NAT).
    /// Network byte order; the two addresses in IPv4 header order.
    pub src_ip: u32,
    /// The destination after translation: the backend (`CT_FORWARD`), or
    /// the client again (`CT_REPLY` with source NAT). Network byte order.
    pub dst_ip: u32,
    /// Network byte order; the two ports in TCP/UDP header order.
    pub src_port: u16,
    /// Network byte order.
    pub dst_port: u16,
    /// What the address rewrite adds to the IPv4 header checksum and,
    /// through the pseudo-header, to the TCP/UDP checksum (folded one's
    /// complement, see `checksum`).
    pub addr_csum_delta: u16,
    /// What the port rewrite adds to the TCP/UDP checksum.
    pub port_csum_delta: u16,
    pub service_id: u32,
    /// `CT_FORWARD`: the backend set the backend was last found in; while
    /// it is the service's current set, the backend still serves.
    pub backend_set: u32,
    /// `CT_FORWARD` or `CT_REPLY`.
    pub direction: u8,
    /// The flow's state, `lifecycle::FLOW_*` bits; the same in both of its
    /// entries.
    pub flow_flags: u8,
    /// Both changes as one, for a complete TCP/UDP checksum (XDP); a
    /// partial one (tc) takes the two apart.
    pub l4_csum_delta: u16,
    /// When the entry dies without further traffic, in monotonic clock
    /// ticks (`lifecycle`): at or after it the entry is a miss, and the
    /// agent's garbage collection deletes it.
    pub expires: u32,
}

/// An address and port, network byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: u32,
    pub port: u16,
}

impl ConntrackKey {
    /// The key of a packet from `src` to `dst`.
    pub const fn new(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> Self {
        Self { src_ip: ip_be(*src.ip()), dst_ip: ip_be(*dst.ip()), src_port: src.port().to_be(), dst_port: dst.port().to_be(), proto, _pad: 0, _pad2: 0 }
    }

    /// Where the packet comes from.
    #[inline(always)]
    pub const fn source(&self) -> Endpoint {
        Endpoint { ip: self.src_ip, port: self.src_port }
    }

    /// Where the packet goes.
    #[inline(always)]
    pub const fn destination(&self) -> Endpoint {
        Endpoint { ip: self.dst_ip, port: self.dst_port }
    }
}

impl From<SocketAddrV4> for Endpoint {
    fn from(addr: SocketAddrV4) -> Self {
        Endpoint { ip: ip_be(*addr.ip()), port: addr.port().to_be() }
    }
}

impl From<Backend> for Endpoint {
    #[inline(always)]
    fn from(backend: Backend) -> Self {
        Endpoint { ip: backend.ip, port: backend.port }
    }
}

impl From<Endpoint> for Backend {
    #[inline(always)]
    fn from(endpoint: Endpoint) -> Self {
        Backend { ip: endpoint.ip, port: endpoint.port, _pad: 0 }
    }
}

impl ConntrackValue {
    /// The entry that rewrites packets of `key` to come from `src` and go
    /// to `dst`, with the checksum changes that rewrite makes.
    #[inline(always)]
    pub const fn translating(key: &ConntrackKey, src: Endpoint, dst: Endpoint, service_id: u32, backend_set: u32, direction: u8) -> Self {
        let addr_csum_delta = checksum::fold(checksum::delta_u32(key.src_ip, src.ip) + checksum::delta_u32(key.dst_ip, dst.ip));
        let port_csum_delta = checksum::fold(checksum::delta_u16(key.src_port, src.port) + checksum::delta_u16(key.dst_port, dst.port));
        ConntrackValue {
            src_ip: src.ip,
            dst_ip: dst.ip,
            src_port: src.port,
            dst_port: dst.port,
            addr_csum_delta,
            port_csum_delta,
            service_id,
            backend_set,
            direction,
            flow_flags: 0,
            l4_csum_delta: checksum::fold(addr_csum_delta as u32 + port_csum_delta as u32),
            expires: 0,
        }
    }

    /// The conntrack key of the flow's other direction: the packets that
    /// answer this entry's translated ones.
    #[inline(always)]
    pub const fn partner_key(&self, proto: u8) -> ConntrackKey {
        ConntrackKey { src_ip: self.dst_ip, dst_ip: self.src_ip, src_port: self.dst_port, dst_port: self.src_port, proto, _pad: 0, _pad2: 0 }
    }

    /// The entry of the flow's other direction, for an entry of `key`: its
    /// packets leave as the reverse of `key`.
    #[inline(always)]
    pub const fn partner(&self, key: &ConntrackKey) -> ConntrackValue {
        let direction = if self.direction == CT_REPLY { CT_FORWARD } else { CT_REPLY };
        let mut partner = Self::translating(&self.partner_key(key.proto), key.destination(), key.source(), self.service_id, 0, direction);
        partner.flow_flags = self.flow_flags;
        partner.expires = self.expires;
        partner
    }

    /// Whether `other`, found under this entry's `partner_key`, is this
    /// flow's other direction (and not another flow's that took the tuple).
    #[inline(always)]
    pub const fn pairs_with(&self, key: &ConntrackKey, other: &ConntrackValue) -> bool {
        other.src_ip == key.dst_ip && other.dst_ip == key.src_ip && other.src_port == key.dst_port && other.dst_port == key.src_port
    }

    /// Where a packet of this entry's flow goes after translation (the
    /// backend, for `CT_FORWARD`).
    #[inline(always)]
    pub const fn destination(&self) -> Endpoint {
        Endpoint { ip: self.dst_ip, port: self.dst_port }
    }

    /// Where a packet of this entry's flow seems to come from after
    /// translation (the service frontend, for `CT_REPLY`).
    #[inline(always)]
    pub const fn source(&self) -> Endpoint {
        Endpoint { ip: self.src_ip, port: self.src_port }
    }
}

/// Per-service counters, one slot per CPU, summed by user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceCounters {
    /// Packets translated in either direction.
    pub packets: u64,
    /// Bytes (from the IP header on) translated in either direction.
    pub bytes: u64,
    /// Connections assigned a backend (including re-assignments after the
    /// backend left).
    pub new_flows: u64,
    /// Packets answered with a TCP reset or ICMP port unreachable.
    pub rejected: u64,
}

/// A service port's name ("namespace/name:port") and protocol, for
/// `SERVICE_NAMES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceName {
    /// UTF-8, `len` bytes used.
    pub text: [u8; SERVICE_NAME_MAX],
    pub len: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Kubernetes names: namespace and service up to 63 bytes each, port name
/// up to 15, and the separators.
pub const SERVICE_NAME_MAX: usize = 156;

impl ServiceName {
    /// The name, cut at `SERVICE_NAME_MAX` bytes.
    pub fn new(name: &str, proto: u8) -> Self {
        let mut text = [0u8; SERVICE_NAME_MAX];
        let mut len = name.len().min(SERVICE_NAME_MAX);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        text[..len].copy_from_slice(&name.as_bytes()[..len]);
        Self { text, len: len as u16, proto, _pad: 0 }
    }

    pub fn as_str(&self) -> &str {
        let len = usize::from(self.len).min(SERVICE_NAME_MAX);
        core::str::from_utf8(&self.text[..len]).unwrap_or("?")
    }
}

impl core::ops::Add for ServiceCounters {
    type Output = Self;

    /// Sums two CPUs' slots.
    fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
            new_flows: self.new_flows + other.new_flows,
            rejected: self.rejected + other.rejected,
        }
    }
}

const _: () = {
    assert!(size_of::<FrontendKey>() == 8);
    assert!(size_of::<FrontendValue>() == 28);
    assert!(size_of::<SourceRangeKey>() == 8);
    assert!(size_of::<AffinityKey>() == 16);
    assert!(size_of::<SocketRevNatKey>() == 16);
    assert!(size_of::<SocketBackendKey>() == 16);
    assert!(size_of::<SocketRevNatValue>() == 8);
    assert!(size_of::<AffinityValue>() == 16);
    assert!(size_of::<BackendSlotKey>() == 8);
    assert!(size_of::<Backend>() == 8);
    assert!(size_of::<BackendSetMemberKey>() == 12);
    assert!(size_of::<ConntrackKey>() == 16);
    assert!(size_of::<ConntrackValue>() == 32);
    assert!(size_of::<VipValue>() == 8);
    assert!(size_of::<FragmentKey>() == 12);
    assert!(size_of::<DatapathConfig>() == 12 + 2 * size_of::<Ipv4Cidrs>() + size_of::<ConntrackLifetimes>() + 4 + size_of::<DatapathClock>() + 8);
    assert!(size_of::<DatapathClock>() == 16);
    assert!(size_of::<Ipv4Cidrs>() == 4 + 8 * MAX_CIDRS);
    assert!(size_of::<Ipv4Cidr>() == 8);
    assert!(size_of::<ServiceCounters>() == 32);
    assert!(size_of::<ServiceName>() == 160);
    assert!(align_of::<ConntrackKey>() == 4);
    assert!(align_of::<ServiceCounters>() == 8);
};

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are `bytemuck::Pod`: plain old data with no
    // padding, valid for any bit pattern.
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for SocketBackendKey {}
    unsafe impl aya::Pod for FrontendValue {}
    unsafe impl aya::Pod for BackendSlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for BackendSetMemberKey {}
    unsafe impl aya::Pod for ConntrackKey {}
    unsafe impl aya::Pod for ConntrackValue {}
    unsafe impl aya::Pod for ServiceCounters {}
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for VipValue {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for SocketRevNatKey {}
    unsafe impl aya::Pod for SocketRevNatValue {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for DatapathClock {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_ranges_contain_what_their_prefix_covers() {
        let ip = |a: [u8; 4]| ip_be(a.into());
        let pods = Ipv4Cidrs::new([Ipv4Cidr::new([10, 244, 0, 0].into(), 16), Ipv4Cidr::new([192, 168, 7, 9].into(), 32)]);
        let cases = [
            ("first address of a range", pods, [10, 244, 0, 0], true),
            ("last address of a range", pods, [10, 244, 255, 255], true),
            ("just past a range", pods, [10, 245, 0, 0], false),
            ("a /32 holds its one address", pods, [192, 168, 7, 9], true),
            ("a /32 holds nothing else", pods, [192, 168, 7, 8], false),
            ("no ranges hold nothing", Ipv4Cidrs::default(), [0, 0, 0, 0], false),
            ("/0 holds everything", Ipv4Cidrs::new([Ipv4Cidr::new([0, 0, 0, 0].into(), 0)]), [203, 0, 113, 1], true),
            ("bits past the prefix are ignored", Ipv4Cidrs::new([Ipv4Cidr::new([10, 96, 3, 4].into(), 16)]), [10, 96, 200, 1], true),
            ("entries past the count are unused", Ipv4Cidrs { count: 0, ..pods }, [10, 244, 1, 1], false),
        ];
        for (rule, cidrs, address, expected) in cases {
            assert_eq!(cidrs.contains(ip(address)), expected, "{rule}");
        }
    }
    use crate::checksum::{add, apply, finish, pseudo_header_sum, sum_words};

    /// An IPv4 header (20 bytes) and a TCP segment (header and payload)
    /// with correct checksums for `tuple`.
    fn segment(tuple: &ConntrackKey) -> ([u8; 20], [u8; 24]) {
        let mut ip = [0x45, 0, 0, 44, 0, 1, 0x40, 0, 64, IPPROTO_TCP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        ip[12..16].copy_from_slice(&tuple.src_ip.to_ne_bytes());
        ip[16..20].copy_from_slice(&tuple.dst_ip.to_ne_bytes());
        let ip_check = finish(sum_words(&ip, 0));
        ip[10..12].copy_from_slice(&ip_check.to_ne_bytes());
        let mut tcp = [0u8; 24];
        tcp[0..2].copy_from_slice(&tuple.src_port.to_ne_bytes());
        tcp[2..4].copy_from_slice(&tuple.dst_port.to_ne_bytes());
        tcp[12] = 5 << 4;
        tcp[20..24].copy_from_slice(b"data");
        let l4_check = finish(sum_words(&tcp, pseudo_header_sum(tuple.src_ip, tuple.dst_ip, IPPROTO_TCP, 24)));
        tcp[16..18].copy_from_slice(&l4_check.to_ne_bytes());
        (ip, tcp)
    }

    fn check_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([bytes[at], bytes[at + 1]])
    }

    fn tuple(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> ConntrackKey {
        ConntrackKey {
            src_ip: ip_be(src.0.into()),
            dst_ip: ip_be(dst.0.into()),
            src_port: src.1.to_be(),
            dst_port: dst.1.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
            _pad2: 0,
        }
    }

    /// The stored checksum changes, applied to a packet of the flow, give
    /// the checksums of the translated packet computed from scratch.
    #[test]
    fn translation_checksum_deltas_equal_recomputed_checksums() {
        let client = ([10, 0, 0, 2], 40000);
        let vip = ([10, 96, 0, 10], 80);
        let backend = ([10, 244, 1, 7], 8080);
        let node = ([10, 201, 0, 1], 61234);
        let cases = [
            ("destination NAT (forward)", tuple(client, vip), client, backend),
            ("reverse NAT (reply)", tuple(backend, client), vip, client),
            ("destination and source NAT (forward)", tuple(client, vip), node, backend),
            ("both reversed (reply with source NAT)", tuple(backend, node), vip, client),
            ("nothing changes", tuple(vip, client), vip, client),
            ("all bits flip", tuple(([0xff; 4], 0xffff), ([0xff; 4], 0xffff)), ([0; 4], 0), ([0; 4], 0)),
        ];
        for (rule, key, src, dst) in cases {
            let to = tuple(src, dst);
            let value = ConntrackValue::translating(&key, to.source(), to.destination(), 1, 1, CT_FORWARD);
            let (ip, tcp) = segment(&key);
            let (want_ip, want_tcp) = segment(&to);
            let ip_check = apply(check_at(&ip, 10), value.addr_csum_delta.into());
            let l4_check = apply(check_at(&tcp, 16), u32::from(value.addr_csum_delta) + u32::from(value.port_csum_delta));
            let l4_check_at_once = add(check_at(&tcp, 16), value.l4_csum_delta);
            // 0x0000 and 0xffff are one value in one's complement; the
            // datapath may produce either for a sum that is all ones.
            let same = |a: u16, b: u16| a == b || a | b == 0xffff && a & b == 0;
            assert!(same(ip_check, check_at(&want_ip, 10)), "{rule}: IPv4 checksum {ip_check:#x}, want {:#x}", check_at(&want_ip, 10));
            assert!(same(l4_check, check_at(&want_tcp, 16)), "{rule}: TCP checksum {l4_check:#x}, want {:#x}", check_at(&want_tcp, 16));
            assert!(same(l4_check_at_once, check_at(&want_tcp, 16)), "{rule}: TCP checksum by the combined delta {l4_check_at_once:#x}");
            assert_eq!((value.source(), value.destination()), (to.source(), to.destination()), "{rule}");
        }
    }
}
