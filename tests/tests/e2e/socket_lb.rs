//! Socket-level balancing of the node's and pods' own sockets (the cgroup programs), across changes and restarts.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use lb_tests::{
    cluster::{ClientHook, Cluster, KUBIA_VIP, MANIFEST_FILE, PodState, agent_timeout, kubia_http, kubia_manifests, pod_ip, pod_name, ready},
    netns::{Netns, UdpClientProcess, link, scaled},
};

use crate::{index_of, kubia_with_flags};

/// The kubia service with sessionAffinity ClientIP, every pod ready.
fn sticky_kubia() -> String {
    kubia_manifests(&ready(&[0, 1, 2])).replacen("  selector: {app: kubia}\n", "  sessionAffinity: ClientIP\n  selector: {app: kubia}\n", 1)
}

/// The pod index of an answer ("You've hit kubia-2").
fn answered_by(answer: &str) -> usize {
    index_of(answer.trim_start_matches("You've hit "))
}

/// The agent's log lines about destroying sockets, for failure messages.
fn destroy_lines(cluster: &Cluster) -> Vec<String> {
    cluster.agent.log().lines().filter(|l| l.contains("destroy")).map(str::to_owned).collect()
}

/// A node process's unconnected UDP socket sending many datagrams to a
/// service: every one reaches the same backend (one choice per socket, as
/// Cilium keys it by socket cookie), each answer from the service address.
#[test]
fn a_node_udp_socket_sends_every_datagram_to_one_backend() {
    let cluster = Cluster::start(3, &kubia_manifests(&ready(&[0, 1, 2]))).expect("cluster");
    let dns = SocketAddrV4::new(KUBIA_VIP, 53);
    let mut pods_seen = BTreeSet::new();
    for socket in 0..4 {
        let mut client = UdpClientProcess::start(&cluster.cgroup.dir, &cluster.node).expect("a node process");
        let answers: Vec<_> = (0..15).map(|_| client.ask(dns).expect("an answer")).collect();
        assert!(answers.iter().all(|(from, _)| *from == SocketAddr::V4(dns)), "socket {socket}: answers from the service: {answers:?}");
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
    let mut client = UdpClientProcess::start(&cluster.cgroup.dir, &cluster.node).expect("a node process");
    let before = client.ask(dns).expect("an answer before");
    cluster.restart_agent().expect("restart");
    let after = client.ask(dns).expect("an answer after the restart");
    assert_eq!(after, before, "the same backend, and the answer from the service address");
    assert_eq!(after.0, SocketAddr::V4(dns));
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
        let mut client = UdpClientProcess::start(cgroup, ns).expect("a client process");
        client.connect(dns).expect("connect");
        let (from, first) = client.ask_connected().expect("a first answer");
        assert_eq!(from, SocketAddr::V4(dns), "{who}: answered as the service");
        let first = first.trim_start_matches("You've hit ").to_owned();
        let others: Vec<usize> = (0..3).filter(|&i| pod_name(i) != first).collect();
        let changed = std::time::Instant::now();
        cluster.set_kubia_pods(&ready(&others)).expect("its backend removed");
        cluster.agent.wait_for(&["destroyed the node's sockets connected to backends that left"], agent_timeout()).expect("the socket destroyed");
        let failed = client.ask_connected();
        assert!(failed.is_err(), "{who}: the socket to the removed backend was destroyed: {failed:?}");
        client.connect(dns).expect("reconnect");
        let (_, answer) = client.ask_connected().expect("an answer after reconnecting");
        let took = changed.elapsed();
        println!("{who}'s connected UDP socket: answer from {answer} {took:?} after its backend {first} left");
        assert_ne!(answer, format!("You've hit {first}"), "{who}");
        assert!(took < scaled(Duration::from_secs(1)), "{who}: the client moved within a second: {took:?}");
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
    let cluster = Cluster::start(3, &sticky_kubia()).expect("cluster");
    let maps = cluster.maps().expect("maps");
    let new_flows_before = maps.verdict_count(lb_common::Reason::ForwardNew).expect("counter");
    let dns = SocketAddrV4::new(KUBIA_VIP, 53);
    let mut chosen = Vec::new();
    for pod in 0..3 {
        let cgroup = cluster.cgroup.child(&format!("pod{pod}")).expect("a pod cgroup");
        let ns = &cluster.pods[pod].ns;
        let mut client = UdpClientProcess::start(&cgroup.dir, ns).expect("a pod process");
        let mut answers = BTreeSet::new();
        for _ in 0..5 {
            client.connect(dns).expect("a new connected socket");
            let (from, answer) = client.ask_connected().expect("an answer");
            assert_eq!(from, SocketAddr::V4(dns), "pod {pod}: answered as the service");
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
        let mut pod = UdpClientProcess::start(&pod_cgroup.dir, &cluster.pods[0].ns).expect("a pod process");
        let (from, _) = pod.ask(dns).expect("the pod's answer");
        assert_eq!(from, SocketAddr::V4(dns));
    }
    let after_pod = new_flows();
    assert_eq!(after_pod, before + 1, "the pod's datagram was a new flow at tc");
    let mut node = UdpClientProcess::start(&cluster.cgroup.dir, &cluster.node).expect("a node process");
    let (from, _) = node.ask(dns).expect("the node's answer");
    assert_eq!(from, SocketAddr::V4(dns));
    assert_eq!(new_flows(), after_pod, "the node's datagram was translated at the socket");
}

/// Held TCP connections of a node process and of a pod (its process in a
/// child cgroup of --cgroup, in its own network namespace) to a cluster IP,
/// translated at the socket. While their backend is listed but not ready
/// they keep working (an established connection finishes its work, as
/// kube-proxy leaves it alone); once the backend is gone from the
/// EndpointSlice the agent destroys them: the application's next request
/// fails (aborted, reset or EOF), and a new connection reaches another
/// backend.
#[test]
fn held_tcp_connections_outlive_an_unready_backend_and_are_destroyed_when_it_leaves() {
    let cluster = Cluster::start(3, &kubia_manifests(&ready(&[0, 1, 2]))).expect("cluster");
    let maps = cluster.maps().expect("maps");
    let http = SocketAddrV4::new(KUBIA_VIP, 80);
    let pod_cgroup = cluster.cgroup.child("pod").expect("a pod cgroup");
    for (who, cgroup, ns) in [("node", &cluster.cgroup.dir, &cluster.node), ("pod", &pod_cgroup.dir, &cluster.pods[0].ns)] {
        let new_flows = maps.verdict_count(lb_common::Reason::ForwardNew).expect("counter");
        let mut client = UdpClientProcess::start(cgroup, ns).expect("a client process");
        let (peer, first) = client.tcp_connect(http).expect("a first answer");
        assert_eq!(peer, SocketAddr::V4(http), "{who}: the peer shows as the service");
        assert_eq!(maps.verdict_count(lb_common::Reason::ForwardNew).expect("counter"), new_flows, "{who}: translated at the socket, not at tc");
        let backend = answered_by(&first);
        let others: Vec<usize> = (0..3).filter(|&i| i != backend).collect();

        let mut pods = ready(&[0, 1, 2]);
        pods[backend].1 = PodState::NotReady;
        let at = cluster.write_manifest(MANIFEST_FILE, &kubia_manifests(&pods)).expect("its backend not ready");
        cluster.agent.wait_for_applied_sync(agent_timeout()).expect("the change applied");
        let unready_applied = at.elapsed();
        let expected: BTreeSet<Ipv4Addr> = others.iter().map(|&i| pod_ip(i)).collect();
        assert_eq!(maps.backends(kubia_http()), Some(expected), "{who}: new connections no longer go to {}", pod_name(backend));
        let kept = client.tcp_ask();
        assert_eq!(kept.as_ref().ok().map(|(_, a)| a), Some(&first), "{who}: the connection keeps working while its backend is listed but not ready");

        let at = cluster.write_manifest(MANIFEST_FILE, &kubia_manifests(&ready(&others))).expect("its backend removed");
        let destroyed = cluster.agent.wait_for(&["destroyed the node's sockets"], agent_timeout()).expect("the agent destroyed sockets");
        cluster.agent.wait_for_applied_sync(agent_timeout()).expect("the change applied");
        let failed = client.tcp_ask();
        let aborted = at.elapsed();
        assert!(failed.is_err(), "{who}: the connection to the removed backend was destroyed, yet it answered {failed:?}");
        let (_, next) = client.tcp_connect(http).expect("a new connection");
        let moved = at.elapsed();
        assert_ne!(next, first, "{who}: a new connection reaches another backend");
        println!(
            "{who}'s held TCP connection to {}: kept while not ready (change applied in {unready_applied:?}); \
             its backend removed from the slice: the next request failed {aborted:?} after the change ({}), a new connection answered by {} {moved:?} after it; agent: {}",
            pod_name(backend),
            failed.err().map(|e| e.to_string()).unwrap_or_default(),
            pod_name(answered_by(&next)),
            destroyed.split_once("INFO ").map_or(destroyed.as_str(), |(_, line)| line)
        );
        drop(client);
        cluster.set_kubia_pods(&ready(&[0, 1, 2])).expect("every backend back");
        cluster.agent.wait_for_applied_sync(agent_timeout()).expect("the change applied");
    }
}

/// The cluster DNS service's shape on its own address: port 53 over UDP
/// and, with `tcp_too`, over TCP as well, both to targetPort 5353; every
/// pod listed, ready but `not_ready` (not ready, not serving, not
/// terminating: its readiness probe fails).
fn dns_manifests(tcp_too: bool, not_ready: Option<usize>) -> String {
    let endpoints: String = (0..3)
        .map(|i| {
            let up = Some(i) != not_ready;
            format!("- {{addresses: [\"{}\"], conditions: {{ready: {up}, serving: {up}, terminating: false}}}}\n", pod_ip(i))
        })
        .collect();
    let (service_tcp, slice_tcp) = if tcp_too {
        ("\n  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 5353}", "\n- {name: dns-tcp, port: 5353, protocol: TCP}")
    } else {
        ("", "")
    };
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: dns, namespace: default}}
spec:
  clusterIP: {DNS_VIP}
  ports:
  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}{service_tcp}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dns-abcde
  namespace: default
  labels: {{kubernetes.io/service-name: dns}}
addressType: IPv4
ports:
- {{name: dns, port: 5353, protocol: UDP}}{slice_tcp}
endpoints:
{endpoints}"#
    )
}

const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 70);

/// A pod's connected UDP socket (a DNS client's) to the DNS service: its
/// backend turns not ready (still listed); the agent destroys the socket
/// in the sync that applies the change, and the client, reconnecting, is
/// answered by another backend within a second of the change.
fn connected_udp_socket_leaves_a_backend_that_turns_not_ready(tcp_too: bool) {
    let shape = if tcp_too { "port 53 over TCP and UDP" } else { "port 53 over UDP only" };
    let cluster = Cluster::start_with(3, &[("dns.yaml", &dns_manifests(tcp_too, None))], ClientHook::Tc).expect("cluster");
    let maps = cluster.maps().expect("maps");
    let dns = SocketAddrV4::new(DNS_VIP, 53);
    let pod_cgroup = cluster.cgroup.child("pod").expect("a pod cgroup");
    let mut client = UdpClientProcess::start(&pod_cgroup.dir, &cluster.pods[0].ns).expect("a pod process");
    client.connect(dns).expect("connect");
    let (from, first) = client.ask_connected().expect("a first answer");
    assert_eq!(from, SocketAddr::V4(dns), "answered as the service");
    let backend = answered_by(&first);
    let changed = cluster.write_manifest("dns.yaml", &dns_manifests(tcp_too, Some(backend))).expect("its backend not ready");
    cluster.agent.wait_for_applied_sync(agent_timeout()).expect("the change applied");
    let applied = changed.elapsed();
    let expected: BTreeSet<Ipv4Addr> = (0..3).filter(|&i| i != backend).map(pod_ip).collect();
    let udp = lb_common::FrontendKey::new(DNS_VIP, 53, lb_common::IPPROTO_UDP);
    assert_eq!(maps.backends(udp), Some(expected), "{shape}: new sockets no longer go to {}", pod_name(backend));
    let after = client.ask_connected();
    assert!(
        after.is_err(),
        "{shape}: the socket to {}, which turned not ready, should have been destroyed by the sync that applied it, yet its next ask got {after:?}; \
         the agent's lines about destroying: {:?}",
        pod_name(backend),
        destroy_lines(&cluster)
    );
    client.connect(dns).expect("reconnect");
    let (_, answer) = client.ask_connected().expect("an answer after reconnecting");
    let took = changed.elapsed();
    println!(
        "{shape}: a pod's connected UDP socket to {}, which turned not ready: destroyed (change applied in {applied:?}); reconnected, answered by {} {took:?} after the change",
        pod_name(backend),
        pod_name(answered_by(&answer))
    );
    assert_ne!(answer, first, "{shape}: another backend");
    assert!(took < scaled(Duration::from_secs(1)), "{shape}: the client moved within a second: {took:?}");
}

#[test]
fn a_pods_connected_udp_socket_leaves_a_backend_that_turns_not_ready() {
    connected_udp_socket_leaves_a_backend_that_turns_not_ready(false);
}

/// As the cluster DNS (CoreDNS) serves it: the same port over TCP and UDP.
/// The TCP port keeps the unready endpoint for its established connections
/// (draining); the UDP socket must not be judged by it.
#[test]
fn a_pods_connected_udp_socket_leaves_a_backend_that_turns_not_ready_on_a_port_served_over_tcp_too() {
    connected_udp_socket_leaves_a_backend_that_turns_not_ready(true);
}

/// `count` new connected sockets of `client` to `to`, one ask each: all
/// answered as the service, by one backend; its answer.
fn one_backend_over_new_sockets(client: &mut UdpClientProcess, to: SocketAddrV4, count: usize, who: &str) -> String {
    let answers: BTreeSet<String> = (0..count)
        .map(|_| {
            client.connect(to).expect("a new connected socket");
            let (from, answer) = client.ask_connected().expect("an answer");
            assert_eq!(from, SocketAddr::V4(to), "{who}: answered as the service");
            answer
        })
        .collect();
    assert_eq!(answers.len(), 1, "{who}: {count} new sockets, one backend (affinity): {answers:?}");
    answers.into_iter().next().expect("one answer")
}

/// Pods with ClientIP affinity are clients of their own: two can land on
/// different backends, and each stays on its own over new connections.
/// Pods (network namespaces behind the node, their processes in child
/// cgroups of --cgroup) are added until two differ; a new client's backend
/// is picked at random among three, so twenty pods all on one backend, a
/// false failure, has probability 3 x (1/3)^20 = 3^-19, about 9e-10.
/// Before Linux 5.14 (no netns cookie) every pod is the node's one client,
/// and all share one backend.
#[test]
fn pods_with_client_ip_affinity_can_land_on_different_backends_each_keeping_its_own() {
    let cluster = Cluster::start(3, &sticky_kubia()).expect("cluster");
    let dns = SocketAddrV4::new(KUBIA_VIP, 53);
    let per_pod = lb_userspace::sockets::netns_cookie().is_some();
    // Dropped in order: the process, then its cgroup, then its namespace.
    let mut pods: Vec<(UdpClientProcess, lb_tests::netns::ChildCgroup, Netns, String)> = Vec::new();
    for n in 0..20u8 {
        let who = format!("pod {n}");
        let ns = Netns::new(&format!("cpod{n}")).expect("a pod namespace");
        link(&cluster.node, &format!("q{n}"), Ipv4Addr::new(10, 250, n, 1), &ns, "eth0", Ipv4Addr::new(10, 250, n, 2)).expect("its link");
        ns.ip(&["route", "add", "default", "via", &format!("10.250.{n}.1")]).expect("its route");
        let cgroup = cluster.cgroup.child(&format!("cpod{n}")).expect("its cgroup");
        let mut client = UdpClientProcess::start(&cgroup.dir, &ns).expect("its process");
        let backend = one_backend_over_new_sockets(&mut client, dns, 4, &who);
        pods.push((client, cgroup, ns, backend));
        let distinct: BTreeSet<&String> = pods.iter().map(|p| &p.3).collect();
        if distinct.len() > 1 || (!per_pod && pods.len() == 3) {
            break;
        }
    }
    // Each again, now that the others have chosen: still its own.
    for (n, (client, _, _, backend)) in pods.iter_mut().enumerate() {
        let again = one_backend_over_new_sockets(client, dns, 4, &format!("pod {n}"));
        assert_eq!(&again, backend, "pod {n} stays on its backend");
    }
    let backends: Vec<String> = pods.iter().map(|p| pod_name(answered_by(&p.3))).collect();
    let distinct: BTreeSet<&String> = backends.iter().collect();
    println!("{} pods with ClientIP affinity, 8 connected sockets each, their backends: {backends:?}", pods.len());
    if per_pod {
        assert!(distinct.len() > 1, "pods are clients of their own, yet 20 all landed on one backend: {backends:?}");
    } else {
        assert_eq!(distinct.len(), 1, "without SO_NETNS_COOKIE every pod is the node's one client: {backends:?}");
    }
}

/// Unconnected UDP sockets of one client to a service with ClientIP
/// affinity: every socket of the node, and every socket of a pod, reaches
/// that client's one backend: the affinity outranks the per-socket choice
/// (without affinity each socket picks its own, as
/// `a_node_udp_socket_sends_every_datagram_to_one_backend` shows; eight
/// sockets would all pick one backend with probability 3^-7).
#[test]
fn unconnected_udp_sockets_of_one_client_share_its_client_ip_affinity() {
    let cluster = Cluster::start(3, &sticky_kubia()).expect("cluster");
    let dns = SocketAddrV4::new(KUBIA_VIP, 53);
    let pod_cgroup = cluster.cgroup.child("pod").expect("a pod cgroup");
    for (who, cgroup, ns) in [("node", &cluster.cgroup.dir, &cluster.node), ("pod", &pod_cgroup.dir, &cluster.pods[0].ns)] {
        let mut backends = BTreeSet::new();
        for _ in 0..8 {
            let mut client = UdpClientProcess::start(cgroup, ns).expect("a process, with a new unconnected socket");
            for _ in 0..3 {
                let (from, answer) = client.ask(dns).expect("an answer");
                assert_eq!(from, SocketAddr::V4(dns), "{who}: answered as the service");
                backends.insert(answer);
            }
        }
        println!("{who}: 8 unconnected sockets x 3 datagrams with ClientIP affinity, backends: {backends:?}");
        assert_eq!(backends.len(), 1, "{who}: every socket of one client on its affinity's backend: {backends:?}");
    }
}
