//! Reading a running agent's pinned maps for `lbctl`.
//!
//! Services with their frontends and backends, conntrack entries, counters.
//! Read-only: nothing here writes a map.
use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
    path::Path,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    Backend, BackendSetMemberKey, BackendSlotKey, CT_FORWARD, FrontendKey,
    FrontendValue, IPPROTO_TCP, IPPROTO_UDP, MAP_BACKEND_SET_MEMBERS, MAP_BACKEND_SLOTS, MAP_CONNTRACK_TCP, MAP_CONNTRACK_TCP_PENDING, MAP_CONNTRACK_UDP,
    MAP_SERVICE_BACKEND_SETS, MAP_SERVICE_COUNTERS, MAP_SERVICE_FRONTENDS, MAP_SERVICE_NAMES, MAP_SERVICE_VIPS,
    MAP_VERDICT_COUNTERS, MAP_DATAPATH_CONFIG, DatapathConfig, VipValue, Reason, ServiceCounters, ServiceName,
    ConntrackKey, ConntrackValue, Ipv6, MAP_BACKEND_SLOTS_V6, MAP_CONNTRACK_TCP_PENDING_V6, MAP_CONNTRACK_TCP_V6, MAP_CONNTRACK_UDP_V6,
    MAP_SERVICE_FRONTENDS_V6,
};
use lb_common::lifecycle::{is_alive, secs_from_ticks, state_name};
use serde::Serialize;

use crate::{
    error::{Error, Result},
    maps::{ConntrackMaps, FamilyAddress, service_totals, verdict_totals},
};

/// The IPv6 twins `lbctl` reads.
pub(crate) struct Ipv6PinnedMaps {
    pub(crate) frontends: HashMap<MapData, FrontendKey<Ipv6>, FrontendValue<Ipv6>>,
    pub(crate) vips: HashMap<MapData, Ipv6, VipValue>,
    pub(crate) slots: HashMap<MapData, BackendSlotKey, Backend<Ipv6>>,
    /// As `CONNTRACK_MAPS_V6` lists them.
    conntrack: [crate::maps::ConntrackTableV6; 3],
    pub(crate) config: Array<MapData, lb_common::DatapathConfigV6>,
}

impl Ipv6PinnedMaps {
    /// The entry for `key` wherever it is, with its table's name.
    pub(crate) fn find_flow(&self, key: &ConntrackKey<Ipv6>) -> Option<(&'static str, ConntrackValue<Ipv6>)> {
        let tables = lb_common::CONNTRACK_MAPS_V6.iter().zip(&self.conntrack);
        tables.filter(|((_, proto), _)| *proto == key.proto).find_map(|((name, _), table)| Some((*name, table.get(key, 0).ok()?)))
    }
}

/// Handles on the pinned maps of one agent.
pub struct PinnedMaps {
    pub(crate) frontends: HashMap<MapData, FrontendKey, FrontendValue>,
    pub(crate) vips: HashMap<MapData, u32, VipValue>,
    pub(crate) slots: HashMap<MapData, BackendSlotKey, Backend>,
    pub(crate) members: HashMap<MapData, BackendSetMemberKey, u32>,
    pub(crate) service_backend_sets: Array<MapData, u32>,
    names: HashMap<MapData, u32, ServiceName>,
    pub(crate) conntrack: ConntrackMaps,
    service_counters: PerCpuArray<MapData, ServiceCounters>,
    verdicts: PerCpuArray<MapData, u64>,
    pub(crate) config: Array<MapData, DatapathConfig>,
    pub(crate) ipv6: Ipv6PinnedMaps,
}

fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(dir: &Path, name: &'static str, wrap: fn(MapData) -> Map) -> Result<T> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| Error::Pin {
        path: path.clone(),
        reason: format!("{e} (is lb-agent running with --bpffs-dir {}?)", dir.display()),
    })?;
    T::try_from(wrap(data)).map_err(|source| Error::Map { name, source })
}

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self {
            frontends: open(dir, MAP_SERVICE_FRONTENDS, Map::HashMap)?,
            vips: open(dir, MAP_SERVICE_VIPS, Map::HashMap)?,
            slots: open(dir, MAP_BACKEND_SLOTS, Map::HashMap)?,
            members: open(dir, MAP_BACKEND_SET_MEMBERS, Map::HashMap)?,
            service_backend_sets: open(dir, MAP_SERVICE_BACKEND_SETS, Map::Array)?,
            names: open(dir, MAP_SERVICE_NAMES, Map::HashMap)?,
            conntrack: ConntrackMaps {
                tcp: open(dir, MAP_CONNTRACK_TCP, Map::LruHashMap)?,
                udp: open(dir, MAP_CONNTRACK_UDP, Map::LruHashMap)?,
                tcp_pending: open(dir, MAP_CONNTRACK_TCP_PENDING, Map::LruHashMap)?,
            },
            service_counters: open(dir, MAP_SERVICE_COUNTERS, Map::PerCpuArray)?,
            verdicts: open(dir, MAP_VERDICT_COUNTERS, Map::PerCpuArray)?,
            config: open(dir, MAP_DATAPATH_CONFIG, Map::Array)?,
            ipv6: Ipv6PinnedMaps {
                frontends: open(dir, MAP_SERVICE_FRONTENDS_V6, Map::HashMap)?,
                vips: open(dir, lb_common::MAP_SERVICE_VIPS_V6, Map::HashMap)?,
                slots: open(dir, MAP_BACKEND_SLOTS_V6, Map::HashMap)?,
                config: open(dir, lb_common::MAP_DATAPATH_CONFIG_V6, Map::Array)?,
                conntrack: [
                    open(dir, MAP_CONNTRACK_TCP_V6, Map::LruHashMap)?,
                    open(dir, MAP_CONNTRACK_UDP_V6, Map::LruHashMap)?,
                    open(dir, MAP_CONNTRACK_TCP_PENDING_V6, Map::LruHashMap)?,
                ],
            },
        })
    }

    /// The backends a frontend picks new connections from, in slot order;
    /// `None` when the frontend does not exist.
    pub fn backends(&self, frontend: &FrontendKey) -> Option<Vec<SocketAddrV4>> {
        let value = self.frontends.get(frontend, 0).ok()?;
        Some(set_backends(&self.slots, &value).into_iter().filter_map(|b| if let SocketAddr::V4(b) = b { Some(b) } else { None }).collect())
    }

    /// A service port's name, or `#id` when it has none.
    pub fn name(&self, service_id: u32) -> String {
        self.names.get(&service_id, 0).map(|n| n.as_str().to_owned()).unwrap_or_else(|_| format!("#{service_id}"))
    }
}

/// One service port, as `kubectl describe svc` would summarise it.
#[derive(Debug, Serialize)]
pub struct ServiceView {
    pub id: u32,
    pub name: String,
    pub frontends: Vec<String>,
    /// The endpoints new connections go to.
    pub backends: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
    pub new_connections: u64,
    pub rejected: u64,
}

fn protocol(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        _ => "?",
    }
}

/// `ip:port` (`[ip]:port` for IPv6) of network-order fields.
fn endpoint<A: FamilyAddress>(ip: A, port: u16) -> String {
    SocketAddr::new(ip.ip(), u16::from_be(port)).to_string()
}

/// The backends of a frontend's current set, of its family's slots.
fn set_backends<A: FamilyAddress>(slots: &HashMap<MapData, BackendSlotKey, Backend<A>>, value: &FrontendValue<A>) -> Vec<SocketAddr>
where
    Backend<A>: aya::Pod,
{
    (0..value.backend_count)
        .filter_map(|slot| slots.get(&BackendSlotKey { backend_set: value.backend_set, slot }, 0).ok())
        .map(|b| SocketAddr::new(b.ip.ip(), u16::from_be(b.port)))
        .collect()
}

pub fn services(maps: &PinnedMaps) -> Result<Vec<ServiceView>> {
    let mut by_id: BTreeMap<u32, ServiceView> = BTreeMap::new();
    family_services(maps, &maps.frontends, &maps.slots, MAP_SERVICE_FRONTENDS, &mut by_id)?;
    family_services(maps, &maps.ipv6.frontends, &maps.ipv6.slots, MAP_SERVICE_FRONTENDS_V6, &mut by_id)?;
    let mut views: Vec<ServiceView> = by_id.into_values().collect();
    for view in &mut views {
        view.frontends.sort();
    }
    views.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(views)
}

/// The service ports of one family's frontends, into `by_id`.
fn family_services<A: FamilyAddress>(
    maps: &PinnedMaps,
    frontends: &HashMap<MapData, FrontendKey<A>, FrontendValue<A>>,
    slots: &HashMap<MapData, BackendSlotKey, Backend<A>>,
    name: &'static str,
    by_id: &mut BTreeMap<u32, ServiceView>,
) -> Result<()>
where
    FrontendKey<A>: aya::Pod,
    FrontendValue<A>: aya::Pod,
    Backend<A>: aya::Pod,
{
    for entry in frontends.iter() {
        let (key, value) = entry.map_err(|source| Error::Map { name, source })?;
        let view = by_id.entry(value.service_id).or_insert_with(|| {
            let backends = set_backends(slots, &value).iter().map(ToString::to_string).collect();
            let counters = service_totals(&maps.service_counters, value.service_id).unwrap_or_default();
            ServiceView {
                id: value.service_id,
                name: maps.name(value.service_id),
                frontends: Vec::new(),
                backends,
                packets: counters.packets,
                bytes: counters.bytes,
                new_connections: counters.new_flows,
                rejected: counters.rejected,
            }
        });
        view.frontends.push(format!("{}/{}", endpoint(key.ip, key.port), protocol(key.proto)));
    }
    Ok(())
}

/// One direction of a tracked flow.
#[derive(Debug, Serialize)]
pub struct FlowView {
    pub service: String,
    pub protocol: &'static str,
    /// "forward" (client → service, to the backend) or "reply".
    pub direction: &'static str,
    pub source: String,
    pub destination: String,
    /// The source it leaves with: the node's address with source NAT
    /// (forward), the service frontend (reply).
    pub translated_source: String,
    /// The destination it leaves with: the backend (forward), the client
    /// (reply).
    pub translated_destination: String,
    /// The flow's state (`syn_sent`, `established`, `half_closed`,
    /// `closed`, `reset`, `udp_unanswered`, `udp_answered`), or `expired`.
    pub state: &'static str,
    /// Seconds until the entry expires without further traffic.
    pub expires_in_seconds: u64,
}

/// Conntrack entries whose addresses or service name contain `filter`.
pub fn conntrack(maps: &PinnedMaps, filter: Option<&str>) -> Result<Vec<FlowView>> {
    let mut flows = Vec::new();
    let now = crate::conntrack::now_ticks();
    let ipv4 = maps.conntrack.tables().into_iter().flat_map(|(_, _, table)| table.iter()).flatten().map(|(k, v)| flow_view(maps, &k, &v, now));
    let ipv6 = maps.ipv6.conntrack.iter().flat_map(|table| table.iter()).flatten().map(|(k, v)| flow_view(maps, &k, &v, now));
    // Entries evicted while the tables were walked are left out.
    for flow in ipv4.chain(ipv6) {
        let shown = filter.is_none_or(|f| {
            [&flow.service, &flow.source, &flow.destination, &flow.translated_source, &flow.translated_destination].iter().any(|s| s.contains(f))
        });
        if shown {
            flows.push(flow);
        }
    }
    flows.sort_by(|a, b| (&a.service, &a.source, a.direction).cmp(&(&b.service, &b.source, b.direction)));
    Ok(flows)
}

fn flow_view<A: FamilyAddress>(maps: &PinnedMaps, key: &ConntrackKey<A>, value: &ConntrackValue<A>, now: u32) -> FlowView {
    FlowView {
        service: maps.name(value.service_id),
        protocol: protocol(key.proto),
        direction: if value.direction == CT_FORWARD { "forward" } else { "reply" },
        source: endpoint(key.src_ip, key.src_port),
        destination: endpoint(key.dst_ip, key.dst_port),
        translated_source: endpoint(value.src_ip, value.src_port),
        translated_destination: endpoint(value.dst_ip, value.dst_port),
        state: if is_alive(value.expires, now) { state_name(key.proto, value.flow_flags) } else { "expired" },
        expires_in_seconds: secs_from_ticks(value.expires.saturating_sub(now)),
    }
}

/// Packets per verdict reason, summed over CPUs.
pub fn verdicts(maps: &PinnedMaps) -> Result<Vec<(&'static str, u64)>> {
    let totals = verdict_totals(&maps.verdicts)?;
    Ok(Reason::ALL.iter().map(|reason| (reason.name(), totals[*reason as usize])).collect())
}

/// A kernel feature newer than the floor, as the running agent uses it.
#[derive(Debug, Serialize)]
pub struct KernelFeatureView {
    pub feature: &'static str,
    /// The Linux release that brought it.
    pub since: &'static str,
    pub in_use: bool,
    /// What the agent does instead, when not in use.
    pub fallback: Option<&'static str>,
}

/// The kernel features the running agent uses, and its fallbacks (as it
/// recorded them in the datapath configuration).
pub fn kernel_features(maps: &PinnedMaps) -> Result<Vec<KernelFeatureView>> {
    let config = maps.config.get(&0, 0).map_err(|source| Error::Map { name: MAP_DATAPATH_CONFIG, source })?;
    Ok(crate::features::FALLBACKS
        .iter()
        .map(|f| {
            let in_use = config.kernel_fallbacks & f.bit == 0;
            KernelFeatureView { feature: f.feature, since: f.since, in_use, fallback: (!in_use).then_some(f.instead) }
        })
        .collect())
}
