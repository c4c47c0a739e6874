//! What the datapath refuses: no endpoints or no such port, a backend's port unreachable, and how rejects are logged.
use std::{
    io::ErrorKind,
    net::{SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use lb_tests::{
    cluster::{ClientHook, Cluster, EMPTY_VIP, KUBIA_VIP, MANIFEST_FILE, kubia_manifests, ready},
    netns::http_get_until,
};

use crate::{kernel_feature_in_use, kubia_with_flags};

/// TCP and UDP to a service without endpoints, and TCP to a port the
/// service does not serve, from the client: how each attempt ended.
fn refusals(cluster: &Cluster) -> [(&'static str, Result<(), ErrorKind>); 3] {
    cluster
        .client
        .enter(|| {
            let tcp = |addr| TcpStream::connect_timeout(&std::net::SocketAddr::V4(addr), Duration::from_secs(5)).map(drop);
            let udp = |addr: SocketAddrV4| -> std::io::Result<()> {
                let socket = UdpSocket::bind("0.0.0.0:0")?;
                socket.connect(addr)?;
                socket.set_read_timeout(Some(Duration::from_secs(5)))?;
                socket.send(b"query")?;
                socket.recv(&mut [0u8; 64]).map(drop)
            };
            [
                ("TCP to a service without endpoints", tcp(SocketAddrV4::new(EMPTY_VIP, 80))),
                ("UDP to a service without endpoints", udp(SocketAddrV4::new(EMPTY_VIP, 53))),
                ("TCP to a port the service does not serve", tcp(SocketAddrV4::new(KUBIA_VIP, 81))),
            ]
            .map(|(what, result)| (what, result.map_err(|e| e.kind())))
        })
        .expect("client")
}

#[test]
fn service_without_endpoints_is_refused_at_once() {
    let cluster = Cluster::start(1, &kubia_manifests(&ready(&[0]))).expect("cluster");
    for (what, outcome) in refusals(&cluster) {
        // A timeout would be TimedOut / WouldBlock: refused means the reset
        // or the ICMP error came back.
        assert_eq!(outcome, Err(ErrorKind::ConnectionRefused), "{what}");
    }
    // A process on the node itself, translated by the socket programs:
    // refused where the kernel lets them set the error (bpf_set_retval).
    let error = if kernel_feature_in_use(&cluster, "bpf_set_retval") { "Connection refused" } else { "Operation not permitted" };
    let from_node = cluster.cgroup.run_in(&cluster.node, "(exec 3<>/dev/tcp/10.96.0.11/80) 2>&1; true").expect("a node-local client");
    assert!(from_node.contains(error), "from the node, expected {error}: {from_node}");
    // Rejects are logged by the datapath at debug only; the agent runs at info.
    assert!(!cluster.agent.log().contains("reject 10.201.0.2"), "a packet was logged at the default level:\n{}", cluster.agent.log());
}

/// Without bpf_set_retval (before Linux 5.18, or disabled) a node process's
/// connect to a service without endpoints still fails at once, with EPERM,
/// and the socket programs still balance everything else.
#[test]
fn without_bpf_set_retval_a_node_connect_to_no_endpoints_fails_at_once_with_eperm() {
    let net = lb_tests::cluster::Topology::new(1, ClientHook::Tc).expect("namespaces");
    let cluster = kubia_with_flags(net, &[0], &["--disable-kernel-feature", "set-retval"]);
    assert!(cluster.agent.log().contains("disabled by --disable-kernel-feature"), "{}", cluster.agent.log());
    let started = std::time::Instant::now();
    let refused = cluster.cgroup.run_in(&cluster.node, "(exec 3<>/dev/tcp/10.96.0.11/80) 2>&1; true").expect("a node-local client");
    assert!(refused.contains("Operation not permitted"), "{refused}");
    assert!(started.elapsed() < Duration::from_secs(2), "the connect failed at once, not after a timeout");
    let served = cluster.cgroup.run_in(&cluster.node, "exec 3<>/dev/tcp/10.96.0.10/80 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && timeout 3 cat <&3; true").expect("a node-local client");
    assert!(served.contains("You've hit kubia-1"), "{served}");
    let metrics = http_get_until(&cluster.node, "127.0.0.1:10249", "/metrics", "lb_kernel_feature_in_use", Duration::from_secs(5));
    assert!(metrics.contains(r#"lb_kernel_feature_in_use{feature="bpf_set_retval",since="5.18"} 0"#), "{metrics}");
}

/// A service whose one endpoint (kubia-0) has nothing listening on the
/// target port.
const CLOSED_PORT_SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata: {name: closed, namespace: default}
spec:
  clusterIP: 10.96.0.12
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 5999}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: closed-1
  namespace: default
  labels: {kubernetes.io/service-name: closed}
addressType: IPv4
ports:
- {name: dns, port: 5999, protocol: UDP}
endpoints:
- addresses: ["10.244.1.2"]
  conditions: {ready: true}
"#;

/// The backend's own ICMP port unreachable reaches the client translated
/// (from the service, quoting the datagram the client sent): the client's
/// connected UDP socket fails at once with "connection refused" instead of
/// waiting for an answer that never comes.
#[test]
fn backend_port_unreachable_reaches_the_client_as_the_service() {
    let files = [(MANIFEST_FILE, kubia_manifests(&ready(&[0]))), ("closed.yaml", CLOSED_PORT_SERVICE.to_owned())];
    let files = files.each_ref().map(|(name, content)| (*name, content.as_str()));
    let cluster = Cluster::start_with(1, &files, ClientHook::Tc).expect("cluster");
    let outcome = cluster
        .client
        .enter(|| -> std::io::Result<()> {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(SocketAddrV4::new(std::net::Ipv4Addr::new(10, 96, 0, 12), 53))?;
            socket.set_read_timeout(Some(Duration::from_secs(5)))?;
            socket.send(b"query")?;
            socket.recv(&mut [0u8; 64]).map(drop)
        })
        .expect("client");
    assert_eq!(outcome.map_err(|e| e.kind()), Err(ErrorKind::ConnectionRefused), "a timeout means the ICMP error was not translated");
    let translated = cluster.maps().expect("pinned maps").verdict_count(lb_common::Reason::IcmpErrorTranslated).expect("counters");
    assert_eq!(translated, 1, "one ICMP error, counted once");
}

/// At debug, the datapath's log records (aya-log) reach the agent's log:
/// each reject names the client, the service address and why.
#[test]
fn datapath_logs_rejects_when_the_agent_runs_at_debug() {
    use lb_tests::cluster::{TempDir, Topology};
    let net = Topology::new(1, ClientHook::Tc).expect("namespaces");
    let manifests = TempDir::new("manifests").expect("dir");
    std::fs::write(manifests.0.join(MANIFEST_FILE), kubia_manifests(&ready(&[0]))).expect("manifest");
    let source = ["--manifests", &manifests.0.to_string_lossy(), "--log-level", "debug"].map(str::to_owned).to_vec();
    let cluster = Cluster::run_agent(net, source, Some(manifests)).expect("agent");
    for (what, outcome) in refusals(&cluster) {
        assert_eq!(outcome, Err(ErrorKind::ConnectionRefused), "{what}");
    }
    let timeout = Duration::from_secs(10);
    cluster.agent.wait_for(&["reject 10.201.0.2:", "-> 10.96.0.11:80", "has no endpoints"], timeout).expect("TCP reject logged");
    cluster.agent.wait_for(&["reject 10.201.0.2:", "-> 10.96.0.11:53", "has no endpoints"], timeout).expect("UDP reject logged");
    cluster.agent.wait_for(&["reject 10.201.0.2:", "-> 10.96.0.10:81", "has no such port"], timeout).expect("unknown port logged");
}
