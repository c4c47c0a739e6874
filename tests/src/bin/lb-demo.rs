//! The demo behind `cargo xtask demo`: the real lb-agent serving kubia on this machine.
//!
//! The seeds' kubia service (ClusterIP 10.96.0.10, port 80 → targetPort 8080,
//! three pods), its NodePort (30123) and LoadBalancer variants, from the
//! manifests in deploy/examples/, run in network namespaces on this machine,
//! with the real lb-agent doing the load balancing and real curl requests. No
//! cluster needed. Everything it creates is removed when it ends.
use std::{net::SocketAddrV4, path::Path, process::Command};

use anyhow::{Context, Result, bail};
use lb_tests::{
    cluster::{ClientHook, Cluster, EMPTY_VIP, KUBIA_VIP, NODE_IP, PodState, pod_ip, pod_name},
    netns::connect_and_ask,
};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
/// The address deploy/examples/kubia-loadbalancer.yaml gives the load
/// balancer; the client's default route leads there through the node.
const LOAD_BALANCER_IP: &str = "10.202.0.100";

fn curl(cluster: &Cluster, url: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &cluster.client.name, "curl", "-sS", "--max-time", "5", url])
        .output()
        .context("running curl in the client namespace")?;
    let text = String::from_utf8_lossy(if out.status.success() { &out.stdout } else { &out.stderr }).trim().to_owned();
    Ok(text)
}

fn main() -> Result<()> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(EXAMPLES).with_context(|| format!("reading {EXAMPLES}"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            files.push((name, std::fs::read_to_string(&path)?));
        }
    }
    if files.is_empty() {
        bail!("no manifests in {EXAMPLES}");
    }
    files.sort();
    println!("==> the manifests, as `kubectl apply -f deploy/examples/` would send them:");
    for (name, _) in &files {
        println!("    {}", Path::new("deploy/examples").join(name).display());
    }
    println!("==> creating the namespace cluster: a client, node-1 running lb-agent --manifests, three kubia pods");
    let file_refs: Vec<(&str, &str)> = files.iter().map(|(n, c)| (n.as_str(), c.as_str())).collect();
    let cluster = Cluster::start_with(3, &file_refs, ClientHook::Tc)?;
    for i in 0..3 {
        println!("    pod {} at {}:8080 (a tiny HTTP server)", pod_name(i), pod_ip(i));
    }
    println!("\n==> $ lbctl kernel   (what this kernel offers the agent, and its fallbacks)");
    for line in cluster.lbctl(&["kernel"])?.lines() {
        println!("    {line}");
    }

    println!("\n==> $ kubectl exec client -- curl -s http://{KUBIA_VIP}   (x6)");
    for _ in 0..6 {
        println!("    {}", curl(&cluster, &format!("http://{KUBIA_VIP}"))?);
    }

    println!("\n==> the seeds' NodePort service: port 30123 of the node (kubia-nodeport.yaml)");
    for _ in 0..4 {
        println!("    $ curl http://{NODE_IP}:30123  ->  {}", curl(&cluster, &format!("http://{NODE_IP}:30123"))?);
    }
    println!("\n==> the seeds' LoadBalancer service: its ingress IP (kubia-loadbalancer.yaml)");
    for _ in 0..4 {
        println!("    $ curl http://{LOAD_BALANCER_IP}  ->  {}", curl(&cluster, &format!("http://{LOAD_BALANCER_IP}"))?);
    }

    println!("\n==> a service without endpoints is refused at once, as with kube-proxy");
    println!("    $ curl http://{EMPTY_VIP}  ->  {}", curl(&cluster, &format!("http://{EMPTY_VIP}"))?);

    // set_kubia_pods rewrites kubia.yaml (the examples' file of that name)
    // as the EndpointSlice controller would after pods change.
    println!("\n==> kubia-1 starts terminating (EndpointSlice: ready=false, terminating=true)");
    let mut pods = vec![(0, PodState::Terminating), (1, PodState::Ready), (2, PodState::Ready)];
    let took = cluster.set_kubia_pods(&pods)?;
    println!("    manifest changed -> maps updated in {took:?}");
    for _ in 0..4 {
        println!("    {}", curl(&cluster, &format!("http://{KUBIA_VIP}"))?);
    }

    println!("\n==> scaling kubia down to kubia-3 only");
    pods = vec![(2, PodState::Ready)];
    let took = cluster.set_kubia_pods(&pods)?;
    println!("    manifest changed -> maps updated in {took:?}");
    let answers = cluster.client.enter(|| (0..4).map(|_| connect_and_ask(SocketAddrV4::new(KUBIA_VIP, 80))).collect::<Vec<_>>())?;
    for answer in answers {
        println!("    {}", answer.context("request through the ClusterIP")?);
    }
    println!("\n==> cleaning up: stopping the agent, deleting the namespaces");
    drop(cluster);
    println!("done");
    Ok(())
}
