//! The Kubernetes API as the source of truth.
//!
//! It is read through kube-rs reflectors over the Services and
//! discovery.k8s.io/v1 EndpointSlices this proxy is for (the API server leaves
//! out the others, with kube-proxy's label selector). Objects are cached
//! without what the agent never reads. Nothing is signalled before both initial
//! lists are complete. Watch errors (a dropped connection, 410 Gone) make the
//! watcher re-list, with backoff while the API server is unreachable; the
//! reflector stores keep the last complete state meanwhile, so the datapath
//! keeps serving it.
use std::{future::Future, time::Instant};

use futures::{FutureExt, StreamExt, stream};
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
        networking::v1::ServiceCIDR,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    core::{Expression, Selector},
    runtime::{
        WatchStreamExt,
        reflector::{self, Lookup, Store},
        watcher::{self, Event, watcher},
    },
};
use tracing::{debug, info, warn};

use super::{ChangeSender, NodeState, Update, service_cidr_ranges};
use crate::model::kubernetes::{ClusterObjects, SERVICE_PROXY_NAME_LABEL};

/// The label the EndpointSlice controller puts on the slices (and the
/// endpoints controller on the Endpoints) of a headless service; the
/// Service itself does not carry it.
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// kube-proxy's label selector for Services and EndpointSlices
/// (cmd/kube-proxy/app/server.go, `noProxyName` and `noHeadlessEndpoints`):
/// `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`.
/// The API server neither lists nor sends the services another proxy owns,
/// nor the slices of headless services (which also carry the service's
/// labels, so those of another proxy's services go too). An object that
/// gains a label leaves the watch as a deletion, and one that loses it
/// comes back as an addition.
///
/// Headless Services themselves carry no label and still come, and are left
/// out by the model (`clusterIP: None`), as kube-proxy's service change
/// tracker does. kube-proxy 1.32+ also drops them server-side with the field
/// selector `spec.clusterIP!=None`, but API servers before 1.31 answer that
/// selector with 400 Bad Request: the list would never complete, so it is
/// not used here (their slices, the larger part, are still left out).
fn proxied_selector() -> Selector {
    Selector::from_iter([Expression::DoesNotExist(SERVICE_PROXY_NAME_LABEL.into()), Expression::DoesNotExist(HEADLESS_LABEL.into())])
}

/// What the agent never reads, dropped before an object is cached (at
/// 30,000 services, managedFields and kubectl's last-applied-configuration
/// annotation are most of an object): managedFields, every annotation (the
/// agent reads none; one it comes to read must be kept here) and owner
/// references. Labels, names and the spec and status stay.
fn strip(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
}

/// Whether a reflector's store holds a complete list: kube-rs marks it ready
/// at the first list's end and it stays so through re-lists (the store then
/// keeps the last complete state until the new list is complete).
fn listed<K: Lookup + Clone + 'static>(store: &Store<K>) -> bool
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
}

/// The reflectors' stores: the objects as last listed and watched.
pub struct ApiSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    /// This node's Node object (a watch with a field selector on its name).
    node: Store<Node>,
    /// Ready (see `listed`) once their list completed: the API serves them.
    service_cidrs: Store<ServiceCIDR>,
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
            .modify(|o| strip(&mut o.metadata))
            .reflect(service_cidrs_writer)
            .map(|event| (Kind::ServiceCidrs, event.map(|e| effect(&e))));
        let node_events = watcher(Api::<Node>::all(client.clone()), watcher::Config::default().fields(&format!("metadata.name={node}")))
            .default_backoff()
            .modify(|o| strip(&mut o.metadata))
            .reflect(node_writer)
            .map(|event| (Kind::Node, event.map(|e| effect(&e))));
        let proxied = watcher::Config::default().labels_from(&proxied_selector());
        let service_events = watcher(Api::<Service>::all(client.clone()), proxied.clone())
            .default_backoff()
            .modify(|o| strip(&mut o.metadata))
            .reflect(services_writer)
            .map(|event| (Kind::Services, event.map(|e| effect(&e))));
        let slice_events = watcher(Api::<EndpointSlice>::all(client), proxied)
            .default_backoff()
            .modify(|o| strip(&mut o.metadata))
            .reflect(slices_writer)
            .map(|event| (Kind::EndpointSlices, event.map(|e| effect(&e))));
        let (services_store, slices_store) = (services.clone(), slices.clone());
        let task = async move {
            let objects = stream::select(service_events, slice_events);
            let mut events = std::pin::pin!(stream::select(objects, stream::select(node_events, service_cidr_events)));
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
                        }
                        // Whether the stores are ready is kube-rs's (see
                        // `listed`); the Node is not waited for (the
                        // services are served with the addresses read at
                        // start), nor are ServiceCIDRs (`snapshot` leaves
                        // their ranges out until listed).
                        if listed(&services_store) && listed(&slices_store) && changes.send(Some(Instant::now())).is_err() {
                            return;
                        }
                    }
                }
            }
        };
        (Self { services, slices, node: node_store, service_cidrs }, task)
    }

    pub fn snapshot(&self) -> Update {
        // The stores hand out their objects shared: no copy.
        let objects = ClusterObjects { services: self.services.state(), slices: self.slices.state() };
        let node = self.node.state().first().map(|node| NodeState::of(node));
        let service_cidrs = listed(&self.service_cidrs).then(|| service_cidr_ranges(&self.service_cidrs.state()));
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
pub async fn node_addresses(client: Client, node: &str) -> Result<Vec<std::net::IpAddr>, kube::Error> {
    let node = Api::<Node>::all(client).get(node).await?;
    Ok(NodeState::of(&node).addresses)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube::core::SelectorExt;

    use super::*;

    #[test]
    fn the_label_selector_is_kube_proxys() {
        let selector = proxied_selector();
        assert_eq!(selector.to_string(), "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless");
        let labels = |pairs: &[(&str, &str)]| pairs.iter().map(|&(k, v)| (k.to_owned(), v.to_owned())).collect::<BTreeMap<_, _>>();
        assert!(selector.matches(&labels(&[("app", "kubia"), ("kubernetes.io/service-name", "kubia")])));
        assert!(!selector.matches(&labels(&[(SERVICE_PROXY_NAME_LABEL, "other")])));
        assert!(!selector.matches(&labels(&[(HEADLESS_LABEL, "")])), "the EndpointSlice controller sets it empty");
    }

    #[test]
    fn what_the_agent_does_not_read_is_dropped_before_caching() {
        let mut service: Service = serde_json::from_value(serde_json::json!({"metadata": {"name": "kubia", "namespace": "default",
            "labels": {"app": "kubia"}, "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
            "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}],
            "ownerReferences": [{"apiVersion": "v1", "kind": "Foo", "name": "x", "uid": "1"}]},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}))
        .expect("a Service");
        let spec = service.spec.clone();
        strip(&mut service.metadata);
        assert_eq!((service.metadata.managed_fields, service.metadata.annotations, service.metadata.owner_references), (None, None, None));
        assert_eq!(service.metadata.labels, Some(BTreeMap::from([("app".to_owned(), "kubia".to_owned())])));
        assert_eq!((service.metadata.name.as_deref(), service.spec), (Some("kubia"), spec));
    }
}
