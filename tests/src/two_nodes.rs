//! Two nodes in network namespaces, for tests of traffic that crosses nodes.
//!
//! Each runs its own `lb-agent` (its own bpf filesystem) on one shared manifest
//! directory, with pods behind each node and routes between the nodes for pod
//! traffic, as a CNI sets them; an external client sits on the nodes' LAN.
//!
//! ```text
//!                       lan (bridge) 192.168.50.0/24
//!        ┌───────────────────────┼────────────────────────┐
//!  client .100           node-1 .1 [lb-agent]       node-2 .2 [lb-agent]
//!                        │ b1 10.244.1.1              │ b3 10.244.3.1
//!                        │   kubia-1 10.244.1.2       │   kubia-3 10.244.3.2
//!                        │ b2 10.244.2.1
//!                        │   kubia-2 10.244.2.2
//!  routes: node-1 10.244.3.0/24 via .2; node-2 10.244.1.0/24 and 10.244.2.0/24 via .1
//! ```
//!
//! Dual-stack (`TwoNodes::start_dual_stack`), the same in IPv6 beside it: LAN
//! fd00:50::/64 (client ::100, nodes ::1 and ::2), pods fd00:244:N::2 behind
//! fd00:244:N::1.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};

use crate::{
    cluster::{agent_timeout, DNS_TARGET_PORT, HTTP_TARGET_PORT, MANIFEST_FILE, Pod, TempDir, pod_ip, pod_ip6, pod_name},
    netns::{Agent, Bpffs, Cgroup, EchoServer, Netns, link},
};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
pub const NODE_NAMES: [&str; 2] = ["node-1", "node-2"];
pub const NODE_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(192, 168, 50, 1), Ipv4Addr::new(192, 168, 50, 2)];
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0x100);
pub const NODE_IPS6: [Ipv6Addr; 2] = [Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 1), Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 2)];
/// Which node each pod (by index, as `pod_ip`) runs on.
pub const POD_NODES: [usize; 3] = [0, 0, 1];

/// One node: its namespace, pods, bpf filesystem and agent. Fields drop
/// in order: the agent stops first.
pub struct Node {
    pub agent: Agent,
    pub bpffs: Bpffs,
    /// Where the agent's socket programs apply (the node's own processes).
    pub cgroup: Cgroup,
    pub pods: Vec<(usize, Pod)>,
    pub ns: Netns,
}

/// The whole topology. Fields drop in order: the nodes (agents, pods,
/// namespaces), then the LAN and client, then the manifest directory.
pub struct TwoNodes {
    pub nodes: Vec<Node>,
    pub client: Netns,
    lan: Netns,
    manifests: TempDir,
}

impl TwoNodes {
    /// Builds the topology and starts both agents on `manifests`; returns
    /// once both are ready.
    pub fn start(manifests: &str) -> Result<Self> {
        Self::start_with(manifests, false)
    }

    /// The same, dual-stack: every link carries IPv6 too, and each agent
    /// is told its node's IPv6 address.
    pub fn start_dual_stack(manifests: &str) -> Result<Self> {
        Self::start_with(manifests, true)
    }

    fn start_with(manifests: &str, ipv6: bool) -> Result<Self> {
        let dir = TempDir::new("manifests")?;
        std::fs::write(dir.0.join(MANIFEST_FILE), manifests).context("writing the manifests")?;
        let lan = Netns::new("lan")?;
        lan.ip(&["link", "add", "br0", "type", "bridge"])?;
        lan.ip(&["link", "set", "br0", "up"])?;
        let client = Netns::new("extclient")?;
        join_lan(&lan, &client, "pc", CLIENT_IP)?;
        if ipv6 {
            add6(&client, CLIENT_IP6, "lan0")?;
        }

        let mut nodes = Vec::new();
        for (n, node_ip) in NODE_IPS.iter().enumerate() {
            let ns = Netns::new(&format!("node{}", n + 1))?;
            join_lan(&lan, &ns, &format!("p{}", n + 1), *node_ip)?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            for key in ["net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter"] {
                ns.sysctl(key, "0")?;
            }
            if ipv6 {
                add6(&ns, NODE_IPS6[n], "lan0")?;
                ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            }
            let mut pods = Vec::new();
            for (i, _) in POD_NODES.iter().enumerate().filter(|(_, on)| **on == n) {
                let pod_ns = Netns::new(&format!("pod{}", i + 1))?;
                link(&ns, &format!("b{}", i + 1), Ipv4Addr::new(10, 244, i as u8 + 1, 1), &pod_ns, "eth0", pod_ip(i))?;
                pod_ns.ip(&["route", "add", "default", "via", &format!("10.244.{}.1", i + 1)])?;
                if ipv6 {
                    let gateway = Ipv6Addr::new(0xfd00, 0x244, i as u16 + 1, 0, 0, 0, 0, 1);
                    add6(&ns, gateway, &format!("b{}", i + 1))?;
                    add6(&pod_ns, pod_ip6(i), "eth0")?;
                    pod_ns.ip(&["-6", "route", "add", "default", "via", &gateway.to_string()])?;
                }
                let server = EchoServer::start(&pod_ns, &pod_name(i), HTTP_TARGET_PORT, DNS_TARGET_PORT)?;
                pods.push((i, Pod { server, ns: pod_ns }));
            }
            // The CNI's routes: the other node's pods through the other node.
            let other = NODE_IPS[1 - n].to_string();
            for (i, _) in POD_NODES.iter().enumerate().filter(|(_, on)| **on != n) {
                ns.ip(&["route", "add", &format!("10.244.{}.0/24", i + 1), "via", &other])?;
                if ipv6 {
                    ns.ip(&["-6", "route", "add", &format!("fd00:244:{}::/64", i + 1), "via", &NODE_IPS6[1 - n].to_string()])?;
                }
            }
            nodes.push((ns, pods));
        }

        let mut started = Vec::new();
        for (n, (ns, pods)) in nodes.into_iter().enumerate() {
            let bpffs = Bpffs::new()?;
            let cgroup = Cgroup::new()?;
            let mut args = vec![
                "--cgroup".to_owned(),
                cgroup.dir.to_string_lossy().into_owned(),
                "--manifests".to_owned(),
                dir.0.to_string_lossy().into_owned(),
                "--node-name".to_owned(),
                NODE_NAMES[n].to_owned(),
                "--node-ip".to_owned(),
                NODE_IPS[n].to_string(),
                "--bpffs-dir".to_owned(),
                bpffs.dir.to_string_lossy().into_owned(),
                "--iface".to_owned(),
                "lan0".to_owned(),
            ];
            for (i, _) in &pods {
                args.extend(["--iface".to_owned(), format!("b{}", i + 1)]);
            }
            if ipv6 {
                args.extend(["--node-ip".to_owned(), NODE_IPS6[n].to_string()]);
            }
            let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let agent = Agent::start(&ns, &arg_refs)?;
            started.push(Node { agent, bpffs, cgroup, pods, ns });
        }
        for node in &started {
            node.agent.wait_for(&["ready"], agent_timeout())?;
        }
        Ok(Self { nodes: started, client, lan, manifests: dir })
    }

    /// The pod with index `i`, wherever it runs.
    pub fn pod(&self, i: usize) -> &Pod {
        self.nodes
            .iter()
            .flat_map(|n| n.pods.iter())
            .find_map(|(index, pod)| (*index == i).then_some(pod))
            .unwrap_or_else(|| panic!("no pod {i}"))
    }

    /// Replaces the manifest file both agents read.
    pub fn write_manifests(&self, content: &str) -> Result<()> {
        let aside = self.manifests.0.join(format!(".{MANIFEST_FILE}.partial"));
        std::fs::write(&aside, content).context("writing the manifests")?;
        std::fs::rename(&aside, self.manifests.0.join(MANIFEST_FILE)).context("renaming the manifests into place")
    }

    /// The LAN's bridge namespace (kept for its lifetime).
    pub fn lan(&self) -> &Netns {
        &self.lan
    }
}

/// Adds `ip`/64 to `iface` in `ns`, usable at once (no duplicate address
/// detection).
fn add6(ns: &Netns, ip: Ipv6Addr, iface: &str) -> Result<()> {
    ns.ip(&["-6", "addr", "add", &format!("{ip}/64"), "dev", iface, "nodad"])
}

/// Connects `ns` to the LAN bridge through a veth whose LAN end is `port`;
/// the inside end is `lan0` with `ip/24`.
fn join_lan(lan: &Netns, ns: &Netns, port: &str, ip: Ipv4Addr) -> Result<()> {
    lan.ip(&["link", "add", port, "type", "veth", "peer", "name", "lan0", "netns", &ns.name])?;
    lan.ip(&["link", "set", port, "master", "br0"])?;
    lan.ip(&["link", "set", port, "up"])?;
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "lan0"])?;
    ns.ip(&["link", "set", "lan0", "up"])
}
