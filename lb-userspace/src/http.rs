//! The agent's HTTP endpoints, served where kube-proxy serves them.
//!
//! `/healthz` answers 200 once the datapath is attached and programmed from a
//! complete view of the services (503 before, for a readiness probe), `/livez`
//! 200 while the agent runs (for a liveness probe), both on --healthz-addr
//! (10256); `/metrics` the Prometheus metrics on --metrics-addr (10249). Each
//! healthCheckNodePort of a LoadBalancer service with externalTrafficPolicy
//! Local gets a listener of its own, answering as kube-proxy does: 200 with the
//! count of local endpoints, 503 when none.
use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};
use prometheus_client::registry::Registry;
use tracing::{debug, info, warn};

use crate::{metrics, model::ServiceHealth};

/// What the health endpoints report; updated by the agent's loop.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    syncs: AtomicU64,
    /// The node is being deleted or drained by the cluster autoscaler.
    draining: AtomicBool,
}

impl Health {
    /// The datapath is attached and programmed.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn record_sync(&self) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the node is being drained: `/healthz` then answers 503, so
    /// that load balancers move their traffic off the node while the agent
    /// keeps serving (kube-proxy's behaviour since KEP-3836).
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    /// The answer to a GET of a health `path`.
    pub fn answer(&self, path: &str) -> (StatusCode, String) {
        let syncs = self.syncs.load(Ordering::Relaxed);
        let (ready, draining) = (self.ready.load(Ordering::Relaxed), self.draining.load(Ordering::Relaxed));
        match path {
            "/healthz" => {
                let status = if ready && !draining { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                (status, format!("{{\"ready\":{ready},\"syncs\":{syncs},\"nodeDraining\":{draining}}}\n"))
            }
            "/livez" => (StatusCode::OK, "ok\n".to_owned()),
            _ => (StatusCode::NOT_FOUND, "not found: try /healthz or /livez\n".to_owned()),
        }
    }
}

/// The health check node ports' answers, by port; written after each sync.
pub type ServiceHealthTable = Arc<RwLock<BTreeMap<u16, ServiceHealth>>>;

/// Which endpoints a listener serves.
#[derive(Clone)]
pub enum Endpoints {
    Health(Arc<Health>),
    Metrics(Arc<Registry>),
    /// A health check node port (any path).
    ServiceHealth { table: ServiceHealthTable, port: u16 },
}

/// A response, before hyper.
struct Answer {
    status: StatusCode,
    content_type: &'static str,
    body: String,
    /// kube-proxy's `X-Load-Balancing-Endpoint-Weight`: the local endpoints.
    weight: Option<usize>,
}

impl Endpoints {
    fn answer(&self, path: &str) -> Answer {
        let text = |status, body: String| Answer { status, content_type: "text/plain", body, weight: None };
        match (self, path) {
            (Endpoints::Health(health), _) => {
                let (status, body) = health.answer(path);
                text(status, body)
            }
            (Endpoints::Metrics(registry), "/metrics") => Answer {
                status: StatusCode::OK,
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body: metrics::encode(registry),
                weight: None,
            },
            (Endpoints::Metrics(_), _) => text(StatusCode::NOT_FOUND, "not found: try /metrics\n".to_owned()),
            (Endpoints::ServiceHealth { table, port }, _) => {
                let health = table.read().ok().and_then(|t| t.get(port).cloned());
                let Some(health) = health else {
                    return text(StatusCode::SERVICE_UNAVAILABLE, "no service uses this health check port\n".to_owned());
                };
                let status = if health.local_endpoints > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                let body = serde_json::json!({
                    "service": {"namespace": health.namespace, "name": health.name},
                    "localEndpoints": health.local_endpoints,
                    "serviceProxyHealthy": true,
                });
                Answer { status, content_type: "application/json", body: format!("{body}\n"), weight: Some(health.local_endpoints) }
            }
        }
    }
}

/// The listeners of the health check node ports, opened and closed as
/// services come and go.
#[derive(Default)]
pub struct HealthCheckServers {
    table: ServiceHealthTable,
    servers: HashMap<u16, JoinHandle<()>>,
}

impl HealthCheckServers {
    /// Makes the listeners and their answers those of `wanted`. A port that
    /// cannot be bound is logged and tried again at the next update.
    pub async fn update(&mut self, wanted: BTreeMap<u16, ServiceHealth>) {
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port);
            if !keep {
                server.abort();
                info!(port, "health check node port closed");
            }
            keep
        });
        for port in wanted.keys() {
            if self.servers.contains_key(port) {
                continue;
            }
            match TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, *port)).await {
                Ok(listener) => {
                    let endpoints = Endpoints::ServiceHealth { table: self.table.clone(), port: *port };
                    self.servers.insert(*port, tokio::spawn(serve(listener, endpoints)));
                    info!(port, "health check node port open");
                }
                Err(e) => warn!(port, "health check node port: {e} (is another process listening there?)"),
            }
        }
        if let Ok(mut table) = self.table.write() {
            *table = wanted;
        }
    }
}

/// Serves `endpoints` on `listener` until the agent exits.
pub async fn serve(listener: TcpListener, endpoints: Endpoints) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let answer = endpoints.answer(request.uri().path());
                let mut response = Response::new(Full::new(Bytes::from(answer.body)));
                *response.status_mut() = answer.status;
                let headers = response.headers_mut();
                if let Ok(value) = answer.content_type.parse() {
                    headers.insert(hyper::header::CONTENT_TYPE, value);
                }
                if let Some(weight) = answer.weight {
                    headers.insert("x-content-type-options", hyper::header::HeaderValue::from_static("nosniff"));
                    headers.insert("x-load-balancing-endpoint-weight", weight.into());
                }
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                debug!(%peer, "health connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_is_unavailable_until_ready_and_livez_always_ok() {
        let health = Health::default();
        assert_eq!(health.answer("/healthz").0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(health.answer("/livez").0, StatusCode::OK);
        health.record_sync();
        health.set_ready();
        assert_eq!(health.answer("/healthz"), (StatusCode::OK, "{\"ready\":true,\"syncs\":1,\"nodeDraining\":false}\n".to_owned()));
        health.set_draining(true);
        assert_eq!(health.answer("/healthz"), (StatusCode::SERVICE_UNAVAILABLE, "{\"ready\":true,\"syncs\":1,\"nodeDraining\":true}\n".to_owned()));
        assert_eq!(health.answer("/livez").0, StatusCode::OK, "alive while draining");
        assert_eq!(health.answer("/metrics").0, StatusCode::NOT_FOUND);
    }

    #[test]
    fn health_check_node_ports_answer_like_kube_proxy() {
        let table = ServiceHealthTable::default();
        let endpoints = Endpoints::ServiceHealth { table: table.clone(), port: 32000 };
        let kubia = |local_endpoints| ServiceHealth { namespace: "default".into(), name: "kubia".into(), local_endpoints };
        let cases = [
            ("two local endpoints: 200 and the count", Some(kubia(2)), StatusCode::OK, Some(2)),
            ("none local: 503", Some(kubia(0)), StatusCode::SERVICE_UNAVAILABLE, Some(0)),
            ("no service on the port: 503", None, StatusCode::SERVICE_UNAVAILABLE, None),
        ];
        for (rule, health, status, count) in cases {
            *table.write().expect("table") = health.map(|h| BTreeMap::from([(32000, h)])).unwrap_or_default();
            let answer = endpoints.answer("/");
            assert_eq!((answer.status, answer.weight), (status, count), "{rule}");
            if let Some(count) = count {
                let body: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON");
                assert_eq!(body["localEndpoints"], count, "{rule}");
                assert_eq!(body["service"]["name"], "kubia", "{rule}");
            }
        }
    }
}
