//! Packet cases on services built from Kubernetes objects by the agent's own model.
//!
//! The other modules program hand-made desired states; here the Services and
//! EndpointSlices go through `desired_state_on`, as the agent's do, so each
//! case checks a kube-proxy rule from the object to the packet: a Local
//! policy rejects with no endpoint anywhere and drops with endpoints only on
//! other nodes, one port number served over TCP and UDP (cluster DNS) sends
//! each protocol to its own target port, and a load balancer IP in `ipMode:
//! Proxy` is left to the load balancer while one in the default mode is
//! translated.
use lb_common::{DatapathConfig, Ipv4Cidr, Ipv4Cidrs, Reason, SNAT_PORT_MAX, SNAT_PORT_MIN, ip_be};
use lb_tests::{
    fixture::{
        Fixture,
        Verdict::{Bounce, Drop, Pass},
    },
    packets::Frame,
};
use lb_userspace::model::kubernetes::{ClusterObjects, desired_state_on};
use serde_json::{Value, json};
use std::{net::Ipv4Addr, sync::Arc};

use crate::{
    Expect::{Bytes, Unchanged},
    Shared, case, packet_cases,
};

const NODE: &str = "node-a";
const NODE_IP: [u8; 4] = [192, 168, 0, 1];

/// The counters' names of the services below.
const NOWHERE: &str = "default/nowhere:http/external";
const DNS_TCP: &str = "default/dns:dns-tcp";
const DNS_UDP: &str = "default/dns:dns";
const LB_VIP: &str = "default/lb:http/external";

fn service(name: &str, spec: Value, status: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec, "status": status})
}

fn slice(service: &str, ports: Value, endpoints: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": format!("{service}-1"), "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "ports": ports, "endpoints": endpoints,
    })
}

/// An endpoint on `node`, ready.
fn endpoint(ip: &str, node: &str) -> Value {
    json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": node})
}

/// - nowhere: NodePort 30090, externalTrafficPolicy Local, no endpoints.
/// - elsewhere: NodePort 30091, externalTrafficPolicy Local, its one
///   endpoint on another node.
/// - dns: 10.96.0.53 port 53 over TCP (to 9053) and UDP (to 5353), as a
///   cluster DNS whose container listens on two ports.
/// - lb: a LoadBalancer with two ingress IPs, 203.0.113.20 in the default
///   mode (VIP) and 203.0.113.21 in ipMode Proxy.
fn objects() -> ClusterObjects {
    let node_port = |port: u16| json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": port}]);
    let services = [
        service("nowhere", json!({"type": "NodePort", "clusterIP": "10.96.0.90", "externalTrafficPolicy": "Local", "ports": node_port(30090)}), json!({})),
        service("elsewhere", json!({"type": "NodePort", "clusterIP": "10.96.0.91", "externalTrafficPolicy": "Local", "ports": node_port(30091)}), json!({})),
        service(
            "dns",
            json!({"clusterIP": "10.96.0.53", "ports": [
                {"name": "dns-tcp", "port": 53, "targetPort": "dns-tcp", "protocol": "TCP"},
                {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"},
            ]}),
            json!({}),
        ),
        service(
            "lb",
            json!({"type": "LoadBalancer", "clusterIP": "10.96.0.92", "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30092}]}),
            json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.20"}, {"ip": "203.0.113.21", "ipMode": "Proxy"}]}}),
        ),
    ];
    let slices = [
        slice("elsewhere", json!([{"name": "http", "port": 8080, "protocol": "TCP"}]), json!([endpoint("10.244.2.2", "node-b")])),
        slice(
            "dns",
            json!([{"name": "dns-tcp", "port": 9053, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
            json!([endpoint("10.244.1.2", NODE)]),
        ),
        slice("lb", json!([{"name": "http", "port": 8080, "protocol": "TCP"}]), json!([endpoint("10.244.1.2", NODE)])),
    ];
    ClusterObjects {
        services: services.into_iter().map(|s| Arc::new(serde_json::from_value(s).expect("a Service"))).collect(),
        slices: slices.into_iter().map(|s| Arc::new(serde_json::from_value(s).expect("an EndpointSlice"))).collect(),
    }
}

/// The services above as the agent's model programs them, on a node at
/// 192.168.0.1 with a source NAT address and a pod range.
fn fixture() -> Fixture {
    let computed = desired_state_on(&objects(), NODE, &[Ipv4Addr::from(NODE_IP).into()]);
    assert!(computed.skipped.is_empty(), "skipped: {:?}", computed.skipped);
    let mut fixture = Fixture::new(&computed.state);
    let config = DatapathConfig {
        snat_ip: ip_be(NODE_IP.into()),
        snat_port_min: SNAT_PORT_MIN,
        snat_port_max: SNAT_PORT_MAX,
        cluster_cidrs: Ipv4Cidrs::new([Ipv4Cidr::new([10, 244, 0, 0].into(), 16)]),
        ..DatapathConfig::default()
    };
    fixture.datapath.maps.set_config(config).expect("config");
    fixture
}

pub static KUBE_PROXY: Shared = Shared::new(fixture);

packet_cases! { KUBE_PROXY;
    /// externalTrafficPolicy Local with no endpoint anywhere: rejected
    /// (reset), as kube-proxy does, rather than dropped.
    local_policy_with_no_endpoint_anywhere_rejects => {
        let syn = Frame::tcp_syn("10.0.0.2:41000", "192.168.0.1:30090");
        case(syn.bytes(), Bounce, Bytes(syn.expected_reset()), Reason::RejectNoBackend).counts(NOWHERE, [0, 0, 1])
    };
    /// externalTrafficPolicy Local with endpoints on other nodes only:
    /// dropped, as kube-proxy does (the load balancer's health check steers
    /// clients away from this node).
    local_policy_with_endpoints_elsewhere_drops => {
        let syn = Frame::tcp_syn("10.0.0.2:41001", "192.168.0.1:30091");
        case(syn.bytes(), Drop, Unchanged, Reason::DropNoLocalEndpoint)
    };
    /// Cluster DNS over TCP: to the TCP target port.
    one_port_over_tcp_goes_to_the_tcp_target_port => {
        let syn = Frame::tcp_syn("10.244.3.7:41002", "10.96.0.53:53");
        case(syn.bytes(), Pass, Bytes(syn.clone().with_dst("10.244.1.2:9053").bytes()), Reason::ForwardNew).counts(DNS_TCP, [1, 1, 0])
    };
    /// Cluster DNS over UDP, the same port number: to the UDP target port.
    one_port_over_udp_goes_to_the_udp_target_port => {
        let query = Frame::udp("10.244.3.7:41003", "10.96.0.53:53", b"query");
        case(query.bytes(), Pass, Bytes(query.clone().with_dst("10.244.1.2:5353").bytes()), Reason::ForwardNew).counts(DNS_UDP, [1, 1, 0])
    };
    /// A load balancer IP in the default mode (VIP): translated (with the
    /// source, externalTrafficPolicy Cluster).
    load_balancer_ip_in_vip_mode_is_translated => {
        let syn = Frame::tcp_syn("10.0.0.2:62100", "203.0.113.20:80");
        let out = syn.clone().with_dst("10.244.1.2:8080").with_src("192.168.0.1:62100");
        case(syn.bytes(), Pass, Bytes(out.bytes()), Reason::ForwardNew).counts(LB_VIP, [1, 1, 0])
    };
    /// A load balancer IP in ipMode Proxy: the load balancer proxies to the
    /// node's ports itself, so the address is not ours: unchanged.
    load_balancer_ip_in_proxy_mode_is_left_to_the_load_balancer => {
        let syn = Frame::tcp_syn("10.0.0.2:62101", "203.0.113.21:80");
        case(syn.bytes(), Pass, Unchanged, Reason::PassNotService)
    };
}
