//! The fake API server's HTTP side: serving one connection's requests.
//!
//! Lists (in pages) and watches (a chunked stream of event lines), and the
//! Status bodies of its errors.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Shutdown, TcpStream},
    sync::{Arc, Condvar, Mutex, mpsc},
};

use serde_json::{Value, json};

use super::{Kind, State, lock, selection::Selection};

pub(super) enum WatchMessage {
    Line(String),
    /// End the response properly (a server-side watch timeout).
    End,
    /// Cut the connection (a network failure, the server going away).
    Cut,
}

/// A query's parameters, percent-decoded.
pub(super) fn query_params(query: &str) -> BTreeMap<String, String> {
    query.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (percent_decode(k), percent_decode(v))).collect()
}

pub(super) fn percent_decode(text: &str) -> String {
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

pub(super) fn status(code: u16, reason: &str, message: &str) -> (String, String) {
    let text = match code {
        400 => "400 Bad Request",
        404 => "404 Not Found",
        410 => "410 Gone",
        _ => "500 Internal Server Error",
    };
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code});
    (text.to_owned(), body.to_string())
}

pub(super) fn respond(conn: &mut TcpStream, (status, body): (String, String)) -> bool {
    write!(conn, "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).is_ok()
}

pub(super) fn gone_event() -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version", "reason": "Expired", "code": 410}})
}

/// One connection: requests one after the other (keep-alive), until a watch
/// ends it or the client closes it.
pub(super) fn serve(conn: TcpStream, shared: &Arc<(Mutex<State>, Condvar)>) {
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
pub(super) fn list(conn: &mut TcpStream, shared: &Arc<(Mutex<State>, Condvar)>, (kind, selection): (Kind, &Selection), limit: Option<usize>, from: Option<&str>) -> bool {
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
    let (api_version, object_kind) = kind.api_version_kind();
    let list_kind = format!("{object_kind}List");
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
pub(super) fn watch(conn: &mut TcpStream, shared: &Arc<(Mutex<State>, Condvar)>, (kind, selection): (Kind, Selection), from: u64) -> bool {
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
    use super::query_params;

    #[test]
    fn a_query_is_percent_decoded() {
        let params = query_params("labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21b&fieldSelector=metadata.name%3Dnode-1&x=a+b");
        assert_eq!(params["labelSelector"], "!service.kubernetes.io/service-proxy-name,!b");
        assert_eq!(params["fieldSelector"], "metadata.name=node-1");
        assert_eq!(params["x"], "a b");
    }
}
