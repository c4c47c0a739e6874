//! A small "cluster" in network namespaces: a client, a node running the
//! real `lb-agent` on a service description file, and pods behind the node,
//! each running an `EchoServer` named after it.
//!
//! ```text
//!  client 10.201.0.2 ──veth── c0 10.201.0.1 [node: lb-agent, tc on every veth]
//!                                 b1 10.202.1.1 ──veth── pod-1 10.202.1.2
//!                                 b2 10.202.2.1 ──veth── pod-2 10.202.2.2  ...
//! ```
use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::netns::{Agent, Bpffs, EchoServer, Netns, link, unique_name};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
pub const KUBIA_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
pub const HTTP_TARGET_PORT: u16 = 8080;
pub const DNS_TARGET_PORT: u16 = 5353;
/// How long the agent may take to start or to apply a change.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(20);

pub fn pod_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 202, index as u8 + 1, 2)
}

pub fn pod_name(index: usize) -> String {
    format!("kubia-{}", index + 1)
}

/// The seeds' kubia service (port 80 → targetPort 8080, plus DNS-like UDP
/// 53 → 5353) with the given pods as endpoints, and a service without
/// endpoints.
pub fn kubia_services(endpoints: &[usize]) -> Value {
    let ips: Vec<String> = endpoints.iter().map(|&i| pod_ip(i).to_string()).collect();
    json!({"services": [
        {"namespace": "default", "name": "kubia", "clusterIP": KUBIA_VIP.to_string(),
         "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": HTTP_TARGET_PORT},
                   {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": DNS_TARGET_PORT}],
         "endpoints": ips},
        {"namespace": "default", "name": "no-endpoints", "clusterIP": EMPTY_VIP.to_string(),
         "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                   {"name": "dns", "port": 53, "protocol": "UDP"}]}
    ]})
}

/// The hook serving the client-facing interface of the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientHook {
    /// tc, with the veths' checksum offloads on: the client's packets carry
    /// partial checksums (CHECKSUM_PARTIAL), as a pod's do.
    Tc,
    /// XDP, as on a NIC: checksum offloads are turned off on the client, the
    /// node's interfaces and the pods, so every packet carries a complete
    /// checksum and every receiving stack verifies it: a wrong checksum
    /// update would break the connections.
    Xdp,
}

/// Turns off checksum offload on `iface` in `ns`: checksums are computed
/// when sending and verified when receiving.
fn full_checksums(ns: &Netns, iface: &str) -> Result<()> {
    crate::netns::run("ip", &["netns", "exec", &ns.name, "ethtool", "-K", iface, "tx", "off", "rx", "off"])
}

pub struct Pod {
    pub server: EchoServer,
    pub ns: Netns,
}

/// Fields drop in order: the agent stops first, then servers, then the
/// namespaces, then the bpf filesystem and the description file.
pub struct Cluster {
    pub agent: Agent,
    pub pods: Vec<Pod>,
    pub client: Netns,
    pub node: Netns,
    pub bpffs: Bpffs,
    services_file: TempFile,
    generation: u64,
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Cluster {
    pub fn start(pod_count: usize, services: &Value) -> Result<Self> {
        Self::start_with(pod_count, services, ClientHook::Tc)
    }

    pub fn start_with(pod_count: usize, services: &Value, client_hook: ClientHook) -> Result<Self> {
        let node = Netns::new("node")?;
        let client = Netns::new("client")?;
        link(&node, "c0", Ipv4Addr::new(10, 201, 0, 1), &client, "eth0", CLIENT_IP)?;
        client.ip(&["route", "add", "default", "via", "10.201.0.1"])?;
        if client_hook == ClientHook::Xdp {
            full_checksums(&client, "eth0")?;
            full_checksums(&node, "c0")?;
        }
        node.sysctl("net.ipv4.ip_forward", "1")?;
        for key in ["net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter"] {
            node.sysctl(key, "0")?;
        }
        let mut pods = Vec::new();
        let mut ifaces = Vec::new();
        for i in 0..pod_count {
            let ns = Netns::new(&format!("pod{}", i + 1))?;
            let node_if = format!("b{}", i + 1);
            link(&node, &node_if, Ipv4Addr::new(10, 202, i as u8 + 1, 1), &ns, "eth0", pod_ip(i))?;
            ns.ip(&["route", "add", "default", "via", &format!("10.202.{}.1", i + 1)])?;
            if client_hook == ClientHook::Xdp {
                full_checksums(&ns, "eth0")?;
                full_checksums(&node, &node_if)?;
            }
            let server = EchoServer::start(&ns, &pod_name(i), HTTP_TARGET_PORT, DNS_TARGET_PORT)?;
            pods.push(Pod { server, ns });
            ifaces.push(node_if);
        }
        let bpffs = Bpffs::new()?;
        let services_file = TempFile(std::env::temp_dir().join(format!("{}.json", unique_name("services"))));
        std::fs::write(&services_file.0, services.to_string()).context("writing the service description")?;

        let mut args = vec!["--services".to_owned(), services_file.0.to_string_lossy().into_owned()];
        match client_hook {
            ClientHook::Tc => args.extend(["--iface".to_owned(), "c0".to_owned()]),
            ClientHook::Xdp => args.extend(["--xdp-iface".to_owned(), "c0".to_owned()]),
        }
        for iface in &ifaces {
            args.extend(["--iface".to_owned(), iface.clone()]);
        }
        args.extend(["--bpffs-dir".to_owned(), bpffs.dir.to_string_lossy().into_owned()]);
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = Agent::start(&node, &arg_refs)?;
        agent.wait_for(&["ready"], AGENT_TIMEOUT)?;
        Ok(Self { agent, pods, client, node, bpffs, services_file, generation: 1 })
    }

    /// Rewrites the description, tells the agent, and waits until it has
    /// applied it; returns the agent's "synced" line.
    pub fn update_services(&mut self, services: &Value) -> Result<String> {
        std::fs::write(&self.services_file.0, services.to_string()).context("writing the service description")?;
        self.generation += 1;
        self.agent.reload()?;
        let generation = format!("generation={}", self.generation);
        self.agent.wait_for(&["synced", &generation], AGENT_TIMEOUT)
    }
}
