//! A directory of Kubernetes manifests as the source of truth.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file in it is read, each holding one or
//! more documents (`---`-separated, or a `List` as `kubectl get -o yaml` writes
//! it) of Service, discovery.k8s.io/v1 EndpointSlice and legacy v1 Endpoints
//! objects, and Nodes (the one named like this node gives its zone, and its
//! addresses where no --node-ip is given, as in a cluster). Other kinds (Pods,
//! Deployments, ...) are ignored. Endpoints are turned into EndpointSlices as
//! Kubernetes' mirroring controller does. The directory is watched, and re-read
//! whole on every change.
use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::{
    api::{
        core::v1::{EndpointSubset, Endpoints, Node, Service},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use notify::{EventKind, RecursiveMode, Watcher, event::ModifyKind};
use serde::Deserialize;
use tracing::{debug, warn};
use std::time::Instant;

use super::{ChangeSender, NodeState, Update};
use crate::{
    error::{Error, Result},
    model::kubernetes::{ClusterObjects, ObjectKey, SERVICE_NAME_LABEL},
};

/// One file's objects, in the order they appear.
#[derive(Default)]
pub struct Parsed {
    services: Vec<(ObjectKey, Arc<Service>)>,
    slices: Vec<(ObjectKey, Arc<EndpointSlice>)>,
    nodes: Vec<(String, NodeState)>,
    skipped: Vec<String>,
}

/// Identifies a version of a file: replacing it by rename (a new inode) or
/// writing it (a new modification time or length) changes it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    modified: Option<SystemTime>,
    len: u64,
}

/// A manifest directory, parsed file by file: a file that did not change
/// since the last read is not parsed again, and keeps its objects (the same
/// allocations), so the model recomputes only what a change touched.
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, (FileStamp, Parsed)>,
    /// This node's name, whose Node object is looked for.
    node: Option<String>,
}

impl ManifestDir {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, files: BTreeMap::new(), node: None }
    }

    /// The directory, with the Node object named `node` as this node's.
    pub fn for_node(dir: PathBuf, node: &str) -> Self {
        Self { node: Some(node.to_owned()), ..Self::new(dir) }
    }

    /// The directory's objects now. Where two files define the same object,
    /// the later file (by name) wins.
    pub fn load(&mut self) -> Result<Update> {
        let read_err = |source| Error::Read { path: self.dir.clone(), source };
        let mut present: BTreeMap<PathBuf, FileStamp> = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir).map_err(read_err)? {
            let Ok(entry) = entry else { continue };
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if is_manifest(&path) && meta.is_file() {
                let stamp = FileStamp { inode: meta.ino(), modified: meta.modified().ok(), len: meta.len() };
                present.insert(path, stamp);
            }
        }
        self.files.retain(|path, _| present.contains_key(path));
        for (path, stamp) in present {
            if self.files.get(&path).is_some_and(|(seen, _)| *seen == stamp) {
                continue;
            }
            let mut parsed = Parsed::default();
            match std::fs::read_to_string(&path) {
                Ok(text) => parse_documents(&text, &path.display().to_string(), &mut parsed),
                Err(e) => parsed.skipped.push(format!("{}: {e}", path.display())),
            }
            self.files.insert(path, (stamp, parsed));
        }
        let mut services = BTreeMap::new();
        let mut slices = BTreeMap::new();
        let mut skipped = Vec::new();
        let mut node = None;
        for (_, parsed) in self.files.values() {
            services.extend(parsed.services.iter().cloned());
            slices.extend(parsed.slices.iter().cloned());
            skipped.extend(parsed.skipped.iter().cloned());
            let this_node = parsed.nodes.iter().rfind(|(name, _)| Some(name) == self.node.as_ref());
            node = this_node.map(|(_, state)| state.clone()).or(node);
        }
        let objects = ClusterObjects { services: services.into_values().collect(), slices: slices.into_values().collect() };
        Ok(Update { objects, skipped, node, service_cidrs: None })
    }
}

/// Whether the agent reads this file: YAML or JSON, not hidden (editors and
/// tools write hidden files aside before renaming them into place).
fn is_manifest(path: &Path) -> bool {
    let hidden = path.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.'));
    !hidden && matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

fn changes_content(kind: &EventKind) -> bool {
    matches!(kind, EventKind::Create(_) | EventKind::Remove(_) | EventKind::Any)
        || matches!(kind, EventKind::Modify(m) if !matches!(m, ModifyKind::Metadata(_)))
}

/// Adds the objects of a multi-document YAML (or JSON) text to `parsed`.
pub fn parse_documents(text: &str, origin: &str, parsed: &mut Parsed) {
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let place = format!("{origin} document {}", index + 1);
        match serde_yaml_ng::Value::deserialize(document) {
            Ok(serde_yaml_ng::Value::Null) => {}
            Ok(value) => add_object(value, &place, parsed),
            Err(e) => {
                // A syntax error ends the stream: the rest of the file is unreadable.
                parsed.skipped.push(format!("{place}: not YAML: {e}"));
                return;
            }
        }
    }
}

fn add_object(value: serde_yaml_ng::Value, place: &str, parsed: &mut Parsed) {
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or_default()
        .to_owned();
    let label = format!("{place}: {kind} {name}");
    let is_list = kind.ends_with("List");
    if !is_list && matches!(kind.as_str(), "Service" | "EndpointSlice" | "Endpoints" | "Node") && name.is_empty() {
        parsed.skipped.push(format!("{label} skipped: it has no metadata.name"));
        return;
    }
    let result = match (api_version.as_str(), kind.as_str()) {
        (_, "List" | "ServiceList" | "EndpointSliceList" | "EndpointsList" | "NodeList") => {
            if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                for (i, item) in items.iter().enumerate() {
                    add_object(item.clone(), &format!("{place} item {}", i + 1), parsed);
                }
            }
            Ok(())
        }
        ("v1", "Service") => serde_yaml_ng::from_value::<Service>(value).map(|s| {
            parsed.services.push((ObjectKey::of(&s.metadata), Arc::new(s)));
        }),
        ("discovery.k8s.io/v1", "EndpointSlice") => serde_yaml_ng::from_value::<EndpointSlice>(value).map(|s| {
            parsed.slices.push((ObjectKey::of(&s.metadata), Arc::new(s)));
        }),
        ("v1", "Node") => serde_yaml_ng::from_value::<Node>(value).map(|n| {
            parsed.nodes.push((n.metadata.name.clone().unwrap_or_default(), NodeState::of(&n)));
        }),
        ("v1", "Endpoints") => serde_yaml_ng::from_value::<Endpoints>(value).map(|e| {
            for slice in mirror(&e) {
                parsed.slices.push((ObjectKey::of(&slice.metadata), Arc::new(slice)));
            }
        }),
        _ => {
            debug!("{label}: not a kind this proxy reads, ignored");
            Ok(())
        }
    };
    if let Err(e) = result {
        parsed.skipped.push(format!("{label} skipped: {e}"));
    }
}

/// The EndpointSlices Kubernetes' mirroring controller makes of a legacy
/// Endpoints object: one per subset, labelled with the service name.
pub fn mirror(endpoints: &Endpoints) -> Vec<EndpointSlice> {
    let name = endpoints.metadata.name.clone().unwrap_or_default();
    endpoints
        .subsets
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, subset)| mirror_subset(&endpoints.metadata, &name, i, subset))
        .collect()
}

fn mirror_subset(meta: &ObjectMeta, name: &str, index: usize, subset: &EndpointSubset) -> EndpointSlice {
    let endpoint = |ready: bool| {
        move |address: &k8s_openapi::api::core::v1::EndpointAddress| Endpoint {
            addresses: vec![address.ip.clone()],
            conditions: Some(EndpointConditions { ready: Some(ready), serving: Some(ready), terminating: Some(false) }),
            node_name: address.node_name.clone(),
            ..Endpoint::default()
        }
    };
    let mut endpoints: Vec<Endpoint> = subset.addresses.iter().flatten().map(endpoint(true)).collect();
    endpoints.extend(subset.not_ready_addresses.iter().flatten().map(endpoint(false)));
    let address_type = if endpoints.iter().flat_map(|e| &e.addresses).any(|a| a.contains(':')) { "IPv6" } else { "IPv4" };
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{name}-mirrored-{index}")),
            namespace: meta.namespace.clone(),
            labels: Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_owned(), name.to_owned())])),
            ..ObjectMeta::default()
        },
        address_type: address_type.into(),
        endpoints,
        ports: Some(
            subset
                .ports
                .iter()
                .flatten()
                .map(|p| EndpointPort { name: p.name.clone(), port: Some(p.port), protocol: p.protocol.clone(), app_protocol: None })
                .collect(),
        ),
    }
}

/// Signals a change now (the first read) and after every change to the
/// directory, until the receiver is gone.
pub async fn watch(dir: PathBuf, changes: ChangeSender) -> Result<()> {
    let watch_err = |e: notify::Error| Error::Watch { path: dir.clone(), reason: e.to_string() };
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Only changes to manifests matter: reading them (the agent's own
        // reads included) or writing a file aside before renaming it into
        // place is no change.
        let relevant = event.map(|e| changes_content(&e.kind) && e.paths.iter().any(|p| is_manifest(p)));
        if !matches!(relevant, Ok(false)) {
            let _ = events_tx.send(relevant.map(drop));
        }
    })
    .map_err(watch_err)?;
    watcher.watch(&dir, RecursiveMode::NonRecursive).map_err(watch_err)?;
    if changes.send(Some(Instant::now())).is_err() {
        return Ok(());
    }
    while let Some(event) = events.recv().await {
        match event {
            Ok(()) => {
                if changes.send(Some(Instant::now())).is_err() {
                    return Ok(());
                }
            }
            Err(e) => warn!("watching {}: {e}", dir.display()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Parsed {
        let mut parsed = Parsed::default();
        parse_documents(text, "test.yaml", &mut parsed);
        parsed
    }

    #[test]
    fn multi_document_file_with_other_kinds() {
        let update = parse(
            r#"
apiVersion: v1
kind: Service
metadata:
  name: kubia
spec:
  clusterIP: 10.96.0.10
  ports:
  - port: 80
    targetPort: 8080
---
apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: kubia
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubia-abc
  namespace: default
  labels:
    kubernetes.io/service-name: kubia
addressType: IPv4
ports:
- port: 8080
endpoints:
- addresses: ["10.244.1.2"]
"#,
        );
        assert!(update.skipped.is_empty(), "{:?}", update.skipped);
        assert_eq!(update.services.len(), 1);
        assert_eq!(update.slices.len(), 1);
        assert!(update.services.iter().all(|(k, _)| k.namespace == "default"), "namespace defaults to default");
    }

    #[test]
    fn kubectl_list_output_is_read() {
        let update = parse(
            r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: a, namespace: web}
  spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
- apiVersion: v1
  kind: Service
  metadata: {name: b, namespace: web}
  spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
"#,
        );
        assert_eq!(update.services.len(), 2);
    }

    #[test]
    fn legacy_endpoints_become_slices_with_readiness() {
        let update = parse(
            r#"
apiVersion: v1
kind: Endpoints
metadata: {name: external-service}
subsets:
- addresses: [{ip: 11.11.11.11}, {ip: 22.22.22.22}]
  notReadyAddresses: [{ip: 33.33.33.33}]
  ports: [{port: 80}]
"#,
        );
        let slice = &update.slices.first().expect("a mirrored slice").1;
        assert_eq!(slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).map(String::as_str), Some("external-service"));
        let ready: Vec<_> = slice.endpoints.iter().map(|e| e.conditions.as_ref().and_then(|c| c.ready)).collect();
        assert_eq!(ready, [Some(true), Some(true), Some(false)]);
        assert_eq!(slice.ports.as_ref().and_then(|p| p.first()).and_then(|p| p.port), Some(80));
    }

    #[test]
    fn unchanged_files_keep_their_objects_and_the_later_file_wins() {
        let dir = std::env::temp_dir().join(format!("lb-manifests-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let svc = |ip: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: a}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n");
        std::fs::write(dir.join("1.yaml"), svc("10.96.0.1")).expect("write");
        std::fs::write(dir.join("2.yaml"), svc("10.96.0.2")).expect("write");
        std::fs::write(dir.join(".hidden.yaml"), svc("10.96.0.3")).expect("write");
        let mut manifests = ManifestDir::new(dir.clone());
        let first = manifests.load().expect("load");
        let second = manifests.load().expect("load");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(first.objects.services.len(), 1, "one object, defined twice");
        let ip = first.objects.services[0].spec.as_ref().and_then(|s| s.cluster_ip.clone());
        assert_eq!(ip.as_deref(), Some("10.96.0.2"), "the later file wins; hidden files are not read");
        assert!(Arc::ptr_eq(&first.objects.services[0], &second.objects.services[0]), "an unchanged file is not parsed again");
    }

    #[test]
    fn a_malformed_object_is_skipped_with_its_name_and_the_rest_read() {
        let update = parse(
            r#"
apiVersion: v1
kind: Service
metadata: {name: broken}
spec: {ports: "not a list"}
---
apiVersion: v1
kind: Service
metadata: {name: fine}
spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}
"#,
        );
        assert_eq!(update.skipped.len(), 1);
        assert!(update.skipped[0].contains("Service broken"), "{:?}", update.skipped);
        assert_eq!(update.services.len(), 1);
    }
}
