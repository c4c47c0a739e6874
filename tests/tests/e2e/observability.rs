//! What a running agent shows: bpftool's view of its maps, health endpoints, /metrics, lbctl.
use std::{
    net::{SocketAddrV4, TcpStream},
    time::Duration,
};

use lb_tests::{
    cluster::{Cluster, EMPTY_VIP, kubia_manifests, ready},
    netns::http_get,
};

use crate::{kubia, long_lived_connection, spread};

/// The maps a running agent pins carry BTF: bpftool prints their keys and
/// values field by field.
#[test]
fn bpftool_dumps_pinned_maps_with_field_names() {
    let cluster = Cluster::start(1, &kubia_manifests(&ready(&[0]))).expect("cluster");
    let map = cluster.bpffs.dir.join("SERVICE_FRONTENDS");
    let out = std::process::Command::new("bpftool").args(["map", "dump", "pinned"]).arg(&map).arg("-j").output().expect("bpftool");
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
    assert_eq!(entries.len(), 4, "kubia http and dns, no-endpoints http and dns");
    for entry in &entries {
        let formatted = &entry["formatted"];
        for field in ["ip", "port", "proto"] {
            assert!(formatted["key"].get(field).is_some(), "key field {field} in {entry}");
        }
        for field in ["service_id", "backend_set", "backend_count", "flags"] {
            assert!(formatted["value"].get(field).is_some(), "value field {field} in {entry}");
        }
    }
}

/// kube-proxy's health endpoints, on its port, in the node's namespace.
#[test]
fn health_endpoints_answer_on_the_node() {
    let cluster = Cluster::start(1, &kubia_manifests(&ready(&[0]))).expect("cluster");
    let get = |path: &'static str| http_get(&cluster.node, "127.0.0.1:10256", path).expect("an HTTP answer");
    let healthz = get("/healthz");
    assert!(healthz.starts_with("HTTP/1.1 200") && healthz.contains("\"ready\":true"), "{healthz}");
    assert!(get("/livez").starts_with("HTTP/1.1 200"));
    assert!(get("/nothing").starts_with("HTTP/1.1 404"));
}

/// /metrics after real traffic: the per-service counters moved by exactly
/// the traffic sent.
/// The value of `series` (name and labels) in a /metrics scrape.
fn scraped<T: std::str::FromStr>(metrics: &str, series: &str) -> T {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
}

#[test]
fn metrics_count_the_traffic_sent_through_the_vip() {
    const NEW: usize = 25;
    const REFUSED: usize = 7;
    let cluster = Cluster::start(2, &kubia_manifests(&ready(&[0, 1]))).expect("cluster");
    let hits = spread(&cluster, NEW);
    assert_eq!(hits.values().sum::<usize>(), NEW);
    cluster
        .client
        .enter(|| {
            for _ in 0..REFUSED {
                let refused = TcpStream::connect_timeout(&std::net::SocketAddr::V4(SocketAddrV4::new(EMPTY_VIP, 80)), Duration::from_secs(5));
                assert!(refused.is_err());
            }
        })
        .expect("client");
    let metrics = http_get(&cluster.node, "127.0.0.1:10249", "/metrics").expect("a scrape");
    let value = |series: &str| -> u64 { scraped(&metrics, series) };
    let kubia = r#"{namespace="default",service="kubia",port="http",protocol="TCP",traffic="internal",ip_family="IPv4"}"#;
    let empty = r#"{namespace="default",service="no-endpoints",port="http",protocol="TCP",traffic="internal",ip_family="IPv4"}"#;
    assert_eq!(value(&format!("lb_service_new_connections_total{kubia}")), NEW as u64);
    assert_eq!(value(&format!("lb_service_rejected_total{empty}")), REFUSED as u64);
    assert_eq!(value(&format!("lb_service_new_connections_total{empty}")), 0);
    // Each HTTP exchange: at least SYN, ACK, request, FIN out and SYN-ACK,
    // response, FIN back; every packet at least a 20-byte IP and TCP header.
    let packets = value(&format!("lb_service_packets_total{kubia}"));
    assert!(packets >= 7 * NEW as u64, "{packets} packets for {NEW} exchanges");
    assert!(value(&format!("lb_service_bytes_total{kubia}")) >= packets * 40);
    assert_eq!(value(r#"lb_packets_total{verdict="forward_new"}"#), NEW as u64);
    assert_eq!(value(r#"lb_packets_total{verdict="reject_no_backend"}"#), REFUSED as u64);
    // Conntrack entries as the garbage collector last counted them (it
    // passes every few seconds): a connection held open among them.
    let (_held, _) = long_lived_connection(&cluster);
    let established = |metrics: &str| -> u64 {
        let series = r#"lb_conntrack_entries{protocol="TCP",state="established"} "#;
        metrics.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    let mut scraped = metrics.clone();
    while established(&scraped) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        scraped = http_get(&cluster.node, "127.0.0.1:10249", "/metrics").expect("a scrape");
    }
    assert_eq!(established(&scraped), 2, "the held connection's two entries, established");
    assert_eq!(value("lb_services"), 4);
    assert_eq!(value("lb_backends"), 4);
}

/// kube-proxy's metric names, so that its dashboards and alerts work: after
/// a change and traffic, each is served with a value that says the syncs
/// happened.
#[test]
fn kube_proxy_metric_names_are_served() {
    let cluster = Cluster::start(2, &kubia_manifests(&ready(&[0, 1]))).expect("cluster");
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    cluster.set_kubia_pods(&ready(&[0])).expect("a change applied");
    assert_eq!(spread(&cluster, 5).values().sum::<usize>(), 5);
    let metrics = http_get(&cluster.node, "127.0.0.1:10249", "/metrics").expect("a scrape");
    let value = |series: &str| -> f64 { scraped(&metrics, series) };
    assert!(value("kubeproxy_sync_proxy_rules_duration_seconds_count") >= 2.0, "the first sync and the change");
    assert!(value("kubeproxy_network_programming_duration_seconds_count") >= 2.0);
    assert!(value("kubeproxy_sync_proxy_rules_last_timestamp_seconds") >= before, "the change's sync is the last");
    assert!(value("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") >= before - 1.0);
    assert!(value("kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 2.0, "the first slice and its new version");
    assert!(value("kubeproxy_sync_proxy_rules_service_changes_total") >= 2.0, "kubia and no-endpoints");
    assert_eq!(value(r#"kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy="internal"}"#), 0.0);
    assert_eq!(value(r#"kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy="external"}"#), 0.0);
}

/// lbctl against a running agent: its services with their endpoints, the
/// flows of the traffic sent, the counters; as JSON and as a table.
#[test]
fn lbctl_shows_services_flows_and_counters_of_a_running_agent() {
    const NEW: usize = 12;
    let cluster = Cluster::start(2, &kubia_manifests(&ready(&[0, 1]))).expect("cluster");
    assert_eq!(spread(&cluster, NEW).values().sum::<usize>(), NEW);
    let lbctl = lb_tests::netns::userspace_binary("lbctl").expect("lbctl");
    let run = |args: &[&str]| -> String {
        let out = std::process::Command::new(&lbctl).arg("--bpffs-dir").arg(&cluster.bpffs.dir).args(args).output().expect("lbctl runs");
        assert!(out.status.success(), "lbctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&run(&all)).expect("JSON")
    };

    let services = json(&["services"]);
    let kubia = services.as_array().expect("a list").iter().find(|s| s["name"] == "default/kubia:http").expect("kubia:http");
    assert_eq!(kubia["frontends"], serde_json::json!(["10.96.0.10:80/TCP"]));
    assert_eq!(kubia["backends"], serde_json::json!(["10.244.1.2:8080", "10.244.2.2:8080"]));
    assert_eq!(kubia["new_connections"], NEW);
    let empty = services.as_array().expect("a list").iter().find(|s| s["name"] == "default/no-endpoints:http").expect("no-endpoints");
    assert_eq!(empty["backends"], serde_json::json!([]));

    let flows = json(&["conntrack", "--filter", "10.201.0.2"]);
    let flows = flows.as_array().expect("a list");
    let forward = flows.iter().filter(|f| f["direction"] == "forward" && f["destination"] == "10.96.0.10:80").count();
    let replies = flows.iter().filter(|f| f["direction"] == "reply" && f["translated_source"] == "10.96.0.10:80").count();
    assert_eq!((forward, replies), (NEW, NEW), "one forward and one reply entry per connection");
    assert!(flows.iter().all(|f| f["service"] == "default/kubia:http"));

    assert_eq!(json(&["counters"])["forward_new"], NEW);

    let table = run(&["services"]);
    let line = table.lines().find(|l| l.starts_with("default/kubia:http")).unwrap_or_else(|| panic!("{table}"));
    assert!(line.contains("10.244.1.2:8080,10.244.2.2:8080"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("default/no-endpoints:http") && l.contains("<none>")), "{table}");

    let missing = std::process::Command::new(&lbctl).args(["--bpffs-dir", "/nonexistent", "services"]).output().expect("lbctl runs");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("is lb-agent running with --bpffs-dir"));
}

/// lbctl explain runs the real program on a copy of the live maps: it names
/// the service, the backend and the reason, and changes nothing live.
#[test]
fn lbctl_explain_answers_without_changing_the_live_maps() {
    let cluster = Cluster::start(2, &kubia_manifests(&ready(&[0, 1]))).expect("cluster");
    assert_eq!(spread(&cluster, 3).values().sum::<usize>(), 3);
    let lbctl = lb_tests::netns::userspace_binary("lbctl").expect("lbctl");
    let json = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(&lbctl)
            .arg("--bpffs-dir")
            .arg(&cluster.bpffs.dir)
            .args(args)
            .args(["-o", "json"])
            .output()
            .expect("lbctl runs");
        assert!(out.status.success(), "lbctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    // ARP and IPv6 neighbour discovery on the veths keep counting
    // pass_not_ip and pass_not_service meanwhile; every other verdict must
    // stand still.
    let ipv4_verdicts = |mut counters: serde_json::Value| {
        if let Some(c) = counters.as_object_mut() {
            c.remove("pass_not_ip");
            c.remove("pass_not_service");
        }
        counters
    };
    // A connection held open: closed ones expire after the close lifetime,
    // which a slow (emulated) machine can outlast before the question.
    let held = cluster
        .client
        .enter(|| {
            let mut conn = TcpStream::connect(kubia())?;
            conn.set_read_timeout(Some(lb_tests::netns::scaled(Duration::from_secs(3))))?;
            lb_tests::netns::ask(&mut conn).map(|_| conn)
        })
        .expect("client")
        .expect("a held connection");
    // The closed connections' last FINs and ACKs may still be on their
    // way: the counters are read once they stand still.
    let mut counters_before = ipv4_verdicts(json(&["counters"]));
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let again = ipv4_verdicts(json(&["counters"]));
        if again == counters_before {
            break;
        }
        counters_before = again;
    }
    let flows_before = json(&["conntrack"]).as_array().map(Vec::len);

    let new = json(&["explain", "10.201.0.2:45000", "10.96.0.10:80", "tcp"]);
    assert_eq!((new["verdict"].as_str(), new["service"].as_str()), (Some("forward_new"), Some("default/kubia:http")), "{new}");
    assert!(matches!(new["backend"].as_str(), Some("10.244.1.2:8080" | "10.244.2.2:8080")), "{new}");

    let source = held.local_addr().expect("local address").to_string();
    let flow = json(&["conntrack", "--filter", &source])
        .as_array()
        .and_then(|f| f.iter().find(|f| f["direction"] == "forward").cloned())
        .expect("the held connection's tracked flow");
    let established = json(&["explain", &source, "10.96.0.10:80", "tcp"]);
    assert_eq!(established["verdict"], "forward_established", "{established}");
    assert_eq!(established["backend"], flow["translated_destination"], "the tracked flow's own backend");

    let cases = [
        (["explain", "10.201.0.2", "10.96.0.11:80", "tcp"], "reject_no_backend", "bounce"),
        (["explain", "10.201.0.2", "10.96.0.11:53", "udp"], "reject_no_backend", "bounce"),
        (["explain", "10.201.0.2", "10.96.0.10:81", "tcp"], "reject_unknown_port", "bounce"),
        (["explain", "10.201.0.2", "10.0.0.9:80", "tcp"], "pass_not_service", "pass"),
    ];
    for (args, verdict, action) in cases {
        let answer = json(&args);
        assert_eq!((answer["verdict"].as_str(), answer["action"].as_str()), (Some(verdict), Some(action)), "{args:?}: {answer}");
    }

    assert_eq!(ipv4_verdicts(json(&["counters"])), counters_before, "explain counted nothing live");
    // The probe's own flow (client port 45000) is not tracked live; the
    // connections' closed flows may meanwhile have been collected.
    let probed = json(&["conntrack", "--filter", "10.201.0.2:45000"]);
    assert_eq!(probed.as_array().map(Vec::len), Some(0), "explain tracked nothing live: {probed}");
    assert!(json(&["conntrack"]).as_array().map(Vec::len) <= flows_before, "explain added no flow");
    drop(held);
}
