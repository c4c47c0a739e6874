//! The two address families: which maps, settings and header layout each uses.
//!
//! The datapath is written once, generic over `Family`; each family's
//! implementation names its own twin maps (so the IPv4 path keeps its 16-byte
//! conntrack keys) and says where its addresses sit in the packet.
use core::net::{IpAddr, Ipv4Addr};

use aya_ebpf::btf_maps::lpm_trie::Key;
use lb_common::{
    AffinityKey, AffinityValue, Backend, BackendSetMemberKey, BackendSlotKey, ConntrackKey, ConntrackValue, DATAPATH_MASQUERADE_ALL, DatapathConfig,
    DatapathConfigV6, FrontendKey, FrontendValue, IPPROTO_TCP, IpAddress, Ipv6, SourceRangeKey, VipValue, checksum,
    reply::ETH_HLEN,
};

use crate::{
    context::{HelperFailed, Packet, ptr_at},
    fragments,
    maps::{
        BACKEND_SET_MEMBERS, BACKEND_SET_MEMBERS_V6, BACKEND_SLOTS, BACKEND_SLOTS_V6, CONNTRACK_TCP, CONNTRACK_TCP_PENDING,
        CONNTRACK_TCP_PENDING_V6, CONNTRACK_TCP_V6, CONNTRACK_UDP, CONNTRACK_UDP_V6, DATAPATH_CONFIG, DATAPATH_CONFIG_V6,
        LB_SOURCE_RANGES, LB_SOURCE_RANGES_V6, NEW_FLOW_SCRATCH, NEW_FLOW_SCRATCH_V6, SERVICE_FRONTENDS, SERVICE_FRONTENDS_V6, SERVICE_VIPS, SERVICE_VIPS_V6,
        SESSION_AFFINITY, SESSION_AFFINITY_V6,
    },
    parse::{Flow, Ipv4Header},
    reject::{self, RejectError},
};

/// Which conntrack table an entry is in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// The family's TCP or UDP table, by protocol.
    Confirmed,
    /// The family's pending TCP table.
    Pending,
}

/// A map refused an entry.
pub struct MapFull;

/// Where a new flow's entries are built: a per-CPU map slot rather than
/// the stack, whose 512 bytes an IPv6 flow's keys and values (and the
/// registers LLVM spills while computing them) would not fit.
pub struct NewFlowScratch<A: IpAddress> {
    pub reply_key: ConntrackKey<A>,
    pub reply: ConntrackValue<A>,
    pub forward: ConntrackValue<A>,
}

/// An address family's maps, settings and headers.
pub trait Family: IpAddress {
    /// How session affinity knows a client.
    type Client: Copy;

    /// The affinity client of packets from `ip`.
    fn client(ip: Self) -> Self::Client;

    /// The address as aya-log prints it (`{:i}`).
    fn logged(self) -> IpAddr;

    fn frontend(key: &FrontendKey<Self>) -> Option<FrontendValue<Self>>;
    fn vip(ip: Self) -> Option<VipValue>;
    fn backend_slot(key: BackendSlotKey) -> Option<Backend<Self>>;
    /// A backend's slot in a set (`DRAINING_SLOT` for a draining member).
    fn member_slot(key: BackendSetMemberKey<Self>) -> Option<u32>;
    /// Whether `ip` is in one of service `service_id`'s source ranges.
    fn in_source_ranges(service_id: u32, ip: Self) -> bool;

    fn affinity(key: &AffinityKey<Self::Client>) -> Option<*mut AffinityValue<Self>>;
    fn remember_affinity(key: &AffinityKey<Self::Client>, value: &AffinityValue<Self>);

    fn ct_lookup(table: Table, key: &ConntrackKey<Self>) -> Option<*mut ConntrackValue<Self>>;
    /// `flags`: 0, or BPF_NOEXIST to fail when the key is held.
    fn ct_insert(table: Table, key: &ConntrackKey<Self>, value: &ConntrackValue<Self>, flags: u64) -> Result<(), MapFull>;
    fn ct_remove(table: Table, key: &ConntrackKey<Self>);
    /// This CPU's `NewFlowScratch`, for this program run.
    fn scratch() -> Option<&'static mut NewFlowScratch<Self>>;

    /// The node's address for source NAT; unspecified when none.
    fn node_address() -> Self;
    /// Whether `ip` is in the configured pod ranges.
    fn is_cluster_source(ip: Self) -> bool;
    /// Whether a new flow from `src` to a cluster IP gets the node as its
    /// source (`DatapathConfig::masquerades_cluster_ip_client`).
    fn masquerades(src: Self) -> bool;
    /// Whether `ip` is in the configured service ranges.
    fn is_service_range(ip: Self) -> bool;

    /// Rewrites the packet's IP addresses to `to`'s (and the IPv4 header
    /// checksum).
    fn rewrite_addresses<P: Packet>(pkt: &P, to: &ConntrackValue<Self>) -> Result<(), HelperFailed>;

    /// Turns `flow`'s packet into its reject answer (a TCP reset or an ICMP
    /// port unreachable), for the caller to send back.
    fn reject<P: Packet>(pkt: &P, flow: &Flow<Self>) -> Result<(), RejectError>;

    /// Remembers a translated first fragment's ports for its later
    /// fragments.
    fn remember_fragment(flow: &Flow<Self>);
}

/// What `read` finds in a settings array's one slot, read in place; the
/// default when it cannot be read.
macro_rules! read_settings {
    ($map:ident, $read:expr) => {
        // SAFETY: a pointer into the array's one slot, valid for this run.
        $map.get_ptr(0).map_or_else(Default::default, |config| $read(unsafe { &*config }))
    };
}

impl Family for u32 {
    type Client = u64;

    #[inline(always)]
    fn client(ip: Self) -> u64 {
        u64::from(ip)
    }

    #[inline(always)]
    fn logged(self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from_bits(u32::from_be(self)))
    }

    #[inline(always)]
    fn frontend(key: &FrontendKey) -> Option<FrontendValue> {
        // SAFETY: the value is copied out at once; user space replaces
        // entries whole, so the copy is of one version.
        unsafe { SERVICE_FRONTENDS.get(key).copied() }
    }

    #[inline(always)]
    fn vip(ip: u32) -> Option<VipValue> {
        // SAFETY: copied out at once.
        SERVICE_VIPS.get_ptr(ip).map(|v| unsafe { *v })
    }

    #[inline(always)]
    fn backend_slot(key: BackendSlotKey) -> Option<Backend> {
        // SAFETY: copied out at once; sets are immutable once a frontend
        // points at them.
        unsafe { BACKEND_SLOTS.get(key).copied() }
    }

    #[inline(always)]
    fn member_slot(key: BackendSetMemberKey) -> Option<u32> {
        // SAFETY: a pointer into a map value, read at once.
        BACKEND_SET_MEMBERS.get_ptr(key).map(|slot| unsafe { *slot })
    }

    #[inline(always)]
    fn in_source_ranges(service_id: u32, ip: u32) -> bool {
        LB_SOURCE_RANGES.get(&Key::new(SourceRangeKey::prefix_len(32), SourceRangeKey { service_id, ip })).is_some()
    }

    #[inline(always)]
    fn affinity(key: &AffinityKey) -> Option<*mut AffinityValue> {
        SESSION_AFFINITY.get_ptr_mut(key)
    }

    #[inline(always)]
    fn remember_affinity(key: &AffinityKey, value: &AffinityValue) {
        // A client whose affinity cannot be stored still gets its backend.
        let _best_effort = SESSION_AFFINITY.insert(key, value, 0);
    }

    #[inline(always)]
    fn ct_lookup(table: Table, key: &ConntrackKey) -> Option<*mut ConntrackValue> {
        // One call site per map: the verifier inlines a lookup only where
        // the map is known.
        match table {
            Table::Pending => CONNTRACK_TCP_PENDING.get_ptr_mut(key),
            Table::Confirmed if key.proto == IPPROTO_TCP => CONNTRACK_TCP.get_ptr_mut(key),
            Table::Confirmed => CONNTRACK_UDP.get_ptr_mut(key),
        }
    }

    #[inline(always)]
    fn ct_insert(table: Table, key: &ConntrackKey, value: &ConntrackValue, flags: u64) -> Result<(), MapFull> {
        let stored = match table {
            Table::Pending => CONNTRACK_TCP_PENDING.insert(key, value, flags),
            Table::Confirmed if key.proto == IPPROTO_TCP => CONNTRACK_TCP.insert(key, value, flags),
            Table::Confirmed => CONNTRACK_UDP.insert(key, value, flags),
        };
        stored.map_err(|_| MapFull)
    }

    #[inline(always)]
    fn ct_remove(table: Table, key: &ConntrackKey) {
        let _already_gone = match table {
            Table::Pending => CONNTRACK_TCP_PENDING.remove(key),
            Table::Confirmed if key.proto == IPPROTO_TCP => CONNTRACK_TCP.remove(key),
            Table::Confirmed => CONNTRACK_UDP.remove(key),
        };
    }

    #[inline(always)]
    fn scratch() -> Option<&'static mut NewFlowScratch<u32>> {
        // SAFETY: this CPU's slot, used by one program run at a time (a
        // run is not preempted on its CPU) and only while it runs.
        NEW_FLOW_SCRATCH.get_ptr_mut(0).map(|slot| unsafe { &mut *slot })
    }

    #[inline(always)]
    fn node_address() -> u32 {
        read_settings!(DATAPATH_CONFIG, |config: &DatapathConfig| config.snat_ip)
    }

    #[inline(always)]
    fn is_cluster_source(ip: u32) -> bool {
        read_settings!(DATAPATH_CONFIG, |config: &DatapathConfig| config.cluster_cidrs.contains(ip))
    }

    #[inline(always)]
    fn masquerades(src: u32) -> bool {
        read_settings!(DATAPATH_CONFIG, |config: &DatapathConfig| config.masquerades_cluster_ip_client(src))
    }

    #[inline(always)]
    fn is_service_range(ip: u32) -> bool {
        read_settings!(DATAPATH_CONFIG, |config: &DatapathConfig| config.service_cidrs.contains(ip))
    }

    #[inline(always)]
    fn rewrite_addresses<P: Packet>(pkt: &P, to: &ConntrackValue) -> Result<(), HelperFailed> {
        let ip = ptr_at::<_, Ipv4Header>(pkt, ETH_HLEN).ok_or(HelperFailed)?;
        let addresses = u64::from(to.src_ip) | u64::from(to.dst_ip) << 32;
        // SAFETY: bounds-checked by ptr_at for all 20 bytes of the header,
        // so its fields and the 8 address bytes from `src` on are inside the
        // packet; unaligned accesses because the IP header sits 14 bytes
        // into the frame.
        unsafe {
            let check = &raw mut (*ip).check;
            check.write_unaligned(checksum::add(check.read_unaligned(), to.addr_csum_delta));
            (&raw mut (*ip).src).cast::<u64>().write_unaligned(addresses);
        }
        Ok(())
    }

    #[inline(always)]
    fn reject<P: Packet>(pkt: &P, flow: &Flow) -> Result<(), RejectError> {
        reject::reject(pkt, flow)
    }

    #[inline(always)]
    fn remember_fragment(flow: &Flow) {
        fragments::remember(flow);
    }
}

/// Where the two addresses sit in an IPv6 header.
const IPV6_ADDRESSES_OFF: usize = ETH_HLEN + 8;

impl Family for Ipv6 {
    type Client = Ipv6;

    #[inline(always)]
    fn client(ip: Self) -> Ipv6 {
        ip
    }

    #[inline(always)]
    fn logged(self) -> IpAddr {
        IpAddr::V6(self.addr())
    }

    #[inline(always)]
    fn frontend(key: &FrontendKey<Ipv6>) -> Option<FrontendValue<Ipv6>> {
        // SAFETY: as IPv4's.
        unsafe { SERVICE_FRONTENDS_V6.get(key).copied() }
    }

    #[inline(always)]
    fn vip(ip: Ipv6) -> Option<VipValue> {
        // SAFETY: copied out at once.
        SERVICE_VIPS_V6.get_ptr(ip).map(|v| unsafe { *v })
    }

    #[inline(always)]
    fn backend_slot(key: BackendSlotKey) -> Option<Backend<Ipv6>> {
        // SAFETY: as IPv4's.
        unsafe { BACKEND_SLOTS_V6.get(key).copied() }
    }

    #[inline(always)]
    fn member_slot(key: BackendSetMemberKey<Ipv6>) -> Option<u32> {
        // SAFETY: a pointer into a map value, read at once.
        BACKEND_SET_MEMBERS_V6.get_ptr(key).map(|slot| unsafe { *slot })
    }

    #[inline(always)]
    fn in_source_ranges(service_id: u32, ip: Ipv6) -> bool {
        LB_SOURCE_RANGES_V6.get(&Key::new(SourceRangeKey::prefix_len(128), SourceRangeKey { service_id, ip: ip.0 })).is_some()
    }

    #[inline(always)]
    fn affinity(key: &AffinityKey<Ipv6>) -> Option<*mut AffinityValue<Ipv6>> {
        SESSION_AFFINITY_V6.get_ptr_mut(key)
    }

    #[inline(always)]
    fn remember_affinity(key: &AffinityKey<Ipv6>, value: &AffinityValue<Ipv6>) {
        // A client whose affinity cannot be stored still gets its backend.
        let _best_effort = SESSION_AFFINITY_V6.insert(key, value, 0);
    }

    #[inline(always)]
    fn ct_lookup(table: Table, key: &ConntrackKey<Ipv6>) -> Option<*mut ConntrackValue<Ipv6>> {
        match table {
            Table::Pending => CONNTRACK_TCP_PENDING_V6.get_ptr_mut(key),
            Table::Confirmed if key.proto == IPPROTO_TCP => CONNTRACK_TCP_V6.get_ptr_mut(key),
            Table::Confirmed => CONNTRACK_UDP_V6.get_ptr_mut(key),
        }
    }

    #[inline(always)]
    fn ct_insert(table: Table, key: &ConntrackKey<Ipv6>, value: &ConntrackValue<Ipv6>, flags: u64) -> Result<(), MapFull> {
        let stored = match table {
            Table::Pending => CONNTRACK_TCP_PENDING_V6.insert(key, value, flags),
            Table::Confirmed if key.proto == IPPROTO_TCP => CONNTRACK_TCP_V6.insert(key, value, flags),
            Table::Confirmed => CONNTRACK_UDP_V6.insert(key, value, flags),
        };
        stored.map_err(|_| MapFull)
    }

    #[inline(always)]
    fn ct_remove(table: Table, key: &ConntrackKey<Ipv6>) {
        let _already_gone = match table {
            Table::Pending => CONNTRACK_TCP_PENDING_V6.remove(key),
            Table::Confirmed if key.proto == IPPROTO_TCP => CONNTRACK_TCP_V6.remove(key),
            Table::Confirmed => CONNTRACK_UDP_V6.remove(key),
        };
    }

    #[inline(always)]
    fn scratch() -> Option<&'static mut NewFlowScratch<Ipv6>> {
        // SAFETY: this CPU's slot, used by one program run at a time (a
        // run is not preempted on its CPU) and only while it runs.
        NEW_FLOW_SCRATCH_V6.get_ptr_mut(0).map(|slot| unsafe { &mut *slot })
    }

    #[inline(always)]
    fn node_address() -> Ipv6 {
        read_settings!(DATAPATH_CONFIG_V6, |config: &DatapathConfigV6| config.snat_ip)
    }

    #[inline(always)]
    fn is_cluster_source(ip: Ipv6) -> bool {
        read_settings!(DATAPATH_CONFIG_V6, |config: &DatapathConfigV6| config.cluster_cidrs.contains(ip))
    }

    #[inline(always)]
    fn masquerades(src: Ipv6) -> bool {
        let masquerade_all = read_settings!(DATAPATH_CONFIG, |config: &DatapathConfig| config.flags & DATAPATH_MASQUERADE_ALL != 0);
        read_settings!(DATAPATH_CONFIG_V6, |config: &DatapathConfigV6| config.masquerades_cluster_ip_client(src, masquerade_all))
    }

    #[inline(always)]
    fn is_service_range(ip: Ipv6) -> bool {
        read_settings!(DATAPATH_CONFIG_V6, |config: &DatapathConfigV6| config.service_cidrs.contains(ip))
    }

    /// IPv6 has no header checksum: the address change is in the TCP/UDP
    /// checksum only, through the pseudo-header (`Packet::update_l4_checksum`).
    #[inline(always)]
    fn rewrite_addresses<P: Packet>(pkt: &P, to: &ConntrackValue<Ipv6>) -> Result<(), HelperFailed> {
        let addresses = ptr_at::<_, [Ipv6; 2]>(pkt, IPV6_ADDRESSES_OFF).ok_or(HelperFailed)?;
        // SAFETY: bounds-checked by ptr_at; unaligned, as packet data is.
        unsafe { addresses.write_unaligned([to.src_ip, to.dst_ip]) };
        Ok(())
    }

    /// Not built yet for IPv6 (a TCP reset or ICMPv6 port unreachable):
    /// such packets are dropped and counted as unanswerable.
    #[inline(always)]
    fn reject<P: Packet>(_pkt: &P, _flow: &Flow<Ipv6>) -> Result<(), RejectError> {
        Err(RejectError::Unanswerable)
    }

    /// IPv6 fragments are not translated (parse's module comment).
    #[inline(always)]
    fn remember_fragment(_flow: &Flow<Ipv6>) {}
}
