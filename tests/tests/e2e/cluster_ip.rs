//! Traffic through a cluster IP: the backends, XDP, one port over TCP and UDP, masquerading, rp_filter, ping, new interfaces.
use std::{
    collections::BTreeSet,
    net::{SocketAddrV4, UdpSocket},
    time::Duration,
};

use lb_tests::{
    cluster::{ClientHook, Cluster, KUBIA_VIP, MANIFEST_FILE, kubia_manifests, pod_name, ready},
    netns::{connect_and_ask, ping, udp_ask},
};

use crate::{kubia, kubia_with_flags, spread};

const CONNECTIONS: usize = 300;

#[test]
fn new_tcp_connections_reach_all_three_backends() {
    let cluster = Cluster::start(3, &kubia_manifests(&ready(&[0, 1, 2]))).expect("cluster");
    let hits = spread(&cluster, CONNECTIONS);
    println!("{CONNECTIONS} connections through {KUBIA_VIP}:80: {hits:?}");
    assert_eq!(hits.keys().cloned().collect::<Vec<_>>(), [pod_name(0), pod_name(1), pod_name(2)]);
    for (pod, count) in &hits {
        assert!(*count * 5 >= CONNECTIONS, "{pod} got {count} of {CONNECTIONS}, under 20%");
    }
}

#[test]
fn udp_request_and_response_through_the_vip() {
    let cluster = Cluster::start(3, &kubia_manifests(&ready(&[0, 1, 2]))).expect("cluster");
    let answers = cluster
        .client
        .enter(|| {
            let vip = SocketAddrV4::new(KUBIA_VIP, 53);
            (0..30)
                .map(|_| {
                    let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
                    socket.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
                    socket.send_to(b"query", vip).expect("send");
                    let mut buf = [0u8; 256];
                    let (n, from) = socket.recv_from(&mut buf).expect("an answer");
                    (from, String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
                })
                .collect::<Vec<_>>()
        })
        .expect("client");
    for (from, _) in &answers {
        assert_eq!(from.to_string(), "10.96.0.10:53", "the answer must come from the VIP, not the pod");
    }
    let pods: BTreeSet<_> = answers.iter().map(|(_, answer)| answer.clone()).collect();
    assert!(pods.len() > 1 && pods.iter().all(|p| p.starts_with("You've hit kubia-")), "answers from several pods: {pods:?}");
}

/// The XDP entry point on the client-facing interface (tc still serves the
/// pod side, where the replies come from), with checksums verified by every
/// receiving stack.
#[test]
fn xdp_on_the_client_interface_balances_tcp_and_udp() {
    let manifests = kubia_manifests(&ready(&[0, 1, 2]));
    let cluster = Cluster::start_with(3, &[(MANIFEST_FILE, &manifests)], ClientHook::Xdp).expect("cluster");
    let hits = spread(&cluster, 60);
    assert_eq!(hits.len(), 3, "60 connections through XDP reach all three pods: {hits:?}");
    let udp = cluster
        .client
        .enter(|| {
            let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
            socket.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
            socket.send_to(b"query", SocketAddrV4::new(KUBIA_VIP, 53)).expect("send");
            let mut buf = [0u8; 256];
            socket.recv_from(&mut buf).map(|(n, from)| (from, String::from_utf8_lossy(&buf[..n]).into_owned()))
        })
        .expect("client");
    let (from, answer) = udp.expect("a UDP answer through XDP");
    assert_eq!(from.to_string(), "10.96.0.10:53");
    assert!(answer.starts_with("You've hit kubia-"), "{answer}");
}

/// An interface created after the agent started, matching --iface-pattern,
/// is attached (a new pod's traffic through the ClusterIP works without a
/// restart), and let go when it is removed.
#[test]
fn interfaces_created_later_are_attached_by_pattern() {
    use lb_tests::{
        cluster::{TempDir, Topology},
        netns::{Netns, link},
    };
    let net = Topology::new(2, ClientHook::Tc).expect("namespaces");
    let manifests = TempDir::new("manifests").expect("dir");
    std::fs::write(manifests.0.join(MANIFEST_FILE), kubia_manifests(&ready(&[0, 1]))).expect("manifest");
    let source = vec![
        "--manifests".to_owned(),
        manifests.0.to_string_lossy().into_owned(),
        "--iface-pattern".to_owned(),
        "newpod*".to_owned(),
    ];
    let cluster = Cluster::run_agent(net, source, Some(manifests)).expect("agent");

    let pod = Netns::new("newpod").expect("namespace");
    link(&cluster.node, "newpod0", std::net::Ipv4Addr::new(10, 203, 0, 1), &pod, "eth0", std::net::Ipv4Addr::new(10, 203, 0, 2)).expect("veth");
    pod.ip(&["route", "add", "default", "via", "10.203.0.1"]).expect("route");
    cluster.agent.wait_for(&["attached tc ingress (pattern)", "newpod0"], Duration::from_secs(20)).expect("attached");
    let answers = pod
        .enter(|| (0..10).map(|_| connect_and_ask(kubia())).collect::<Vec<_>>())
        .expect("new pod");
    for answer in answers {
        assert!(answer.expect("through the ClusterIP from the new pod").starts_with("You've hit kubia-"));
    }

    drop(pod);
    cluster.agent.wait_for(&["interface removed", "newpod0"], Duration::from_secs(20)).expect("let go");
}

/// kube-proxy masquerades traffic to a cluster IP from outside
/// `--cluster-cidr`: the client's connections reach the pods from the node,
/// a pod's keep its own address.
#[test]
fn a_client_outside_the_cluster_cidr_reaches_a_cluster_ip_from_the_node() {
    use lb_tests::cluster::{NODE_IP, Topology, pod_ip};
    let cluster = kubia_with_flags(Topology::new(3, ClientHook::Tc).expect("namespaces"), &[0, 1, 2], &["--cluster-cidr", "10.244.0.0/16"]);
    let peers = |cluster: &Cluster| -> BTreeSet<std::net::IpAddr> {
        cluster.pods.iter().flat_map(|p| p.server.peers.lock().expect("peers").iter().map(|a| a.ip()).collect::<Vec<_>>()).collect()
    };
    let hits = spread(&cluster, 20);
    assert_eq!(hits.values().sum::<usize>(), 20, "{hits:?}");
    assert_eq!(peers(&cluster), BTreeSet::from([std::net::IpAddr::V4(NODE_IP)]), "the pods see the node, not the client");

    let from_pod = cluster.pods[0].ns.enter(|| (0..20).map(|_| connect_and_ask(kubia())).collect::<Vec<_>>()).expect("pod");
    assert!(from_pod.iter().all(Result::is_ok), "{from_pod:?}");
    assert!(peers(&cluster).contains(&std::net::IpAddr::V4(pod_ip(0))), "a pod's connection keeps its address: {:?}", peers(&cluster));
}

/// A service answering on one port over TCP and UDP (as cluster DNS does):
/// both protocols are served through the same cluster IP and port, each by
/// its own target port.
#[test]
fn one_port_over_tcp_and_udp_like_cluster_dns() {
    let dns = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: default}}\nspec:\n  clusterIP: 10.96.0.70\n  \
         ports:\n  - {{name: dns-tcp, port: 53, protocol: TCP, targetPort: 8080}}\n  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dns-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: dns}}\naddressType: IPv4\n\
         ports:\n- {{name: dns-tcp, port: 8080, protocol: TCP}}\n- {{name: dns, port: 5353, protocol: UDP}}\n\
         endpoints:\n- {{addresses: [\"{}\"], conditions: {{ready: true}}}}\n",
        lb_tests::cluster::pod_ip(0)
    );
    let cluster = Cluster::start_with(1, &[("dns.yaml", &dns)], ClientHook::Tc).expect("cluster");
    let addr = SocketAddrV4::new([10, 96, 0, 70].into(), 53);
    let (tcp, udp) = cluster.client.enter(move || (connect_and_ask(addr), udp_ask(addr))).expect("client");
    assert_eq!(tcp.expect("TCP to port 53"), format!("You've hit {}", pod_name(0)));
    assert_eq!(udp.expect("UDP to port 53"), format!("You've hit {}", pod_name(0)));
}

/// Strict reverse-path filtering on the node (as RHEL-family distributions
/// ship it) would drop the replies translated at ingress, whose source is
/// the service address: the agent makes it loose on the interfaces it
/// attaches to, and the service answers.
#[test]
fn strict_reverse_path_filtering_is_made_loose_on_attached_interfaces() {
    use lb_tests::cluster::{TempDir, Topology};
    let net = Topology::new(2, ClientHook::Tc).and_then(Topology::with_strict_reverse_path_filter).expect("namespaces");
    let manifests = TempDir::new("manifests").expect("dir");
    std::fs::write(manifests.0.join(MANIFEST_FILE), kubia_manifests(&ready(&[0, 1]))).expect("manifest");
    let source = ["--manifests", &manifests.0.to_string_lossy()].map(str::to_owned).to_vec();
    let cluster = Cluster::run_agent(net, source, Some(manifests)).expect("agent");
    let answers = spread(&cluster, 10);
    assert_eq!(answers.values().sum::<usize>(), 10, "every connection answered: {answers:?}");
    for iface in ["c0", "b1", "b2"] {
        let path = format!("/proc/sys/net/ipv4/conf/{iface}/rp_filter");
        let value = cluster.node.enter(move || std::fs::read_to_string(path)).expect("node").expect("rp_filter");
        assert_eq!(value.trim(), "2", "{iface}: loose");
    }
    assert!(cluster.agent.log().contains("made loose"), "the agent says what it changed:\n{}", cluster.agent.log());
}

/// With `--answer-ping`, a client pinging a cluster IP gets the echo reply
/// from it (anchors §3: "I can't ping my service IP"), counted as
/// `echo_answered`.
#[test]
fn a_cluster_ip_answers_ping_when_asked_to() {
    use lb_tests::cluster::{TempDir, Topology};
    let net = Topology::new(1, ClientHook::Tc).expect("namespaces");
    let manifests = TempDir::new("manifests").expect("dir");
    std::fs::write(manifests.0.join(MANIFEST_FILE), kubia_manifests(&ready(&[0]))).expect("manifest");
    let source = ["--manifests", &manifests.0.to_string_lossy(), "--answer-ping"].map(str::to_owned).to_vec();
    let cluster = Cluster::run_agent(net, source, Some(manifests)).expect("agent");
    let answered_by = cluster.client.enter(|| ping(KUBIA_VIP)).expect("client").expect("an echo reply");
    assert_eq!(answered_by, KUBIA_VIP);
    let answered = cluster.maps().expect("pinned maps").verdict_count(lb_common::Reason::EchoAnswered).expect("counters");
    assert_eq!(answered, 1);
}
