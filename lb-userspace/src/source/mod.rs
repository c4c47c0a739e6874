//! Sources of truth: where the agent learns the services and endpoints to program.
//!
//! Either the Kubernetes API (`api`) or a directory of manifests (`manifests`).
//! A source's background task signals on a watch channel when it noticed a
//! change; the agent then takes a snapshot of the objects, once per sync
//! however many changes came in between.
pub mod api;
pub mod manifests;

use std::time::Instant;

use tokio::sync::watch;

use crate::{error::Result, model::kubernetes::ClusterObjects};

/// The objects as a source sees them now.
#[derive(Clone, Debug)]
pub struct Update {
    pub objects: ClusterObjects,
    /// Objects the source could not read, one line each (object and why).
    pub skipped: Vec<String>,
    /// This node's Node object as last seen, where the source follows it.
    pub node: Option<NodeState>,
    /// The IPv4 ranges of the cluster's ServiceCIDR objects, where the
    /// source follows them and the API serves them (Kubernetes 1.33+).
    pub service_cidrs: Option<Vec<crate::cli::IpCidr>>,
}

/// The ranges of ServiceCIDR objects (`spec.cidrs`, either family; invalid
/// ones left out), each once, in order.
pub fn service_cidr_ranges(objects: &[std::sync::Arc<k8s_openapi::api::networking::v1::ServiceCIDR>]) -> Vec<crate::cli::IpCidr> {
    let mut ranges = Vec::new();
    for text in objects.iter().filter_map(|o| o.spec.as_ref()?.cidrs.as_ref()).flatten() {
        if let Ok(range) = crate::cli::parse_cidr(text)
            && !ranges.contains(&range)
        {
            ranges.push(range);
        }
    }
    ranges
}

/// What the agent takes from its Node object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    /// Addresses of both families: InternalIP ones first, then ExternalIP
    /// ones (where node ports answer, as kube-proxy's default).
    pub addresses: Vec<std::net::IpAddr>,
    /// Being deleted, or tainted `ToBeDeletedByClusterAutoscaler`:
    /// `/healthz` answers 503 so that load balancers drain the node
    /// (kube-proxy's KEP-3836).
    pub draining: bool,
    /// Its `topology.kubernetes.io/zone` label, for topology-aware routing.
    pub zone: Option<String>,
}

/// The node label topology hints name zones by.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

impl NodeState {
    pub fn of(node: &k8s_openapi::api::core::v1::Node) -> Self {
        let listed = node.status.as_ref().and_then(|s| s.addresses.as_deref()).unwrap_or_default();
        let mut addresses = Vec::new();
        for kind in ["InternalIP", "ExternalIP"] {
            addresses.extend(listed.iter().filter(|a| a.type_ == kind).filter_map(|a| a.address.parse::<std::net::IpAddr>().ok()));
        }
        let tainted = node.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or_default().iter().any(|t| t.key == TO_BE_DELETED_TAINT);
        let zone = node.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)).cloned();
        Self { addresses, draining: node.metadata.deletion_timestamp.is_some() || tainted, zone }
    }
}

/// When the source last noticed a change; `None` until it has a complete
/// view (the initial lists, the first read of the directory).
pub type ChangeSender = watch::Sender<Option<Instant>>;
pub type ChangeReceiver = watch::Receiver<Option<Instant>>;

pub enum Source {
    Manifests(manifests::ManifestDir),
    Api(api::ApiSource),
}

impl Source {
    /// The objects now.
    pub fn snapshot(&mut self) -> Result<Update> {
        match self {
            Source::Manifests(dir) => dir.load(),
            Source::Api(api) => Ok(api.snapshot()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, sync::Arc};

    use serde_json::json;

    use super::*;

    /// Each case: the rule, a Node, and what the agent takes from it.
    #[test]
    fn node_state_from_the_node_object() {
        let addresses = json!([{"type": "Hostname", "address": "node-1"}, {"type": "ExternalIP", "address": "203.0.113.5"},
            {"type": "InternalIP", "address": "10.0.0.5"}, {"type": "InternalIP", "address": "fd00::5"}]);
        let listed = || vec!["10.0.0.5", "fd00::5", "203.0.113.5"];
        let cases = [
            ("InternalIP first, then ExternalIP, both families; host names left out", json!({}), json!({}), listed(), false),
            ("the cluster autoscaler's taint: draining", json!({"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}), json!({}), listed(), true),
            ("another taint: not draining", json!({"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}), json!({}), listed(), false),
            ("being deleted: draining", json!({}), json!({"deletionTimestamp": "2026-12-04T00:00:00Z"}), listed(), true),
        ];
        for (rule, spec, extra_meta, expected, draining) in cases {
            let mut metadata = json!({"name": "node-1", "labels": {"topology.kubernetes.io/zone": "zone-1"}});
            if let (Some(meta), Some(extra)) = (metadata.as_object_mut(), extra_meta.as_object()) {
                meta.extend(extra.clone());
            }
            let node: k8s_openapi::api::core::v1::Node =
                serde_json::from_value(json!({"metadata": metadata, "spec": spec, "status": {"addresses": addresses}})).expect("a Node");
            let addresses = expected.into_iter().map(|a| a.parse::<IpAddr>().expect("address")).collect();
            let expected = NodeState { addresses, draining, zone: Some("zone-1".to_owned()) };
            assert_eq!(NodeState::of(&node), expected, "{rule}");
        }
    }

    #[test]
    fn service_cidr_objects_give_their_ranges_of_both_families_once() {
        let object = |cidrs: serde_json::Value| -> Arc<k8s_openapi::api::networking::v1::ServiceCIDR> {
            Arc::new(serde_json::from_value(json!({"metadata": {"name": "x"}, "spec": {"cidrs": cidrs}})).expect("a ServiceCIDR"))
        };
        let objects = [object(json!(["10.96.0.0/16", "fd00::/112"])), object(json!(["10.96.0.0/16", "10.100.0.0/24", "banana"]))];
        let ranges: Vec<String> = service_cidr_ranges(&objects).iter().map(ToString::to_string).collect();
        assert_eq!(ranges, ["10.96.0.0/16", "fd00::/112", "10.100.0.0/24"]);
    }
}
