//! lb-agent: loads the datapath, programs it from the Kubernetes API or a
//! manifest directory, attaches it, and keeps it in sync until SIGINT or
//! SIGTERM.
use std::{
    collections::{BTreeSet, HashSet},
    process::ExitCode,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use anyhow::{Context, bail};
use lb_common::{DATAPATH_ANSWER_ECHO, DATAPATH_MASQUERADE_ALL, DatapathConfig, Ipv4Cidrs, KERNEL_FALLBACK_NO_SOCKET_LB};
use clap::Parser;
use kube::{Client, Config, config::{KubeConfigOptions, Kubeconfig}};
use lb_userspace::{
    cli::{AgentArgs, PortRange, SocketLbScope, parse_port_range},
    datapath::Datapath,
    features::KernelFeatures,
    http::{self, Health},
    iface_watch::{self, LinkEvent},
    metrics::{self, AgentStats, ServiceLabels},
    model::kubernetes::Model,
    source::{ChangeReceiver, Source, api::{self, ApiSource}, manifests},
    sync::{SyncLimiter, Syncer},
};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
    task::JoinHandle,
};
use tracing::{error, info, warn};

/// Syncs allowed back to back before --min-sync-interval-ms spaces them.
const SYNC_BURST: u32 = 2;

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

/// Signals that end the agent.
struct Shutdown {
    terminate: Signal,
    interrupt: Signal,
}

impl Shutdown {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
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
    let (changes_tx, changes) = watch::channel(None);
    let (source, source_task): (Source, JoinHandle<anyhow::Result<()>>) = match &args.manifests {
        Some(dir) => {
            info!(dir = %dir.display(), node, "source: manifest directory");
            if node_ips.is_empty() {
                match lb_userspace::node_addresses::local() {
                    Ok(addresses) => {
                        info!(?addresses, "no --node-ip: node ports answer on this node's addresses (all but loopback and link-local, the default route's first)");
                        node_ips = addresses;
                    }
                    Err(e) => warn!("reading this node's addresses: {e} (give --node-ip)"),
                }
            }
            let watched = dir.clone();
            let task = tokio::spawn(async move { Ok(manifests::watch(watched, changes_tx).await?) });
            (Source::Manifests(manifests::ManifestDir::for_node(dir.clone(), &node)), task)
        }
        None => {
            let client = kube_client(args).await?;
            info!(node, "source: Kubernetes API");
            if node_ips.is_empty() {
                match api::node_addresses(client.clone(), &node).await {
                    Ok(addresses) => {
                        info!(node, ?addresses, "node addresses from the Node object");
                        node_ips = addresses;
                    }
                    Err(e) => warn!(node, "reading the Node object for its addresses: {e} (give --node-ip)"),
                }
            }
            let (api, task) = ApiSource::start(client, &node, changes_tx);
            (Source::Api(api), tokio::spawn(async move {
                task.await;
                Ok(())
            }))
        }
    };

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
    let (mut datapath, pinned) = Datapath::load_pinned(&args.bpffs_dir, ebpf_log_level, &args.map_settings(), features)?;
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
    let host_netns_cookie = lb_userspace::sockets::netns_cookie();
    if args.socket_lb_scope == SocketLbScope::Node && host_netns_cookie.is_none() {
        bail!(
            "--socket-lb-scope node needs Linux 5.14 (SO_NETNS_COOKIE) to tell the node's sockets from pods'; \
             on this kernel give --cgroup a cgroup that holds only the node's processes (e.g. /sys/fs/cgroup/system.slice) instead"
        );
    }
    datapath.maps.set_config(DatapathConfig {
        snat_ip: node_ips.first().map_or(0, |&ip| lb_common::ip_be(ip)),
        snat_port_min: args.snat_port_range.min,
        snat_port_max: args.snat_port_range.max,
        flags: if args.answer_ping { DATAPATH_ANSWER_ECHO } else { 0 }
            | if args.masquerade_all { DATAPATH_MASQUERADE_ALL } else { 0 }
            | if args.socket_lb_scope == SocketLbScope::Node { lb_common::DATAPATH_SOCKET_LB_HOST_ONLY } else { 0 },
        cluster_cidrs: Ipv4Cidrs::new(args.cluster_cidrs.iter().copied()),
        service_cidrs: Ipv4Cidrs::new(args.service_cidrs.iter().copied()),
        ct_lifetimes: args.conntrack_lifetimes(),
        kernel_fallbacks: datapath.features().fallbacks(),
        host_netns_cookie: host_netns_cookie.unwrap_or(0),
        ..DatapathConfig::default()
    })?;
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
    let (syncer, adopted) = Syncer::adopt(&datapath.maps.read_programmed()?, &mut datapath.maps, args.map_settings().limits)?;
    info!(maps = pinned.adopted.len(), services = adopted.adopted, discarded = adopted.discarded, "adopted the pinned datapath");
    let running = RunningSource { source, task: source_task, changes };
    let reporting = Reporting { health: &health, stats: &stats };
    let this_node = ThisNode { name: &node, ips: &node_ips };
    let result = serve(args, this_node, running, (&mut datapath, syncer), reporting, &mut shutdown).await;
    // Programs stay attached and maps pinned: the next agent takes them over
    // (`lb-agent --cleanup` removes them).
    datapath.keep_attached()?;
    result
}

/// `--cleanup`: detaches every program a previous agent left attached and
/// removes its pinned maps.
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

/// A started source: its objects, the task that follows it, and the
/// channel on which it signals changes.
struct RunningSource {
    source: Source,
    task: JoinHandle<anyhow::Result<()>>,
    changes: ChangeReceiver,
}

/// The node the agent runs on: its name and its addresses.
#[derive(Clone, Copy)]
struct ThisNode<'a> {
    name: &'a str,
    ips: &'a [std::net::Ipv4Addr],
}

async fn serve(
    args: &AgentArgs,
    node: ThisNode<'_>,
    running: RunningSource,
    (datapath, mut syncer): (&mut Datapath, Syncer),
    reporting: Reporting<'_>,
    shutdown: &mut Shutdown,
) -> anyhow::Result<()> {
    let RunningSource { mut source, task: source_task, mut changes } = running;
    let mut model = Model::with_node_ips(node.ips.to_vec());
    let mut reported = HashSet::new();
    let mut limiter = SyncLimiter::new(SYNC_BURST, args.min_sync_interval(), Instant::now());
    let mut generation = 0u64;
    // Interfaces attached by pattern, and their events (from the first sync on).
    let mut by_pattern: HashSet<String> = HashSet::new();
    let mut health_checks = http::HealthCheckServers::default();
    let (link_events_tx, mut link_events) = tokio::sync::mpsc::unbounded_channel();
    let mut link_events_tx = Some(link_events_tx);
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    source_task.await.context("source task")??;
                    bail!("the source stopped");
                }
                // A lone change is applied at once; in a burst, changes that
                // come in while a sync waits are applied together by it.
                tokio::time::sleep(limiter.delay(Instant::now())).await;
                let Some(noticed) = *changes.borrow_and_update() else { continue };
                generation += 1;
                limiter.record(Instant::now());
                let state = State { model: &mut model, syncer: &mut syncer, reported: &mut reported };
                let follow = Follow { node_ips: args.node_ips.is_empty(), service_cidrs: args.service_cidrs.is_empty() };
                sync(&mut source, (node.name, follow), state, datapath, generation, noticed, reporting)?;
                health_checks.update(model.state.health_checks()).await;
                reporting.health.record_sync();
                if generation == 1 {
                    for iface in &args.ifaces {
                        let how = datapath.attach_tc(iface)?;
                        info!(iface, ?how, "attached tc ingress");
                        loosen_reverse_path_filter(iface);
                    }
                    for iface in &args.xdp_ifaces {
                        let how = datapath.attach_xdp(iface)?;
                        info!(iface, ?how, "attached xdp");
                        loosen_reverse_path_filter(iface);
                    }
                    if datapath.features().fallbacks() & KERNEL_FALLBACK_NO_SOCKET_LB != 0 {
                        warn!("the socket programs did not load: the node's own processes do not reach services");
                    } else if !args.no_socket_lb {
                        let cgroup = args.cgroup.clone().or_else(lb_userspace::datapath::cgroup2_root).context(
                            "no cgroup v2 hierarchy for the socket programs: give --cgroup DIR, or --no-socket-lb",
                        )?;
                        datapath.attach_sockets(&cgroup)?;
                        info!(cgroup = %cgroup.display(), "attached the socket programs (the node's own processes)");
                    }
                    if args.iface_patterns.is_empty() {
                        release_stale_links(datapath)?;
                    }
                    if let Some(tx) = link_events_tx.take().filter(|_| !args.iface_patterns.is_empty()) {
                        tokio::spawn(async move {
                            if let Err(e) = iface_watch::watch(tx).await {
                                error!("following interfaces: {e}");
                            }
                        });
                    }
                    reporting.health.set_ready();
                    info!(pinned = %args.bpffs_dir.display(), healthz = %args.healthz_addr, "ready");
                }
            }
            Some(event) = link_events.recv() => follow_link(args, datapath, &mut by_pattern, event)?,
            () = shutdown.recv() => break,
        }
    }
    info!("shutting down: the programs stay attached for the next agent");
    Ok(())
}

/// Once every wanted interface is attached: lets go of the interfaces a
/// previous agent was attached to and this one does not want.
fn release_stale_links(datapath: &Datapath) -> anyhow::Result<()> {
    for iface in datapath.release_stale_links()? {
        info!(iface, "detached from an interface the previous agent had and this one does not want");
    }
    Ok(())
}

/// Strict reverse-path filtering would drop the replies translated on
/// `iface`: made loose, or the user told how.
fn loosen_reverse_path_filter(iface: &str) {
    match lb_userspace::datapath::loosen_reverse_path_filter(iface) {
        Ok(true) => info!(iface, "reverse-path filtering was strict; made loose (rp_filter=2), or translated replies would be dropped"),
        Ok(false) => {}
        Err(e) => warn!(
            iface,
            "{e}: with strict reverse-path filtering translated replies are dropped \
             (set net.ipv4.conf.{iface}.rp_filter=2 on the node)"
        ),
    }
}

/// Attaches to a new interface matching a pattern, lets go of a removed one.
fn follow_link(args: &AgentArgs, datapath: &mut Datapath, by_pattern: &mut HashSet<String>, event: LinkEvent) -> anyhow::Result<()> {
    match event {
        LinkEvent::Present(iface) => {
            let wanted = args.iface_patterns.iter().any(|p| iface_watch::matches(p, &iface))
                && !args.ifaces.contains(&iface)
                && !args.xdp_ifaces.contains(&iface);
            if wanted && !by_pattern.contains(&iface) {
                match datapath.attach_tc(&iface) {
                    Ok(how) => {
                        info!(iface, ?how, "attached tc ingress (pattern)");
                        loosen_reverse_path_filter(&iface);
                        by_pattern.insert(iface);
                    }
                    Err(e) => warn!("{e}"),
                }
            }
        }
        LinkEvent::DumpDone => release_stale_links(datapath)?,
        LinkEvent::Gone(iface) => {
            if by_pattern.remove(&iface) {
                // The kernel dropped the attachment with the interface.
                let _already_gone = datapath.detach(&iface);
                info!(iface, "interface removed, let go");
            }
        }
    }
    Ok(())
}

/// Where the loop reports its progress: health checks and metrics.
#[derive(Clone, Copy)]
struct Reporting<'a> {
    health: &'a Health,
    stats: &'a AgentStats,
}

/// What the agent keeps from one sync to the next.
struct State<'a> {
    model: &'a mut Model,
    syncer: &'a mut Syncer,
    /// Skipped-object lines already logged.
    reported: &'a mut HashSet<String>,
}

/// Destroys the node's sockets that the socket programs sent to a backend
/// which has since left its service, so their applications reconnect at
/// once (a connected UDP socket would otherwise send into the void).
fn destroy_sockets_of_departed_backends(datapath: &Datapath, syncer: &Syncer) {
    let entries: Vec<_> = datapath.maps.socket_revnat.iter().filter_map(Result::ok).collect();
    let stale = lb_userspace::sockets::stale_cookies(entries, |frontend, backend| syncer.socket_backend_serves(frontend, backend));
    match lb_userspace::sockets::destroy_everywhere(&stale) {
        Ok(0) => {}
        Ok(destroyed) => info!(destroyed, "destroyed the node's sockets connected to backends that left their service"),
        Err(e) => warn!("destroying the node's sockets connected to backends that left: {e} (needs CONFIG_INET_DIAG_DESTROY); they reconnect when their applications do"),
    }
}

/// What the agent takes from the source besides services: the node's
/// addresses (no --node-ip given) and the service ranges (no
/// --service-cidr given).
#[derive(Clone, Copy)]
struct Follow {
    node_ips: bool,
    service_cidrs: bool,
}

/// Programs what changed in the source's objects; logs each skipped object
/// once. `node`: this node's name, and what follows the source.
fn sync(
    source: &mut Source,
    (node, follow): (&str, Follow),
    state: State<'_>,
    datapath: &mut Datapath,
    generation: u64,
    noticed: Instant,
    reporting: Reporting<'_>,
) -> anyhow::Result<()> {
    let stats = reporting.stats;
    let started = Instant::now();
    let update = source.snapshot()?;
    if let Some(node_state) = &update.node {
        reporting.health.set_draining(node_state.draining);
        if follow.node_ips && !node_state.addresses.is_empty() && node_state.addresses != state.model.node_ips() {
            info!(node, addresses = ?node_state.addresses, "node addresses changed in the Node object");
            datapath.maps.set_snat_ip(lb_common::ip_be(node_state.addresses[0]))?;
            state.model.set_node_ips(node_state.addresses.clone());
        }
        if node_state.zone.as_deref() != state.model.zone() {
            info!(node, zone = ?node_state.zone, "node zone (topology.kubernetes.io/zone), for topology-aware routing");
            state.model.set_zone(node_state.zone.clone());
        }
    }
    if let Some(ranges) = update.service_cidrs.as_ref().filter(|_| follow.service_cidrs)
        && datapath.maps.set_service_cidrs(Ipv4Cidrs::new(ranges.iter().copied().take(lb_common::MAX_CIDRS)))?
    {
        let shown: Vec<String> = ranges.iter().map(ToString::to_string).collect();
        info!(ranges = ?shown, "service ranges from the ServiceCIDR objects");
        if ranges.len() > lb_common::MAX_CIDRS {
            warn!("more ServiceCIDR ranges than the datapath holds: the first {} are used", lb_common::MAX_CIDRS);
        }
    }
    let changes = state.model.update(&update.objects, node);
    // The first sync compares everything: services adopted from a previous
    // agent and deleted while no agent ran are not among the changes.
    let names: BTreeSet<_> = if generation == 1 {
        changes.ports.iter().chain(state.syncer.programmed_names()).cloned().collect()
    } else {
        changes.ports.clone()
    };
    let report = state.syncer.apply_changes(&state.model.state, &names, &mut datapath.maps)?;
    if report.updated + report.removed > 0 {
        destroy_sockets_of_departed_backends(datapath, state.syncer);
    }
    let over_capacity = state.syncer.over_capacity().iter().map(|(name, why)| format!("service port {name} not programmed: {why}"));
    let skipped: HashSet<String> = update.skipped.into_iter().chain(changes.skipped).chain(over_capacity).collect();
    for line in skipped.difference(state.reported) {
        warn!("{line}");
    }
    *state.reported = skipped;
    stats.over_capacity.store(state.syncer.over_capacity().len() as u64, Ordering::Relaxed);
    stats.sync_seconds.observe(started.elapsed().as_secs_f64());
    stats.programming_seconds.observe(noticed.elapsed().as_secs_f64());
    let unix_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    stats.last_sync_unix.store(unix_now.as_secs_f64().to_bits(), Ordering::Relaxed);
    let queued = unix_now.saturating_sub(noticed.elapsed());
    stats.last_queued_unix.store(queued.as_secs_f64().to_bits(), Ordering::Relaxed);
    stats.endpoint_changes.fetch_add(changes.endpoint_changes as u64, Ordering::Relaxed);
    stats.service_changes.fetch_add(changes.service_changes as u64, Ordering::Relaxed);
    let (internal, external) = state.model.state.no_local_endpoints();
    stats.no_local_endpoints[0].store(internal as u64, Ordering::Relaxed);
    stats.no_local_endpoints[1].store(external as u64, Ordering::Relaxed);
    stats.syncs.fetch_add(1, Ordering::Relaxed);
    stats.backends.store(state.model.state.endpoint_count() as u64, Ordering::Relaxed);
    if let Ok(mut services) = stats.services.write() {
        for name in &names {
            let port = state.model.state.services.get(name);
            match (state.syncer.service_id(name), port.and_then(|p| p.frontends.first())) {
                (Some(id), Some(frontend)) => {
                    services.insert(name.clone(), ServiceLabels { id, protocol: frontend.protocol });
                }
                _ => {
                    services.remove(name);
                }
            }
        }
    }
    info!(
        generation,
        services = state.model.state.services.len(),
        endpoints = state.model.state.endpoint_count(),
        added = report.added,
        updated = report.updated,
        removed = report.removed,
        over_capacity = report.over_capacity,
        sync_us = started.elapsed().as_micros() as u64,
        since_change_us = noticed.elapsed().as_micros() as u64,
        "synced"
    );
    Ok(())
}
