//! The agent's Prometheus metrics, encoded with prometheus-client.
//!
//! The datapath's counters live in per-CPU BPF maps; they are read (from the
//! pins) at scrape time by `DatapathCollector`, so a scrape always shows the
//! kernel's current figures and the fast path does no extra work for it.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::maps::{Array, Map, MapData, PerCpuArray};
use lb_common::{
    DatapathConfig, MAP_DATAPATH_CONFIG,
    MAP_SERVICE_COUNTERS, MAP_VERDICT_COUNTERS, Reason, ServiceCounters,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        MetricType,
        counter::ConstCounter,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    conntrack::{GcStats, TableCapacity},
    maps::{service_totals, verdict_totals},
    model::{Protocol, ServicePortName},
};

/// A programmed service port's id (its counters' index) and protocol.
#[derive(Clone, Copy, Debug)]
pub struct ServiceLabels {
    pub id: u32,
    pub protocol: Protocol,
}

/// What the agent's loop reports for the metrics.
#[derive(Debug)]
pub struct AgentStats {
    /// The programmed service ports, updated by each sync for what it
    /// changed.
    pub services: RwLock<BTreeMap<ServicePortName, ServiceLabels>>,
    pub backends: AtomicU64,
    /// Service ports the maps could not hold at the last sync.
    pub over_capacity: AtomicU64,
    pub syncs: AtomicU64,
    pub sync_seconds: Histogram,
    /// From a change reaching the agent to its being programmed.
    pub programming_seconds: Histogram,
    /// Unix time of the last sync, and of the last change noticed, in
    /// seconds (f64 bits).
    pub last_sync_unix: AtomicU64,
    pub last_queued_unix: AtomicU64,
    /// Objects changed, as kube-proxy counts them.
    pub endpoint_changes: AtomicU64,
    pub service_changes: AtomicU64,
    /// Service ports with a Local policy and no local endpoint (internal,
    /// external).
    pub no_local_endpoints: [AtomicU64; 2],
    /// The conntrack garbage collector's figures.
    pub conntrack: Arc<GcStats>,
}

impl Default for AgentStats {
    fn default() -> Self {
        Self {
            services: RwLock::default(),
            backends: AtomicU64::new(0),
            over_capacity: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            sync_seconds: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            programming_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            last_sync_unix: AtomicU64::new(0),
            last_queued_unix: AtomicU64::new(0),
            endpoint_changes: AtomicU64::new(0),
            service_changes: AtomicU64::new(0),
            no_local_endpoints: [AtomicU64::new(0), AtomicU64::new(0)],
            conntrack: Arc::default(),
        }
    }
}

/// The registry of everything /metrics shows.
pub fn registry(maps_dir: PathBuf, stats: Arc<AgentStats>) -> Registry {
    let mut registry = Registry::default();
    // kube-proxy's own names, so that its dashboards and alerts work.
    let kube_proxy = registry.sub_registry_with_prefix("kubeproxy");
    kube_proxy.register("sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds", stats.sync_seconds.clone());
    kube_proxy.register(
        "network_programming_duration_seconds",
        "In Cluster Network Programming Latency in seconds (from the agent noticing a change)",
        stats.programming_seconds.clone(),
    );
    kube_proxy.register_collector(Box::new(KubeProxyCollector { stats: stats.clone() }));
    let own = registry.sub_registry_with_prefix("lb");
    own.register("sync_duration_seconds", "Time to program one change into the maps", stats.sync_seconds.clone());
    own.register_collector(Box::new(DatapathCollector { maps_dir, stats }));
    registry
}

/// The AgentStats figures under kube-proxy's names.
#[derive(Debug)]
struct KubeProxyCollector {
    stats: Arc<AgentStats>,
}

impl Collector for KubeProxyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let seconds = |at: &AtomicU64| f64::from_bits(at.load(Ordering::Relaxed));
        let timestamps = [
            ("sync_proxy_rules_last_timestamp_seconds", "The last time proxy rules were successfully synced", seconds(&self.stats.last_sync_unix)),
            ("sync_proxy_rules_last_queued_timestamp_seconds", "The last time a sync of proxy rules was queued", seconds(&self.stats.last_queued_unix)),
        ];
        for (name, help, value) in timestamps {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let changes = [
            ("sync_proxy_rules_endpoint_changes", "Cumulative proxy rules EndpointSlice changes", &self.stats.endpoint_changes),
            ("sync_proxy_rules_service_changes", "Cumulative proxy rules Service changes", &self.stats.service_changes),
        ];
        for (name, help, value) in changes {
            let counter = ConstCounter::new(value.load(Ordering::Relaxed));
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        // kube-proxy's name ends in _total though it is a gauge.
        let help = "Number of services with a Local traffic policy and no endpoints";
        let mut family = encoder.encode_descriptor("sync_proxy_rules_no_local_endpoints_total", help, None, MetricType::Gauge)?;
        for (policy, value) in ["internal", "external"].into_iter().zip(&self.stats.no_local_endpoints) {
            ConstGauge::new(value.load(Ordering::Relaxed) as i64).encode(family.encode_family(&vec![("traffic_policy", policy)])?)?;
        }
        Ok(())
    }
}

/// Picks one figure out of a conntrack table's capacity.
type CapacityField = fn(&TableCapacity) -> u32;

/// Picks one counter out of a service's counters.
type CounterField = fn(&ServiceCounters) -> u64;

#[derive(Debug)]
struct DatapathCollector {
    maps_dir: PathBuf,
    stats: Arc<AgentStats>,
}

fn open(dir: &std::path::Path, name: &str, wrap: fn(MapData) -> Map) -> Option<Map> {
    MapData::from_pin(dir.join(name)).ok().map(wrap)
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let service_counters = open(&self.maps_dir, MAP_SERVICE_COUNTERS, Map::PerCpuArray)
            .and_then(|m| PerCpuArray::<_, ServiceCounters>::try_from(m).ok());
        let services = self.stats.services.read().map(|s| s.clone()).unwrap_or_default();
        let totals: Vec<(Vec<(&str, String)>, ServiceCounters)> = services
            .iter()
            .map(|(name, labels)| {
                let sum = service_counters.as_ref().and_then(|m| service_totals(m, labels.id).ok()).unwrap_or_default();
                let protocol = match labels.protocol {
                    Protocol::Tcp => "TCP",
                    Protocol::Udp => "UDP",
                };
                let set = vec![
                    ("namespace", name.namespace.clone()),
                    ("service", name.name.clone()),
                    ("port", name.port.clone()),
                    ("protocol", protocol.to_owned()),
                    // Cluster IP, or node ports and external addresses.
                    ("traffic", if name.external { "external" } else { "internal" }.to_owned()),
                    // A dual-stack service has a service port per family.
                    ("ip_family", name.family.name().to_owned()),
                ];
                (set, sum)
            })
            .collect();
        let per_service: [(&str, &str, CounterField); 4] = [
            ("service_packets", "Packets translated for the service, both directions", |c| c.packets),
            ("service_bytes", "Bytes (from the IP header on) translated for the service", |c| c.bytes),
            ("service_new_connections", "Connections assigned a backend", |c| c.new_flows),
            ("service_rejected", "Packets rejected (TCP reset, ICMP port unreachable) for lack of endpoints", |c| c.rejected),
        ];
        for (name, help, value) in per_service {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, counters) in &totals {
                ConstCounter::new(value(counters)).encode(family.encode_family(labels)?)?;
            }
        }

        let verdicts = open(&self.maps_dir, MAP_VERDICT_COUNTERS, Map::PerCpuArray)
            .and_then(|m| PerCpuArray::<_, u64>::try_from(m).ok())
            .and_then(|m| verdict_totals(&m).ok())
            .unwrap_or_default();
        let mut family = encoder.encode_descriptor("packets", "Packets seen by the datapath, by verdict", None, MetricType::Counter)?;
        for reason in Reason::ALL {
            ConstCounter::new(verdicts[reason as usize]).encode(family.encode_family(&vec![("verdict", reason.name())])?)?;
        }

        // The garbage collector's last pass counted the tables on its own
        // thread: a scrape reads its figures and walks nothing.
        let gc = &self.stats.conntrack;
        let last = gc.last.read().ok().and_then(|last| last.clone()).unwrap_or_default();
        {
            let mut entries = encoder.encode_descriptor("conntrack_entries", "Live conntrack entries (two per translated flow) at the last garbage collection, by table and flow state", None, MetricType::Gauge)?;
            for (protocol, state, count) in &last.entries {
                ConstGauge::new(*count as i64).encode(entries.encode_family(&vec![("protocol", *protocol), ("state", *state)])?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor("conntrack_table_entries", "Live entries of each conntrack table at the last garbage collection", None, MetricType::Gauge)?;
            for (table, count) in &last.tables {
                ConstGauge::new(*count as i64).encode(family.encode_family(&vec![("table", *table)])?)?;
            }
        }
        let capacity = gc.capacity.read().map(|c| c.clone()).unwrap_or_default();
        let by_table: [(&str, &str, CapacityField); 2] = [
            ("conntrack_capacity", "Entries each conntrack table holds; when full, its least recently used entries go", |c| c.total),
            (
                "conntrack_capacity_per_cpu",
                "Entries of a conntrack table one CPU's LRU list holds: a CPU that records more flows than this evicts its own least recently used",
                |c| c.per_cpu,
            ),
        ];
        for (name, help, value) in by_table {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for table in &capacity {
                ConstGauge::new(i64::from(value(table))).encode(family.encode_family(&vec![("table", table.table)])?)?;
            }
        }
        let deleted = ConstCounter::new(gc.deleted_total.load(Ordering::Relaxed));
        deleted.encode(encoder.encode_descriptor("conntrack_gc_deleted", "Expired conntrack entries deleted by garbage collection", None, deleted.metric_type())?)?;
        let passes = ConstCounter::new(gc.passes.load(Ordering::Relaxed));
        passes.encode(encoder.encode_descriptor("conntrack_gc_runs", "Garbage collection passes over the conntrack tables", None, passes.metric_type())?)?;
        let duration = ConstGauge::new(last.duration.as_secs_f64());
        duration.encode(encoder.encode_descriptor("conntrack_gc_duration_seconds", "How long the last garbage collection pass took", None, duration.metric_type())?)?;
        let gauges: [(&str, &str, i64); 3] = [
            ("services", "Service ports programmed", services.len() as i64),
            ("backends", "Backends programmed, summed over service ports", self.stats.backends.load(Ordering::Relaxed) as i64),
            (
                "service_ports_over_capacity",
                "Service ports the maps could not hold at the last sync (left out, or left as they were); raise the --*-max flag the log names",
                self.stats.over_capacity.load(Ordering::Relaxed) as i64,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let syncs = ConstCounter::new(self.stats.syncs.load(Ordering::Relaxed));
        syncs.encode(encoder.encode_descriptor("syncs", "Syncs of the maps with the desired state", None, syncs.metric_type())?)?;

        let config = open(&self.maps_dir, MAP_DATAPATH_CONFIG, Map::Array)
            .and_then(|m| Array::<_, DatapathConfig>::try_from(m).ok())
            .and_then(|m| m.get(&0, 0).ok());
        if let Some(config) = config {
            let help = "1 where the agent uses a kernel feature newer than Linux 5.10, 0 where it falls back (lbctl kernel says to what)";
            let mut family = encoder.encode_descriptor("kernel_feature_in_use", help, None, MetricType::Gauge)?;
            for fallback in &crate::features::FALLBACKS {
                let in_use = i64::from(config.kernel_fallbacks & fallback.bit == 0);
                ConstGauge::new(in_use).encode(family.encode_family(&vec![("feature", fallback.feature), ("since", fallback.since)])?)?;
            }
        }
        Ok(())
    }
}

/// The registry in Prometheus' text format.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _infallible = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}
