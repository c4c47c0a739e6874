//! The desired datapath state: per service port, its frontends and the endpoints serving them.
//!
//! `kubernetes::desired_state` computes it from Services and EndpointSlices
//! with kube-proxy's rules; the syncer programs it.
pub mod endpoints;
pub mod kubernetes;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

/// An IP family. A dual-stack service is served in each family on its
/// own, as kube-proxy runs a proxier per family: each family's cluster IP,
/// node ports, external and load balancer IPs go to that family's
/// endpoints (its EndpointSlices' `addressType`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    #[default]
    V4,
    V6,
}

impl IpFamily {
    pub const fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// As Kubernetes spells it (`ipFamilies`, EndpointSlice `addressType`).
    pub const fn name(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

/// A service port, as kube-proxy names it: namespace/name:port-name; its
/// external side (node ports, load balancer and external IPs, which have
/// their own traffic policy and so their own backend set) adds
/// `/external`; its IPv6 side (a service port of each family has its own
/// endpoints) adds `/ipv6`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
    pub external: bool,
    pub family: IpFamily,
}

impl ServicePortName {
    /// The in-cluster side (cluster IP) of an IPv4 service port.
    pub fn new(namespace: &str, name: &str, port: &str) -> Self {
        Self { namespace: namespace.into(), name: name.into(), port: port.into(), external: false, family: IpFamily::V4 }
    }

    /// The external side of the same service port.
    pub fn to_external(&self) -> Self {
        Self { external: true, ..self.clone() }
    }

    /// The same service port in `family`.
    pub fn in_family(&self, family: IpFamily) -> Self {
        Self { family, ..self.clone() }
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        if self.external {
            write!(f, "/external")?;
        }
        if self.family == IpFamily::V6 {
            write!(f, "/ipv6")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    /// The protocol with IP protocol number `number`, if it is one of ours.
    pub const fn from_number(number: u8) -> Option<Self> {
        match number {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

/// An address, port and protocol that clients connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

/// An endpoint address and the target port on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
}

/// One service port: its frontends and the endpoints that serve them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePort {
    pub frontends: BTreeSet<Frontend>,
    /// Endpoints that take new connections.
    pub endpoints: BTreeSet<Endpoint>,
    /// Listed endpoints that take no new connections but keep the ones they
    /// have (for TCP any listed endpoint, for UDP serving ones).
    pub draining: BTreeSet<Endpoint>,
    /// With no endpoints, drop traffic rather than reject it: kube-proxy's
    /// behaviour for a Local traffic policy without a local endpoint.
    pub drop_when_empty: bool,
    /// Translate the source of new flows to the node's address, so replies
    /// come back through this node (externalTrafficPolicy Cluster).
    pub snat: bool,
    /// sessionAffinity ClientIP's timeout in seconds; 0 without affinity.
    pub affinity_seconds: u32,
    /// The external side of an externalTrafficPolicy Local service: its
    /// cluster IP and port, through which clients inside the cluster (pods,
    /// the node itself) are served instead, by every endpoint: the Local
    /// policy is for clients from outside (kube-proxy's "pod traffic for
    /// external destinations").
    pub in_cluster_via: Option<(IpAddr, u16)>,
    /// The external side of a LoadBalancer service with
    /// externalTrafficPolicy Local: the node port where load balancers ask
    /// whether this node has local endpoints.
    pub health_check_node_port: Option<u16>,
    /// loadBalancerSourceRanges of a LoadBalancer service's external side:
    /// new connections to `source_ranged` addresses (its load balancer IPs;
    /// not its node ports or external IPs) only from these ranges
    /// (address, prefix length). Empty: from anywhere.
    pub source_ranges: BTreeSet<(IpAddr, u8)>,
    pub source_ranged: BTreeSet<IpAddr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<ServicePortName, ServicePort>,
}

/// What a health check node port answers for: its service and how many
/// endpoints of it are on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

impl DesiredState {
    pub fn endpoint_count(&self) -> usize {
        self.services.values().map(|s| s.endpoints.len()).sum()
    }

    /// Service ports with a Local traffic policy and no endpoint on this
    /// node while other nodes have some (their traffic is dropped):
    /// (internal, external), as kube-proxy's
    /// `sync_proxy_rules_no_local_endpoints_total` counts them.
    pub fn no_local_endpoints(&self) -> (usize, usize) {
        let without = |external: bool| {
            self.services.iter().filter(|(name, port)| name.external == external && port.drop_when_empty && port.endpoints.is_empty()).count()
        };
        (without(false), without(true))
    }

    /// The health check node ports and what each reports: the service's
    /// distinct local endpoint addresses over all its ports, in the family
    /// with more of them (a dual-stack pod has an address in each).
    pub fn health_checks(&self) -> BTreeMap<u16, ServiceHealth> {
        let mut local: BTreeMap<u16, (ServiceHealth, BTreeSet<IpAddr>)> = BTreeMap::new();
        for (name, port) in &self.services {
            let Some(node_port) = port.health_check_node_port else { continue };
            let (_, ips) = local.entry(node_port).or_insert_with(|| {
                (ServiceHealth { namespace: name.namespace.clone(), name: name.name.clone(), local_endpoints: 0 }, BTreeSet::new())
            });
            ips.extend(port.endpoints.iter().map(|e| e.ip));
        }
        let per_family = |ips: &BTreeSet<IpAddr>| ips.iter().filter(|ip| ip.is_ipv4()).count().max(ips.iter().filter(|ip| ip.is_ipv6()).count());
        local.into_iter().map(|(port, (health, ips))| (port, ServiceHealth { local_endpoints: per_family(&ips), ..health })).collect()
    }
}
