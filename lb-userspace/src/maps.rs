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
    MAP_CONNTRACK_UDP_V6, MAP_DATAPATH_CONFIG_V6, MAP_SERVICE_FRONTENDS_V6, MAP_SERVICE_VIPS_V6, MAP_LB_SOURCE_RANGES_V6,
    MAP_CONNTRACK_TCP_PENDING_V6, IpAddress, ip_be, ip_from_be,
};
use std::net::IpAddr;

/// BPF_F_NO_PREALLOC: entries are allocated as written, not up front.
const BPF_F_NO_PREALLOC: u32 = 1;

use crate::{
    conntrack,
    error::{Error, Result},
    model::{Endpoint, Frontend, IpFamily, Protocol},
    sync::{FrontendEntry, IPV6_IDLE_ENTRIES, Limits, MapWriter, ProgrammedMaps},
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
    pub source_ranges: LpmTrie<MapData, SourceRangeKey<[u32; 4]>, u8>,
    pub datapath_config: Array<MapData, DatapathConfigV6>,
    pub conntrack_tcp: ConntrackTableV6,
    pub conntrack_udp: ConntrackTableV6,
    pub conntrack_tcp_pending: ConntrackTableV6,
}

/// One IPv6 conntrack table.
pub type ConntrackTableV6 = HashMap<MapData, ConntrackKey<Ipv6>, ConntrackValue<Ipv6>>;

impl Ipv6Maps {
    /// Every conntrack table with its name, as `CONNTRACK_MAPS_V6` lists
    /// them.
    pub fn conntrack_tables(&self) -> [(&'static str, &ConntrackTableV6); 3] {
        [(MAP_CONNTRACK_TCP_V6, &self.conntrack_tcp), (MAP_CONNTRACK_UDP_V6, &self.conntrack_udp), (MAP_CONNTRACK_TCP_PENDING_V6, &self.conntrack_tcp_pending)]
    }
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
                source_ranges: take(ebpf, MAP_LB_SOURCE_RANGES_V6)?,
                datapath_config: take(ebpf, MAP_DATAPATH_CONFIG_V6)?,
                conntrack_tcp: take(ebpf, MAP_CONNTRACK_TCP_V6)?,
                conntrack_udp: take(ebpf, MAP_CONNTRACK_UDP_V6)?,
                conntrack_tcp_pending: take(ebpf, MAP_CONNTRACK_TCP_PENDING_V6)?,
            },
        })
    }

    /// Writes the node's settings; without a clock conversion, with this
    /// kernel's (a copy of live settings keeps theirs).
    pub fn set_config(&mut self, config: DatapathConfig) -> Result<()> {
        let clock = if config.clock.ns_per_jiffy == 0 { crate::conntrack::datapath_clock().unwrap_or_default() } else { config.clock };
        self.datapath_config.set(0, DatapathConfig { clock, ..config }, 0).map_err(map_err(MAP_DATAPATH_CONFIG))
    }

    /// Makes the first address of each family in `node_ips` the source of
    /// that family's translated traffic (none: unset), the other settings
    /// kept.
    pub fn set_snat_ips(&mut self, node_ips: &[IpAddr]) -> Result<()> {
        let first = |family| node_ips.iter().copied().find(|&ip| IpFamily::of(ip) == family);
        self.edit_config(|config| config.snat_ip = first(IpFamily::V4).map_or(0, u32::from_ip))?;
        self.edit_config_v6(|config| config.snat_ip = first(IpFamily::V6).map_or(Ipv6::UNSPECIFIED, Ipv6::from_ip))
    }

    /// Makes `ranges` the service address ranges of both families
    /// (unallocated addresses in them are dropped); returns whether they
    /// changed.
    pub fn set_service_cidrs(&mut self, ranges: &[crate::cli::IpCidr]) -> Result<bool> {
        let (v4, v6) = (crate::cli::IpCidr::ipv4(ranges), crate::cli::IpCidr::ipv6(ranges));
        let config = self.datapath_config.get(&0, 0).map_err(map_err(MAP_DATAPATH_CONFIG))?;
        let config_v6 = self.ipv6.datapath_config.get(&0, 0).map_err(map_err(MAP_DATAPATH_CONFIG_V6))?;
        if config.service_cidrs == v4 && config_v6.service_cidrs == v6 {
            return Ok(false);
        }
        self.set_config(DatapathConfig { service_cidrs: v4, ..config })?;
        self.set_config_v6(DatapathConfigV6 { service_cidrs: v6, ..config_v6 })?;
        Ok(true)
    }

    /// Writes the node's IPv6 settings.
    pub fn set_config_v6(&mut self, config: DatapathConfigV6) -> Result<()> {
        self.ipv6.datapath_config.set(0, config, 0).map_err(map_err(MAP_DATAPATH_CONFIG_V6))
    }

    fn edit_config_v6(&mut self, edit: impl FnOnce(&mut DatapathConfigV6)) -> Result<()> {
        let mut config = self.ipv6.datapath_config.get(&0, 0).map_err(map_err(MAP_DATAPATH_CONFIG_V6))?;
        edit(&mut config);
        self.set_config_v6(config)
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
        let v6 = &self.ipv6;
        read_frontends(&self.frontends, MAP_SERVICE_FRONTENDS, &mut found)?;
        read_frontends(&v6.frontends, MAP_SERVICE_FRONTENDS_V6, &mut found)?;
        read_vips(&self.service_vips, MAP_SERVICE_VIPS, &mut found)?;
        read_vips(&v6.service_vips, MAP_SERVICE_VIPS_V6, &mut found)?;
        read_set_entries(&self.backend_slots, &self.backend_set_members, [MAP_BACKEND_SLOTS, MAP_BACKEND_SET_MEMBERS], &mut found)?;
        read_set_entries(&v6.backend_slots, &v6.backend_set_members, [MAP_BACKEND_SLOTS_V6, MAP_BACKEND_SET_MEMBERS_V6], &mut found)?;
        for entry in self.source_ranges.iter() {
            let (key, _) = entry.map_err(map_err(MAP_LB_SOURCE_RANGES))?;
            // The prefix covers the service id (32 bits) and the range.
            let data = key.data();
            found.source_ranges.push((data.service_id, (IpAddr::V4(ip_from_be(data.ip)), key.prefix_len().saturating_sub(32) as u8)));
        }
        for entry in v6.source_ranges.iter() {
            let (key, _) = entry.map_err(map_err(MAP_LB_SOURCE_RANGES_V6))?;
            let data = key.data();
            found.source_ranges.push((data.service_id, (Ipv6(data.ip).ip(), key.prefix_len().saturating_sub(32) as u8)));
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
    fn put_backend_slot(&mut self, key: BackendSlotKey, backend: Endpoint) -> Result<()> {
        match IpFamily::of(backend.ip) {
            IpFamily::V4 => self.backend_slots.insert(key, to_backend(backend), 0).map_err(map_err(MAP_BACKEND_SLOTS)),
            IpFamily::V6 => self.ipv6.backend_slots.insert(key, to_backend(backend), 0).map_err(map_err(MAP_BACKEND_SLOTS_V6)),
        }
    }

    fn remove_backend_slot(&mut self, key: BackendSlotKey, backend: Endpoint) -> Result<()> {
        match IpFamily::of(backend.ip) {
            IpFamily::V4 => ignore_missing(self.backend_slots.remove(&key)).map_err(map_err(MAP_BACKEND_SLOTS)),
            IpFamily::V6 => ignore_missing(self.ipv6.backend_slots.remove(&key)).map_err(map_err(MAP_BACKEND_SLOTS_V6)),
        }
    }

    fn put_set_member(&mut self, backend_set: u32, backend: Endpoint, slot: u32) -> Result<()> {
        match IpFamily::of(backend.ip) {
            IpFamily::V4 => self.backend_set_members.insert(member(backend_set, backend), slot, 0).map_err(map_err(MAP_BACKEND_SET_MEMBERS)),
            IpFamily::V6 => self.ipv6.backend_set_members.insert(member(backend_set, backend), slot, 0).map_err(map_err(MAP_BACKEND_SET_MEMBERS_V6)),
        }
    }

    fn remove_set_member(&mut self, backend_set: u32, backend: Endpoint) -> Result<()> {
        match IpFamily::of(backend.ip) {
            IpFamily::V4 => ignore_missing(self.backend_set_members.remove(&member(backend_set, backend))).map_err(map_err(MAP_BACKEND_SET_MEMBERS)),
            IpFamily::V6 => {
                ignore_missing(self.ipv6.backend_set_members.remove(&member(backend_set, backend))).map_err(map_err(MAP_BACKEND_SET_MEMBERS_V6))
            }
        }
    }

    fn put_service_backend_set(&mut self, service_id: u32, backend_set: u32) -> Result<()> {
        self.service_backend_sets.set(service_id, backend_set, 0).map_err(map_err(MAP_SERVICE_BACKEND_SETS))
    }

    fn put_frontend(&mut self, frontend: Frontend, value: FrontendEntry) -> Result<()> {
        match IpFamily::of(frontend.ip) {
            IpFamily::V4 => self.frontends.insert(frontend_key(frontend), frontend_value(value), 0).map_err(map_err(MAP_SERVICE_FRONTENDS)),
            IpFamily::V6 => self.ipv6.frontends.insert(frontend_key(frontend), frontend_value(value), 0).map_err(map_err(MAP_SERVICE_FRONTENDS_V6)),
        }
    }

    fn remove_frontend(&mut self, frontend: Frontend) -> Result<()> {
        match IpFamily::of(frontend.ip) {
            IpFamily::V4 => ignore_missing(self.frontends.remove(&frontend_key(frontend))).map_err(map_err(MAP_SERVICE_FRONTENDS)),
            IpFamily::V6 => ignore_missing(self.ipv6.frontends.remove(&frontend_key(frontend))).map_err(map_err(MAP_SERVICE_FRONTENDS_V6)),
        }
    }

    fn put_service_vip(&mut self, ip: IpAddr, vip: VipValue) -> Result<()> {
        match IpFamily::of(ip) {
            IpFamily::V4 => self.service_vips.insert(u32::from_ip(ip), vip, 0).map_err(map_err(MAP_SERVICE_VIPS)),
            IpFamily::V6 => self.ipv6.service_vips.insert(Ipv6::from_ip(ip), vip, 0).map_err(map_err(MAP_SERVICE_VIPS_V6)),
        }
    }

    fn remove_service_vip(&mut self, ip: IpAddr) -> Result<()> {
        match IpFamily::of(ip) {
            IpFamily::V4 => ignore_missing(self.service_vips.remove(&u32::from_ip(ip))).map_err(map_err(MAP_SERVICE_VIPS)),
            IpFamily::V6 => ignore_missing(self.ipv6.service_vips.remove(&Ipv6::from_ip(ip))).map_err(map_err(MAP_SERVICE_VIPS_V6)),
        }
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

    fn put_source_range(&mut self, service_id: u32, (ip, len): (IpAddr, u8)) -> Result<()> {
        let prefix = SourceRangeKey::prefix_len(len);
        match IpFamily::of(ip) {
            IpFamily::V4 => {
                let key = Key::new(prefix, SourceRangeKey { service_id, ip: u32::from_ip(ip) });
                self.source_ranges.insert(&key, 1, 0).map_err(map_err(MAP_LB_SOURCE_RANGES))
            }
            IpFamily::V6 => {
                let key = Key::new(prefix, SourceRangeKey { service_id, ip: Ipv6::from_ip(ip).0 });
                self.ipv6.source_ranges.insert(&key, 1, 0).map_err(map_err(MAP_LB_SOURCE_RANGES_V6))
            }
        }
    }

    fn remove_source_range(&mut self, service_id: u32, (ip, len): (IpAddr, u8)) -> Result<()> {
        let prefix = SourceRangeKey::prefix_len(len);
        match IpFamily::of(ip) {
            IpFamily::V4 => {
                let key = Key::new(prefix, SourceRangeKey { service_id, ip: u32::from_ip(ip) });
                ignore_missing(self.source_ranges.remove(&key)).map_err(map_err(MAP_LB_SOURCE_RANGES))
            }
            IpFamily::V6 => {
                let key = Key::new(prefix, SourceRangeKey { service_id, ip: Ipv6::from_ip(ip).0 });
                ignore_missing(self.ipv6.source_ranges.remove(&key)).map_err(map_err(MAP_LB_SOURCE_RANGES_V6))
            }
        }
    }

    fn remove_service_flows(&mut self, service_ids: &BTreeSet<u32>) -> Result<usize> {
        let mut removed = 0;
        for (name, _, table) in self.conntrack.tables() {
            // Batched: a whole table in a few syscalls, not one per entry.
            let fd = table_fd(table);
            removed += conntrack::purge(fd, |_: &ConntrackKey, v: &ConntrackValue| service_ids.contains(&v.service_id))
                .map_err(|source| Error::Io { what: format!("removing the flows of deleted services from {name}"), source })?;
        }
        for (name, table) in self.ipv6.conntrack_tables() {
            let map: &MapData = aya::maps::IterableMap::map(table);
            let fd = std::os::fd::AsFd::as_fd(map.fd());
            removed += conntrack::purge(fd, |_: &ConntrackKey<Ipv6>, v: &ConntrackValue<Ipv6>| service_ids.contains(&v.service_id))
                .map_err(|source| Error::Io { what: format!("removing the flows of deleted services from {name}"), source })?;
        }
        Ok(removed)
    }
}

/// A family's address as its maps hold it, from and to the model's.
pub trait FamilyAddress: IpAddress {
    /// `ip` in this family's form; the unspecified address for an address
    /// of the other family (callers pick the family from the address).
    fn from_ip(ip: IpAddr) -> Self;
    fn ip(self) -> IpAddr;
}

impl FamilyAddress for u32 {
    fn from_ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(ip) => ip_be(ip),
            IpAddr::V6(_) => Self::UNSPECIFIED,
        }
    }

    fn ip(self) -> IpAddr {
        IpAddr::V4(ip_from_be(self))
    }
}

impl FamilyAddress for Ipv6 {
    fn from_ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V6(ip) => Ipv6::new(ip),
            IpAddr::V4(_) => Self::UNSPECIFIED,
        }
    }

    fn ip(self) -> IpAddr {
        IpAddr::V6(self.addr())
    }
}

fn to_backend<A: FamilyAddress>(endpoint: Endpoint) -> Backend<A> {
    Backend { ip: A::from_ip(endpoint.ip), port: endpoint.port.to_be(), _pad: 0, _pad_v6: A::Pad::default() }
}

fn to_endpoint<A: FamilyAddress>(backend: Backend<A>) -> Endpoint {
    Endpoint { ip: backend.ip.ip(), port: u16::from_be(backend.port) }
}

fn member<A: FamilyAddress>(backend_set: u32, backend: Endpoint) -> BackendSetMemberKey<A> {
    BackendSetMemberKey::new(backend_set, to_backend(backend))
}

fn frontend_key<A: FamilyAddress>(frontend: Frontend) -> FrontendKey<A> {
    FrontendKey { ip: A::from_ip(frontend.ip), port: frontend.port.to_be(), proto: frontend.protocol.ip_proto(), _pad: 0, _pad_v6: A::Pad::default() }
}

fn frontend_value<A: FamilyAddress>(entry: FrontendEntry) -> FrontendValue<A> {
    FrontendValue {
        service_id: entry.service_id,
        backend_set: entry.backend_set,
        backend_count: entry.backend_count,
        flags: entry.flags,
        affinity_seconds: entry.affinity_seconds,
        _pad_v6: A::Pad::default(),
        in_cluster_ip: entry.in_cluster_via.map_or(A::UNSPECIFIED, |(ip, _)| A::from_ip(ip)),
        in_cluster_port: entry.in_cluster_via.map_or(0, |(_, port)| port.to_be()),
        _pad: 0,
        _pad_v6_end: A::Pad::default(),
    }
}

/// A frontend as the model names it, with its value; `None` for a
/// protocol this agent does not write.
fn frontend_entry<A: FamilyAddress>(key: FrontendKey<A>, value: FrontendValue<A>) -> Option<(Frontend, FrontendEntry)> {
    let protocol = Protocol::from_number(key.proto)?;
    let frontend = Frontend { ip: key.ip.ip(), port: u16::from_be(key.port), protocol };
    let in_cluster_via = (!value.in_cluster_ip.is_unspecified()).then(|| (value.in_cluster_ip.ip(), u16::from_be(value.in_cluster_port)));
    let entry = FrontendEntry {
        service_id: value.service_id,
        backend_set: value.backend_set,
        backend_count: value.backend_count,
        flags: value.flags,
        affinity_seconds: value.affinity_seconds,
        in_cluster_via,
    };
    Some((frontend, entry))
}

fn read_frontends<A: FamilyAddress>(
    map: &HashMap<MapData, FrontendKey<A>, FrontendValue<A>>,
    name: &'static str,
    found: &mut ProgrammedMaps,
) -> Result<()>
where
    FrontendKey<A>: aya::Pod,
    FrontendValue<A>: aya::Pod,
{
    for entry in map.iter() {
        let (key, value) = entry.map_err(map_err(name))?;
        found.frontends.extend(frontend_entry(key, value));
    }
    Ok(())
}

fn read_vips<A: FamilyAddress + aya::Pod>(map: &HashMap<MapData, A, VipValue>, name: &'static str, found: &mut ProgrammedMaps) -> Result<()> {
    for key in map.keys() {
        found.vips.push(key.map_err(map_err(name))?.ip());
    }
    Ok(())
}

/// The slots and memberships of one family's backend sets.
fn read_set_entries<A: FamilyAddress>(
    slots: &HashMap<MapData, BackendSlotKey, Backend<A>>,
    members: &HashMap<MapData, BackendSetMemberKey<A>, u32>,
    [slots_name, members_name]: [&'static str; 2],
    found: &mut ProgrammedMaps,
) -> Result<()>
where
    Backend<A>: aya::Pod,
    BackendSetMemberKey<A>: aya::Pod,
{
    for entry in slots.iter() {
        let (key, backend) = entry.map_err(map_err(slots_name))?;
        found.slots.insert(key, to_endpoint(backend));
    }
    for entry in members.iter() {
        let (key, slot) = entry.map_err(map_err(members_name))?;
        found.members.insert((key.backend_set, to_endpoint(key.backend)), slot);
    }
    Ok(())
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
            // A node without IPv6 keeps its IPv6 tables small rather than
            // paying their preallocated size for nothing; with IPv6, each
            // has its IPv4 twin's size.
            MAP_DATAPATH_CONFIG_V6 => None,
            name if lb_common::IPV6_MAPS.contains(&name) && !self.limits.ipv6 => Some(IPV6_IDLE_ENTRIES),
            name => self.max_entries(name.strip_suffix("_V6")?),
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
