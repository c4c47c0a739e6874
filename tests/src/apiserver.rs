//! A fake Kubernetes API server, the one fake these tests allow: it speaks
//! the real HTTP list/watch protocol to kube-rs for Services and
//! discovery.k8s.io/v1 EndpointSlices (and Nodes and ServiceCIDRs). Lists
//! answer with the current objects and resourceVersion, in pages when asked
//! (`limit` and `continue`, as kube-rs does by default); watches stream JSON
//! lines (ADDED, MODIFIED, DELETED, BOOKMARK) over a chunked response,
//! replaying what happened since the requested resourceVersion; a
//! resourceVersion or continue token older than the last compaction gets
//! the 410 Gone that makes a client re-list. Lists and watches honour a
//! `labelSelector` (`key`, `!key`, `key=value`, `key==value`, `key!=value`;
//! set-based forms answer 400) and a `fieldSelector` on `metadata.name`
//! (others answer 400, as an API server does for a field it cannot select
//! on); as in the API server's watch cache, an object that comes to match a
//! watch's selection is sent as ADDED, and one that stops matching as
//! DELETED. The test drives it: apply and delete objects, drop every watch,
//! expire resourceVersions, hold a list, or go down entirely (an outage).
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

/// One version of an object, as served: its JSON, and what selections look
/// at.
struct Stored {
    name: String,
    labels: BTreeMap<String, String>,
    json: String,
}

impl Stored {
    fn of(object: &Value) -> Self {
        let meta = &object["metadata"];
        let labels = meta["labels"].as_object().into_iter().flatten().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect();
        Self { name: meta["name"].as_str().unwrap_or_default().to_owned(), labels, json: object.to_string() }
    }

    /// The JSON with another resourceVersion: a deleted object, or one that
    /// left a watch's selection, as the DELETED event at `rv` carries it.
    fn at_resource_version(&self, rv: u64) -> String {
        let mut object: Value = serde_json::from_str(&self.json).unwrap_or_default();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object.to_string()
    }
}

/// What changed at a resourceVersion: `old` is None for an addition, `new`
/// None for a deletion.
struct Change {
    kind: Kind,
    rv: u64,
    old: Option<Arc<Stored>>,
    new: Option<Arc<Stored>>,
}

/// One label requirement of a `labelSelector`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Exists(String),
    DoesNotExist(String),
    Equals(String, String),
    NotEquals(String, String),
}

/// What a list or watch selects: a `fieldSelector` on `metadata.name`, and a
/// `labelSelector`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Selection {
    name: Option<String>,
    labels: Vec<Requirement>,
}

impl Selection {
    /// The selection of a request's query, or why the API server would
    /// answer 400 Bad Request.
    fn of(params: &BTreeMap<String, String>) -> Result<Self, String> {
        let mut selection = Selection::default();
        if let Some(fields) = params.get("fieldSelector").filter(|f| !f.is_empty()) {
            match fields.strip_prefix("metadata.name=") {
                Some(name) if !name.contains(',') => selection.name = Some(name.to_owned()),
                _ => return Err(format!("field label not supported: {fields}")),
            }
        }
        for term in params.get("labelSelector").into_iter().flat_map(|l| l.split(',')).map(str::trim).filter(|t| !t.is_empty()) {
            let requirement = if term.contains(['(', ' ']) {
                return Err(format!("unsupported label selector term {term:?} (only key, !key, key=value, key==value, key!=value)"));
            } else if let Some((key, value)) = term.split_once("!=") {
                Requirement::NotEquals(key.to_owned(), value.to_owned())
            } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Requirement::Equals(key.to_owned(), value.to_owned())
            } else if let Some(key) = term.strip_prefix('!') {
                Requirement::DoesNotExist(key.to_owned())
            } else {
                Requirement::Exists(term.to_owned())
            };
            selection.labels.push(requirement);
        }
        Ok(selection)
    }

    fn selects(&self, object: &Stored) -> bool {
        let label = |key: &String| object.labels.get(key);
        self.name.as_ref().is_none_or(|name| *name == object.name)
            && self.labels.iter().all(|requirement| match requirement {
                Requirement::Exists(key) => label(key).is_some(),
                Requirement::DoesNotExist(key) => label(key).is_none(),
                Requirement::Equals(key, value) => label(key) == Some(value),
                Requirement::NotEquals(key, value) => label(key) != Some(value),
            })
    }

    /// The watch event line a change makes for a watch with this selection,
    /// if any (the API server's watch cache: an object entering the
    /// selection is ADDED, one leaving it DELETED with its last content).
    fn event(&self, change: &Change) -> Option<String> {
        let was = change.old.as_ref().filter(|o| self.selects(o));
        let is = change.new.as_ref().filter(|o| self.selects(o));
        let (kind, object) = match (was, is) {
            (None, None) => return None,
            (None, Some(new)) => ("ADDED", new.json.clone()),
            (Some(_), Some(new)) => ("MODIFIED", new.json.clone()),
            (Some(old), None) => ("DELETED", old.at_resource_version(change.rv)),
        };
        Some(format!("{{\"type\":\"{kind}\",\"object\":{object}}}"))
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

/// A query's parameters, percent-decoded.
fn query_params(query: &str) -> BTreeMap<String, String> {
    query.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (percent_decode(k), percent_decode(v))).collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (byte, _) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(code: u16, reason: &str, message: &str) -> (String, String) {
    let text = match code {
        400 => "400 Bad Request",
        404 => "404 Not Found",
        410 => "410 Gone",
        _ => "500 Internal Server Error",
    };
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code});
    (text.to_owned(), body.to_string())
}

fn respond(conn: &mut TcpStream, (status, body): (String, String)) -> bool {
    write!(conn, "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).is_ok()
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
        let params = query_params(query);
        if let Some(name) = path.strip_prefix("/api/v1/nodes/") {
            let node = lock(shared).objects.get(&(Kind::Node, String::new(), name.to_owned())).cloned();
            let answer = match node {
                Some(node) => ("200 OK".to_owned(), node.json.clone()),
                None => status(404, "NotFound", &format!("nodes \"{name}\" not found")),
            };
            respond(&mut conn, answer);
            continue;
        }
        let Some(kind) = Kind::from_path(path) else {
            respond(&mut conn, status(404, "NotFound", "the server could not find the requested resource"));
            continue;
        };
        let selection = match Selection::of(&params) {
            Ok(selection) => selection,
            Err(message) => {
                respond(&mut conn, status(400, "BadRequest", &message));
                continue;
            }
        };
        lock(shared).selectors.insert((kind, params.get("labelSelector").cloned().unwrap_or_default()));
        let keep_going = if matches!(params.get("watch").map(String::as_str), Some("true" | "1")) {
            let from = params.get("resourceVersion").and_then(|rv| rv.parse().ok()).unwrap_or(0);
            watch(&mut conn, shared, (kind, selection), from)
        } else {
            let limit = params.get("limit").and_then(|l| l.parse().ok()).filter(|&l| l > 0);
            list(&mut conn, shared, (kind, &selection), limit, params.get("continue").map(String::as_str))
        };
        if !keep_going {
            return;
        }
    }
}

/// A list, or one page of it: at most `limit` objects after the continue
/// token's (`resourceVersion/namespace/name`, the last object sent). A
/// continued list is served from the current objects, not from a snapshot
/// at the token's resourceVersion as etcd does; the watch that follows
/// replays every change since that resourceVersion, so a client still
/// ends up with the current state.
fn list(conn: &mut TcpStream, shared: &Arc<(Mutex<State>, Condvar)>, (kind, selection): (Kind, &Selection), limit: Option<usize>, from: Option<&str>) -> bool {
    let mut state = lock(shared);
    state.list_requests.push(kind);
    shared.1.notify_all();
    let state = shared.1.wait_while(state, |s| s.held_lists.contains(&kind) && !s.down).unwrap_or_else(|p| p.into_inner());
    if state.down {
        let _ = conn.shutdown(Shutdown::Both);
        return false;
    }
    let token = from.filter(|t| !t.is_empty()).map(|t| {
        let mut parts = t.splitn(3, '/');
        let rv = parts.next().and_then(|rv| rv.parse::<u64>().ok()).unwrap_or(0);
        (rv, parts.next().unwrap_or_default().to_owned(), parts.next().unwrap_or_default().to_owned())
    });
    let list_rv = match &token {
        Some((rv, _, _)) if *rv < state.compacted => {
            drop(state);
            return respond(conn, status(410, "Expired", "The provided continue parameter is too old to display a consistent list result."));
        }
        Some((rv, _, _)) => *rv,
        None => state.resource_version,
    };
    let start = match &token {
        Some((_, namespace, name)) => std::ops::Bound::Excluded((kind, namespace.clone(), name.clone())),
        None => std::ops::Bound::Included((kind, String::new(), String::new())),
    };
    let mut selected = state.objects.range((start, std::ops::Bound::Unbounded)).take_while(|((k, _, _), _)| *k == kind).filter(|(_, o)| selection.selects(o));
    let mut items = Vec::new();
    let mut last = None;
    for (key, object) in selected.by_ref().take(limit.unwrap_or(usize::MAX)) {
        items.push(object.json.as_str());
        last = Some(key);
    }
    let more = selected.next().is_some();
    let continue_token = match last {
        Some((_, namespace, name)) if more => format!("{list_rv}/{namespace}/{name}"),
        _ => String::new(),
    };
    let (api_version, list_kind) = kind.list_header();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if !continue_token.is_empty() {
        metadata["continue"] = json!(continue_token);
    }
    let body = format!("{{\"apiVersion\":\"{api_version}\",\"kind\":\"{list_kind}\",\"metadata\":{metadata},\"items\":[{}]}}", items.join(","));
    drop(state);
    respond(conn, ("200 OK".to_owned(), body))
}

/// Streams a watch; returns whether the connection can serve another
/// request.
fn watch(conn: &mut TcpStream, shared: &Arc<(Mutex<State>, Condvar)>, (kind, selection): (Kind, Selection), from: u64) -> bool {
    let (tx, rx) = mpsc::channel();
    {
        let mut state = lock(shared);
        if from < state.compacted {
            let _ = tx.send(WatchMessage::Line(gone_event().to_string()));
            let _ = tx.send(WatchMessage::End);
        } else {
            for change in state.history.iter().filter(|c| c.kind == kind && c.rv > from) {
                if let Some(line) = selection.event(change) {
                    let _ = tx.send(WatchMessage::Line(line));
                }
            }
            let (api_version, object_kind) = kind.api_version_kind();
            let bookmark = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": object_kind,
                "metadata": {"resourceVersion": state.resource_version.to_string()}}});
            let _ = tx.send(WatchMessage::Line(bookmark.to_string()));
            state.watchers.push((kind, selection, tx));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(labels: Value) -> Arc<Stored> {
        Arc::new(Stored::of(&json!({"metadata": {"name": "a", "namespace": "default", "resourceVersion": "3", "labels": labels}})))
    }

    fn selection(label_selector: &str) -> Result<Selection, String> {
        Selection::of(&query_params(&format!("labelSelector={label_selector}")))
    }

    #[test]
    fn a_query_is_percent_decoded() {
        let params = query_params("labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21b&fieldSelector=metadata.name%3Dnode-1&x=a+b");
        assert_eq!(params["labelSelector"], "!service.kubernetes.io/service-proxy-name,!b");
        assert_eq!(params["fieldSelector"], "metadata.name=node-1");
        assert_eq!(params["x"], "a b");
    }

    #[test]
    fn label_selectors_select_as_the_api_server_does() {
        let kube_proxy = selection("%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless").expect("valid");
        assert!(kube_proxy.selects(&stored(json!({"app": "kubia"}))));
        assert!(kube_proxy.selects(&stored(json!(null))), "no labels at all");
        assert!(!kube_proxy.selects(&stored(json!({"service.kubernetes.io/service-proxy-name": "other"}))));
        assert!(!kube_proxy.selects(&stored(json!({"service.kubernetes.io/headless": ""}))));
        let cases = [("app", true), ("app=kubia", true), ("app==kubia", true), ("app!=kubia", false), ("app!=other", true), ("tier", false), ("tier!=x", true), ("!app", false)];
        for (selector, selected) in cases {
            assert_eq!(selection(selector).expect("valid").selects(&stored(json!({"app": "kubia"}))), selected, "{selector}");
        }
        assert!(selection("app%20in%20(kubia)").is_err(), "set-based forms are not served");
        assert!(Selection::of(&query_params("fieldSelector=spec.clusterIP%21%3DNone")).is_err(), "a field the server cannot select on");
    }

    #[test]
    fn a_watch_sees_objects_enter_and_leave_its_selection() {
        let selection = selection("%21other").expect("valid");
        let change = |old: Option<Value>, new: Option<Value>| Change { kind: Kind::Service, rv: 7, old: old.map(stored), new: new.map(stored) };
        let event = |c: Change| selection.event(&c).map(|line| serde_json::from_str::<Value>(&line).expect("JSON"));
        let (plain, labelled) = (json!({}), json!({"other": "x"}));
        let added = event(change(None, Some(plain.clone()))).expect("an event");
        assert_eq!(added["type"], "ADDED");
        assert_eq!(event(change(Some(plain.clone()), Some(plain.clone()))).expect("an event")["type"], "MODIFIED");
        let left = event(change(Some(plain.clone()), Some(labelled.clone()))).expect("an event");
        assert_eq!((&left["type"], &left["object"]["metadata"]["resourceVersion"]), (&json!("DELETED"), &json!("7")), "with its last selected content, at the change");
        assert!(left["object"]["metadata"]["labels"].get("other").is_none(), "{left}");
        assert_eq!(event(change(Some(labelled.clone()), Some(plain.clone()))).expect("an event")["type"], "ADDED");
        assert_eq!(event(change(Some(labelled.clone()), Some(labelled.clone()))), None);
        assert_eq!(event(change(Some(plain), None)).expect("an event")["type"], "DELETED");
        assert_eq!(event(change(Some(labelled), None)), None);
    }
}
