//! From Kubernetes objects to the desired state, with kube-proxy's rules
//! (pkg/proxy: servicechangetracker, endpointslicecache, topology):
//!
//! - Services of type ExternalName, headless services (`clusterIP: None`)
//!   and services labelled `service.kubernetes.io/service-proxy-name` (owned
//!   by another proxy) are not programmed.
//! - Each service port is a service of its own (namespace/name:port), with
//!   its own protocol.
//! - Endpoints come from the EndpointSlices labelled
//!   `kubernetes.io/service-name` with the service's name, whether or not
//!   the service has a selector. A slice port serves the service port with
//!   the same name and protocol; its port number is the endpoint's target
//!   port, which is how a named targetPort resolves per endpoint.
//! - Ready endpoints serve; when none is ready, serving and terminating
//!   ones do. The other listed endpoints drain (keep the flows they have,
//!   take no new ones): for TCP all of them whatever their conditions, for
//!   UDP only serving ones. An endpoint listed in several slices counts
//!   once.
//! - internalTrafficPolicy Local: only endpoints on this node serve. A
//!   Local policy (internal or external) without a local endpoint drops
//!   traffic when endpoints exist elsewhere, and rejects it when there are
//!   none anywhere.
//! - Of `clusterIPs` (dual-stack, either family first) the IPv4 address is
//!   served; headless and IPv6-only services are not programmed. Load
//!   balancer ingress IPs with `ipMode: Proxy` are left to the load
//!   balancer.
//! - An endpoint is its first address; unset `ready` and `serving` mean
//!   true, unset `terminating` false.
//! - Which endpoints each side uses (traffic policy, topology hints,
//!   trafficDistribution, draining) is decided in one place,
//!   `endpoints::pick`.
//! - Node ports (on every node address), load balancer ingress IPs and
//!   external IPs form the external side of a service port, with
//!   externalTrafficPolicy: Local uses this node's endpoints and keeps the
//!   client address, Cluster uses every endpoint behind source NAT.
//! - sessionAffinity ClientIP: a client sticks to its backend until
//!   `timeoutSeconds` (default 10800) pass without a new connection.
//!
//! Invalid objects (bad addresses, ports out of range, unknown protocols,
//! missing fields) are skipped, each with one line saying which and why; in
//! a slice only the invalid endpoint or port is. SCTP ports get one line
//! saying they are not served. Everything else is still programmed.
use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use rustc_hash::FxHashMap;
use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::{
    DesiredState, Frontend, Protocol, ServicePort, ServicePortName,
    endpoints::{Distribution, Here, Policy, ValidSlice, pick, valid_slice},
};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// sessionAffinityConfig.clientIP.timeoutSeconds when not given (3 hours),
/// and the most the API allows (a day).
const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;
const MAX_AFFINITY_SECONDS: i32 = 86_400;

/// namespace/name of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    /// The key of an object; namespace "default" when it names none.
    pub fn of(meta: &ObjectMeta) -> Self {
        Self {
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The objects a source has seen, as they are now. Shared, so that a
/// snapshot costs no copy and an unchanged object is the same allocation
/// from one snapshot to the next.
#[derive(Clone, Debug, Default)]
pub struct ClusterObjects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
}

/// The desired state, and one line per object skipped and why.
#[derive(Debug, Default)]
pub struct Computed {
    pub state: DesiredState,
    pub skipped: Vec<String>,
}

/// The desired state for `objects` on the node named `node` (with no
/// node addresses: node ports answer nowhere).
pub fn desired_state(objects: &ClusterObjects, node: &str) -> Computed {
    desired_state_on(objects, node, &[])
}

/// The desired state for `objects` on the node named `node` with the
/// addresses `node_ips`.
pub fn desired_state_on(objects: &ClusterObjects, node: &str, node_ips: &[Ipv4Addr]) -> Computed {
    let mut model = Model::with_node_ips(node_ips.to_vec());
    let skipped = model.update(objects, node).skipped;
    Computed { state: model.state, skipped }
}

/// One service's contribution, remembered.
struct CachedService {
    /// Held, so that its address (the cache key) cannot be reused by a new
    /// object while the entry exists.
    _service: Arc<Service>,
    key: ObjectKey,
    ports: Vec<ServicePortName>,
    skipped: Vec<String>,
    /// The last update that saw the service unchanged.
    seen: u64,
}

/// A slice the model knows, by allocation.
struct KnownSlice {
    /// Held, so that its address (the key) cannot be reused meanwhile.
    _slice: Arc<EndpointSlice>,
    /// The service it names, if any.
    owner: Option<ObjectKey>,
    seen: u64,
}

/// What changed in one `Model::update`.
#[derive(Debug, Default)]
pub struct Changes {
    /// Service ports added, changed or removed.
    pub ports: BTreeSet<ServicePortName>,
    /// Every object skipped and why, one line each.
    pub skipped: Vec<String>,
    /// EndpointSlices and Services added, changed or deleted (an object
    /// replaced by a new version counts once).
    pub endpoint_changes: usize,
    pub service_changes: usize,
}

/// The desired state, kept up to date incrementally. Objects are shared
/// `Arc`s, so an unchanged object is the same allocation from one snapshot
/// to the next (the model holds on to the objects it knows, so no new object
/// can take over a known address): one pass over the snapshot, looking up pointers only, finds
/// the new and the vanished objects, and only the services they touch are
/// computed again. One endpoint change among 10,000 services costs that
/// pass plus one service's work.
#[derive(Default)]
pub struct Model {
    pub state: DesiredState,
    services: FxHashMap<*const Service, CachedService>,
    slices: FxHashMap<*const EndpointSlice, KnownSlice>,
    /// The current slices of each service name.
    slices_of: HashMap<ObjectKey, Vec<Arc<EndpointSlice>>>,
    /// The current service object of each name.
    service_of: HashMap<ObjectKey, *const Service>,
    updates: u64,
    /// This node's addresses, where node ports answer.
    node_ips: Vec<Ipv4Addr>,
    /// This node's zone (`topology.kubernetes.io/zone`), for topology.
    zone: Option<String>,
}

impl Model {
    /// A model for a node with these addresses (for node ports).
    pub fn with_node_ips(node_ips: Vec<Ipv4Addr>) -> Self {
        Self { node_ips, ..Self::default() }
    }

    /// This node's addresses, where node ports answer.
    pub fn node_ips(&self) -> &[Ipv4Addr] {
        &self.node_ips
    }

    /// New node addresses: every service is computed again by the next
    /// `update` (its node ports move).
    pub fn set_node_ips(&mut self, node_ips: Vec<Ipv4Addr>) {
        self.node_ips = node_ips;
        self.recompute_all();
    }

    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    /// A new zone for this node: every service is computed again by the
    /// next `update` (topology picks other endpoints).
    pub fn set_zone(&mut self, zone: Option<String>) {
        self.zone = zone;
        self.recompute_all();
    }

    fn recompute_all(&mut self) {
        for cached in self.services.values_mut() {
            cached.seen = 0;
        }
    }

    pub fn update(&mut self, objects: &ClusterObjects, node: &str) -> Changes {
        self.updates += 1;
        let seen = self.updates;
        // Slices: new ones are added to their service, vanished ones removed;
        // either way the service is computed again.
        let mut dirty: Vec<ObjectKey> = Vec::new();
        let mut new_slices = 0;
        for slice in &objects.slices {
            let ptr = Arc::as_ptr(slice);
            if let Some(known) = self.slices.get_mut(&ptr) {
                known.seen = seen;
                continue;
            }
            new_slices += 1;
            let owner = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).map(|service| ObjectKey {
                namespace: slice.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
                name: service.clone(),
            });
            if let Some(owner) = &owner {
                self.slices_of.entry(owner.clone()).or_default().push(slice.clone());
                dirty.push(owner.clone());
            }
            self.slices.insert(ptr, KnownSlice { _slice: slice.clone(), owner, seen });
        }
        let slices_before = self.slices.len();
        let slices_of = &mut self.slices_of;
        self.slices.retain(|ptr, known| {
            if known.seen == seen {
                return true;
            }
            if let Some(owner) = known.owner.take() {
                if let Some(list) = slices_of.get_mut(&owner) {
                    list.retain(|s| Arc::as_ptr(s) != *ptr);
                    if list.is_empty() {
                        slices_of.remove(&owner);
                    }
                }
                dirty.push(owner);
            }
            false
        });
        // New versions replace old ones one for one; the rest are added or
        // deleted.
        let vanished_slices = slices_before - self.slices.len();
        let endpoint_changes = new_slices.max(vanished_slices);
        for key in &dirty {
            if let Some(cached) = self.service_of.get(key).and_then(|ptr| self.services.get_mut(ptr)) {
                cached.seen = 0;
            }
        }
        let mut new_services = 0;
        // Services: a known, clean one is kept; a new or dirty one computed.
        let mut recomputed = Vec::new();
        for service in &objects.services {
            let ptr = Arc::as_ptr(service);
            if let Some(cached) = self.services.get_mut(&ptr)
                && cached.seen != 0
            {
                cached.seen = seen;
                continue;
            }
            if !self.services.contains_key(&ptr) {
                new_services += 1;
            }
            let key = ObjectKey::of(&service.metadata);
            let slices = self.slices_of.get(&key).map(Vec::as_slice).unwrap_or_default();
            let here = Here { node, zone: self.zone.as_deref() };
            recomputed.push((service, key, compute_service(service, slices, here, &self.node_ips)));
        }
        let current: std::collections::HashSet<*const Service> = objects.services.iter().map(Arc::as_ptr).collect();
        let vanished_services = self.services.keys().filter(|ptr| !current.contains(ptr)).count();
        // Entries not seen now belong to services that changed or are gone.
        let mut changes = Changes::default();
        let (state, service_of) = (&mut self.state, &mut self.service_of);
        self.services.retain(|ptr, cached| {
            if cached.seen == seen {
                return true;
            }
            for port in cached.ports.drain(..) {
                state.services.remove(&port);
                changes.ports.insert(port);
            }
            if service_of.get(&cached.key) == Some(ptr) {
                service_of.remove(&cached.key);
            }
            false
        });
        for (service, key, (ports, skipped)) in recomputed {
            let names = ports.iter().map(|(name, _)| name.clone()).collect();
            for (name, port) in ports {
                changes.ports.insert(name.clone());
                self.state.services.insert(name, port);
            }
            let ptr = Arc::as_ptr(service);
            self.service_of.insert(key.clone(), ptr);
            self.services.insert(ptr, CachedService { _service: service.clone(), key, ports: names, skipped, seen });
        }
        changes.skipped = self.services.values().flat_map(|c| c.skipped.iter().cloned()).collect();
        changes.service_changes = new_services.max(vanished_services);
        changes.endpoint_changes = endpoint_changes;
        changes
    }
}

/// A service's ports and the lines for what was skipped on the way.
fn compute_service(
    service: &Service,
    slices: &[Arc<EndpointSlice>],
    here: Here<'_>,
    node_ips: &[Ipv4Addr],
) -> (Vec<(ServicePortName, ServicePort)>, Vec<String>) {
    let key = ObjectKey::of(&service.metadata);
    let mut skipped = Vec::new();
    let mut valid = Vec::new();
    for slice in slices {
        let slice_key = ObjectKey::of(&slice.metadata);
        let mut problems = Vec::new();
        if let Some(v) = valid_slice(slice, &mut problems) {
            valid.push(v);
        }
        skipped.extend(problems.into_iter().map(|problem| format!("EndpointSlice {slice_key}: {problem}")));
    }
    let mut notes = Vec::new();
    match service_ports(&key, service, &valid, (here, node_ips), &mut notes) {
        Ok(ports) => {
            skipped.extend(notes.into_iter().map(|note| format!("Service {key}: {note}")));
            (ports, skipped)
        }
        Err(reason) => {
            skipped.push(format!("Service {key} skipped: {reason}"));
            (Vec::new(), skipped)
        }
    }
}

/// The service ports of one service, or why it is invalid. An empty list
/// for services that are valid but not for this proxy. What is valid but
/// left out (an SCTP port) is added to `notes`, one line each.
fn service_ports(
    key: &ObjectKey,
    service: &Service,
    slices: &[ValidSlice],
    (here, node_ips): (Here<'_>, &[Ipv4Addr]),
    notes: &mut Vec<String>,
) -> Result<Vec<(ServicePortName, ServicePort)>, String> {
    let labels = service.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        return Ok(Vec::new());
    }
    let spec = service.spec.as_ref().ok_or("it has no spec")?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Vec::new());
    }
    let Some(cluster_ip) = ipv4_cluster_ip(spec)? else {
        // Headless, or IPv6 only: nothing for this IPv4 datapath.
        return Ok(Vec::new());
    };
    let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let policy = |local: bool| if local { Policy::Local } else { Policy::Cluster };
    let distribution = Distribution::of(spec.traffic_distribution.as_deref());
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    let affinity_seconds = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let configured = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()).and_then(|c| c.timeout_seconds);
            match configured {
                None => DEFAULT_AFFINITY_SECONDS,
                Some(seconds) if (1..=MAX_AFFINITY_SECONDS).contains(&seconds) => seconds as u32,
                Some(seconds) => return Err(format!("sessionAffinityConfig.clientIP.timeoutSeconds {seconds} is not in 1..=86400")),
            }
        }
        _ => 0,
    };
    let has_node_ports = matches!(service_type, "NodePort" | "LoadBalancer");
    // Addresses answering on the service port from outside: external IPs
    // (any type) and, for LoadBalancer services, the ingress IPs.
    let mut external_addresses = Vec::new();
    for ip in spec.external_ips.iter().flatten() {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => external_addresses.push(ip),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => return Err(format!("externalIP {ip:?} is not an IP address")),
        }
    }
    let mut load_balancer_ips = BTreeSet::new();
    if service_type == "LoadBalancer" {
        let ingress = service.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
        // ipMode Proxy: the load balancer proxies to the node itself, so its
        // address is left to it (kube-proxy does the same).
        let delivered = ingress.into_iter().flatten().filter(|i| i.ip_mode.as_deref() != Some("Proxy"));
        for ip in delivered.filter_map(|i| i.ip.as_deref()) {
            match ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => {
                    external_addresses.push(ip);
                    load_balancer_ips.insert(ip);
                }
                Ok(IpAddr::V6(_)) => {}
                Err(_) => return Err(format!("load balancer ingress IP {ip:?} is not an IP address")),
            }
        }
    }
    let source_ranges = if load_balancer_ips.is_empty() { BTreeSet::new() } else { source_ranges(spec, &load_balancer_ips, node_ips, notes) };
    let source_ranged = if source_ranges.is_empty() { BTreeSet::new() } else { load_balancer_ips };
    // Asked by cloud load balancers whether this node has local endpoints.
    let health_check_node_port = match spec.health_check_node_port {
        Some(port) if service_type == "LoadBalancer" && external_local => Some(valid_port(port, "healthCheckNodePort")?),
        _ => None,
    };
    let mut ports = Vec::new();
    for port in spec.ports.iter().flatten() {
        let number = valid_port(port.port, "port")?;
        let name = port.name.clone().unwrap_or_default();
        let Some(protocol) = protocol(port.protocol.as_deref())? else {
            notes.push(format!("port {name:?} ({number}/SCTP) is not served: SCTP is not supported by this datapath"));
            continue;
        };
        let internal_name = ServicePortName::new(&key.namespace, &key.name, &name);
        let picked = pick(slices, &name, protocol, policy(local_only), distribution, here);
        // A Local policy without a local endpoint drops when endpoints
        // exist on other nodes, and rejects when there are none anywhere
        // (kube-proxy's "no local endpoints" versus "no endpoints").
        let has_endpoints_anywhere = picked.anywhere;
        let internal = ServicePort {
            frontends: [Frontend { ip: cluster_ip, port: number, protocol }].into(),
            endpoints: picked.serving,
            draining: picked.draining,
            drop_when_empty: local_only && has_endpoints_anywhere,
            snat: false,
            affinity_seconds,
            in_cluster_via: None,
            health_check_node_port: None,
            source_ranges: BTreeSet::new(),
            source_ranged: BTreeSet::new(),
        };

        // The external side: the node port on every node address, and the
        // service port on external and load balancer addresses.
        let mut frontends: BTreeSet<Frontend> =
            external_addresses.iter().map(|&ip| Frontend { ip, port: number, protocol }).collect();
        if has_node_ports && let Some(node_port) = port.node_port {
            let node_port = valid_port(node_port, "nodePort")?;
            frontends.extend(node_ips.iter().map(|&ip| Frontend { ip, port: node_port, protocol }));
        }
        if !frontends.is_empty() {
            // Local: this node's endpoints only, client address kept, and
            // dropped when there are none here but some elsewhere. Cluster:
            // every endpoint, the source translated to the node so replies
            // come back through it.
            let picked = pick(slices, &name, protocol, policy(external_local), distribution, here);
            let external = ServicePort {
                frontends,
                endpoints: picked.serving,
                draining: picked.draining,
                drop_when_empty: external_local && has_endpoints_anywhere,
                snat: !external_local,
                affinity_seconds,
                in_cluster_via: external_local.then_some((cluster_ip, number)),
                health_check_node_port,
                source_ranges: source_ranges.clone(),
                source_ranged: source_ranged.clone(),
            };
            ports.push((internal_name.to_external(), external));
        }
        ports.push((internal_name, internal));
    }
    Ok(ports)
}

/// The IPv4 ranges of `loadBalancerSourceRanges` (address masked, prefix
/// length), as kube-proxy's firewall allows them: when one holds a node
/// address, the load balancer IPs themselves too (a VIP-like load balancer
/// whose IP is local to the node loops the node's own requests back from
/// that IP). Ranges of the other family are not this datapath's; an
/// invalid one is left out with a line in `notes`. Empty: no restriction.
fn source_ranges(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    load_balancer_ips: &BTreeSet<Ipv4Addr>,
    node_ips: &[Ipv4Addr],
    notes: &mut Vec<String>,
) -> BTreeSet<(Ipv4Addr, u8)> {
    let mut ranges = BTreeSet::new();
    for text in spec.load_balancer_source_ranges.iter().flatten() {
        let (address, len) = text.trim().split_once('/').unwrap_or((text.trim(), ""));
        let parsed = address.parse::<IpAddr>().ok().zip(len.parse::<u8>().ok());
        match parsed {
            Some((IpAddr::V4(ip), len)) if len <= 32 => {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
                ranges.insert((Ipv4Addr::from(u32::from(ip) & mask), len));
            }
            Some((IpAddr::V6(_), len)) if len <= 128 => {}
            _ => notes.push(format!("loadBalancerSourceRanges entry {text:?} is not a CIDR; left out")),
        }
    }
    let contains = |ip: Ipv4Addr| {
        ranges.iter().any(|&(network, len)| len == 0 || u32::from(ip) >> (32 - u32::from(len)) == u32::from(network) >> (32 - u32::from(len)))
    };
    if node_ips.iter().any(|&ip| contains(ip)) {
        ranges.extend(load_balancer_ips.iter().map(|&ip| (ip, 32)));
    }
    ranges
}

/// The service's IPv4 cluster IP: `clusterIPs` (dual-stack, either family
/// first), else `clusterIP`; `None` for headless services and IPv6-only
/// ones.
fn ipv4_cluster_ip(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Result<Option<Ipv4Addr>, String> {
    let listed = spec.cluster_ips.as_deref().filter(|ips| !ips.is_empty());
    let ips = listed.map_or_else(|| spec.cluster_ip.iter().cloned().collect(), <[String]>::to_vec);
    let mut ipv4 = None;
    for ip in &ips {
        match ip.as_str() {
            "" | "None" => return Ok(None),
            text => match text.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => ipv4 = ipv4.or(Some(ip)),
                Ok(IpAddr::V6(_)) => {}
                Err(_) => return Err(format!("clusterIP {text:?} is not an IP address")),
            },
        }
    }
    Ok(ipv4)
}

pub(super) fn valid_port(port: i32, field: &str) -> Result<u16, String> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{field} {port} is not in 1..=65535")),
    }
}

/// TCP or UDP; `None` for SCTP (valid, unsupported); an error otherwise.
pub(super) fn protocol(protocol: Option<&str>) -> Result<Option<Protocol>, String> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Ok(Some(Protocol::Tcp)),
        "UDP" => Ok(Some(Protocol::Udp)),
        "SCTP" => Ok(None),
        other => Err(format!("protocol {other:?} is not TCP, UDP or SCTP")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use std::collections::BTreeMap;

    use super::*;
    use crate::model::Endpoint;
    use crate::model::ServiceHealth;

    const NODE: &str = "node-a";

    fn service(value: serde_json::Value) -> (ObjectKey, Service) {
        let service: Service = serde_json::from_value(value).expect("a Service");
        (ObjectKey::of(&service.metadata), service)
    }

    fn slice(value: serde_json::Value) -> (ObjectKey, EndpointSlice) {
        let slice: EndpointSlice = serde_json::from_value(value).expect("an EndpointSlice");
        (ObjectKey::of(&slice.metadata), slice)
    }

    fn kubia(extra_spec: serde_json::Value) -> serde_json::Value {
        let mut spec = json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]});
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
            spec.extend(extra.clone());
        }
        json!({"metadata": {"name": "kubia", "namespace": "default"}, "spec": spec})
    }

    fn kubia_slice(name: &str, endpoints: serde_json::Value) -> serde_json::Value {
        json!({"metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia"}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": endpoints})
    }

    fn ep(ip: &str) -> serde_json::Value {
        json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": NODE})
    }

    fn objects(services: &[serde_json::Value], slices: &[serde_json::Value]) -> ClusterObjects {
        ClusterObjects {
            services: services.iter().cloned().map(|v| Arc::new(service(v).1)).collect(),
            slices: slices.iter().cloned().map(|v| Arc::new(slice(v).1)).collect(),
        }
    }

    /// endpoint list as "ip:port" strings, per "ns/name:port".
    fn programmed(computed: &Computed) -> Programmed {
        computed
            .state
            .services
            .iter()
            .map(|(name, sp)| (name.to_string(), sp.endpoints.iter().map(|e| format!("{}:{}", e.ip, e.port)).collect()))
            .collect()
    }

    fn map(entries: &[(&str, &[&str])]) -> Programmed {
        entries.iter().map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect())).collect()
    }

    /// Service port → its endpoints as "ip:port".
    type Programmed = BTreeMap<String, Vec<String>>;

    /// Each case: the rule it checks, the objects, and what must be
    /// programmed (service port → endpoints) and how many objects skipped.
    #[test]
    fn kube_proxy_rules() {
        let cases: Vec<(&str, ClusterObjects, Programmed, usize)> = vec![
            (
                "ready endpoints serve",
                objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([ep("10.244.1.2"), ep("10.244.2.2")]))]),
                map(&[("default/kubia:http", &["10.244.1.2:8080", "10.244.2.2:8080"])]),
                0,
            ),
            (
                "not-ready endpoints do not serve while a ready one exists",
                objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([ep("10.244.1.2"),
                    {"addresses": ["10.244.2.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                    {"addresses": ["10.244.3.2"], "conditions": {"ready": false, "serving": false}}]))]),
                map(&[("default/kubia:http", &["10.244.1.2:8080"])]),
                0,
            ),
            (
                "with no ready endpoint, serving and terminating ones serve",
                objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([
                    {"addresses": ["10.244.2.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                    {"addresses": ["10.244.3.2"], "conditions": {"ready": false, "serving": false, "terminating": true}},
                    {"addresses": ["10.244.4.2"], "conditions": {"ready": false, "serving": true, "terminating": false}}]))]),
                map(&[("default/kubia:http", &["10.244.2.2:8080"])]),
                0,
            ),
            (
                "unset conditions mean ready",
                objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([{"addresses": ["10.244.1.2"]}]))]),
                map(&[("default/kubia:http", &["10.244.1.2:8080"])]),
                0,
            ),
            (
                "multi-port service: one service port per port, each with its protocol",
                objects(
                    &[json!({"metadata": {"name": "kubia", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.10", "ports": [
                        {"name": "http", "port": 80, "targetPort": 8080}, {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]}})],
                    &[json!({"metadata": {"name": "s1", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia"}},
                        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
                        "endpoints": [ep("10.244.1.2")]})],
                ),
                map(&[("default/kubia:dns", &["10.244.1.2:5353"]), ("default/kubia:http", &["10.244.1.2:8080"])]),
                0,
            ),
            (
                "named targetPort resolves per endpoint from its slice's port",
                objects(
                    &[kubia(json!({"ports": [{"name": "http", "port": 80, "targetPort": "web"}]}))],
                    &[
                        kubia_slice("s1", json!([ep("10.244.1.2")])),
                        json!({"metadata": {"name": "s2", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia"}},
                            "addressType": "IPv4", "ports": [{"name": "http", "port": 9090}], "endpoints": [ep("10.244.2.2")]}),
                    ],
                ),
                map(&[("default/kubia:http", &["10.244.1.2:8080", "10.244.2.2:9090"])]),
                0,
            ),
            (
                "a slice port serves only the service port of its protocol",
                objects(
                    &[kubia(json!({"ports": [{"name": "http", "port": 80, "protocol": "UDP"}]}))],
                    &[kubia_slice("s1", json!([ep("10.244.1.2")]))],
                ),
                map(&[("default/kubia:http", &[])]),
                0,
            ),
            (
                "service without selector: served from the slices that name it",
                objects(
                    &[json!({"metadata": {"name": "external-db", "namespace": "prod"}, "spec": {"clusterIP": "10.96.7.7", "ports": [{"port": 5432}]}})],
                    &[json!({"metadata": {"name": "external-db-1", "namespace": "prod", "labels": {"kubernetes.io/service-name": "external-db"}},
                        "addressType": "IPv4", "ports": [{"port": 5432}], "endpoints": [{"addresses": ["192.0.2.10"]}]})],
                ),
                map(&[("prod/external-db", &["192.0.2.10:5432"])]),
                0,
            ),
            (
                "slices of a same-named service in another namespace do not count",
                objects(&[kubia(json!({}))], &[json!({"metadata": {"name": "s1", "namespace": "other", "labels": {"kubernetes.io/service-name": "kubia"}},
                    "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": [ep("10.244.9.9")]})]),
                map(&[("default/kubia:http", &[])]),
                0,
            ),
            (
                "headless service is not programmed",
                objects(&[kubia(json!({"clusterIP": "None"}))], &[kubia_slice("s1", json!([ep("10.244.1.2")]))]),
                map(&[]),
                0,
            ),
            (
                "ExternalName service is not programmed",
                objects(&[json!({"metadata": {"name": "db", "namespace": "default"}, "spec": {"type": "ExternalName", "externalName": "db.example.com"}})], &[]),
                map(&[]),
                0,
            ),
            (
                "service of another proxy is not programmed",
                objects(&[json!({"metadata": {"name": "kubia", "namespace": "default", "labels": {"service.kubernetes.io/service-proxy-name": "other"}},
                    "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}})], &[]),
                map(&[]),
                0,
            ),
            (
                "duplicate endpoints across slices count once",
                objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([ep("10.244.1.2")])), kubia_slice("s2", json!([ep("10.244.1.2"), ep("10.244.2.2")]))]),
                map(&[("default/kubia:http", &["10.244.1.2:8080", "10.244.2.2:8080"])]),
                0,
            ),
            (
                "an endpoint in several services is in each",
                objects(
                    &[kubia(json!({})), json!({"metadata": {"name": "kubia-2", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.11", "ports": [{"name": "http", "port": 80}]}})],
                    &[kubia_slice("s1", json!([ep("10.244.1.2")])),
                      json!({"metadata": {"name": "t1", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia-2"}},
                        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": [ep("10.244.1.2")]})],
                ),
                map(&[("default/kubia-2:http", &["10.244.1.2:8080"]), ("default/kubia:http", &["10.244.1.2:8080"])]),
                0,
            ),
            (
                "internalTrafficPolicy Local: only this node's endpoints",
                objects(&[kubia(json!({"internalTrafficPolicy": "Local"}))], &[kubia_slice("s1", json!([ep("10.244.1.2"),
                    {"addresses": ["10.244.2.2"], "conditions": {"ready": true}, "nodeName": "node-b"}]))]),
                map(&[("default/kubia:http", &["10.244.1.2:8080"])]),
                0,
            ),
            (
                "IPv6 and FQDN slices are not used",
                objects(&[kubia(json!({}))], &[json!({"metadata": {"name": "v6", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia"}},
                    "addressType": "IPv6", "ports": [{"name": "http", "port": 8080}], "endpoints": [{"addresses": ["fd00::1"]}]})]),
                map(&[("default/kubia:http", &[])]),
                0,
            ),
            (
                "SCTP port is left out with one line, the others programmed",
                objects(&[kubia(json!({"ports": [{"name": "http", "port": 80}, {"name": "sig", "port": 9999, "protocol": "SCTP"}]}))], &[]),
                map(&[("default/kubia:http", &[])]),
                1,
            ),
            (
                "invalid clusterIP: service skipped, others kept",
                objects(&[kubia(json!({"clusterIP": "10.96.0.300"})), json!({"metadata": {"name": "ok", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.12", "ports": [{"port": 80}]}})], &[]),
                map(&[("default/ok", &[])]),
                1,
            ),
            (
                "service port 0: service skipped",
                objects(&[kubia(json!({"ports": [{"port": 0}]}))], &[]),
                map(&[]),
                1,
            ),
            (
                "service port above 65535: service skipped",
                objects(&[kubia(json!({"ports": [{"port": 70000}]}))], &[]),
                map(&[]),
                1,
            ),
            (
                "unknown protocol: service skipped",
                objects(&[kubia(json!({"ports": [{"port": 80, "protocol": "QUIC"}]}))], &[]),
                map(&[]),
                1,
            ),
            (
                "service without spec: skipped",
                objects(&[json!({"metadata": {"name": "kubia", "namespace": "default"}})], &[]),
                map(&[]),
                1,
            ),
            (
                "an endpoint with an invalid address: only it is skipped, the slice's others serve",
                objects(&[kubia(json!({}))], &[kubia_slice("bad", json!([ep("10.244.1.300"), ep("10.244.3.2")])), kubia_slice("good", json!([ep("10.244.2.2")]))]),
                map(&[("default/kubia:http", &["10.244.2.2:8080", "10.244.3.2:8080"])]),
                1,
            ),
            (
                "slice port out of range: only that port is skipped, the slice's other ports serve",
                objects(&[kubia(json!({"ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}))],
                    &[json!({"metadata": {"name": "bad", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia"}},
                    "addressType": "IPv4", "ports": [{"name": "http", "port": 0}, {"name": "dns", "port": 5353, "protocol": "UDP"}], "endpoints": [ep("10.244.1.2")]})]),
                map(&[("default/kubia:dns", &["10.244.1.2:5353"]), ("default/kubia:http", &[])]),
                1,
            ),
            (
                "slice port without a number: only that port is skipped",
                objects(&[kubia(json!({}))], &[json!({"metadata": {"name": "bad", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia"}},
                    "addressType": "IPv4", "ports": [{"name": "http"}], "endpoints": [ep("10.244.1.2")]})]),
                map(&[("default/kubia:http", &[])]),
                1,
            ),
            (
                "an endpoint is its first address: the others are not used",
                objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([{"addresses": ["10.244.1.2", "10.244.9.9"], "conditions": {"ready": true}}]))]),
                map(&[("default/kubia:http", &["10.244.1.2:8080"])]),
                0,
            ),
            (
                "an endpoint without addresses is skipped alone",
                objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([{"addresses": [], "conditions": {"ready": true}}, ep("10.244.2.2")]))]),
                map(&[("default/kubia:http", &["10.244.2.2:8080"])]),
                1,
            ),
            (
                "unset serving means serving: a terminating endpoint without it serves when none is ready",
                objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([{"addresses": ["10.244.2.2"], "conditions": {"ready": false, "terminating": true}}]))]),
                map(&[("default/kubia:http", &["10.244.2.2:8080"])]),
                0,
            ),
            (
                "dual-stack with IPv6 first: the IPv4 cluster IP of clusterIPs is served",
                objects(&[kubia(json!({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.10"], "ipFamilies": ["IPv6", "IPv4"]}))],
                    &[kubia_slice("s1", json!([ep("10.244.1.2")]))]),
                map(&[("default/kubia:http", &["10.244.1.2:8080"])]),
                0,
            ),
            (
                "IPv6 only: nothing for this datapath, nothing skipped",
                objects(&[kubia(json!({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10"]}))], &[]),
                map(&[]),
                0,
            ),
        ];
        for (rule, objects, expected, skipped) in cases {
            let computed = desired_state(&objects, NODE);
            assert_eq!(programmed(&computed), expected, "{rule}");
            assert_eq!(computed.skipped.len(), skipped, "{rule}: {:?}", computed.skipped);
        }
    }

    #[test]
    fn model_updates_report_only_the_service_ports_that_changed() {
        let other = json!({"metadata": {"name": "other", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}]}});
        let mut objects = objects(&[kubia(json!({})), other], &[kubia_slice("s1", json!([ep("10.244.1.2")]))]);
        let mut model = Model::default();
        let first = model.update(&objects, NODE);
        assert_eq!(first.ports.len(), 2, "everything is new");
        assert_eq!((first.service_changes, first.endpoint_changes), (2, 1), "changes counted as kube-proxy's metrics count them");
        let same = model.update(&objects, NODE);
        assert!(same.ports.is_empty(), "the same objects change nothing");
        assert_eq!((same.service_changes, same.endpoint_changes), (0, 0));

        // A new version of the slice: only kubia's port changes.
        objects.slices[0] = Arc::new(slice(kubia_slice("s1", json!([ep("10.244.1.2"), ep("10.244.2.2")]))).1);
        let changed = model.update(&objects, NODE);
        assert_eq!(changed.ports.iter().map(ToString::to_string).collect::<Vec<_>>(), ["default/kubia:http"]);
        assert_eq!((changed.service_changes, changed.endpoint_changes), (0, 1), "a new version of a slice is one change");
        assert_eq!(model.state.services.values().map(|p| p.endpoints.len()).sum::<usize>(), 2);

        // The service deleted: its port goes, the other stays.
        objects.services.remove(0);
        let removed = model.update(&objects, NODE);
        assert_eq!(removed.ports.iter().map(ToString::to_string).collect::<Vec<_>>(), ["default/kubia:http"]);
        assert_eq!((removed.service_changes, removed.endpoint_changes), (1, 0));
        assert_eq!(model.state.services.keys().map(ToString::to_string).collect::<Vec<_>>(), ["default/other:http"]);
        assert_eq!(model.state, desired_state(&objects, NODE).state, "incremental equals computed from scratch");
    }

    /// The cache is keyed by address: were an object freed while cached, a
    /// new object could take its address and be mistaken for it.
    #[test]
    fn model_holds_the_objects_it_caches() {
        let objects = objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([ep("10.244.1.2")]))]);
        let (service, slice) = (objects.services[0].clone(), objects.slices[0].clone());
        let mut model = Model::default();
        model.update(&objects, NODE);
        drop(objects);
        assert!(Arc::strong_count(&service) > 1 && Arc::strong_count(&slice) > 1);
        model.update(&ClusterObjects::default(), NODE);
        assert_eq!((Arc::strong_count(&service), Arc::strong_count(&slice)), (1, 1), "released once gone");
    }

    #[test]
    fn skip_lines_name_the_object_and_the_reason() {
        let objects = objects(&[kubia(json!({"clusterIP": "banana"}))], &[kubia_slice("bad", json!([ep("nope")]))]);
        let computed = desired_state(&objects, NODE);
        assert!(computed.skipped.iter().any(|l| l.contains("Service default/kubia") && l.contains("banana")), "{:?}", computed.skipped);
        assert!(computed.skipped.iter().any(|l| l.contains("EndpointSlice default/bad") && l.contains("nope")), "{:?}", computed.skipped);
    }

    /// Each case: the rule, the protocol, and which of the four endpoints
    /// (ready; terminating and serving; terminating, not serving; not ready,
    /// not terminating) serve and which drain.
    #[test]
    fn draining_endpoints_keep_their_flows() {
        let cases = [
            ("tcp: every listed endpoint that takes no new connections keeps its established ones", "TCP",
                ["10.244.1.2"], vec!["10.244.2.2", "10.244.3.2", "10.244.4.2"]),
            ("udp: only serving endpoints keep their flows; one that stops serving loses them", "UDP",
                ["10.244.1.2"], vec!["10.244.2.2"]),
        ];
        for (rule, protocol, serving, draining) in cases {
            let service = json!({"metadata": {"name": "kubia", "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": protocol, "targetPort": 8080}]}});
            let slice = json!({"metadata": {"name": "s1", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": protocol}],
                "endpoints": [ep("10.244.1.2"),
                    {"addresses": ["10.244.2.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                    {"addresses": ["10.244.3.2"], "conditions": {"ready": false, "serving": false, "terminating": true}},
                    {"addresses": ["10.244.4.2"], "conditions": {"ready": false, "serving": false, "terminating": false}}]});
            let computed = desired_state(&objects(&[service], &[slice]), NODE);
            let port = computed.state.services.values().next().expect("programmed");
            let ips = |set: &BTreeSet<Endpoint>| set.iter().map(|e| e.ip.to_string()).collect::<Vec<_>>();
            assert_eq!(ips(&port.endpoints), serving, "{rule}");
            assert_eq!(ips(&port.draining), draining, "{rule}");
        }
    }

    /// Each case: the rule, the policy, the endpoints (all on another
    /// node), and whether traffic without a local endpoint is dropped
    /// (true) or rejected (false), inside and from outside.
    #[test]
    fn local_policies_drop_when_endpoints_are_elsewhere_and_reject_when_there_are_none() {
        let remote = json!({"addresses": ["10.244.2.2"], "conditions": {"ready": true}, "nodeName": "node-b"});
        let remote_terminating = json!({"addresses": ["10.244.2.2"], "conditions": {"ready": false, "serving": true, "terminating": true}, "nodeName": "node-b"});
        let remote_not_ready = json!({"addresses": ["10.244.2.2"], "conditions": {"ready": false, "serving": false}, "nodeName": "node-b"});
        let cases = [
            ("internal Local, endpoints on another node: drop", "internalTrafficPolicy", json!([remote.clone()]), true),
            ("internal Local, serving-terminating endpoints on another node: drop", "internalTrafficPolicy", json!([remote_terminating.clone()]), true),
            ("internal Local, no endpoint anywhere: reject", "internalTrafficPolicy", json!([]), false),
            ("internal Local, only not-ready endpoints elsewhere: reject", "internalTrafficPolicy", json!([remote_not_ready.clone()]), false),
            ("external Local, endpoints on another node: drop", "externalTrafficPolicy", json!([remote]), true),
            ("external Local, no endpoint anywhere: reject", "externalTrafficPolicy", json!([]), false),
            ("external Local, only not-ready endpoints elsewhere: reject", "externalTrafficPolicy", json!([remote_not_ready]), false),
        ];
        for (rule, field, endpoints, drops) in cases {
            let objects = objects(&[kubia(json!({field: "Local", "type": "NodePort", "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30123}]}))],
                &[kubia_slice("s1", endpoints)]);
            let computed = desired_state_on(&objects, NODE, &[Ipv4Addr::new(192, 168, 0, 1)]);
            let side = if field == "internalTrafficPolicy" { ServicePortName::new("default", "kubia", "http") } else { ServicePortName::new("default", "kubia", "http").to_external() };
            let port = computed.state.services.get(&side).expect("programmed");
            assert!(port.endpoints.is_empty(), "{rule}: no local endpoint");
            assert_eq!(port.drop_when_empty, drops, "{rule}");
            let internal = field == "internalTrafficPolicy";
            let counted = (usize::from(drops && internal), usize::from(drops && !internal));
            assert_eq!(computed.state.no_local_endpoints(), counted, "{rule}: kube-proxy's no_local_endpoints gauge");
        }
    }

    /// The external side of a service port: which frontends, which
    /// endpoints, and whether its source is translated or it drops when
    /// empty. Node at 192.168.0.1 and 10.0.0.1 with one local endpoint
    /// (10.244.1.2) and one elsewhere (10.244.2.2).
    #[test]
    fn external_traffic_rules() {
        type External = Option<(Vec<&'static str>, Vec<&'static str>, bool, bool)>;
        let node_ips = [Ipv4Addr::new(192, 168, 0, 1), Ipv4Addr::new(10, 0, 0, 1)];
        let with = |extra: serde_json::Value, status: serde_json::Value| {
            let mut service = kubia(extra);
            service["status"] = status;
            let remote = json!({"addresses": ["10.244.2.2"], "conditions": {"ready": true}, "nodeName": "node-b"});
            objects(&[service], &[kubia_slice("s1", json!([ep("10.244.1.2"), remote]))])
        };
        let node_port = json!({"type": "NodePort", "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30123}]});
        let mut node_port_local = node_port.clone();
        node_port_local["externalTrafficPolicy"] = json!("Local");
        let load_balancer = json!({"type": "LoadBalancer", "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30123}]});
        let lb_status = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}, {"hostname": "lb.example"}]}});
        let both = ["10.244.1.2:8080", "10.244.2.2:8080"];
        let cases: Vec<(&str, ClusterObjects, External)> = vec![
            ("ClusterIP service: no external side", with(json!({}), json!({})), None),
            ("NodePort, Cluster policy: node port on every node address, every endpoint, source translated",
                with(node_port.clone(), json!({})), Some((vec!["10.0.0.1:30123", "192.168.0.1:30123"], both.to_vec(), true, false))),
            ("NodePort, Local policy: this node's endpoints only, client kept, dropped when none",
                with(node_port_local, json!({})), Some((vec!["10.0.0.1:30123", "192.168.0.1:30123"], vec!["10.244.1.2:8080"], false, true))),
            ("LoadBalancer: ingress IPs on the service port, node ports too; hostnames ignored",
                with(load_balancer.clone(), lb_status.clone()), Some((vec!["10.0.0.1:30123", "192.168.0.1:30123", "203.0.113.7:80"], both.to_vec(), true, false))),
            ("LoadBalancer ingress with ipMode Proxy: left to the load balancer; ipMode VIP served",
                with(load_balancer.clone(), json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7", "ipMode": "Proxy"}, {"ip": "203.0.113.8", "ipMode": "VIP"}]}})),
                Some((vec!["10.0.0.1:30123", "192.168.0.1:30123", "203.0.113.8:80"], both.to_vec(), true, false))),
            ("LoadBalancer without nodePort (allocateLoadBalancerNodePorts false): ingress IPs only",
                with(json!({"type": "LoadBalancer"}), lb_status), Some((vec!["203.0.113.7:80"], both.to_vec(), true, false))),
            ("externalIPs on a ClusterIP service: on the service port",
                with(json!({"externalIPs": ["198.51.100.9"]}), json!({})), Some((vec!["198.51.100.9:80"], both.to_vec(), true, false))),
            ("ingress IPs of a service that is not a LoadBalancer: ignored",
                with(node_port, json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}})), Some((vec!["10.0.0.1:30123", "192.168.0.1:30123"], both.to_vec(), true, false))),
        ];
        for (rule, objects, expected) in cases {
            let computed = desired_state_on(&objects, NODE, &node_ips);
            assert!(computed.skipped.is_empty(), "{rule}: {:?}", computed.skipped);
            let internal = computed.state.services.get(&ServicePortName::new("default", "kubia", "http")).expect("internal side");
            assert_eq!(internal.endpoints.len(), 2, "{rule}: in-cluster traffic uses every endpoint");
            assert!(!internal.snat && !internal.drop_when_empty, "{rule}");
            let cluster_ip = internal.frontends.first().map(|f| (f.ip, f.port));
            let external = computed.state.services.get(&ServicePortName::new("default", "kubia", "http").to_external()).map(|p| {
                // Local policy: pods and the node are served as through the
                // cluster IP (kube-proxy's "pod traffic for external
                // destinations"); Cluster policy serves everyone alike.
                assert_eq!(p.in_cluster_via, cluster_ip.filter(|_| p.drop_when_empty), "{rule}: in-cluster clients");
                let frontends = p.frontends.iter().map(|f| format!("{}:{}", f.ip, f.port)).collect::<Vec<_>>();
                let endpoints = p.endpoints.iter().map(|e| format!("{}:{}", e.ip, e.port)).collect::<Vec<_>>();
                (frontends, endpoints, p.snat, p.drop_when_empty)
            });
            let expected = expected.map(|(f, e, snat, drop)| {
                (f.iter().map(ToString::to_string).collect(), e.iter().map(ToString::to_string).collect(), snat, drop)
            });
            assert_eq!(external, expected, "{rule}");
        }
    }

    /// Each case: the rule, the service's type and loadBalancerSourceRanges,
    /// and the ranges and restricted addresses of its external side, and
    /// how many lines. The node is 192.168.0.1; the load balancer IP
    /// 203.0.113.7.
    #[test]
    fn load_balancer_source_ranges() {
        type Expected = (Vec<&'static str>, Vec<&'static str>, usize);
        let cases: Vec<(&str, &str, serde_json::Value, Expected)> = vec![
            ("ranges restrict the load balancer IPs, masked", "LoadBalancer", json!(["10.1.2.3/16", "198.51.100.7/32"]),
                (vec!["10.1.0.0/16", "198.51.100.7/32"], vec!["203.0.113.7"], 0)),
            ("a range holding a node address admits the load balancer IPs too", "LoadBalancer", json!(["192.168.0.0/24"]),
                (vec!["192.168.0.0/24", "203.0.113.7/32"], vec!["203.0.113.7"], 0)),
            ("no ranges: from anywhere", "LoadBalancer", json!([]), (vec![], vec![], 0)),
            ("IPv6 ranges only: nothing for this family, from anywhere", "LoadBalancer", json!(["2001:db8::/32"]), (vec![], vec![], 0)),
            ("an invalid range is left out with a line", "LoadBalancer", json!(["10.0.0.0/8", "banana"]), (vec!["10.0.0.0/8"], vec!["203.0.113.7"], 1)),
            ("a NodePort service: no load balancer IP, nothing restricted", "NodePort", json!(["10.0.0.0/8"]), (vec![], vec![], 0)),
        ];
        for (rule, service_type, ranges, (expected_ranges, expected_ranged, lines)) in cases {
            let mut service = kubia(json!({"type": service_type, "loadBalancerSourceRanges": ranges,
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30123}]}));
            service["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}});
            let computed = desired_state_on(&objects(&[service], &[kubia_slice("s1", json!([ep("10.244.1.2")]))]), NODE, &[Ipv4Addr::new(192, 168, 0, 1)]);
            let external = computed.state.services.get(&ServicePortName::new("default", "kubia", "http").to_external()).expect("external side");
            let ranges: Vec<String> = external.source_ranges.iter().map(|(ip, len)| format!("{ip}/{len}")).collect();
            let ranged: Vec<String> = external.source_ranged.iter().map(ToString::to_string).collect();
            assert_eq!(ranges, expected_ranges, "{rule}");
            assert_eq!(ranged, expected_ranged, "{rule}");
            assert_eq!(computed.skipped.len(), lines, "{rule}: {:?}", computed.skipped);
            let internal = computed.state.services.get(&ServicePortName::new("default", "kubia", "http")).expect("internal side");
            assert!(internal.source_ranges.is_empty(), "{rule}: the cluster IP is never restricted");
        }
    }

    #[test]
    fn invalid_external_addresses_skip_the_service() {
        let objects = objects(&[kubia(json!({"externalIPs": ["not-an-ip"]}))], &[]);
        let computed = desired_state_on(&objects, NODE, &[Ipv4Addr::new(192, 168, 0, 1)]);
        assert!(computed.state.services.is_empty());
        assert!(computed.skipped.iter().any(|l| l.contains("not-an-ip")), "{:?}", computed.skipped);
    }

    #[test]
    fn session_affinity_client_ip_timeouts() {
        let cases: [(&str, serde_json::Value, Option<u32>); 4] = [
            ("no affinity", json!({}), Some(0)),
            ("ClientIP without a timeout: 10800 seconds", json!({"sessionAffinity": "ClientIP"}), Some(10_800)),
            ("ClientIP with a timeout", json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}}}), Some(5)),
            ("a timeout of 0: service skipped", json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}), None),
        ];
        for (rule, extra, expected) in cases {
            let computed = desired_state(&objects(&[kubia(extra)], &[]), NODE);
            let seconds = computed.state.services.values().next().map(|p| p.affinity_seconds);
            assert_eq!(seconds, expected, "{rule}");
            assert_eq!(computed.skipped.len(), usize::from(expected.is_none()), "{rule}");
        }
    }

    #[test]
    fn health_check_node_port_counts_local_endpoints() {
        let spec = |policy: &str| {
            json!({"type": "LoadBalancer", "externalTrafficPolicy": policy, "healthCheckNodePort": 32000,
                   "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30123}]})
        };
        let remote = json!({"addresses": ["10.244.2.2"], "conditions": {"ready": true}, "nodeName": "node-b"});
        let slices = [kubia_slice("s1", json!([ep("10.244.1.2"), ep("10.244.1.3"), remote]))];
        let node_ips = [Ipv4Addr::new(192, 168, 0, 1)];
        let local = desired_state_on(&objects(&[kubia(spec("Local"))], &slices), NODE, &node_ips);
        let health = local.state.health_checks();
        let expected = ServiceHealth { namespace: "default".into(), name: "kubia".into(), local_endpoints: 2 };
        assert_eq!(health, BTreeMap::from([(32000, expected)]), "Local: the local endpoints, not the remote one");
        let cluster = desired_state_on(&objects(&[kubia(spec("Cluster"))], &slices), NODE, &node_ips);
        assert!(cluster.state.health_checks().is_empty(), "only with externalTrafficPolicy Local");
    }
}
