//! End-to-end: real TCP and UDP clients and servers in veth network
//! namespaces, with the real `lb-agent` attached in the node namespace.
//! Needs root. Each test builds its own uniquely named namespaces and bpf
//! filesystem and removes them when it ends, passing or failing.
use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{SocketAddrV4, TcpStream, UdpSocket},
    sync::atomic::Ordering,
    time::Duration,
};

use lb_tests::{
    cluster::{ClientHook, Cluster, EMPTY_VIP, KUBIA_VIP, kubia_services, pod_name},
    netns::{ask, connect_and_ask, pod_name as answered_by},
};

const CONNECTIONS: usize = 300;

#[test]
fn new_tcp_connections_reach_all_three_backends() {
    let cluster = Cluster::start(3, &kubia_services(&[0, 1, 2])).expect("cluster");
    let hits = cluster
        .client
        .enter(|| {
            let mut hits = BTreeMap::<String, usize>::new();
            for _ in 0..CONNECTIONS {
                let answer = connect_and_ask(SocketAddrV4::new(KUBIA_VIP, 80)).expect("request through the VIP");
                *hits.entry(answered_by(&answer)).or_default() += 1;
            }
            hits
        })
        .expect("client");
    println!("{CONNECTIONS} connections through {KUBIA_VIP}:80: {hits:?}");
    assert_eq!(hits.keys().cloned().collect::<Vec<_>>(), [pod_name(0), pod_name(1), pod_name(2)]);
    for (pod, count) in &hits {
        assert!(*count * 5 >= CONNECTIONS, "{pod} got {count} of {CONNECTIONS}, under 20%");
    }
}

#[test]
fn long_lived_connection_keeps_its_backend_while_the_set_changes() {
    let mut cluster = Cluster::start(3, &kubia_services(&[0, 1, 2])).expect("cluster");
    let (mut conn, first) = cluster
        .client
        .enter(|| {
            let mut conn = TcpStream::connect(SocketAddrV4::new(KUBIA_VIP, 80)).expect("connect");
            conn.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
            let first = answered_by(&ask(&mut conn).expect("first answer"));
            (conn, first)
        })
        .expect("client");
    let kept = (0..3).find(|&i| pod_name(i) == first).expect("answered by a pod");
    let others: Vec<usize> = (0..3).filter(|&i| i != kept).collect();

    // Another backend leaves: the connection stays where it is, and new
    // connections never reach the one that left.
    let line = cluster.update_services(&kubia_services(&[kept, others[1]])).expect("reload");
    println!("after removing {}: {line}", pod_name(others[0]));
    for _ in 0..5 {
        assert_eq!(answered_by(&ask(&mut conn).expect("answer")), first, "the long-lived connection moved");
    }
    let departed = pod_name(others[0]);
    let new_hits = cluster
        .client
        .enter(|| (0..30).map(|_| answered_by(&connect_and_ask(SocketAddrV4::new(KUBIA_VIP, 80)).expect("request"))).collect::<Vec<_>>())
        .expect("client");
    assert!(!new_hits.contains(&departed), "a new connection reached {departed}, which left: {new_hits:?}");

    // Its own backend leaves: its next packet is not sent there any more.
    let received_before = cluster.pods[kept].server.tcp_bytes.load(Ordering::Relaxed);
    cluster.update_services(&kubia_services(&[others[1]])).expect("reload");
    let after = ask(&mut conn);
    assert!(
        !matches!(&after, Ok(answer) if answered_by(answer) == first),
        "the connection still reached {first} after it left: {after:?}"
    );
    assert_eq!(
        cluster.pods[kept].server.tcp_bytes.load(Ordering::Relaxed),
        received_before,
        "{first} received data after it left the service"
    );
}

#[test]
fn udp_request_and_response_through_the_vip() {
    let cluster = Cluster::start(3, &kubia_services(&[0, 1, 2])).expect("cluster");
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
                    (from, answered_by(String::from_utf8_lossy(&buf[..n]).trim_end()))
                })
                .collect::<Vec<_>>()
        })
        .expect("client");
    for (from, _) in &answers {
        assert_eq!(from.to_string(), "10.96.0.10:53", "the answer must come from the VIP, not the pod");
    }
    let pods: std::collections::BTreeSet<_> = answers.iter().map(|(_, pod)| pod.clone()).collect();
    assert!(pods.len() > 1 && pods.iter().all(|p| p.starts_with("kubia-")), "answers from several pods: {pods:?}");
}

#[test]
fn service_without_endpoints_is_refused_at_once() {
    let cluster = Cluster::start(1, &kubia_services(&[0])).expect("cluster");
    let outcomes = cluster
        .client
        .enter(|| {
            let tcp = |addr| TcpStream::connect_timeout(&std::net::SocketAddr::V4(addr), Duration::from_secs(5)).map(drop);
            let udp = |addr: SocketAddrV4| -> std::io::Result<()> {
                let socket = UdpSocket::bind("0.0.0.0:0")?;
                socket.connect(addr)?;
                socket.set_read_timeout(Some(Duration::from_secs(5)))?;
                socket.send(b"query")?;
                socket.recv(&mut [0u8; 64]).map(drop)
            };
            [
                ("TCP to a service without endpoints", tcp(SocketAddrV4::new(EMPTY_VIP, 80))),
                ("UDP to a service without endpoints", udp(SocketAddrV4::new(EMPTY_VIP, 53))),
                ("TCP to a port the service does not serve", tcp(SocketAddrV4::new(KUBIA_VIP, 81))),
            ]
            .map(|(what, result)| (what, result.map_err(|e| e.kind())))
        })
        .expect("client");
    for (what, outcome) in outcomes {
        // A timeout would be ErrorKind::TimedOut / WouldBlock: refused means
        // the reset or ICMP error came back.
        assert_eq!(outcome, Err(ErrorKind::ConnectionRefused), "{what}");
    }
}

/// The XDP entry point on the client-facing interface (tc still serves the
/// pod side, where the replies come from): real connections and datagrams
/// through the VIP.
#[test]
fn xdp_on_the_client_interface_balances_tcp_and_udp() {
    let cluster = Cluster::start_with(3, &kubia_services(&[0, 1, 2]), ClientHook::Xdp).expect("cluster");
    let (tcp, udp) = cluster
        .client
        .enter(|| {
            let tcp: Vec<String> = (0..60)
                .map(|_| answered_by(&connect_and_ask(SocketAddrV4::new(KUBIA_VIP, 80)).expect("request through the VIP")))
                .collect();
            let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
            socket.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
            socket.send_to(b"query", SocketAddrV4::new(KUBIA_VIP, 53)).expect("send");
            let mut buf = [0u8; 256];
            let udp = socket.recv_from(&mut buf).map(|(n, from)| (from, String::from_utf8_lossy(&buf[..n]).into_owned()));
            (tcp, udp)
        })
        .expect("client");
    let pods: std::collections::BTreeSet<_> = tcp.iter().cloned().collect();
    assert_eq!(pods.len(), 3, "60 connections through XDP reach all three pods: {pods:?}");
    let (from, answer) = udp.expect("a UDP answer through XDP");
    assert_eq!(from.to_string(), "10.96.0.10:53");
    assert!(answer.starts_with("You've hit kubia-"), "{answer}");
}
