//! The syncer: keeps the BPF maps equal to the desired state.
//!
//! It diffs the desired state against what it has programmed and writes only
//! the difference, in an order that never lets the datapath see a half-written
//! backend set.
//!
//! A service port whose endpoints change gets a whole new backend set (slots
//! and memberships) under a fresh id; its frontends and its entry in
//! `SERVICE_BACKEND_SETS` are then pointed at it, one atomic map update each,
//! and only after that is the old set deleted. An established flow whose
//! backend is in the new set finds it there and stays; one whose backend
//! left finds it in neither and is rescheduled.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::{
    BackendSlotKey, DRAINING_SLOT, FRONTEND_DROP_WHEN_EMPTY, FRONTEND_SNAT, FRONTEND_SOURCE_RANGES, MAX_BACKEND_SLOTS,
    MAX_FRONTENDS, MAX_SERVICES, MAX_SOURCE_RANGES, MAX_VIPS, NO_BACKEND_SET, ServiceName, VIP_CLUSTER_IP, VipValue,
};

use crate::{
    error::{Error, Result},
    model::{DesiredState, Endpoint, Frontend, IpFamily, Protocol, ServicePort, ServicePortName},
};

mod adopt;
pub use adopt::{AdoptReport, ProgrammedMaps};

/// The map writes the syncer needs, in the model's terms for either
/// family (the real maps write each to its family's map); implemented by
/// the real maps and, in tests, by an in-memory model that checks the
/// ordering guarantees.
pub trait MapWriter {
    /// Slot `key.slot` of backend set `key.backend_set` (in `backend`'s
    /// family's `BACKEND_SLOTS`).
    fn put_backend_slot(&mut self, key: BackendSlotKey, backend: Endpoint) -> Result<()>;
    fn remove_backend_slot(&mut self, key: BackendSlotKey, backend: Endpoint) -> Result<()>;
    /// `backend`'s membership in `backend_set`, with its slot.
    fn put_set_member(&mut self, backend_set: u32, backend: Endpoint, slot: u32) -> Result<()>;
    fn remove_set_member(&mut self, backend_set: u32, backend: Endpoint) -> Result<()>;
    fn put_service_backend_set(&mut self, service_id: u32, backend_set: u32) -> Result<()>;
    fn put_frontend(&mut self, frontend: Frontend, value: FrontendEntry) -> Result<()>;
    fn remove_frontend(&mut self, frontend: Frontend) -> Result<()>;
    fn put_service_vip(&mut self, ip: IpAddr, vip: VipValue) -> Result<()>;
    fn remove_service_vip(&mut self, ip: IpAddr) -> Result<()>;
    fn reset_service_counters(&mut self, service_id: u32) -> Result<()>;
    fn put_service_name(&mut self, service_id: u32, name: ServiceName) -> Result<()>;
    fn remove_service_name(&mut self, service_id: u32) -> Result<()>;
    /// A loadBalancerSourceRanges range of a service (address masked, of
    /// `range.1` bits).
    fn put_source_range(&mut self, service_id: u32, range: (IpAddr, u8)) -> Result<()>;
    fn remove_source_range(&mut self, service_id: u32, range: (IpAddr, u8)) -> Result<()>;
    /// Removes the conntrack entries of these services (one pass over the
    /// table, however many services); returns how many.
    fn remove_service_flows(&mut self, service_ids: &BTreeSet<u32>) -> Result<usize>;
}

/// A frontend's value in the model's terms: lb-common's `FrontendValue` of
/// the frontend's family, with the in-cluster frontend as an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendEntry {
    pub service_id: u32,
    pub backend_set: u32,
    pub backend_count: u32,
    /// `FRONTEND_*` bits.
    pub flags: u32,
    pub affinity_seconds: u32,
    /// The external side of an externalTrafficPolicy Local service: the
    /// cluster IP frontend its in-cluster clients are served by.
    pub in_cluster_via: Option<(IpAddr, u16)>,
}

/// What one `apply` changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Service ports left out (or left as they were) because the maps
    /// cannot hold them: see `Syncer::over_capacity`.
    pub over_capacity: usize,
}

/// How many entries the maps the syncer fills hold: their `max_entries`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Service ids (`SERVICE_BACKEND_SETS`, `SERVICE_COUNTERS`, `SERVICE_NAMES`).
    pub service_ports: u32,
    /// `SERVICE_FRONTENDS`.
    pub frontends: u32,
    /// `SERVICE_VIPS`: distinct service addresses.
    pub addresses: u32,
    /// `BACKEND_SLOTS` and `BACKEND_SET_MEMBERS` each.
    pub backend_slots: u32,
    /// `LB_SOURCE_RANGES`.
    pub source_ranges: u32,
    /// The IPv6 twins of these maps have the same sizes; without IPv6 on
    /// the node, `IPV6_IDLE_ENTRIES` each instead.
    pub ipv6: bool,
}

/// Entries of each IPv6 table on a node without IPv6 (no IPv6 node
/// address or cluster range): IPv6 cluster IPs still work, at a fraction
/// of the memory of full-size tables.
pub const IPV6_IDLE_ENTRIES: u32 = 1024;

impl Limits {
    /// The sizes of `family`'s maps.
    pub fn of(self, family: IpFamily) -> Self {
        match family {
            IpFamily::V6 if !self.ipv6 => Self {
                frontends: self.frontends.min(IPV6_IDLE_ENTRIES),
                addresses: self.addresses.min(IPV6_IDLE_ENTRIES),
                backend_slots: self.backend_slots.min(IPV6_IDLE_ENTRIES),
                source_ranges: self.source_ranges.min(IPV6_IDLE_ENTRIES),
                ..self
            },
            _ => self,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            service_ports: MAX_SERVICES,
            frontends: MAX_FRONTENDS,
            addresses: MAX_VIPS,
            backend_slots: MAX_BACKEND_SLOTS,
            source_ranges: MAX_SOURCE_RANGES,
            ipv6: false,
        }
    }
}

/// Entries the syncer has written to one family's maps it sizes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Usage {
    frontends: u32,
    addresses: u32,
    slots: u32,
    members: u32,
    source_ranges: u32,
}

/// A service port as programmed.
#[derive(Debug)]
struct Programmed {
    id: u32,
    set: u32,
    frontends: BTreeSet<Frontend>,
    backends: BackendSet,
}

/// What a backend set holds: endpoints in slot order, and draining ones;
/// with how the frontends using it treat traffic.
#[derive(Debug, PartialEq, Eq)]
struct BackendSet {
    endpoints: Vec<Endpoint>,
    draining: Vec<Endpoint>,
    drop_when_empty: bool,
    snat: bool,
    affinity_seconds: u32,
    in_cluster_via: Option<(IpAddr, u16)>,
    /// loadBalancerSourceRanges, and the addresses they restrict.
    source_ranges: BTreeSet<(IpAddr, u8)>,
    source_ranged: BTreeSet<IpAddr>,
}

impl BackendSet {
    fn of(service: &ServicePort) -> Self {
        Self {
            endpoints: service.endpoints.iter().copied().collect(),
            draining: service.draining.iter().copied().collect(),
            drop_when_empty: service.drop_when_empty,
            snat: service.snat,
            affinity_seconds: service.affinity_seconds,
            in_cluster_via: service.in_cluster_via,
            source_ranges: service.source_ranges.clone(),
            source_ranged: service.source_ranged.clone(),
        }
    }
}

/// The frontends on one address: how many, and how many of them are
/// cluster IPs (which make the address reject ports it does not serve).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct VipUse {
    frontends: u32,
    cluster: u32,
}

impl VipUse {
    fn value(self) -> VipValue {
        VipValue { frontends: self.frontends, flags: if self.cluster > 0 { VIP_CLUSTER_IP } else { 0 } }
    }
}

#[derive(Debug)]
pub struct Syncer {
    programmed: BTreeMap<ServicePortName, Programmed>,
    frontends_per_vip: BTreeMap<IpAddr, VipUse>,
    /// Which service port's value each frontend holds. Two service ports
    /// may claim one frontend (two services sharing an external IP and
    /// port): the first keeps it, and when it lets go, another claimant
    /// takes it over in place.
    frontend_owner: BTreeMap<Frontend, ServicePortName>,
    /// The other claimants of a held frontend, in name order.
    frontend_waiting: BTreeMap<Frontend, BTreeSet<ServicePortName>>,
    limits: Limits,
    /// Per family, indexed by `IpFamily`.
    used: [Usage; 2],
    /// Service ports the maps could not hold at the last sync, and why;
    /// tried again at every sync.
    over_capacity: BTreeMap<ServicePortName, String>,
    /// Service ids never used yet start at `next_id`; freed ones are reused
    /// oldest first, so an id is not reused while its old flows may linger.
    free_ids: VecDeque<u32>,
    next_id: u32,
    next_set: u32,
}

impl Default for Syncer {
    fn default() -> Self {
        Self::new()
    }
}

impl Syncer {
    /// A syncer for maps of the object's own sizes.
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// A syncer for maps of `limits`' sizes.
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            programmed: BTreeMap::new(),
            frontends_per_vip: BTreeMap::new(),
            frontend_owner: BTreeMap::new(),
            frontend_waiting: BTreeMap::new(),
            limits,
            used: Default::default(),
            over_capacity: BTreeMap::new(),
            free_ids: VecDeque::new(),
            next_id: 0,
            next_set: 1,
        }
    }

    /// The service ports the maps could not hold at the last sync, each
    /// with what it needed and the limit it hit. A new one is not
    /// programmed; a programmed one whose change did not fit keeps serving
    /// as it was.
    pub fn over_capacity(&self) -> &BTreeMap<ServicePortName, String> {
        &self.over_capacity
    }

    /// The id (index of its counters) of a programmed service port.
    pub fn service_id(&self, name: &ServicePortName) -> Option<u32> {
        self.programmed.get(name).map(|p| p.id)
    }

    /// The service ports programmed.
    pub fn programmed_names(&self) -> impl Iterator<Item = &ServicePortName> {
        self.programmed.keys()
    }

    /// Whether `backend` still serves the frontend `ip`:`port` over
    /// `protocol` (`None`: either) for a socket the socket programs
    /// translated: a member of its service port's set, draining included
    /// (which only TCP ports keep), where an externalTrafficPolicy Local
    /// address sends the node to its cluster IP frontend as the socket
    /// programs do. False once the frontend is gone.
    pub fn socket_backend_serves(&self, (ip, port): (IpAddr, u16), protocol: Option<Protocol>, backend: Endpoint) -> bool {
        let programmed_at = |ip: IpAddr, port: u16, protocol: Protocol| {
            let name = self.frontend_owner.get(&Frontend { ip, port, protocol })?;
            self.programmed.get(name)
        };
        let protocols = match protocol {
            Some(protocol) => vec![protocol],
            None => vec![Protocol::Tcp, Protocol::Udp],
        };
        protocols.into_iter().any(|protocol| {
            let Some(mut p) = programmed_at(ip, port, protocol) else { return false };
            if let Some((cluster_ip, cluster_port)) = p.backends.in_cluster_via
                && let Some(in_cluster) = programmed_at(cluster_ip, cluster_port, protocol)
            {
                p = in_cluster;
            }
            p.backends.endpoints.contains(&backend) || p.backends.draining.contains(&backend)
        })
    }

    /// Makes the maps equal to `desired`, comparing every service port.
    pub fn apply(&mut self, desired: &DesiredState, maps: &mut impl MapWriter) -> Result<SyncReport> {
        let names: BTreeSet<ServicePortName> = self.programmed.keys().chain(desired.services.keys()).cloned().collect();
        self.apply_changes(desired, &names, maps)
    }

    /// Makes the maps equal to `desired` for the service ports in `names`
    /// (the ones that may have changed) and the ones that did not fit
    /// before; the others are left alone. A service port the maps cannot
    /// hold is left out (see `over_capacity`) while every other one is
    /// programmed.
    pub fn apply_changes(
        &mut self,
        desired: &DesiredState,
        names: &BTreeSet<ServicePortName>,
        maps: &mut impl MapWriter,
    ) -> Result<SyncReport> {
        let retried = std::mem::take(&mut self.over_capacity);
        let all_names;
        let names = if retried.is_empty() {
            names
        } else {
            all_names = names.iter().chain(retried.keys()).cloned().collect::<BTreeSet<_>>();
            &all_names
        };
        let mut report = SyncReport::default();
        // Removals first: they free map capacity for the additions. Their
        // ids are reused only after their flows are gone.
        let mut removed_ids = BTreeSet::new();
        for name in names {
            if !desired.services.contains_key(name)
                && let Some(id) = self.remove(name, maps)?
            {
                removed_ids.insert(id);
                report.removed += 1;
            }
        }
        if !removed_ids.is_empty() {
            maps.remove_service_flows(&removed_ids)?;
            self.free_ids.extend(removed_ids);
        }
        for name in names {
            let Some(service) = desired.services.get(name) else { continue };
            let current = self.programmed.get(name);
            if current.is_some_and(|p| p.frontends == service.frontends && p.backends == BackendSet::of(service)) {
                report.unchanged += 1;
                continue;
            }
            if let Some(shortfall) = self.shortfall(name, service, current) {
                self.over_capacity.insert(name.clone(), shortfall);
                report.over_capacity += 1;
                continue;
            }
            if current.is_none() {
                self.add(name, service, maps)?;
                report.added += 1;
            } else {
                self.update(name, service, maps)?;
                report.updated += 1;
            }
        }
        Ok(report)
    }

    /// What writing `service` (over `current`, as programmed) needs beyond
    /// what the maps have free, in words; `None` when it fits. A changed
    /// backend set is written whole before the old one is deleted, so both
    /// are counted.
    fn shortfall(&self, name: &ServicePortName, service: &ServicePort, current: Option<&Programmed>) -> Option<String> {
        let backends = BackendSet::of(service);
        let (limits, used) = (self.limits.of(name.family), self.used[name.family as usize]);
        let new_set = current.is_none_or(|p| p.backends != backends);
        let (slots, members) =
            if new_set { (backends.endpoints.len(), backends.endpoints.len() + backends.draining.len()) } else { (0, 0) };
        let new_frontends: Vec<&Frontend> =
            service.frontends.iter().filter(|f| current.is_none_or(|p| !p.frontends.contains(f))).collect();
        let new_addresses: BTreeSet<IpAddr> =
            new_frontends.iter().map(|f| f.ip).filter(|ip| !self.frontends_per_vip.contains_key(ip)).collect();
        let new_ranges = backends.source_ranges.iter().filter(|r| current.is_none_or(|p| !p.backends.source_ranges.contains(r))).count();
        let ids_used = self.next_id - self.free_ids.len() as u32;
        let needs = [
            (u32::from(current.is_none()), ids_used, self.limits.service_ports, "service ports", "--service-ports-max"),
            (new_frontends.len() as u32, used.frontends, limits.frontends, "frontends", "--frontends-max"),
            (new_addresses.len() as u32, used.addresses, limits.addresses, "service addresses", "--service-addresses-max"),
            (slots as u32, used.slots, limits.backend_slots, "backend slots", "--backend-slots-max"),
            (members as u32, used.members, limits.backend_slots, "backend set members", "--backend-slots-max"),
            (new_ranges as u32, used.source_ranges, limits.source_ranges, "loadBalancerSourceRanges entries", "the object's LB_SOURCE_RANGES size"),
        ];
        // A node without IPv6 keeps its IPv6 tables small whatever the
        // flags say: what raises them is giving it IPv6.
        let idle_ipv6 = name.family == IpFamily::V6 && !self.limits.ipv6;
        needs.into_iter().find(|&(need, used, limit, ..)| need > limit.saturating_sub(used)).map(|(need, used, limit, what, flag)| {
            let flag = if idle_ipv6 && what != "service ports" { "the IPv6 tables' size on a node without IPv6: give it an IPv6 --node-ip" } else { flag };
            format!("{what}: needs {need}, {} of {limit} free ({flag})", limit.saturating_sub(used))
        })
    }

    fn add(&mut self, name: &ServicePortName, service: &ServicePort, maps: &mut impl MapWriter) -> Result<()> {
        let id = self.allocate_id()?;
        maps.reset_service_counters(id)?;
        let proto = service.frontends.first().map_or(0, |f| f.protocol.ip_proto());
        maps.put_service_name(id, ServiceName::new(&name.to_string(), proto))?;
        let backends = BackendSet::of(service);
        let set = self.write_set(name.family, &backends, maps)?;
        maps.put_service_backend_set(id, set)?;
        self.put_source_ranges(id, name.family, backends.source_ranges.iter(), maps)?;
        for frontend in &service.frontends {
            self.add_frontend(name, frontend, frontend_value(id, set, &backends, frontend), maps)?;
        }
        self.programmed.insert(name.clone(), Programmed { id, set, frontends: service.frontends.clone(), backends });
        Ok(())
    }

    fn update(&mut self, name: &ServicePortName, service: &ServicePort, maps: &mut impl MapWriter) -> Result<()> {
        let Some(mut p) = self.programmed.remove(name) else { return Ok(()) };
        let backends = BackendSet::of(service);
        let endpoints_changed = p.backends != backends;
        let old = endpoints_changed.then(|| -> Result<_> {
            let new_set = self.write_set(name.family, &backends, maps)?;
            Ok((std::mem::replace(&mut p.set, new_set), std::mem::replace(&mut p.backends, backends)))
        });
        let old = old.transpose()?;
        // New ranges before a frontend relies on them; stale ones after.
        if let Some((_, old_backends)) = &old {
            self.put_source_ranges(p.id, name.family, p.backends.source_ranges.difference(&old_backends.source_ranges), maps)?;
        }
        for frontend in p.frontends.difference(&service.frontends) {
            self.remove_frontend(name, frontend, maps)?;
        }
        for frontend in &service.frontends {
            let value = frontend_value(p.id, p.set, &p.backends, frontend);
            if !p.frontends.contains(frontend) {
                self.add_frontend(name, frontend, value, maps)?;
            } else if endpoints_changed && self.frontend_owner.get(frontend) == Some(name) {
                maps.put_frontend(*frontend, value)?;
            }
        }
        if let Some((old_set, old_backends)) = old {
            maps.put_service_backend_set(p.id, p.set)?;
            self.remove_source_ranges(p.id, name.family, old_backends.source_ranges.difference(&p.backends.source_ranges), maps)?;
            self.delete_set(name.family, old_set, &old_backends, maps)?;
        }
        p.frontends = service.frontends.clone();
        self.programmed.insert(name.clone(), p);
        Ok(())
    }

    /// Unprograms a service port; returns its id, for the caller to purge
    /// its flows and free it.
    fn remove(&mut self, name: &ServicePortName, maps: &mut impl MapWriter) -> Result<Option<u32>> {
        let Some(p) = self.programmed.remove(name) else { return Ok(None) };
        for frontend in &p.frontends {
            self.remove_frontend(name, frontend, maps)?;
        }
        maps.put_service_backend_set(p.id, NO_BACKEND_SET)?;
        self.remove_source_ranges(p.id, name.family, p.backends.source_ranges.iter(), maps)?;
        self.delete_set(name.family, p.set, &p.backends, maps)?;
        maps.remove_service_name(p.id)?;
        Ok(Some(p.id))
    }

    /// Writes a complete backend set (slots and memberships, draining
    /// endpoints as members without a slot) under a fresh id and returns
    /// the id.
    fn write_set(&mut self, family: IpFamily, backends: &BackendSet, maps: &mut impl MapWriter) -> Result<u32> {
        let set = self.next_set;
        self.next_set = self.next_set.wrapping_add(1).max(NO_BACKEND_SET + 1);
        for (slot, &endpoint) in backends.endpoints.iter().enumerate() {
            let slot = slot as u32;
            maps.put_backend_slot(BackendSlotKey { backend_set: set, slot }, endpoint)?;
            maps.put_set_member(set, endpoint, slot)?;
        }
        for &endpoint in &backends.draining {
            maps.put_set_member(set, endpoint, DRAINING_SLOT)?;
        }
        let used = &mut self.used[family as usize];
        used.slots += backends.endpoints.len() as u32;
        used.members += (backends.endpoints.len() + backends.draining.len()) as u32;
        Ok(set)
    }

    /// Deletes a backend set no frontend or service points at any more.
    fn delete_set(&mut self, family: IpFamily, set: u32, backends: &BackendSet, maps: &mut impl MapWriter) -> Result<()> {
        for (slot, &endpoint) in backends.endpoints.iter().enumerate() {
            maps.remove_backend_slot(BackendSlotKey { backend_set: set, slot: slot as u32 }, endpoint)?;
            maps.remove_set_member(set, endpoint)?;
        }
        for &endpoint in &backends.draining {
            maps.remove_set_member(set, endpoint)?;
        }
        let used = &mut self.used[family as usize];
        used.slots -= backends.endpoints.len() as u32;
        used.members -= (backends.endpoints.len() + backends.draining.len()) as u32;
        Ok(())
    }

    fn put_source_ranges<'a>(
        &mut self,
        id: u32,
        family: IpFamily,
        ranges: impl Iterator<Item = &'a (IpAddr, u8)>,
        maps: &mut impl MapWriter,
    ) -> Result<()> {
        for &range in ranges {
            maps.put_source_range(id, range)?;
            self.used[family as usize].source_ranges += 1;
        }
        Ok(())
    }

    fn remove_source_ranges<'a>(
        &mut self,
        id: u32,
        family: IpFamily,
        ranges: impl Iterator<Item = &'a (IpAddr, u8)>,
        maps: &mut impl MapWriter,
    ) -> Result<()> {
        for &range in ranges {
            maps.remove_source_range(id, range)?;
            self.used[family as usize].source_ranges -= 1;
        }
        Ok(())
    }

    /// Writes `frontend` for the service port `name`, unless another holds
    /// it (that one keeps it; `name` takes over when it lets go).
    fn add_frontend(&mut self, name: &ServicePortName, frontend: &Frontend, value: FrontendEntry, maps: &mut impl MapWriter) -> Result<()> {
        if self.frontend_owner.get(frontend).is_some_and(|owner| owner != name) {
            self.frontend_waiting.entry(*frontend).or_default().insert(name.clone());
            return Ok(());
        }
        self.frontend_owner.insert(*frontend, name.clone());
        let used = &mut self.used[IpFamily::of(frontend.ip) as usize];
        let vip = self.frontends_per_vip.entry(frontend.ip).or_default();
        used.addresses += u32::from(vip.frontends == 0);
        vip.frontends += 1;
        vip.cluster += u32::from(!name.external);
        maps.put_service_vip(frontend.ip, vip.value())?;
        used.frontends += 1;
        maps.put_frontend(*frontend, value)
    }

    /// Lets go of `frontend` for the service port `name`: another service
    /// port claiming it takes it over in place (one map update, no moment
    /// without it); else it is deleted.
    fn remove_frontend(&mut self, name: &ServicePortName, frontend: &Frontend, maps: &mut impl MapWriter) -> Result<()> {
        if self.frontend_owner.get(frontend) != Some(name) {
            if let Some(waiting) = self.frontend_waiting.get_mut(frontend) {
                waiting.remove(name);
                if waiting.is_empty() {
                    self.frontend_waiting.remove(frontend);
                }
            }
            return Ok(());
        }
        let heir = self.frontend_waiting.get_mut(frontend).and_then(BTreeSet::pop_first);
        if self.frontend_waiting.get(frontend).is_some_and(BTreeSet::is_empty) {
            self.frontend_waiting.remove(frontend);
        }
        if let Some((heir, p)) = heir.and_then(|heir| self.programmed.get(&heir).map(|p| (heir, p))) {
            let value = frontend_value(p.id, p.set, &p.backends, frontend);
            let vip = self.frontends_per_vip.entry(frontend.ip).or_default();
            vip.cluster = vip.cluster - u32::from(!name.external) + u32::from(!heir.external);
            let vip_value = vip.value();
            self.frontend_owner.insert(*frontend, heir);
            maps.put_service_vip(frontend.ip, vip_value)?;
            return maps.put_frontend(*frontend, value);
        }
        self.frontend_owner.remove(frontend);
        let cluster_ip = !name.external;
        maps.remove_frontend(*frontend)?;
        let used = &mut self.used[IpFamily::of(frontend.ip) as usize];
        used.frontends -= 1;
        let vip = self.frontends_per_vip.entry(frontend.ip).or_default();
        vip.frontends = vip.frontends.saturating_sub(1);
        vip.cluster = vip.cluster.saturating_sub(u32::from(cluster_ip));
        if vip.frontends == 0 {
            self.frontends_per_vip.remove(&frontend.ip);
            used.addresses -= 1;
            maps.remove_service_vip(frontend.ip)
        } else {
            let value = vip.value();
            maps.put_service_vip(frontend.ip, value)
        }
    }

    fn allocate_id(&mut self) -> Result<u32> {
        if let Some(id) = self.free_ids.pop_front() {
            return Ok(id);
        }
        if self.next_id >= self.limits.service_ports {
            return Err(Error::Capacity { what: "service ports", limit: self.limits.service_ports });
        }
        self.next_id += 1;
        Ok(self.next_id - 1)
    }
}

/// The value of `frontend`, one of a service port's frontends.
fn frontend_value(service_id: u32, set: u32, backends: &BackendSet, frontend: &Frontend) -> FrontendEntry {
    FrontendEntry {
        service_id,
        backend_set: set,
        backend_count: backends.endpoints.len() as u32,
        flags: if backends.drop_when_empty { FRONTEND_DROP_WHEN_EMPTY } else { 0 }
            | if backends.snat { FRONTEND_SNAT } else { 0 }
            | if backends.source_ranged.contains(&frontend.ip) { FRONTEND_SOURCE_RANGES } else { 0 },
        affinity_seconds: backends.affinity_seconds,
        in_cluster_via: backends.in_cluster_via,
    }
}

/// Bounds how often the maps are synced without delaying a lone change: a
/// token bucket holding `burst` syncs, refilled one per `interval` (as
/// kube-proxy's bounded-frequency runner with its burst of syncs). Changes
/// that arrive while a sync waits are applied together by it.
#[derive(Debug)]
pub struct SyncLimiter {
    burst: f64,
    interval: Duration,
    tokens: f64,
    updated: Instant,
}

impl SyncLimiter {
    pub fn new(burst: u32, interval: Duration, now: Instant) -> Self {
        Self { burst: f64::from(burst), interval, tokens: f64::from(burst), updated: now }
    }

    /// How long the next sync has to wait from `now`.
    pub fn delay(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 || self.interval.is_zero() {
            Duration::ZERO
        } else {
            self.interval.mul_f64(1.0 - self.tokens)
        }
    }

    /// Records a sync made at `now`.
    pub fn record(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    fn refill(&mut self, now: Instant) {
        if !self.interval.is_zero() {
            let earned = now.saturating_duration_since(self.updated).as_secs_f64() / self.interval.as_secs_f64();
            self.tokens = (self.tokens + earned).min(self.burst);
        }
        self.updated = now;
    }
}

#[cfg(test)]
mod tests;
