//! The BPF maps, declared with BTF so that bpftool prints their keys and
//! values field by field. Layouts and names live in lb-common.
use aya_ebpf::{
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    Backend, BackendSlotKey, ConntrackKey, ConntrackValue, FrontendKey, FrontendValue,
    MAX_BACKEND_SLOTS, MAX_CONNTRACK_ENTRIES, MAX_FRONTENDS, MAX_SERVICES, MAX_VIPS, Reason,
    ServiceBackendKey, ServiceCounters,
};

#[btf_map]
pub static SERVICE_FRONTENDS: HashMap<FrontendKey, FrontendValue, { MAX_FRONTENDS as usize }> =
    HashMap::new();

/// Service address (network byte order) → number of frontends on it.
#[btf_map]
pub static SERVICE_VIPS: HashMap<u32, u32, { MAX_VIPS as usize }> = HashMap::new();

#[btf_map]
pub static BACKEND_SLOTS: HashMap<BackendSlotKey, Backend, { MAX_BACKEND_SLOTS as usize }> =
    HashMap::new();

#[btf_map]
pub static SERVICE_BACKENDS: HashMap<ServiceBackendKey, u8, { MAX_BACKEND_SLOTS as usize }> =
    HashMap::new();

#[btf_map]
pub static CONNTRACK: LruHashMap<ConntrackKey, ConntrackValue, { MAX_CONNTRACK_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
pub static SERVICE_COUNTERS: PerCpuArray<ServiceCounters, { MAX_SERVICES as usize }> =
    PerCpuArray::new();

#[btf_map]
pub static VERDICT_COUNTERS: PerCpuArray<u64, { Reason::COUNT as usize }> = PerCpuArray::new();
