//! NodePort services: the node's own addresses, and the external traffic policy (Cluster with source NAT, Local).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
};

use lb_tests::{
    cluster::{ClientHook, Cluster, MANIFEST_FILE, pod_name},
    netns::{connect_and_ask, udp_ask},
};

/// Two NodePort services over the kubia pods: `cluster` (externalTrafficPolicy
/// Cluster, node port 30123) and `local` (Local, node port 30124), where only
/// kubia-1 is on this node.
fn node_port_manifests() -> String {
    use lb_tests::cluster::{NODE_NAME, pod_ip};
    let service = |name: &str, node_port: u16, policy: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  type: NodePort\n  clusterIP: 10.96.0.{node_port_octet}\n  externalTrafficPolicy: {policy}\n  selector: {{app: kubia}}\n  \
             ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: {node_port}, protocol: TCP}}\n  \
             - {{name: dns, port: 53, targetPort: 5353, nodePort: {node_port}, protocol: UDP}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  \
             labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\n\
             ports:\n- {{name: http, port: 8080, protocol: TCP}}\n- {{name: dns, port: 5353, protocol: UDP}}\n\
             endpoints:\n- {{addresses: [\"{}\"], conditions: {{ready: true}}, nodeName: {NODE_NAME}}}\n\
             - {{addresses: [\"{}\"], conditions: {{ready: true}}, nodeName: node-2}}\n---\n",
            pod_ip(0),
            pod_ip(1),
            node_port_octet = node_port - 30000,
        )
    };
    service("cluster", 30123, "Cluster") + &service("local", 30124, "Local")
}

/// From manifests without --node-ip, node ports answer on the node's own
/// addresses (as kube-proxy's default), and Cluster-policy traffic is
/// translated to the first of them.
#[test]
fn without_node_ip_node_ports_answer_on_the_nodes_own_addresses() {
    use lb_tests::cluster::{NODE_IP, TempDir, Topology};
    let mut net = Topology::new(2, ClientHook::Tc).expect("namespaces");
    net.node_ip_flag = false;
    let manifests = TempDir::new("manifests").expect("dir");
    std::fs::write(manifests.0.join(MANIFEST_FILE), node_port_manifests()).expect("manifest");
    let cluster = Cluster::run_agent(net, vec!["--manifests".into(), manifests.0.to_string_lossy().into_owned()], Some(manifests)).expect("agent");
    assert!(cluster.agent.log().contains("node ports answer on this node's addresses"), "{}", cluster.agent.log());
    let answer = cluster.client.enter(|| connect_and_ask(SocketAddrV4::new(NODE_IP, 30123))).expect("client");
    assert!(answer.expect("the node port on the node's address").starts_with("You've hit kubia-"));
}

/// NodePort from outside the node: with Cluster every endpoint serves and
/// the backend sees the node's address (source NAT, replies back through the
/// node) and a port of `--snat-port-range`; with Local only the local pod
/// serves and sees the client's own address. TCP and UDP.
#[test]
fn node_ports_follow_the_external_traffic_policy() {
    use lb_tests::cluster::{CLIENT_IP, NODE_IP, TempDir, Topology};
    let net = Topology::new(2, ClientHook::Tc).expect("namespaces");
    let manifests = TempDir::new("manifests").expect("dir");
    std::fs::write(manifests.0.join(MANIFEST_FILE), node_port_manifests()).expect("manifest");
    let source = ["--manifests", &manifests.0.to_string_lossy(), "--snat-port-range", "62000-62099"].map(str::to_owned).to_vec();
    let cluster = Cluster::run_agent(net, source, Some(manifests)).expect("agent");
    let hits = |port: u16, count: usize| -> BTreeMap<String, usize> {
        cluster
            .client
            .enter(move || {
                let mut hits = BTreeMap::<String, usize>::new();
                for _ in 0..count {
                    let answer = connect_and_ask(SocketAddrV4::new(NODE_IP, port)).expect("request to the node port");
                    *hits.entry(answer).or_default() += 1;
                }
                hits
            })
            .expect("client")
    };
    let peers_of = |pod: usize| cluster.pods[pod].server.peers.lock().expect("peers").iter().map(|p| p.ip()).collect::<BTreeSet<_>>();

    let cluster_hits = hits(30123, 40);
    println!("node port 30123 (Cluster): {cluster_hits:?}");
    assert_eq!(cluster_hits.len(), 2, "Cluster policy: both pods serve: {cluster_hits:?}");
    let seen: BTreeSet<_> = peers_of(0).union(&peers_of(1)).copied().collect();
    assert_eq!(seen, BTreeSet::from([std::net::IpAddr::V4(NODE_IP)]), "Cluster policy: backends see the node's address");
    let ports: BTreeSet<u16> = cluster.pods.iter().flat_map(|p| p.server.peers.lock().expect("peers").iter().map(|a| a.port()).collect::<Vec<_>>()).collect();
    assert!(ports.iter().all(|p| (62000..=62099).contains(p)), "Cluster policy: source ports from --snat-port-range: {ports:?}");

    for pod in &cluster.pods {
        pod.server.peers.lock().expect("peers").clear();
    }
    let local_hits = hits(30124, 20);
    println!("node port 30124 (Local): {local_hits:?}");
    assert_eq!(local_hits, BTreeMap::from([(format!("You've hit {}", pod_name(0)), 20)]), "Local policy: only the local pod");
    assert_eq!(peers_of(0), BTreeSet::from([std::net::IpAddr::V4(CLIENT_IP)]), "Local policy: the backend sees the client");

    let udp = cluster
        .client
        .enter(|| [30123, 30124].map(|port| udp_ask(SocketAddrV4::new(NODE_IP, port))).into_iter().collect::<std::io::Result<Vec<_>>>())
        .expect("client")
        .expect("UDP through both node ports");
    assert!(udp[0].starts_with("You've hit kubia-"), "{udp:?}");
    assert_eq!(udp[1], format!("You've hit {}", pod_name(0)), "UDP, Local policy: the local pod");
}
