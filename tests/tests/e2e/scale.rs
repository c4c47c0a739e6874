//! Large state: 30,000 services over the backend slot limit, full conntrack tables, deleting a service with 100,000 flows.
use std::{net::SocketAddrV4, sync::atomic::Ordering, time::Duration};

use lb_tests::{
    cluster::{ClientHook, Cluster, MANIFEST_FILE, kubia_http, kubia_manifests, ready},
    netns::http_get,
};

use crate::{connect_and_ask_from_client, kubia_with_flags};

/// `count` services in namespace `scale` (svc-00000…), each on its own
/// cluster IP (10.100.0.0 up) with one TCP port and an EndpointSlice of
/// `endpoints` addresses in 10.250.0.0/16 (never sent traffic: only the
/// maps are checked for these).
fn scale_manifests(count: u32, endpoints: u32) -> String {
    let addresses: Vec<String> = (1..=endpoints).map(|i| format!("\"{}\"", std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 250, 0, 0)) + i))).collect();
    let endpoint_list = format!("[{}]", addresses.iter().map(|a| format!("{{addresses: [{a}]}}")).collect::<Vec<_>>().join(", "));
    let mut out = String::with_capacity(count as usize * 600);
    for i in 0..count {
        let ip = scale_vip(i);
        out.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i:05}, namespace: scale}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i:05}-a, namespace: scale, labels: {{kubernetes.io/service-name: svc-{i:05}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: {endpoint_list}\n---\n"
        ));
    }
    out
}

fn scale_vip(index: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 100, 0, 0)) + index)
}

#[test]
fn thirty_thousand_services_over_a_smaller_slot_limit_keep_the_agent_serving() {
    const SERVICES: u32 = 30_000;
    const ENDPOINTS: u32 = 10;
    const SLOTS: u32 = 100_000;
    let cluster = kubia_with_flags(lb_tests::cluster::Topology::new(3, ClientHook::Tc).expect("topology"), &[0, 1, 2], &["--backend-slots-max", &SLOTS.to_string()]);
    let at = cluster.write_manifest("scale.yaml", &scale_manifests(SERVICES, ENDPOINTS)).expect("manifest");
    // kubia holds 6 slots (3 endpoints on two ports): 99,994 are left, 9,999
    // scale services fit, and the other 20,001 do not.
    let fits = (SLOTS - 6) / ENDPOINTS;
    let over = SERVICES - fits;
    let synced = cluster.agent.wait_for(&[&format!("over_capacity={over}")], lb_tests::netns::scaled(Duration::from_secs(180))).expect("the scale sync");
    println!("{SERVICES} services x {ENDPOINTS} endpoints synced {:?} after the file change: {synced}", at.elapsed());

    let maps = cluster.maps().expect("maps");
    let last_fitting = lb_common::FrontendKey::new(scale_vip(fits - 1), 80, lb_common::IPPROTO_TCP);
    assert_eq!(maps.backends(last_fitting).map(|b| b.len()), Some(ENDPOINTS as usize), "svc-{:05} fits and is programmed", fits - 1);
    let first_left_out = lb_common::FrontendKey::new(scale_vip(fits), 80, lb_common::IPPROTO_TCP);
    assert_eq!(maps.backends(first_left_out), None, "svc-{fits:05} does not fit and has no frontend");

    let log = cluster.agent.log();
    let line = format!("service port scale/svc-{fits:05}:http not programmed: backend slots: needs 10, 4 of {SLOTS} free (--backend-slots-max)");
    assert!(log.contains(&line), "the log names the service port and the limit: {line}");
    assert_eq!(log.matches("not programmed: backend slots").count(), over as usize, "one line per service port left out");
    let metrics = http_get(&cluster.node, "127.0.0.1:10249", "/metrics").expect("a scrape");
    assert!(metrics.contains(&format!("lb_service_ports_over_capacity {over}")), "the metric counts them:\n{}", metrics.lines().filter(|l| l.contains("capacity")).collect::<Vec<_>>().join("\n"));

    // The agent is still running and serving, and later changes still apply.
    assert!(connect_and_ask_from_client(&cluster).is_ok_and(|a| a.starts_with("You've hit kubia-")), "kubia is still served");
    let took = cluster.set_kubia_pods(&ready(&[0, 1])).expect("a later change is applied");
    println!("a later kubia change applied in {took:?}");
    // Room freed by removing the scale services lets nothing linger.
    let at = cluster.remove_manifest("scale.yaml").expect("removed");
    cluster.agent.wait_for(&["over_capacity=0"], lb_tests::netns::scaled(Duration::from_secs(180))).expect("the scale services removed");
    println!("30,000 services removed {:?} after the file change", at.elapsed());
    assert!(maps.backends(last_fitting).is_none(), "removed");
}

/// --service-ports-max sizes the tables indexed by service port: 2,000
/// services on a node sized for 1,024 service ports keep the agent serving
/// the ones that fit, and name the others.
#[test]
fn service_ports_beyond_the_service_ports_limit_are_named_and_the_rest_served() {
    const SERVICES: u32 = 2_000;
    const SERVICE_PORTS: u32 = 1_024;
    let cluster = kubia_with_flags(
        lb_tests::cluster::Topology::new(3, ClientHook::Tc).expect("topology"),
        &[0, 1, 2],
        &["--service-ports-max", &SERVICE_PORTS.to_string()],
    );
    for name in [lb_common::MAP_SERVICE_COUNTERS, lb_common::MAP_SERVICE_BACKEND_SETS, lb_common::MAP_SERVICE_NAMES] {
        let info = aya::maps::MapInfo::from_pin(cluster.bpffs.dir.join(name)).expect("a pinned map");
        assert_eq!(info.max_entries(), SERVICE_PORTS, "{name} is sized by --service-ports-max");
    }
    cluster.write_manifest("scale.yaml", &scale_manifests(SERVICES, 1)).expect("manifest");
    // The kubia manifests hold 4 service ports (kubia and no-endpoints,
    // two ports each), programmed first.
    let over = SERVICES - (SERVICE_PORTS - 4);
    cluster.agent.wait_for(&[&format!("over_capacity={over}")], lb_tests::netns::scaled(Duration::from_secs(120))).expect("the scale sync");
    let log = cluster.agent.log();
    assert_eq!(log.matches("not programmed: service ports").count(), over as usize, "one line per service port left out");
    assert!(log.contains("(--service-ports-max)"), "the line names the flag to raise");
    assert!(connect_and_ask_from_client(&cluster).is_ok_and(|a| a.starts_with("You've hit kubia-")), "kubia is still served");
}

/// Writes `flows` established flows of `service_id` (two entries each) into
/// the pinned table `name`, spread over every CPU (each CPU's LRU list
/// holds only its share of the table).
/// Returns how many entries went in.
fn fill_conntrack(dir: &std::path::Path, name: &'static str, proto: u8, service_id: u32, flows: u32) -> usize {
    use lb_common::{CT_FORWARD, ConntrackKey, ConntrackValue, lifecycle};
    use std::net::Ipv4Addr;
    let table = aya::maps::MapData::from_pin(dir.join(name)).expect("pinned conntrack table");
    let expires = lb_userspace::conntrack::now_ticks() + lifecycle::ticks_from_secs(3600);
    let (vip, backend) = (SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80), SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 8080));
    let entries: Vec<(ConntrackKey, ConntrackValue)> = (0..flows)
        .flat_map(|i| {
            // Clients from 100.64.0.0, 16 ports each.
            let client = SocketAddrV4::new(Ipv4Addr::from(0x6440_0000 + (i >> 4)), 1024 + (i & 0xf) as u16);
            let forward = ConntrackKey::new(client, vip, proto);
            let value = ConntrackValue {
                flow_flags: lifecycle::FLOW_SEEN_REPLY,
                expires,
                ..ConntrackValue::translating(&forward, forward.source(), backend.into(), service_id, 0, CT_FORWARD)
            };
            [(forward, value), (value.partner_key(proto), value.partner(&forward))]
        })
        .collect();
    use std::os::fd::AsFd;
    lb_userspace::conntrack::write_all_spread(table.fd().as_fd(), &entries).expect("batched writes")
}

/// The id of a programmed service port, by its "namespace/name:port".
fn service_id(dir: &std::path::Path, name: &str) -> u32 {
    let names = aya::maps::MapData::from_pin(dir.join(lb_common::MAP_SERVICE_NAMES)).expect("pinned names");
    let names: aya::maps::HashMap<_, u32, lb_common::ServiceName> = aya::maps::HashMap::try_from(aya::maps::Map::HashMap(names)).expect("hash");
    names.iter().filter_map(Result::ok).find(|(_, n)| n.as_str() == name).map(|(id, _)| id).unwrap_or_else(|| panic!("no service {name}"))
}

/// With both conntrack tables full, /metrics scrapes (and the garbage
/// collector's passes over a million entries) never hold up /healthz: the
/// collector counts the tables on its own thread, and a scrape reads its
/// figures.
#[test]
fn healthz_answers_within_50_ms_while_metrics_are_scraped_with_full_tables() {
    use lb_common::{IPPROTO_TCP, IPPROTO_UDP, MAP_CONNTRACK_TCP, MAP_CONNTRACK_UDP, MAX_CONNTRACK_ENTRIES};
    let cluster = Cluster::start(1, &kubia_manifests(&ready(&[0]))).expect("cluster");
    let dir = cluster.bpffs.dir.clone();
    let written = fill_conntrack(&dir, MAP_CONNTRACK_TCP, IPPROTO_TCP, 0, MAX_CONNTRACK_ENTRIES / 2)
        + fill_conntrack(&dir, MAP_CONNTRACK_UDP, IPPROTO_UDP, 0, MAX_CONNTRACK_ENTRIES / 2);
    let full = |metrics: &str| -> u64 {
        metrics.lines().filter(|l| l.starts_with("lb_conntrack_entries{")).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
    };
    let scrapes = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    let (slowest, counted) = std::thread::scope(|scope| {
        let scraper = scope.spawn(|| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let mut counted = 0;
            // Until the collector has counted the filled tables (its first
            // pass after the fill), and for a few scrapes after.
            while std::time::Instant::now() < deadline && (counted < written as u64 * 9 / 10 || scrapes.load(Ordering::Relaxed) < 20) {
                let metrics = http_get(&cluster.node, "127.0.0.1:10249", "/metrics").expect("a scrape");
                counted = counted.max(full(&metrics));
                scrapes.fetch_add(1, Ordering::Relaxed);
            }
            done.store(true, Ordering::Relaxed);
            counted
        });
        let mut slowest = Duration::ZERO;
        while !done.load(Ordering::Relaxed) {
            let asked = std::time::Instant::now();
            let healthz = http_get(&cluster.node, "127.0.0.1:10256", "/healthz").expect("/healthz");
            assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
            slowest = slowest.max(asked.elapsed());
        }
        (slowest, scraper.join().expect("scraper"))
    });
    let metrics = http_get(&cluster.node, "127.0.0.1:10249", "/metrics").expect("a scrape");
    let gc_seconds = metrics.lines().find_map(|l| l.strip_prefix("lb_conntrack_gc_duration_seconds ")).unwrap_or("?").to_owned();
    println!(
        "{written} conntrack entries: {} scrapes, slowest /healthz {slowest:?}, entries counted {counted}, last garbage collection pass {gc_seconds} s",
        scrapes.load(Ordering::Relaxed)
    );
    assert!(counted >= written as u64 * 9 / 10, "the collector counted {counted} of {written} entries");
    assert!(slowest < lb_tests::netns::scaled(Duration::from_millis(50)), "/healthz took {slowest:?} during scrapes");
}

/// Deleting a service purges its tracked flows with batched map calls: the
/// time from the manifest's removal until the frontend and its 100,000
/// flows are gone is printed, and nothing of it is left.
#[test]
fn deleting_a_service_with_100000_flows_purges_them() {
    use lb_common::{IPPROTO_TCP, MAP_CONNTRACK_TCP};
    let cluster = Cluster::start(1, &kubia_manifests(&ready(&[0]))).expect("cluster");
    let dir = cluster.bpffs.dir.clone();
    let id = service_id(&dir, "default/kubia:http");
    let written = fill_conntrack(&dir, MAP_CONNTRACK_TCP, IPPROTO_TCP, id, 100_000);
    assert_eq!(written, 200_000, "two entries per flow");
    let maps = cluster.maps().expect("pinned maps");
    let table = aya::maps::MapData::from_pin(dir.join(MAP_CONNTRACK_TCP)).expect("table");
    let of_service = || {
        use std::os::fd::AsFd;
        lb_userspace::conntrack::read_all(table.fd().as_fd()).expect("read").iter().filter(|(_, v)| v.service_id == id).count()
    };
    let at = cluster.remove_manifest(MANIFEST_FILE).expect("remove");
    let frontend_gone = maps.wait_for(kubia_http(), None, at, Duration::from_secs(20)).expect("frontend removed");
    let mut left = of_service();
    while left > 0 && at.elapsed() < Duration::from_secs(20) {
        left = of_service();
    }
    let purged = at.elapsed();
    println!("deleting a service with 100,000 tracked flows: frontend gone after {frontend_gone:?}, its 200,000 conntrack entries after {purged:?}");
    assert_eq!(left, 0, "entries of the deleted service left");
}
