//! Long runs: many sequential connections through a node port, endpoint churn under load, the soak with restarts.
use std::{
    net::{SocketAddrV4, TcpStream},
    sync::atomic::Ordering,
    time::Duration,
};

use lb_tests::{
    cluster::{ClientHook, Cluster, KUBIA_VIP, MANIFEST_FILE, PodState, kubia_manifests, pod_name, ready},
    netns::{ask, connect_and_ask, udp_ask},
};

use crate::kubia;

/// A NodePort service with externalTrafficPolicy Cluster (the default) and
/// one endpoint, kubia-1, on node port 30125.
fn one_endpoint_node_port() -> String {
    use lb_tests::cluster::{NODE_NAME, pod_ip};
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: churn, namespace: default}}\n\
         spec:\n  type: NodePort\n  clusterIP: 10.96.0.125\n  selector: {{app: kubia}}\n  \
         ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: 30125, protocol: TCP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: churn-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: churn}}\naddressType: IPv4\n\
         ports:\n- {{name: http, port: 8080, protocol: TCP}}\n\
         endpoints:\n- {{addresses: [\"{}\"], conditions: {{ready: true}}, nodeName: {NODE_NAME}}}\n",
        pod_ip(0),
    )
}

/// Opens `count` short TCP connections one after another through the
/// node port (each asks once and closes), the client reusing its own ports
/// as Linux does once they leave TIME_WAIT (tcp_tw_reuse). Every one must
/// be answered, at most `max_stalls` after a retransmitted SYN (over
/// 900 ms), and no source NAT port may run out: closed flows give their
/// ports back at once.
fn sequential_connections_through_a_node_port(snat_port_range: &str, count: usize, max_stalls: usize) {
    use lb_tests::cluster::{NODE_IP, TempDir, Topology};
    let net = Topology::new(1, ClientHook::Tc).expect("namespaces");
    net.client.sysctl("net.ipv4.tcp_tw_reuse", "1").expect("sysctl");
    let manifests = TempDir::new("manifests").expect("dir");
    std::fs::write(manifests.0.join(MANIFEST_FILE), one_endpoint_node_port()).expect("manifest");
    let source = ["--manifests", &manifests.0.to_string_lossy(), "--snat-port-range", snat_port_range].map(str::to_owned).to_vec();
    let cluster = Cluster::run_agent(net, source, Some(manifests)).expect("agent");
    let (failures, stalls, elapsed) = cluster
        .client
        .enter(move || {
            let started = std::time::Instant::now();
            let mut failures = Vec::new();
            let mut stalls = Vec::new();
            for i in 0..count {
                let asked = std::time::Instant::now();
                match connect_and_ask(SocketAddrV4::new(NODE_IP, 30125)) {
                    Ok(answer) if answer == format!("You've hit {}", pod_name(0)) => {}
                    other => failures.push(format!("connection {i}: {other:?}")),
                }
                if asked.elapsed() > lb_tests::netns::scaled(Duration::from_millis(900)) {
                    stalls.push((i, asked.elapsed()));
                }
            }
            (failures, stalls, started.elapsed())
        })
        .expect("client");
    let maps = cluster.maps().expect("pinned maps");
    let no_port = maps.verdict_count(lb_common::Reason::DropNoSnatPort).expect("counters");
    let new_flows = maps.verdict_count(lb_common::Reason::ForwardNew).expect("counters");
    println!(
        "{count} sequential connections through a Cluster-policy node port, --snat-port-range {snat_port_range}: {} failed, \
         {:.0} connections/s, {} after a retransmitted SYN {stalls:?}, {new_flows} new flows, {no_port} dropped for want of a source NAT port",
        failures.len(),
        count as f64 / elapsed.as_secs_f64(),
        stalls.len(),
    );
    assert!(failures.is_empty(), "{} of {count} failed; first: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    assert_eq!(no_port, 0, "no new flow may lack a source NAT port");
    assert!(stalls.len() <= max_stalls, "{} connections waited for a retransmitted SYN: {stalls:?}", stalls.len());
    // Every connection is a new flow, placed afresh. As many more as
    // stalls are allowed: a connection whose first SYN went unanswered can
    // be reset by its client and placed afresh when the SYN comes again.
    assert!(
        (count as u64..=(count + max_stalls) as u64).contains(&new_flows),
        "{new_flows} new flows for {count} connections: each is placed afresh, at most {max_stalls} twice"
    );
}

#[test]
fn fifty_thousand_sequential_connections_through_a_cluster_policy_node_port() {
    // Before the garbage collector stopped deleting entries that new flows
    // had just taken, a few connections in 50,000 waited for a retransmitted
    // SYN; since, none in 68,000 on this machine's kernel. Two are allowed
    // for a slow moment of a shared machine.
    sequential_connections_through_a_node_port("61000-65535", 50_000, 2);
}

#[test]
fn a_hundred_port_source_nat_range_serves_two_thousand_sequential_connections() {
    // Each port serves the pod again every 100 connections. About one run
    // in three used to have a connection wait for a retransmitted SYN (the
    // garbage collector's race, docs/reliability.md); none in nine runs
    // since. Four of 2,000 are allowed, as above.
    sequential_connections_through_a_node_port("62000-62099", 2_000, 4);
}

/// Endpoint churn under load: kubia-1 stays ready while kubia-2 and
/// kubia-3 in turn step through ready, terminating, gone, ready, not
/// ready, one change every 100 ms, and a client keeps opening TCP
/// connections and UDP exchanges (a new socket each) through the cluster
/// IP. No request fails, and once an endpoint stops
/// taking new connections (terminating, not ready or gone) none reaches it
/// later than a second after the change; the longest such delay is
/// printed. `LB_CHURN_SECONDS` sets the length (default 10).
#[test]
fn endpoint_churn_under_load_fails_no_request() {
    use std::sync::{Arc, Mutex, atomic::AtomicBool};
    type Answers = Arc<Mutex<Vec<(std::time::Instant, bool, Result<String, String>)>>>;
    let seconds: u64 = std::env::var("LB_CHURN_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let cluster = Cluster::start(3, &kubia_manifests(&ready(&[0, 1, 2]))).expect("cluster");
    // Thousands of connections a second outrun the client's ephemeral
    // ports while they sit in TIME_WAIT; reuse them, as busy clients do.
    cluster.client.sysctl("net.ipv4.tcp_tw_reuse", "1").expect("sysctl");
    let done = Arc::new(AtomicBool::new(false));
    // (when the request began, whether it was a TCP connection, who
    // answered, or the error).
    let answers: Answers = Arc::default();
    let ask_tcp = || connect_and_ask(kubia());
    let ask_udp = || udp_ask(SocketAddrV4::new(KUBIA_VIP, 53));
    let clients: Vec<_> = [(true, ask_tcp as fn() -> std::io::Result<String>), (false, ask_udp)]
        .into_iter()
        .map(|(tcp, ask)| {
            let (done, answers) = (done.clone(), answers.clone());
            cluster
                .client
                .spawn_thread(move || {
                    while !done.load(Ordering::Relaxed) {
                        let opened = std::time::Instant::now();
                        let answer = ask().map(|a| a.trim_start_matches("You've hit ").to_owned()).map_err(|e| e.to_string());
                        answers.lock().expect("answers").push((opened, tcp, answer));
                        if !tcp {
                            // About a thousand exchanges a second: load, not a flood.
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                })
                .expect("client")
        })
        .collect();
    // Each churned pod's state: None is gone from the slice.
    let cycle = [Some(PodState::Ready), Some(PodState::Terminating), None, Some(PodState::Ready), Some(PodState::NotReady)];
    let mut position = [0usize, 0, 0];
    // (when, pod, whether it takes new connections from then on).
    let mut changes: Vec<(std::time::Instant, usize, bool)> = Vec::new();
    let started = std::time::Instant::now();
    let mut step = 0usize;
    while started.elapsed() < Duration::from_secs(seconds) {
        let churned = 1 + step % 2;
        position[churned] = (position[churned] + 1) % cycle.len();
        let mut pods = vec![(0, PodState::Ready)];
        pods.extend([1, 2].into_iter().filter_map(|pod| cycle[position[pod]].map(|state| (pod, state))));
        let at = cluster.write_manifest(MANIFEST_FILE, &kubia_manifests(&pods)).expect("manifest");
        changes.push((at, churned, cycle[position[churned]] == Some(PodState::Ready)));
        std::thread::sleep(Duration::from_millis(100));
        step += 1;
    }
    done.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().expect("client thread");
    }
    let answers = answers.lock().expect("answers").clone();
    let failed: Vec<_> = answers.iter().filter(|(_, _, a)| a.is_err()).collect();
    // For each new TCP connection a churned pod answered: how long the pod
    // had been out of service when the connection was opened. (A UDP
    // exchange from a new socket can reuse a live flow's ports, and a live
    // flow keeps a serving endpoint, as with kube-proxy's conntrack.)
    let mut worst = Duration::ZERO;
    for (opened, _, answer) in answers.iter().filter(|(_, tcp, _)| *tcp) {
        let Ok(pod) = answer else { continue };
        let Some(index) = (1..3).find(|&i| pod_name(i) == *pod) else { continue };
        let before: Vec<_> = changes.iter().filter(|(at, p, _)| *p == index && at <= opened).collect();
        if before.last().is_some_and(|(_, _, takes)| !takes) {
            let out_since = before.iter().rev().take_while(|(_, _, takes)| !takes).last().map(|(at, _, _)| *at);
            if let Some(out_since) = out_since {
                worst = worst.max(opened.duration_since(out_since));
            }
        }
    }
    println!(
        "endpoint churn for {seconds} s ({} changes): {} TCP connections and {} UDP exchanges, {} failed; \
         the longest an endpoint out of service still got new connections: {worst:?}",
        changes.len(),
        answers.iter().filter(|(_, tcp, _)| *tcp).count(),
        answers.iter().filter(|(_, tcp, _)| !tcp).count(),
        failed.len()
    );
    assert!(failed.is_empty(), "{} requests failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    assert!(answers.len() > 100, "the client kept asking: {}", answers.len());
    assert!(worst < lb_tests::netns::scaled(Duration::from_secs(1)), "an endpoint out of service got new connections for {worst:?}");
}

/// Soak: mixed traffic through a cluster IP and a node port while the agent
/// is restarted every `LB_SOAK_RESTART_SECONDS` (default 10) and the
/// manifest changes every second (kubia-3 between ready and terminating,
/// so no connection has to move), for `LB_SOAK_SECONDS` (default 30;
/// docs/reliability.md has a 10-minute run with restarts every 30 s).
/// 0 broken established connections, 0 refused or failed new ones, and the
/// agent's resident memory printed at the start and the end, the end under
/// twice the start.
#[test]
fn soak_with_restarts_and_manifest_changes_breaks_nothing() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize},
    };
    let seconds: u64 = std::env::var("LB_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let restart_every: u64 = std::env::var("LB_SOAK_RESTART_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let node_port = "apiVersion: v1\nkind: Service\nmetadata: {name: kubia-np, namespace: default}\nspec:\n  type: NodePort\n  \
                     clusterIP: 10.96.0.90\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30500}]\n---\n\
                     apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: kubia-np-1, namespace: default, labels: {kubernetes.io/service-name: kubia-np}}\n\
                     addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [\"10.244.1.2\"]}, {addresses: [\"10.244.2.2\"]}]\n";
    let mut cluster = Cluster::start_with(3, &[(MANIFEST_FILE, &kubia_manifests(&ready(&[0, 1, 2]))), ("np.yaml", node_port)], ClientHook::Tc).expect("cluster");
    // A busy client reuses its ports in TIME_WAIT: over ten minutes the
    // new connections would outrun its ephemeral range otherwise.
    cluster.client.sysctl("net.ipv4.tcp_tw_reuse", "1").expect("sysctl");
    let rss_start = cluster.agent.resident_kb().expect("memory");
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicUsize::new(0));
    // Held connections through the cluster IP, asked in turn all along.
    let held = {
        let (stop, requests) = (stop.clone(), requests.clone());
        cluster
            .client
            .spawn_thread(move || {
                let mut conns: Vec<(TcpStream, String, Option<String>)> = (0..10)
                    .map(|_| {
                        let mut conn = TcpStream::connect(kubia()).expect("connect");
                        conn.set_read_timeout(Some(lb_tests::netns::scaled(Duration::from_secs(3)))).expect("timeout");
                        let first = ask(&mut conn).expect("first answer");
                        (conn, first, None)
                    })
                    .collect();
                while !stop.load(Ordering::Relaxed) {
                    for (conn, first, broken) in conns.iter_mut().filter(|c| c.2.is_none()) {
                        match ask(conn) {
                            Ok(answer) if answer == *first => {
                                requests.fetch_add(1, Ordering::Relaxed);
                            }
                            other => *broken = Some(format!("was {first}, then {other:?}")),
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                conns.into_iter().filter_map(|c| c.2).collect::<Vec<_>>()
            })
            .expect("held connections")
    };
    let soak_start = std::time::Instant::now();
    let soak_start_wall = std::time::SystemTime::now();
    // New TCP connections to the cluster IP and the node port, and UDP
    // exchanges to the cluster IP, in turn.
    let fresh = {
        let (stop, requests) = (stop.clone(), requests.clone());
        cluster
            .client
            .spawn_thread(move || {
                let node_port = SocketAddrV4::new(lb_tests::cluster::NODE_IP, 30500);
                // (through the node port, when, what failed).
                let mut failures: Vec<(bool, Duration, String)> = Vec::new();
                let mut turn = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let asked_at = soak_start.elapsed();
                    let outcome = match turn % 3 {
                        0 => connect_and_ask(kubia()),
                        1 => connect_and_ask(node_port),
                        _ => udp_ask(SocketAddrV4::new(KUBIA_VIP, 53)),
                    };
                    match outcome {
                        Ok(answer) if answer.starts_with("You've hit kubia-") => {
                            requests.fetch_add(1, Ordering::Relaxed);
                        }
                        other => failures.push((turn % 3 == 1, asked_at, format!("request {turn}: {other:?}"))),
                    }
                    turn += 1;
                }
                (turn, failures)
            })
            .expect("new connections")
    };
    let started = soak_start;
    let mut restarts = 0;
    // When each restart stopped the old agent and had the new one ready.
    let mut restart_times: Vec<(Duration, Duration)> = Vec::new();
    let mut second = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        second += 1;
        let mut pods = ready(&[0, 1, 2]);
        if second % 2 == 1 {
            pods[2].1 = PodState::Terminating;
        }
        cluster.write_manifest(MANIFEST_FILE, &kubia_manifests(&pods)).expect("manifest");
        if second.is_multiple_of(restart_every) {
            let restart = cluster.restart_agent().expect("restart");
            restart_times.push((restart.stopped - started, restart.ready - started));
            restarts += 1;
        }
        let next = started + Duration::from_secs(second);
        std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
    }
    let rss_end = cluster.agent.resident_kb().expect("memory");
    stop.store(true, Ordering::Relaxed);
    let broken = held.join().expect("held connections");
    let (turns, failures) = fresh.join().expect("new connections");
    // Each failure with its time and where it fell against the restarts.
    for (node_port, at, what) in &failures {
        let last = restart_times.iter().rev().find(|(stopped, _)| stopped <= at);
        let since = last.map(|(stopped, ready)| format!("{:?} after restart stop, {:?} after ready", *at - *stopped, at.saturating_sub(*ready)));
        let wall = (soak_start_wall + *at).duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let kind = if *node_port { "node port" } else { "cluster IP" };
        let since = since.unwrap_or_else(|| "before any restart".into());
        println!("failed, asked at {at:?} (unix {:.3}, {kind}): {what}; {since}", wall.as_secs_f64());
    }
    let (node_port_failures, other_failures): (Vec<_>, Vec<_>) = failures.into_iter().map(|(node_port, _, what)| (node_port, what)).partition(|(node_port, _)| *node_port);
    println!(
        "soak for {seconds} s: {} requests, {restarts} agent restarts, {second} manifest changes; {} held connections broken, \
         {} new requests failed through the node port and {} otherwise; agent resident memory {rss_start} kB at the start, {rss_end} kB at the end",
        requests.load(Ordering::Relaxed),
        broken.len(),
        node_port_failures.len(),
        other_failures.len()
    );
    assert!(broken.is_empty(), "held connections broke: {broken:?}");
    // Every failure counts, through the node port as elsewhere: the
    // source-translated connections the garbage collector used to break
    // (about 1 in 100,000, docs/reliability.md) are fixed.
    let failed: Vec<&String> = node_port_failures.iter().chain(&other_failures).map(|(_, what)| what).collect();
    assert!(failed.is_empty(), "{} of {turns} new requests failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    assert!(restarts >= 2, "the agent was restarted during the soak");
    assert!(rss_end < 2 * rss_start, "agent memory grew from {rss_start} kB to {rss_end} kB");
}
