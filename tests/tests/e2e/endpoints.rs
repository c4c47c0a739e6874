//! Endpoint changes through the manifest directory: added, removed, draining or deleted, and the held connections.
use std::{
    io::ErrorKind,
    net::{SocketAddrV4, TcpStream, UdpSocket},
    sync::atomic::Ordering,
    time::Duration,
};

use lb_tests::{
    cluster::{Cluster, KUBIA_VIP, MANIFEST_FILE, PodState, kubia_http, kubia_manifests, pod_name, ready},
    netns::ask,
};

use crate::{index_of, kubia, long_lived_connection, spread};

#[test]
fn long_lived_connection_keeps_its_backend_while_the_set_changes() {
    let cluster = Cluster::start(3, &kubia_manifests(&ready(&[0, 1, 2]))).expect("cluster");
    let (mut conn, first) = long_lived_connection(&cluster);
    let kept = index_of(&first);
    let others: Vec<usize> = (0..3).filter(|&i| i != kept).collect();

    // Another backend leaves: the connection stays where it is, and new
    // connections never reach the one that left.
    let took = cluster.set_kubia_pods(&ready(&[kept, others[1]])).expect("change applied");
    println!("removing {}: file change to maps updated in {took:?}", pod_name(others[0]));
    for _ in 0..5 {
        assert_eq!(ask(&mut conn).expect("answer"), format!("You've hit {first}"), "the long-lived connection moved");
    }
    let hits = spread(&cluster, 30);
    assert!(!hits.contains_key(&pod_name(others[0])), "a new connection reached {}, which left: {hits:?}", pod_name(others[0]));

    // Its own backend leaves: its next packet is not sent there any more.
    let received_before = cluster.pods[kept].server.tcp_bytes.load(Ordering::Relaxed);
    cluster.set_kubia_pods(&ready(&[others[1]])).expect("change applied");
    let after = ask(&mut conn);
    assert!(after.as_deref().ok() != Some(&format!("You've hit {first}")), "the connection still reached {first} after it left: {after:?}");
    assert_eq!(
        cluster.pods[kept].server.tcp_bytes.load(Ordering::Relaxed),
        received_before,
        "{first} received data after it left the service"
    );
}

/// Endpoint churn through the manifest directory, with the time from each
/// file change to the maps being updated.
#[test]
fn manifest_changes_add_and_remove_endpoints() {
    let cluster = Cluster::start(3, &kubia_manifests(&ready(&[0, 1]))).expect("cluster");
    let before = spread(&cluster, 40);
    assert!(!before.contains_key(&pod_name(2)), "kubia-3 is not an endpoint yet: {before:?}");

    let added = cluster.set_kubia_pods(&ready(&[0, 1, 2])).expect("endpoint added");
    println!("adding kubia-3: file change to maps updated in {added:?}");
    let after_add = spread(&cluster, 60);
    assert!(after_add.contains_key(&pod_name(2)), "new connections reach the added endpoint: {after_add:?}");

    let removed = cluster.set_kubia_pods(&ready(&[1, 2])).expect("endpoint removed");
    println!("removing kubia-1: file change to maps updated in {removed:?}");
    let after_remove = spread(&cluster, 60);
    assert!(!after_remove.contains_key(&pod_name(0)), "no new connection reaches the removed endpoint: {after_remove:?}");

    // Three states of the directory: the agent syncs for each, not for its
    // own reads of the files, nor in a loop.
    let syncs = cluster.agent.log().matches("synced generation=").count();
    assert!((3..=6).contains(&syncs), "{syncs} syncs for 3 states of the directory:\n{}", cluster.agent.log());
}

#[test]
fn terminating_endpoint_keeps_its_established_connection() {
    let cluster = Cluster::start(3, &kubia_manifests(&ready(&[0, 1, 2]))).expect("cluster");
    let (mut conn, first) = long_lived_connection(&cluster);
    let draining = index_of(&first);
    let mut pods = ready(&[0, 1, 2]);
    pods[draining].1 = PodState::Terminating;
    let took = cluster.set_kubia_pods(&pods).expect("change applied");
    println!("{first} terminating: file change to maps updated in {took:?}");
    for _ in 0..5 {
        assert_eq!(ask(&mut conn).expect("the terminating pod still answers"), format!("You've hit {first}"));
    }
    let hits = spread(&cluster, 40);
    assert!(!hits.contains_key(&first), "no new connection reaches the terminating {first}: {hits:?}");
}

/// A UDP socket of the client whose flow through the VIP's DNS port was
/// placed on `pod`: datagrams from one source port until one answers from
/// there (the choice is random: 1 in 3 each time).
fn udp_flow_to(cluster: &Cluster, pod: &str) -> UdpSocket {
    let pod = pod.to_owned();
    cluster
        .client
        .enter(move || {
            let vip = SocketAddrV4::new(KUBIA_VIP, 53);
            for _ in 0..100 {
                let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
                socket.set_read_timeout(Some(lb_tests::netns::scaled(Duration::from_secs(3)))).expect("timeout");
                if udp_ask_on(&socket, vip).expect("an answer") == pod {
                    return socket;
                }
            }
            panic!("100 UDP flows and none placed on {pod}");
        })
        .expect("client")
}

/// One datagram to `vip` from `socket`, and the pod that answered.
fn udp_ask_on(socket: &UdpSocket, vip: SocketAddrV4) -> std::io::Result<String> {
    socket.send_to(b"query", vip)?;
    let mut buf = [0u8; 256];
    let (n, from) = socket.recv_from(&mut buf)?;
    assert_eq!(from, std::net::SocketAddr::V4(vip), "the answer must come from the VIP");
    Ok(String::from_utf8_lossy(&buf[..n]).trim_end().trim_start_matches("You've hit ").to_owned())
}

#[test]
fn held_tcp_connection_survives_its_endpoint_turning_not_ready_then_terminating() {
    let cluster = Cluster::start(3, &kubia_manifests(&ready(&[0, 1, 2]))).expect("cluster");
    let (mut conn, first) = long_lived_connection(&cluster);
    let held = index_of(&first);
    let udp = udp_flow_to(&cluster, &first);
    let mut pods = ready(&[0, 1, 2]);
    for state in [PodState::NotReady, PodState::Terminating] {
        pods[held].1 = state;
        let took = cluster.set_kubia_pods(&pods).expect("change applied");
        println!("{first} {state:?}: file change to maps updated in {took:?}");
        for exchange in 0..5 {
            let answer = ask(&mut conn).unwrap_or_else(|e| panic!("exchange {exchange} with {first}, {state:?}: {e}"));
            assert_eq!(answer, format!("You've hit {first}"), "the held connection moved");
        }
        let hits = spread(&cluster, 40);
        assert!(!hits.contains_key(&first), "a new connection reached {first}, {state:?}: {hits:?}");
        if state == PodState::NotReady {
            // kube-proxy clears the UDP flows of an endpoint that stops
            // serving: the same socket's next datagram goes elsewhere.
            let now = udp_ask_on(&udp, SocketAddrV4::new(KUBIA_VIP, 53)).expect("an answer after the move");
            assert_ne!(now, first, "the UDP flow stayed on {first}, which stopped serving");
        }
    }
}

#[test]
fn service_deleted_from_the_directory_is_no_longer_served() {
    let cluster = Cluster::start(2, &kubia_manifests(&ready(&[0, 1]))).expect("cluster");
    assert_eq!(spread(&cluster, 10).values().sum::<usize>(), 10);
    let maps = cluster.maps().expect("pinned maps");
    let at = cluster.remove_manifest(MANIFEST_FILE).expect("remove");
    let took = maps.wait_for(kubia_http(), None, at, Duration::from_secs(20)).expect("frontend removed");
    println!("deleting the kubia service: file change to maps updated in {took:?}");
    let outcome = cluster
        .client
        .enter(|| TcpStream::connect_timeout(&std::net::SocketAddr::V4(kubia()), Duration::from_secs(5)).map(drop).map_err(|e| e.kind()))
        .expect("client");
    // No service at the address any more: the connection fails at once
    // (the node has no route for the old VIP), it neither reaches a pod nor
    // hangs.
    assert!(
        matches!(outcome, Err(ErrorKind::ConnectionRefused | ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable)),
        "{outcome:?}"
    );
}
