//! Typed handles on the datapath's maps, and the map writes the syncer
//! issues through `sync::MapWriter`.
use std::{collections::BTreeSet, path::Path};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use lb_common::{
    Backend, BackendSetMemberKey, BackendSlotKey, ConntrackKey, ConntrackValue, FrontendKey,
    FrontendValue, MAP_BACKEND_SET_MEMBERS, MAP_BACKEND_SLOTS, MAP_CONNTRACK,
    MAP_SERVICE_BACKEND_SETS, MAP_SERVICE_COUNTERS, MAP_SERVICE_FRONTENDS, MAP_SERVICE_VIPS,
    MAP_SERVICE_NAMES, MAP_VERDICT_COUNTERS, MAX_SERVICES, Reason, ServiceCounters, ServiceName,
};

/// BPF_F_NO_PREALLOC: entries are allocated as written, not up front.
const BPF_F_NO_PREALLOC: u32 = 1;

use crate::{
    error::{Error, Result},
    sync::MapWriter,
};

/// The maps declared in the eBPF object.
pub const OBJECT_MAPS: [&str; 8] = [
    MAP_SERVICE_FRONTENDS,
    MAP_SERVICE_VIPS,
    MAP_BACKEND_SLOTS,
    MAP_BACKEND_SET_MEMBERS,
    MAP_SERVICE_BACKEND_SETS,
    MAP_CONNTRACK,
    MAP_SERVICE_COUNTERS,
    MAP_VERDICT_COUNTERS,
];

pub struct DatapathMaps {
    pub frontends: HashMap<MapData, FrontendKey, FrontendValue>,
    pub service_vips: HashMap<MapData, u32, u32>,
    pub backend_slots: HashMap<MapData, BackendSlotKey, Backend>,
    pub backend_set_members: HashMap<MapData, BackendSetMemberKey, u32>,
    pub service_backend_sets: Array<MapData, u32>,
    pub conntrack: HashMap<MapData, ConntrackKey, ConntrackValue>,
    pub service_counters: PerCpuArray<MapData, ServiceCounters>,
    pub verdict_counters: PerCpuArray<MapData, u64>,
    /// Not in the object: created by the agent, for inspection tools.
    pub service_names: HashMap<MapData, u32, ServiceName>,
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
    pub fn take(ebpf: &mut Ebpf, pin_dir: Option<&Path>) -> Result<Self> {
        Ok(Self {
            frontends: take(ebpf, MAP_SERVICE_FRONTENDS)?,
            service_vips: take(ebpf, MAP_SERVICE_VIPS)?,
            backend_slots: take(ebpf, MAP_BACKEND_SLOTS)?,
            backend_set_members: take(ebpf, MAP_BACKEND_SET_MEMBERS)?,
            service_backend_sets: take(ebpf, MAP_SERVICE_BACKEND_SETS)?,
            conntrack: take(ebpf, MAP_CONNTRACK)?,
            service_counters: take(ebpf, MAP_SERVICE_COUNTERS)?,
            verdict_counters: take(ebpf, MAP_VERDICT_COUNTERS)?,
            service_names: service_names(pin_dir)?,
        })
    }

    /// Pins every map of the object as `dir/NAME`.
    pub fn pin_all(ebpf: &Ebpf, dir: &Path) -> Result<()> {
        for name in OBJECT_MAPS {
            let map = ebpf.map(name).ok_or(Error::Missing(name))?;
            map.pin(dir.join(name))
                .map_err(|e| Error::Pin { path: dir.join(name), reason: e.to_string() })?;
        }
        Ok(())
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

    fn put_service_vip(&mut self, ip: u32, frontends: u32) -> Result<()> {
        self.service_vips.insert(ip, frontends, 0).map_err(map_err(MAP_SERVICE_VIPS))
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

    fn remove_service_flows(&mut self, service_ids: &BTreeSet<u32>) -> Result<usize> {
        let stale: Vec<ConntrackKey> = self
            .conntrack
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(_, v)| service_ids.contains(&v.service_id))
            .map(|(k, _)| k)
            .collect();
        for key in &stale {
            ignore_missing(self.conntrack.remove(key)).map_err(map_err(MAP_CONNTRACK))?;
        }
        Ok(stale.len())
    }
}

/// `SERVICE_NAMES`, created empty (and pinned, then used through its pin).
fn service_names(pin_dir: Option<&Path>) -> Result<HashMap<MapData, u32, ServiceName>> {
    let created = HashMap::<MapData, u32, ServiceName>::create(MAX_SERVICES, BPF_F_NO_PREALLOC)
        .map_err(map_err(MAP_SERVICE_NAMES))?;
    let Some(dir) = pin_dir else { return Ok(created) };
    let path = dir.join(MAP_SERVICE_NAMES);
    created.pin(&path).map_err(|e| Error::Pin { path: path.clone(), reason: e.to_string() })?;
    let pinned = MapData::from_pin(&path).map_err(map_err(MAP_SERVICE_NAMES))?;
    HashMap::try_from(Map::HashMap(pinned)).map_err(map_err(MAP_SERVICE_NAMES))
}

/// A key that is already gone is what a removal wants.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
