//! Where the loop's objects and change signals come from: a watched
//! directory of manifests, or the Kubernetes API (started in the
//! background, retried until it answers).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use kube::runtime::events::{Recorder, Reporter};
use notify::Watcher as _;
use tokio::sync::mpsc::UnboundedSender;
use tracing::info;

use super::error::{AgentError, Context as _};
use crate::{
    events::{EventCounts, EventSink},
    source::{
        kube::{KubeSource, Peers, RetryBackoff, SourceEvent},
        manifests,
    },
};

/// Where objects come from.
pub enum Source {
    Manifests(PathBuf),
    Kube(Box<KubeSource>),
}

/// Watches `dir` for changes (inotify, and a periodic walk of stamps for
/// what inotify missed), each reported on `tx`. The watch lasts as long as
/// the returned watcher.
pub fn watch_manifests(
    dir: &Path,
    resync: Duration,
    tx: UnboundedSender<SourceEvent>,
) -> Result<notify::RecommendedWatcher, AgentError> {
    let events = tx.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Opening and reading files are events too, and the agent's own reads
        // would re-trigger a pass after every pass.
        if let Ok(event) = event
            && !matches!(event.kind, notify::EventKind::Access(_))
        {
            // Without paths (an overflowed queue, a rescan) only a full read is safe.
            if event.paths.is_empty() || event.need_rescan() {
                let _ = events.send(SourceEvent::Changed);
            } else if event.paths.iter().any(|p| manifests::is_manifest(p)) {
                let _ = events.send(SourceEvent::Files(event.paths));
            }
        }
    })
    .context("starting the file watcher")?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive).with_context(|| format!("watching {}", dir.display()))?;
    // The periodic resync, for changes inotify missed (a queue overflow, a
    // remount): a walk of stamps on a thread of its own, which names only
    // the files that changed. At 100,000 files the walk takes a few hundred
    // ms the loop does not wait for.
    let scanned = dir.to_owned();
    std::thread::Builder::new()
        .name("resync".into())
        .spawn(move || {
            crate::background_thread();
            let mut last = manifests::Scan::of(&scanned).unwrap_or_default();
            loop {
                std::thread::sleep(resync);
                match manifests::Scan::of(&scanned) {
                    Ok(now) => {
                        let changed = now.changed_since(&last);
                        last = now;
                        if !changed.is_empty() && tx.send(SourceEvent::Files(changed)).is_err() {
                            return;
                        }
                    }
                    // Reported by the next full read; try again later.
                    Err(_) => {
                        if tx.send(SourceEvent::Changed).is_err() {
                            return;
                        }
                    }
                }
            }
        })
        .context("starting the resync thread")?;
    Ok(watcher)
}

async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client, AgentError> {
    let config = match kubeconfig {
        Some(path) => {
            let file =
                kube::config::Kubeconfig::read_from(path).with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes configuration (not in a pod, no KUBECONFIG, no ~/.kube/config); give --manifests DIR for standalone mode",
        )?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// Connects to the API and starts the watches, retrying until it works: the
/// datapath keeps serving its adopted state meanwhile. Configuration that
/// cannot work (no kubeconfig at all) is fatal.
pub async fn start_kube(
    kubeconfig: Option<PathBuf>,
    node_name: Option<String>,
    peers: Option<Peers>,
    events: UnboundedSender<SourceEvent>,
    counts: Arc<EventCounts>,
) -> Result<(KubeSource, EventSink), AgentError> {
    let client = kube_client(kubeconfig.as_deref()).await?;
    // As the watches retry: the API's return is noticed within 2 s.
    let mut backoff = RetryBackoff::new();
    let source = loop {
        match KubeSource::start(client.clone(), node_name.as_deref(), peers.as_ref(), events.clone()).await {
            Ok(source) => break source,
            Err(e) => {
                let _ = events.send(SourceEvent::Error { what: "API discovery", message: e.to_string() });
                tokio::time::sleep(backoff.next_at(Instant::now())).await;
            }
        }
    };
    let _ = events.send(SourceEvent::Resumed { what: "API discovery" });
    info!("waiting for the first complete list of ServiceImports, EndpointSlices and this node");
    source.wait_ready().await;
    let reporter = Reporter { controller: "mcs-agent".into(), instance: node_name.clone() };
    let sink = EventSink::spawn(Recorder::new(client, reporter), node_name, source.peers(), counts);
    Ok((source, sink))
}
