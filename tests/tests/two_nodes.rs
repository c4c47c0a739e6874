//! End-to-end tests on two nodes (tests/src/two_nodes.rs).
//!
//! Each node runs its own lb-agent, pods run behind both, and an external
//! client on the LAN reaches the nodes. Real TCP and UDP clients and servers.
//! Needs root.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use lb_tests::{
    cluster::{pod_ip, pod_ip6},
    netns::{Netns, connect_and_ask, http_get_until, udp_ask},
    two_nodes::{CLIENT_IP, CLIENT_IP6, NODE_IPS, NODE_IPS6, NODE_NAMES, POD_NODES, TwoNodes},
};

/// A service over the pods `pods` (by index), each on its node.
fn service(name: &str, spec: &str, pods: &[usize]) -> String {
    service_of_family(name, spec, pods, "IPv4")
}

/// A service over the pods' addresses of `family` ("IPv4" or "IPv6").
fn service_of_family(name: &str, spec: &str, pods: &[usize], family: &str) -> String {
    let mut endpoints = String::new();
    for &i in pods {
        let address = if family == "IPv6" { pod_ip6(i).to_string() } else { pod_ip(i).to_string() };
        endpoints.push_str(&format!("- {{addresses: [\"{address}\"], conditions: {{ready: true}}, nodeName: {}}}\n", NODE_NAMES[POD_NODES[i]]));
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{spec}---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: {name}}}\naddressType: {family}\n\
         ports:\n- {{name: http, port: 8080, protocol: TCP}}\n- {{name: dns, port: 5353, protocol: UDP}}\n\
         endpoints:{}---\n",
        if endpoints.is_empty() { " []\n".to_owned() } else { format!("\n{endpoints}") }
    )
}

const PORTS: &str = "  ports:\n  - {name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: NODEPORT}\n  \
                     - {name: dns, port: 53, targetPort: 5353, protocol: UDP, nodePort: NODEPORT}\n";

/// kubia: NodePort 30123, Cluster policy, every pod. kubia-local:
/// LoadBalancer, Local policy, node port 30124, health check 32000, only
/// kubia-3 (node-2). kubia-self: a cluster IP whose one endpoint is kubia-1.
/// kubia-sticky: ClientIP affinity, one second. kubia-internal-local:
/// internalTrafficPolicy Local over every pod.
fn manifests(local_pods: &[usize]) -> String {
    let ports = |node_port: &str| PORTS.replace("NODEPORT", node_port);
    service("kubia", &format!("  type: NodePort\n  clusterIP: 10.96.0.10\n{}", ports("30123")), &[0, 1, 2])
        + &service(
            "kubia-local",
            &format!("  type: LoadBalancer\n  clusterIP: 10.96.0.11\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n{}", ports("30124")),
            local_pods,
        )
        + &service("kubia-self", "  clusterIP: 10.96.0.12\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n", &[0])
        + &service(
            "kubia-sticky",
            "  clusterIP: 10.96.0.13\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n  \
             ports:\n  - {name: http, port: 80, targetPort: 8080}\n",
            &[0, 1, 2],
        )
        + &service(
            "kubia-internal-local",
            "  clusterIP: 10.96.0.14\n  internalTrafficPolicy: Local\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n",
            &[0, 1, 2],
        )
}

/// `count` connections from `ns` to `addr`; who answered (errors by kind).
fn hits(ns: &Netns, addr: impl Into<SocketAddr>, count: usize) -> BTreeMap<String, usize> {
    let addr = addr.into();
    ns.enter(move || {
        let mut hits = BTreeMap::<String, usize>::new();
        for _ in 0..count {
            let answer = connect_and_ask(addr).unwrap_or_else(|e| format!("error: {:?}", e.kind()));
            *hits.entry(answer.trim_start_matches("You've hit ").to_owned()).or_default() += 1;
        }
        hits
    })
    .expect("client")
}

/// One UDP question from `ns`; which pod answered.
fn udp_from(ns: &Netns, addr: impl Into<SocketAddr>) -> std::io::Result<String> {
    let addr = addr.into();
    ns.enter(move || udp_ask(addr).map(|answer| answer.trim_start_matches("You've hit ").to_owned())).expect("client")
}

fn peers(cluster: &TwoNodes, pod: usize) -> BTreeSet<IpAddr> {
    cluster.pod(pod).server.peers.lock().expect("peers").iter().map(|p| p.ip()).collect()
}

/// NodePort with externalTrafficPolicy Cluster on both nodes reaches the
/// pods on both nodes: traffic to a pod on the other node is translated to
/// the node's address, crosses to the other node, and its replies come back
/// through the first node to the client. TCP and UDP.
#[test]
fn node_ports_on_both_nodes_reach_pods_on_both_nodes() {
    let cluster = TwoNodes::start(&manifests(&[2])).expect("two nodes");
    for node_ip in NODE_IPS {
        let seen = hits(&cluster.client, SocketAddrV4::new(node_ip, 30123), 45);
        println!("{node_ip}:30123 (Cluster) -> {seen:?}");
        assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), ["kubia-1", "kubia-2", "kubia-3"], "{node_ip}: {seen:?}");
    }
    let node_addresses: BTreeSet<IpAddr> = NODE_IPS.iter().map(|&ip| IpAddr::V4(ip)).collect();
    for pod in 0..3 {
        assert!(peers(&cluster, pod).is_subset(&node_addresses), "kubia-{} saw {:?}, not only node addresses", pod + 1, peers(&cluster, pod));
    }
    let mut udp = BTreeSet::new();
    for _ in 0..30 {
        udp.insert(udp_from(&cluster.client, SocketAddrV4::new(NODE_IPS[0], 30123)).expect("UDP through node-1's node port"));
    }
    assert!(udp.contains("kubia-3"), "UDP crosses to node-2 too: {udp:?}");
}

/// externalTrafficPolicy Local: the node with the local pod serves it and
/// the pod sees the client's own address; the node without a local pod does
/// not forward (the connection times out). The health check node port
/// answers 200 on the node with the local endpoint, 503 on the other, and
/// follows the endpoints as they move.
#[test]
fn local_policy_keeps_the_client_address_and_stays_on_the_node() {
    let cluster = TwoNodes::start(&manifests(&[2])).expect("two nodes");
    let served = hits(&cluster.client, SocketAddrV4::new(NODE_IPS[1], 30124), 10);
    assert_eq!(served, BTreeMap::from([("kubia-3".to_owned(), 10)]), "node-2 serves its local pod");
    assert_eq!(peers(&cluster, 2), BTreeSet::from([IpAddr::V4(CLIENT_IP)]), "the backend logs the client's own address");
    assert_eq!(udp_from(&cluster.client, SocketAddrV4::new(NODE_IPS[1], 30124)).expect("UDP, Local"), "kubia-3");

    let refused = hits(&cluster.client, SocketAddrV4::new(NODE_IPS[0], 30124), 1);
    assert!(refused.keys().all(|k| k.starts_with("error")), "node-1 has no local pod and must not forward: {refused:?}");

    let health = |node: usize, expected: &str| {
        let addr = if node == 0 { "192.168.50.1:32000" } else { "192.168.50.2:32000" };
        http_get_until(&cluster.client, addr, "/", expected, Duration::from_secs(20))
    };
    let on_node2 = health(1, "HTTP/1.1 200");
    assert!(on_node2.starts_with("HTTP/1.1 200") && on_node2.contains("\"localEndpoints\":1"), "{on_node2}");
    let on_node1 = health(0, "HTTP/1.1 503");
    assert!(on_node1.starts_with("HTTP/1.1 503") && on_node1.contains("\"localEndpoints\":0"), "{on_node1}");

    // In-cluster traffic to the same service is not limited to local
    // endpoints: a pod on node-1 reaches kubia-3 through the cluster IP.
    let in_cluster = hits(&cluster.pod(0).ns, SocketAddrV4::new([10, 96, 0, 11].into(), 80), 3);
    assert_eq!(in_cluster, BTreeMap::from([("kubia-3".to_owned(), 3)]), "in-cluster clients use every endpoint");

    // The endpoint moves to node-1: the answers follow.
    cluster.write_manifests(&manifests(&[0])).expect("manifests");
    assert!(health(0, "HTTP/1.1 200").starts_with("HTTP/1.1 200"));
    assert!(health(1, "HTTP/1.1 503").starts_with("HTTP/1.1 503"));
}

/// IPv6-only services on dual-stack nodes: kubia6 (NodePort 30123,
/// Cluster policy, every pod) and kubia6-local (NodePort 30124, Local
/// policy, only kubia-3 on node-2).
fn ipv6_manifests() -> String {
    let spec = |octet: u8, policy: &str, node_port: &str| {
        format!(
            "  type: NodePort\n  clusterIP: fd00:96::{octet}\n  clusterIPs: [\"fd00:96::{octet}\"]\n  ipFamilies: [IPv6]\n  externalTrafficPolicy: {policy}\n{}",
            PORTS.replace("NODEPORT", node_port)
        )
    };
    service_of_family("kubia6", &spec(10, "Cluster", "30123"), &[0, 1, 2], "IPv6")
        + &service_of_family("kubia6-local", &spec(11, "Local", "30124"), &[2], "IPv6")
}

/// Over IPv6, externalTrafficPolicy Cluster: both nodes' IPv6 node ports
/// reach the pods on both nodes, behind source NAT to the node's IPv6
/// address (replies come back through it); Local: only the node with the
/// local pod serves, and the pod sees the client's own IPv6 address. TCP
/// and UDP.
#[test]
fn ipv6_node_ports_follow_the_external_traffic_policy_across_nodes() {
    let cluster = TwoNodes::start_dual_stack(&ipv6_manifests()).expect("two dual-stack nodes");
    for node_ip in NODE_IPS6 {
        let seen = hits(&cluster.client, SocketAddr::new(node_ip.into(), 30123), 45);
        println!("[{node_ip}]:30123 (Cluster) -> {seen:?}");
        assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), ["kubia-1", "kubia-2", "kubia-3"], "{node_ip}: {seen:?}");
    }
    let node_addresses: BTreeSet<IpAddr> = NODE_IPS6.iter().map(|&ip| IpAddr::V6(ip)).collect();
    for pod in 0..3 {
        assert!(peers(&cluster, pod).is_subset(&node_addresses), "kubia-{} saw {:?}, not only node addresses", pod + 1, peers(&cluster, pod));
    }
    let mut udp = BTreeSet::new();
    for _ in 0..30 {
        udp.insert(udp_from(&cluster.client, SocketAddr::new(NODE_IPS6[0].into(), 30123)).expect("UDP through node-1's IPv6 node port"));
    }
    assert!(udp.contains("kubia-3"), "UDP crosses to node-2 too: {udp:?}");

    let local = SocketAddr::new(NODE_IPS6[1].into(), 30124);
    assert_eq!(hits(&cluster.client, local, 10), BTreeMap::from([("kubia-3".to_owned(), 10)]), "node-2 serves its local pod");
    assert!(peers(&cluster, 2).contains(&IpAddr::V6(CLIENT_IP6)), "the backend logs the client's own IPv6 address: {:?}", peers(&cluster, 2));
    assert_eq!(udp_from(&cluster.client, local).expect("UDP, Local"), "kubia-3");
    let refused = hits(&cluster.client, SocketAddr::new(NODE_IPS6[0].into(), 30124), 1);
    assert!(refused.keys().all(|k| k.starts_with("error")), "node-1 has no local pod and must not forward: {refused:?}");
}

/// A pod reaching its own service and landing on itself (hairpin), and a
/// pod on node-1 reaching the cluster IP of pods on both nodes.
#[test]
fn pods_reach_services_across_nodes_and_themselves() {
    let cluster = TwoNodes::start(&manifests(&[2])).expect("two nodes");
    let kubia1 = &cluster.pod(0).ns;
    let itself = hits(kubia1, SocketAddrV4::new([10, 96, 0, 12].into(), 80), 5);
    assert_eq!(itself, BTreeMap::from([("kubia-1".to_owned(), 5)]), "hairpin");
    let everywhere = hits(kubia1, SocketAddrV4::new([10, 96, 0, 10].into(), 80), 45);
    assert_eq!(everywhere.keys().cloned().collect::<Vec<_>>(), ["kubia-1", "kubia-2", "kubia-3"], "{everywhere:?}");
    assert!(peers(&cluster, 2).contains(&IpAddr::V4(pod_ip(0))), "in-cluster traffic keeps the pod's address across nodes");
}

/// sessionAffinity ClientIP from a pod: 15 consecutive connections land on
/// one pod; after the one-second timeout they are placed afresh.
#[test]
fn session_affinity_across_nodes() {
    let cluster = TwoNodes::start(&manifests(&[2])).expect("two nodes");
    let kubia2 = &cluster.pod(1).ns;
    let sticky = SocketAddrV4::new([10, 96, 0, 13].into(), 80);
    let first = hits(kubia2, sticky, 15);
    assert_eq!(first.len(), 1, "15 connections, one pod: {first:?}");
    let mut after = BTreeSet::new();
    for _ in 0..10 {
        // Waiting out the timeout is the point: a connection would renew it.
        std::thread::sleep(Duration::from_millis(1300));
        after.extend(hits(kubia2, sticky, 1).into_keys());
        if after.len() > 1 {
            break;
        }
    }
    assert!(after.len() > 1, "after the timeout connections spread again: {after:?}");
}

/// A process in node-1's own network namespace (as a hostNetwork pod or
/// the kubelet) reaches the cluster IP, pods on both nodes included, and
/// the node port on its own address, over TCP and UDP: the socket programs
/// translate at connect time, and UDP replies show the service address.
#[test]
fn node_local_processes_reach_cluster_ips_and_own_node_ports() {
    let cluster = TwoNodes::start(&manifests(&[2])).expect("two nodes");
    let node = &cluster.nodes[0];
    let tcp = |address: &str, port: u16| {
        // The server keeps connections open: read up to the answer line.
        let script = format!(
            "exec 3<>/dev/tcp/{address}/{port} && printf 'GET / HTTP/1.1\\r\\nHost: kubia\\r\\n\\r\\n' >&3 && \
             while read -r -t 5 line <&3; do case \"$line\" in \"You've hit\"*) echo \"$line\"; exit 0;; esac; done; exit 1"
        );
        node.cgroup.run_in(&node.ns, &script).expect("a node-local TCP client")
    };
    let mut reached = BTreeSet::new();
    for _ in 0..30 {
        let response = tcp("10.96.0.10", 80);
        let pod = response.lines().last().unwrap_or_default().trim_start_matches("You've hit ").to_owned();
        assert!(pod.starts_with("kubia-"), "{response}");
        reached.insert(pod);
    }
    assert_eq!(reached.into_iter().collect::<Vec<_>>(), ["kubia-1", "kubia-2", "kubia-3"], "the cluster IP, from the node");
    let own_node_port = tcp("192.168.50.1", 30123);
    assert!(own_node_port.contains("You've hit kubia-"), "the node port on the node's own address: {own_node_port}");
    let udp = node
        .cgroup
        // One read of the datagram (bash's read would take it byte by byte).
        .run_in(&node.ns, "exec 3<>/dev/udp/10.96.0.10/53 && printf query >&3 && timeout 3 dd bs=100 count=1 <&3 2>/dev/null")
        .expect("a node-local UDP client");
    assert!(udp.starts_with("You've hit kubia-"), "UDP through the cluster IP from the node: {udp:?}");
}

/// internalTrafficPolicy Local: pods use only the endpoints on their own
/// node, on either node.
#[test]
fn internal_traffic_policy_local_keeps_pods_on_their_node() {
    let cluster = TwoNodes::start(&manifests(&[2])).expect("two nodes");
    let vip = SocketAddrV4::new([10, 96, 0, 14].into(), 80);
    let from_node1 = hits(&cluster.pod(1).ns, vip, 30);
    assert_eq!(from_node1.keys().cloned().collect::<Vec<_>>(), ["kubia-1", "kubia-2"], "node-1's pods only: {from_node1:?}");
    let from_node2 = hits(&cluster.pod(2).ns, vip, 10);
    assert_eq!(from_node2, BTreeMap::from([("kubia-3".to_owned(), 10)]), "node-2's pod only");
}

/// A Local policy (internal or external) without an endpoint on the node:
/// dropped while endpoints exist on another node, rejected at once when
/// there are none anywhere, as kube-proxy does.
#[test]
fn local_policies_drop_with_endpoints_elsewhere_and_reject_with_none() {
    let internal_local = |pods: &[usize]| {
        service("internal-local", "  clusterIP: 10.96.0.15\n  internalTrafficPolicy: Local\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n", pods)
    };
    // kubia-local and internal-local have their one endpoint on node-2.
    let cluster = TwoNodes::start(&(manifests(&[2]) + &internal_local(&[2]))).expect("two nodes");
    let external = SocketAddrV4::new(NODE_IPS[0], 30124);
    let internal = SocketAddrV4::new([10, 96, 0, 15].into(), 80);
    let outcome = |ns: &Netns, addr| hits(ns, addr, 1).into_keys().next().expect("one attempt");
    assert_eq!(outcome(&cluster.client, external), "error: TimedOut", "external Local, endpoint on node-2 only: node-1 drops");
    assert_eq!(outcome(&cluster.pod(0).ns, internal), "error: TimedOut", "internal Local, endpoint on node-2 only: a pod on node-1 is dropped");

    cluster.write_manifests(&(manifests(&[]) + &internal_local(&[]))).expect("no endpoints anywhere");
    let deadline = std::time::Instant::now() + lb_tests::netns::scaled(Duration::from_secs(20));
    let (mut external_now, mut internal_now) = (String::new(), String::new());
    while std::time::Instant::now() < deadline {
        external_now = outcome(&cluster.client, external);
        internal_now = outcome(&cluster.pod(0).ns, internal);
        if external_now == "error: ConnectionRefused" && internal_now == "error: ConnectionRefused" {
            return;
        }
    }
    panic!("with no endpoint anywhere both are rejected at once; external: {external_now}, internal: {internal_now}");
}

/// The two nodes as Node objects: node-1 in zone-a, node-2 in zone-b.
fn zoned_nodes() -> String {
    NODE_NAMES
        .iter()
        .zip(ZONES)
        .map(|(node, zone)| format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {node}, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n---\n"))
        .collect()
}

const ZONES: [&str; 2] = ["zone-a", "zone-b"];

/// A ClusterIP service 10.96.0.`octet` with `extra` spec lines over every
/// pod, each endpoint with its node and zone; kubia-3 ready or not; with
/// `for_zones`, each endpoint's zone hint.
fn topology_service(name: &str, octet: u8, extra: &str, kubia3_ready: bool, for_zones: Option<[&str; 3]>) -> String {
    let mut endpoints = String::new();
    for (i, &node) in POD_NODES.iter().enumerate() {
        let ready = i != 2 || kubia3_ready;
        let hints = for_zones.map(|z| format!(", hints: {{forZones: [{{name: {}}}]}}", z[i])).unwrap_or_default();
        endpoints.push_str(&format!(
            "- {{addresses: [\"{}\"], conditions: {{ready: {ready}}}, nodeName: {}, zone: {}{hints}}}\n",
            pod_ip(i),
            NODE_NAMES[node],
            ZONES[node]
        ));
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: 10.96.0.{octet}\n{extra}  \
         ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n\
         endpoints:\n{endpoints}---\n"
    )
}

/// Topology-aware routing across two nodes in two zones (kubia-1 and
/// kubia-2 on node-1 in zone-a, kubia-3 on node-2 in zone-b):
/// trafficDistribution PreferSameZone and PreferSameNode keep each pod's
/// connections on its own node's endpoints; EndpointSlice hints are
/// followed as given; when node-2's only endpoint stops being ready, its
/// pods fall back to every endpoint, as kube-proxy does.
#[test]
fn topology_keeps_traffic_close_and_falls_back_when_the_close_endpoints_go() {
    let services = |kubia3_ready: bool| {
        zoned_nodes()
            + &topology_service("kubia-zone", 16, "  trafficDistribution: PreferSameZone\n", kubia3_ready, None)
            + &topology_service("kubia-node", 17, "  trafficDistribution: PreferSameNode\n", kubia3_ready, None)
            + &topology_service("kubia-hinted", 18, "", true, Some(["zone-b", "zone-a", "zone-a"]))
    };
    let cluster = TwoNodes::start(&services(true)).expect("two nodes");
    let vip = |octet: u8| SocketAddrV4::new([10, 96, 0, octet].into(), 80);
    let names = |seen: BTreeMap<String, usize>| seen.into_keys().collect::<Vec<_>>();
    for (octet, rule) in [(16, "PreferSameZone"), (17, "PreferSameNode")] {
        assert_eq!(names(hits(&cluster.pod(0).ns, vip(octet), 30)), ["kubia-1", "kubia-2"], "{rule}: a pod on node-1 stays on node-1");
        assert_eq!(names(hits(&cluster.pod(2).ns, vip(octet), 10)), ["kubia-3"], "{rule}: a pod on node-2 stays on node-2");
    }
    assert_eq!(names(hits(&cluster.pod(2).ns, vip(18), 10)), ["kubia-1"], "hints: zone-b is served by kubia-1 alone");
    assert_eq!(names(hits(&cluster.pod(0).ns, vip(18), 30)), ["kubia-2", "kubia-3"], "hints: zone-a by kubia-2 and kubia-3");

    cluster.write_manifests(&services(false)).expect("kubia-3 not ready");
    let deadline = std::time::Instant::now() + lb_tests::netns::scaled(Duration::from_secs(20));
    while hits(&cluster.pod(2).ns, vip(16), 1).contains_key("kubia-3") && std::time::Instant::now() < deadline {}
    for (octet, rule) in [(16, "PreferSameZone"), (17, "PreferSameNode")] {
        assert_eq!(names(hits(&cluster.pod(2).ns, vip(octet), 30)), ["kubia-1", "kubia-2"], "{rule}: node-2 falls back to every endpoint");
        assert_eq!(names(hits(&cluster.pod(0).ns, vip(octet), 20)), ["kubia-1", "kubia-2"], "{rule}: node-1 keeps its own");
    }
}
