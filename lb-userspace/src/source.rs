//! The static service description: a JSON file listing services with their
//! cluster IP, ports and endpoint addresses. One malformed service is
//! skipped (and reported) without affecting the others.
//!
//! ```json
//! {"services": [{"namespace": "default", "name": "kubia", "clusterIP": "10.96.0.10",
//!   "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
//!   "endpoints": ["10.244.1.2", "10.244.2.2"]}]}
//! ```
use std::{net::Ipv4Addr, path::Path};

use serde::Deserialize;

use crate::{
    error::{Error, Result},
    model::{DesiredState, Endpoint, Frontend, Protocol, ServicePort, ServicePortName},
};

#[derive(Deserialize)]
struct FileDoc {
    services: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceDoc {
    #[serde(default = "default_namespace")]
    namespace: String,
    name: String,
    #[serde(rename = "clusterIP")]
    cluster_ip: String,
    ports: Vec<PortDoc>,
    #[serde(default)]
    endpoints: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PortDoc {
    #[serde(default)]
    name: String,
    port: u32,
    #[serde(default = "default_protocol")]
    protocol: String,
    target_port: Option<u32>,
}

fn default_namespace() -> String {
    "default".into()
}

fn default_protocol() -> String {
    "TCP".into()
}

/// The desired state from a description, and one line for each service
/// that was skipped and why.
#[derive(Debug, Default)]
pub struct Loaded {
    pub state: DesiredState,
    pub skipped: Vec<String>,
}

pub fn load(path: &Path) -> Result<Loaded> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.into(), source })?;
    parse(&text).map_err(|reason| Error::Parse { path: path.into(), reason })
}

/// Parses a whole description; fails only when the document itself is not
/// a description.
pub fn parse(text: &str) -> Result<Loaded, String> {
    let doc: FileDoc = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut loaded = Loaded::default();
    for (index, value) in doc.services.into_iter().enumerate() {
        let label = service_label(&value, index);
        let service = serde_json::from_value::<ServiceDoc>(value)
            .map_err(|e| e.to_string())
            .and_then(service_ports);
        match service {
            Ok(ports) => loaded.state.services.extend(ports),
            Err(reason) => loaded.skipped.push(format!("service {label} skipped: {reason}")),
        }
    }
    Ok(loaded)
}

fn service_label(value: &serde_json::Value, index: usize) -> String {
    let field = |f: &str| value.get(f).and_then(|v| v.as_str()).map(str::to_owned);
    match (field("namespace"), field("name")) {
        (ns, Some(name)) => format!("{}/{name}", ns.unwrap_or_else(default_namespace)),
        _ => format!("#{index} (no name)"),
    }
}

fn service_ports(doc: ServiceDoc) -> Result<Vec<(ServicePortName, ServicePort)>, String> {
    let cluster_ip: Ipv4Addr = doc
        .cluster_ip
        .parse()
        .map_err(|_| format!("clusterIP {:?} is not an IPv4 address", doc.cluster_ip))?;
    let endpoint_ips = doc
        .endpoints
        .iter()
        .map(|ip| ip.parse::<Ipv4Addr>().map_err(|_| format!("endpoint {ip:?} is not an IPv4 address")))
        .collect::<Result<Vec<_>, _>>()?;
    if doc.ports.is_empty() {
        return Err("it has no ports".into());
    }
    doc.ports
        .iter()
        .map(|p| {
            let port = valid_port(p.port, "port")?;
            let target_port = valid_port(p.target_port.unwrap_or(p.port), "targetPort")?;
            let protocol = match p.protocol.as_str() {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                other => return Err(format!("protocol {other:?} is not TCP or UDP")),
            };
            let name = ServicePortName { namespace: doc.namespace.clone(), name: doc.name.clone(), port: p.name.clone() };
            let service = ServicePort {
                frontends: [Frontend { ip: cluster_ip, port, protocol }].into(),
                endpoints: endpoint_ips.iter().map(|&ip| Endpoint { ip, port: target_port }).collect(),
            };
            Ok((name, service))
        })
        .collect()
}

fn valid_port(port: u32, field: &str) -> Result<u16, String> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{field} {port} is not in 1..=65535")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_port_service_gives_one_service_port_each() {
        let loaded = parse(
            r#"{"services":[{"name":"kubia","clusterIP":"10.96.0.10","endpoints":["10.0.0.1","10.0.0.2"],
                "ports":[{"name":"http","port":80,"targetPort":8080},{"name":"dns","port":53,"protocol":"UDP"}]}]}"#,
        )
        .expect("valid document");
        assert!(loaded.skipped.is_empty());
        assert_eq!(loaded.state.services.len(), 2);
        let http = loaded.state.services.iter().find(|(n, _)| n.port == "http").expect("http port").1;
        assert_eq!(http.endpoints.iter().map(|e| e.port).collect::<Vec<_>>(), [8080, 8080]);
        let dns = loaded.state.services.iter().find(|(n, _)| n.port == "dns").expect("dns port").1;
        assert_eq!(dns.frontends.first().map(|f| (f.protocol, f.port)), Some((Protocol::Udp, 53)));
        assert!(dns.endpoints.iter().all(|e| e.port == 53), "targetPort defaults to port");
    }

    #[test]
    fn malformed_services_are_skipped_and_named_while_others_load() {
        let cases = [
            (r#"{"name":"bad-ip","clusterIP":"10.96.0.300","ports":[{"port":80}]}"#, "clusterIP"),
            (r#"{"name":"bad-ep","clusterIP":"10.96.0.1","ports":[{"port":80}],"endpoints":["x"]}"#, "endpoint"),
            (r#"{"name":"port-0","clusterIP":"10.96.0.1","ports":[{"port":0}]}"#, "port 0"),
            (r#"{"name":"big-port","clusterIP":"10.96.0.1","ports":[{"port":80,"targetPort":70000}]}"#, "targetPort 70000"),
            (r#"{"name":"sctp","clusterIP":"10.96.0.1","ports":[{"port":80,"protocol":"SCTP"}]}"#, "SCTP"),
            (r#"{"name":"no-ports","clusterIP":"10.96.0.1","ports":[]}"#, "no ports"),
            (r#"{"name":"missing-ip","ports":[{"port":80}]}"#, "clusterIP"),
        ];
        for (bad, expected) in cases {
            let doc = format!(
                r#"{{"services":[{bad},{{"name":"good","clusterIP":"10.96.0.2","ports":[{{"port":80}}]}}]}}"#
            );
            let loaded = parse(&doc).expect("the document itself is valid");
            assert_eq!(loaded.skipped.len(), 1, "{bad}");
            assert!(loaded.skipped[0].contains(expected), "{:?} should mention {expected}", loaded.skipped[0]);
            assert_eq!(loaded.state.services.len(), 1, "the good service survives {bad}");
        }
    }

    #[test]
    fn a_document_that_is_not_a_description_is_an_error() {
        assert!(parse("[1, 2]").is_err());
        assert!(parse("{").is_err());
    }
}
