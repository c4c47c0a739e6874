//! The BPF maps, declared with BTF so that bpftool prints their keys and values field by field.
//!
//! Layouts and names live in lb-common.
use aya_ebpf::{
    bindings::BPF_F_NO_COMMON_LRU,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use crate::family::NewFlowScratch;
use lb_common::{
    AffinityKey, AffinityValue, MAX_AFFINITY_ENTRIES, MAX_SOCKET_REVNAT_ENTRIES, SocketRevNatKey, SocketRevNatValue, Backend, BackendSetMemberKey, BackendSlotKey, ConntrackKey, ConntrackValue, DatapathConfig, FrontendKey, FrontendValue,
    MAX_BACKEND_SLOTS, MAX_CONNTRACK_ENTRIES, MAX_PENDING_ENTRIES, MAX_FRAGMENT_ENTRIES, FragmentKey, MAX_FRONTENDS, MAX_SERVICES, MAX_VIPS, Reason,
    ServiceCounters, VipValue, MAX_SOURCE_RANGES, SourceRangeKey, MAX_SOCKET_BACKEND_ENTRIES, SocketBackendKey,
    DatapathConfigV6, Ipv6,
};

/// (address, port, protocol) → the frontend's service and its current
/// backend set.
#[btf_map]
pub static SERVICE_FRONTENDS: HashMap<FrontendKey, FrontendValue, { MAX_FRONTENDS as usize }> =
    HashMap::new();

/// Service address (network byte order) → its frontend count and kind.
#[btf_map]
pub static SERVICE_VIPS: HashMap<u32, VipValue, { MAX_VIPS as usize }> = HashMap::new();

/// sessionAffinity ClientIP: (client, service) → backend and last use.
#[btf_map]
pub static SESSION_AFFINITY: LruHashMap<AffinityKey, AffinityValue, { MAX_AFFINITY_ENTRIES as usize }> =
    LruHashMap::new();

/// The node's own sockets sent to a backend instead of a frontend:
/// (socket cookie, backend) → frontend, to show replies and the peer as
/// the frontend.
#[btf_map]
pub static SOCKET_REVNAT: LruHashMap<SocketRevNatKey, SocketRevNatValue, { MAX_SOCKET_REVNAT_ENTRIES as usize }> =
    LruHashMap::new();

/// loadBalancerSourceRanges: (service id, address range) → 1, read for new
/// connections to frontends with `FRONTEND_SOURCE_RANGES`.
#[btf_map]
pub static LB_SOURCE_RANGES: LpmTrie<SourceRangeKey, u8, { MAX_SOURCE_RANGES as usize }> = LpmTrie::new();

/// The backend each unconnected UDP socket of the node's sends a frontend's
/// datagrams to, and when it last did: one backend per socket and frontend
/// (a multi-datagram exchange stays on one backend), for as long as a UDP
/// flow lives without traffic.
#[btf_map]
pub static SOCKET_BACKENDS: LruHashMap<SocketBackendKey, AffinityValue, { MAX_SOCKET_BACKEND_ENTRIES as usize }> = LruHashMap::new();

/// The node's settings, one entry.
#[btf_map]
pub static DATAPATH_CONFIG: Array<DatapathConfig, 1> = Array::new();

/// (backend set, slot) → backend. A set is written whole under a fresh id
/// before a frontend points at it, so a reader never sees half of one.
#[btf_map]
pub static BACKEND_SLOTS: HashMap<BackendSlotKey, Backend, { MAX_BACKEND_SLOTS as usize }> =
    HashMap::new();

/// (backend set, backend) → slot.
#[btf_map]
pub static BACKEND_SET_MEMBERS: HashMap<BackendSetMemberKey, u32, { MAX_BACKEND_SLOTS as usize }> =
    HashMap::new();

/// Service id → its current backend set.
#[btf_map]
pub static SERVICE_BACKEND_SETS: Array<u32, { MAX_SERVICES as usize }> = Array::new();

/// A conntrack table, keyed by the wire 5-tuple. Per-CPU LRU lists
/// (BPF_F_NO_COMMON_LRU), as Katran does: recording a new flow never
/// contends on one shared LRU lock, and each CPU evicts the least recently
/// used of the flows it recorded. Lookups see every entry.
type ConntrackTable<const ENTRIES: usize = { MAX_CONNTRACK_ENTRIES as usize }> =
    LruHashMap<ConntrackKey, ConntrackValue, ENTRIES, { BPF_F_NO_COMMON_LRU as usize }>;

/// TCP and UDP apart, so that short UDP flows (DNS) never push an idle TCP
/// connection out.
#[btf_map]
pub static CONNTRACK_TCP: ConntrackTable = ConntrackTable::new();
#[btf_map]
pub static CONNTRACK_UDP: ConntrackTable = ConntrackTable::new();

/// TCP flows opened by a SYN that the backend has not answered yet. A
/// flood of SYNs churns only this table: a connection moves to
/// `CONNTRACK_TCP` with the backend's SYN-ACK, where no flood of new
/// flows can evict it.
#[btf_map]
pub static CONNTRACK_TCP_PENDING: ConntrackTable<{ MAX_PENDING_ENTRIES as usize }> = ConntrackTable::new();

/// The ports of fragmented datagrams, learnt from their first fragment
/// (the only one with a TCP/UDP header), so that the later fragments of a
/// tracked flow are translated too (as Cilium's fragment map does).
/// The two ports as they sit in the header (one word).
#[btf_map]
pub static FRAGMENT_PORTS: LruHashMap<FragmentKey, u32, { MAX_FRAGMENT_ENTRIES as usize }> = LruHashMap::new();

/// Where each CPU's search for a free source NAT port starts: ports are
/// handed out in turn, so the port reused is the one longest unused.
#[btf_map]
pub static SNAT_PORT_CURSOR: PerCpuArray<u32, 1> = PerCpuArray::new();

/// The IPv6 twins of the maps above that hold addresses: the same types
/// over `Ipv6`, the same meaning (lb-common's maps module).
#[btf_map]
pub static SERVICE_FRONTENDS_V6: HashMap<FrontendKey<Ipv6>, FrontendValue<Ipv6>, { MAX_FRONTENDS as usize }> =
    HashMap::new();
#[btf_map]
pub static SERVICE_VIPS_V6: HashMap<Ipv6, VipValue, { MAX_VIPS as usize }> = HashMap::new();
#[btf_map]
pub static BACKEND_SLOTS_V6: HashMap<BackendSlotKey, Backend<Ipv6>, { MAX_BACKEND_SLOTS as usize }> = HashMap::new();
#[btf_map]
pub static BACKEND_SET_MEMBERS_V6: HashMap<BackendSetMemberKey<Ipv6>, u32, { MAX_BACKEND_SLOTS as usize }> =
    HashMap::new();
#[btf_map]
pub static SESSION_AFFINITY_V6: LruHashMap<AffinityKey<Ipv6>, AffinityValue<Ipv6>, { MAX_AFFINITY_ENTRIES as usize }> =
    LruHashMap::new();
#[btf_map]
pub static LB_SOURCE_RANGES_V6: LpmTrie<SourceRangeKey<[u32; 4]>, u8, { MAX_SOURCE_RANGES as usize }> = LpmTrie::new();
#[btf_map]
pub static DATAPATH_CONFIG_V6: Array<DatapathConfigV6, 1> = Array::new();

type ConntrackTableV6<const ENTRIES: usize = { MAX_CONNTRACK_ENTRIES as usize }> =
    LruHashMap<ConntrackKey<Ipv6>, ConntrackValue<Ipv6>, ENTRIES, { BPF_F_NO_COMMON_LRU as usize }>;
#[btf_map]
pub static CONNTRACK_TCP_V6: ConntrackTableV6 = ConntrackTableV6::new();
#[btf_map]
pub static CONNTRACK_UDP_V6: ConntrackTableV6 = ConntrackTableV6::new();
#[btf_map]
pub static CONNTRACK_TCP_PENDING_V6: ConntrackTableV6<{ MAX_PENDING_ENTRIES as usize }> = ConntrackTableV6::new();

/// Each CPU's room for building a new flow's entries (`NewFlowScratch`).
#[btf_map]
pub static NEW_FLOW_SCRATCH: PerCpuArray<NewFlowScratch<u32>, 1> = PerCpuArray::new();
#[btf_map]
pub static NEW_FLOW_SCRATCH_V6: PerCpuArray<NewFlowScratch<Ipv6>, 1> = PerCpuArray::new();

#[btf_map]
pub static SERVICE_COUNTERS: PerCpuArray<ServiceCounters, { MAX_SERVICES as usize }> =
    PerCpuArray::new();

#[btf_map]
pub static VERDICT_COUNTERS: PerCpuArray<u64, { Reason::COUNT as usize }> = PerCpuArray::new();
