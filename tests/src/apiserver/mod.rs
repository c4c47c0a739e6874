//! A fake Kubernetes API server for the agent's API source, the one fake these tests allow.
//!
//! It speaks the real HTTP list/watch protocol to kube-rs for Services and
//! discovery.k8s.io/v1 EndpointSlices (and Nodes and ServiceCIDRs). Lists
//! answer with the current objects and resourceVersion, in pages when asked
//! (`limit` and `continue`, as kube-rs does by default); watches stream JSON
//! lines (ADDED, MODIFIED, DELETED, BOOKMARK) over a chunked response,
//! replaying what happened since the requested resourceVersion; a
//! resourceVersion or continue token older than the last compaction gets the
//! 410 Gone that makes a client re-list. Lists and watches honour a
//! `labelSelector` (`key`, `!key`, `key=value`, `key==value`, `key!=value`;
//! set-based forms answer 400) and a `fieldSelector` on `metadata.name` (others
//! answer 400, as an API server does for a field it cannot select on); as in
//! the API server's watch cache, an object that comes to match a watch's
//! selection is sent as ADDED, and one that stops matching as DELETED. The test
//! drives it: apply and delete objects, drop every watch, expire
//! resourceVersions, hold a list, or go down entirely (an outage).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::TcpListener,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard, mpsc},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::netns::Netns;

mod http;
mod selection;

use http::{WatchMessage, gone_event, serve};
use selection::{Change, Selection, Stored};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    /// Cluster-scoped: kept under the namespace "", as ServiceCIDR.
    Node,
    ServiceCidr,
}

impl Kind {
    fn of(value: &Value) -> Option<Self> {
        match (value.get("apiVersion")?.as_str()?, value.get("kind")?.as_str()?) {
            ("v1", "Service") => Some(Kind::Service),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(Kind::EndpointSlice),
            ("v1", "Node") => Some(Kind::Node),
            ("networking.k8s.io/v1", "ServiceCIDR") => Some(Kind::ServiceCidr),
            _ => None,
        }
    }

    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Kind::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            "/api/v1/nodes" => Some(Kind::Node),
            "/apis/networking.k8s.io/v1/servicecidrs" => Some(Kind::ServiceCidr),
            _ => None,
        }
    }

    fn cluster_scoped(self) -> bool {
        matches!(self, Kind::Node | Kind::ServiceCidr)
    }

    fn api_version_kind(self) -> (&'static str, &'static str) {
        match self {
            Kind::Service => ("v1", "Service"),
            Kind::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSlice"),
            Kind::Node => ("v1", "Node"),
            Kind::ServiceCidr => ("networking.k8s.io/v1", "ServiceCIDR"),
        }
    }
}

#[derive(Default)]
struct State {
    resource_version: u64,
    objects: BTreeMap<(Kind, String, String), Arc<Stored>>,
    /// Every change since the last compaction, in order.
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    down: bool,
    held_lists: BTreeSet<Kind>,
    list_requests: Vec<Kind>,
    /// The label selectors lists and watches asked for ("" for none).
    selectors: BTreeSet<(Kind, String)>,
    /// Open watches: their kind, what they select, and where their events
    /// go.
    watchers: Vec<(Kind, Selection, mpsc::Sender<WatchMessage>)>,
}

/// The server; it runs until dropped.
pub struct FakeApiServer {
    state: Arc<(Mutex<State>, Condvar)>,
    pub port: u16,
}

impl FakeApiServer {
    /// Listens on 127.0.0.1 inside `ns`, where the agent runs.
    pub fn start_in(ns: &Netns) -> Result<Self> {
        let listener = ns.enter(|| TcpListener::bind("127.0.0.1:0"))??;
        let port = listener.local_addr()?.port();
        let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let shared = state.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let shared = shared.clone();
                thread::spawn(move || serve(conn, &shared));
            }
        });
        Ok(Self { state, port })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// A kubeconfig pointing at this server.
    pub fn write_kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://127.0.0.1:{}\"}}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n",
            self.port
        );
        std::fs::write(&path, config)?;
        Ok(path)
    }

    /// Creates or replaces every Service and EndpointSlice in a YAML
    /// (multi-document) text, as `kubectl apply` would.
    pub fn apply_yaml(&self, text: &str) -> Result<()> {
        for document in serde_yaml_ng::Deserializer::from_str(text) {
            let value = Value::deserialize(document)?;
            if Kind::of(&value).is_some() {
                self.apply(value)?;
            }
        }
        Ok(())
    }

    /// Creates or replaces a Node: served to `GET /api/v1/nodes/NAME`, and
    /// to lists and watches (with a `metadata.name` field selector).
    pub fn put_node(&self, node: Value) -> Result<()> {
        self.apply(node)
    }

    pub fn apply(&self, mut object: Value) -> Result<()> {
        let kind = Kind::of(&object).context("not a Service, EndpointSlice, Node or ServiceCIDR")?;
        let mut state = self.lock();
        state.resource_version += 1;
        let rv = state.resource_version;
        let meta = object.get_mut("metadata").and_then(Value::as_object_mut).context("no metadata")?;
        if !kind.cluster_scoped() {
            meta.entry("namespace").or_insert_with(|| json!("default"));
        }
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        let key = object_key(kind, &object)?;
        let new = Arc::new(Stored::of(&object));
        let old = state.objects.insert(key, new.clone());
        publish(&mut state, Change { kind, rv, old, new: Some(new) });
        Ok(())
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<()> {
        let mut state = self.lock();
        let Some(old) = state.objects.remove(&(kind, namespace.to_owned(), name.to_owned())) else {
            bail!("no {kind:?} {namespace}/{name}");
        };
        state.resource_version += 1;
        let rv = state.resource_version;
        publish(&mut state, Change { kind, rv, old: Some(old), new: None });
        Ok(())
    }

    /// Cuts every open watch connection, as a network failure would.
    pub fn drop_watches(&self) {
        for (_, _, watcher) in self.lock().watchers.drain(..) {
            let _ = watcher.send(WatchMessage::Cut);
        }
    }

    /// Compacts history: open watches get a 410 Gone ERROR event and end,
    /// and no watch or continued list can resume from a resourceVersion
    /// before now. The compaction takes a resourceVersion of its own, which
    /// lists answer from then on, so that a client listing again can watch
    /// from there even if nothing changes.
    pub fn expire_resource_versions(&self) {
        let mut state = self.lock();
        state.resource_version += 1;
        state.compacted = state.resource_version;
        state.history.clear();
        for (_, _, watcher) in state.watchers.drain(..) {
            let _ = watcher.send(WatchMessage::Line(gone_event().to_string()));
            let _ = watcher.send(WatchMessage::End);
        }
    }

    /// Takes the server down (every connection cut, new ones closed at once)
    /// or brings it back.
    pub fn set_down(&self, down: bool) {
        let mut state = self.lock();
        state.down = down;
        if down {
            for (_, _, watcher) in state.watchers.drain(..) {
                let _ = watcher.send(WatchMessage::Cut);
            }
        }
        self.state.1.notify_all();
    }

    /// Lists of `kind` wait until released.
    pub fn hold_lists(&self, kind: Kind, hold: bool) {
        let mut state = self.lock();
        if hold {
            state.held_lists.insert(kind);
        } else {
            state.held_lists.remove(&kind);
        }
        self.state.1.notify_all();
    }

    /// Waits until a list of `kind` has been requested.
    pub fn wait_for_list_request(&self, kind: Kind, timeout: Duration) -> Result<()> {
        let state = self.lock();
        let (state, result) = self
            .state
            .1
            .wait_timeout_while(state, timeout, |s| !s.list_requests.contains(&kind))
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        if result.timed_out() {
            bail!("no list of {kind:?} requested within {timeout:?} (requests: {:?})", state.list_requests);
        }
        Ok(())
    }

    /// How many watches are open now.
    pub fn open_watches(&self) -> usize {
        self.lock().watchers.len()
    }

    /// The label selectors that lists and watches of `kind` asked for so
    /// far (an empty string for none), each once.
    pub fn label_selectors(&self, kind: Kind) -> BTreeSet<String> {
        self.lock().selectors.iter().filter(|(k, _)| *k == kind).map(|(_, s)| s.clone()).collect()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.set_down(true);
    }
}

fn lock(state: &(Mutex<State>, Condvar)) -> MutexGuard<'_, State> {
    state.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn object_key(kind: Kind, object: &Value) -> Result<(Kind, String, String)> {
    let meta = &object["metadata"];
    let name = meta["name"].as_str().context("no metadata.name")?;
    let namespace = if kind.cluster_scoped() { "" } else { meta["namespace"].as_str().unwrap_or("default") };
    Ok((kind, namespace.to_owned(), name.to_owned()))
}

fn publish(state: &mut State, change: Change) {
    state.watchers.retain(|(kind, selection, tx)| {
        *kind != change.kind || selection.event(&change).is_none_or(|line| tx.send(WatchMessage::Line(line)).is_ok())
    });
    state.history.push(change);
}

