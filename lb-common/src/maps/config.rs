//! The node's datapath settings (`DATAPATH_CONFIG`), written by the agent at start.
use bytemuck::{Pod, Zeroable};
use core::net::{Ipv4Addr, Ipv6Addr};

use super::{IpAddress, Ipv6};
use crate::lifecycle::ConntrackLifetimes;

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
const _: () = assert!(size_of::<DatapathConfig>() == 12 + 2 * size_of::<Ipv4Cidrs>() + size_of::<ConntrackLifetimes>() + 4 + size_of::<DatapathClock>() + 8);

impl DatapathConfig {
    /// Whether a new flow from `src_ip` to a cluster IP gets the node as
    /// its source, as kube-proxy masquerades it: always with
    /// `--masquerade-all`, else when pod ranges are configured and `src_ip`
    /// is in none of them (a client outside the cluster, or the node, so
    /// that the reply from an endpoint on another node comes back through
    /// this one). Never without a node address to translate to.
    #[inline(always)]
    pub fn masquerades_cluster_ip_client(&self, src_ip: u32) -> bool {
        masquerades(self.snat_ip, &self.cluster_cidrs, self.flags & DATAPATH_MASQUERADE_ALL != 0, src_ip)
    }
}

impl DatapathConfigV6 {
    /// As `DatapathConfig::masquerades_cluster_ip_client`, for an IPv6
    /// client; `masquerade_all` is `DatapathConfig`'s flag, which both
    /// families share.
    #[inline(always)]
    pub fn masquerades_cluster_ip_client(&self, src_ip: Ipv6, masquerade_all: bool) -> bool {
        masquerades(self.snat_ip, &self.cluster_cidrs, masquerade_all, src_ip)
    }
}

/// kube-proxy's masquerade rule for a client of a cluster IP, in either
/// family (`DatapathConfig::masquerades_cluster_ip_client`).
#[inline(always)]
fn masquerades<A: IpAddress + Default>(snat_ip: A, cluster_cidrs: &Cidrs<A>, masquerade_all: bool, src_ip: A) -> bool {
    !snat_ip.is_unspecified() && (masquerade_all || (cluster_cidrs.count != 0 && !cluster_cidrs.contains(src_ip)))
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
const _: () = assert!(size_of::<DatapathClock>() == 16);

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

/// The node's IPv6 settings: `DATAPATH_CONFIG_V6`'s one entry. What both
/// families share (ports, flags, lifetimes, the clock) is in
/// `DatapathConfig`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DatapathConfigV6 {
    /// As `DatapathConfig::snat_ip`, for IPv6 flows; all zero: none.
    pub snat_ip: Ipv6,
    /// As `DatapathConfig::cluster_cidrs`.
    pub cluster_cidrs: Ipv6Cidrs,
    /// As `DatapathConfig::service_cidrs`.
    pub service_cidrs: Ipv6Cidrs,
}
const _: () = assert!(size_of::<DatapathConfigV6>() == 16 + 2 * size_of::<Ipv6Cidrs>());

/// How many address ranges a `Cidrs` holds.
pub const MAX_CIDRS: usize = 4;

/// An address range, network byte order: `ip & mask == network`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Zeroable)]
pub struct Cidr<A = u32> {
    pub network: A,
    pub mask: A,
}
pub type Ipv4Cidr = Cidr<u32>;
pub type Ipv6Cidr = Cidr<Ipv6>;

impl Cidr<u32> {
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Self {
        let mask = if prefix_len == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix_len.min(32))) };
        Self { network: (u32::from(network) & mask).to_be(), mask: mask.to_be() }
    }
}

impl Cidr<Ipv6> {
    pub fn new(network: Ipv6Addr, prefix_len: u8) -> Self {
        let mask = if prefix_len == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix_len.min(128))) };
        Self { network: Ipv6::new((u128::from(network) & mask).into()), mask: Ipv6::new(mask.into()) }
    }
}

impl<A: IpAddress> Cidr<A> {
    #[inline(always)]
    pub fn contains(&self, ip: A) -> bool {
        ip.masked(self.mask) == self.network
    }
}

/// As written: `fd00:10:96::/108`.
impl core::fmt::Display for Ipv6Cidr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let bits: u32 = self.mask.0.iter().map(|w| w.count_ones()).sum();
        write!(f, "{}/{bits}", self.network.addr())
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Zeroable)]
pub struct Cidrs<A = u32>
where
    A: IpAddress,
{
    pub count: u32,
    pub _pad_v6: A::Pad,
    pub ranges: [Cidr<A>; MAX_CIDRS],
}
pub type Ipv4Cidrs = Cidrs<u32>;
pub type Ipv6Cidrs = Cidrs<Ipv6>;

impl<A: IpAddress + Default> Default for Cidrs<A> {
    fn default() -> Self {
        Self { count: 0, _pad_v6: A::Pad::default(), ranges: [Cidr::default(); MAX_CIDRS] }
    }
}

impl<A: IpAddress + Default> Cidrs<A> {
    /// The ranges, at most `MAX_CIDRS` of them (the caller checks).
    pub fn new(ranges: impl IntoIterator<Item = Cidr<A>>) -> Self {
        let mut cidrs = Self::default();
        for (slot, range) in cidrs.ranges.iter_mut().zip(ranges) {
            *slot = range;
            cidrs.count += 1;
        }
        cidrs
    }

    /// Whether `ip` (network byte order) is in one of the ranges.
    #[inline(always)]
    pub fn contains(&self, ip: A) -> bool {
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

pod_for_both_families! {
    Cidr: 8, 32;
    Cidrs: 4 + 8 * MAX_CIDRS, 8 + 32 * MAX_CIDRS;
}

user_pod!(DatapathConfig, DatapathConfigV6, DatapathClock);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ip_be;

    #[test]
    fn cluster_ip_clients_are_masqueraded_as_kube_proxy_does() {
        let ip = |a: [u8; 4]| ip_be(a.into());
        let pods = Ipv4Cidrs::new([Ipv4Cidr::new([10, 244, 0, 0].into(), 16)]);
        let node = DatapathConfig { snat_ip: ip([10, 201, 0, 1]), cluster_cidrs: pods, ..DatapathConfig::default() };
        let cases = [
            ("a pod keeps its address", node, [10, 244, 3, 7], false),
            ("a client outside --cluster-cidr is masqueraded", node, [192, 168, 1, 9], true),
            ("the node itself is masqueraded", node, [10, 201, 0, 1], true),
            ("without --cluster-cidr nobody is", DatapathConfig { cluster_cidrs: Ipv4Cidrs::default(), ..node }, [192, 168, 1, 9], false),
            ("--masquerade-all takes pods too", DatapathConfig { flags: DATAPATH_MASQUERADE_ALL, ..node }, [10, 244, 3, 7], true),
            (
                "--masquerade-all without --cluster-cidr takes everyone",
                DatapathConfig { flags: DATAPATH_MASQUERADE_ALL, cluster_cidrs: Ipv4Cidrs::default(), ..node },
                [10, 244, 3, 7],
                true,
            ),
            ("never without a node address", DatapathConfig { snat_ip: 0, flags: DATAPATH_MASQUERADE_ALL, ..node }, [192, 168, 1, 9], false),
        ];
        for (rule, config, client, masqueraded) in cases {
            assert_eq!(config.masquerades_cluster_ip_client(ip(client)), masqueraded, "{rule}");
        }
        let ip6 = |a: &str| Ipv6::new(a.parse().expect("an IPv6 address"));
        let node6 = DatapathConfigV6 {
            snat_ip: ip6("fd00:1::1"),
            cluster_cidrs: Ipv6Cidrs::new([Ipv6Cidr::new("fd00:244::".parse().expect("a range"), 48)]),
            ..DatapathConfigV6::default()
        };
        let cases6 = [
            ("IPv6: a pod keeps its address", node6, "fd00:244:0:3::7", false, false),
            ("IPv6: a client outside --cluster-cidr is masqueraded", node6, "2001:db8::9", false, true),
            ("IPv6: --masquerade-all takes pods too", node6, "fd00:244:0:3::7", true, true),
            ("IPv6: never without a node address", DatapathConfigV6 { snat_ip: Ipv6::UNSPECIFIED, ..node6 }, "2001:db8::9", true, false),
        ];
        for (rule, config, client, masquerade_all, masqueraded) in cases6 {
            assert_eq!(config.masquerades_cluster_ip_client(ip6(client), masquerade_all), masqueraded, "{rule}");
        }
    }

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
}
