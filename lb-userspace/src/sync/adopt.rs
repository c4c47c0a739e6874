//! Adopting what a previous agent programmed, so a restarted agent rewrites only what changed.
//!
//! The syncer's bookkeeping is rebuilt from the pinned maps, so that a
//! restarted agent's first sync writes only what changed while it was away, and
//! established flows keep their backend sets.
//!
//! A service port is adopted when its pieces agree: a name, a current
//! backend set, frontends pointing at that set, and a complete set. Pieces
//! that belong to no adopted service (left by a crash halfway through a
//! write, or by an incompatible map) are deleted; a partly written service
//! is then simply programmed again by the first sync.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use lb_common::{BackendSlotKey, DRAINING_SLOT, FRONTEND_DROP_WHEN_EMPTY, FRONTEND_SNAT, FRONTEND_SOURCE_RANGES, NO_BACKEND_SET, ServiceName};

use super::{BackendSet, FrontendEntry, Limits, MapWriter, Programmed, Syncer};
use crate::{
    error::Result,
    model::{Endpoint, Frontend, IpFamily, ServicePortName},
};

/// The contents of the maps the syncer writes, both families, as read
/// back at start, in the model's terms.
#[derive(Debug, Default)]
pub struct ProgrammedMaps {
    pub names: BTreeMap<u32, ServiceName>,
    /// `SERVICE_BACKEND_SETS` entries other than `NO_BACKEND_SET`.
    pub service_sets: BTreeMap<u32, u32>,
    pub frontends: Vec<(Frontend, FrontendEntry)>,
    pub vips: Vec<IpAddr>,
    /// Backend set ids are shared by the families: a set's slots are in
    /// one family's map.
    pub slots: HashMap<BackendSlotKey, Endpoint>,
    /// (backend set, member) → slot.
    pub members: HashMap<(u32, Endpoint), u32>,
    /// Source ranges by service id.
    pub source_ranges: Vec<(u32, (IpAddr, u8))>,
}

/// What adoption found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AdoptReport {
    /// Service ports taken over as they were.
    pub adopted: usize,
    /// Service ids whose pieces did not agree; deleted (flows included), to
    /// be programmed again by the first sync if still wanted.
    pub discarded: usize,
}

impl Syncer {
    /// A syncer for maps of `limits`' sizes that owns what `found` holds,
    /// after deleting from `maps` whatever belongs to no adoptable service
    /// port.
    pub fn adopt(found: &ProgrammedMaps, maps: &mut impl MapWriter, limits: Limits) -> Result<(Self, AdoptReport)> {
        let mut syncer = Syncer::with_limits(limits);
        let mut frontends_of: BTreeMap<u32, Vec<(Frontend, FrontendEntry)>> = BTreeMap::new();
        for &(key, value) in &found.frontends {
            frontends_of.entry(value.service_id).or_default().push((key, value));
        }
        for (&id, name) in &found.names {
            let frontends = frontends_of.get(&id).map_or(&[][..], Vec::as_slice);
            if let Some((port_name, programmed)) = adoptable(id, name, found, frontends) {
                syncer.programmed.insert(port_name, programmed);
            }
        }

        let adopted_ids: BTreeSet<u32> = syncer.programmed.values().map(|p| p.id).collect();
        let adopted_sets: BTreeSet<u32> = syncer.programmed.values().map(|p| p.set).collect();
        for (name, p) in &syncer.programmed {
            let used = &mut syncer.used[name.family as usize];
            used.frontends += p.frontends.len() as u32;
            syncer.frontend_owner.extend(p.frontends.iter().map(|f| (*f, name.clone())));
            used.source_ranges += p.backends.source_ranges.len() as u32;
            used.slots += p.backends.endpoints.len() as u32;
            used.members += (p.backends.endpoints.len() + p.backends.draining.len()) as u32;
            for frontend in &p.frontends {
                let vip = syncer.frontends_per_vip.entry(frontend.ip).or_default();
                used.addresses += u32::from(vip.frontends == 0);
                vip.frontends += 1;
                vip.cluster += u32::from(!name.external);
            }
        }

        // Everything else goes, frontends first so that nothing in use
        // points at what is deleted after them.
        for &(frontend, value) in &found.frontends {
            if !adopted_ids.contains(&value.service_id) {
                maps.remove_frontend(frontend)?;
            }
        }
        for &vip in &found.vips {
            match syncer.frontends_per_vip.get(&vip) {
                Some(vip_use) => maps.put_service_vip(vip, vip_use.value())?,
                None => maps.remove_service_vip(vip)?,
            }
        }
        let discarded: BTreeSet<u32> = found
            .names
            .keys()
            .chain(found.service_sets.keys())
            .chain(frontends_of.keys())
            .copied()
            .filter(|id| !adopted_ids.contains(id))
            .collect();
        for &id in &discarded {
            maps.put_service_backend_set(id, NO_BACKEND_SET)?;
            maps.remove_service_name(id)?;
        }
        for (&key, &backend) in found.slots.iter().filter(|(k, _)| !adopted_sets.contains(&k.backend_set)) {
            maps.remove_backend_slot(key, backend)?;
        }
        for &(set, backend) in found.members.keys().filter(|(set, _)| !adopted_sets.contains(set)) {
            maps.remove_set_member(set, backend)?;
        }
        for &(id, range) in found.source_ranges.iter().filter(|(id, _)| !adopted_ids.contains(id)) {
            maps.remove_source_range(id, range)?;
        }
        if !discarded.is_empty() {
            maps.remove_service_flows(&discarded)?;
        }

        syncer.next_id = adopted_ids.last().map_or(0, |last| last + 1);
        syncer.free_ids = (0..syncer.next_id).filter(|id| !adopted_ids.contains(id)).collect();
        syncer.next_set = adopted_sets.last().map_or(NO_BACKEND_SET + 1, |last| last.wrapping_add(1).max(NO_BACKEND_SET + 1));
        let report = AdoptReport { adopted: syncer.programmed.len(), discarded: discarded.len() };
        Ok((syncer, report))
    }
}

/// A service port as the maps hold it, if its pieces agree: its name,
/// its current set, its frontends (all of its family) pointing at that
/// set with one shape, and a complete set.
fn adoptable(
    id: u32,
    name: &ServiceName,
    found: &ProgrammedMaps,
    frontends: &[(Frontend, FrontendEntry)],
) -> Option<(ServicePortName, Programmed)> {
    let port_name = parse_port_name(name.as_str())?;
    let set = *found.service_sets.get(&id)?;
    let &(_, first) = frontends.first()?;
    // The source ranges flag is per frontend (load balancer IPs only).
    let shape = |v: &FrontendEntry| FrontendEntry { flags: v.flags & !FRONTEND_SOURCE_RANGES, ..*v };
    let of_family = |ip: IpAddr| IpFamily::of(ip) == port_name.family;
    if first.backend_set != set || frontends.iter().any(|(f, v)| shape(v) != shape(&first) || !of_family(f.ip)) {
        return None;
    }
    let mut endpoints = Vec::new();
    for slot in 0..first.backend_count {
        let backend = *found.slots.get(&BackendSlotKey { backend_set: set, slot })?;
        if found.members.get(&(set, backend)) != Some(&slot) || !of_family(backend.ip) {
            return None;
        }
        endpoints.push(backend);
    }
    let mut draining: Vec<Endpoint> =
        found.members.iter().filter(|&(&(member_set, _), &slot)| member_set == set && slot == DRAINING_SLOT).map(|(&(_, e), _)| e).collect();
    draining.sort();
    let source_ranged = frontends.iter().filter(|(_, v)| v.flags & FRONTEND_SOURCE_RANGES != 0).map(|(f, _)| f.ip).collect();
    let source_ranges = found.source_ranges.iter().filter(|(range_id, _)| *range_id == id).map(|&(_, range)| range).collect();
    let backends = BackendSet {
        endpoints,
        draining,
        drop_when_empty: first.flags & FRONTEND_DROP_WHEN_EMPTY != 0,
        snat: first.flags & FRONTEND_SNAT != 0,
        affinity_seconds: first.affinity_seconds,
        in_cluster_via: first.in_cluster_via,
        source_ranges,
        source_ranged,
    };
    let frontends = frontends.iter().map(|(f, _)| *f).collect();
    Some((port_name, Programmed { id, set, frontends, backends }))
}

/// The inverse of `ServicePortName`'s display:
/// `namespace/name[:port][/external][/ipv6]`.
pub(super) fn parse_port_name(text: &str) -> Option<ServicePortName> {
    let (text, family) = match text.strip_suffix("/ipv6") {
        Some(rest) => (rest, IpFamily::V6),
        None => (text, IpFamily::V4),
    };
    let (text, external) = match text.strip_suffix("/external") {
        Some(internal) => (internal, true),
        None => (text, false),
    };
    let (namespace, rest) = text.split_once('/')?;
    let (name, port) = rest.split_once(':').unwrap_or((rest, ""));
    (!namespace.is_empty() && !name.is_empty() && !name.contains('/'))
        .then(|| ServicePortName { external, family, ..ServicePortName::new(namespace, name, port) })
}
