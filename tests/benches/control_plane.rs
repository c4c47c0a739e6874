//! `cargo xtask bench`, control plane: how fast the agent programs services, beside iptables.
//!
//! Programming 10,000 services × 10 endpoints from empty, and one endpoint
//! change at that scale, through the agent's own path (snapshot of the objects
//! as the API source takes it, incremental desired state, diff, map writes to a
//! loaded datapath); against the same services as kube-proxy-shaped iptables
//! rules loaded by iptables-legacy-restore in a network namespace of its own.
//! Then the agent as a process: its resident memory and its time from start
//! to ready at 10,000 services × 3 ports × 5 endpoints and at 100,000
//! services, read from a manifest directory.
//! Each measurement checks its result: the maps hold every frontend and
//! backend, the iptables table every rule, the agent's log every service
//! port added.
use std::{
    io::Write,
    net::Ipv4Addr,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::{BackendSlotKey, FrontendKey, IPPROTO_TCP, ip_from_be};
use lb_tests::{
    cluster::TempDir,
    netns::{Agent, Bpffs, Netns},
};
use lb_userspace::{
    datapath::Datapath,
    model::kubernetes::{ClusterObjects, Model},
    sync::Syncer,
};
use serde_json::json;

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;
const CHANGES: u32 = 21;

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i + 1)
}

fn endpoint(i: u32, e: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 16 + e + 1)
}

fn service(i: u32) -> Service {
    serde_json::from_value(json!({"metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {"clusterIP": vip(i).to_string(), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))
    .expect("a valid Service")
}

fn slice(i: u32, endpoints: &[Ipv4Addr]) -> EndpointSlice {
    let endpoints: Vec<_> = endpoints.iter().map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}})).collect();
    serde_json::from_value(json!({"metadata": {"name": format!("svc-{i}-abc"), "namespace": "bench",
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": endpoints}))
    .expect("a valid EndpointSlice")
}

fn objects() -> ClusterObjects {
    let mut objects = ClusterObjects::default();
    for i in 0..SERVICES {
        objects.services.push(Arc::new(service(i)));
        let eps: Vec<Ipv4Addr> = (0..ENDPOINTS).map(|e| endpoint(i, e)).collect();
        objects.slices.push(Arc::new(slice(i, &eps)));
    }
    objects
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

struct AgentFigures {
    compute: Duration,
    apply: Duration,
    change: Duration,
    change_max: Duration,
}

fn agent() -> Result<AgentFigures> {
    eprintln!("==> agent: {SERVICES} services x {ENDPOINTS} endpoints from empty");
    let mut objects = objects();
    let mut datapath = Datapath::load()?;
    let mut model = Model::default();
    let mut syncer = Syncer::new();
    let started = Instant::now();
    let changes = model.update(&objects, "node-1");
    let compute = started.elapsed();
    let started = Instant::now();
    syncer.apply_changes(&model.state, &changes.ports, &mut datapath.maps)?;
    let apply = started.elapsed();
    let frontends = datapath.maps.frontends.keys().count();
    let slots = datapath.maps.backend_slots.keys().count();
    ensure!(frontends == SERVICES as usize, "{frontends} frontends programmed");
    ensure!(slots == (SERVICES * ENDPOINTS) as usize, "{slots} backend slots programmed");

    eprintln!("==> agent: {CHANGES} single endpoint changes at that scale");
    let mut samples = Vec::new();
    for n in 0..CHANGES {
        let i = n * (SERVICES / CHANGES);
        let replacement = Ipv4Addr::new(10, 200, (n / 250) as u8, (n % 250) as u8 + 1);
        let mut eps: Vec<Ipv4Addr> = (1..ENDPOINTS).map(|e| endpoint(i, e)).collect();
        eps.push(replacement);
        // A new version of the slice, as the API source's store holds it.
        objects.slices[i as usize] = Arc::new(slice(i, &eps));
        let started = Instant::now();
        let snapshot = objects.clone();
        let changes = model.update(&snapshot, "node-1");
        let report = syncer.apply_changes(&model.state, &changes.ports, &mut datapath.maps)?;
        samples.push(started.elapsed());
        ensure!(report.updated == 1 && changes.ports.len() == 1, "change {n}: {report:?}");
        let fe = datapath.maps.frontends.get(&FrontendKey::new(vip(i), 80, IPPROTO_TCP), 0)?;
        let programmed: Vec<Ipv4Addr> = (0..fe.backend_count)
            .map(|slot| datapath.maps.backend_slots.get(&BackendSlotKey { backend_set: fe.backend_set, slot }, 0).map(|b| ip_from_be(b.ip)))
            .collect::<Result<_, _>>()?;
        ensure!(programmed.contains(&replacement) && !programmed.contains(&endpoint(i, 0)), "change {n} not programmed");
    }
    let change_max = samples.iter().max().copied().unwrap_or_default();
    Ok(AgentFigures { compute, apply, change: median(samples), change_max })
}

/// The nat table kube-proxy's iptables mode writes for these services:
/// KUBE-SERVICES dispatch, one KUBE-SVC chain per service choosing an
/// endpoint with statistic/random probabilities, one KUBE-SEP chain per
/// endpoint (masquerade mark for hairpin, DNAT). Returns the text and the
/// number of rules.
fn kube_proxy_rules(services: u32, only: Option<u32>) -> (String, usize) {
    let mut text = String::from("*nat\n");
    let mut rules = 0;
    let range = match only {
        Some(i) => i..i + 1,
        None => 0..services,
    };
    if only.is_none() {
        text.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
        text.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
        rules += 1;
    }
    for i in range.clone() {
        text.push_str(&format!(":KUBE-SVC-{i:08X} - [0:0]\n"));
        for e in 0..ENDPOINTS {
            text.push_str(&format!(":KUBE-SEP-{i:08X}{e:02} - [0:0]\n"));
        }
    }
    for i in range {
        if only.is_none() {
            text.push_str(&format!(
                "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/svc-{i}:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-{i:08X}\n",
                vip(i)
            ));
            rules += 1;
        }
        for e in 0..ENDPOINTS {
            let remaining = ENDPOINTS - e;
            if remaining > 1 {
                text.push_str(&format!(
                    "-A KUBE-SVC-{i:08X} -m statistic --mode random --probability {:.11} -j KUBE-SEP-{i:08X}{e:02}\n",
                    1.0 / f64::from(remaining)
                ));
            } else {
                text.push_str(&format!("-A KUBE-SVC-{i:08X} -j KUBE-SEP-{i:08X}{e:02}\n"));
            }
            let ep = endpoint(i, e);
            text.push_str(&format!("-A KUBE-SEP-{i:08X}{e:02} -s {ep}/32 -j KUBE-MARK-MASQ\n"));
            text.push_str(&format!("-A KUBE-SEP-{i:08X}{e:02} -p tcp -m tcp -j DNAT --to-destination {ep}:8080\n"));
            rules += 3;
        }
    }
    text.push_str("COMMIT\n");
    (text, rules)
}

fn restore(ns: &Netns, rules: &str, noflush: bool) -> Result<Duration> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "iptables-legacy-restore", "-w"]);
    if noflush {
        cmd.arg("--noflush");
    }
    let started = Instant::now();
    let mut child = cmd.stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().context("iptables-legacy-restore")?;
    child.stdin.take().context("stdin")?.write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    let took = started.elapsed();
    ensure!(out.status.success(), "iptables-legacy-restore: {}", String::from_utf8_lossy(&out.stderr));
    Ok(took)
}

fn rule_count(ns: &Netns) -> Result<usize> {
    let out = Command::new("ip").args(["netns", "exec", &ns.name, "iptables-legacy-save", "-t", "nat"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("-A ")).count())
}

fn iptables() -> Result<(Duration, Duration, usize)> {
    let ns = Netns::new("iptables")?;
    let (full, rules) = kube_proxy_rules(SERVICES, None);
    eprintln!("==> iptables-legacy-restore: {rules} kube-proxy-shaped rules (takes a while)");
    let load = restore(&ns, &full, false)?;
    let loaded = rule_count(&ns)?;
    ensure!(loaded == rules, "{loaded} of {rules} rules loaded");
    eprintln!("==> iptables-legacy-restore --noflush: one service's chains rewritten, 5 times");
    let mut samples = Vec::new();
    for n in 0..5 {
        let (one, _) = kube_proxy_rules(SERVICES, Some(n * 1000));
        samples.push(restore(&ns, &one, true)?);
    }
    ensure!(rule_count(&ns)? == rules, "rules lost in the partial restores");
    Ok((load, median(samples), rules))
}

/// The agent process after its first sync: time from start to ready, and
/// its resident memory then (and its peak).
struct ProcessFigures {
    ready: Duration,
    rss_kb: u64,
    peak_kb: u64,
}

/// `services` services of `ports` ports (TCP 80, 443, ... from 10.100.0.0
/// up) with `endpoints` endpoints each, as one manifest file.
fn scale_manifests(services: u32, ports: u32, endpoints: u32) -> String {
    let mut out = String::with_capacity(services as usize * 700);
    let port_list = |target: bool| -> String {
        (0..ports)
            .map(|p| if target { format!("{{name: p{p}, port: {}, protocol: TCP, targetPort: {}}}", 80 + p, 8080 + p) } else { format!("{{name: p{p}, port: {}, protocol: TCP}}", 8080 + p) })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (service_ports, slice_ports) = (port_list(true), port_list(false));
    for i in 0..services {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i);
        let eps: Vec<String> = (0..endpoints)
            .map(|e| format!("{{addresses: [\"{}\"], conditions: {{ready: true}}}}", Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 8 + e + 1)))
            .collect();
        out.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: scale}}\nspec:\n  clusterIP: {ip}\n  ports: [{service_ports}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-a, namespace: scale, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
             addressType: IPv4\nports: [{slice_ports}]\nendpoints: [{}]\n---\n",
            eps.join(", ")
        ));
    }
    out
}

/// `kB` of a `/proc/PID/status` field.
fn status_kb(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Starts the real agent (release build) on a manifest directory of
/// `services` × `ports` × `endpoints` and measures it once ready.
fn agent_process(services: u32, ports: u32, endpoints: u32, flags: &[&str]) -> Result<ProcessFigures> {
    eprintln!("==> agent process: {services} services x {ports} ports x {endpoints} endpoints");
    let ns = Netns::new("agentmem")?;
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"])?;
    ns.ip(&["link", "set", "d0", "up"])?;
    let bpffs = Bpffs::new()?;
    let manifests = TempDir::new("agentmem")?;
    std::fs::write(manifests.0.join("scale.yaml"), scale_manifests(services, ports, endpoints))?;
    let dir = manifests.0.to_string_lossy().into_owned();
    let pins = bpffs.dir.to_string_lossy().into_owned();
    let mut args = vec!["--manifests", &dir, "--iface", "d0", "--node-name", "node-1", "--node-ip", "10.0.0.1", "--bpffs-dir", &pins, "--no-socket-lb"];
    args.extend_from_slice(flags);
    let started = Instant::now();
    let agent = Agent::start(&ns, &args)?;
    let synced = agent.wait_for(&["synced", "generation=1"], Duration::from_secs(300))?;
    agent.wait_for(&["ready"], Duration::from_secs(60))?;
    let ready = started.elapsed();
    let added = format!("added={}", services * ports);
    ensure!(synced.contains(&added) && synced.contains("over_capacity=0"), "not every service port was programmed: {synced}");
    let (rss_kb, peak_kb) = (status_kb(agent.pid(), "VmRSS:")?, status_kb(agent.pid(), "VmHWM:")?);
    Ok(ProcessFigures { ready, rss_kb, peak_kb })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() -> Result<()> {
    let small = agent_process(10_000, 3, 5, &[])?;
    let large = agent_process(
        100_000,
        1,
        2,
        &["--service-ports-max", "131072", "--frontends-max", "131072", "--service-addresses-max", "131072", "--backend-slots-max", "262144"],
    )?;
    let agent = agent()?;
    let (ipt_load, ipt_change, rules) = iptables()?;
    println!("\n| {SERVICES} services x {ENDPOINTS} endpoints | lb-agent | iptables-legacy-restore ({rules} rules) | ratio |");
    println!("|---|---:|---:|---:|");
    let full = agent.compute + agent.apply;
    println!("| program from empty | {} | {} | {:.0}x |", ms(full), ms(ipt_load), ipt_load.as_secs_f64() / full.as_secs_f64());
    println!("| one endpoint change (median of {CHANGES}) | {} | {} | {:.0}x |", ms(agent.change), ms(ipt_change), ipt_change.as_secs_f64() / agent.change.as_secs_f64());
    println!("\nlb-agent detail: desired state {} + map writes {}; slowest single change {}",
        ms(agent.compute), ms(agent.apply), ms(agent.change_max));
    println!("targets: full program under 1 s: {}; a single change under 10 ms: {}",
        if full < Duration::from_secs(1) { "met" } else { "NOT met" },
        if agent.change < Duration::from_millis(10) { "met" } else { "NOT met" });

    println!("\n| the agent process (release, --manifests) | ready after | resident (VmRSS) | peak (VmHWM) |");
    println!("|---|---:|---:|---:|");
    for (what, figures) in [("10,000 services x 3 ports x 5 endpoints", &small), ("100,000 services x 1 port x 2 endpoints", &large)] {
        println!("| {what} | {} | {:.1} MB | {:.1} MB |", ms(figures.ready), figures.rss_kb as f64 / 1024.0, figures.peak_kb as f64 / 1024.0);
    }
    println!("targets at 10,000 x 3 x 5: under 60 MB resident: {}; ready within 1 s: {}",
        if small.rss_kb < 60 * 1024 { "met" } else { "NOT met" },
        if small.ready < Duration::from_secs(1) { "met" } else { "NOT met" });
    Ok(())
}
