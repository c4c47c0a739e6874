//! `cargo xtask bench`, control plane: how fast the agent programs services, beside iptables.
//!
//! Programming 10,000 services × 10 endpoints from empty, and one endpoint
//! change at that scale, through the agent's own path (snapshot of the objects
//! as the API source takes it, incremental desired state, diff, map writes to a
//! loaded datapath); against the same services as kube-proxy-shaped iptables
//! rules loaded by iptables-legacy-restore in a network namespace of its own.
//! Each measurement checks its result: the maps hold every frontend and
//! backend, the iptables table every rule.
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
use lb_tests::netns::Netns;
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

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() -> Result<()> {
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
    Ok(())
}
