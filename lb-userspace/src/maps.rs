//! Typed handles on the datapath's maps, for the agent's reads and the syncer's writes.
//!
//! The syncer issues its map writes through `sync::MapWriter`.
use std::{collections::BTreeSet, path::Path};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
    },
    util::nr_cpus,
};
use lb_common::{
    Backend, BackendSetMemberKey, BackendSlotKey, ConntrackKey, ConntrackValue, DatapathConfig, FrontendKey,
    FrontendValue, IPPROTO_TCP, IPPROTO_UDP, MAP_BACKEND_SET_MEMBERS, MAP_BACKEND_SLOTS, MAP_CONNTRACK_TCP, MAP_CONNTRACK_TCP_PENDING, MAP_CONNTRACK_UDP,
    MAP_SERVICE_BACKEND_SETS, MAP_SERVICE_COUNTERS, MAP_SERVICE_FRONTENDS, MAP_SERVICE_VIPS,
    MAP_SERVICE_NAMES, MAP_VERDICT_COUNTERS, MAX_SERVICES, NO_BACKEND_SET, Reason, ServiceCounters,
    MAP_DATAPATH_CONFIG, MAP_LB_SOURCE_RANGES, MAP_SOCKET_REVNAT, SocketRevNatKey, SocketRevNatValue, SourceRangeKey, ServiceName, VipValue, CONNTRACK_MAPS, MAX_CONNTRACK_ENTRIES, MAX_PENDING_ENTRIES,
    lifecycle::ConntrackLifetimes, DatapathConfigV6, Ipv6, MAP_BACKEND_SET_MEMBERS_V6, MAP_BACKEND_SLOTS_V6, MAP_CONNTRACK_TCP_V6,
    MAP_CONNTRACK_UDP_V6, MAP_DATAPATH_CONFIG_V6, MAP_SERVICE_FRONTENDS_V6, MAP_SERVICE_VIPS_V6,
};

/// BPF_F_NO_PREALLOC: entries are allocated as written, not up front.
const BPF_F_NO_PREALLOC: u32 = 1;

use crate::{
    conntrack,
    error::{Error, Result},
    sync::{Limits, MapWriter, ProgrammedMaps},
};

/// The maps the eBPF object declares with BTF (`#[btf_map]` in lb-ebpf's
/// maps.rs), by name: every one is pinned and taken over at a restart, so
/// none can be left out by hand. aya-log's buffer, a legacy map, is not
/// among them.
pub fn object_maps() -> &'static [String] {
    static NAMES: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        let Ok(object) = aya_obj::Object::parse(crate::EBPF_OBJECT) else { return Vec::new() };
        let mut names: Vec<String> = object.maps.iter().filter(|(_, m)| matches!(m, aya_obj::Map::Btf(_))).map(|(n, _)| n.clone()).collect();
        names.sort();
        names
    });
    &NAMES
}

pub struct DatapathMaps {
    pub frontends: HashMap<MapData, FrontendKey, FrontendValue>,
    pub service_vips: HashMap<MapData, u32, VipValue>,
    pub backend_slots: HashMap<MapData, BackendSlotKey, Backend>,
    pub backend_set_members: HashMap<MapData, BackendSetMemberKey, u32>,
    pub service_backend_sets: Array<MapData, u32>,
    pub conntrack: ConntrackMaps,
    pub service_counters: PerCpuArray<MapData, ServiceCounters>,
    pub verdict_counters: PerCpuArray<MapData, u64>,
    pub datapath_config: Array<MapData, DatapathConfig>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    /// The node's sockets sent to a backend: (cookie, backend) → frontend.
    pub socket_revnat: HashMap<MapData, SocketRevNatKey, SocketRevNatValue>,
    /// Not in the object: created by the agent, for inspection tools.
    pub service_names: HashMap<MapData, u32, ServiceName>,
    pub ipv6: Ipv6Maps,
}

/// The IPv6 twins of the service and conntrack maps (lb-common's maps
/// module); service ids and backend sets share `SERVICE_BACKEND_SETS` and
/// the counters with IPv4.
pub struct Ipv6Maps {
    pub frontends: HashMap<MapData, FrontendKey<Ipv6>, FrontendValue<Ipv6>>,
    pub service_vips: HashMap<MapData, Ipv6, VipValue>,
    pub backend_slots: HashMap<MapData, BackendSlotKey, Backend<Ipv6>>,
    pub backend_set_members: HashMap<MapData, BackendSetMemberKey<Ipv6>, u32>,
    pub datapath_config: Array<MapData, DatapathConfigV6>,
    pub conntrack_tcp: HashMap<MapData, ConntrackKey<Ipv6>, ConntrackValue<Ipv6>>,
    pub conntrack_udp: HashMap<MapData, ConntrackKey<Ipv6>, ConntrackValue<Ipv6>>,
}

/// The conntrack tables: the confirmed flows of each protocol, and TCP
/// connections not answered yet.
pub struct ConntrackMaps {
    pub tcp: ConntrackTable,
    pub udp: ConntrackTable,
    pub tcp_pending: ConntrackTable,
}

/// One conntrack table.
pub type ConntrackTable = HashMap<MapData, ConntrackKey, ConntrackValue>;

impl ConntrackMaps {
    /// The entry for `key` wherever it is (confirmed first), with the name
    /// of its table.
    pub fn find(&self, key: &ConntrackKey) -> Option<(&'static str, ConntrackValue)> {
        self.tables().into_iter().filter(|(_, proto, _)| *proto == key.proto).find_map(|(name, _, table)| Some((name, table.get(key, 0).ok()?)))
    }

    /// The table called `name`, writable.
    pub fn named_mut(&mut self, name: &str) -> Option<&mut ConntrackTable> {
        match name {
            MAP_CONNTRACK_TCP => Some(&mut self.tcp),
            MAP_CONNTRACK_UDP => Some(&mut self.udp),
            MAP_CONNTRACK_TCP_PENDING => Some(&mut self.tcp_pending),
            _ => None,
        }
    }

    /// The table called `name`.
    pub fn named(&self, name: &str) -> Option<&ConntrackTable> {
        self.tables().into_iter().find(|(n, _, _)| *n == name).map(|(_, _, table)| table)
    }

    /// Every table with its name and protocol, as `CONNTRACK_MAPS` lists
    /// them.
    pub fn tables(&self) -> [(&'static str, u8, &ConntrackTable); 3] {
        [(MAP_CONNTRACK_TCP, IPPROTO_TCP, &self.tcp), (MAP_CONNTRACK_UDP, IPPROTO_UDP, &self.udp), (MAP_CONNTRACK_TCP_PENDING, IPPROTO_TCP, &self.tcp_pending)]
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { name, source }
}

fn take<T: TryFrom<Map, Error = MapError>>(ebpf: &mut Ebpf, name: &'static str) -> Result<T> {
    let map = ebpf.take_map(name).ok_or(Error::Missing(name))?;
    T::try_from(map).map_err(map_err(name))
}

impl DatapathMaps {
    /// Moves the maps out of a loaded object (after its programs are loaded:
    /// they hold their own references to the maps), and creates the ones
    /// the agent keeps itself, pinned under `pin_dir` if given.
    pub fn take(ebpf: &mut Ebpf, pin_dir: Option<&Path>, service_ports: u32) -> Result<Self> {
        Ok(Self {
            frontends: take(ebpf, MAP_SERVICE_FRONTENDS)?,
            service_vips: take(ebpf, MAP_SERVICE_VIPS)?,
            backend_slots: take(ebpf, MAP_BACKEND_SLOTS)?,
            backend_set_members: take(ebpf, MAP_BACKEND_SET_MEMBERS)?,
            service_backend_sets: take(ebpf, MAP_SERVICE_BACKEND_SETS)?,
            conntrack: ConntrackMaps {
                tcp: take(ebpf, MAP_CONNTRACK_TCP)?,
                udp: take(ebpf, MAP_CONNTRACK_UDP)?,
                tcp_pending: take(ebpf, MAP_CONNTRACK_TCP_PENDING)?,
            },
            service_counters: take(ebpf, MAP_SERVICE_COUNTERS)?,
            verdict_counters: take(ebpf, MAP_VERDICT_COUNTERS)?,
            datapath_config: take(ebpf, MAP_DATAPATH_CONFIG)?,
            source_ranges: take(ebpf, MAP_LB_SOURCE_RANGES)?,
            socket_revnat: take(ebpf, MAP_SOCKET_REVNAT)?,
            service_names: service_names(pin_dir, service_ports)?,
            ipv6: Ipv6Maps {
                frontends: take(ebpf, MAP_SERVICE_FRONTENDS_V6)?,
                service_vips: take(ebpf, MAP_SERVICE_VIPS_V6)?,
                backend_slots: take(ebpf, MAP_BACKEND_SLOTS_V6)?,
                backend_set_members: take(ebpf, MAP_BACKEND_SET_MEMBERS_V6)?,
                datapath_config: take(ebpf, MAP_DATAPATH_CONFIG_V6)?,
                conntrack_tcp: take(ebpf, MAP_CONNTRACK_TCP_V6)?,
                conntrack_udp: take(ebpf, MAP_CONNTRACK_UDP_V6)?,
            },
        })
    }

    /// Writes the node's settings; without a clock conversion, with this
    /// kernel's (a copy of live settings keeps theirs).
    pub fn set_config(&mut self, config: DatapathConfig) -> Result<()> {
        let clock = if config.clock.ns_per_jiffy == 0 { crate::conntrack::datapath_clock().unwrap_or_default() } else { config.clock };
        self.datapath_config.set(0, DatapathConfig { clock, ..config }, 0).map_err(map_err(MAP_DATAPATH_CONFIG))
    }

    /// Makes `ip` (network byte order) the source of translated traffic,
    /// the other settings kept.
    pub fn set_snat_ip(&mut self, ip: u32) -> Result<()> {
        self.edit_config(|config| config.snat_ip = ip)
    }

    /// Makes `ranges` the service address ranges (unallocated addresses in
    /// them are dropped); returns whether they changed.
    pub fn set_service_cidrs(&mut self, ranges: lb_common::Ipv4Cidrs) -> Result<bool> {
        let config = self.datapath_config.get(&0, 0).map_err(map_err(MAP_DATAPATH_CONFIG))?;
        if config.service_cidrs == ranges {
            return Ok(false);
        }
        self.set_config(DatapathConfig { service_cidrs: ranges, ..config })?;
        Ok(true)
    }

    fn edit_config(&mut self, edit: impl FnOnce(&mut DatapathConfig)) -> Result<()> {
        let mut config = self.datapath_config.get(&0, 0).map_err(map_err(MAP_DATAPATH_CONFIG))?;
        edit(&mut config);
        self.set_config(config)
    }

    /// Reads back what the syncer programmed, for a restarted agent to
    /// adopt it.
    pub fn read_programmed(&self) -> Result<ProgrammedMaps> {
        let mut found = ProgrammedMaps::default();
        for entry in self.service_names.iter() {
            let (id, name) = entry.map_err(map_err(MAP_SERVICE_NAMES))?;
            found.names.insert(id, name);
        }
        for &id in found.names.keys() {
            let set = self.service_backend_sets.get(&id, 0).map_err(map_err(MAP_SERVICE_BACKEND_SETS))?;
            if set != NO_BACKEND_SET {
                found.service_sets.insert(id, set);
            }
        }
        found.frontends = self.frontends.iter().collect::<Result<_, _>>().map_err(map_err(MAP_SERVICE_FRONTENDS))?;
        found.vips = self.service_vips.keys().collect::<Result<_, _>>().map_err(map_err(MAP_SERVICE_VIPS))?;
        found.slots = self.backend_slots.iter().collect::<Result<_, _>>().map_err(map_err(MAP_BACKEND_SLOTS))?;
        found.members = self.backend_set_members.iter().collect::<Result<_, _>>().map_err(map_err(MAP_BACKEND_SET_MEMBERS))?;
        for entry in self.source_ranges.iter() {
            let (key, _) = entry.map_err(map_err(MAP_LB_SOURCE_RANGES))?;
            // The prefix covers the service id (32 bits) and the range.
            found.source_ranges.push((key.data(), key.prefix_len().saturating_sub(32) as u8));
        }
        Ok(found)
    }

    /// Verdict counters summed over CPUs, indexed by `Reason`.
    pub fn verdict_totals(&self) -> Result<[u64; Reason::COUNT as usize]> {
        verdict_totals(&self.verdict_counters)
    }

    /// A service's counters summed over CPUs.
    pub fn service_totals(&self, service_id: u32) -> Result<ServiceCounters> {
        service_totals(&self.service_counters, service_id)
    }
}

/// `VERDICT_COUNTERS` summed over CPUs, indexed by `Reason`; for the agent's
/// own handle and for handles opened from its pins alike.
pub fn verdict_totals(map: &PerCpuArray<MapData, u64>) -> Result<[u64; Reason::COUNT as usize]> {
    let mut totals = [0; Reason::COUNT as usize];
    for reason in Reason::ALL {
        let per_cpu = map.get(&(reason as u32), 0).map_err(map_err(MAP_VERDICT_COUNTERS))?;
        totals[reason as usize] = per_cpu.iter().sum();
    }
    Ok(totals)
}

/// One service's `SERVICE_COUNTERS` summed over CPUs.
pub fn service_totals(map: &PerCpuArray<MapData, ServiceCounters>, service_id: u32) -> Result<ServiceCounters> {
    let per_cpu = map.get(&service_id, 0).map_err(map_err(MAP_SERVICE_COUNTERS))?;
    Ok(per_cpu.iter().fold(ServiceCounters::default(), |sum, cpu| sum + *cpu))
}

impl MapWriter for DatapathMaps {
    fn put_backend_slot(&mut self, key: BackendSlotKey, backend: Backend) -> Result<()> {
        self.backend_slots.insert(key, backend, 0).map_err(map_err(MAP_BACKEND_SLOTS))
    }

    fn remove_backend_slot(&mut self, key: BackendSlotKey) -> Result<()> {
        ignore_missing(self.backend_slots.remove(&key)).map_err(map_err(MAP_BACKEND_SLOTS))
    }

    fn put_set_member(&mut self, key: BackendSetMemberKey, slot: u32) -> Result<()> {
        self.backend_set_members.insert(key, slot, 0).map_err(map_err(MAP_BACKEND_SET_MEMBERS))
    }

    fn remove_set_member(&mut self, key: BackendSetMemberKey) -> Result<()> {
        ignore_missing(self.backend_set_members.remove(&key)).map_err(map_err(MAP_BACKEND_SET_MEMBERS))
    }

    fn put_service_backend_set(&mut self, service_id: u32, backend_set: u32) -> Result<()> {
        self.service_backend_sets.set(service_id, backend_set, 0).map_err(map_err(MAP_SERVICE_BACKEND_SETS))
    }

    fn put_frontend(&mut self, key: FrontendKey, value: FrontendValue) -> Result<()> {
        self.frontends.insert(key, value, 0).map_err(map_err(MAP_SERVICE_FRONTENDS))
    }

    fn remove_frontend(&mut self, key: FrontendKey) -> Result<()> {
        ignore_missing(self.frontends.remove(&key)).map_err(map_err(MAP_SERVICE_FRONTENDS))
    }

    fn put_service_vip(&mut self, ip: u32, vip: VipValue) -> Result<()> {
        self.service_vips.insert(ip, vip, 0).map_err(map_err(MAP_SERVICE_VIPS))
    }

    fn remove_service_vip(&mut self, ip: u32) -> Result<()> {
        ignore_missing(self.service_vips.remove(&ip)).map_err(map_err(MAP_SERVICE_VIPS))
    }

    fn reset_service_counters(&mut self, service_id: u32) -> Result<()> {
        let cpus = nr_cpus().map_err(|(what, source)| Error::Io { what: what.into(), source })?;
        let zeros = PerCpuValues::try_from(vec![ServiceCounters::default(); cpus])
            .map_err(|source| Error::Io { what: "per-CPU counter values".into(), source })?;
        self.service_counters.set(service_id, zeros, 0).map_err(map_err(MAP_SERVICE_COUNTERS))
    }

    fn put_service_name(&mut self, service_id: u32, name: ServiceName) -> Result<()> {
        self.service_names.insert(service_id, name, 0).map_err(map_err(MAP_SERVICE_NAMES))
    }

    fn remove_service_name(&mut self, service_id: u32) -> Result<()> {
        ignore_missing(self.service_names.remove(&service_id)).map_err(map_err(MAP_SERVICE_NAMES))
    }

    fn put_source_range(&mut self, key: SourceRangeKey, range_len: u8) -> Result<()> {
        let key = Key::new(SourceRangeKey::prefix_len(range_len), key);
        self.source_ranges.insert(&key, 1, 0).map_err(map_err(MAP_LB_SOURCE_RANGES))
    }

    fn remove_source_range(&mut self, key: SourceRangeKey, range_len: u8) -> Result<()> {
        let key = Key::new(SourceRangeKey::prefix_len(range_len), key);
        ignore_missing(self.source_ranges.remove(&key)).map_err(map_err(MAP_LB_SOURCE_RANGES))
    }

    fn remove_service_flows(&mut self, service_ids: &BTreeSet<u32>) -> Result<usize> {
        let mut removed = 0;
        for (name, _, table) in self.conntrack.tables() {
            // Batched: a whole table in a few syscalls, not one per entry.
            let fd = table_fd(table);
            removed += conntrack::purge(fd, |_, v| service_ids.contains(&v.service_id))
                .map_err(|source| Error::Io { what: format!("removing the flows of deleted services from {name}"), source })?;
        }
        Ok(removed)
    }
}

/// The descriptor of a conntrack table, for the batched operations.
pub fn table_fd(table: &ConntrackTable) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsFd;
    let map: &MapData = aya::maps::IterableMap::map(table);
    map.fd().as_fd()
}

/// `SERVICE_NAMES`: the pinned one of a previous run if `pin_dir` has it,
/// else created empty (and pinned, then used through its pin).
fn service_names(pin_dir: Option<&Path>, service_ports: u32) -> Result<HashMap<MapData, u32, ServiceName>> {
    let open = |map: MapData| HashMap::try_from(Map::HashMap(map)).map_err(map_err(MAP_SERVICE_NAMES));
    let definition = service_names_definition(service_ports);
    let Some(dir) = pin_dir else {
        return open(MapData::create(definition, MAP_SERVICE_NAMES, None).map_err(map_err(MAP_SERVICE_NAMES))?);
    };
    let path = dir.join(MAP_SERVICE_NAMES);
    if !path.exists() {
        let created = MapData::create(definition, MAP_SERVICE_NAMES, None).map_err(map_err(MAP_SERVICE_NAMES))?;
        created.pin(&path).map_err(|e| Error::Pin { path: path.clone(), reason: e.to_string() })?;
    }
    open(MapData::from_pin(&path).map_err(map_err(MAP_SERVICE_NAMES))?)
}

fn service_names_definition(service_ports: u32) -> aya_obj::Map {
    let hash = aya::maps::MapType::Hash as u32;
    aya_obj::Map::new_from_params(hash, 4, size_of::<ServiceName>() as u32, service_ports, BPF_F_NO_PREALLOC)
}

/// A map's shape: what must agree for a pinned map to be taken over.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

impl Layout {
    fn of(map: &aya_obj::Map) -> Self {
        Self {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: map.max_entries(),
            flags: map.map_flags(),
        }
    }
}

/// What the pins under a directory hold, before the datapath is loaded.
#[derive(Debug, Default)]
pub struct PinnedState {
    /// Maps a previous run left that this binary takes over as they are.
    pub adopted: Vec<&'static str>,
    /// Maps with another layout (from an incompatible version), unpinned to
    /// be created afresh.
    pub replaced: Vec<&'static str>,
    /// Conntrack tables of another layout or size: their entries, in this
    /// binary's layout, to be written into the new tables once loaded, so
    /// that an upgrade keeps every established flow.
    pub migrated: Vec<(&'static str, Vec<(ConntrackKey, ConntrackValue)>)>,
}

/// Entries of each IPv6 table while the agent programs no IPv6 service.
const IPV6_IDLE_ENTRIES: u32 = 1024;

/// What the agent asks of the maps it creates.
#[derive(Clone, Copy, Debug)]
pub struct MapSettings {
    /// Entries of `CONNTRACK_TCP`, `CONNTRACK_UDP` and
    /// `CONNTRACK_TCP_PENDING`.
    pub conntrack_tcp_max: u32,
    pub conntrack_udp_max: u32,
    pub conntrack_tcp_pending_max: u32,
    /// The sizes of the service maps the syncer fills.
    pub limits: Limits,
    /// For entries migrated from a layout without lifetimes.
    pub ct_lifetimes: ConntrackLifetimes,
}

impl Default for MapSettings {
    fn default() -> Self {
        Self {
            conntrack_tcp_max: MAX_CONNTRACK_ENTRIES,
            conntrack_udp_max: MAX_CONNTRACK_ENTRIES,
            conntrack_tcp_pending_max: MAX_PENDING_ENTRIES,
            limits: Limits::default(),
            ct_lifetimes: ConntrackLifetimes::default(),
        }
    }
}

impl MapSettings {
    /// The capacity asked for `name`, where the object's own is not used.
    pub fn max_entries(&self, name: &str) -> Option<u32> {
        match name {
            MAP_CONNTRACK_TCP => Some(self.conntrack_tcp_max),
            MAP_CONNTRACK_UDP => Some(self.conntrack_udp_max),
            MAP_CONNTRACK_TCP_PENDING => Some(self.conntrack_tcp_pending_max),
            MAP_SERVICE_FRONTENDS => Some(self.limits.frontends),
            MAP_SERVICE_VIPS => Some(self.limits.addresses),
            MAP_BACKEND_SLOTS | MAP_BACKEND_SET_MEMBERS => Some(self.limits.backend_slots),
            MAP_SERVICE_BACKEND_SETS | MAP_SERVICE_COUNTERS | MAP_SERVICE_NAMES => Some(self.limits.service_ports),
            // The agent programs no IPv6 service yet (issue 14): the IPv6
            // tables are kept at their smallest rather than costing every
            // node their preallocated size.
            name if lb_common::IPV6_MAPS.contains(&name) && name != lb_common::MAP_DATAPATH_CONFIG_V6 => Some(IPV6_IDLE_ENTRIES),
            _ => None,
        }
    }
}

/// Checks every map pinned under `dir` against this binary's definition of
/// it; keeps the ones that agree and unpins the others, reading the
/// entries of conntrack tables first so that they can be migrated.
pub fn check_pins(dir: &Path, settings: &MapSettings) -> Result<PinnedState> {
    let object = aya_obj::Object::parse(crate::EBPF_OBJECT).map_err(|e| Error::Load(e.into()))?;
    let mut state = PinnedState::default();
    let wanted = object_maps()
        .iter()
        .map(|name| object.maps.get(name).map(|m| (name.as_str(), Layout::of(m))).ok_or(Error::Missing(name.as_str())))
        .chain([Ok((MAP_SERVICE_NAMES, Layout::of(&service_names_definition(MAX_SERVICES))))]);
    for entry in wanted {
        let (name, mut layout) = entry?;
        if let Some(max_entries) = settings.max_entries(name) {
            layout.max_entries = max_entries;
        }
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(map_err(name))?;
        let pinned = Layout {
            map_type: info.map_type().map_err(map_err(name))? as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        };
        if pinned == layout {
            state.adopted.push(name);
            continue;
        }
        if CONNTRACK_MAPS.iter().any(|(table, _)| *table == name) {
            let entries = migrate::read_pinned(&path, &pinned, settings)
                .map_err(|source| Error::Io { what: format!("reading {} to migrate its flows", path.display()), source })?;
            // A layout this binary does not know loses its flows: replaced
            // (and warned about) like any other map.
            if let Some(entries) = entries {
                state.migrated.push((name, entries));
            }
        }
        std::fs::remove_file(&path).map_err(|e| Error::Pin { path: path.clone(), reason: e.to_string() })?;
        state.replaced.push(name);
    }
    Ok(state)
}

/// Conntrack entries of earlier layouts, in this one's.
pub mod migrate {
    use super::*;
    use crate::conntrack::{now_ticks, read_all_raw};
    use lb_common::lifecycle::{FLOW_SEEN_REPLY, lifetime};

    /// The value layout before flow state and expiry (28 bytes): this
    /// layout's first 28 bytes, the state byte zero.
    pub const V1_VALUE_SIZE: u32 = 28;

    /// The entries of the conntrack table pinned at `path`, whose layout is
    /// `pinned`, converted to this layout; `None` for a layout this binary
    /// does not know (its flows are lost).
    pub(super) fn read_pinned(path: &Path, pinned: &Layout, settings: &MapSettings) -> std::io::Result<Option<Vec<(ConntrackKey, ConntrackValue)>>> {
        use std::os::fd::AsFd;
        if pinned.key_size != size_of::<ConntrackKey>() as u32 {
            return Ok(None);
        }
        let map = MapData::from_pin(path).map_err(std::io::Error::other)?;
        let fd = map.fd().as_fd();
        let now = now_ticks();
        Ok(match pinned.value_size {
            size if size == size_of::<ConntrackValue>() as u32 => Some(read_all_raw::<ConntrackKey, ConntrackValue>(fd)?),
            V1_VALUE_SIZE => Some(
                read_all_raw::<ConntrackKey, [u8; V1_VALUE_SIZE as usize]>(fd)?
                    .into_iter()
                    .map(|(key, old)| (key, from_v1(&key, &old, now, &settings.ct_lifetimes)))
                    .collect(),
            ),
            _ => None,
        })
    }

    /// A flow of the layout without state: taken as established (its state
    /// is unknown, and a live connection must not be cut short), with the
    /// established lifetime from `now`.
    pub fn from_v1(key: &ConntrackKey, old: &[u8; V1_VALUE_SIZE as usize], now: u32, lifetimes: &ConntrackLifetimes) -> ConntrackValue {
        let mut bytes = [0u8; size_of::<ConntrackValue>()];
        bytes[..old.len()].copy_from_slice(old);
        let mut value: ConntrackValue = bytemuck::cast(bytes);
        value.flow_flags = FLOW_SEEN_REPLY;
        value.expires = now.saturating_add(lifetime(key.proto, FLOW_SEEN_REPLY, lifetimes));
        value
    }
}

/// A key that is already gone is what a removal wants.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod object_map_tests {
    use lb_common::{
        MAP_BACKEND_SET_MEMBERS, MAP_BACKEND_SLOTS, MAP_CONNTRACK_TCP, MAP_CONNTRACK_TCP_PENDING, MAP_CONNTRACK_UDP, MAP_DATAPATH_CONFIG,
        MAP_FRAGMENT_PORTS, MAP_LB_SOURCE_RANGES, MAP_SERVICE_BACKEND_SETS, MAP_SERVICE_COUNTERS, MAP_SERVICE_FRONTENDS, MAP_SERVICE_VIPS,
        MAP_SESSION_AFFINITY, MAP_SNAT_PORT_CURSOR, MAP_SOCKET_BACKENDS, MAP_SOCKET_REVNAT, MAP_VERDICT_COUNTERS,
    };

    /// Every map of the object is pinned (so a restart keeps it), and each
    /// has its name in lb-common; aya-log's buffer is not pinned.
    #[test]
    fn every_map_the_object_declares_is_pinned_under_its_lb_common_name() {
        let mut named = vec![
            MAP_BACKEND_SET_MEMBERS, MAP_BACKEND_SLOTS, MAP_CONNTRACK_TCP, MAP_CONNTRACK_TCP_PENDING, MAP_CONNTRACK_UDP, MAP_DATAPATH_CONFIG,
            MAP_FRAGMENT_PORTS, MAP_LB_SOURCE_RANGES, MAP_SERVICE_BACKEND_SETS, MAP_SERVICE_COUNTERS, MAP_SERVICE_FRONTENDS, MAP_SERVICE_VIPS,
            MAP_SESSION_AFFINITY, MAP_SNAT_PORT_CURSOR, MAP_SOCKET_BACKENDS, MAP_SOCKET_REVNAT, MAP_VERDICT_COUNTERS,
            lb_common::MAP_NEW_FLOW_SCRATCH, lb_common::MAP_NEW_FLOW_SCRATCH_V6,
        ];
        named.extend(lb_common::IPV6_MAPS);
        named.sort_unstable();
        assert_eq!(super::object_maps(), named);
    }
}
