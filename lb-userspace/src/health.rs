//! The agent's health endpoints, where kube-proxy serves them (port 10256):
//! `/healthz` answers 200 once the datapath is attached and programmed from
//! a complete view of the services (503 before, for a readiness probe), and
//! `/livez` answers 200 while the agent's loop runs (for a liveness probe).
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
use tracing::debug;

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

    /// The answer to a GET of `path`.
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

/// Serves the endpoints on `listener` until the agent exits.
pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let (status, body) = health.answer(request.uri().path());
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = status;
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
