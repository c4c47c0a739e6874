//! The services and shared fixtures the packet cases run against.
//!
//! The packets that build the flows a case needs are here too.
use lb_common::{DATAPATH_ANSWER_ECHO, DatapathConfig, Ipv4Cidr, Ipv4Cidrs, SNAT_PORT_MAX, SNAT_PORT_MIN, ip_be};
use lb_tests::{
    fixture::{Fixture, desired, service},
    packets::Frame,
};
use lb_userspace::model::{DesiredState, Protocol, ServicePort, ServicePortName};

use crate::Shared;

pub const BACKEND: [u8; 4] = [10, 244, 1, 2];
pub const NODE_IP: [u8; 4] = [192, 168, 0, 1];
pub const LOCAL_BACKEND: [u8; 4] = [10, 244, 1, 3];
pub const LB_IP: [u8; 4] = [203, 0, 113, 10];
const POD_CIDR: ([u8; 4], u8) = ([10, 244, 0, 0], 16);
const SERVICE_CIDR: ([u8; 4], u8) = ([10, 96, 0, 0], 16);

/// The services of `cluster_services`, by the names their counters go by.
pub const WEB: &str = "default/web:80";
pub const DNS: &str = "default/dns:53";
pub const EMPTY_TCP: &str = "default/empty:80";
pub const EMPTY_UDP: &str = "default/empty:53";

/// Cluster IPs only: web (TCP) and dns (UDP) on 10.96.0.10 with one
/// backend, and a service without endpoints on 10.96.0.11; no node address,
/// no ranges.
pub fn cluster_services() -> DesiredState {
    desired([
        service("web", [10, 96, 0, 10], 80, Protocol::Tcp, &[(BACKEND, 8080)]),
        service("dns", [10, 96, 0, 10], 53, Protocol::Udp, &[(BACKEND, 5353)]),
        service("empty", [10, 96, 0, 11], 80, Protocol::Tcp, &[]),
        service("empty", [10, 96, 0, 11], 53, Protocol::Udp, &[]),
    ])
}

/// The services of `external_services`, by the names their counters go by.
pub const HAIRPIN: &str = "default/hairpin:80";
pub const TWIN: &str = "default/twin:80";
pub const NODE_PORT_TCP: &str = "default/cluster:30080/external";
pub const NODE_PORT_UDP: &str = "default/cluster:30053/external";
pub const LOCAL: &str = "default/local:30081/external";
pub const LB: &str = "default/lb:80";

/// The external side of services on a node at 192.168.0.1: a node port
/// with externalTrafficPolicy Cluster (source NAT), one with Local and a
/// local endpoint, one with Local and none; a cluster IP whose only
/// endpoint is 10.244.1.2, for hairpin; and a load balancer IP with Local
/// policy and no local endpoint, whose cluster IP side has 10.244.1.2.
pub fn external_services() -> DesiredState {
    let external = |(name, port): (ServicePortName, ServicePort), local: bool| {
        (name.to_external(), ServicePort { drop_when_empty: local, snat: !local, ..port })
    };
    let (lb_name, lb_port) = service("lb", LB_IP, 80, Protocol::Tcp, &[]);
    desired([
        service("hairpin", [10, 96, 0, 20], 80, Protocol::Tcp, &[(BACKEND, 8080)]),
        service("twin", [10, 96, 0, 21], 80, Protocol::Tcp, &[(BACKEND, 8080)]),
        external(service("cluster", NODE_IP, 30080, Protocol::Tcp, &[(BACKEND, 8080)]), false),
        external(service("cluster", NODE_IP, 30053, Protocol::Udp, &[(BACKEND, 5353)]), false),
        external(service("local", NODE_IP, 30081, Protocol::Tcp, &[(LOCAL_BACKEND, 8080)]), true),
        external(service("nolocal", NODE_IP, 30082, Protocol::Tcp, &[]), true),
        service("lb", [10, 96, 0, 22], 80, Protocol::Tcp, &[(BACKEND, 8080)]),
        external((lb_name, ServicePort { in_cluster_via: Some(([10, 96, 0, 22].into(), 80)), ..lb_port }), true),
    ])
}

/// `external_services` on a node with an address for source NAT, answering
/// pings to cluster IPs, with a pod range and a service range.
pub fn node_fixture() -> Fixture {
    let mut fixture = Fixture::new(&external_services());
    let config = DatapathConfig {
        snat_ip: ip_be(NODE_IP.into()),
        snat_port_min: SNAT_PORT_MIN,
        snat_port_max: SNAT_PORT_MAX,
        flags: DATAPATH_ANSWER_ECHO,
        cluster_cidrs: Ipv4Cidrs::new([Ipv4Cidr::new(POD_CIDR.0.into(), POD_CIDR.1)]),
        service_cidrs: Ipv4Cidrs::new([Ipv4Cidr::new(SERVICE_CIDR.0.into(), SERVICE_CIDR.1)]),
        ..DatapathConfig::default()
    };
    fixture.datapath.maps.set_config(config).expect("config");
    fixture
}

/// The fixture of the cluster IP cases (translate, reject, not_service,
/// icmp_error, malformed, fragment).
pub static CLUSTER: Shared = Shared::new(|| Fixture::new(&cluster_services()));
/// The fixture of the node cases.
pub static NODE: Shared = Shared::new(node_fixture);

/// A confirmed TCP connection from `client` to `frontend`: its SYN, and the
/// SYN-ACK of `backend` to `seen_as`, the client as the backend sees it
/// (the client itself, or the node's address under source NAT).
pub fn connection(client: &str, frontend: &str, backend: &str, seen_as: &str) -> [Vec<u8>; 2] {
    [Frame::tcp_syn(client, frontend).bytes(), Frame::tcp_syn_ack(backend, seen_as).bytes()]
}

/// `connection` to web, whose backend sees the client as it is.
pub fn web_connection(client: &str) -> [Vec<u8>; 2] {
    connection(client, "10.96.0.10:80", "10.244.1.2:8080", client)
}

/// A UDP flow from `client` to dns: its first query.
pub fn dns_flow(client: &str) -> [Vec<u8>; 1] {
    [Frame::udp(client, "10.96.0.10:53", b"query").bytes()]
}
