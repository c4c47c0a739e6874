//! A small "cluster" in network namespaces, for the end-to-end tests and the demo.
//!
//! A client, a node running the real `lb-agent` on a directory of manifests,
//! and pods behind the node, each running an `EchoServer` (HTTP on 8080, UDP on
//! 5353) named after it.
//!
//! ```text
//!  client 10.201.0.2 ──veth── c0 10.201.0.1 [node: lb-agent --manifests DIR]
//!                                 b1 10.244.1.1 ──veth── kubia-1 10.244.1.2
//!                                 b2 10.244.2.1 ──veth── kubia-2 10.244.2.2  ...
//! ```
//!
//! With IPv6 (`Topology::with_ipv6`) every link also carries an IPv6 subnet:
//! client fd00:201::2, node fd00:201::1, pods fd00:244:N::2 behind
//! fd00:244:N::1.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_common::{FrontendKey, IPPROTO_TCP};

use crate::{
    netns::{Agent, Bpffs, Cgroup, EchoServer, Netns, link, run, unique_name},
    pinned::PinnedMaps,
};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
/// The node's address on the client side: where node ports answer.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
pub const KUBIA_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 2);
/// The node's IPv6 address on the client side.
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 1);
/// kubia's IPv6 cluster IP in the dual-stack manifests.
pub const KUBIA_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
pub const HTTP_TARGET_PORT: u16 = 8080;
pub const DNS_TARGET_PORT: u16 = 5353;
pub const NODE_NAME: &str = "node-1";
/// How long the agent may take to start or to apply a change (times the
/// time scale, see [`crate::netns::scaled`]).
pub fn agent_timeout() -> Duration {
    crate::netns::scaled(Duration::from_secs(20))
}

/// The manifest file the cluster's services are written to.
pub const MANIFEST_FILE: &str = "kubia.yaml";

pub fn pod_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, index as u8 + 1, 2)
}

pub fn pod_ip6(index: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, index as u16 + 1, 0, 0, 0, 0, 2)
}

pub fn pod_name(index: usize) -> String {
    format!("kubia-{}", index + 1)
}

/// An endpoint's condition in the EndpointSlice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodState {
    Ready,
    /// Shutting down: serving its connections, taking no new ones.
    Terminating,
    /// Its readiness probe fails: listed, neither ready nor serving nor
    /// terminating.
    NotReady,
}

pub fn ready(pods: &[usize]) -> Vec<(usize, PodState)> {
    pods.iter().map(|&i| (i, PodState::Ready)).collect()
}

/// The seeds' kubia service (port 80 → targetPort 8080, and UDP 53 → 5353)
/// with an EndpointSlice of the given pods, plus a service without
/// endpoints, as manifests.
pub fn kubia_manifests(pods: &[(usize, PodState)]) -> String {
    let mut endpoints = String::new();
    for &(i, state) in pods {
        let (ready, serving, terminating) = match state {
            PodState::Ready => (true, true, false),
            PodState::Terminating => (false, true, true),
            PodState::NotReady => (false, false, false),
        };
        endpoints.push_str(&format!(
            "- addresses: [\"{}\"]\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n  nodeName: {NODE_NAME}\n  targetRef: {{kind: Pod, name: {}}}\n",
            pod_ip(i),
            pod_name(i)
        ));
    }
    if endpoints.is_empty() {
        endpoints.push_str("  []\n");
    }
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: kubia
  namespace: default
spec:
  clusterIP: {KUBIA_VIP}
  selector: {{app: kubia}}
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: {HTTP_TARGET_PORT}}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: {DNS_TARGET_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubia-abcde
  namespace: default
  labels: {{kubernetes.io/service-name: kubia}}
addressType: IPv4
ports:
- {{name: http, port: {HTTP_TARGET_PORT}, protocol: TCP}}
- {{name: dns, port: {DNS_TARGET_PORT}, protocol: UDP}}
endpoints:
{endpoints}---
apiVersion: v1
kind: Service
metadata:
  name: no-endpoints
  namespace: default
spec:
  clusterIP: {EMPTY_VIP}
  ports:
  - {{name: http, port: 80, protocol: TCP}}
  - {{name: dns, port: 53, protocol: UDP}}
"#
    )
}

/// The kubia HTTP frontend.
pub fn kubia_http() -> FrontendKey {
    FrontendKey::new(KUBIA_VIP, 80, IPPROTO_TCP)
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
    run("ip", &["netns", "exec", &ns.name, "ethtool", "-K", iface, "tx", "off", "rx", "off"])
}

pub struct Pod {
    pub server: EchoServer,
    pub ns: Netns,
}

/// A directory removed with its content on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(role: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(unique_name(role));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The namespaces of a cluster, without the agent. Fields drop in order:
/// servers, then namespaces, then the bpf filesystem.
pub struct Topology {
    pub pods: Vec<Pod>,
    pub client: Netns,
    pub node: Netns,
    pub bpffs: Bpffs,
    /// Where the agent's socket programs apply (the node's own processes).
    pub cgroup: Cgroup,
    /// Whether the agent is told `--node-ip` (else it finds the node's
    /// addresses in its Node object).
    pub node_ip_flag: bool,
    /// Whether the links carry IPv6 too (and the agent is told the
    /// node's IPv6 address).
    pub ipv6: bool,
    hook: ClientHook,
}

impl Topology {
    pub fn new(pod_count: usize, hook: ClientHook) -> Result<Self> {
        let node = Netns::new("node")?;
        let client = Netns::new("client")?;
        link(&node, "c0", NODE_IP, &client, "eth0", CLIENT_IP)?;
        client.ip(&["route", "add", "default", "via", "10.201.0.1"])?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        for key in ["net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter"] {
            node.sysctl(key, "0")?;
        }
        if hook == ClientHook::Xdp {
            full_checksums(&client, "eth0")?;
            full_checksums(&node, "c0")?;
        }
        let mut pods = Vec::new();
        for i in 0..pod_count {
            let ns = Netns::new(&format!("pod{}", i + 1))?;
            let node_if = format!("b{}", i + 1);
            link(&node, &node_if, Ipv4Addr::new(10, 244, i as u8 + 1, 1), &ns, "eth0", pod_ip(i))?;
            ns.ip(&["route", "add", "default", "via", &format!("10.244.{}.1", i + 1)])?;
            if hook == ClientHook::Xdp {
                full_checksums(&ns, "eth0")?;
                full_checksums(&node, &node_if)?;
            }
            let server = EchoServer::start(&ns, &pod_name(i), HTTP_TARGET_PORT, DNS_TARGET_PORT)?;
            pods.push(Pod { server, ns });
        }
        Ok(Self { pods, client, node, bpffs: Bpffs::new()?, cgroup: Cgroup::new()?, node_ip_flag: true, ipv6: false, hook })
    }

    /// Adds the IPv6 subnets (see the module's picture) and IPv6
    /// forwarding on the node; addresses without duplicate address
    /// detection, so that they are usable at once.
    pub fn with_ipv6(mut self) -> Result<Self> {
        let add = |ns: &Netns, address: String, iface: &str| ns.ip(&["-6", "addr", "add", &address, "dev", iface, "nodad"]);
        add(&self.node, format!("{NODE_IP6}/64"), "c0")?;
        add(&self.client, format!("{CLIENT_IP6}/64"), "eth0")?;
        self.client.ip(&["-6", "route", "add", "default", "via", &NODE_IP6.to_string()])?;
        for (i, pod) in self.pods.iter().enumerate() {
            let gateway = Ipv6Addr::new(0xfd00, 0x244, i as u16 + 1, 0, 0, 0, 0, 1);
            add(&self.node, format!("{gateway}/64"), &format!("b{}", i + 1))?;
            add(&pod.ns, format!("{}/64", pod_ip6(i)), "eth0")?;
            pod.ns.ip(&["-6", "route", "add", "default", "via", &gateway.to_string()])?;
        }
        self.node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        self.ipv6 = true;
        Ok(self)
    }

    /// Makes reverse-path filtering strict on the node, as many
    /// distributions ship it, with a default route (into the client's
    /// namespace) as real nodes have.
    pub fn with_strict_reverse_path_filter(self) -> Result<Self> {
        for key in ["net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter"] {
            self.node.sysctl(key, "1")?;
        }
        self.node.ip(&["route", "add", "default", "via", &CLIENT_IP.to_string()])?;
        Ok(self)
    }

    /// The agent's arguments for this topology, less the source.
    fn agent_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for i in 0..self.pods.len() {
            args.extend(["--iface".to_owned(), format!("b{}", i + 1)]);
        }
        let client_flag = match self.hook {
            ClientHook::Tc => "--iface",
            ClientHook::Xdp => "--xdp-iface",
        };
        args.extend([client_flag.to_owned(), "c0".to_owned()]);
        args.extend(["--node-name".to_owned(), NODE_NAME.to_owned()]);
        if self.node_ip_flag {
            args.extend(["--node-ip".to_owned(), NODE_IP.to_string()]);
            if self.ipv6 {
                args.extend(["--node-ip".to_owned(), NODE_IP6.to_string()]);
            }
        }
        args.extend(["--bpffs-dir".to_owned(), self.bpffs.dir.to_string_lossy().into_owned()]);
        args.extend(["--cgroup".to_owned(), self.cgroup.dir.to_string_lossy().into_owned()]);
        args
    }

    pub fn maps(&self) -> Result<PinnedMaps> {
        PinnedMaps::open(&self.bpffs.dir)
    }
}

/// A topology with the agent running. Fields drop in order: the agent stops
/// first, then the manifest directory goes, then the namespaces.
pub struct Cluster {
    pub agent: Agent,
    agent_args: Vec<String>,
    manifests: Option<TempDir>,
    net: Topology,
}

/// When a restarted agent went away and when its successor was ready.
#[derive(Clone, Copy, Debug)]
pub struct Restart {
    pub stopped: Instant,
    pub ready: Instant,
}

impl std::ops::Deref for Cluster {
    type Target = Topology;
    fn deref(&self) -> &Topology {
        &self.net
    }
}

impl Cluster {
    /// A cluster whose manifest directory holds `manifests` as kubia.yaml.
    pub fn start(pod_count: usize, manifests: &str) -> Result<Self> {
        Self::start_with(pod_count, &[(MANIFEST_FILE, manifests)], ClientHook::Tc)
    }

    /// A cluster whose agent reads a manifest directory holding `files`.
    pub fn start_with(pod_count: usize, files: &[(&str, &str)], hook: ClientHook) -> Result<Self> {
        Self::start_on(Topology::new(pod_count, hook)?, files)
    }

    /// A dual-stack cluster (`Topology::with_ipv6`) whose agent reads a
    /// manifest directory holding `files`.
    pub fn start_dual_stack(pod_count: usize, files: &[(&str, &str)]) -> Result<Self> {
        Self::start_on(Topology::new(pod_count, ClientHook::Tc)?.with_ipv6()?, files)
    }

    fn start_on(net: Topology, files: &[(&str, &str)]) -> Result<Self> {
        let manifests = TempDir::new("manifests")?;
        for (name, content) in files {
            std::fs::write(manifests.0.join(name), content).with_context(|| format!("writing {name}"))?;
        }
        let source = vec!["--manifests".to_owned(), manifests.0.to_string_lossy().into_owned()];
        Self::run_agent(net, source, Some(manifests))
    }

    /// Starts the agent on `net` with the source arguments `source`, and
    /// waits until it is ready.
    pub fn run_agent(net: Topology, source: Vec<String>, manifests: Option<TempDir>) -> Result<Self> {
        let mut agent_args = source;
        agent_args.extend(net.agent_args());
        let agent = start_agent(&net.node, &agent_args)?;
        Ok(Self { agent, agent_args, manifests, net })
    }

    /// Stops the agent (SIGTERM) and starts a new one with the same
    /// arguments; returns once the new one is ready.
    pub fn restart_agent(&mut self) -> Result<Restart> {
        self.agent.stop(agent_timeout())?;
        let stopped = Instant::now();
        self.agent = start_agent(&self.net.node, &self.agent_args)?;
        Ok(Restart { stopped, ready: Instant::now() })
    }

    /// Sets `flag` to `value` (or removes it, with `None`) for the agents
    /// started from now on, by `restart_agent`.
    pub fn set_agent_flag(&mut self, flag: &str, value: Option<&str>) {
        if let Some(at) = self.agent_args.iter().position(|a| a == flag) {
            self.agent_args.drain(at..at + 2);
        }
        if let Some(value) = value {
            self.agent_args.extend([flag.to_owned(), value.to_owned()]);
        }
    }

    /// lbctl's output for `args`, against this cluster's agent.
    pub fn lbctl(&self, args: &[&str]) -> Result<String> {
        let lbctl = crate::netns::userspace_binary("lbctl")?;
        let out = std::process::Command::new(lbctl).arg("--bpffs-dir").arg(&self.bpffs.dir).args(args).output().context("running lbctl")?;
        anyhow::ensure!(out.status.success(), "lbctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn manifest_dir(&self) -> Result<&Path> {
        self.manifests.as_ref().map(|d| d.0.as_path()).context("this cluster's agent reads no manifest directory")
    }

    /// Replaces a manifest file atomically (write aside, then rename, as
    /// kubectl-driven tooling and editors do); returns when it was replaced.
    pub fn write_manifest(&self, name: &str, content: &str) -> Result<Instant> {
        let dir = self.manifest_dir()?;
        let aside = dir.join(format!(".{name}.partial"));
        std::fs::write(&aside, content).context("writing a manifest")?;
        let at = Instant::now();
        std::fs::rename(&aside, dir.join(name)).context("renaming a manifest into place")?;
        Ok(at)
    }

    pub fn remove_manifest(&self, name: &str) -> Result<Instant> {
        let path = self.manifest_dir()?.join(name);
        let at = Instant::now();
        std::fs::remove_file(path).context("removing a manifest")?;
        Ok(at)
    }

    /// Rewrites kubia.yaml with `pods` and waits until the agent has
    /// programmed the ready ones; returns the time from the file change to
    /// the maps being updated.
    pub fn set_kubia_pods(&self, pods: &[(usize, PodState)]) -> Result<Duration> {
        let maps = self.maps()?;
        let at = self.write_manifest(MANIFEST_FILE, &kubia_manifests(pods))?;
        maps.wait_for(kubia_http(), Some(&ready_ips(pods)), at, agent_timeout())
    }
}

/// Arguments every test agent gets besides its own, whitespace-separated:
/// `LB_TEST_AGENT_ARGS="--disable-kernel-feature tcx,set-retval"` runs the
/// suite on the older kernels' paths.
pub const EXTRA_AGENT_ARGS: &str = "LB_TEST_AGENT_ARGS";

fn start_agent(node: &Netns, args: &[String]) -> Result<Agent> {
    let extra = std::env::var(EXTRA_AGENT_ARGS).unwrap_or_default();
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).chain(extra.split_whitespace()).collect();
    let agent = Agent::start(node, &arg_refs)?;
    agent.wait_for(&["ready"], agent_timeout())?;
    Ok(agent)
}

/// The addresses of the ready pods among `pods`.
pub fn ready_ips(pods: &[(usize, PodState)]) -> BTreeSet<Ipv4Addr> {
    pods.iter().filter(|(_, s)| *s == PodState::Ready).map(|&(i, _)| pod_ip(i)).collect()
}

/// kubia as a dual-stack service (IPv6 first, as `ipFamilies` may list
/// it), both cluster IPs, with an EndpointSlice of each family of the
/// given pods; and `kubia-v6`, an IPv6-only NodePort service on 30080 with
/// the Cluster policy.
pub fn dual_stack_manifests(pods: &[usize]) -> String {
    let endpoints = |address: &dyn Fn(usize) -> String| -> String {
        pods.iter()
            .map(|&i| format!("- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: {NODE_NAME}\n", address(i)))
            .collect()
    };
    let slice = |name: &str, service: &str, family: &str, endpoints: String| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\n\
             addressType: {family}\nports:\n- {{name: http, port: {HTTP_TARGET_PORT}, protocol: TCP}}\n- {{name: dns, port: {DNS_TARGET_PORT}, protocol: UDP}}\n\
             endpoints:\n{endpoints}"
        )
    };
    let v4 = endpoints(&|i| pod_ip(i).to_string());
    let v6 = endpoints(&|i| pod_ip6(i).to_string());
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: kubia
  namespace: default
spec:
  clusterIP: {KUBIA_VIP6}
  clusterIPs: ["{KUBIA_VIP6}", "{KUBIA_VIP}"]
  ipFamilies: [IPv6, IPv4]
  ipFamilyPolicy: RequireDualStack
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: {HTTP_TARGET_PORT}}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: {DNS_TARGET_PORT}}}
---
{}---
{}---
apiVersion: v1
kind: Service
metadata:
  name: kubia-v6
  namespace: default
spec:
  type: NodePort
  clusterIP: fd00:96::11
  clusterIPs: ["fd00:96::11"]
  ipFamilies: [IPv6]
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: {HTTP_TARGET_PORT}, nodePort: 30080}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: {DNS_TARGET_PORT}, nodePort: 30053}}
---
{}"#,
        slice("kubia-v4", "kubia", "IPv4", v4),
        slice("kubia-v6", "kubia", "IPv6", v6.clone()),
        slice("kubia-v6-only", "kubia-v6", "IPv6", v6),
    )
}
