//! What a list or watch of the fake API server selects, and the watch event a change makes.
//!
//! Selections are by `labelSelector` and by `fieldSelector` on the name.
use std::{collections::BTreeMap, sync::Arc};

use serde_json::{Value, json};

use super::Kind;

/// One version of an object, as served: its JSON, and what selections look
/// at.
pub(super) struct Stored {
    pub(super) name: String,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) json: String,
}

impl Stored {
    pub(super) fn of(object: &Value) -> Self {
        let meta = &object["metadata"];
        let labels = meta["labels"].as_object().into_iter().flatten().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect();
        Self { name: meta["name"].as_str().unwrap_or_default().to_owned(), labels, json: object.to_string() }
    }

    /// The JSON with another resourceVersion: a deleted object, or one that
    /// left a watch's selection, as the DELETED event at `rv` carries it.
    pub(super) fn at_resource_version(&self, rv: u64) -> String {
        let mut object: Value = serde_json::from_str(&self.json).unwrap_or_default();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object.to_string()
    }
}

/// What changed at a resourceVersion: `old` is None for an addition, `new`
/// None for a deletion.
pub(super) struct Change {
    pub(super) kind: Kind,
    pub(super) rv: u64,
    pub(super) old: Option<Arc<Stored>>,
    pub(super) new: Option<Arc<Stored>>,
}

/// One label requirement of a `labelSelector`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Requirement {
    Exists(String),
    DoesNotExist(String),
    Equals(String, String),
    NotEquals(String, String),
}

/// What a list or watch selects: a `fieldSelector` on `metadata.name`, and a
/// `labelSelector`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Selection {
    pub(super) name: Option<String>,
    pub(super) labels: Vec<Requirement>,
}

impl Selection {
    /// The selection of a request's query, or why the API server would
    /// answer 400 Bad Request.
    pub(super) fn of(params: &BTreeMap<String, String>) -> Result<Self, String> {
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

    pub(super) fn selects(&self, object: &Stored) -> bool {
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
    pub(super) fn event(&self, change: &Change) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::http::query_params;

    fn stored(labels: Value) -> Arc<Stored> {
        Arc::new(Stored::of(&json!({"metadata": {"name": "a", "namespace": "default", "resourceVersion": "3", "labels": labels}})))
    }

    fn selection(label_selector: &str) -> Result<Selection, String> {
        Selection::of(&query_params(&format!("labelSelector={label_selector}")))
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
