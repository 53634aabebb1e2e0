//! `/healthz` and `/readyz` for the kubelet's probes.
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

#[derive(Debug)]
pub struct Health {
    ready: bool,
    stale: Option<String>,
    heartbeat: Instant,
}

/// Shared between the agent's loop (writer) and the HTTP server (reader).
#[derive(Clone, Debug)]
pub struct HealthHandle(Arc<Mutex<Health>>);

/// The loop ticks at least this often (its resync timer), so a heartbeat older
/// than this means it is stuck.
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(120);

impl Default for HealthHandle {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Health { ready: false, stale: None, heartbeat: Instant::now() })))
    }
}

impl HealthHandle {
    pub fn set_ready(&self) {
        self.0.lock().expect("health lock").ready = true;
    }

    pub fn set_stale(&self, why: Option<String>) {
        self.0.lock().expect("health lock").stale = why;
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
            _ => (StatusCode::NOT_FOUND, "try /healthz or /readyz\n".into()),
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
                    let (status, body) = health.answer(request.uri().path());
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
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
