//! `/healthz` and `/readyz` for the kubelet's probes, `/metrics` for Prometheus.
//!
//! Live: the agent's loop turned over recently. Ready: the maps hold a
//! complete reconcile and the explicit interfaces are attached, and the API
//! watches are not failing (a stale agent keeps serving its last good state,
//! but says so here).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

/// A scrape: the agent's loop answers with the exposition text.
pub type ScrapeRequest = tokio::sync::oneshot::Sender<String>;

#[derive(Debug)]
pub struct Health {
    ready: bool,
    stale: Option<String>,
    heartbeat: Instant,
    scrape: Option<tokio::sync::mpsc::UnboundedSender<ScrapeRequest>>,
}

/// Shared between the agent's loop (writer) and the HTTP server (reader).
#[derive(Clone, Debug)]
pub struct HealthHandle(Arc<Mutex<Health>>);

/// The loop ticks at least this often (its resync timer), so a heartbeat older
/// than this means it is stuck.
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(120);

impl Default for HealthHandle {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Health { ready: false, stale: None, heartbeat: Instant::now(), scrape: None })))
    }
}

impl HealthHandle {
    pub fn set_ready(&self) {
        self.0.lock().expect("health lock").ready = true;
    }

    pub fn set_stale(&self, why: Option<String>) {
        self.0.lock().expect("health lock").stale = why;
    }

    /// Where `/metrics` asks for the exposition text.
    pub fn serve_metrics(&self, to: tokio::sync::mpsc::UnboundedSender<ScrapeRequest>) {
        self.0.lock().expect("health lock").scrape = Some(to);
    }

    async fn metrics(&self) -> (StatusCode, String) {
        let scrape = self.0.lock().expect("health lock").scrape.clone();
        let Some(scrape) = scrape else {
            return (StatusCode::SERVICE_UNAVAILABLE, "metrics are not ready yet\n".into());
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if scrape.send(tx).is_err() {
            return (StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping\n".into());
        }
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(text)) => (StatusCode::OK, text),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "the agent's loop did not answer in 10 s\n".into()),
        }
    }

    pub fn beat(&self) {
        self.0.lock().expect("health lock").heartbeat = Instant::now();
    }

    fn answer(&self, path: &str) -> (StatusCode, String) {
        let health = self.0.lock().expect("health lock");
        match path {
            "/healthz" if health.heartbeat.elapsed() <= LIVENESS_WINDOW => (StatusCode::OK, "ok\n".into()),
            "/healthz" => (StatusCode::SERVICE_UNAVAILABLE, "the agent's loop is stuck\n".into()),
            "/readyz" => match (&health.stale, health.ready) {
                (Some(why), _) => (StatusCode::SERVICE_UNAVAILABLE, format!("stale: {why}\n")),
                (None, true) => (StatusCode::OK, "ready\n".into()),
                (None, false) => (StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()),
            },
            _ => (StatusCode::NOT_FOUND, "try /healthz, /readyz or /metrics\n".into()),
        }
    }
}

/// Serves the probes on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, health: HealthHandle) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(error = %e, "health endpoint accept failed");
                    continue;
                }
            };
            let health = health.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let health = health.clone();
                    async move {
                        let path = request.uri().path();
                        let (status, body, content_type) = if path == "/metrics" {
                            let (status, body) = health.metrics().await;
                            (status, body, "application/openmetrics-text; version=1.0.0; charset=utf-8")
                        } else {
                            let (status, body) = health.answer(path);
                            (status, body, "text/plain; charset=utf-8")
                        };
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .header("content-type", content_type)
                                .body(Full::new(Bytes::from(body)))
                                .expect("static response parts"),
                        )
                    }
                });
                if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                    debug!(error = %e, "health connection");
                }
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_programming_and_staleness() {
        let health = HealthHandle::default();
        assert_eq!(health.answer("/healthz").0, StatusCode::OK);
        assert_eq!(health.answer("/readyz"), (StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()));
        health.set_ready();
        assert_eq!(health.answer("/readyz").0, StatusCode::OK);
        health.set_stale(Some("ServiceImport watch: connection refused".into()));
        let (status, body) = health.answer("/readyz");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("connection refused"));
        assert_eq!(health.answer("/nope").0, StatusCode::NOT_FOUND);
    }
}
