//! Services: their frontends and addresses, backend sets, source ranges, session affinity, counters and names.
use bytemuck::{Pod, Zeroable};
use core::net::Ipv4Addr;

use super::{IpAddress, Ipv6, ip_be};

/// A service frontend: the address, port and protocol clients connect to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Zeroable)]
pub struct FrontendKey<A = u32>
where
    A: IpAddress,
{
    /// Network byte order.
    pub ip: A,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
    pub _pad_v6: A::Pad,
}

impl FrontendKey {
    pub const fn new(ip: Ipv4Addr, port: u16, proto: u8) -> Self {
        Self { ip: ip_be(ip), port: port.to_be(), proto, _pad: 0, _pad_v6: () }
    }
}

/// Which service a frontend belongs to and the backend set it uses now.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Zeroable)]
pub struct FrontendValue<A = u32>
where
    A: IpAddress,
{
    /// Index into `SERVICE_BACKEND_SETS` and `SERVICE_COUNTERS`; part of the
    /// keys of `LB_SOURCE_RANGES` and `SESSION_AFFINITY`.
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
    pub _pad_v6: A::Pad,
    pub in_cluster_ip: A,
    pub in_cluster_port: u16,
    pub _pad: u16,
    pub _pad_v6_end: A::Pad,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Zeroable)]
pub struct SourceRangeKey<A = u32> {
    pub service_id: u32,
    pub ip: A,
}

impl SourceRangeKey {
    /// The LPM trie prefix length of a range of `range_len` bits (either
    /// family: the service id comes first).
    pub const fn prefix_len(range_len: u8) -> u32 {
        32 + range_len as u32
    }
}

/// A client of a service with session affinity. `C` is `u64` for IPv4 and
/// `Ipv6` for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Zeroable)]
pub struct AffinityKey<C = u64> {
    /// The client: its address (network byte order) for packets and the
    /// node's own processes; for a socket of another network namespace (a
    /// pod in a child cgroup of the socket programs'), that namespace's
    /// cookie with `AFFINITY_CLIENT_NETNS` set (IPv4).
    pub client: C,
    pub service_id: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<AffinityKey>() == 16 && size_of::<AffinityKey<Ipv6>>() == 24);
// SAFETY: `#[repr(C)]`, every field `Pod`, and the sizes asserted above are
// the sums of the fields': no padding.
unsafe impl Pod for AffinityKey<u64> {}
// SAFETY: as above.
unsafe impl Pod for AffinityKey<Ipv6> {}
user_pod!(AffinityKey<u64>, AffinityKey<Ipv6>);

/// `AffinityKey::client` of a network namespace's sockets, not an address.
pub const AFFINITY_CLIENT_NETNS: u64 = 1 << 63;

/// The backend a client's connections stick to, and when it last opened
/// one (`bpf_ktime_get_ns`, monotonic).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Zeroable)]
pub struct AffinityValue<A = u32>
where
    A: IpAddress,
{
    pub backend: Backend<A>,
    /// The time as two native-order halves, low first: the bytes of a
    /// `u64`, without its 8-byte alignment, which would pad the IPv6
    /// version (a 20-byte backend).
    pub last_used_ns: [u32; 2],
}

impl<A: IpAddress> AffinityValue<A> {
    #[inline(always)]
    pub const fn new(backend: Backend<A>, last_used_ns: u64) -> Self {
        Self { backend, last_used_ns: [last_used_ns as u32, (last_used_ns >> 32) as u32] }
    }

    #[inline(always)]
    pub const fn last_used_ns(&self) -> u64 {
        self.last_used_ns[0] as u64 | (self.last_used_ns[1] as u64) << 32
    }
}

/// A service address: how many frontends it has, and `VIP_*` bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct VipValue {
    pub frontends: u32,
    pub flags: u32,
}
const _: () = assert!(size_of::<VipValue>() == 8);

/// `VipValue::flags`: traffic to a port the address does not serve is
/// rejected, and malformed packets and fragments to it dropped (cluster
/// IPs, which nothing else answers). Without it such packets pass, for the
/// node itself or whatever else owns the address.
pub const VIP_CLUSTER_IP: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct BackendSlotKey {
    pub backend_set: u32,
    pub slot: u32,
}
const _: () = assert!(size_of::<BackendSlotKey>() == 8);

/// A backend endpoint: the address and target port traffic is sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Zeroable)]
pub struct Backend<A = u32>
where
    A: IpAddress,
{
    /// Network byte order.
    pub ip: A,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
    pub _pad_v6: A::Pad,
}

impl Backend {
    pub const fn new(ip: Ipv4Addr, port: u16) -> Self {
        Self { ip: ip_be(ip), port: port.to_be(), _pad: 0, _pad_v6: () }
    }
}

/// A backend's membership in a backend set; the value is its slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Zeroable)]
pub struct BackendSetMemberKey<A = u32>
where
    A: IpAddress,
{
    pub backend: Backend<A>,
    pub backend_set: u32,
    pub _pad_v6: A::Pad,
}

impl<A: IpAddress> BackendSetMemberKey<A> {
    #[inline(always)]
    pub fn new(backend_set: u32, backend: Backend<A>) -> Self {
        Self { backend, backend_set, _pad_v6: A::Pad::default() }
    }
}

/// `BACKEND_SET_MEMBERS` value of a draining endpoint: a member for its
/// established flows, not in any slot.
pub const DRAINING_SLOT: u32 = u32::MAX;

/// `SERVICE_BACKEND_SETS` value of a service id not in use: set ids start
/// at 1, so no flow's remembered set matches it.
pub const NO_BACKEND_SET: u32 = 0;

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
const _: () = assert!(size_of::<ServiceCounters>() == 32);
const _: () = assert!(align_of::<ServiceCounters>() == 8);

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
const _: () = assert!(size_of::<ServiceName>() == 160);

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

pod_for_both_families! {
    FrontendKey: 8, 24;
    FrontendValue: 28, 48;
    AffinityValue: 16, 32;
    Backend: 8, 24;
    BackendSetMemberKey: 12, 32;
}

// An LPM trie key's data follows its 4-byte prefix length directly, so the
// IPv6 source range key holds the address as plain words, 4-aligned.
const _: () = assert!(size_of::<SourceRangeKey>() == 8 && size_of::<SourceRangeKey<[u32; 4]>>() == 20);
// SAFETY: `#[repr(C)]`, every field `Pod`, and the sizes asserted above are
// the sums of the fields': no padding.
unsafe impl Pod for SourceRangeKey<u32> {}
// SAFETY: as above.
unsafe impl Pod for SourceRangeKey<[u32; 4]> {}
user_pod!(SourceRangeKey<u32>, SourceRangeKey<[u32; 4]>);

user_pod!(VipValue, BackendSlotKey, ServiceCounters, ServiceName);
