//! Socket-level balancing of the node's and pods' own sockets (the cgroup programs), across changes and restarts.
use std::{collections::BTreeSet, net::SocketAddrV4, time::Duration};

use lb_tests::cluster::{ClientHook, Cluster, KUBIA_VIP, MANIFEST_FILE, kubia_manifests, pod_name, ready};

use crate::kubia_with_flags;

/// A node process's unconnected UDP socket sending many datagrams to a
/// service: every one reaches the same backend (one choice per socket, as
/// Cilium keys it by socket cookie), each answer from the service address.
#[test]
fn a_node_udp_socket_sends_every_datagram_to_one_backend() {
    let cluster = Cluster::start(3, &kubia_manifests(&ready(&[0, 1, 2]))).expect("cluster");
    let dns = SocketAddrV4::new(KUBIA_VIP, 53);
    let mut pods_seen = BTreeSet::new();
    for socket in 0..4 {
        let mut client = lb_tests::netns::UdpClientProcess::start(&cluster.cgroup.dir, &cluster.node).expect("a node process");
        let answers: Vec<_> = (0..15).map(|_| client.ask(dns).expect("an answer")).collect();
        assert!(answers.iter().all(|(from, _)| *from == std::net::SocketAddr::V4(dns)), "socket {socket}: answers from the service: {answers:?}");
        let pods: BTreeSet<&String> = answers.iter().map(|(_, answer)| answer).collect();
        assert_eq!(pods.len(), 1, "socket {socket}: one backend for all its datagrams: {pods:?}");
        pods_seen.extend(pods.into_iter().cloned());
    }
    println!("4 node sockets x 15 datagrams, backends: {pods_seen:?}");
}

/// An unconnected UDP socket of the node keeps getting translated answers
/// (from the service address, from its backend) across an agent restart:
/// the socket maps are pinned and taken over.
#[test]
fn a_node_udp_socket_keeps_its_backend_and_translated_answers_across_a_restart() {
    let mut cluster = Cluster::start(3, &kubia_manifests(&ready(&[0, 1, 2]))).expect("cluster");
    let dns = SocketAddrV4::new(KUBIA_VIP, 53);
    let mut client = lb_tests::netns::UdpClientProcess::start(&cluster.cgroup.dir, &cluster.node).expect("a node process");
    let before = client.ask(dns).expect("an answer before");
    cluster.restart_agent().expect("restart");
    let after = client.ask(dns).expect("an answer after the restart");
    assert_eq!(after, before, "the same backend, and the answer from the service address");
    assert_eq!(after.0, std::net::SocketAddr::V4(dns));
}

/// Connected UDP sockets (DNS-like clients) of a node process and of a pod
/// (its process in a child cgroup of --cgroup) whose backend leaves the
/// service: the agent destroys both sockets, their next receive fails at
/// once, and a reconnect reaches a backend that serves within a second of
/// the change.
#[test]
fn connected_udp_sockets_whose_backend_leaves_are_destroyed_and_reconnect_elsewhere() {
    let cluster = Cluster::start(3, &kubia_manifests(&ready(&[0, 1, 2]))).expect("cluster");
    let dns = SocketAddrV4::new(KUBIA_VIP, 53);
    let pod_cgroup = cluster.cgroup.child("pod").expect("a pod cgroup");
    for (who, cgroup, ns) in [("node", &cluster.cgroup.dir, &cluster.node), ("pod", &pod_cgroup.dir, &cluster.pods[0].ns)] {
        cluster.set_kubia_pods(&ready(&[0, 1, 2])).expect("every backend");
        let mut client = lb_tests::netns::UdpClientProcess::start(cgroup, ns).expect("a client process");
        client.connect(dns).expect("connect");
        let (from, first) = client.ask_connected().expect("a first answer");
        assert_eq!(from, std::net::SocketAddr::V4(dns), "{who}: answered as the service");
        let first = first.trim_start_matches("You've hit ").to_owned();
        let others: Vec<usize> = (0..3).filter(|&i| pod_name(i) != first).collect();
        let changed = std::time::Instant::now();
        cluster.set_kubia_pods(&ready(&others)).expect("its backend removed");
        cluster.agent.wait_for(&["destroyed the node's sockets connected to backends that left"], lb_tests::cluster::agent_timeout()).expect("the socket destroyed");
        let failed = client.ask_connected();
        assert!(failed.is_err(), "{who}: the socket to the removed backend was destroyed: {failed:?}");
        client.connect(dns).expect("reconnect");
        let (_, answer) = client.ask_connected().expect("an answer after reconnecting");
        let took = changed.elapsed();
        println!("{who}'s connected UDP socket: answer from {answer} {took:?} after its backend {first} left");
        assert_ne!(answer, format!("You've hit {first}"), "{who}");
        assert!(took < lb_tests::netns::scaled(Duration::from_secs(1)), "{who}: the client moved within a second: {took:?}");
    }
}

/// Pods whose processes sit in child cgroups of --cgroup, as on a real
/// node where the socket programs attach at the cgroup root: their UDP and
/// TCP to a cluster IP go through the socket path (translated at the
/// socket: no new flow at the tc hook of their interfaces, answers from the
/// service address), and ClientIP affinity is per pod, each staying on its
/// own backend (keyed by the pod's network namespace; before Linux 5.14,
/// which cannot name the node's own, all are the node's one client).
#[test]
fn pods_in_child_cgroups_use_the_socket_path_with_affinity_per_pod() {
    use lb_common::{AFFINITY_CLIENT_NETNS, AffinityKey, AffinityValue};
    let sticky = kubia_manifests(&ready(&[0, 1, 2])).replacen("  selector: {app: kubia}\n", "  sessionAffinity: ClientIP\n  selector: {app: kubia}\n", 1);
    let cluster = Cluster::start(3, &sticky).expect("cluster");
    let maps = cluster.maps().expect("maps");
    let new_flows_before = maps.verdict_count(lb_common::Reason::ForwardNew).expect("counter");
    let dns = SocketAddrV4::new(KUBIA_VIP, 53);
    let mut chosen = Vec::new();
    for pod in 0..3 {
        let cgroup = cluster.cgroup.child(&format!("pod{pod}")).expect("a pod cgroup");
        let ns = &cluster.pods[pod].ns;
        let mut client = lb_tests::netns::UdpClientProcess::start(&cgroup.dir, ns).expect("a pod process");
        let mut answers = BTreeSet::new();
        for _ in 0..5 {
            client.connect(dns).expect("a new connected socket");
            let (from, answer) = client.ask_connected().expect("an answer");
            assert_eq!(from, std::net::SocketAddr::V4(dns), "pod {pod}: answered as the service");
            answers.insert(answer);
        }
        let tcp = cgroup.run_in(ns, "exec 3<>/dev/tcp/10.96.0.10/80 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && timeout 3 grep -m1 -o \"You've hit kubia-[0-9]\" <&3").expect("TCP from the pod");
        assert!(tcp.contains("You've hit kubia-"), "pod {pod}: TCP through the socket path: {tcp}");
        assert_eq!(answers.len(), 1, "pod {pod}: five new sockets, one backend (affinity): {answers:?}");
        chosen.extend(answers);
        drop(client);
    }
    assert_eq!(maps.verdict_count(lb_common::Reason::ForwardNew).expect("counter"), new_flows_before, "translated at the socket, not at tc");
    let pinned = aya::maps::MapData::from_pin(cluster.bpffs.dir.join(lb_common::MAP_SESSION_AFFINITY)).expect("SESSION_AFFINITY");
    let affinity = aya::maps::HashMap::<_, AffinityKey, AffinityValue>::try_from(aya::maps::Map::LruHashMap(pinned)).expect("a hash map");
    let clients: BTreeSet<u64> = affinity.keys().filter_map(Result::ok).map(|k| k.client).collect();
    println!("three pods' backends: {chosen:?}; affinity clients: {clients:x?}");
    if lb_userspace::sockets::netns_cookie().is_some() {
        assert_eq!(clients.len(), 3, "one affinity per pod: {clients:x?}");
        assert!(clients.iter().all(|c| c & AFFINITY_CLIENT_NETNS != 0), "keyed by the pods' namespaces: {clients:x?}");
    } else {
        assert_eq!(clients.len(), 1, "without SO_NETNS_COOKIE every socket is the node's: {clients:x?}");
    }
}

/// `--socket-lb-scope node`: the socket programs leave pods' sockets alone
/// (a pod's connection is translated per packet at tc, and the pod sees
/// the cluster IP as its peer), and still translate the node's own.
#[test]
fn socket_lb_scope_node_leaves_pods_to_the_packet_path() {
    let net = lb_tests::cluster::Topology::new(3, ClientHook::Tc).expect("namespaces");
    if lb_userspace::sockets::netns_cookie().is_none() {
        // Before Linux 5.14 the node's sockets cannot be told from pods':
        // the agent says so and what to do instead.
        let manifests = lb_tests::cluster::TempDir::new("manifests").expect("dir");
        std::fs::write(manifests.0.join(MANIFEST_FILE), kubia_manifests(&ready(&[0]))).expect("manifest");
        let source = vec!["--manifests".to_owned(), manifests.0.to_string_lossy().into_owned(), "--socket-lb-scope".into(), "node".into()];
        let refused = Cluster::run_agent(net, source, Some(manifests)).err().expect("the agent refuses the scope");
        assert!(format!("{refused:#}").contains("needs Linux 5.14"), "{refused:#}");
        return;
    }
    let cluster = kubia_with_flags(net, &[0, 1, 2], &["--socket-lb-scope", "node"]);
    let maps = cluster.maps().expect("maps");
    let new_flows = || maps.verdict_count(lb_common::Reason::ForwardNew).expect("counter");
    let dns = SocketAddrV4::new(KUBIA_VIP, 53);
    let pod_cgroup = cluster.cgroup.child("pod").expect("a pod cgroup");
    let before = new_flows();
    {
        let mut pod = lb_tests::netns::UdpClientProcess::start(&pod_cgroup.dir, &cluster.pods[0].ns).expect("a pod process");
        let (from, _) = pod.ask(dns).expect("the pod's answer");
        assert_eq!(from, std::net::SocketAddr::V4(dns));
    }
    let after_pod = new_flows();
    assert_eq!(after_pod, before + 1, "the pod's datagram was a new flow at tc");
    let mut node = lb_tests::netns::UdpClientProcess::start(&cluster.cgroup.dir, &cluster.node).expect("a node process");
    let (from, _) = node.ask(dns).expect("the node's answer");
    assert_eq!(from, std::net::SocketAddr::V4(dns));
    assert_eq!(new_flows(), after_pod, "the node's datagram was translated at the socket");
}
