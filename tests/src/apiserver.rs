//! A fake Kubernetes API server, the one fake these tests allow: it speaks
//! the real HTTP list/watch protocol to kube-rs for Services and
//! discovery.k8s.io/v1 EndpointSlices. Lists answer with the current
//! objects and resourceVersion; watches stream JSON lines (ADDED, MODIFIED,
//! DELETED, BOOKMARK) over a chunked response, replaying what happened since
//! the requested resourceVersion; a resourceVersion older than the last
//! compaction gets the 410 Gone ERROR event that makes a client re-list.
//! The test drives it: apply and delete objects, drop every watch, expire
//! resourceVersions, hold a list, or go down entirely (an outage).
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard, mpsc},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::netns::Netns;

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

    fn list_header(self) -> (&'static str, &'static str) {
        match self {
            Kind::Service => ("v1", "ServiceList"),
            Kind::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSliceList"),
            Kind::Node => ("v1", "NodeList"),
            Kind::ServiceCidr => ("networking.k8s.io/v1", "ServiceCIDRList"),
        }
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

enum WatchMessage {
    Line(String),
    /// End the response properly (a server-side watch timeout).
    End,
    /// Cut the connection (a network failure, the server going away).
    Cut,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    /// Every change as (kind, resourceVersion, object name, watch event
    /// line).
    history: Vec<(Kind, u64, String, String)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    down: bool,
    held_lists: BTreeSet<Kind>,
    list_requests: Vec<Kind>,
    /// Open watches: their kind, the name their field selector asks for,
    /// and where their events go.
    watchers: Vec<(Kind, Option<String>, mpsc::Sender<WatchMessage>)>,
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
        let kind = Kind::of(&object).context("not a Service, EndpointSlice or Node")?;
        let mut state = self.lock();
        state.resource_version += 1;
        let rv = state.resource_version;
        let meta = object.get_mut("metadata").and_then(Value::as_object_mut).context("no metadata")?;
        if !kind.cluster_scoped() {
            meta.entry("namespace").or_insert_with(|| json!("default"));
        }
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        let key = object_key(kind, &object)?;
        let event = if state.objects.insert(key, object.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        publish(&mut state, kind, rv, json!({"type": event, "object": object}));
        Ok(())
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<()> {
        let mut state = self.lock();
        let Some(mut object) = state.objects.remove(&(kind, namespace.to_owned(), name.to_owned())) else {
            bail!("no {kind:?} {namespace}/{name}");
        };
        state.resource_version += 1;
        let rv = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        publish(&mut state, kind, rv, json!({"type": "DELETED", "object": object}));
        Ok(())
    }

    /// Cuts every open watch connection, as a network failure would.
    pub fn drop_watches(&self) {
        for (_, _, watcher) in self.lock().watchers.drain(..) {
            let _ = watcher.send(WatchMessage::Cut);
        }
    }

    /// Compacts history: open watches get a 410 Gone ERROR event and end,
    /// and no watch can resume from a resourceVersion before now.
    pub fn expire_resource_versions(&self) {
        let mut state = self.lock();
        state.compacted = state.resource_version + 1;
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

fn publish(state: &mut State, kind: Kind, rv: u64, event: Value) {
    let line = event.to_string();
    let name = event["object"]["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    state.watchers.retain(|(k, wanted, tx)| {
        *k != kind || wanted.as_ref().is_some_and(|w| *w != name) || tx.send(WatchMessage::Line(line.clone())).is_ok()
    });
    state.history.push((kind, rv, name, line));
}

/// The name a `fieldSelector=metadata.name=NAME` query asks for.
fn selected_name(params: &BTreeMap<&str, &str>) -> Option<String> {
    let selector = params.get("fieldSelector")?.replace("%3D", "=").replace("%3d", "=");
    selector.strip_prefix("metadata.name=").map(str::to_owned)
}

fn gone_event() -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version", "reason": "Expired", "code": 410}})
}

/// One connection: requests one after the other (keep-alive), until a watch
/// ends it or the client closes it.
fn serve(conn: TcpStream, shared: &Arc<(Mutex<State>, Condvar)>) {
    let Ok(reader) = conn.try_clone() else { return };
    let mut reader = BufReader::new(reader);
    let mut conn = conn;
    loop {
        let mut request_line = String::new();
        if !matches!(reader.read_line(&mut request_line), Ok(n) if n > 0) {
            return;
        }
        let mut header = String::new();
        loop {
            header.clear();
            if !matches!(reader.read_line(&mut header), Ok(n) if n > 0) {
                return;
            }
            if header == "\r\n" {
                break;
            }
        }
        if lock(shared).down {
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
        let target = request_line.split_whitespace().nth(1).unwrap_or_default();
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let params: BTreeMap<&str, &str> = query.split('&').filter_map(|kv| kv.split_once('=')).collect();
        if let Some(name) = path.strip_prefix("/api/v1/nodes/") {
            let node = lock(shared).objects.get(&(Kind::Node, String::new(), name.to_owned())).cloned();
            let (status, body) = match node {
                Some(node) => ("200 OK", node.to_string()),
                None => ("404 Not Found", json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}).to_string()),
            };
            let _ = write!(conn, "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            continue;
        }
        let Some(kind) = Kind::from_path(path) else {
            let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}).to_string();
            let _ = write!(conn, "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            continue;
        };
        let name = selected_name(&params);
        let keep_going = if matches!(params.get("watch"), Some(&"true" | &"1")) {
            let from = params.get("resourceVersion").and_then(|rv| rv.parse().ok()).unwrap_or(0);
            watch(&mut conn, shared, (kind, name), from)
        } else {
            list(&mut conn, shared, kind, name.as_deref())
        };
        if !keep_going {
            return;
        }
    }
}

fn list(conn: &mut TcpStream, shared: &Arc<(Mutex<State>, Condvar)>, kind: Kind, name: Option<&str>) -> bool {
    let mut state = lock(shared);
    state.list_requests.push(kind);
    shared.1.notify_all();
    let state = shared.1.wait_while(state, |s| s.held_lists.contains(&kind) && !s.down).unwrap_or_else(|p| p.into_inner());
    if state.down {
        let _ = conn.shutdown(Shutdown::Both);
        return false;
    }
    let items: Vec<&Value> =
        state.objects.iter().filter(|((k, _, n), _)| *k == kind && name.is_none_or(|name| name == n)).map(|(_, v)| v).collect();
    let (api_version, list_kind) = kind.list_header();
    let body = json!({"apiVersion": api_version, "kind": list_kind,
        "metadata": {"resourceVersion": state.resource_version.to_string()}, "items": items})
    .to_string();
    drop(state);
    write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).is_ok()
}

/// Streams a watch; returns whether the connection can serve another
/// request.
fn watch(conn: &mut TcpStream, shared: &Arc<(Mutex<State>, Condvar)>, (kind, name): (Kind, Option<String>), from: u64) -> bool {
    let (tx, rx) = mpsc::channel();
    {
        let mut state = lock(shared);
        if from < state.compacted {
            let _ = tx.send(WatchMessage::Line(gone_event().to_string()));
            let _ = tx.send(WatchMessage::End);
        } else {
            let selected = |n: &String| name.as_ref().is_none_or(|name| name == n);
            for (_, _, _, line) in state.history.iter().filter(|(k, rv, n, _)| *k == kind && *rv > from && selected(n)) {
                let _ = tx.send(WatchMessage::Line(line.clone()));
            }
            let (api_version, object_kind) = kind.api_version_kind();
            let bookmark = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": object_kind,
                "metadata": {"resourceVersion": state.resource_version.to_string()}}});
            let _ = tx.send(WatchMessage::Line(bookmark.to_string()));
            state.watchers.push((kind, name, tx));
        }
    }
    if write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").is_err() {
        return false;
    }
    for message in rx {
        match message {
            WatchMessage::Line(line) => {
                let chunk = format!("{line}\n");
                if write!(conn, "{:x}\r\n{chunk}\r\n", chunk.len()).and_then(|()| conn.flush()).is_err() {
                    return false;
                }
            }
            WatchMessage::End => return write!(conn, "0\r\n\r\n").is_ok(),
            WatchMessage::Cut => {
                let _ = conn.shutdown(Shutdown::Both);
                return false;
            }
        }
    }
    false
}
