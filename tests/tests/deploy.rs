//! Checks of the deploy/ manifests, so that mistakes fail here and not at `kubectl apply`.
//!
//! Every manifest under deploy/ parses into its typed Kubernetes object (a
//! misspelt field fails here), the DaemonSet is what a kube-proxy replacement
//! needs, and the RBAC only reads.
use std::path::{Path, PathBuf};

use k8s_openapi::api::{
    apps::v1::{DaemonSet, ReplicaSet},
    core::v1::{Endpoints, Probe, Service, ServiceAccount},
    discovery::v1::EndpointSlice,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document under `dir` (recursively), with its file.
fn documents(dir: &Path) -> Vec<(PathBuf, serde_yaml_ng::Value)> {
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).expect("deploy/").map(|e| e.expect("entry").path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            out.extend(documents(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).expect("readable");
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                out.push((path.clone(), serde_yaml_ng::Value::deserialize(doc).expect("YAML")));
            }
        }
    }
    out
}

/// Deserializes strictly: unknown fields are errors.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(path: &Path, value: &serde_yaml_ng::Value) -> T {
    let strict = serde_json::to_value(value).expect("JSON-compatible");
    let parsed: T = serde_json::from_value(strict.clone()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // k8s-openapi ignores unknown fields: compare the round trip instead.
    let round_trip = serde_json::to_value(&parsed).expect("serializable");
    assert_no_unknown_fields(&strict, &round_trip, path, "");
    parsed
}

fn assert_no_unknown_fields(original: &serde_json::Value, parsed: &serde_json::Value, path: &Path, at: &str) {
    match (original, parsed) {
        (serde_json::Value::Object(o), serde_json::Value::Object(p)) => {
            for (key, value) in o {
                let inner = p.get(key).unwrap_or_else(|| panic!("{}: unknown field {at}.{key}", path.display()));
                assert_no_unknown_fields(value, inner, path, &format!("{at}.{key}"));
            }
        }
        (serde_json::Value::Array(o), serde_json::Value::Array(p)) => {
            for (i, (a, b)) in o.iter().zip(p).enumerate() {
                assert_no_unknown_fields(a, b, path, &format!("{at}[{i}]"));
            }
        }
        _ => {}
    }
}

#[test]
fn every_manifest_parses_into_its_typed_object() {
    let docs = documents(&deploy());
    assert!(docs.len() >= 10, "found {} documents", docs.len());
    for (path, value) in &docs {
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
        match kind {
            "DaemonSet" => drop(typed::<DaemonSet>(path, value)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(path, value)),
            "ClusterRole" => drop(typed::<ClusterRole>(path, value)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(path, value)),
            "Service" => drop(typed::<Service>(path, value)),
            "EndpointSlice" => drop(typed::<EndpointSlice>(path, value)),
            "Endpoints" => drop(typed::<Endpoints>(path, value)),
            "ReplicaSet" => drop(typed::<ReplicaSet>(path, value)),
            "Kustomization" => {}
            other => panic!("{}: unexpected kind {other:?}", path.display()),
        }
    }
}

#[test]
fn rbac_grants_only_get_list_watch() {
    for (path, value) in documents(&deploy()) {
        if value.get("kind").and_then(|k| k.as_str()) == Some("ClusterRole") {
            let role: ClusterRole = typed(&path, &value);
            for rule in role.rules.iter().flatten() {
                let mut verbs = rule.verbs.clone();
                verbs.sort();
                assert_eq!(verbs, ["get", "list", "watch"], "{}: {rule:?}", path.display());
            }
        }
    }
}

#[test]
fn daemonset_runs_on_the_host_network_with_capabilities_not_privilege() {
    let (path, value) = documents(&deploy())
        .into_iter()
        .find(|(_, v)| v.get("kind").and_then(|k| k.as_str()) == Some("DaemonSet"))
        .expect("a DaemonSet");
    let ds: DaemonSet = typed(&path, &value);
    let pod = ds.spec.and_then(|s| s.template.spec).expect("a pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.host_pid, Some(true), "pods' network namespaces are reached through their processes");
    let container = &pod.containers[0];
    let security = container.security_context.as_ref().expect("a security context");
    assert_ne!(security.privileged, Some(true));
    let added = security.capabilities.as_ref().and_then(|c| c.add.clone()).unwrap_or_default();
    for cap in ["BPF", "NET_ADMIN", "SYS_PTRACE", "SYS_ADMIN"] {
        assert!(added.iter().any(|a| a == cap), "capability {cap} in {added:?}");
    }
    let env = container.env.as_ref().and_then(|e| e.iter().find(|v| v.name == "NODE_NAME")).expect("NODE_NAME");
    let field = env.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str());
    assert_eq!(field, Some("spec.nodeName"), "NODE_NAME from the downward API");
    let probe_path = |p: &Option<Probe>| p.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.clone());
    assert_eq!(probe_path(&container.readiness_probe).as_deref(), Some("/healthz"));
    assert_eq!(probe_path(&container.liveness_probe).as_deref(), Some("/livez"));
    let mounts: Vec<&str> = container.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    assert!(mounts.contains(&"/sys/fs/bpf") && mounts.contains(&"/sys"), "{mounts:?}");
    // The one privileged step: node sysctls the agent cannot write itself
    // (accept_local, a strict rp_filter made loose), and nothing else.
    for init in pod.init_containers.iter().flatten() {
        let command = init.command.clone().unwrap_or_default().join(" ");
        assert!(command.contains("echo 1 > /proc/sys/net/ipv4/conf/all/accept_local"), "init container {} runs {command:?}", init.name);
        let written: Vec<&str> = command.split("> ").skip(1).filter_map(|rest| rest.split(|c: char| c.is_whitespace() || c == ';').next()).collect();
        let allowed = ["/proc/sys/net/ipv4/conf/all/accept_local", "/proc/sys/net/ipv4/conf/all/rp_filter"];
        assert!(written.iter().all(|w| allowed.contains(w)), "init container {} writes {written:?}", init.name);
    }
}
