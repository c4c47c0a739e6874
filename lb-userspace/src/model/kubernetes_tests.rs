//! The model's tests: tables named after each of kube-proxy's rules.
use serde_json::json;

use std::collections::BTreeMap;

use super::*;
use crate::model::Endpoint;
use crate::model::ServiceHealth;

const NODE: &str = "node-a";

fn service(value: serde_json::Value) -> (ObjectKey, Service) {
    let service: Service = serde_json::from_value(value).expect("a Service");
    (ObjectKey::of(&service.metadata), service)
}

fn slice(value: serde_json::Value) -> (ObjectKey, EndpointSlice) {
    let slice: EndpointSlice = serde_json::from_value(value).expect("an EndpointSlice");
    (ObjectKey::of(&slice.metadata), slice)
}

fn kubia(extra_spec: serde_json::Value) -> serde_json::Value {
    let mut spec = json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        spec.extend(extra.clone());
    }
    json!({"metadata": {"name": "kubia", "namespace": "default"}, "spec": spec})
}

fn kubia_slice(name: &str, endpoints: serde_json::Value) -> serde_json::Value {
    json!({"metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": endpoints})
}

fn kubia_slice6(name: &str, endpoints: serde_json::Value) -> serde_json::Value {
    json!({"metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia"}},
           "addressType": "IPv6", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": endpoints})
}

fn ep(ip: &str) -> serde_json::Value {
    json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": NODE})
}

fn objects(services: &[serde_json::Value], slices: &[serde_json::Value]) -> ClusterObjects {
    ClusterObjects {
        services: services.iter().cloned().map(|v| Arc::new(service(v).1)).collect(),
        slices: slices.iter().cloned().map(|v| Arc::new(slice(v).1)).collect(),
    }
}

/// endpoint list as "ip:port" strings, per "ns/name:port".
fn programmed(computed: &Computed) -> Programmed {
    computed
        .state
        .services
        .iter()
        .map(|(name, sp)| (name.to_string(), sp.endpoints.iter().map(|e| format!("{}:{}", e.ip, e.port)).collect()))
        .collect()
}

fn map(entries: &[(&str, &[&str])]) -> Programmed {
    entries.iter().map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect())).collect()
}

/// Service port → its endpoints as "ip:port".
type Programmed = BTreeMap<String, Vec<String>>;

/// Each case: the rule it checks, the objects, and what must be
/// programmed (service port → endpoints) and how many objects skipped.
#[test]
fn kube_proxy_rules() {
    let cases: Vec<(&str, ClusterObjects, Programmed, usize)> = vec![
        (
            "ready endpoints serve",
            objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([ep("10.244.1.2"), ep("10.244.2.2")]))]),
            map(&[("default/kubia:http", &["10.244.1.2:8080", "10.244.2.2:8080"])]),
            0,
        ),
        (
            "not-ready endpoints do not serve while a ready one exists",
            objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([ep("10.244.1.2"),
                {"addresses": ["10.244.2.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.3.2"], "conditions": {"ready": false, "serving": false}}]))]),
            map(&[("default/kubia:http", &["10.244.1.2:8080"])]),
            0,
        ),
        (
            "with no ready endpoint, serving and terminating ones serve",
            objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([
                {"addresses": ["10.244.2.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.3.2"], "conditions": {"ready": false, "serving": false, "terminating": true}},
                {"addresses": ["10.244.4.2"], "conditions": {"ready": false, "serving": true, "terminating": false}}]))]),
            map(&[("default/kubia:http", &["10.244.2.2:8080"])]),
            0,
        ),
        (
            "unset conditions mean ready",
            objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([{"addresses": ["10.244.1.2"]}]))]),
            map(&[("default/kubia:http", &["10.244.1.2:8080"])]),
            0,
        ),
        (
            "multi-port service: one service port per port, each with its protocol",
            objects(
                &[json!({"metadata": {"name": "kubia", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.10", "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080}, {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]}})],
                &[json!({"metadata": {"name": "s1", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia"}},
                    "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
                    "endpoints": [ep("10.244.1.2")]})],
            ),
            map(&[("default/kubia:dns", &["10.244.1.2:5353"]), ("default/kubia:http", &["10.244.1.2:8080"])]),
            0,
        ),
        (
            "named targetPort resolves per endpoint from its slice's port",
            objects(
                &[kubia(json!({"ports": [{"name": "http", "port": 80, "targetPort": "web"}]}))],
                &[
                    kubia_slice("s1", json!([ep("10.244.1.2")])),
                    json!({"metadata": {"name": "s2", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia"}},
                        "addressType": "IPv4", "ports": [{"name": "http", "port": 9090}], "endpoints": [ep("10.244.2.2")]}),
                ],
            ),
            map(&[("default/kubia:http", &["10.244.1.2:8080", "10.244.2.2:9090"])]),
            0,
        ),
        (
            "a slice port serves only the service port of its protocol",
            objects(
                &[kubia(json!({"ports": [{"name": "http", "port": 80, "protocol": "UDP"}]}))],
                &[kubia_slice("s1", json!([ep("10.244.1.2")]))],
            ),
            map(&[("default/kubia:http", &[])]),
            0,
        ),
        (
            "service without selector: served from the slices that name it",
            objects(
                &[json!({"metadata": {"name": "external-db", "namespace": "prod"}, "spec": {"clusterIP": "10.96.7.7", "ports": [{"port": 5432}]}})],
                &[json!({"metadata": {"name": "external-db-1", "namespace": "prod", "labels": {"kubernetes.io/service-name": "external-db"}},
                    "addressType": "IPv4", "ports": [{"port": 5432}], "endpoints": [{"addresses": ["192.0.2.10"]}]})],
            ),
            map(&[("prod/external-db", &["192.0.2.10:5432"])]),
            0,
        ),
        (
            "slices of a same-named service in another namespace do not count",
            objects(&[kubia(json!({}))], &[json!({"metadata": {"name": "s1", "namespace": "other", "labels": {"kubernetes.io/service-name": "kubia"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": [ep("10.244.9.9")]})]),
            map(&[("default/kubia:http", &[])]),
            0,
        ),
        (
            "headless service is not programmed",
            objects(&[kubia(json!({"clusterIP": "None"}))], &[kubia_slice("s1", json!([ep("10.244.1.2")]))]),
            map(&[]),
            0,
        ),
        (
            "ExternalName service is not programmed",
            objects(&[json!({"metadata": {"name": "db", "namespace": "default"}, "spec": {"type": "ExternalName", "externalName": "db.example.com"}})], &[]),
            map(&[]),
            0,
        ),
        (
            "service of another proxy is not programmed",
            objects(&[json!({"metadata": {"name": "kubia", "namespace": "default", "labels": {"service.kubernetes.io/service-proxy-name": "other"}},
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}})], &[]),
            map(&[]),
            0,
        ),
        (
            "duplicate endpoints across slices count once",
            objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([ep("10.244.1.2")])), kubia_slice("s2", json!([ep("10.244.1.2"), ep("10.244.2.2")]))]),
            map(&[("default/kubia:http", &["10.244.1.2:8080", "10.244.2.2:8080"])]),
            0,
        ),
        (
            "an endpoint in several services is in each",
            objects(
                &[kubia(json!({})), json!({"metadata": {"name": "kubia-2", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.11", "ports": [{"name": "http", "port": 80}]}})],
                &[kubia_slice("s1", json!([ep("10.244.1.2")])),
                  json!({"metadata": {"name": "t1", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia-2"}},
                    "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": [ep("10.244.1.2")]})],
            ),
            map(&[("default/kubia-2:http", &["10.244.1.2:8080"]), ("default/kubia:http", &["10.244.1.2:8080"])]),
            0,
        ),
        (
            "internalTrafficPolicy Local: only this node's endpoints",
            objects(&[kubia(json!({"internalTrafficPolicy": "Local"}))], &[kubia_slice("s1", json!([ep("10.244.1.2"),
                {"addresses": ["10.244.2.2"], "conditions": {"ready": true}, "nodeName": "node-b"}]))]),
            map(&[("default/kubia:http", &["10.244.1.2:8080"])]),
            0,
        ),
        (
            "an IPv4-only service: its IPv6 slice serves nothing, FQDN slices are not used",
            objects(&[kubia(json!({}))], &[json!({"metadata": {"name": "v6", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia"}},
                "addressType": "IPv6", "ports": [{"name": "http", "port": 8080}], "endpoints": [{"addresses": ["fd00::1"]}]}),
                json!({"metadata": {"name": "fqdn", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia"}},
                "addressType": "FQDN", "ports": [{"name": "http", "port": 8080}], "endpoints": [{"addresses": ["db.example.com"]}]})]),
            map(&[("default/kubia:http", &[])]),
            0,
        ),
        (
            "an endpoint of the other family in a slice is skipped alone",
            objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([ep("fd00::1"), ep("10.244.1.2")]))]),
            map(&[("default/kubia:http", &["10.244.1.2:8080"])]),
            1,
        ),
        (
            "SCTP port is left out with one line, the others programmed",
            objects(&[kubia(json!({"ports": [{"name": "http", "port": 80}, {"name": "sig", "port": 9999, "protocol": "SCTP"}]}))], &[]),
            map(&[("default/kubia:http", &[])]),
            1,
        ),
        (
            "SCTP port of a dual-stack service, IPv6 first: one line for both families",
            objects(&[kubia(json!({"clusterIPs": ["fd00::10", "10.96.0.10"], "ports": [{"name": "http", "port": 80}, {"name": "sig", "port": 9999, "protocol": "SCTP"}]}))], &[]),
            map(&[("default/kubia:http", &[]), ("default/kubia:http/ipv6", &[])]),
            1,
        ),
        (
            "invalid clusterIP: service skipped, others kept",
            objects(&[kubia(json!({"clusterIP": "10.96.0.300"})), json!({"metadata": {"name": "ok", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.12", "ports": [{"port": 80}]}})], &[]),
            map(&[("default/ok", &[])]),
            1,
        ),
        (
            "service port 0: service skipped",
            objects(&[kubia(json!({"ports": [{"port": 0}]}))], &[]),
            map(&[]),
            1,
        ),
        (
            "service port above 65535: service skipped",
            objects(&[kubia(json!({"ports": [{"port": 70000}]}))], &[]),
            map(&[]),
            1,
        ),
        (
            "unknown protocol: service skipped",
            objects(&[kubia(json!({"ports": [{"port": 80, "protocol": "QUIC"}]}))], &[]),
            map(&[]),
            1,
        ),
        (
            "service without spec: skipped",
            objects(&[json!({"metadata": {"name": "kubia", "namespace": "default"}})], &[]),
            map(&[]),
            1,
        ),
        (
            "an endpoint with an invalid address: only it is skipped, the slice's others serve",
            objects(&[kubia(json!({}))], &[kubia_slice("bad", json!([ep("10.244.1.300"), ep("10.244.3.2")])), kubia_slice("good", json!([ep("10.244.2.2")]))]),
            map(&[("default/kubia:http", &["10.244.2.2:8080", "10.244.3.2:8080"])]),
            1,
        ),
        (
            "slice port out of range: only that port is skipped, the slice's other ports serve",
            objects(&[kubia(json!({"ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}))],
                &[json!({"metadata": {"name": "bad", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 0}, {"name": "dns", "port": 5353, "protocol": "UDP"}], "endpoints": [ep("10.244.1.2")]})]),
            map(&[("default/kubia:dns", &["10.244.1.2:5353"]), ("default/kubia:http", &[])]),
            1,
        ),
        (
            "slice port without a number: only that port is skipped",
            objects(&[kubia(json!({}))], &[json!({"metadata": {"name": "bad", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia"}},
                "addressType": "IPv4", "ports": [{"name": "http"}], "endpoints": [ep("10.244.1.2")]})]),
            map(&[("default/kubia:http", &[])]),
            1,
        ),
        (
            "an endpoint is its first address: the others are not used",
            objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([{"addresses": ["10.244.1.2", "10.244.9.9"], "conditions": {"ready": true}}]))]),
            map(&[("default/kubia:http", &["10.244.1.2:8080"])]),
            0,
        ),
        (
            "an endpoint without addresses is skipped alone",
            objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([{"addresses": [], "conditions": {"ready": true}}, ep("10.244.2.2")]))]),
            map(&[("default/kubia:http", &["10.244.2.2:8080"])]),
            1,
        ),
        (
            "unset serving means serving: a terminating endpoint without it serves when none is ready",
            objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([{"addresses": ["10.244.2.2"], "conditions": {"ready": false, "terminating": true}}]))]),
            map(&[("default/kubia:http", &["10.244.2.2:8080"])]),
            0,
        ),
        (
            "dual-stack with IPv6 first: each family's cluster IP served by its own family's slices",
            objects(&[kubia(json!({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.10"], "ipFamilies": ["IPv6", "IPv4"]}))],
                &[kubia_slice("s1", json!([ep("10.244.1.2")])), kubia_slice6("s2", json!([ep("fd00:244::2"), ep("fd00:244::3")]))]),
            map(&[("default/kubia:http", &["10.244.1.2:8080"]), ("default/kubia:http/ipv6", &["fd00:244::2:8080", "fd00:244::3:8080"])]),
            0,
        ),
        (
            "IPv6 only: served as the IPv6 service port, IPv4 slices unused",
            objects(&[kubia(json!({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10"]}))],
                &[kubia_slice("s1", json!([ep("10.244.1.2")])), kubia_slice6("s2", json!([ep("fd00:244::2")]))]),
            map(&[("default/kubia:http/ipv6", &["fd00:244::2:8080"])]),
            0,
        ),
    ];
    for (rule, objects, expected, skipped) in cases {
        let computed = desired_state(&objects, NODE);
        assert_eq!(programmed(&computed), expected, "{rule}");
        assert_eq!(computed.skipped.len(), skipped, "{rule}: {:?}", computed.skipped);
    }
}

#[test]
fn model_updates_report_only_the_service_ports_that_changed() {
    let other = json!({"metadata": {"name": "other", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}]}});
    let mut objects = objects(&[kubia(json!({})), other], &[kubia_slice("s1", json!([ep("10.244.1.2")]))]);
    let mut model = Model::default();
    let first = model.update(&objects, NODE);
    assert_eq!(first.ports.len(), 2, "everything is new");
    assert_eq!((first.service_changes, first.endpoint_changes), (2, 1), "changes counted as kube-proxy's metrics count them");
    let same = model.update(&objects, NODE);
    assert!(same.ports.is_empty(), "the same objects change nothing");
    assert_eq!((same.service_changes, same.endpoint_changes), (0, 0));

    // A new version of the slice: only kubia's port changes.
    objects.slices[0] = Arc::new(slice(kubia_slice("s1", json!([ep("10.244.1.2"), ep("10.244.2.2")]))).1);
    let changed = model.update(&objects, NODE);
    assert_eq!(changed.ports.iter().map(ToString::to_string).collect::<Vec<_>>(), ["default/kubia:http"]);
    assert_eq!((changed.service_changes, changed.endpoint_changes), (0, 1), "a new version of a slice is one change");
    assert_eq!(model.state.services.values().map(|p| p.endpoints.len()).sum::<usize>(), 2);

    // The service deleted: its port goes, the other stays.
    objects.services.remove(0);
    let removed = model.update(&objects, NODE);
    assert_eq!(removed.ports.iter().map(ToString::to_string).collect::<Vec<_>>(), ["default/kubia:http"]);
    assert_eq!((removed.service_changes, removed.endpoint_changes), (1, 0));
    assert_eq!(model.state.services.keys().map(ToString::to_string).collect::<Vec<_>>(), ["default/other:http"]);
    assert_eq!(model.state, desired_state(&objects, NODE).state, "incremental equals computed from scratch");
}

/// The cache is keyed by address: were an object freed while cached, a
/// new object could take its address and be mistaken for it.
#[test]
fn model_holds_the_objects_it_caches() {
    let objects = objects(&[kubia(json!({}))], &[kubia_slice("s1", json!([ep("10.244.1.2")]))]);
    let (service, slice) = (objects.services[0].clone(), objects.slices[0].clone());
    let mut model = Model::default();
    model.update(&objects, NODE);
    drop(objects);
    assert!(Arc::strong_count(&service) > 1 && Arc::strong_count(&slice) > 1);
    model.update(&ClusterObjects::default(), NODE);
    assert_eq!((Arc::strong_count(&service), Arc::strong_count(&slice)), (1, 1), "released once gone");
}

#[test]
fn skip_lines_name_the_object_and_the_reason() {
    let objects = objects(&[kubia(json!({"clusterIP": "banana"}))], &[kubia_slice("bad", json!([ep("nope")]))]);
    let computed = desired_state(&objects, NODE);
    assert!(computed.skipped.iter().any(|l| l.contains("Service default/kubia") && l.contains("banana")), "{:?}", computed.skipped);
    assert!(computed.skipped.iter().any(|l| l.contains("EndpointSlice default/bad") && l.contains("nope")), "{:?}", computed.skipped);
}

/// Each case: the rule, the protocol, and which of the four endpoints
/// (ready; terminating and serving; terminating, not serving; not ready,
/// not terminating) serve and which drain.
#[test]
fn draining_endpoints_keep_their_flows() {
    let cases = [
        ("tcp: every listed endpoint that takes no new connections keeps its established ones", "TCP",
            ["10.244.1.2"], vec!["10.244.2.2", "10.244.3.2", "10.244.4.2"]),
        ("udp: only serving endpoints keep their flows; one that stops serving loses them", "UDP",
            ["10.244.1.2"], vec!["10.244.2.2"]),
    ];
    for (rule, protocol, serving, draining) in cases {
        let service = json!({"metadata": {"name": "kubia", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": protocol, "targetPort": 8080}]}});
        let slice = json!({"metadata": {"name": "s1", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubia"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": protocol}],
            "endpoints": [ep("10.244.1.2"),
                {"addresses": ["10.244.2.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.3.2"], "conditions": {"ready": false, "serving": false, "terminating": true}},
                {"addresses": ["10.244.4.2"], "conditions": {"ready": false, "serving": false, "terminating": false}}]});
        let computed = desired_state(&objects(&[service], &[slice]), NODE);
        let port = computed.state.services.values().next().expect("programmed");
        let ips = |set: &BTreeSet<Endpoint>| set.iter().map(|e| e.ip.to_string()).collect::<Vec<_>>();
        assert_eq!(ips(&port.endpoints), serving, "{rule}");
        assert_eq!(ips(&port.draining), draining, "{rule}");
    }
}

/// Each case: the rule, the policy, the endpoints (all on another
/// node), and whether traffic without a local endpoint is dropped
/// (true) or rejected (false), inside and from outside.
#[test]
fn local_policies_drop_when_endpoints_are_elsewhere_and_reject_when_there_are_none() {
    let remote = json!({"addresses": ["10.244.2.2"], "conditions": {"ready": true}, "nodeName": "node-b"});
    let remote_terminating = json!({"addresses": ["10.244.2.2"], "conditions": {"ready": false, "serving": true, "terminating": true}, "nodeName": "node-b"});
    let remote_not_ready = json!({"addresses": ["10.244.2.2"], "conditions": {"ready": false, "serving": false}, "nodeName": "node-b"});
    let cases = [
        ("internal Local, endpoints on another node: drop", "internalTrafficPolicy", json!([remote.clone()]), true),
        ("internal Local, serving-terminating endpoints on another node: drop", "internalTrafficPolicy", json!([remote_terminating.clone()]), true),
        ("internal Local, no endpoint anywhere: reject", "internalTrafficPolicy", json!([]), false),
        ("internal Local, only not-ready endpoints elsewhere: reject", "internalTrafficPolicy", json!([remote_not_ready.clone()]), false),
        ("external Local, endpoints on another node: drop", "externalTrafficPolicy", json!([remote]), true),
        ("external Local, no endpoint anywhere: reject", "externalTrafficPolicy", json!([]), false),
        ("external Local, only not-ready endpoints elsewhere: reject", "externalTrafficPolicy", json!([remote_not_ready]), false),
    ];
    for (rule, field, endpoints, drops) in cases {
        let objects = objects(&[kubia(json!({field: "Local", "type": "NodePort", "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30123}]}))],
            &[kubia_slice("s1", endpoints)]);
        let computed = desired_state_on(&objects, NODE, &[Ipv4Addr::new(192, 168, 0, 1).into()]);
        let side = if field == "internalTrafficPolicy" { ServicePortName::new("default", "kubia", "http") } else { ServicePortName::new("default", "kubia", "http").to_external() };
        let port = computed.state.services.get(&side).expect("programmed");
        assert!(port.endpoints.is_empty(), "{rule}: no local endpoint");
        assert_eq!(port.drop_when_empty, drops, "{rule}");
        let internal = field == "internalTrafficPolicy";
        let counted = (usize::from(drops && internal), usize::from(drops && !internal));
        assert_eq!(computed.state.no_local_endpoints(), counted, "{rule}: kube-proxy's no_local_endpoints gauge");
    }
}

/// The external side of a service port: which frontends, which
/// endpoints, and whether its source is translated or it drops when
/// empty. Node at 192.168.0.1 and 10.0.0.1 with one local endpoint
/// (10.244.1.2) and one elsewhere (10.244.2.2).
#[test]
fn external_traffic_rules() {
    type External = Option<(Vec<&'static str>, Vec<&'static str>, bool, bool)>;
    let node_ips: [IpAddr; 2] = [Ipv4Addr::new(192, 168, 0, 1).into(), Ipv4Addr::new(10, 0, 0, 1).into()];
    let with = |extra: serde_json::Value, status: serde_json::Value| {
        let mut service = kubia(extra);
        service["status"] = status;
        let remote = json!({"addresses": ["10.244.2.2"], "conditions": {"ready": true}, "nodeName": "node-b"});
        objects(&[service], &[kubia_slice("s1", json!([ep("10.244.1.2"), remote]))])
    };
    let node_port = json!({"type": "NodePort", "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30123}]});
    let mut node_port_local = node_port.clone();
    node_port_local["externalTrafficPolicy"] = json!("Local");
    let load_balancer = json!({"type": "LoadBalancer", "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30123}]});
    let lb_status = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}, {"hostname": "lb.example"}]}});
    let both = ["10.244.1.2:8080", "10.244.2.2:8080"];
    let cases: Vec<(&str, ClusterObjects, External)> = vec![
        ("ClusterIP service: no external side", with(json!({}), json!({})), None),
        ("NodePort, Cluster policy: node port on every node address, every endpoint, source translated",
            with(node_port.clone(), json!({})), Some((vec!["10.0.0.1:30123", "192.168.0.1:30123"], both.to_vec(), true, false))),
        ("NodePort, Local policy: this node's endpoints only, client kept, dropped when none",
            with(node_port_local, json!({})), Some((vec!["10.0.0.1:30123", "192.168.0.1:30123"], vec!["10.244.1.2:8080"], false, true))),
        ("LoadBalancer: ingress IPs on the service port, node ports too; hostnames ignored",
            with(load_balancer.clone(), lb_status.clone()), Some((vec!["10.0.0.1:30123", "192.168.0.1:30123", "203.0.113.7:80"], both.to_vec(), true, false))),
        ("LoadBalancer ingress with ipMode Proxy: left to the load balancer; ipMode VIP served",
            with(load_balancer.clone(), json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7", "ipMode": "Proxy"}, {"ip": "203.0.113.8", "ipMode": "VIP"}]}})),
            Some((vec!["10.0.0.1:30123", "192.168.0.1:30123", "203.0.113.8:80"], both.to_vec(), true, false))),
        ("LoadBalancer without nodePort (allocateLoadBalancerNodePorts false): ingress IPs only",
            with(json!({"type": "LoadBalancer"}), lb_status), Some((vec!["203.0.113.7:80"], both.to_vec(), true, false))),
        ("externalIPs on a ClusterIP service: on the service port",
            with(json!({"externalIPs": ["198.51.100.9"]}), json!({})), Some((vec!["198.51.100.9:80"], both.to_vec(), true, false))),
        ("ingress IPs of a service that is not a LoadBalancer: ignored",
            with(node_port, json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}})), Some((vec!["10.0.0.1:30123", "192.168.0.1:30123"], both.to_vec(), true, false))),
    ];
    for (rule, objects, expected) in cases {
        let computed = desired_state_on(&objects, NODE, &node_ips);
        assert!(computed.skipped.is_empty(), "{rule}: {:?}", computed.skipped);
        let internal = computed.state.services.get(&ServicePortName::new("default", "kubia", "http")).expect("internal side");
        assert_eq!(internal.endpoints.len(), 2, "{rule}: in-cluster traffic uses every endpoint");
        assert!(!internal.snat && !internal.drop_when_empty, "{rule}");
        let cluster_ip = internal.frontends.first().map(|f| (f.ip, f.port));
        let external = computed.state.services.get(&ServicePortName::new("default", "kubia", "http").to_external()).map(|p| {
            // Local policy: pods and the node are served as through the
            // cluster IP (kube-proxy's "pod traffic for external
            // destinations"); Cluster policy serves everyone alike.
            assert_eq!(p.in_cluster_via, cluster_ip.filter(|_| p.drop_when_empty), "{rule}: in-cluster clients");
            let frontends = p.frontends.iter().map(|f| format!("{}:{}", f.ip, f.port)).collect::<Vec<_>>();
            let endpoints = p.endpoints.iter().map(|e| format!("{}:{}", e.ip, e.port)).collect::<Vec<_>>();
            (frontends, endpoints, p.snat, p.drop_when_empty)
        });
        let expected = expected.map(|(f, e, snat, drop)| {
            (f.iter().map(ToString::to_string).collect(), e.iter().map(ToString::to_string).collect(), snat, drop)
        });
        assert_eq!(external, expected, "{rule}");
    }
}

/// Each case: the rule, the service's type and loadBalancerSourceRanges,
/// and the ranges and restricted addresses of its external side, and
/// how many lines. The node is 192.168.0.1; the load balancer IP
/// 203.0.113.7.
#[test]
fn load_balancer_source_ranges() {
    type Expected = (Vec<&'static str>, Vec<&'static str>, usize);
    let cases: Vec<(&str, &str, serde_json::Value, Expected)> = vec![
        ("ranges restrict the load balancer IPs, masked", "LoadBalancer", json!(["10.1.2.3/16", "198.51.100.7/32"]),
            (vec!["10.1.0.0/16", "198.51.100.7/32"], vec!["203.0.113.7"], 0)),
        ("a range holding a node address admits the load balancer IPs too", "LoadBalancer", json!(["192.168.0.0/24"]),
            (vec!["192.168.0.0/24", "203.0.113.7/32"], vec!["203.0.113.7"], 0)),
        ("no ranges: from anywhere", "LoadBalancer", json!([]), (vec![], vec![], 0)),
        ("IPv6 ranges only: nothing for this family, from anywhere", "LoadBalancer", json!(["2001:db8::/32"]), (vec![], vec![], 0)),
        ("an invalid range is left out with a line", "LoadBalancer", json!(["10.0.0.0/8", "banana"]), (vec!["10.0.0.0/8"], vec!["203.0.113.7"], 1)),
        ("a NodePort service: no load balancer IP, nothing restricted", "NodePort", json!(["10.0.0.0/8"]), (vec![], vec![], 0)),
    ];
    for (rule, service_type, ranges, (expected_ranges, expected_ranged, lines)) in cases {
        let mut service = kubia(json!({"type": service_type, "loadBalancerSourceRanges": ranges,
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30123}]}));
        service["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}});
        let computed = desired_state_on(&objects(&[service], &[kubia_slice("s1", json!([ep("10.244.1.2")]))]), NODE, &[Ipv4Addr::new(192, 168, 0, 1).into()]);
        let external = computed.state.services.get(&ServicePortName::new("default", "kubia", "http").to_external()).expect("external side");
        let ranges: Vec<String> = external.source_ranges.iter().map(|(ip, len)| format!("{ip}/{len}")).collect();
        let ranged: Vec<String> = external.source_ranged.iter().map(ToString::to_string).collect();
        assert_eq!(ranges, expected_ranges, "{rule}");
        assert_eq!(ranged, expected_ranged, "{rule}");
        assert_eq!(computed.skipped.len(), lines, "{rule}: {:?}", computed.skipped);
        let internal = computed.state.services.get(&ServicePortName::new("default", "kubia", "http")).expect("internal side");
        assert!(internal.source_ranges.is_empty(), "{rule}: the cluster IP is never restricted");
    }
}

#[test]
fn invalid_external_addresses_skip_the_service() {
    let objects = objects(&[kubia(json!({"externalIPs": ["not-an-ip"]}))], &[]);
    let computed = desired_state_on(&objects, NODE, &[Ipv4Addr::new(192, 168, 0, 1).into()]);
    assert!(computed.state.services.is_empty());
    assert!(computed.skipped.iter().any(|l| l.contains("not-an-ip")), "{:?}", computed.skipped);
}

#[test]
fn session_affinity_client_ip_timeouts() {
    let cases: [(&str, serde_json::Value, Option<u32>); 4] = [
        ("no affinity", json!({}), Some(0)),
        ("ClientIP without a timeout: 10800 seconds", json!({"sessionAffinity": "ClientIP"}), Some(10_800)),
        ("ClientIP with a timeout", json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}}}), Some(5)),
        ("a timeout of 0: service skipped", json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}), None),
    ];
    for (rule, extra, expected) in cases {
        let computed = desired_state(&objects(&[kubia(extra)], &[]), NODE);
        let seconds = computed.state.services.values().next().map(|p| p.affinity_seconds);
        assert_eq!(seconds, expected, "{rule}");
        assert_eq!(computed.skipped.len(), usize::from(expected.is_none()), "{rule}");
    }
}

#[test]
fn health_check_node_port_counts_local_endpoints() {
    let spec = |policy: &str| {
        json!({"type": "LoadBalancer", "externalTrafficPolicy": policy, "healthCheckNodePort": 32000,
               "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30123}]})
    };
    let remote = json!({"addresses": ["10.244.2.2"], "conditions": {"ready": true}, "nodeName": "node-b"});
    let slices = [kubia_slice("s1", json!([ep("10.244.1.2"), ep("10.244.1.3"), remote]))];
    let node_ips: [IpAddr; 1] = [Ipv4Addr::new(192, 168, 0, 1).into()];
    let local = desired_state_on(&objects(&[kubia(spec("Local"))], &slices), NODE, &node_ips);
    let health = local.state.health_checks();
    let expected = ServiceHealth { namespace: "default".into(), name: "kubia".into(), local_endpoints: 2 };
    assert_eq!(health, BTreeMap::from([(32000, expected)]), "Local: the local endpoints, not the remote one");
    let cluster = desired_state_on(&objects(&[kubia(spec("Cluster"))], &slices), NODE, &node_ips);
    assert!(cluster.state.health_checks().is_empty(), "only with externalTrafficPolicy Local");
}

/// A dual-stack LoadBalancer service with a Local policy on a dual-stack
/// node: every address of a family (cluster IP, node ports, external and
/// load balancer IPs, source ranges, the in-cluster frontend) goes to that
/// family's service port, served by that family's endpoints.
#[test]
fn each_family_of_a_dual_stack_service_gets_its_own_addresses_and_endpoints() {
    let service = json!({"metadata": {"name": "kubia", "namespace": "default"}, "spec": {
        "type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"], "ipFamilies": ["IPv4", "IPv6"],
        "ipFamilyPolicy": "PreferDualStack", "externalTrafficPolicy": "Local",
        "externalIPs": ["198.51.100.7", "2001:db8::7"], "loadBalancerSourceRanges": ["10.1.0.0/16", "2001:db8:1::/48"],
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}, {"ip": "2001:db8:ff::9"}]}}});
    let slices = [kubia_slice("s1", json!([ep("10.244.1.2")])), kubia_slice6("s2", json!([ep("fd00:244::2")]))];
    let node_ips: Vec<IpAddr> = ["192.168.0.1", "fd00:1::1"].iter().map(|ip| ip.parse().expect("address")).collect();
    let computed = desired_state_on(&objects(&[service], &slices), NODE, &node_ips);
    assert!(computed.skipped.is_empty(), "{:?}", computed.skipped);
    let ip = |text: &str| text.parse::<IpAddr>().expect("address");
    let frontends = |name: &str| -> Vec<String> {
        let port = computed.state.services.iter().find(|(n, _)| n.to_string() == name).unwrap_or_else(|| panic!("{name} programmed")).1;
        port.frontends.iter().map(|f| format!("{}:{}", f.ip, f.port)).collect()
    };
    let port = |name: &str| computed.state.services.iter().find(|(n, _)| n.to_string() == name).map(|(_, p)| p.clone()).expect("programmed");
    let cases: [(&str, &str, Vec<&str>); 4] = [
        ("the IPv4 cluster IP", "default/kubia:http", vec!["10.96.0.10:80"]),
        ("the IPv6 cluster IP", "default/kubia:http/ipv6", vec!["fd00:96::10:80"]),
        ("IPv4 external, load balancer and node addresses", "default/kubia:http/external", vec!["192.168.0.1:30080", "198.51.100.7:80", "203.0.113.9:80"]),
        ("IPv6 ones", "default/kubia:http/external/ipv6", vec!["2001:db8::7:80", "2001:db8:ff::9:80", "fd00:1::1:30080"]),
    ];
    for (rule, name, expected) in cases {
        assert_eq!(frontends(name), expected, "{rule}");
    }
    let (v4, v6) = (port("default/kubia:http/external"), port("default/kubia:http/external/ipv6"));
    assert_eq!(v4.endpoints.iter().map(|e| e.ip).collect::<Vec<_>>(), [ip("10.244.1.2")], "IPv4 endpoints for the IPv4 side");
    assert_eq!(v6.endpoints.iter().map(|e| e.ip).collect::<Vec<_>>(), [ip("fd00:244::2")], "IPv6 endpoints for the IPv6 side");
    assert_eq!(v4.in_cluster_via, Some((ip("10.96.0.10"), 80)), "in-cluster clients via the cluster IP of their family");
    assert_eq!(v6.in_cluster_via, Some((ip("fd00:96::10"), 80)));
    assert_eq!(v4.source_ranges, [(ip("10.1.0.0"), 16)].into(), "each family's own source ranges");
    assert_eq!(v6.source_ranges, [(ip("2001:db8:1::"), 48)].into());
    assert_eq!(v4.source_ranged, [ip("203.0.113.9")].into(), "restricting its own load balancer IPs");
    assert_eq!(v6.source_ranged, [ip("2001:db8:ff::9")].into());
}

/// A CIDR of either family parses masked to its prefix; anything else is
/// not one.
#[test]
fn source_range_cidrs_of_both_families_parse_masked() {
    let ip = |text: &str| text.parse::<IpAddr>().expect("address");
    let cases = [
        ("an IPv4 range", "10.1.2.3/16", Some((ip("10.1.0.0"), 16))),
        ("an IPv6 range", "2001:db8:1:2::5/48", Some((ip("2001:db8:1::"), 48))),
        ("/0 of IPv6", "::/0", Some((ip("::"), 0))),
        ("a whole IPv6 address", " fd00::1/128 ", Some((ip("fd00::1"), 128))),
        ("IPv6 prefix too long", "fd00::/129", None),
        ("IPv4 prefix too long", "10.0.0.0/33", None),
        ("no prefix", "10.0.0.0", None),
    ];
    for (rule, text, expected) in cases {
        assert_eq!(parse_cidr(text), expected, "{rule}");
    }
}
