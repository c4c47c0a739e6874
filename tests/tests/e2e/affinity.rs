//! sessionAffinity ClientIP: sticking to one backend until the timeout, for a client and for the node's own processes.
use std::{collections::BTreeSet, time::Duration};

use lb_tests::cluster::{Cluster, kubia_manifests, ready};

use crate::spread;

/// sessionAffinity ClientIP with a one-second timeout: 15 consecutive new
/// connections land on one pod; after a second without connections the
/// affinity has expired and the next connection is placed afresh, so over a
/// few such pauses the connections reach more than one pod.
#[test]
fn session_affinity_sticks_until_its_timeout() {
    let manifests = kubia_manifests(&ready(&[0, 1, 2])).replacen(
        "  selector: {app: kubia}\n",
        "  selector: {app: kubia}\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n",
        1,
    );
    let cluster = Cluster::start(3, &manifests).expect("cluster");
    let sticky = spread(&cluster, 15);
    println!("15 connections with ClientIP affinity: {sticky:?}");
    assert_eq!(sticky.len(), 1, "all on one pod: {sticky:?}");

    // The node's own processes (socket programs) are one client too.
    for pod in &cluster.pods {
        pod.server.peers.lock().expect("peers").clear();
    }
    let script = "for i in $(seq 15); do exec 3<>/dev/tcp/10.96.0.10/80 && exec 3<&-; done";
    cluster.cgroup.run_in(&cluster.node, script).expect("node-local connections");
    let node_peers = |pod: &lb_tests::cluster::Pod| pod.server.peers.lock().expect("peers").len();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while cluster.pods.iter().map(node_peers).sum::<usize>() < 15 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let reached: Vec<usize> = cluster.pods.iter().map(node_peers).collect();
    assert_eq!(reached.iter().filter(|&&n| n > 0).count(), 1, "the node's 15 connections on one pod: {reached:?}");
    assert_eq!(reached.iter().sum::<usize>(), 15, "{reached:?}");

    let mut after_timeouts = BTreeSet::new();
    for _ in 0..10 {
        // Waiting out the timeout is the point: a connection meanwhile would
        // renew the affinity.
        std::thread::sleep(Duration::from_millis(1300));
        after_timeouts.extend(spread(&cluster, 1).into_keys());
        if after_timeouts.len() > 1 {
            break;
        }
    }
    println!("first connections after each timeout reached {after_timeouts:?}");
    assert!(after_timeouts.len() > 1, "after the timeout, connections are placed afresh: {after_timeouts:?}");
}
