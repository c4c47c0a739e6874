//! End-to-end tests: the real agent between real clients and servers.
//!
//! Real TCP (HTTP) and UDP clients and servers in veth network namespaces, with
//! the real `lb-agent` in the node namespace reading a directory of manifests.
//! Needs root. Each test builds its own uniquely named namespaces, bpf
//! filesystem and manifest directory, and removes them when it ends, passing or
//! failing.
//!
//! The tests are grouped by feature, one module each; the helpers below are
//! shared by several of them.
mod affinity;
mod cluster_ip;
mod dual_stack;
mod endpoints;
mod load_balancer;
mod long_running;
mod node_port;
mod observability;
mod refusals;
mod restart;
mod scale;
mod socket_lb;

use std::{
    collections::BTreeMap,
    net::{SocketAddrV4, TcpStream},
    time::Duration,
};

use lb_tests::{
    cluster::{Cluster, KUBIA_VIP, MANIFEST_FILE, kubia_manifests, pod_name, ready},
    netns::{ask, connect_and_ask},
};

fn kubia() -> SocketAddrV4 {
    SocketAddrV4::new(KUBIA_VIP, 80)
}

/// `count` new connections through the VIP from the client; who answered.
fn spread(cluster: &Cluster, count: usize) -> BTreeMap<String, usize> {
    cluster
        .client
        .enter(move || {
            let mut hits = BTreeMap::<String, usize>::new();
            for _ in 0..count {
                let answer = connect_and_ask(kubia()).expect("request through the VIP");
                *hits.entry(answer.trim_start_matches("You've hit ").to_owned()).or_default() += 1;
            }
            hits
        })
        .expect("client")
}

fn long_lived_connection(cluster: &Cluster) -> (TcpStream, String) {
    cluster
        .client
        .enter(|| {
            let mut conn = TcpStream::connect(kubia()).expect("connect");
            conn.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
            let first = ask(&mut conn).expect("first answer");
            (conn, first.trim_start_matches("You've hit ").to_owned())
        })
        .expect("client")
}

fn index_of(pod: &str) -> usize {
    (0..3).find(|&i| pod_name(i) == pod).expect("answered by a pod")
}

/// The agent on `net` serving kubia with the pods `ready` ready, started
/// with `flags` besides the topology's own.
fn kubia_with_flags(net: lb_tests::cluster::Topology, ready_pods: &[usize], flags: &[&str]) -> Cluster {
    let manifests = lb_tests::cluster::TempDir::new("manifests").expect("dir");
    std::fs::write(manifests.0.join(MANIFEST_FILE), kubia_manifests(&ready(ready_pods))).expect("manifest");
    let mut source = vec!["--manifests".to_owned(), manifests.0.to_string_lossy().into_owned()];
    source.extend(flags.iter().map(|f| (*f).to_owned()));
    Cluster::run_agent(net, source, Some(manifests)).expect("agent")
}

/// Whether the running agent uses a kernel feature, as `lbctl kernel`
/// reports it.
fn kernel_feature_in_use(cluster: &Cluster, feature: &str) -> bool {
    let kernel: serde_json::Value = serde_json::from_str(&cluster.lbctl(&["kernel", "-o", "json"]).expect("lbctl")).expect("JSON");
    let listed = kernel.as_array().expect("a list").iter().find(|f| f["feature"] == feature).cloned();
    listed.unwrap_or_else(|| panic!("{feature} not listed: {kernel}"))["in_use"] == true
}

fn connect_and_ask_from_client(cluster: &Cluster) -> Result<String, String> {
    cluster.client.enter(|| connect_and_ask(kubia()).map_err(|e| e.to_string())).expect("client")
}
