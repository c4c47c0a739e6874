//! From Kubernetes objects to the desired state, with kube-proxy's rules.
//!
//! The rules are those of kube-proxy's pkg/proxy (servicechangetracker,
//! endpointslicecache, topology):
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
    // Another proxy's service. The API source never holds one (the API
    // server leaves them out, see `source::api::proxied_selector`); this is
    // for the manifests source, which has no server-side selection.
    let labels = service.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        return Ok(Vec::new());
    }
    let spec = service.spec.as_ref().ok_or("it has no spec")?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Vec::new());
    }
    let Some(cluster_ip) = ipv4_cluster_ip(spec)? else {
        // Headless, or IPv6 only: nothing for this IPv4 datapath. Headless
        // Services come from the API too (no label marks them, only their
        // slices), so this check stays for both sources.
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
#[path = "kubernetes_tests.rs"]
mod tests;
