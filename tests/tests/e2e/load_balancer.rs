//! LoadBalancer services: source ranges, ipMode, the Local policy from inside the cluster, the health check node port.
use std::{collections::BTreeSet, io::ErrorKind, net::SocketAddrV4, time::Duration};

use lb_tests::{
    cluster::{ClientHook, Cluster, MANIFEST_FILE, pod_name},
    netns::{connect_and_ask, http_get_until},
};

/// A LoadBalancer service (externalTrafficPolicy Local) whose ingress IP
/// 10.202.0.100 the client reaches through the node, with only kubia-1 on
/// this node (kubia-2 elsewhere), or none.
fn load_balancer_manifests(local_pod: bool) -> String {
    use lb_tests::cluster::{NODE_NAME, pod_ip};
    let local = if local_pod {
        format!("- {{addresses: [\"{}\"], conditions: {{ready: true}}, nodeName: {NODE_NAME}}}\n", pod_ip(0))
    } else {
        String::new()
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: kubia-lb, namespace: default}}\n\
         spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.50\n  externalIPs: [10.202.0.200]\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  \
         ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: 30200}}\n\
         status: {{loadBalancer: {{ingress: [{{ip: 10.202.0.100}}]}}}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: kubia-lb-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: kubia-lb}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n\
         endpoints:\n{local}- {{addresses: [\"{}\"], conditions: {{ready: true}}, nodeName: node-2}}\n",
        pod_ip(1)
    )
}

/// A LoadBalancer service (Cluster policy, the endpoint kubia-2) on load
/// balancer IP 10.202.0.101 and node port 30300, allowing `ranges`.
fn source_range_manifests(ranges: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: kubia-fw, namespace: default}}\n\
         spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.60\n  loadBalancerSourceRanges: {ranges}\n  \
         ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: 30300}}\n\
         status: {{loadBalancer: {{ingress: [{{ip: 10.202.0.101}}]}}}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: kubia-fw-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: kubia-fw}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n\
         endpoints:\n- {{addresses: [\"{}\"], conditions: {{ready: true}}}}\n",
        lb_tests::cluster::pod_ip(1)
    )
}

/// loadBalancerSourceRanges: the client in the range is served through the
/// load balancer IP while a pod outside it is dropped; with the ranges
/// changed the other way round, the client is dropped and the pod served;
/// the node port answers the client throughout.
#[test]
fn load_balancer_source_ranges_admit_listed_clients_only() {
    use lb_tests::cluster::{CLIENT_IP, NODE_IP, TempDir, Topology};
    let net = Topology::new(2, ClientHook::Tc).expect("namespaces");
    let manifests = TempDir::new("manifests").expect("dir");
    std::fs::write(manifests.0.join(MANIFEST_FILE), source_range_manifests(&format!("[\"{CLIENT_IP}/32\"]"))).expect("manifest");
    let source = ["--manifests", &manifests.0.to_string_lossy()].map(str::to_owned).to_vec();
    let cluster = Cluster::run_agent(net, source, Some(manifests)).expect("agent");
    let lb_ip = SocketAddrV4::new([10, 202, 0, 101].into(), 80);
    let node_port = SocketAddrV4::new(NODE_IP, 30300);
    let from = |ns: &lb_tests::netns::Netns, to: SocketAddrV4| ns.enter(move || connect_and_ask(to).map_err(|e| e.kind())).expect("client");
    let served = Ok(format!("You've hit {}", pod_name(1)));

    assert_eq!(from(&cluster.client, lb_ip), served, "the client is in the range");
    assert_eq!(from(&cluster.pods[0].ns, lb_ip), Err(ErrorKind::TimedOut), "kubia-1's address is not: dropped");
    assert_eq!(from(&cluster.client, node_port), served, "the node port is not restricted");

    let dropped_before = cluster.maps().expect("maps").verdict_count(lb_common::Reason::DropSourceRange).expect("counter");
    assert!(dropped_before >= 1, "the pod's SYN counted as drop_source_range");
    cluster.write_manifest(MANIFEST_FILE, &source_range_manifests("[\"10.99.0.0/16\", \"10.244.1.0/24\"]")).expect("manifest");
    cluster.agent.wait_for(&["synced"], lb_tests::cluster::agent_timeout()).expect("the change applied");
    assert_eq!(from(&cluster.pods[0].ns, lb_ip), served, "kubia-1 is in the new ranges");
    assert_eq!(from(&cluster.client, lb_ip), Err(ErrorKind::TimedOut), "the client no longer is: dropped");
    assert_eq!(from(&cluster.client, node_port), served, "the node port is still not restricted");
    let dropped_after = cluster.maps().expect("maps").verdict_count(lb_common::Reason::DropSourceRange).expect("counter");
    assert!(dropped_after > dropped_before, "the client's SYN counted too");
}

/// Load balancer ingress IPs: one with `ipMode: VIP` is served on the
/// node, one with `ipMode: Proxy` is left to the load balancer (nothing is
/// programmed for it, its packets go on untouched).
#[test]
fn load_balancer_ip_mode_proxy_is_left_to_the_load_balancer() {
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: kubia-lb, namespace: default}}\n\
         spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.80\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: 30400}}\n\
         status: {{loadBalancer: {{ingress: [{{ip: 10.202.0.110, ipMode: VIP}}, {{ip: 10.202.0.111, ipMode: Proxy}}]}}}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: kubia-lb-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: kubia-lb}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n\
         endpoints:\n- {{addresses: [\"{}\"], conditions: {{ready: true}}}}\n",
        lb_tests::cluster::pod_ip(0)
    );
    let cluster = Cluster::start_with(1, &[("lb.yaml", &service)], ClientHook::Tc).expect("cluster");
    let maps = cluster.maps().expect("maps");
    let frontend = |ip: [u8; 4]| lb_common::FrontendKey::new(ip.into(), 80, lb_common::IPPROTO_TCP);
    assert!(maps.backends(frontend([10, 202, 0, 110])).is_some(), "ipMode VIP: programmed");
    assert!(maps.backends(frontend([10, 202, 0, 111])).is_none(), "ipMode Proxy: not programmed");
    let vip = cluster.client.enter(|| connect_and_ask(SocketAddrV4::new([10, 202, 0, 110].into(), 80))).expect("client");
    assert_eq!(vip.expect("through the VIP-mode address"), format!("You've hit {}", pod_name(0)));
    let proxied = cluster.client.enter(|| connect_and_ask(SocketAddrV4::new([10, 202, 0, 111].into(), 80))).expect("client");
    assert!(proxied.is_err(), "the Proxy-mode address is not the node's to serve: {proxied:?}");
}

/// A pod on this node and the node itself reaching the load balancer IP of
/// an externalTrafficPolicy Local service that has no endpoint here: they
/// are inside the cluster (the pod by `--cluster-cidr`), so every endpoint
/// serves them, as through the cluster IP, and the pod is seen with its own
/// address (kube-proxy's "pod traffic for external destinations"). The
/// Local policy's drop is for clients from outside (a packet test).
#[test]
fn pods_and_the_node_reach_a_local_policy_load_balancer_ip_through_every_endpoint() {
    use lb_tests::cluster::{TempDir, Topology, pod_ip};
    let net = Topology::new(2, ClientHook::Tc).expect("namespaces");
    let manifests = TempDir::new("manifests").expect("dir");
    std::fs::write(manifests.0.join(MANIFEST_FILE), load_balancer_manifests(false)).expect("manifest");
    let source = ["--manifests", &manifests.0.to_string_lossy(), "--cluster-cidr", "10.244.0.0/16"].map(str::to_owned).to_vec();
    let cluster = Cluster::run_agent(net, source, Some(manifests)).expect("agent");

    // kubia-1 runs on this node but is not an endpoint of the service.
    let from_pod = cluster.pods[0]
        .ns
        .enter(|| (0..5).map(|_| connect_and_ask(SocketAddrV4::new([10, 202, 0, 100].into(), 80))).collect::<Vec<_>>())
        .expect("pod");
    for answer in from_pod {
        assert_eq!(answer.expect("from a pod, through the load balancer IP"), format!("You've hit {}", pod_name(1)));
    }
    let peers = cluster.pods[1].server.peers.lock().expect("peers").iter().map(|p| p.ip()).collect::<BTreeSet<_>>();
    assert_eq!(peers, BTreeSet::from([std::net::IpAddr::V4(pod_ip(0))]), "the endpoint sees the pod's own address");

    let script = "exec 3<>/dev/tcp/10.202.0.100/80 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && timeout 3 cat <&3; true";
    let from_node = cluster.cgroup.run_in(&cluster.node, script).expect("a node-local client");
    assert!(from_node.contains(&format!("You've hit {}", pod_name(1))), "from the node: {from_node}");
}

/// The load balancer IP and the external IP serve like the node port (Local: the local pod,
/// which sees the client), and the health check node port answers 200 with
/// the local endpoint count, then 503 once the local pod is gone, then 200
/// again when it is back.
#[test]
fn load_balancer_ip_and_health_check_node_port() {
    use lb_tests::cluster::CLIENT_IP;
    let cluster = Cluster::start(2, &load_balancer_manifests(true)).expect("cluster");
    for external in [[10, 202, 0, 100], [10, 202, 0, 200]] {
        let answers = cluster
            .client
            .enter(move || (0..10).map(|_| connect_and_ask(SocketAddrV4::new(external.into(), 80))).collect::<Vec<_>>())
            .expect("client");
        for answer in answers {
            assert_eq!(answer.expect("through the load balancer IP, then the external IP"), format!("You've hit {}", pod_name(0)));
        }
    }
    assert!(cluster.pods[0].server.peers.lock().expect("peers").iter().all(|p| p.ip() == CLIENT_IP), "the client is seen");

    let health_until = |expected: &str| http_get_until(&cluster.client, "10.201.0.1:32000", "/healthz", expected, Duration::from_secs(20));
    let healthy = health_until("HTTP/1.1 200");
    assert!(healthy.starts_with("HTTP/1.1 200") && healthy.contains("\"localEndpoints\":1"), "{healthy}");
    assert!(healthy.to_lowercase().contains("x-load-balancing-endpoint-weight: 1"), "{healthy}");

    cluster.write_manifest(MANIFEST_FILE, &load_balancer_manifests(false)).expect("manifest");
    let unhealthy = health_until("HTTP/1.1 503");
    assert!(unhealthy.starts_with("HTTP/1.1 503") && unhealthy.contains("\"localEndpoints\":0"), "{unhealthy}");

    cluster.write_manifest(MANIFEST_FILE, &load_balancer_manifests(true)).expect("manifest");
    let healthy_again = health_until("HTTP/1.1 200");
    assert!(healthy_again.starts_with("HTTP/1.1 200"), "{healthy_again}");
}
