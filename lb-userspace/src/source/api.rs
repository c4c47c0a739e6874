//! The Kubernetes API as the source of truth: kube-rs reflectors over all
//! Services and discovery.k8s.io/v1 EndpointSlices. Nothing is signalled
//! before both initial lists are complete. Watch errors (a dropped
//! connection, 410 Gone) make the watcher re-list, with backoff while the
//! API server is unreachable; the reflector stores keep the last complete
//! state meanwhile, so the datapath keeps serving it.
use std::{future::Future, time::Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher::{self, Event, watcher},
    },
};
use tracing::{debug, info, warn};

use super::{ChangeSender, NodeState, Update, service_cidr_ranges};
use crate::model::kubernetes::ClusterObjects;

/// The reflectors' stores: the objects as last listed and watched.
pub struct ApiSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    /// This node's Node object (a watch with a field selector on its name).
    node: Store<Node>,
    service_cidrs: Store<ServiceCIDR>,
    /// Whether the ServiceCIDR list completed (the API serves them).
    service_cidrs_listed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Services,
    EndpointSlices,
    Node,
    ServiceCidrs,
}

/// What a watch event means for the stores.
#[derive(Debug)]
enum Effect {
    /// A list (initial or after an error) completed: the store was replaced.
    Listed,
    /// An object was added, changed or deleted.
    Changed,
    /// A re-list is under way; the store is unchanged until it completes.
    Listing,
}

fn effect<K>(event: &Event<K>) -> Effect {
    match event {
        Event::InitDone => Effect::Listed,
        Event::Apply(_) | Event::Delete(_) => Effect::Changed,
        Event::Init | Event::InitApply(_) => Effect::Listing,
    }
}

impl ApiSource {
    /// The stores, and the task that fills them and signals `changes`
    /// (run it until it ends: when the receiver is gone). `node` names this
    /// node, whose Node object is followed for its addresses and whether it
    /// is being drained.
    pub fn start(client: Client, node: &str, changes: ChangeSender) -> (Self, impl Future<Output = ()> + use<>) {
        let (services, services_writer) = reflector::store::<Service>();
        let (slices, slices_writer) = reflector::store::<EndpointSlice>();
        let (node_store, node_writer) = reflector::store::<Node>();
        let (service_cidrs, service_cidrs_writer) = reflector::store::<ServiceCIDR>();
        let service_cidr_events = watcher(Api::<ServiceCIDR>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .reflect(service_cidrs_writer)
            .map(|event| (Kind::ServiceCidrs, event.map(|e| effect(&e))));
        let service_cidrs_listed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cidrs_listed = service_cidrs_listed.clone();
        let node_events = watcher(Api::<Node>::all(client.clone()), watcher::Config::default().fields(&format!("metadata.name={node}")))
            .default_backoff()
            .reflect(node_writer)
            .map(|event| (Kind::Node, event.map(|e| effect(&e))));
        let service_events = watcher(Api::<Service>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .reflect(services_writer)
            .map(|event| (Kind::Services, event.map(|e| effect(&e))));
        let slice_events = watcher(Api::<EndpointSlice>::all(client), watcher::Config::default())
            .default_backoff()
            .reflect(slices_writer)
            .map(|event| (Kind::EndpointSlices, event.map(|e| effect(&e))));
        let task = async move {
            let objects = stream::select(service_events, slice_events);
            let mut events = std::pin::pin!(stream::select(objects, stream::select(node_events, service_cidr_events)));
            let (mut services_listed, mut slices_listed) = (false, false);
            let mut service_cidrs_unserved = false;
            while let Some((kind, event)) = events.next().await {
                if let Ok(effect) = &event {
                    debug!(?kind, ?effect, "watch event");
                }
                match event {
                    // Before Kubernetes 1.33 (or with the API off) there
                    // are no ServiceCIDR objects: said once, not warned
                    // about at every retry.
                    Err(e) if matches!(kind, Kind::ServiceCidrs) && is_not_found(&e) => {
                        if !service_cidrs_unserved {
                            info!("the API server has no networking.k8s.io/v1 ServiceCIDR objects: the service ranges are --service-cidr's");
                            service_cidrs_unserved = true;
                        }
                    }
                    Err(e) => warn!("watching {kind:?}: {e}; keeping the last known state, retrying with backoff"),
                    Ok(Effect::Listing) => {}
                    Ok(effect) => {
                        if matches!(effect, Effect::Listed) {
                            info!("{kind:?}: list complete");
                            match kind {
                                Kind::Services => services_listed = true,
                                Kind::EndpointSlices => slices_listed = true,
                                // Not waited for: the services are served
                                // with the addresses read at start.
                                Kind::Node => {}
                                Kind::ServiceCidrs => cidrs_listed.store(true, std::sync::atomic::Ordering::Relaxed),
                            }
                        }
                        if services_listed && slices_listed && changes.send(Some(Instant::now())).is_err() {
                            return;
                        }
                    }
                }
            }
        };
        (Self { services, slices, node: node_store, service_cidrs, service_cidrs_listed }, task)
    }

    pub fn snapshot(&self) -> Update {
        // The stores hand out their objects shared: no copy.
        let objects = ClusterObjects { services: self.services.state(), slices: self.slices.state() };
        let node = self.node.state().first().map(|node| NodeState::of(node));
        let service_cidrs = self
            .service_cidrs_listed
            .load(std::sync::atomic::Ordering::Relaxed)
            .then(|| service_cidr_ranges(&self.service_cidrs.state()));
        Update { objects, skipped: Vec::new(), node, service_cidrs }
    }
}

/// Whether a watch failed because the API server does not serve the kind.
fn is_not_found(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status)) | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => {
            status.code == 404
        }
        _ => false,
    }
}

/// This node's IPv4 addresses from its Node object, read once at start:
/// InternalIP ones first, then ExternalIP ones (where node ports answer, as
/// kube-proxy's default).
pub async fn node_addresses(client: Client, node: &str) -> Result<Vec<std::net::Ipv4Addr>, kube::Error> {
    let node = Api::<Node>::all(client).get(node).await?;
    Ok(NodeState::of(&node).addresses)
}
