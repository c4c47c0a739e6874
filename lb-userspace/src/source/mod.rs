//! Sources of truth: the Kubernetes API (`api`) or a directory of manifests
//! (`manifests`). A source's background task signals on a watch channel
//! when it noticed a change; the agent then takes a snapshot of the
//! objects, once per sync however many changes came in between.
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
}

/// What the agent takes from its Node object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    /// IPv4 addresses: InternalIP ones first, then ExternalIP ones (where
    /// node ports answer, as kube-proxy's default).
    pub addresses: Vec<std::net::Ipv4Addr>,
    /// Being deleted, or tainted `ToBeDeletedByClusterAutoscaler`:
    /// `/healthz` answers 503 so that load balancers drain the node
    /// (kube-proxy's KEP-3836).
    pub draining: bool,
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

impl NodeState {
    pub fn of(node: &k8s_openapi::api::core::v1::Node) -> Self {
        let listed = node.status.as_ref().and_then(|s| s.addresses.as_deref()).unwrap_or_default();
        let mut addresses = Vec::new();
        for kind in ["InternalIP", "ExternalIP"] {
            addresses.extend(listed.iter().filter(|a| a.type_ == kind).filter_map(|a| a.address.parse::<std::net::Ipv4Addr>().ok()));
        }
        let tainted = node.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or_default().iter().any(|t| t.key == TO_BE_DELETED_TAINT);
        Self { addresses, draining: node.metadata.deletion_timestamp.is_some() || tainted }
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
