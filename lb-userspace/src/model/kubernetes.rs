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
//! - Each family of a service is served on its own, as kube-proxy's
//!   proxier per family does: the cluster IP of `clusterIPs` (dual-stack,
//!   either family first), and the node, external and load balancer
//!   addresses and `loadBalancerSourceRanges` of that family, go to the
//!   endpoints of that family's EndpointSlices (`addressType`); its service
//!   ports are named with `/ipv6` for IPv6. Headless services are not
//!   programmed. Load balancer ingress IPs with `ipMode: Proxy` are left to
//!   the load balancer.
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
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use rustc_hash::FxHashMap;
use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::{
    DesiredState, Frontend, IpFamily, Protocol, ServicePort, ServicePortName,
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
pub fn desired_state_on(objects: &ClusterObjects, node: &str, node_ips: &[IpAddr]) -> Computed {
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
    node_ips: Vec<IpAddr>,
    /// This node's zone (`topology.kubernetes.io/zone`), for topology.
    zone: Option<String>,
}

impl Model {
    /// A model for a node with these addresses (for node ports).
    pub fn with_node_ips(node_ips: Vec<IpAddr>) -> Self {
        Self { node_ips, ..Self::default() }
    }

    /// This node's addresses, where node ports answer.
    pub fn node_ips(&self) -> &[IpAddr] {
        &self.node_ips
    }

    /// New node addresses: every service is computed again by the next
    /// `update` (its node ports move).
    pub fn set_node_ips(&mut self, node_ips: Vec<IpAddr>) {
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
    node_ips: &[IpAddr],
) -> (Vec<(ServicePortName, ServicePort)>, Vec<String>) {
    let key = ObjectKey::of(&service.metadata);
    let mut skipped = Vec::new();
    // Each family's slices, indexed by `IpFamily`.
    let mut valid: [Vec<ValidSlice>; 2] = Default::default();
    for slice in slices {
        let slice_key = ObjectKey::of(&slice.metadata);
        let mut problems = Vec::new();
        if let Some(v) = valid_slice(slice, &mut problems) {
            valid[v.family as usize].push(v);
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
    slices: &[Vec<ValidSlice>; 2],
    (here, node_ips): (Here<'_>, &[IpAddr]),
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
    let cluster_ips = cluster_ips(spec)?;
    if cluster_ips.is_empty() {
        // Headless: nothing to translate. Headless Services come from the
        // API too (no label marks them, only their slices), so this check
        // stays for both sources.
        return Ok(Vec::new());
    }
    let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
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
    // Addresses answering on the service port from outside: external IPs
    // (any type) and, for LoadBalancer services, the ingress IPs.
    let mut external_addresses = Vec::new();
    for ip in spec.external_ips.iter().flatten() {
        external_addresses.push(ip.parse::<IpAddr>().map_err(|_| format!("externalIP {ip:?} is not an IP address"))?);
    }
    let mut load_balancer_ips = BTreeSet::new();
    if service_type == "LoadBalancer" {
        let ingress = service.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
        // ipMode Proxy: the load balancer proxies to the node itself, so its
        // address is left to it (kube-proxy does the same).
        let delivered = ingress.into_iter().flatten().filter(|i| i.ip_mode.as_deref() != Some("Proxy"));
        for ip in delivered.filter_map(|i| i.ip.as_deref()) {
            let ip = ip.parse::<IpAddr>().map_err(|_| format!("load balancer ingress IP {ip:?} is not an IP address"))?;
            external_addresses.push(ip);
            load_balancer_ips.insert(ip);
        }
    }
    let source_ranges = if load_balancer_ips.is_empty() { BTreeSet::new() } else { source_ranges(spec, &load_balancer_ips, node_ips, notes) };
    // Asked by cloud load balancers whether this node has local endpoints.
    let health_check_node_port = match spec.health_check_node_port {
        Some(port) if service_type == "LoadBalancer" && external_local => Some(valid_port(port, "healthCheckNodePort")?),
        _ => None,
    };
    let shape = ServiceShape {
        key,
        spec,
        here,
        local_only,
        external_local,
        distribution: Distribution::of(spec.traffic_distribution.as_deref()),
        has_node_ports: matches!(service_type, "NodePort" | "LoadBalancer"),
        affinity_seconds,
        health_check_node_port,
    };
    let mut ports = Vec::new();
    for cluster_ip in cluster_ips {
        let family = IpFamily::of(cluster_ip);
        let load_balancer_ips = of_family(&load_balancer_ips, family);
        // Each family has its own ranges, as kube-proxy's proxier of each
        // family reads only its own: none of a family, no restriction.
        let source_ranges: BTreeSet<(IpAddr, u8)> = source_ranges.iter().copied().filter(|(ip, _)| IpFamily::of(*ip) == family).collect();
        let addresses = FamilyAddresses {
            cluster_ip,
            external: of_family(&external_addresses, family),
            node: of_family(node_ips, family),
            source_ranged: if source_ranges.is_empty() { BTreeSet::new() } else { load_balancer_ips },
            source_ranges,
        };
        ports.extend(family_ports(&shape, &addresses, &slices[family as usize], notes)?);
    }
    Ok(ports)
}

/// The addresses of `family` among `ips`.
fn of_family<'a>(ips: impl IntoIterator<Item = &'a IpAddr>, family: IpFamily) -> BTreeSet<IpAddr> {
    ips.into_iter().copied().filter(|&ip| IpFamily::of(ip) == family).collect()
}

/// What the service's spec says for every family, and where it is
/// computed.
struct ServiceShape<'a> {
    key: &'a ObjectKey,
    spec: &'a k8s_openapi::api::core::v1::ServiceSpec,
    here: Here<'a>,
    local_only: bool,
    external_local: bool,
    distribution: Distribution,
    has_node_ports: bool,
    affinity_seconds: u32,
    health_check_node_port: Option<u16>,
}

/// A service's addresses of one family.
struct FamilyAddresses {
    cluster_ip: IpAddr,
    external: BTreeSet<IpAddr>,
    node: BTreeSet<IpAddr>,
    source_ranges: BTreeSet<(IpAddr, u8)>,
    source_ranged: BTreeSet<IpAddr>,
}

/// The service ports of one family of a service: the in-cluster side of
/// each port, and its external side when it has external addresses.
fn family_ports(
    shape: &ServiceShape<'_>,
    addresses: &FamilyAddresses,
    slices: &[ValidSlice],
    notes: &mut Vec<String>,
) -> Result<Vec<(ServicePortName, ServicePort)>, String> {
    let (key, spec, here) = (shape.key, shape.spec, shape.here);
    let family = IpFamily::of(addresses.cluster_ip);
    let mut ports = Vec::new();
    let policy = |local: bool| if local { Policy::Local } else { Policy::Cluster };
    for port in spec.ports.iter().flatten() {
        let number = valid_port(port.port, "port")?;
        let name = port.name.clone().unwrap_or_default();
        let Some(protocol) = protocol(port.protocol.as_deref())? else {
            // One line for the port, not one per family.
            let note = format!("port {name:?} ({number}/SCTP) is not served: SCTP is not supported by this datapath");
            if !notes.contains(&note) {
                notes.push(note);
            }
            continue;
        };
        let internal_name = ServicePortName::new(&key.namespace, &key.name, &name).in_family(family);
        let picked = pick(slices, &name, protocol, policy(shape.local_only), shape.distribution, here);
        // A Local policy without a local endpoint drops when endpoints
        // exist on other nodes, and rejects when there are none anywhere
        // (kube-proxy's "no local endpoints" versus "no endpoints").
        let has_endpoints_anywhere = picked.anywhere;
        let internal = ServicePort {
            frontends: [Frontend { ip: addresses.cluster_ip, port: number, protocol }].into(),
            endpoints: picked.serving,
            draining: picked.draining,
            drop_when_empty: shape.local_only && has_endpoints_anywhere,
            snat: false,
            affinity_seconds: shape.affinity_seconds,
            in_cluster_via: None,
            health_check_node_port: None,
            source_ranges: BTreeSet::new(),
            source_ranged: BTreeSet::new(),
        };

        // The external side: the node port on every node address, and the
        // service port on external and load balancer addresses.
        let mut frontends: BTreeSet<Frontend> = addresses.external.iter().map(|&ip| Frontend { ip, port: number, protocol }).collect();
        if shape.has_node_ports && let Some(node_port) = port.node_port {
            let node_port = valid_port(node_port, "nodePort")?;
            frontends.extend(addresses.node.iter().map(|&ip| Frontend { ip, port: node_port, protocol }));
        }
        if !frontends.is_empty() {
            // Local: this node's endpoints only, client address kept, and
            // dropped when there are none here but some elsewhere. Cluster:
            // every endpoint, the source translated to the node so replies
            // come back through it.
            let picked = pick(slices, &name, protocol, policy(shape.external_local), shape.distribution, here);
            let external = ServicePort {
                frontends,
                endpoints: picked.serving,
                draining: picked.draining,
                drop_when_empty: shape.external_local && has_endpoints_anywhere,
                snat: !shape.external_local,
                affinity_seconds: shape.affinity_seconds,
                in_cluster_via: shape.external_local.then_some((addresses.cluster_ip, number)),
                health_check_node_port: shape.health_check_node_port,
                source_ranges: addresses.source_ranges.clone(),
                source_ranged: addresses.source_ranged.clone(),
            };
            ports.push((internal_name.to_external(), external));
        }
        ports.push((internal_name, internal));
    }
    Ok(ports)
}

/// The ranges of `loadBalancerSourceRanges` (address masked, prefix
/// length), as kube-proxy's firewall allows them: when one holds a node
/// address of its family, that family's load balancer IPs themselves too (a
/// VIP-like load balancer whose IP is local to the node loops the node's
/// own requests back from that IP). An invalid one is left out with a line
/// in `notes`. Empty: no restriction.
fn source_ranges(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    load_balancer_ips: &BTreeSet<IpAddr>,
    node_ips: &[IpAddr],
    notes: &mut Vec<String>,
) -> BTreeSet<(IpAddr, u8)> {
    let mut ranges = BTreeSet::new();
    for text in spec.load_balancer_source_ranges.iter().flatten() {
        match parse_cidr(text) {
            Some(range) => ranges.insert(range),
            None => {
                notes.push(format!("loadBalancerSourceRanges entry {text:?} is not a CIDR; left out"));
                continue;
            }
        };
    }
    let covered: Vec<IpFamily> =
        node_ips.iter().filter(|&&ip| ranges.iter().any(|&range| in_range(ip, range))).map(|&ip| IpFamily::of(ip)).collect();
    for &ip in load_balancer_ips.iter().filter(|&&ip| covered.contains(&IpFamily::of(ip))) {
        ranges.insert((ip, full_length(ip)));
    }
    ranges
}

/// A CIDR such as `10.0.0.0/8` or `fd00::/64`, its address masked to the
/// prefix.
pub(crate) fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (address, len) = text.trim().split_once('/')?;
    let (ip, len) = (address.parse::<IpAddr>().ok()?, len.parse::<u8>().ok()?);
    (len <= full_length(ip)).then(|| (masked(ip, len), len))
}

/// The prefix length of a single address of `ip`'s family.
fn full_length(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// `ip` with only its first `len` bits kept.
fn masked(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(ip) => Ipv4Addr::from(u32::from(ip) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)).into(),
        IpAddr::V6(ip) => Ipv6Addr::from(u128::from(ip) & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)).into(),
    }
}

/// Whether `ip` is in the range `(network, len)` (of its own family).
fn in_range(ip: IpAddr, (network, len): (IpAddr, u8)) -> bool {
    IpFamily::of(ip) == IpFamily::of(network) && masked(ip, len) == network
}

/// The service's cluster IPs, one per family: `clusterIPs` (dual-stack,
/// either family first), else `clusterIP`; none for headless services.
fn cluster_ips(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Result<Vec<IpAddr>, String> {
    let listed = spec.cluster_ips.as_deref().filter(|ips| !ips.is_empty());
    let ips = listed.map_or_else(|| spec.cluster_ip.iter().cloned().collect(), <[String]>::to_vec);
    let mut found: Vec<IpAddr> = Vec::new();
    for text in &ips {
        match text.as_str() {
            "" | "None" => return Ok(Vec::new()),
            text => {
                let ip = text.parse::<IpAddr>().map_err(|_| format!("clusterIP {text:?} is not an IP address"))?;
                if !found.iter().any(|known| IpFamily::of(*known) == IpFamily::of(ip)) {
                    found.push(ip);
                }
            }
        }
    }
    Ok(found)
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
