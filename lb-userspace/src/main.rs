//! lb-agent: the node's service load balancer, in place of kube-proxy.
//!
//! It loads the datapath, programs it from the Kubernetes API or a manifest
//! directory, attaches it, and keeps it in sync until SIGINT or SIGTERM.
mod agent;

use std::{net::IpAddr, process::ExitCode, sync::Arc};

use agent::{Agent, Reporting, RunningSource, Shutdown, ThisNode};
use anyhow::{Context, bail};
use lb_common::{DATAPATH_ANSWER_ECHO, DATAPATH_MASQUERADE_ALL, DatapathConfig, DatapathConfigV6};
use lb_userspace::cli::IpCidr;
use clap::Parser;
use kube::{Client, Config, config::{KubeConfigOptions, Kubeconfig}};
use lb_userspace::{
    cli::{AgentArgs, PortRange, SocketLbScope, parse_port_range},
    datapath::Datapath,
    features::KernelFeatures,
    http::{self, Health},
    metrics::{self, AgentStats},
    source::{Source, api::{self, ApiSource}, manifests},
    sync::Syncer,
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{error, info, warn};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = AgentArgs::parse();
    if let Err(msg) = args.validate() {
        eprintln!("error: {msg}");
        return ExitCode::from(2);
    }
    let Ok(filter) = tracing_subscriber::EnvFilter::try_new(&args.log_level) else {
        eprintln!("error: --log-level {:?} is not a level (error, warn, info, debug, trace) or a tracing filter", args.log_level);
        return ExitCode::from(2);
    };
    let ebpf_log_level = filter.max_level_hint().and_then(ebpf_level);
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let result = if args.cleanup { cleanup(&args.bpffs_dir) } else { run(&args, ebpf_log_level).await };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The eBPF programs' log level for the agent's most verbose one.
fn ebpf_level(max: tracing::level_filters::LevelFilter) -> Option<aya_log::Level> {
    use tracing::Level;
    Some(match max.into_level()? {
        Level::ERROR => aya_log::Level::Error,
        Level::WARN => aya_log::Level::Warn,
        Level::INFO => aya_log::Level::Info,
        Level::DEBUG => aya_log::Level::Debug,
        Level::TRACE => aya_log::Level::Trace,
    })
}

/// Passes the programs' log records on as they arrive.
async fn forward_ebpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> anyhow::Result<()> {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the
    // same until the logger, owned by the AsyncFd, is dropped with it.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut logs = registered.map_err(|e| anyhow::anyhow!("watching the eBPF log ring buffer: {e}"))?;
    loop {
        let mut ready = logs.readable_mut().await.context("waiting for eBPF log records")?;
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

async fn run(args: &AgentArgs, ebpf_log_level: Option<aya_log::Level>) -> anyhow::Result<()> {
    let mut shutdown = Shutdown::new()?;
    let node = match &args.node_name {
        Some(name) => name.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the host name for --node-name")?.trim().to_owned(),
    };
    let mut node_ips = args.node_ips.clone();
    let running = start_source(args, &node, &mut node_ips).await?;

    let health = Arc::new(Health::default());
    let stats = Arc::new(AgentStats::default());
    let registry = Arc::new(metrics::registry(args.bpffs_dir.clone(), stats.clone()));
    for (addr, flag, endpoints) in [
        (args.healthz_addr, "--healthz-addr", http::Endpoints::Health(health.clone())),
        (args.metrics_addr, "--metrics-addr", http::Endpoints::Metrics(registry)),
    ] {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {flag} {addr} (choose another address)"))?;
        tokio::spawn(http::serve(listener, endpoints));
    }

    let features = KernelFeatures::probe(&args.disable_kernel_feature);
    let mut settings = args.map_settings();
    // A node with an IPv6 address serves IPv6: its IPv6 tables at full size.
    settings.limits.ipv6 |= node_ips.iter().any(IpAddr::is_ipv6);
    let (mut datapath, pinned) = Datapath::load_pinned(&args.bpffs_dir, ebpf_log_level, &settings, features)?;
    datapath.features().log();
    let logger = datapath.take_logger()?;
    tokio::spawn(async move {
        if let Err(e) = forward_ebpf_logs(logger).await {
            error!("{e:#}");
        }
    });
    for (table, flows) in &pinned.migrated {
        info!(table, entries = flows.len(), "conntrack entries of another layout or size migrated: established flows go on");
    }
    let emptied: Vec<_> = pinned.replaced.iter().filter(|name| !pinned.migrated.iter().any(|(m, _)| m == *name)).collect();
    if !emptied.is_empty() {
        warn!(maps = ?emptied, "pinned maps of another layout (an incompatible version) were replaced by empty ones");
    }
    lb_userspace::conntrack::spawn_collector(args.bpffs_dir.clone(), stats.conntrack.clone(), lb_userspace::conntrack::GcInterval::default())
        .context("starting the conntrack garbage collector")?;
    configure_datapath(args, &mut datapath, &node_ips)?;
    let (syncer, adopted) = Syncer::adopt(&datapath.maps.read_programmed()?, &mut datapath.maps, settings.limits)?;
    info!(maps = pinned.adopted.len(), services = adopted.adopted, discarded = adopted.discarded, "adopted the pinned datapath");
    let this_node = ThisNode { name: node, ips: node_ips };
    let agent = Agent::new(args, this_node, (datapath, syncer), Reporting { health, stats });
    agent.run(running, &mut shutdown).await
}

/// Writes the datapath's settings from the command line and this node's
/// addresses, and warns of what on the node would get in their way.
fn configure_datapath(args: &AgentArgs, datapath: &mut Datapath, node_ips: &[IpAddr]) -> anyhow::Result<()> {
    let host_netns_cookie = lb_userspace::sockets::netns_cookie();
    if args.socket_lb_scope == SocketLbScope::Node && host_netns_cookie.is_none() {
        bail!(
            "--socket-lb-scope node needs Linux 5.14 (SO_NETNS_COOKIE) to tell the node's sockets from pods'; \
             on this kernel give --cgroup a cgroup that holds only the node's processes (e.g. /sys/fs/cgroup/system.slice) instead"
        );
    }
    datapath.maps.set_config(DatapathConfig {
        snat_port_min: args.snat_port_range.min,
        snat_port_max: args.snat_port_range.max,
        flags: if args.answer_ping { DATAPATH_ANSWER_ECHO } else { 0 }
            | if args.masquerade_all { DATAPATH_MASQUERADE_ALL } else { 0 }
            | if args.socket_lb_scope == SocketLbScope::Node { lb_common::DATAPATH_SOCKET_LB_HOST_ONLY } else { 0 },
        cluster_cidrs: IpCidr::ipv4(&args.cluster_cidrs),
        service_cidrs: IpCidr::ipv4(&args.service_cidrs),
        ct_lifetimes: args.conntrack_lifetimes(),
        kernel_fallbacks: datapath.features().fallbacks(),
        host_netns_cookie: host_netns_cookie.unwrap_or(0),
        ..DatapathConfig::default()
    })?;
    datapath.maps.set_config_v6(DatapathConfigV6 {
        cluster_cidrs: IpCidr::ipv6(&args.cluster_cidrs),
        service_cidrs: IpCidr::ipv6(&args.service_cidrs),
        ..DatapathConfigV6::default()
    })?;
    datapath.maps.set_snat_ips(node_ips)?;
    warn_if_ephemeral_ports_overlap(args.snat_port_range);
    if !node_ips.is_empty()
        && let Err(e) = lb_userspace::datapath::accept_local_sources()
    {
        warn!(
            "{e}: translated node port, external and hairpin traffic may be dropped as martians \
             (set net.ipv4.conf.all.accept_local=1 on the node, as the DaemonSet's init container does)"
        );
    }
    if node_ips.is_empty() {
        warn!("no --node-ip: node ports answer nowhere, and external (Cluster policy) and hairpin traffic is dropped");
    }
    Ok(())
}

/// Starts following the source (--manifests, else the Kubernetes API),
/// and takes this node's addresses from it where no --node-ip gave them.
async fn start_source(args: &AgentArgs, node: &str, node_ips: &mut Vec<IpAddr>) -> anyhow::Result<RunningSource> {
    let (changes_tx, changes) = watch::channel(None);
    let (source, source_task): (Source, JoinHandle<anyhow::Result<()>>) = match &args.manifests {
        Some(dir) => {
            info!(dir = %dir.display(), node, "source: manifest directory");
            if node_ips.is_empty() {
                match lb_userspace::node_addresses::local() {
                    Ok(addresses) => {
                        info!(?addresses, "no --node-ip: node ports answer on this node's addresses (all but loopback and link-local, the default route's first)");
                        *node_ips = addresses;
                    }
                    Err(e) => warn!("reading this node's addresses: {e} (give --node-ip)"),
                }
            }
            let watched = dir.clone();
            let task = tokio::spawn(async move { Ok(manifests::watch(watched, changes_tx).await?) });
            (Source::Manifests(manifests::ManifestDir::for_node(dir.clone(), node)), task)
        }
        None => {
            let client = kube_client(args).await?;
            info!(node, "source: Kubernetes API");
            if node_ips.is_empty() {
                match api::node_addresses(client.clone(), node).await {
                    Ok(addresses) => {
                        info!(node, ?addresses, "node addresses from the Node object");
                        *node_ips = addresses;
                    }
                    Err(e) => warn!(node, "reading the Node object for its addresses: {e} (give --node-ip)"),
                }
            }
            let (api, task) = ApiSource::start(client, node, changes_tx);
            (Source::Api(api), tokio::spawn(async move {
                task.await;
                Ok(())
            }))
        }
    };
    Ok(RunningSource { source, task: source_task, changes })
}

/// Translated flows and the node's own connections share the node's
/// address: a source NAT port the node also picks for an outgoing
/// connection to the same backend would mix the two.
fn warn_if_ephemeral_ports_overlap(snat: PortRange) {
    const EPHEMERAL: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let Ok(ephemeral) = std::fs::read_to_string(EPHEMERAL).map_err(|e| e.to_string()).and_then(|text| parse_port_range(&text)) else {
        return;
    };
    if snat.overlaps(&ephemeral) {
        warn!("--snat-port-range {snat} overlaps the node's ephemeral ports {ephemeral} ({EPHEMERAL}): a translated flow and a connection of the node's own to the same backend could share a 5-tuple; pick a range outside it");
    }
}

/// `--cleanup`: detaches every program a previous agent left attached and
/// removes its pinned maps.
fn cleanup(dir: &std::path::Path) -> anyhow::Result<()> {
    let removed = lb_userspace::datapath::remove_pinned(dir)?;
    info!(removed, dir = %dir.display(), "removed the pinned datapath");
    Ok(())
}

async fn kube_client(args: &AgentArgs) -> anyhow::Result<Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).with_context(|| format!("reading --kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using --kubeconfig {}", path.display()))?
        }
        None => Config::incluster().context(
            "not running in a cluster (no service account): give --kubeconfig FILE, or --manifests DIR to run without a cluster",
        )?,
    };
    Client::try_from(config).context("creating the Kubernetes client")
}
