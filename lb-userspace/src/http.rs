//! The agent's HTTP endpoints, where kube-proxy serves them: `/healthz`
//! answers 200 once the datapath is attached and programmed from a complete
//! view of the services (503 before, for a readiness probe), `/livez` 200
//! while the agent runs (for a liveness probe), both on --healthz-addr
//! (10256); `/metrics` the Prometheus metrics on --metrics-addr (10249).
use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use prometheus_client::registry::Registry;
use tracing::debug;

use crate::metrics;

/// What the health endpoints report; updated by the agent's loop.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    syncs: AtomicU64,
}

impl Health {
    /// The datapath is attached and programmed.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn record_sync(&self) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
    }

    /// The answer to a GET of a health `path`.
    pub fn answer(&self, path: &str) -> (StatusCode, String) {
        let syncs = self.syncs.load(Ordering::Relaxed);
        match path {
            "/healthz" if self.ready.load(Ordering::Relaxed) => {
                (StatusCode::OK, format!("{{\"ready\":true,\"syncs\":{syncs}}}\n"))
            }
            "/healthz" => (StatusCode::SERVICE_UNAVAILABLE, format!("{{\"ready\":false,\"syncs\":{syncs}}}\n")),
            "/livez" => (StatusCode::OK, "ok\n".to_owned()),
            _ => (StatusCode::NOT_FOUND, "not found: try /healthz or /livez\n".to_owned()),
        }
    }
}

/// Which endpoints a listener serves.
#[derive(Clone)]
pub enum Endpoints {
    Health(Arc<Health>),
    Metrics(Arc<Registry>),
}

impl Endpoints {
    fn answer(&self, path: &str) -> (StatusCode, &'static str, String) {
        match (self, path) {
            (Endpoints::Health(health), _) => {
                let (status, body) = health.answer(path);
                (status, "text/plain", body)
            }
            (Endpoints::Metrics(registry), "/metrics") => {
                (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics::encode(registry))
            }
            (Endpoints::Metrics(_), _) => (StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics\n".to_owned()),
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
                let (status, content_type, body) = endpoints.answer(request.uri().path());
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = status;
                if let Ok(value) = content_type.parse() {
                    response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
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
        assert_eq!(health.answer("/healthz"), (StatusCode::OK, "{\"ready\":true,\"syncs\":1}\n".to_owned()));
        assert_eq!(health.answer("/metrics").0, StatusCode::NOT_FOUND);
    }
}
