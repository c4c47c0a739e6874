//! A service's endpoints, and the one place that picks which of them serve on this node.
//!
//! What the EndpointSlices say about a service's endpoints (address, the port
//! each slice port gives it, node, zone, conditions, topology hints), and the
//! pick of the endpoints a traffic policy uses on this node: kube-proxy's
//! `CategorizeEndpoints` with its topology rules (pkg/proxy/topology.go).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{Endpoint, IpFamily, Protocol};

/// What a valid slice says about one endpoint.
#[derive(Clone, Debug)]
pub(super) struct SliceEndpoint {
    pub ip: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// Topology hints: the zones and nodes that should use it.
    pub for_zones: Vec<String>,
    pub for_nodes: Vec<String>,
}

/// A slice that passed validation.
pub(super) struct ValidSlice {
    /// Its `addressType`: which family's service ports it serves.
    pub family: IpFamily,
    /// (name, protocol, port) of each slice port.
    pub ports: Vec<(String, Protocol, u16)>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// This node, as the policies see it.
#[derive(Clone, Copy, Debug)]
pub struct Here<'a> {
    pub node: &'a str,
    /// Its `topology.kubernetes.io/zone` label.
    pub zone: Option<&'a str>,
}

/// Which endpoints a side of a service port may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Policy {
    /// Every node's, narrowed by topology.
    Cluster,
    /// This node's only (internal or external traffic policy Local).
    Local,
}

/// The service's `trafficDistribution`, standing in for the hints the
/// EndpointSlice controller derives from it where the slices carry none
/// (a directory of manifests has no controller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Distribution {
    Any,
    /// PreferClose (its older name) and PreferSameZone: hinted for its own
    /// zone.
    SameZone,
    /// PreferSameNode: hinted for its own node (and zone).
    SameNode,
}

impl Distribution {
    pub fn of(traffic_distribution: Option<&str>) -> Self {
        match traffic_distribution {
            Some("PreferClose" | "PreferSameZone") => Distribution::SameZone,
            Some("PreferSameNode") => Distribution::SameNode,
            _ => Distribution::Any,
        }
    }
}

/// The endpoints a policy picked for one service port on this node.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Picked {
    /// They take new connections.
    pub serving: BTreeSet<Endpoint>,
    /// They keep the flows they have, take no new ones: for TCP every other
    /// listed endpoint, in any condition (kube-proxy never touches an
    /// established TCP connection's conntrack entry, and moving one can
    /// only reset it: a pod that turns unready under load finishes its
    /// work); for UDP only the other serving ones (kube-proxy clears the
    /// UDP flows of an endpoint that stops serving, so its clients move).
    pub draining: BTreeSet<Endpoint>,
    /// Some endpoint anywhere in the cluster could serve (ready, or serving
    /// and terminating): a Local policy without a local one then drops
    /// rather than rejects.
    pub anywhere: bool,
}

/// How topology narrows the Cluster policy's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    None,
    SameZone,
    SameNode,
}

/// The endpoints of the service port `port_name`/`protocol` that `policy`
/// uses on this node: ready ones, or when there are none, serving and
/// terminating ones (KEP-1669); for Cluster, narrowed by topology hints as
/// kube-proxy does (same node when every ready endpoint has a node hint and
/// one names this node, else same zone likewise, else no narrowing).
pub(super) fn pick(slices: &[ValidSlice], port_name: &str, protocol: Protocol, policy: Policy, distribution: Distribution, here: Here<'_>) -> Picked {
    let mut candidates = merged(slices, port_name, protocol);
    let anywhere = candidates.values().any(|c| c.ready || (c.serving && c.terminating));
    let mode = match policy {
        Policy::Local => {
            candidates.retain(|_, c| c.node.as_deref() == Some(here.node));
            TopologyMode::None
        }
        Policy::Cluster => {
            if distribution != Distribution::Any && candidates.values().all(|c| c.for_zones.is_empty() && c.for_nodes.is_empty()) {
                derive_hints(&mut candidates, distribution);
            }
            topology_mode(&candidates, here)
        }
    };
    let select = |keep: &dyn Fn(&SliceEndpoint) -> bool| -> BTreeSet<Endpoint> {
        candidates.iter().filter(|(_, c)| keep(c)).map(|(e, _)| *e).collect()
    };
    let mut serving = select(&|c| c.ready && available_for_topology(c, mode, here));
    if serving.is_empty() {
        serving = select(&|c| c.serving && c.terminating);
    }
    let drains: &dyn Fn(&SliceEndpoint) -> bool = match protocol {
        Protocol::Tcp => &|_| true,
        Protocol::Udp => &|c| c.serving,
    };
    let draining = select(drains).difference(&serving).copied().collect();
    Picked { serving, draining, anywhere }
}

/// The endpoints of one service port, merged by address and port: one
/// listed twice counts once, ready and serving if any listing says so,
/// terminating if all do.
fn merged(slices: &[ValidSlice], port_name: &str, protocol: Protocol) -> BTreeMap<Endpoint, SliceEndpoint> {
    let mut candidates: BTreeMap<Endpoint, SliceEndpoint> = BTreeMap::new();
    for slice in slices {
        let Some(&(_, _, port)) = slice.ports.iter().find(|(n, p, _)| n == port_name && *p == protocol) else {
            continue;
        };
        for ep in &slice.endpoints {
            candidates
                .entry(Endpoint { ip: ep.ip, port })
                .and_modify(|seen| {
                    seen.ready |= ep.ready;
                    seen.serving |= ep.serving;
                    seen.terminating &= ep.terminating;
                })
                .or_insert_with(|| ep.clone());
        }
    }
    candidates
}

/// The hints the EndpointSlice controller gives for `distribution`: each
/// endpoint for its own zone (and node, for SameNode).
fn derive_hints(candidates: &mut BTreeMap<Endpoint, SliceEndpoint>, distribution: Distribution) {
    for c in candidates.values_mut() {
        c.for_zones = c.zone.iter().cloned().collect();
        if distribution == Distribution::SameNode {
            c.for_nodes = c.node.iter().cloned().collect();
        }
    }
}

/// kube-proxy's `topologyModeFromHints`, over the ready endpoints.
fn topology_mode(candidates: &BTreeMap<Endpoint, SliceEndpoint>, here: Here<'_>) -> TopologyMode {
    let ready: Vec<&SliceEndpoint> = candidates.values().filter(|c| c.ready).collect();
    let all_hinted = |hints: fn(&SliceEndpoint) -> &Vec<String>| ready.iter().all(|c| !hints(c).is_empty());
    let one_for = |hints: fn(&SliceEndpoint) -> &Vec<String>, name: &str| ready.iter().any(|c| hints(c).iter().any(|h| h == name));
    if all_hinted(|c| &c.for_nodes) && one_for(|c| &c.for_nodes, here.node) {
        return TopologyMode::SameNode;
    }
    if all_hinted(|c| &c.for_zones) && here.zone.is_some_and(|zone| one_for(|c| &c.for_zones, zone)) {
        return TopologyMode::SameZone;
    }
    TopologyMode::None
}

fn available_for_topology(c: &SliceEndpoint, mode: TopologyMode, here: Here<'_>) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::SameNode => c.for_nodes.iter().any(|n| n == here.node),
        TopologyMode::SameZone => here.zone.is_some_and(|zone| c.for_zones.iter().any(|z| z == zone)),
    }
}

/// A slice's valid content; `None` for slices this datapath does not use
/// (FQDN addresses). An invalid port or endpoint is left out
/// alone, with a line in `problems`, as kube-proxy does.
pub(super) fn valid_slice(slice: &EndpointSlice, problems: &mut Vec<String>) -> Option<ValidSlice> {
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        _ => return None,
    };
    let mut ports = Vec::new();
    for port in slice.ports.iter().flatten() {
        let name = port.name.clone().unwrap_or_default();
        let valid = port
            .port
            .ok_or_else(|| "no port number".to_owned())
            .and_then(|number| super::kubernetes::valid_port(number, "port"))
            .and_then(|number| Ok(super::kubernetes::protocol(port.protocol.as_deref())?.map(|protocol| (protocol, number))));
        match valid {
            Ok(Some((protocol, number))) => ports.push((name, protocol, number)),
            Ok(None) => {} // SCTP: the service says so
            Err(reason) => problems.push(format!("port {name:?} skipped: {reason}")),
        }
    }
    let mut endpoints = Vec::new();
    for ep in &slice.endpoints {
        let conditions = ep.conditions.as_ref();
        // Unset conditions: ready and serving unless said otherwise, not
        // terminating (discovery/v1 semantics, as kube-proxy reads them).
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        // The first address is the endpoint's (all of them are the same
        // pod); kube-proxy uses no other.
        let Some(address) = ep.addresses.first() else {
            problems.push("an endpoint without addresses skipped".to_owned());
            continue;
        };
        let ip = match address.parse::<IpAddr>() {
            Ok(ip) if IpFamily::of(ip) == family => ip,
            _ => {
                problems.push(format!("endpoint {address:?} skipped: not an {} address", family.name()));
                continue;
            }
        };
        let hints = ep.hints.as_ref();
        endpoints.push(SliceEndpoint {
            ip,
            ready,
            serving,
            terminating,
            node: ep.node_name.clone(),
            zone: ep.zone.clone(),
            for_zones: hints.and_then(|h| h.for_zones.as_ref()).into_iter().flatten().map(|z| z.name.clone()).collect(),
            for_nodes: hints.and_then(|h| h.for_nodes.as_ref()).into_iter().flatten().map(|n| n.name.clone()).collect(),
        });
    }
    Some(ValidSlice { family, ports, endpoints })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Endpoint 10.244.0.`last` on `node` in `zone`, ready, with hints.
    fn ep(last: u8, node: &str, zone: &str, for_zones: &[&str], for_nodes: &[&str]) -> SliceEndpoint {
        SliceEndpoint {
            ip: std::net::Ipv4Addr::new(10, 244, 0, last).into(),
            ready: true,
            serving: true,
            terminating: false,
            node: Some(node.to_owned()),
            zone: Some(zone.to_owned()),
            for_zones: for_zones.iter().map(|z| (*z).to_owned()).collect(),
            for_nodes: for_nodes.iter().map(|n| (*n).to_owned()).collect(),
        }
    }

    /// Each case: the rule, the endpoints (1 on node-a in zone-1, 2 on
    /// node-b in zone-1, 3 on node-c in zone-2), the policy and
    /// distribution, this node's zone, and the endpoints picked on node-a.
    #[test]
    fn topology_narrows_the_cluster_policy_as_kube_proxy_does() {
        let unhinted = || vec![ep(1, "node-a", "zone-1", &[], &[]), ep(2, "node-b", "zone-1", &[], &[]), ep(3, "node-c", "zone-2", &[], &[])];
        let zone_hinted = || vec![ep(1, "node-a", "zone-1", &["zone-1"], &[]), ep(2, "node-b", "zone-1", &["zone-1"], &[]), ep(3, "node-c", "zone-2", &["zone-2"], &[])];
        let node_hinted = || {
            vec![
                ep(1, "node-a", "zone-1", &["zone-1"], &["node-a"]),
                ep(2, "node-b", "zone-1", &["zone-1"], &["node-b"]),
                ep(3, "node-c", "zone-2", &["zone-2"], &["node-c"]),
            ]
        };
        let not_ready = |mut e: SliceEndpoint| {
            e.ready = false;
            e.serving = false;
            e
        };
        use Distribution::*;
        use Policy::*;
        type Case = (&'static str, Vec<SliceEndpoint>, Policy, Distribution, Option<&'static str>, Vec<u8>);
        let cases: Vec<Case> = vec![
            ("no hints: every ready endpoint", unhinted(), Cluster, Any, Some("zone-1"), vec![1, 2, 3]),
            ("zone hints on every ready endpoint, some for this zone: this zone's", zone_hinted(), Cluster, Any, Some("zone-1"), vec![1, 2]),
            ("zone hints, none for this zone: every endpoint", zone_hinted(), Cluster, Any, Some("zone-9"), vec![1, 2, 3]),
            ("a node without a zone label: zone hints ignored", zone_hinted(), Cluster, Any, None, vec![1, 2, 3]),
            ("one ready endpoint without a hint: hints ignored",
                vec![ep(1, "node-a", "zone-1", &["zone-1"], &[]), ep(2, "node-b", "zone-1", &[], &[]), ep(3, "node-c", "zone-2", &["zone-2"], &[])],
                Cluster, Any, Some("zone-1"), vec![1, 2, 3]),
            ("a not-ready endpoint without a hint does not count",
                vec![ep(1, "node-a", "zone-1", &["zone-1"], &[]), not_ready(ep(2, "node-b", "zone-1", &[], &[])), ep(3, "node-c", "zone-2", &["zone-2"], &[])],
                Cluster, Any, Some("zone-1"), vec![1]),
            ("node hints on every ready endpoint, one for this node: this node's", node_hinted(), Cluster, Any, Some("zone-1"), vec![1]),
            ("node hints, none for this node: zone hints then", node_hinted()[1..].to_vec(), Cluster, Any, Some("zone-1"), vec![2]),
            ("PreferClose without hints: this zone's, as the controller would hint", unhinted(), Cluster, SameZone, Some("zone-1"), vec![1, 2]),
            ("PreferSameNode without hints: this node's", unhinted(), Cluster, SameNode, Some("zone-1"), vec![1]),
            ("PreferSameNode, nothing on this node: this zone's", unhinted()[1..].to_vec(), Cluster, SameNode, Some("zone-1"), vec![2]),
            ("PreferSameZone, nothing in this zone: every endpoint", unhinted()[2..].to_vec(), Cluster, SameZone, Some("zone-1"), vec![3]),
            ("the slices' own hints win over the distribution", zone_hinted(), Cluster, SameNode, Some("zone-1"), vec![1, 2]),
            ("Local policy: this node's, hints aside", zone_hinted(), Local, SameZone, Some("zone-1"), vec![1]),
        ];
        for (rule, endpoints, policy, distribution, zone, expected) in cases {
            let slices = [ValidSlice { family: IpFamily::V4, ports: vec![("http".to_owned(), Protocol::Tcp, 8080)], endpoints }];
            let picked = pick(&slices, "http", Protocol::Tcp, policy, distribution, Here { node: "node-a", zone });
            let serving: Vec<u8> = picked.serving.iter().map(|e| match e.ip { std::net::IpAddr::V4(ip) => ip.octets()[3], std::net::IpAddr::V6(ip) => ip.octets()[15] }).collect();
            assert_eq!(serving, expected, "{rule}");
            assert!(picked.anywhere, "{rule}");
        }
    }
}
