//! lb-agent's loop: syncs the datapath with the source until a signal ends it.
//!
//! The programs are attached after the first sync, interfaces are followed
//! by pattern, and the metrics are kept up to date as it goes.
use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use anyhow::{Context, bail};
use lb_common::KERNEL_FALLBACK_NO_SOCKET_LB;
use lb_userspace::{
    cli::{AgentArgs, IpCidr},
    datapath::Datapath,
    http::{Health, HealthCheckServers},
    iface_watch::{self, LinkEvent},
    metrics::{AgentStats, ServiceLabels},
    model::{ServicePortName, kubernetes::{Changes, Model}},
    source::{ChangeReceiver, NodeState, Source},
    sync::{SyncLimiter, Syncer},
};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc::UnboundedSender,
    task::JoinHandle,
};
use tracing::{error, info, warn};

/// Syncs allowed back to back before --min-sync-interval-ms spaces them.
const SYNC_BURST: u32 = 2;

/// Signals that end the agent.
pub struct Shutdown {
    terminate: Signal,
    interrupt: Signal,
}

impl Shutdown {
    pub fn new() -> anyhow::Result<Self> {
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

/// A started source: its objects, the task that follows it, and the
/// channel on which it signals changes.
pub struct RunningSource {
    pub source: Source,
    pub task: JoinHandle<anyhow::Result<()>>,
    pub changes: ChangeReceiver,
}

/// The node the agent runs on: its name and its addresses.
pub struct ThisNode {
    pub name: String,
    pub ips: Vec<IpAddr>,
}

/// Where the agent reports its progress: health checks and metrics.
pub struct Reporting {
    pub health: Arc<Health>,
    pub stats: Arc<AgentStats>,
}

/// The running agent: the desired state, the syncer that programs it into
/// the datapath, the datapath and what it is attached to, and what the
/// agent reports.
pub struct Agent<'a> {
    args: &'a AgentArgs,
    /// This node's name.
    node: String,
    model: Model,
    syncer: Syncer,
    datapath: Datapath,
    health: Arc<Health>,
    stats: Arc<AgentStats>,
    /// The listeners of the services' health check node ports.
    health_checks: HealthCheckServers,
    /// Skipped-object lines already logged.
    reported: HashSet<String>,
    /// Syncs done: the first compares everything and is followed by
    /// attaching.
    generation: u64,
    /// Interfaces attached because they match an --iface-pattern.
    by_pattern: HashSet<String>,
}

impl<'a> Agent<'a> {
    /// The agent over a loaded datapath and the syncer that adopted it.
    pub fn new(args: &'a AgentArgs, node: ThisNode, (datapath, syncer): (Datapath, Syncer), reporting: Reporting) -> Self {
        Self {
            args,
            node: node.name,
            model: Model::with_node_ips(node.ips),
            syncer,
            datapath,
            health: reporting.health,
            stats: reporting.stats,
            health_checks: HealthCheckServers::default(),
            reported: HashSet::new(),
            generation: 0,
            by_pattern: HashSet::new(),
        }
    }

    /// Serves until a signal or an error, then leaves the programs attached.
    pub async fn run(mut self, running: RunningSource, shutdown: &mut Shutdown) -> anyhow::Result<()> {
        let result = self.serve(running, shutdown).await;
        // Programs stay attached and maps pinned: the next agent takes them over
        // (`lb-agent --cleanup` removes them).
        self.datapath.keep_attached()?;
        result
    }

    /// The loop: a sync for each change the source signals (spaced by the
    /// limiter), interface events once the first sync has attached.
    async fn serve(&mut self, running: RunningSource, shutdown: &mut Shutdown) -> anyhow::Result<()> {
        let RunningSource { mut source, task: source_task, mut changes } = running;
        let mut limiter = SyncLimiter::new(SYNC_BURST, self.args.min_sync_interval(), Instant::now());
        // Events of the interfaces to attach by pattern (from the first sync on).
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
                    self.generation += 1;
                    limiter.record(Instant::now());
                    self.sync(&mut source, noticed)?;
                    self.health_checks.update(self.model.state.health_checks()).await;
                    self.health.record_sync();
                    if self.generation == 1 {
                        self.attach(link_events_tx.take())?;
                        self.health.set_ready();
                        info!(pinned = %self.args.bpffs_dir.display(), healthz = %self.args.healthz_addr, "ready");
                    }
                }
                Some(event) = link_events.recv() => self.follow_link(event)?,
                () = shutdown.recv() => break,
            }
        }
        info!("shutting down: the programs stay attached for the next agent");
        Ok(())
    }

    /// Programs what changed in the source's objects; logs each skipped
    /// object once.
    fn sync(&mut self, source: &mut Source, noticed: Instant) -> anyhow::Result<()> {
        let started = Instant::now();
        let update = source.snapshot()?;
        if let Some(node_state) = &update.node {
            self.follow_node(node_state)?;
        }
        if let Some(ranges) = update.service_cidrs.as_ref().filter(|_| self.args.service_cidrs.is_empty()) {
            self.follow_service_cidrs(ranges)?;
        }
        let mut changes = self.model.update(&update.objects, &self.node);
        // The first sync compares everything: services adopted from a previous
        // agent and deleted while no agent ran are not among the changes.
        let names: BTreeSet<_> = if self.generation == 1 {
            changes.ports.iter().chain(self.syncer.programmed_names()).cloned().collect()
        } else {
            changes.ports.clone()
        };
        let report = self.syncer.apply_changes(&self.model.state, &names, &mut self.datapath.maps)?;
        if report.updated + report.removed > 0 {
            self.destroy_sockets_of_departed_backends();
        }
        self.warn_skipped(update.skipped, std::mem::take(&mut changes.skipped));
        self.record_sync(&changes, started, noticed);
        self.label_services(&names);
        info!(
            generation = self.generation,
            services = self.model.state.services.len(),
            endpoints = self.model.state.endpoint_count(),
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

    /// Takes from this node's Node object whether it drains, its zone, and
    /// its addresses unless --node-ip gave them.
    fn follow_node(&mut self, node_state: &NodeState) -> anyhow::Result<()> {
        let node = self.node.as_str();
        self.health.set_draining(node_state.draining);
        if self.args.node_ips.is_empty() && !node_state.addresses.is_empty() && node_state.addresses != self.model.node_ips() {
            info!(node, addresses = ?node_state.addresses, "node addresses changed in the Node object");
            self.datapath.maps.set_snat_ips(&node_state.addresses)?;
            self.model.set_node_ips(node_state.addresses.clone());
        }
        if node_state.zone.as_deref() != self.model.zone() {
            info!(node, zone = ?node_state.zone, "node zone (topology.kubernetes.io/zone), for topology-aware routing");
            self.model.set_zone(node_state.zone.clone());
        }
        Ok(())
    }

    /// Takes the service ranges of the ServiceCIDR objects (no
    /// --service-cidr given); logs them when they changed.
    fn follow_service_cidrs(&mut self, ranges: &[IpCidr]) -> anyhow::Result<()> {
        if !self.datapath.maps.set_service_cidrs(ranges)? {
            return Ok(());
        }
        let shown: Vec<String> = ranges.iter().map(ToString::to_string).collect();
        info!(ranges = ?shown, "service ranges from the ServiceCIDR objects");
        let (v4, v6) = IpCidr::counts(ranges);
        if v4.max(v6) > lb_common::MAX_CIDRS {
            warn!("more ServiceCIDR ranges than the datapath holds: the first {} of each family are used", lb_common::MAX_CIDRS);
        }
        Ok(())
    }

    /// Logs the objects skipped and the service ports not programmed, each
    /// once while it stays so.
    fn warn_skipped(&mut self, by_source: Vec<String>, by_model: Vec<String>) {
        let over_capacity = self.syncer.over_capacity().iter().map(|(name, why)| format!("service port {name} not programmed: {why}"));
        let skipped: HashSet<String> = by_source.into_iter().chain(by_model).chain(over_capacity).collect();
        for line in skipped.difference(&self.reported) {
            warn!("{line}");
        }
        self.reported = skipped;
    }

    /// The metrics of a sync that started at `started`, for changes the
    /// source noticed at `noticed`.
    fn record_sync(&self, changes: &Changes, started: Instant, noticed: Instant) {
        let stats = &self.stats;
        stats.over_capacity.store(self.syncer.over_capacity().len() as u64, Ordering::Relaxed);
        stats.sync_seconds.observe(started.elapsed().as_secs_f64());
        stats.programming_seconds.observe(noticed.elapsed().as_secs_f64());
        let unix_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        stats.last_sync_unix.store(unix_now.as_secs_f64().to_bits(), Ordering::Relaxed);
        let queued = unix_now.saturating_sub(noticed.elapsed());
        stats.last_queued_unix.store(queued.as_secs_f64().to_bits(), Ordering::Relaxed);
        stats.endpoint_changes.fetch_add(changes.endpoint_changes as u64, Ordering::Relaxed);
        stats.service_changes.fetch_add(changes.service_changes as u64, Ordering::Relaxed);
        let (internal, external) = self.model.state.no_local_endpoints();
        stats.no_local_endpoints[0].store(internal as u64, Ordering::Relaxed);
        stats.no_local_endpoints[1].store(external as u64, Ordering::Relaxed);
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        stats.backends.store(self.model.state.endpoint_count() as u64, Ordering::Relaxed);
    }

    /// Keeps the metrics' labels (service id and protocol) of the service
    /// ports in `names` equal to what is programmed for them.
    fn label_services(&self, names: &BTreeSet<ServicePortName>) {
        let Ok(mut services) = self.stats.services.write() else { return };
        for name in names {
            let port = self.model.state.services.get(name);
            match (self.syncer.service_id(name), port.and_then(|p| p.frontends.first())) {
                (Some(id), Some(frontend)) => {
                    services.insert(name.clone(), ServiceLabels { id, protocol: frontend.protocol });
                }
                _ => {
                    services.remove(name);
                }
            }
        }
    }

    /// Destroys the node's sockets that the socket programs sent to a backend
    /// which has since left its service, so their applications reconnect at
    /// once (a connected UDP socket would otherwise send into the void).
    fn destroy_sockets_of_departed_backends(&self) {
        let entries: Vec<_> = self.datapath.maps.socket_revnat.iter().filter_map(Result::ok).collect();
        let stale =
            lb_userspace::sockets::stale_cookies(entries, |frontend, protocol, backend| {
                self.syncer.socket_backend_serves(frontend, protocol, backend)
            });
        match lb_userspace::sockets::destroy_everywhere(&stale) {
            Ok(0) => {}
            Ok(destroyed) => info!(destroyed, "destroyed the node's sockets connected to backends that left their service"),
            Err(e) => warn!("destroying the node's sockets connected to backends that left: {e} (needs CONFIG_INET_DIAG_DESTROY); they reconnect when their applications do"),
        }
    }

    /// Attaches to the interfaces and the cgroup, after the first sync so
    /// that the programs start on maps that hold the source's services, and
    /// lets go of the interfaces a previous agent had and this one does not
    /// want: at once, or with --iface-pattern once the interface watcher,
    /// started here to send on `link_events`, has listed those present.
    fn attach(&mut self, link_events: Option<UnboundedSender<LinkEvent>>) -> anyhow::Result<()> {
        for iface in &self.args.ifaces {
            let how = self.datapath.attach_tc(iface)?;
            info!(iface, ?how, "attached tc ingress");
            loosen_reverse_path_filter(iface);
        }
        for iface in &self.args.xdp_ifaces {
            let how = self.datapath.attach_xdp(iface)?;
            info!(iface, ?how, "attached xdp");
            loosen_reverse_path_filter(iface);
        }
        self.attach_sockets()?;
        if self.args.iface_patterns.is_empty() {
            self.release_stale_links()?;
        }
        if let Some(tx) = link_events.filter(|_| !self.args.iface_patterns.is_empty()) {
            tokio::spawn(async move {
                if let Err(e) = iface_watch::watch(tx).await {
                    error!("following interfaces: {e}");
                }
            });
        }
        Ok(())
    }

    /// Attaches the socket programs (the node's own processes), unless
    /// they did not load or --no-socket-lb turned them off.
    fn attach_sockets(&mut self) -> anyhow::Result<()> {
        if self.datapath.features().fallbacks() & KERNEL_FALLBACK_NO_SOCKET_LB != 0 {
            warn!("the socket programs did not load: the node's own processes do not reach services");
        } else if !self.args.no_socket_lb {
            let cgroup = self
                .args
                .cgroup
                .clone()
                .or_else(lb_userspace::datapath::cgroup2_root)
                .context("no cgroup v2 hierarchy for the socket programs: give --cgroup DIR, or --no-socket-lb")?;
            self.datapath.attach_sockets(&cgroup)?;
            info!(cgroup = %cgroup.display(), "attached the socket programs (the node's own processes)");
        }
        Ok(())
    }

    /// Once every wanted interface is attached: lets go of the interfaces a
    /// previous agent was attached to and this one does not want.
    fn release_stale_links(&self) -> anyhow::Result<()> {
        for iface in self.datapath.release_stale_links()? {
            info!(iface, "detached from an interface the previous agent had and this one does not want");
        }
        Ok(())
    }

    /// Attaches to a new interface matching a pattern, lets go of a removed one.
    fn follow_link(&mut self, event: LinkEvent) -> anyhow::Result<()> {
        match event {
            LinkEvent::Present(iface) => {
                let args = self.args;
                let wanted = args.iface_patterns.iter().any(|p| iface_watch::matches(p, &iface))
                    && !args.ifaces.contains(&iface)
                    && !args.xdp_ifaces.contains(&iface);
                if wanted && !self.by_pattern.contains(&iface) {
                    match self.datapath.attach_tc(&iface) {
                        Ok(how) => {
                            info!(iface, ?how, "attached tc ingress (pattern)");
                            loosen_reverse_path_filter(&iface);
                            self.by_pattern.insert(iface);
                        }
                        Err(e) => warn!("{e}"),
                    }
                }
            }
            LinkEvent::DumpDone => self.release_stale_links()?,
            LinkEvent::Gone(iface) => {
                if self.by_pattern.remove(&iface) {
                    // The kernel dropped the attachment with the interface.
                    let _already_gone = self.datapath.detach(&iface);
                    info!(iface, "interface removed, let go");
                }
            }
        }
        Ok(())
    }
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
