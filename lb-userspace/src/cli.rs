//! The `lb-agent` command line.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use clap::Parser;
use lb_common::{
    Ipv4Cidr, Ipv4Cidrs, Ipv6Cidr, Ipv6Cidrs, MAX_BACKEND_SLOTS, MAX_CIDRS, MAX_CONNTRACK_ENTRIES, MAX_FRONTENDS, MAX_PENDING_ENTRIES, MAX_SERVICES, MAX_VIPS, SNAT_PORT_MAX,
    SNAT_PORT_MIN,
};

/// The node agent of the eBPF service load balancer: loads the datapath,
/// attaches it to the given interfaces and keeps its maps equal to the
/// cluster's Services and EndpointSlices, read from the Kubernetes API or
/// from a directory of manifests.
#[derive(Debug, Parser)]
#[command(name = "lb-agent", version)]
pub struct AgentArgs {
    /// Read Services, EndpointSlices and Endpoints from the YAML/JSON
    /// manifests in this directory (watched for changes) instead of the
    /// Kubernetes API.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,

    /// Kubeconfig file for the Kubernetes API (default: the in-cluster
    /// service account).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// This node's name, for node-local endpoints (default: $NODE_NAME,
    /// else the host name).
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,

    /// An address of this node: node ports answer on it, and the first one
    /// is the source of translated external and hairpin traffic (so replies
    /// come back through this node). Repeatable. Default with the
    /// Kubernetes API: the Node object's InternalIP, then ExternalIP,
    /// addresses. IPv4 or IPv6: the first of each family is that family's
    /// source; an IPv6 address also gives the IPv6 tables their full size.
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ips: Vec<std::net::IpAddr>,

    /// The source ports of translated external and hairpin traffic, as
    /// MIN-MAX: at most one flow per port to each backend ip:port at a time.
    /// Keep it out of the node's own ephemeral range
    /// (net.ipv4.ip_local_port_range, 32768-60999 by default).
    #[arg(long, value_name = "MIN-MAX", default_value_t = PortRange { min: SNAT_PORT_MIN, max: SNAT_PORT_MAX }, value_parser = parse_snat_port_range)]
    pub snat_port_range: PortRange,

    /// The pods' address range, as ADDRESS/PREFIX (kube-proxy's
    /// --cluster-cidr): pods reaching an external address of a service with
    /// externalTrafficPolicy Local are served by all its endpoints, as
    /// through its cluster IP, not only by this node's. Repeatable, up to 4
    /// per family (IPv4 or IPv6, e.g. fd00:10:244::/56). Without it, pods
    /// are served like clients from outside.
    #[arg(long = "cluster-cidr", value_name = "CIDR", value_parser = parse_cidr)]
    pub cluster_cidrs: Vec<IpCidr>,

    /// The service (cluster IP) address range, as ADDRESS/PREFIX (the API
    /// server's --service-cluster-ip-range): a new connection to an address
    /// in it that no service has is dropped, as kube-proxy's nftables mode
    /// does, instead of being routed on. Repeatable, up to 4 per family
    /// (IPv4 or IPv6).
    #[arg(long = "service-cidr", value_name = "CIDR", value_parser = parse_cidr)]
    pub service_cidrs: Vec<IpCidr>,

    /// How long a TCP flow whose backend has not answered yet (a SYN sent)
    /// is kept without traffic, e.g. 60s, 2m, 1h30m.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_conntrack_timeout)]
    pub conntrack_tcp_timeout_syn: Duration,

    /// How long an established TCP flow is kept without traffic
    /// (kube-proxy's flag of the same name and default).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_conntrack_timeout)]
    pub conntrack_tcp_timeout_established: Duration,

    /// How long a TCP flow is kept without traffic after one side's FIN
    /// (the other may still send; kube-proxy's flag of the same name and
    /// default).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_conntrack_timeout)]
    pub conntrack_tcp_timeout_close_wait: Duration,

    /// How long a TCP flow is kept after both FINs or a RST, for stray
    /// packets (Linux's close timeout). A new connection on its ports, and
    /// a new flow needing its source NAT port, take it over at once.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_conntrack_timeout)]
    pub conntrack_tcp_timeout_close: Duration,

    /// How long a UDP flow without a reply is kept without traffic
    /// (kube-proxy's flag of the same name; Linux's default).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_conntrack_timeout)]
    pub conntrack_udp_timeout: Duration,

    /// How long an answered UDP flow is kept without traffic (kube-proxy's
    /// flag of the same name; Linux's default).
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_conntrack_timeout)]
    pub conntrack_udp_timeout_stream: Duration,

    /// Entries of the TCP conntrack table (two per flow). Each CPU's LRU
    /// list holds an equal share: a CPU that records more flows than its
    /// share evicts its own least recently used.
    #[arg(long, value_name = "ENTRIES", default_value_t = MAX_CONNTRACK_ENTRIES, value_parser = parse_table_size)]
    pub conntrack_tcp_max: u32,

    /// Entries of the UDP conntrack table (two per flow), shared among the
    /// CPUs like --conntrack-tcp-max.
    #[arg(long, value_name = "ENTRIES", default_value_t = MAX_CONNTRACK_ENTRIES, value_parser = parse_table_size)]
    pub conntrack_udp_max: u32,

    /// Entries of the table of TCP connections opened by a SYN and not yet
    /// answered by their backend (two per connection). A SYN flood churns
    /// only this table; established connections are never evicted by it.
    #[arg(long, value_name = "ENTRIES", default_value_t = MAX_PENDING_ENTRIES, value_parser = parse_table_size)]
    pub conntrack_tcp_pending_max: u32,

    /// Entries of the backend tables (BACKEND_SLOTS and
    /// BACKEND_SET_MEMBERS): one per endpoint of each service port, plus one
    /// per draining endpoint. A service port that does not fit is left out,
    /// logged with its name and the limit, and counted in
    /// lb_service_ports_over_capacity; every other one is served.
    #[arg(long, value_name = "ENTRIES", default_value_t = MAX_BACKEND_SLOTS, value_parser = parse_table_size)]
    pub backend_slots_max: u32,

    /// Entries of SERVICE_FRONTENDS: one per (address, port, protocol) a
    /// service answers on (cluster IPs, node ports on each node address,
    /// load balancer and external IPs). Beyond it, as --backend-slots-max.
    #[arg(long, value_name = "ENTRIES", default_value_t = MAX_FRONTENDS, value_parser = parse_table_size)]
    pub frontends_max: u32,

    /// Entries of SERVICE_VIPS: distinct service addresses (cluster IPs,
    /// node addresses, load balancer and external IPs). Beyond it, as
    /// --backend-slots-max.
    #[arg(long, value_name = "ENTRIES", default_value_t = MAX_VIPS, value_parser = parse_table_size)]
    pub service_addresses_max: u32,

    /// Service ports (each port of each service, and its external side
    /// apart): the entries of SERVICE_BACKEND_SETS, SERVICE_COUNTERS (per
    /// CPU, 32 bytes each) and SERVICE_NAMES. Beyond it, as
    /// --backend-slots-max.
    #[arg(long, value_name = "ENTRIES", default_value_t = MAX_SERVICES, value_parser = parse_table_size)]
    pub service_ports_max: u32,

    /// Answer ICMP echo requests (ping) to cluster IPs from the datapath, so
    /// that "can I ping my service?" gets a yes. Off by default, as with
    /// kube-proxy's iptables mode, where nothing answers on a cluster IP.
    #[arg(long)]
    pub answer_ping: bool,

    /// Which sockets the socket programs translate at connect and send time:
    /// `all` (default: the node's processes and every pod whose processes
    /// sit under --cgroup, which then reach backends with no per-packet
    /// translation) or `node` (the node's own only; pods are translated per
    /// packet and keep seeing the cluster IP as their peer, as a service
    /// mesh's sidecar needs; Linux 5.14).
    #[arg(long, value_enum, default_value_t = SocketLbScope::All)]
    pub socket_lb_scope: SocketLbScope,

    /// Translate the source of every connection to a cluster IP to the
    /// node's address (kube-proxy's --masquerade-all). Without it, only
    /// clients outside --cluster-cidr are (when it is given), as kube-proxy.
    #[arg(long)]
    pub masquerade_all: bool,

    /// Attach the tc (tcx) ingress program to this interface. Repeatable.
    #[arg(long = "iface", value_name = "NAME")]
    pub ifaces: Vec<String>,

    /// Attach the tc ingress program to every interface whose name matches
    /// this pattern (`*` and `?`, e.g. 'veth*', 'cali*', 'cni*'), including
    /// interfaces created later; detach from removed ones. Repeatable.
    #[arg(long = "iface-pattern", value_name = "GLOB")]
    pub iface_patterns: Vec<String>,

    /// Attach the XDP program instead to this interface (for NICs whose
    /// packets carry complete checksums). Repeatable.
    #[arg(long = "xdp-iface", value_name = "NAME")]
    pub xdp_ifaces: Vec<String>,

    /// The cgroup (v2) whose processes reach services through the socket
    /// programs: the node's own processes, hostNetwork pods and the kubelet,
    /// whose packets pass no ingress hook (default: the cgroup v2 root,
    /// /sys/fs/cgroup or /sys/fs/cgroup/unified).
    #[arg(long, value_name = "DIR", conflicts_with = "no_socket_lb")]
    pub cgroup: Option<PathBuf>,

    /// Do not attach the socket programs: the node's own processes do not
    /// reach services.
    #[arg(long)]
    pub no_socket_lb: bool,

    /// Use the older mechanism even where the kernel has this feature (so
    /// the fallbacks of older kernels can be tried on a new one). Repeatable
    /// or comma-separated. `lbctl kernel` shows what is in use.
    #[arg(long, value_name = "FEATURE", value_enum, value_delimiter = ',')]
    pub disable_kernel_feature: Vec<crate::features::Feature>,

    /// Directory on a bpf filesystem where the maps are pinned; distinct per
    /// agent when several run on one machine.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/lb")]
    pub bpffs_dir: PathBuf,

    /// Where to serve /healthz and /livez (kube-proxy's health port).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:10256")]
    pub healthz_addr: std::net::SocketAddr,

    /// Where to serve the Prometheus metrics (/metrics; kube-proxy's
    /// metrics port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
    pub metrics_addr: std::net::SocketAddr,

    /// Least average time between syncs, in milliseconds: a change after a
    /// quiet period is applied at once (up to two back to back), changes in
    /// a burst are applied together.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub min_sync_interval_ms: u64,

    /// Detach the programs a previous agent left attached, remove its pinned
    /// maps under --bpffs-dir, and exit (to uninstall; a plain stop leaves
    /// the datapath running for the next agent to take over).
    #[arg(long)]
    pub cleanup: bool,

    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
}

/// An inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.min <= other.max && other.min <= self.max
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

/// "MIN-MAX", or the two numbers apart as ip_local_port_range prints them.
pub fn parse_port_range(text: &str) -> Result<PortRange, String> {
    let trimmed = text.trim();
    let (min, max) = trimmed
        .split_once('-')
        .or_else(|| trimmed.split_once(char::is_whitespace))
        .ok_or_else(|| format!("{text:?}: expected MIN-MAX, e.g. 61000-65535"))?;
    let port = |s: &str| s.trim().parse::<u16>().map_err(|_| format!("{text:?}: {:?} is not a port (0-65535)", s.trim()));
    let range = PortRange { min: port(min)?, max: port(max)? };
    if range.min > range.max {
        return Err(format!("{text:?}: the first port is above the second"));
    }
    Ok(range)
}

/// "ADDRESS/PREFIX", the address with no bits set beyond the prefix.
pub fn parse_cidr(text: &str) -> Result<IpCidr, String> {
    let (address, prefix) = text.trim().split_once('/').ok_or_else(|| format!("{text:?}: expected ADDRESS/PREFIX, e.g. 10.244.0.0/16 or fd00:10:244::/56"))?;
    let network: IpAddr = address.parse().map_err(|_| format!("{text:?}: {address:?} is not an IP address"))?;
    let bits: u8 = if network.is_ipv4() { 32 } else { 128 };
    let prefix_len: u8 = prefix.parse().ok().filter(|&p| p <= bits).ok_or_else(|| format!("{text:?}: the prefix length {prefix:?} is not 0-{bits}"))?;
    Ok(match network {
        IpAddr::V4(network) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0);
            if u32::from(network) & !mask != 0 {
                return Err(format!("{text:?}: the address has bits set beyond the prefix (the range starts at {}/{prefix_len})", Ipv4Addr::from(u32::from(network) & mask)));
            }
            IpCidr::V4(Ipv4Cidr::new(network, prefix_len))
        }
        IpAddr::V6(network) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix_len)).unwrap_or(0);
            if u128::from(network) & !mask != 0 {
                return Err(format!("{text:?}: the address has bits set beyond the prefix (the range starts at {}/{prefix_len})", Ipv6Addr::from(u128::from(network) & mask)));
            }
            IpCidr::V6(Ipv6Cidr::new(network, prefix_len))
        }
    })
}

/// An address range of either family (`--cluster-cidr`, `--service-cidr`,
/// ServiceCIDR objects).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpCidr {
    V4(Ipv4Cidr),
    V6(Ipv6Cidr),
}

impl std::fmt::Display for IpCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IpCidr::V4(range) => range.fmt(f),
            IpCidr::V6(range) => range.fmt(f),
        }
    }
}

impl IpCidr {
    /// The IPv4 ones of `ranges`, the first `MAX_CIDRS`, as the datapath
    /// holds them.
    pub fn ipv4(ranges: &[IpCidr]) -> Ipv4Cidrs {
        Ipv4Cidrs::new(ranges.iter().filter_map(|r| if let IpCidr::V4(r) = r { Some(*r) } else { None }).take(MAX_CIDRS))
    }

    /// The IPv6 ones, as `ipv4`.
    pub fn ipv6(ranges: &[IpCidr]) -> Ipv6Cidrs {
        Ipv6Cidrs::new(ranges.iter().filter_map(|r| if let IpCidr::V6(r) = r { Some(*r) } else { None }).take(MAX_CIDRS))
    }

    /// How many of `ranges` are IPv4 and IPv6.
    pub fn counts(ranges: &[IpCidr]) -> (usize, usize) {
        let v4 = ranges.iter().filter(|r| matches!(r, IpCidr::V4(_))).count();
        (v4, ranges.len() - v4)
    }
}

/// The shortest conntrack timeout: longer than the ~4.3 s (`REFRESH_TICKS`)
/// by which a busy flow's expiry may lag its last packet.
const MIN_CONNTRACK_TIMEOUT: Duration = Duration::from_secs(6);

/// A duration as Go (and so kube-proxy) writes it: numbers with units h,
/// m, s, one after the other ("24h", "1h30m", "90s"); a bare number is
/// seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if let Ok(secs) = trimmed.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total: u64 = 0;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let unit_len = rest[digits..].find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len() - digits);
        let (number, unit) = (&rest[..digits], &rest[digits..digits + unit_len]);
        let number: u64 = number.parse().map_err(|_| format!("{text:?}: expected a duration such as 60s, 2m or 1h30m"))?;
        let scale = match unit {
            "h" => 3600,
            "m" => 60,
            "s" => 1,
            _ => return Err(format!("{text:?}: unknown unit {unit:?}; use h, m or s (60s, 2m, 1h30m)")),
        };
        total = number.checked_mul(scale).and_then(|secs| total.checked_add(secs)).ok_or_else(|| format!("{text:?}: too long"))?;
        rest = &rest[digits + unit_len..];
    }
    if trimmed.is_empty() {
        return Err("an empty duration; expected e.g. 60s, 2m or 1h30m".into());
    }
    Ok(Duration::from_secs(total))
}

/// A conntrack timeout: a duration of at least `MIN_CONNTRACK_TIMEOUT`.
fn parse_conntrack_timeout(text: &str) -> Result<Duration, String> {
    let timeout = parse_duration(text)?;
    if timeout < MIN_CONNTRACK_TIMEOUT {
        return Err(format!(
            "{text:?}: conntrack timeouts are at least {}s (a busy flow's expiry is moved on every few seconds, not on every packet)",
            MIN_CONNTRACK_TIMEOUT.as_secs()
        ));
    }
    Ok(timeout)
}

/// `--socket-lb-scope`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketLbScope {
    /// The node's processes and every pod under --cgroup.
    All,
    /// The node's own processes only.
    Node,
}

/// A table size: from 1,024 up to 2^28 entries.
fn parse_table_size(text: &str) -> Result<u32, String> {
    let size: u32 = text.trim().replace('_', "").parse().map_err(|_| format!("{text:?}: expected a number of entries, e.g. 524288"))?;
    if !(1024..=1 << 28).contains(&size) {
        return Err(format!("{text:?}: a table holds from 1024 to 268435456 entries"));
    }
    Ok(size)
}

/// A port range for source NAT: as `parse_port_range`, from 1024 up.
fn parse_snat_port_range(text: &str) -> Result<PortRange, String> {
    let range = parse_port_range(text)?;
    if range.min < 1024 {
        return Err(format!("{text:?}: ports below 1024 belong to the node's services; start at 1024 or above"));
    }
    Ok(range)
}

impl AgentArgs {
    /// Checks what clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.cleanup {
            return Ok(());
        }
        if self.ifaces.is_empty() && self.xdp_ifaces.is_empty() && self.iface_patterns.is_empty() {
            return Err("no interface to attach to: give at least one --iface NAME, --iface-pattern GLOB or --xdp-iface NAME".into());
        }
        for (flag, ranges) in [("--cluster-cidr", &self.cluster_cidrs), ("--service-cidr", &self.service_cidrs)] {
            let (v4, v6) = IpCidr::counts(ranges);
            for (count, family) in [(v4, "IPv4"), (v6, "IPv6")] {
                if count > MAX_CIDRS {
                    return Err(format!("{count} {family} {flag} ranges given; at most {MAX_CIDRS} per family are supported"));
                }
            }
        }
        if let Some(both) = self.ifaces.iter().find(|i| self.xdp_ifaces.contains(i)) {
            return Err(format!("{both} is given to both --iface and --xdp-iface; a packet would be translated twice"));
        }
        if let Some(dir) = &self.manifests
            && !dir.is_dir()
        {
            return Err(format!("--manifests {}: not a directory", dir.display()));
        }
        Ok(())
    }

    /// The conntrack lifetimes of the flags, in the datapath's clock ticks.
    pub fn conntrack_lifetimes(&self) -> lb_common::lifecycle::ConntrackLifetimes {
        lb_common::lifecycle::ConntrackLifetimes::from_secs([
            self.conntrack_tcp_timeout_syn,
            self.conntrack_tcp_timeout_established,
            self.conntrack_tcp_timeout_close_wait,
            self.conntrack_tcp_timeout_close,
            self.conntrack_udp_timeout,
            self.conntrack_udp_timeout_stream,
        ]
        .map(|d| d.as_secs()))
    }

    /// What the agent asks of the maps it creates.
    pub fn map_settings(&self) -> crate::maps::MapSettings {
        crate::maps::MapSettings {
            conntrack_tcp_max: self.conntrack_tcp_max,
            conntrack_udp_max: self.conntrack_udp_max,
            conntrack_tcp_pending_max: self.conntrack_tcp_pending_max,
            limits: crate::sync::Limits {
                backend_slots: self.backend_slots_max,
                frontends: self.frontends_max,
                addresses: self.service_addresses_max,
                service_ports: self.service_ports_max,
                ipv6: self.serves_ipv6(),
                ..crate::sync::Limits::default()
            },
            ct_lifetimes: self.conntrack_lifetimes(),
        }
    }

    /// Whether the flags give this node IPv6 (an IPv6 node address or
    /// range), so that its IPv6 tables get their full size.
    pub fn serves_ipv6(&self) -> bool {
        self.node_ips.iter().any(IpAddr::is_ipv6) || self.cluster_cidrs.iter().chain(&self.service_cidrs).any(|r| matches!(r, IpCidr::V6(_)))
    }

    pub fn min_sync_interval(&self) -> Duration {
        Duration::from_millis(self.min_sync_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<AgentArgs, String> {
        let args = AgentArgs::try_parse_from(std::iter::once("lb-agent").chain(args.iter().copied())).map_err(|e| e.to_string())?;
        args.validate()?;
        Ok(args)
    }

    #[test]
    fn wrong_flags_say_what_is_wrong() {
        let cases: [(&[&str], &str); 22] = [
            (&["--iface", "eth0", "--conntrack-udp-timeout", "2s"], "at least 6s"),
            (&["--iface", "eth0", "--conntrack-tcp-max", "100"], "from 1024 to 268435456"),
            (&["--iface", "eth0", "--conntrack-udp-max", "many"], "expected a number of entries"),
            (&["--iface", "eth0", "--conntrack-tcp-timeout-close", "5d"], "unknown unit"),
            (&["--manifests", "/"], "no interface"),
            (&["--iface", "eth0", "--xdp-iface", "eth0", "--manifests", "/"], "both --iface and --xdp-iface"),
            (&["--iface", "eth0", "--manifests", "/nonexistent-dir"], "not a directory"),
            (&["--iface", "eth0", "--manifests", "/", "--kubeconfig", "k"], "cannot be used with"),
            (&["--iface", "eth0", "--min-sync-interval-ms", "soon"], "invalid value"),
            (&["--iface", "eth0", "--healthz-addr", "10256"], "invalid socket address"),
            (&["--iface", "eth0", "--snat-port-range", "61000"], "expected MIN-MAX"),
            (&["--iface", "eth0", "--snat-port-range", "65535-61000"], "first port is above the second"),
            (&["--iface", "eth0", "--snat-port-range", "80-1000"], "below 1024"),
            (&["--iface", "eth0", "--cluster-cidr", "10.244.0.0"], "expected ADDRESS/PREFIX"),
            (&["--iface", "eth0", "--cluster-cidr", "10.244.0.0/33"], "prefix length \"33\" is not 0-32"),
            (&["--iface", "eth0", "--cluster-cidr", "10.244.1.0/16"], "range starts at 10.244.0.0/16"),
            (
                &["--iface", "eth0", "--cluster-cidr", "10.1.0.0/16", "--cluster-cidr", "10.2.0.0/16", "--cluster-cidr", "10.3.0.0/16", "--cluster-cidr", "10.4.0.0/16", "--cluster-cidr", "10.5.0.0/16"],
                "at most 4",
            ),
            (&["--iface", "eth0", "--service-cidr", "10.96.0.0/12x"], "prefix length \"12x\" is not 0-32"),
            (&["--iface", "eth0", "--service-cidr", "fd00:10:96::/129"], "prefix length \"129\" is not 0-128"),
            (&["--iface", "eth0", "--cluster-cidr", "fd00:10:244::1/56"], "range starts at fd00:10:244::/56"),
            (&["--iface", "eth0", "--node-ip", "fd00::1::2"], "invalid value"),
            (
                &["--iface", "eth0", "--manifests", "/", "--cluster-cidr", "fd01::/64", "--cluster-cidr", "fd02::/64", "--cluster-cidr", "fd03::/64", "--cluster-cidr", "fd04::/64", "--cluster-cidr", "fd05::/64"],
                "5 IPv6 --cluster-cidr ranges given; at most 4 per family",
            ),
        ];
        for (args, expected) in cases {
            let error = parse(args).err().unwrap_or_default();
            assert!(error.contains(expected), "{args:?}: {error:?} should say {expected:?}");
        }
    }

    #[test]
    fn durations_parse_as_go_writes_them() {
        let cases = [
            ("hours", "24h", Ok(86_400)),
            ("hours and minutes", "1h30m", Ok(5_400)),
            ("seconds", "90s", Ok(90)),
            ("a bare number is seconds", "45", Ok(45)),
            ("all three units", "1h1m1s", Ok(3_661)),
            ("an unknown unit", "5d", Err("unknown unit \"d\"")),
            ("a unit without a number", "h", Err("expected a duration")),
            ("nothing", "", Err("empty duration")),
            ("overflow", "99999999999999999999h", Err("expected a duration")),
        ];
        for (rule, text, want) in cases {
            match (parse_duration(text), want) {
                (Ok(got), Ok(secs)) => assert_eq!(got, Duration::from_secs(secs), "{rule}"),
                (Err(got), Err(says)) => assert!(got.contains(says), "{rule}: {got:?} should say {says:?}"),
                (got, want) => panic!("{rule}: {got:?}, want {want:?}"),
            }
        }
        let args = parse(&["--iface", "eth0", "--conntrack-tcp-timeout-close", "7s"]).expect("valid");
        assert_eq!(args.conntrack_lifetimes().tcp_closed, lb_common::lifecycle::ticks_from_secs(7));
        assert_eq!(args.conntrack_lifetimes().tcp_established, lb_common::lifecycle::ticks_from_secs(86_400), "kube-proxy's default");
    }

    #[test]
    fn port_ranges_parse_as_written_and_as_the_kernel_prints_them() {
        let cases = [("61000-65535", (61000, 65535)), ("32768\t60999", (32768, 60999)), ("2000 - 2000", (2000, 2000))];
        for (text, (min, max)) in cases {
            assert_eq!(parse_port_range(text), Ok(PortRange { min, max }), "{text:?}");
        }
        let default = AgentArgs::try_parse_from(["lb-agent", "--iface", "eth0"]).expect("valid").snat_port_range;
        assert_eq!(default, PortRange { min: 61000, max: 65535 });
        assert!(default.overlaps(&PortRange { min: 32768, max: 61000 }) && !default.overlaps(&PortRange { min: 32768, max: 60999 }));
    }

    #[test]
    fn cluster_cidrs_parse_with_their_prefix_in_both_families() {
        let args = parse(&["--iface", "eth0", "--cluster-cidr", "10.244.0.0/16", "--cluster-cidr", "0.0.0.0/0", "--cluster-cidr", "fd00:10:244::/56"])
            .expect("valid");
        let v4 = [Ipv4Cidr::new(Ipv4Addr::new(10, 244, 0, 0), 16), Ipv4Cidr::new(Ipv4Addr::UNSPECIFIED, 0)];
        assert!(v4[0].contains(lb_common::ip_be(Ipv4Addr::new(10, 244, 255, 1))) && v4[1].contains(u32::MAX));
        let v6 = Ipv6Cidr::new("fd00:10:244::".parse().expect("address"), 56);
        assert!(v6.contains(lb_common::Ipv6::new("fd00:10:244:ff::9".parse().expect("address"))));
        assert_eq!(args.cluster_cidrs, [IpCidr::V4(v4[0]), IpCidr::V4(v4[1]), IpCidr::V6(v6)]);
        assert_eq!(IpCidr::ipv4(&args.cluster_cidrs), Ipv4Cidrs::new(v4), "the IPv4 ones for DATAPATH_CONFIG");
        assert_eq!(IpCidr::ipv6(&args.cluster_cidrs), Ipv6Cidrs::new([v6]), "the IPv6 one for DATAPATH_CONFIG_V6");
        assert!(args.serves_ipv6(), "an IPv6 range gives the IPv6 tables their full size");
        assert!(!parse(&["--iface", "eth0", "--node-ip", "10.0.0.1"]).expect("valid").serves_ipv6());
        assert!(parse(&["--iface", "eth0", "--node-ip", "fd00::1"]).expect("valid").serves_ipv6());
    }

    #[test]
    fn node_name_comes_from_the_environment_unless_given() {
        let args = AgentArgs::try_parse_from(["lb-agent", "--iface", "eth0", "--node-name", "n1"]).expect("valid");
        assert_eq!(args.node_name.as_deref(), Some("n1"));
    }
}
