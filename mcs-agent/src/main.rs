use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser as _;
use kube::runtime::events::{Recorder, Reporter};
use mcs_agent::{
    agent::config::{Config, ConntrackGc, SourceConfig},
    agent::{
        discovery::{DatapathHooks, Discovered},
        passive::PassiveHealth,
        schedule::{Due, Schedule, StaleChange},
        switch::switch_over,
        takeover::Takeover,
    },
    cli::{Cli, Command, InspectArgs, InspectWhat, Output},
    conntrack,
    datapath::{self, Datapath, DatapathError},
    desired::{self, BackendAddr, FrontendKey, ObjectError, Policy},
    events::{EventCounts, EventSink, Problem},
    health::{self, HealthHandle},
    inventory::StateWriter,
    metrics::{AgentMetrics, AgentView, Kernel},
    plan::Applied,
    reconcile::Reconciler,
    source::{
        kube::{KubeSource, Peers, SourceEvent},
        links, manifests,
    },
    terminate,
};
use notify::Watcher as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

/// `rows` as JSON, or as a table of `cells` per row.
fn rows_or_table<T: serde::Serialize>(
    rows: &[T],
    json: bool,
    header: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) -> Result<String> {
    if json {
        return Ok(serde_json::to_string_pretty(rows)?);
    }
    Ok(mcs_agent::inspect::table(header, &rows.iter().map(cells).collect::<Vec<_>>()))
}

fn inspect(args: &InspectArgs) -> Result<()> {
    use mcs_agent::inspect;
    let pinned = inspect::Pinned::open(&args.bpffs, &args.state_dir)?;
    let json = args.output == Output::Json;
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    let text = match &args.what {
        InspectWhat::Services => {
            let rows = inspect::services(&pinned);
            if json {
                serde_json::to_string_pretty(&rows)?
            } else {
                let mut out = String::new();
                for s in &rows {
                    let affinity = match s.affinity_timeout_secs {
                        0 => String::new(),
                        t => format!("  ClientIP affinity {t}s"),
                    };
                    out.push_str(&format!(
                        "{}  {} ({})  table {} slots  {} new connections, {} dropped (no backend){affinity}\n",
                        s.frontend,
                        opt(&s.service),
                        opt(&s.port_name),
                        s.table_size,
                        s.new_connections,
                        s.no_backend_drops,
                    ));
                    let cells: Vec<Vec<String>> = s
                        .backends
                        .iter()
                        .map(|b| {
                            vec![
                                format!("  {}", b.address),
                                opt(&b.cluster),
                                opt(&b.zone),
                                opt(&b.tier),
                                b.weight.map_or_else(|| "-".into(), |w| format!("{:.1}%", w * 100.0)),
                                format!("{:.1}%", b.table_share * 100.0),
                                opt(&b.condition),
                                b.new_connections.to_string(),
                                b.packets_to.to_string(),
                                b.packets_from.to_string(),
                            ]
                        })
                        .collect();
                    out.push_str(&inspect::table(
                        &[
                            "  BACKEND",
                            "CLUSTER",
                            "ZONE",
                            "TIER",
                            "WEIGHT",
                            "TABLE",
                            "STATE",
                            "NEW CONNS",
                            "PKTS TO",
                            "PKTS FROM",
                        ],
                        &cells,
                    ));
                }
                if pinned.inventory.is_none() {
                    out.push_str("(no state.json in --state-dir: services, clusters, zones and tiers unknown)\n");
                }
                out
            }
        }
        InspectWhat::Conntrack { service } => rows_or_table(
            &inspect::conntrack(&pinned, service.as_deref()),
            json,
            &["CLIENT", "CLUSTERSET IP", "BACKEND", "PROTO", "SERVICE", "AGE", "STATE"],
            |r| {
                vec![
                    r.client.clone(),
                    r.vip.clone(),
                    r.backend.clone(),
                    r.protocol.to_owned(),
                    opt(&r.service),
                    format!("{:.1}s", r.age_secs),
                    r.state.to_owned(),
                ]
            },
        )?,
        InspectWhat::Affinity => {
            rows_or_table(&inspect::affinity(&pinned), json, &["SERVICE", "CLIENT", "BACKEND", "IDLE"], |r| {
                vec![opt(&r.service), r.client.to_string(), opt(&r.backend), format!("{:.1}s", r.idle_secs)]
            })?
        }
        InspectWhat::Stats => rows_or_table(&inspect::stats(&pinned), json, &["EVENT", "PACKETS"], |r| {
            vec![r.event.to_owned(), r.count.to_string()]
        })?,
    };
    print!("{text}");
    if json {
        println!();
    }
    Ok(())
}

/// This network namespace's addresses: none may become a ClusterSetIP.
fn local_addresses() -> std::collections::BTreeSet<std::net::IpAddr> {
    nix::ifaddrs::getifaddrs()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let address = a.address?;
            match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                (Some(v4), _) => Some(std::net::IpAddr::V4(v4.ip())),
                (_, Some(v6)) => Some(std::net::IpAddr::V6(v6.ip())),
                _ => None,
            }
        })
        .collect()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    match cli.command {
        Command::Run(args) => {
            let config = args.config()?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(run(config))
        }
        Command::Check { manifests, locality } => check(&manifests, &locality.policy()),
        Command::Uninstall { bpffs, stay, check } => uninstall(&bpffs, stay, check),
        Command::Inspect(args) => inspect(&args),
    }
}

fn uninstall(bpffs: &Path, stay: bool, check: bool) -> Result<()> {
    if check {
        let left = datapath::remains(bpffs);
        if left.is_empty() {
            println!("nothing of mcs-agent is left on this node");
            return Ok(());
        }
        for what in &left {
            println!("left: {what}");
        }
        std::process::exit(1);
    }
    let done = datapath::uninstall(bpffs).with_context(|| format!("--bpffs {}", bpffs.display()))?;
    println!(
        "removed layout version(s) {:?} ({} pinned link(s)), {} netlink filter(s)",
        done.layouts, done.links, done.netlink_filters
    );
    // The kernel detaches an unpinned link from a work queue, a moment later.
    let deadline = Instant::now() + Duration::from_secs(2);
    let left = loop {
        let left = datapath::remains(bpffs);
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !left.is_empty() {
        bail!("still on this node after uninstalling: {} (is an agent still running? stop it first)", left.join("; "));
    }
    if stay {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
            let mut term = signal(SignalKind::terminate())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            anyhow::Ok(())
        })?;
    }
    Ok(())
}

fn check(dir: &Path, policy: &Policy) -> Result<()> {
    let read = manifests::Cache::default().read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut model = desired::Model::default();
    model.replace(read.changes, policy, &desired::Runtime::default());
    let mut problems = read.problems;
    let mut errors: Vec<String> = model.errors().map(ToString::to_string).collect();
    errors.sort();
    problems.extend(errors);
    for (key, frontend) in &model.state().frontends {
        let port = if frontend.port_name.is_empty() { String::new() } else { format!(" ({})", frontend.port_name) };
        let tiers: Vec<String> = frontend.tiers.iter().map(ToString::to_string).collect();
        let affinity = match frontend.affinity_timeout_secs {
            0 => String::new(),
            secs => format!("  ClientIP affinity {secs}s"),
        };
        println!(
            "{key}{port}  {}  {} of {} endpoint(s) serve; tiers {}; table {} slots{affinity}",
            frontend.service,
            frontend.weights.len(),
            frontend.endpoints.len(),
            tiers.join(","),
            frontend.table_size
        );
        for endpoint in &frontend.endpoints {
            let share = frontend.weights.iter().find(|w| w.addr == endpoint.addr);
            let (share, tier) = share.map_or(("-".to_owned(), "-".to_owned()), |w| {
                (format!("{:.1}%", w.share * 100.0), frontend.tiers[w.tier].to_string())
            });
            let l = &endpoint.locality;
            println!(
                "    {:<21} {:>6}  tier={:<7} {:?}  cluster={} zone={} region={}",
                endpoint.addr.to_string(),
                share,
                tier,
                endpoint.condition,
                l.cluster.as_deref().unwrap_or("-"),
                l.zone.as_deref().unwrap_or("-"),
                l.region.as_deref().unwrap_or("-"),
            );
        }
    }
    for problem in &problems {
        eprintln!("error: {problem}");
    }
    if !problems.is_empty() {
        bail!("{} object(s) invalid", problems.len());
    }
    Ok(())
}

/// Where objects come from.
enum Source {
    Manifests(PathBuf),
    Kube(Box<KubeSource>),
}

async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).with_context(|| format!("--kubeconfig {}", path.display()))?;
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
async fn start_kube(
    kubeconfig: Option<PathBuf>,
    node_name: Option<String>,
    peers: Option<Peers>,
    events: mpsc::UnboundedSender<SourceEvent>,
    counts: Arc<EventCounts>,
) -> Result<(KubeSource, EventSink)> {
    let client = kube_client(kubeconfig.as_deref()).await?;
    let mut backoff = Duration::from_millis(500);
    let source = loop {
        match KubeSource::start(client.clone(), node_name.as_deref(), peers.as_ref(), events.clone()).await {
            Ok(source) => break source,
            Err(e) => {
                let _ = events.send(SourceEvent::Error { what: "API discovery", message: e.to_string() });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
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

async fn run(config: Config) -> Result<()> {
    let Config {
        source: source_config,
        interfaces,
        interface_patterns,
        patterns,
        attach,
        kernel_log,
        bpffs,
        pin,
        layout_version,
        cleanup_on_exit,
        sizes,
        conntrack: conntrack_gc,
        debounce,
        resync: resync_every,
        health_addr,
        metrics_addr,
        outlier,
        outlier_interval,
        metrics_backend_label,
        socket_lb,
        terminate_tcp: socket_lb_terminate_tcp,
        state_dir,
        policy: flags_policy,
    } = config;
    let no_pin = !pin;
    let health = HealthHandle::default();
    health::serve(health_addr, health.clone()).await.with_context(|| format!("--health-addr {health_addr}"))?;
    if let Some(addr) = metrics_addr {
        health::serve(addr, health.clone()).await.with_context(|| format!("--metrics-addr {addr}"))?;
    }
    // Both sources report through the same channel: a change, or a failing watch.
    let (signal_tx, mut signals) = mpsc::unbounded_channel::<SourceEvent>();

    // A wrong directory fails before anything touches the kernel.
    let mut file_watcher = None;
    let mut source = None;
    let event_counts = Arc::new(EventCounts::default());
    let mut pending_kube = None;
    match source_config {
        SourceConfig::Manifests(dir) => {
            let tx = signal_tx.clone();
            let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Opening and reading files are events too, and the agent's own reads
                // would re-trigger a pass after every pass.
                if let Ok(event) = event
                    && !matches!(event.kind, notify::EventKind::Access(_))
                {
                    // Without paths (an overflowed queue, a rescan) only a full read is safe.
                    if event.paths.is_empty() || event.need_rescan() {
                        let _ = tx.send(SourceEvent::Changed);
                    } else if event.paths.iter().any(|p| manifests::is_manifest(p)) {
                        let _ = tx.send(SourceEvent::Files(event.paths));
                    }
                }
            })
            .context("starting the file watcher")?;
            watcher
                .watch(&dir, notify::RecursiveMode::NonRecursive)
                .with_context(|| format!("watching {}", dir.display()))?;
            file_watcher = Some(watcher);
            // The periodic resync, for changes inotify missed (a queue
            // overflow, a remount): a walk of stamps on a thread of its own,
            // which names only the files that changed. At 100,000 files the
            // walk takes a few hundred ms the loop does not wait for.
            let tx = signal_tx.clone();
            let scanned = dir.clone();
            let every = resync_every;
            std::thread::Builder::new()
                .name("resync".into())
                .spawn(move || {
                    mcs_agent::background_thread();
                    let mut last = manifests::Scan::of(&scanned).unwrap_or_default();
                    loop {
                        std::thread::sleep(every);
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
            source = Some(Source::Manifests(dir));
        }
        SourceConfig::Kube { kubeconfig, peers } => {
            pending_kube = Some(tokio::spawn(start_kube(
                kubeconfig,
                flags_policy.node.node.clone(),
                peers,
                signal_tx.clone(),
                event_counts.clone(),
            )));
        }
    }

    // The datapath next: an earlier agent's pinned maps are adopted as they
    // are, and its programs keep serving them until this agent has reconciled.
    let pins = (!no_pin).then_some((bpffs.as_path(), layout_version));
    let mut datapath = Datapath::open(sizes, pins, kernel_log).context("loading the datapath")?;
    if let Some(logger) = datapath.take_kernel_logger() {
        // SAFETY: the logger owns the ring buffer's fd, open and unchanged for as
        // long as the AsyncFd owns the logger.
        let mut logger =
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("watching the kernel log ring buffer: {e}"))?;
        tokio::spawn(async move {
            while let Ok(mut ready) = logger.readable_mut().await {
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
        });
    }
    datapath.set_cleanup_on_exit(cleanup_on_exit);
    let capacity = datapath.sizes().capacity;
    let applied = if datapath.adopted() {
        let state = datapath.kernel_state();
        let (applied, problems) =
            Applied::adopt(capacity, &state.services, &state.backends, |i| datapath.selection_slot(i));
        for problem in &problems {
            warn!(problem = %problem, "adopting the pinned state");
        }
        info!(
            frontends = applied.frontend_count(),
            backends = applied.backend_count(),
            conntrack = datapath.conntrack_len(),
            "adopted the datapath of an earlier agent; it keeps serving until this agent has reconciled"
        );
        applied
    } else {
        Applied::new(capacity)
    };
    let older = if no_pin { Vec::new() } else { datapath::LayoutDir::others(&bpffs, layout_version) };
    if !older.is_empty() {
        let versions: Vec<u32> = older.iter().map(|l| l.version).collect();
        info!(?versions, current = layout_version, "found the pins of another layout version: upgrading from it");
    }
    datapath.set_older_layouts(older.clone());

    let mut reconciler = Reconciler::new(applied, flags_policy.clone());
    let mut recorder = None;
    let (link_tx, mut link_rx) = mpsc::unbounded_channel();
    let mut discovered = Discovered::default();
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut resync = tokio::time::interval(resync_every);
    resync.tick().await;
    // When to reconcile, what a pass must do, which watches fail.
    let mut schedule = Schedule::new(debounce, Instant::now(), source.is_some());
    let mut serving = false;
    let mut patterns = Some(patterns);
    let metrics = AgentMetrics::default();
    let (scrape_tx, mut scrapes) = mpsc::unbounded_channel();
    health.serve_metrics(scrape_tx);
    // The collector counts live flows on its own thread, so a scrape never
    // walks the maps; with expiry off it only counts (and removes closed
    // flows past their grace time, as the datapath would), every 10 s.
    let ct_stats = Arc::new(conntrack::CollectorStats::default());
    let _collector = {
        let (ct, ct6) = datapath.conntrack_fds().context("the conntrack collector's map descriptors")?;
        let ConntrackGc { timeouts, interval, expiry } = conntrack_gc;
        if expiry {
            info!(?timeouts, interval_secs = interval.as_secs(), "conntrack collector started");
        } else {
            info!("conntrack expiry off (--conntrack-gc-interval 0): idle flows stay until evicted");
        }
        let collector = conntrack::Collector::new(ct, ct6, timeouts, ct_stats.clone());
        collector.spawn(interval).context("starting the conntrack collector")?
    };
    let mode_name = format!("{:?}", attach.resolve()).to_lowercase();
    let mut passive = outlier.map(PassiveHealth::new);
    let state_writer = StateWriter::spawn(state_dir.clone(), Duration::from_secs(2));
    let mut outlier_tick = tokio::time::interval(outlier_interval);
    // Frontends changed since sockets were last checked for departed backends.
    let mut terminate_pending: BTreeSet<FrontendKey> = BTreeSet::new();
    let mut terminate_tick = tokio::time::interval(Duration::from_millis(500));
    outlier_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        if schedule.due().any()
            && let Some(source) = &source
        {
            health.beat();
            let started = Instant::now();
            let work = schedule.take_due();
            let full_pass = work.recompute;
            let result = reconcile(source, &flags_policy, &mut reconciler, &mut datapath, recorder.as_ref(), work);
            let took = started.elapsed();
            match &result {
                Ok(()) => metrics.reconciled(started.elapsed()),
                Err(_) => metrics.reconcile_failed(),
            }
            let changed = reconciler.take_changed();
            if datapath.sockets_cgroup().is_some() {
                terminate_pending.extend(changed.iter().copied());
            }
            if !changed.is_empty() {
                if let Some(passive) = &mut passive {
                    passive.changed(changed.iter().copied());
                }
                state_writer.update(changed.into_iter().map(|key| (key, reconciler.frontend_info(&key))).collect());
            }
            match result {
                Ok(()) if !serving => {
                    // The maps hold the whole state: take over from the agent
                    // before, in the order `switch_over` keeps (the restart
                    // test caught a lost UDP reply when it was another).
                    let mut takeover = Takeover {
                        datapath: &mut datapath,
                        older: &older,
                        interfaces: &interfaces,
                        patterns: patterns.as_ref().expect("not started"),
                        attach,
                        socket_lb: &socket_lb,
                        carried: 0,
                    };
                    switch_over(&mut takeover, older.len())?;
                    if let Some(patterns) = patterns.take()
                        && !patterns.is_empty()
                    {
                        let tx = link_tx.clone();
                        tokio::spawn(async move {
                            if let Err(e) = links::watch(patterns, tx).await {
                                error!(error = %e, "interface discovery stopped; new pods will not be served");
                            }
                        });
                    }
                    serving = true;
                    health.set_ready();
                    info!(node = ?reconciler.policy().node, tiers = ?reconciler.policy().tiers, "locality");
                    info!(interfaces = ?interfaces, patterns = ?interface_patterns, health = %health_addr, "agent ready");
                }
                Ok(()) => {}
                Err(e) => error!(error = %e, "applying to the datapath failed; retrying on the next change or resync"),
            }
            schedule.reconciled(Instant::now(), took, full_pass);
        }
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = resync.tick() => {
                health.beat();
                schedule.on_resync(Instant::now(), matches!(source, Some(Source::Kube(_))));
            }
            started = async { pending_kube.as_mut().expect("guarded").await }, if pending_kube.is_some() => {
                pending_kube = None;
                let (kube, events) = started.context("the API start task")??;
                source = Some(Source::Kube(Box::new(kube)));
                recorder = Some(events);
                schedule.source_ready();
            }
            Some(signal) = signals.recv() => {
                let mut pending = Some(signal);
                let window = schedule.debounce_wait(Instant::now());
                if !window.is_zero() {
                    tokio::time::sleep(window).await;
                }
                while let Some(signal) = pending.take().or_else(|| signals.try_recv().ok()) {
                    match schedule.on_event(signal) {
                        Some(StaleChange::Failing { what, message }) => {
                            warn!(what, error = %message, "the API is failing; the datapath keeps its last good state (stale) while the agent retries");
                        }
                        Some(StaleChange::Resumed { what }) => info!(what, "the API works again"),
                        None => {}
                    }
                }
                health.set_stale(schedule.stale());
            }
            Some(event) = link_rx.recv() => {
                discovered.on_event(event, &mut DatapathHooks(&mut datapath, attach));
            }
            _ = terminate_tick.tick(), if !terminate_pending.is_empty() => {
                // At most twice a second, and off the loop: the scan reads
                // every remembered socket.
                let changed = std::mem::take(&mut terminate_pending);
                let state = reconciler.state();
                // The changed frontends as they are now (the thread decides
                // with `Frontend::keeps_sockets_to`); a deleted one keeps none.
                let frontends: BTreeMap<FrontendKey, desired::Frontend> =
                    changed.iter().filter_map(|key| Some((*key, state.frontends.get(key)?.clone()))).collect();
                match datapath.sock_rev() {
                    Ok(mut rev) => {
                        let started = Instant::now();
                        let tcp = socket_lb_terminate_tcp;
                        let gone = tokio::task::spawn_blocking(move || {
                            let keeps = |key: &FrontendKey, addr: &BackendAddr| {
                                frontends.get(key).is_some_and(|f| f.keeps_sockets_to(addr))
                            };
                            let ended = terminate::victims(&rev.sockets(), &changed, keeps, tcp);
                            let destroyed = terminate::terminate(&ended);
                            // Only what is gone: a socket that could not be ended
                            // keeps showing the VIP as its peer.
                            let gone: Vec<_> = ended.into_iter().filter(|s| destroyed.contains(&s.cookie)).collect();
                            rev.forget(&gone);
                            gone.len()
                        })
                        .await
                        .unwrap_or(0);
                        if gone > 0 {
                            metrics.sockets_terminated(gone as u64);
                            info!(
                                sockets = gone,
                                took_ms = started.elapsed().as_millis() as u64,
                                "ended sockets whose backend left their service"
                            );
                        }
                    }
                    Err(e) => warn!(error = %e, "reading the socket translations failed"),
                }
            }
            _ = outlier_tick.tick(), if serving && passive.is_some() => {
                if let Some(passive) = &mut passive
                    && passive.tick(Instant::now(), &datapath, &mut reconciler)
                {
                    schedule.recompute();
                }
            }
            Some(reply) = scrapes.recv() => {
                let ct = ct_stats.live.load(std::sync::atomic::Ordering::Relaxed);
                let sizes = datapath.sizes();
                let applied = reconciler.applied();
                let view = AgentView {
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    attach_mode: mode_name.clone(),
                    stale: schedule.is_stale(),
                    interfaces: datapath.attached_count(),
                    ejections: passive.as_ref().map_or(0, PassiveHealth::ejections_total),
                    health_unwatched: passive.as_ref().map_or(0, |p| p.unwatched() as u64),
                    events: event_counts.outcomes().to_vec(),
                    conntrack_gc: {
                        use std::sync::atomic::Ordering::Relaxed;
                        Some((ct_stats.expired.load(Relaxed), ct_stats.last_pass_us.load(Relaxed) as f64 / 1e6))
                    },
                    socket_lb: datapath.sockets_cgroup().is_some() && !socket_lb.host_only,
                    objects: reconciler
                        .objects()
                        .iter()
                        .flat_map(|(kind, valid, invalid)| [(*kind, "valid", *valid), (*kind, "invalid", *invalid)])
                        .collect(),
                    fill: vec![
                        ("conntrack", ct, u64::from(sizes.conntrack)),
                        ("services", applied.frontend_count() as u64, u64::from(sizes.capacity.services)),
                        ("backends", applied.backend_count() as u64, u64::from(sizes.capacity.backends.saturating_sub(1))),
                        ("selection", applied.slots_used(), u64::from(sizes.capacity.slots)),
                    ],
                };
                let kernel = Kernel {
                    backend: &|id| datapath.backend_stats(id),
                    service: &|id| datapath.service_stats(id),
                    datapath: datapath.stats().unwrap_or_default(),
                };
                let _ = reply.send(mcs_agent::metrics::render(&metrics, &view, &reconciler.inventory(), &kernel, metrics_backend_label));
            }
        }
    }
    drop(file_watcher);
    if let Some(task) = pending_kube {
        task.abort();
    }
    if cleanup_on_exit || no_pin {
        info!("shutting down: detaching and removing pins");
    }
    state_writer.finish();
    let stats = datapath.stats().unwrap_or_default();
    datapath.shutdown();
    let counts: Vec<String> = stats.iter().map(|(s, n)| format!("{}={n}", s.name())).collect();
    info!(counters = %counts.join(" "), "stopped");
    Ok(())
}

/// One pass: read the source, bring the datapath to it, report new problems
/// (as Kubernetes Events too, in Kubernetes mode).
fn reconcile(
    source: &Source,
    flags: &Policy,
    reconciler: &mut Reconciler,
    datapath: &mut Datapath,
    events: Option<&EventSink>,
    due: Due,
) -> Result<(), DatapathError> {
    let mut policy = flags.clone();
    policy.node_addresses = local_addresses();
    let report = match source {
        Source::Manifests(dir) => {
            let recompute = reconciler.set_policy(policy) || due.recompute;
            if due.full {
                reconciler.from_manifests(dir, datapath)?;
            } else if !due.paths.is_empty() {
                let paths: Vec<PathBuf> = due.paths.into_iter().collect();
                reconciler.from_manifest_paths(&paths, datapath)?;
            }
            if recompute {
                reconciler.recompute_all(datapath)?;
            }
            return Ok(());
        }
        Source::Kube(kube) => {
            // Flags win; the Node's labels and the ClusterProperty fill the gaps.
            let (zone, region) = kube.node_locality();
            policy.node.zone = policy.node.zone.or(zone);
            policy.node.region = policy.node.region.or(region);
            policy.node.cluster = policy.node.cluster.or_else(|| kube.cluster_id());
            policy.node_addresses.extend(kube.node_addresses());
            policy.service_ranges.extend(kube.service_ranges());
            if policy.node != reconciler.policy().node {
                info!(node = ?policy.node, "node locality changed");
            }
            let recompute = reconciler.set_policy(policy) || due.recompute;
            let mut report = if due.full {
                // Services first: an import and the Service whose ClusterIP it
                // takes may arrive together, and the import must never win.
                let services = reconciler.set_cluster_ips(kube.cluster_ips(), datapath)?;
                let (groups, conversion_errors) = kube.groups();
                let problems = conversion_errors.iter().map(ToString::to_string).collect();
                let mut report = reconciler.apply_groups(groups, problems, datapath)?;
                report.object_errors.extend(conversion_errors);
                report.object_errors.extend(services.object_errors);
                report.new_problems.extend(services.new_problems);
                report
            } else {
                Default::default()
            };
            if recompute {
                let again = reconciler.recompute_all(datapath)?;
                report.object_errors.extend(again.object_errors);
                report.new_problems.extend(again.new_problems);
            }
            (report, kube)
        }
    };
    let (report, kube) = report;
    if let Some(events) = events {
        // Off the loop: the publisher decides which node reports and talks to the API.
        let new: Vec<&ObjectError> =
            report.object_errors.iter().filter(|e| report.new_problems.contains(&e.to_string())).collect();
        for (error, mut regarding) in kube.references(&new) {
            regarding.field_path = Some(error.field.clone());
            events.offer(Problem { regarding, note: format!("{}: {}", error.field, error.message) });
        }
    }
    Ok(())
}
