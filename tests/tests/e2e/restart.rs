//! Agent restarts under load (tcx, the legacy tc attach, switching between them), and `--cleanup` after a stopped agent.
use std::{
    net::{SocketAddr, TcpStream},
    sync::atomic::Ordering,
    time::Duration,
};

use lb_tests::{
    cluster::{ClientHook, Cluster, KUBIA_VIP6, MANIFEST_FILE, dual_stack_manifests, kubia_manifests, ready},
    netns::{ask, connect_and_ask},
};

use crate::{connect_and_ask_from_client, kernel_feature_in_use, kubia, kubia_with_flags};

/// The agent is stopped and started again while a client keeps long-lived
/// connections busy and opens new ones through the VIP. While no agent
/// runs, the programs stay attached and the maps pinned; the new agent
/// adopts the maps, takes the attachments over in one atomic update each,
/// and its first sync changes nothing: no connection breaks or is refused.
#[test]
fn agent_restart_under_load_breaks_and_refuses_no_connection() {
    let mut cluster = Cluster::start(3, &kubia_manifests(&ready(&[0, 1, 2]))).expect("cluster");
    restarts_under_load(&mut cluster, &[None], Load::kubia());
}

/// The same over IPv6, through the IPv6 cluster IP of a dual-stack
/// service: the restarted agent adopts both families' service ports (8:
/// kubia's two ports in each family, and an IPv6 node port service's two
/// ports, each with its external side) and breaks no IPv6 connection.
#[test]
fn agent_restart_under_load_keeps_ipv6_connections() {
    let mut cluster = Cluster::start_dual_stack(3, &[(MANIFEST_FILE, &dual_stack_manifests(&[0, 1, 2]))]).expect("cluster");
    restarts_under_load(&mut cluster, &[None], Load { target: SocketAddr::new(KUBIA_VIP6.into(), 80), service_ports: 8 });
}

/// What the restarted agents are loaded with: connections to `target`,
/// and how many service ports they must adopt.
struct Load {
    target: SocketAddr,
    service_ports: usize,
}

impl Load {
    /// kubia's cluster IP, of `kubia_manifests` (4 service ports).
    fn kubia() -> Self {
        Self { target: kubia().into(), service_ports: 4 }
    }
}

/// The same with the tc programs attached as cls_bpf filters, as on
/// kernels before 6.6 (no tcx): each restart replaces the filter in place.
/// Another tool's filter on the same qdisc is left alone throughout, and
/// `--cleanup` removes only this agent's filter, leaving the qdisc.
#[test]
fn agent_restart_under_load_with_the_legacy_tc_attach() {
    use lb_tests::cluster::Topology;
    let net = Topology::new(3, ClientHook::Tc).expect("namespaces");
    // Another tool's filter, there before the agent: a classic BPF program
    // that matches nothing.
    net.node.output(&["tc", "qdisc", "add", "dev", "b1", "clsact"]).expect("qdisc");
    let other = ["tc", "filter", "add", "dev", "b1", "ingress", "pref", "7", "protocol", "all", "bpf", "bytecode", "1,6 0 0 0,"];
    net.node.output(&other).expect("filter");
    let mut cluster = kubia_with_flags(net, &[0, 1, 2], &["--disable-kernel-feature", "tcx"]);
    assert_eq!(legacy_filters(&cluster, "b1"), [OURS, OTHERS].map(str::to_owned));
    restarts_under_load(&mut cluster, &[None, None], Load::kubia());
    assert_eq!(legacy_filters(&cluster, "b1"), [OURS, OTHERS].map(str::to_owned), "one filter of ours");

    assert!(!kernel_feature_in_use(&cluster, "tcx"), "lbctl kernel shows the fallback");

    cluster.agent.stop(Duration::from_secs(20)).expect("agent stops");
    assert_eq!(connect_and_ask_from_client(&cluster).map(|a| a.starts_with("You've hit")), Ok(true), "served with no agent running");
    run_cleanup(&cluster);
    assert_eq!(legacy_filters(&cluster, "b1"), [OTHERS.to_owned()], "only the other tool's filter is left");
    let qdiscs = cluster.node.output(&["tc", "qdisc", "show", "dev", "b1"]).expect("tc");
    assert!(qdiscs.contains("clsact"), "the qdisc stays for the other tool: {qdiscs}");
    assert!(connect_and_ask_from_client(&cluster).is_err(), "the VIP was still served after --cleanup");
}

/// An agent restarted without tcx where the previous one had it (and back)
/// hands the interfaces over with nothing broken: the new attachment is in
/// place before the old one goes.
#[test]
fn switching_between_tcx_and_the_legacy_attach_at_restart_breaks_nothing() {
    if !tcx_in_use() {
        eprintln!("skipped: this kernel has no tcx, so there is nothing to switch from");
        return;
    }
    let mut cluster = Cluster::start(3, &kubia_manifests(&ready(&[0, 1, 2]))).expect("cluster");
    assert!(legacy_filters(&cluster, "b1").is_empty(), "tcx: no filter");
    restarts_under_load(&mut cluster, &[Some("tcx"), None], Load::kubia());
    assert!(legacy_filters(&cluster, "b1").is_empty(), "back on tcx, the filter is gone");
}

/// The agent's cls_bpf filter, and the other tool's, as `legacy_filters`
/// lists them.
const OURS: &str = "bpf pref 1 handle 0x4c42";
const OTHERS: &str = "bpf pref 7 handle 0x1";

/// Whether the agent uses tcx on this kernel (unless told otherwise).
fn tcx_in_use() -> bool {
    use lb_userspace::features::{Feature, KernelFeatures};
    KernelFeatures::probe(&[]).uses(Feature::Tcx)
        && !std::env::var(lb_tests::cluster::EXTRA_AGENT_ARGS).unwrap_or_default().contains("tcx")
}

/// The filters on the ingress of `iface` in the node, as "KIND pref N
/// handle H".
fn legacy_filters(cluster: &Cluster, iface: &str) -> Vec<String> {
    let out = cluster.node.output(&["tc", "filter", "show", "dev", iface, "ingress"]).expect("tc filter show");
    out.lines()
        .filter(|line| line.starts_with("filter") && line.contains(" handle "))
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let nth_after = |key: &str, n: usize| words.iter().position(|w| *w == key).and_then(|i| words.get(i + n)).copied().unwrap_or("?");
            // "filter protocol all pref 1 bpf chain 0 handle 0x4c42 ..."
            format!("{} pref {} handle {}", nth_after("pref", 2), nth_after("pref", 1), nth_after("handle", 1))
        })
        .collect()
}

/// `lb-agent --cleanup` on the cluster's pins, in the node.
fn run_cleanup(cluster: &Cluster) {
    let agent = lb_tests::netns::userspace_binary("lb-agent").expect("built");
    let bpffs = cluster.bpffs.dir.to_string_lossy().into_owned();
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &cluster.node.name])
        .arg(agent)
        .args(["--cleanup", "--bpffs-dir", &bpffs])
        .status()
        .expect("lb-agent --cleanup");
    assert!(status.success());
}

/// Restarts the agent under load, once per entry of `disabled` (the
/// `--disable-kernel-feature` of the next agent, if any): long-lived
/// connections stay busy and new ones are opened all along. None may break
/// or be refused, some must be served while no agent runs, and every
/// interface must be taken over or handed over with nothing reprogrammed.
fn restarts_under_load(cluster: &mut Cluster, disabled: &[Option<&str>], load: Load) {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicUsize},
        },
        time::Instant,
    };
    const LONG_LIVED: usize = 20;
    const NEW_BEFORE_AND_AFTER: usize = 50;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));

    let long_lived = {
        let stop = stop.clone();
        cluster
            .client
            .spawn_thread(move || {
                let mut conns: Vec<(TcpStream, String, Option<String>)> = (0..LONG_LIVED)
                    .map(|_| {
                        let mut conn = TcpStream::connect(load.target).expect("connect");
                        conn.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
                        let first = ask(&mut conn).expect("first answer");
                        (conn, first, None)
                    })
                    .collect();
                let mut asked = 0;
                while !stop.load(Ordering::Relaxed) {
                    for (conn, first, broken) in conns.iter_mut().filter(|c| c.2.is_none()) {
                        match ask(conn) {
                            Ok(answer) if answer == *first => asked += 1,
                            other => *broken = Some(format!("was {first}, then {other:?}")),
                        }
                    }
                }
                (asked, conns.into_iter().filter_map(|c| c.2).collect::<Vec<_>>())
            })
            .expect("long-lived client")
    };
    let new_connections = {
        let (stop, answered) = (stop.clone(), answered.clone());
        cluster
            .client
            .spawn_thread(move || {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let outcome = connect_and_ask(load.target).map_err(|e| e.to_string());
                    if outcome.is_ok() {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    outcomes.push((Instant::now(), outcome));
                }
                outcomes
            })
            .expect("new-connection client")
    };
    let wait_for_answers = |count: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while answered.load(Ordering::Relaxed) < count {
            assert!(Instant::now() < deadline, "the client got {} answers, not {count}", answered.load(Ordering::Relaxed));
            std::thread::yield_now();
        }
    };

    wait_for_answers(NEW_BEFORE_AND_AFTER);
    let mut restarts = Vec::new();
    let mut logs = Vec::new();
    let mut previous_mode = None;
    for next in disabled {
        if *next != previous_mode {
            cluster.set_agent_flag("--disable-kernel-feature", *next);
        }
        restarts.push(cluster.restart_agent().expect("restart"));
        logs.push((previous_mode != *next, cluster.agent.log()));
        previous_mode = *next;
        let after_restart = answered.load(Ordering::Relaxed);
        wait_for_answers(after_restart + NEW_BEFORE_AND_AFTER);
    }
    stop.store(true, Ordering::Relaxed);
    let (asked, broken) = long_lived.join().expect("long-lived client");
    let outcomes = new_connections.join().expect("new-connection client");

    let refused: Vec<_> = outcomes.iter().filter_map(|(_, o)| o.as_ref().err()).collect();
    let served_without_agent = outcomes
        .iter()
        .filter(|(at, o)| o.is_ok() && restarts.iter().any(|r| (r.stopped..r.ready).contains(at)))
        .count();
    println!(
        "{} restarts: no agent for {:?}; {} new connections, {} refused, {served_without_agent} served while no agent ran; \
         {LONG_LIVED} long-lived connections asked {asked} times, {} broken",
        restarts.len(),
        restarts.iter().map(|r| r.ready - r.stopped).collect::<Vec<_>>(),
        outcomes.len(),
        refused.len(),
        broken.len()
    );
    assert!(broken.is_empty(), "established connections broke: {broken:?}");
    assert!(refused.is_empty(), "new connections were refused: {refused:?}");
    assert!(served_without_agent > 0, "the test did not send traffic while no agent ran");
    for (switched, log) in logs {
        let adopted = format!("services={}", load.service_ports);
        assert!(log.contains("adopted the pinned datapath") && log.contains(&adopted) && log.contains("discarded=0"), "{log}");
        // Switching between tcx and the filter is a fresh attachment beside
        // the old one, which goes once the new one is in place.
        let taken_over = if switched { 0 } else { 4 };
        assert_eq!(log.matches("how=TakenOver").count(), taken_over, "interfaces taken over: {log}");
        assert!(log.contains("added=0 updated=0 removed=0"), "the first sync after the restart changed nothing: {log}");
    }
}

/// A stopped agent leaves its programs serving the VIP; `lb-agent --cleanup`
/// detaches them and removes every pin, after which the VIP is not served.
#[test]
fn cleanup_detaches_the_programs_a_stopped_agent_left() {
    let mut cluster = Cluster::start(1, &kubia_manifests(&ready(&[0]))).expect("cluster");
    cluster.agent.stop(Duration::from_secs(20)).expect("agent stops");
    let answer = cluster.client.enter(|| connect_and_ask(kubia())).expect("client");
    assert_eq!(answer.expect("served with no agent running"), "You've hit kubia-1");

    run_cleanup(&cluster);
    let left: Vec<_> = walk(&cluster.bpffs.dir);
    assert!(left.is_empty(), "pins left behind: {left:?}");
    let after = cluster.client.enter(|| connect_and_ask(kubia())).expect("client");
    assert!(after.is_err(), "the VIP was still served after --cleanup: {after:?}");
}

/// Every file below `dir`, less the bpf filesystem's own (`*.debug`).
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("readable").map(|e| e.expect("entry").path()) {
        if entry.is_dir() {
            files.push(entry.clone());
            files.extend(walk(&entry));
        } else if entry.extension().is_none_or(|e| e != "debug") {
            files.push(entry);
        }
    }
    files
}
