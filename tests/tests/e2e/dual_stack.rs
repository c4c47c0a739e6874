//! IPv6 and dual-stack services end to end: a dual-stack cluster IP over both families, an IPv6 node port with source NAT.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr, SocketAddrV6, UdpSocket},
    time::Duration,
};

use lb_tests::{
    cluster::{CLIENT_IP6, Cluster, KUBIA_VIP, KUBIA_VIP6, MANIFEST_FILE, NODE_IP6, dual_stack_manifests, pod_ip6, pod_name},
    netns::{connect_and_ask, http_get, udp_ask},
};

const CONNECTIONS: usize = 60;

/// Who answered `count` new connections to `addr` from the client.
fn spread_to(cluster: &Cluster, addr: SocketAddr, count: usize) -> BTreeMap<String, usize> {
    cluster
        .client
        .enter(move || {
            let mut hits = BTreeMap::<String, usize>::new();
            for _ in 0..count {
                let answer = connect_and_ask(addr).unwrap_or_else(|e| panic!("a request to {addr}: {e}"));
                *hits.entry(answer.trim_start_matches("You've hit ").to_owned()).or_default() += 1;
            }
            hits
        })
        .expect("client")
}

/// The addresses the pods saw their clients come from.
fn pod_peers(cluster: &Cluster) -> BTreeSet<IpAddr> {
    cluster.pods.iter().flat_map(|pod| pod.server.peers.lock().expect("peers").iter().map(SocketAddr::ip).collect::<Vec<_>>()).collect()
}

/// One dual-stack service (IPv6 listed first), three pods with an address
/// of each family: one client reaches it over both families, each spread
/// over the three pods; IPv6 clients keep their address (no source NAT for
/// a cluster IP), and UDP answers come back from the IPv6 cluster IP.
#[test]
fn a_dual_stack_service_is_reached_over_both_families_spread_over_three_pods() {
    let cluster = Cluster::start_dual_stack(3, &[(MANIFEST_FILE, &dual_stack_manifests(&[0, 1, 2]))]).expect("cluster");
    let all_pods: Vec<String> = (0..3).map(pod_name).collect();
    for vip in [IpAddr::from(KUBIA_VIP6), IpAddr::from(KUBIA_VIP)] {
        let hits = spread_to(&cluster, SocketAddr::new(vip, 80), CONNECTIONS);
        println!("{CONNECTIONS} connections through {vip} port 80: {hits:?}");
        assert_eq!(hits.keys().cloned().collect::<Vec<_>>(), all_pods, "through {vip}, every pod answers");
    }
    assert!(pod_peers(&cluster).contains(&IpAddr::from(CLIENT_IP6)), "the pods saw the IPv6 client's own address: {:?}", pod_peers(&cluster));

    let answers = cluster
        .client
        .enter(|| {
            (0..20)
                .map(|_| {
                    let socket = UdpSocket::bind("[::]:0").expect("bind");
                    socket.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
                    socket.send_to(b"query", SocketAddrV6::new(KUBIA_VIP6, 53, 0, 0)).expect("send");
                    let mut buf = [0u8; 256];
                    let (n, from) = socket.recv_from(&mut buf).expect("an answer over IPv6");
                    (from, String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
                })
                .collect::<Vec<_>>()
        })
        .expect("client");
    for (from, answer) in &answers {
        assert_eq!(*from, SocketAddr::new(KUBIA_VIP6.into(), 53), "the answer comes from the cluster IP, not the pod");
        assert!(answer.starts_with("You've hit kubia-"), "{answer}");
    }
    let udp_pods: BTreeSet<&String> = answers.iter().map(|(_, answer)| answer).collect();
    assert!(udp_pods.len() > 1, "UDP over IPv6 is spread too: {udp_pods:?}");

    // Each family's service port counts its own connections.
    let metrics = http_get(&cluster.node, "127.0.0.1:10249", "/metrics").expect("a scrape");
    for family in ["IPv4", "IPv6"] {
        let series = format!(
            r#"lb_service_new_connections_total{{namespace="default",service="kubia",port="http",protocol="TCP",traffic="internal",ip_family="{family}"}} "#
        );
        let count: Option<u64> = metrics.lines().find_map(|l| l.strip_prefix(series.as_str())?.trim().parse().ok());
        assert_eq!(count, Some(CONNECTIONS as u64), "{series}");
    }
    let flows = cluster.lbctl(&["conntrack", "--filter", CLIENT_IP6.to_string().as_str()]).expect("lbctl");
    assert!(flows.contains("default/kubia:dns/ipv6"), "lbctl shows the IPv6 flows:\n{flows}");

    // lbctl explain over IPv6: a new connection to the IPv6 cluster IP goes
    // to one of the pods' IPv6 addresses; a port the address does not serve
    // is rejected (unanswerable for now: dropped); another address passes.
    let explain = |destination: &str, protocol: &str| -> serde_json::Value {
        let out = cluster.lbctl(&["-o", "json", "explain", "[fd00:201::2]:45000", destination, protocol]).expect("lbctl explain");
        serde_json::from_str(&out).expect("JSON")
    };
    let new = explain("[fd00:96::10]:80", "tcp");
    assert_eq!((new["verdict"].as_str(), new["service"].as_str()), (Some("forward_new"), Some("default/kubia:http/ipv6")), "{new}");
    let pods: Vec<String> = (0..3).map(|i| format!("[{}]:8080", pod_ip6(i))).collect();
    assert!(new["backend"].as_str().is_some_and(|b| pods.iter().any(|p| p == b)), "the backend is a pod's IPv6 address: {new}");
    assert_eq!(explain("[fd00:201::1]:80", "tcp")["verdict"], "pass_not_service", "the node's own address is no service");

    let services = cluster.lbctl(&["services"]).expect("lbctl");
    assert!(services.contains("default/kubia:http/ipv6") && services.contains(&KUBIA_VIP6.to_string()), "lbctl lists the IPv6 side:\n{services}");
}

/// An IPv6-only NodePort service with the Cluster policy: the node's IPv6
/// address answers on the node port over TCP and UDP, every pod serves, and
/// the pods see the node's IPv6 address (source NAT), so that replies come
/// back through the node.
#[test]
fn an_ipv6_node_port_is_served_by_every_pod_behind_source_nat() {
    let cluster = Cluster::start_dual_stack(3, &[(MANIFEST_FILE, &dual_stack_manifests(&[0, 1, 2]))]).expect("cluster");
    let node_port = SocketAddr::new(NODE_IP6.into(), 30080);
    let hits = spread_to(&cluster, node_port, CONNECTIONS);
    println!("{CONNECTIONS} connections through {node_port}: {hits:?}");
    assert_eq!(hits.len(), 3, "every pod serves the IPv6 node port: {hits:?}");
    assert_eq!(pod_peers(&cluster), [IpAddr::from(NODE_IP6)].into(), "the pods see the node's IPv6 address, not the client's");
    let udp = cluster.client.enter(|| udp_ask(SocketAddrV6::new(NODE_IP6, 30053, 0, 0))).expect("client");
    assert!(udp.expect("a UDP answer through the IPv6 node port").starts_with("You've hit kubia-"));
}
