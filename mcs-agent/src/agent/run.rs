//! The agent: what `mcs-agent run` starts and drives until SIGINT or SIGTERM.
//!
//! [`Agent::start`] checks nothing twice (the [`Config`] is checked) and
//! touches the kernel in order: the probe servers, the source, the datapath
//! (adopting an earlier agent's pins), the conntrack collector. [`Agent::run`]
//! is the loop: it reconciles when [`Schedule`] says so, takes over from an
//! earlier agent after the first complete pass, and answers each event (a
//! change signal, a new link, a tick, a scrape) with a method of its own.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc::{self, UnboundedReceiver, UnboundedSender},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use super::{
    config::{Config, ConntrackGc, External, SocketLb, SourceConfig},
    control::{self, ControlSocket},
    discovery::{DatapathHooks, Discovered, ExternalHooks},
    error::{AgentError, Context as _},
    grow::{Growth, Old},
    pass::{local_addresses, reconcile},
    passive::{self, PassiveHealth},
    schedule::{Schedule, StaleChange},
    sources::{self, Source},
    switch::switch_over,
    takeover::{self, Takeover},
};
use crate::{
    conntrack,
    datapath::{self, AttachMode, Datapath, KernelLog, memory::MapMemory},
    desired::{self, Policy},
    events::{EventCounts, EventSink},
    growth,
    health::{self, HealthHandle, ScrapeRequest},
    inspect::{self, AgentInventory, AgentServices},
    inventory::{FrontendInfo, Inventory},
    metrics::{self, AgentMetrics, AgentView, Kernel},
    model::{BackendAddr, FrontendKey},
    plan::{Applied, Capacity},
    reconcile::Reconciler,
    source::{
        kube::{KubeSource, SourceEvent},
        links::{self, LinkEvent, Patterns},
    },
    terminate,
};

type KubeStart = JoinHandle<Result<(KubeSource, EventSink), AgentError>>;

// Fields drop in the order they are declared. When `run` returns early on
// an error (`stop` is skipped), they go as the old locals of the loop went,
// in the reverse order of their creation: the conntrack collector before
// the datapath (whose drop may detach and unpin, with --cleanup-on-exit),
// the sources last.
pub struct Agent {
    passive: Option<PassiveHealth>,
    mode_name: String,
    /// Kernel memory of each map, read at start and after each growth.
    map_memory: Vec<MapMemory>,
    collector: conntrack::Running,
    ct_stats: Arc<conntrack::CollectorStats>,
    conntrack_gc: ConntrackGc,
    kernel_log: KernelLog,
    /// The task reading the kernel programs' log, with `--kernel-log`.
    kernel_logger: Option<JoinHandle<()>>,
    /// Times the maps grew (see [`crate::growth`]).
    growths: u64,
    /// `--max-*`: how far the maps may grow.
    bounds: Capacity,
    /// Growth waits for the first takeover (an interrupted growth is
    /// taken over first).
    grow_after_takeover: bool,
    /// `inspect` asking on `<state-dir>/agent.sock`.
    inspects: UnboundedReceiver<control::Request>,
    control: Option<ControlSocket>,
    bpffs: Option<std::path::PathBuf>,
    /// `--state-dir`: where a stopping agent leaves `state.json`.
    state_dir: std::path::PathBuf,
    metrics: AgentMetrics,
    scrapes: UnboundedReceiver<ScrapeRequest>,
    /// Frontends changed since sockets were last checked for departed backends.
    terminate_pending: BTreeSet<FrontendKey>,
    sigint: Signal,
    sigterm: Signal,
    discovered: Discovered,
    link_tx: UnboundedSender<LinkEvent>,
    links: UnboundedReceiver<LinkEvent>,
    /// The same for `--external-interface` globs: interfaces that appear
    /// later get the XDP programs too.
    external_discovered: Discovered,
    external_link_tx: UnboundedSender<LinkEvent>,
    external_links: UnboundedReceiver<LinkEvent>,
    /// Until the first complete pass: then the link watch takes them.
    patterns: Option<Patterns>,
    /// The first complete pass is done and this agent's programs are hooked.
    serving: bool,
    /// When to reconcile, what a pass must do, which watches fail.
    schedule: Schedule,
    recorder: Option<EventSink>,
    reconciler: Reconciler,
    older: Vec<datapath::LayoutDir>,
    datapath: Datapath,

    /// The API's start, until it has listed everything once.
    pending_kube: Option<KubeStart>,
    event_counts: Arc<EventCounts>,
    source: Option<Source>,
    /// The directory watch lasts as long as this.
    file_watcher: Option<notify::RecommendedWatcher>,
    /// Both sources report through the same channel: a change, or a failing watch.
    signals: UnboundedReceiver<SourceEvent>,
    health: HealthHandle,

    // What the flags asked, as far as the loop still needs it.
    interfaces: Vec<String>,
    interface_patterns: Vec<String>,
    attach: AttachMode,
    health_addr: std::net::SocketAddr,
    socket_lb: SocketLb,
    external: External,
    terminate_tcp: bool,
    metrics_backend_label: bool,
    cleanup_on_exit: bool,
    pin: bool,
    resync: Duration,
    outlier_interval: Duration,
    flags_policy: Policy,
}

impl Agent {
    pub async fn start(config: Config) -> Result<Self, AgentError> {
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
            bounds,
            conntrack: conntrack_gc,
            debounce,
            resync,
            health_addr,
            metrics_addr,
            outlier,
            outlier_interval,
            metrics_backend_label,
            socket_lb,
            terminate_tcp,
            external,
            state_dir,
            policy: flags_policy,
        } = config;
        let health = HealthHandle::default();
        health::serve(health_addr, health.clone()).await.with_context(|| format!("--health-addr {health_addr}"))?;
        if let Some(addr) = metrics_addr {
            health::serve(addr, health.clone()).await.with_context(|| format!("--metrics-addr {addr}"))?;
        }
        let (signal_tx, signals) = mpsc::unbounded_channel::<SourceEvent>();

        // The source before the kernel: a directory that cannot be watched
        // fails before anything is loaded.
        let mut file_watcher = None;
        let mut source = None;
        let event_counts = Arc::new(EventCounts::default());
        let mut pending_kube = None;
        let mut first_read = None;
        match source_config {
            SourceConfig::Manifests(dir) => {
                file_watcher = Some(sources::watch_manifests(&dir, resync, signal_tx.clone())?);
                // Parsed while the kernel creates the maps and verifies the
                // programs (a fifth of a cold start); a file changed after the
                // watch began is also the watcher's to report.
                let read_dir = dir.clone();
                first_read = Some(std::thread::spawn(move || {
                    let started = Instant::now();
                    let mut cache = crate::source::manifests::Cache::default();
                    let read = cache.read_dir(&read_dir);
                    (cache, read, started.elapsed().as_micros() as u64)
                }));
                source = Some(Source::Manifests(dir));
            }
            SourceConfig::Kube { kubeconfig, peers } => {
                pending_kube = Some(tokio::spawn(sources::start_kube(
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
        if pin {
            datapath::ensure_bpffs(&bpffs).context("--bpffs")?;
            datapath::LayoutDir::recover_growth(&bpffs, layout_version);
        }
        let pins = pin.then_some((bpffs.as_path(), layout_version));
        let mut datapath = Datapath::open(sizes, pins, kernel_log).context("loading the datapath")?;
        let kernel_logger = read_kernel_log(&mut datapath)?;
        datapath.set_cleanup_on_exit(cleanup_on_exit);
        let applied = adopt(&datapath);
        let older = if pin { datapath::LayoutDir::others(&bpffs, layout_version) } else { Vec::new() };
        if !older.is_empty() {
            let versions: Vec<u32> = older.iter().map(|l| l.version).collect();
            info!(?versions, current = layout_version, "found the pins of another layout version: upgrading from it");
        }
        datapath.set_older_layouts(older.clone());

        let sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let (scrape_tx, scrapes) = mpsc::unbounded_channel();
        health.serve_metrics(scrape_tx);
        // The collector counts live flows on its own thread, so a scrape never
        // walks the maps; with expiry off it only counts (and removes closed
        // flows past their grace time, as the datapath would), every 10 s.
        let ct_stats = Arc::new(conntrack::CollectorStats::default());
        if conntrack_gc.expiry {
            info!(timeouts = ?conntrack_gc.timeouts, interval_secs = conntrack_gc.interval.as_secs(), "conntrack collector started");
        } else {
            info!("conntrack expiry off (--conntrack-gc-interval 0): idle flows stay until evicted");
        }
        let collector = collect_conntrack(&datapath, conntrack_gc, &ct_stats)?;
        let (link_tx, links) = mpsc::unbounded_channel();
        let (external_link_tx, external_links) = mpsc::unbounded_channel();
        let mut reconciler = Reconciler::new(applied, flags_policy.clone());
        reconciler.set_growth(Some(bounds));
        // An unreadable directory is left to the first pass, which reports it.
        if let Some(Ok((cache, Ok(read), read_us))) = first_read.map(std::thread::JoinHandle::join) {
            reconciler.prime_manifests(cache, read, read_us);
        }
        // Without it inspect reads the pinned maps unnamed, as when the
        // agent is stopped: a warning, not a reason to stop serving.
        let (inspect_tx, inspects) = mpsc::unbounded_channel();
        let control = control::serve(&state_dir, inspect_tx)
            .inspect_err(|e| warn!(error = %super::error::chain(e), "inspect cannot ask this agent"))
            .ok();
        // An earlier agent's names: this agent is about to change the maps
        // they describe. While it runs, inspect asks it; it writes its own
        // when it stops.
        if let Err(e) = Inventory::remove(&state_dir) {
            warn!(dir = %state_dir.display(), error = %e, "removing the earlier agent's state.json failed; inspect may name backends wrongly while this agent is stopped");
        }
        Ok(Self {
            interfaces,
            interface_patterns,
            attach,
            health_addr,
            socket_lb,
            external,
            terminate_tcp,
            metrics_backend_label,
            cleanup_on_exit,
            pin,
            resync,
            outlier_interval,
            reconciler,
            flags_policy,
            health,
            signals,
            file_watcher,
            schedule: Schedule::new(debounce, Instant::now(), source.is_some()),
            source,
            pending_kube,
            event_counts,
            recorder: None,
            datapath,
            older,
            serving: false,
            patterns: Some(patterns),
            link_tx,
            links,
            discovered: Discovered::default(),
            external_link_tx,
            external_links,
            external_discovered: Discovered::default(),
            metrics: AgentMetrics::default(),
            scrapes,
            inspects,
            control,
            sigint,
            sigterm,
            bpffs: pin.then(|| bpffs.clone()),
            state_dir,
            ct_stats,
            collector,
            conntrack_gc,
            kernel_log,
            kernel_logger,
            growths: 0,
            bounds,
            grow_after_takeover: false,
            mode_name: format!("{:?}", attach.resolve()).to_lowercase(),
            map_memory: datapath::memory::own_maps(),
            passive: outlier.map(PassiveHealth::new),
            terminate_pending: BTreeSet::new(),
        })
    }

    /// The loop, until SIGINT or SIGTERM; then [`Agent::stop`].
    pub async fn run(mut self) -> Result<(), AgentError> {
        let mut resync = tokio::time::interval(self.resync);
        resync.tick().await;
        let mut outlier_tick = tokio::time::interval(self.outlier_interval);
        outlier_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut terminate_tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            if self.schedule.due().any() && self.source.is_some() {
                self.pass()?;
            }
            tokio::select! {
                _ = self.sigint.recv() => break,
                _ = self.sigterm.recv() => break,
                _ = resync.tick() => {
                    self.health.beat();
                    self.schedule.on_resync(Instant::now(), matches!(self.source, Some(Source::Kube(_))));
                }
                started = async { self.pending_kube.as_mut().expect("guarded").await }, if self.pending_kube.is_some() => {
                    self.pending_kube = None;
                    let (kube, events) = started.context("the API start task")??;
                    self.source = Some(Source::Kube(Box::new(kube)));
                    self.recorder = Some(events);
                    self.schedule.source_ready();
                }
                Some(signal) = self.signals.recv() => self.on_signal(signal).await,
                Some(event) = self.links.recv() => {
                    self.discovered.on_event(event, &mut DatapathHooks(&mut self.datapath, self.attach));
                }
                Some(event) = self.external_links.recv() => {
                    let hooks = &mut ExternalHooks(&mut self.datapath, self.external.mode);
                    self.external_discovered.on_event(event, hooks);
                }
                // At most twice a second, and off the loop: the scan reads
                // every remembered socket.
                _ = terminate_tick.tick(), if !self.terminate_pending.is_empty() => self.end_sockets().await,
                // A round starts each tick and goes on in steps, each after
                // the events that came meanwhile (select! picks among ready
                // branches at random): a change never waits for a whole round.
                _ = outlier_tick.tick(), if self.serving && self.passive.as_ref().is_some_and(|p| !p.in_round()) => {
                    self.passive_step();
                }
                () = std::future::ready(()), if self.passive.as_ref().is_some_and(PassiveHealth::in_round) => {
                    self.passive_step();
                }
                Some(reply) = self.scrapes.recv() => {
                    let _ = reply.send(self.scrape());
                }
                Some(request) = self.inspects.recv() => {
                    // A client that gave up costs nothing.
                    if !request.reply.is_closed() {
                        let _ = request.reply.send(self.answer(&request.what));
                    }
                }
            }
        }
        self.stop();
        Ok(())
    }

    /// One reconcile pass, and the takeover after the first that succeeds.
    fn pass(&mut self) -> Result<(), AgentError> {
        let Some(source) = &self.source else { return Ok(()) };
        self.health.beat();
        let started = Instant::now();
        let work = self.schedule.take_due();
        let full_pass = work.recompute;
        let parsed_before = self.reconciler.parsed_files();
        let result = reconcile(
            source,
            &self.flags_policy,
            local_addresses(),
            &mut self.reconciler,
            &mut self.datapath,
            self.recorder.as_ref(),
            work,
        );
        let took = started.elapsed();
        match &result {
            Ok(()) => self.metrics.reconciled(started.elapsed()),
            Err(_) => self.metrics.reconcile_failed(),
        }
        let changed = self.reconciler.take_changed();
        // A pass that parsed no file and changed nothing was a repeated
        // event (a rename reaches the watcher as two): it must not open a
        // debounce window, which held the next real change up to 100 ms.
        let idle = changed.is_empty()
            && self.reconciler.parsed_files() == parsed_before
            && matches!(self.source, Some(Source::Manifests(_)));
        self.hand_on(&changed);
        // A pass that found the maps too small wrote nothing: grow them
        // (and take over, before the first takeover) now.
        let outgrown = self.reconciler.take_outgrown();
        if let Some(target) = outgrown {
            self.grow(target)?;
        }
        match result {
            Ok(()) if !self.serving && outgrown.is_none() => self.take_over()?,
            Ok(()) => {}
            Err(e) => error!(error = %e, "applying to the datapath failed; retrying on the next change or resync"),
        }
        self.schedule.reconciled(Instant::now(), took, full_pass, !idle);
        Ok(())
    }

    /// The maps hold the whole state: take over from the agent before, in
    /// the order `switch_over` keeps (the restart test caught a lost UDP
    /// reply when it was another), then watch for new links.
    fn take_over(&mut self) -> Result<(), AgentError> {
        let mut takeover = Takeover {
            datapath: &mut self.datapath,
            older: &self.older,
            interfaces: &self.interfaces,
            patterns: self.patterns.as_ref().expect("not started"),
            attach: self.attach,
            socket_lb: &self.socket_lb,
            external: &self.external,
            carried: 0,
        };
        switch_over(&mut takeover, self.older.len())?;
        // Retired: a later growth must not take them over again (one of them
        // may be the growth directory it builds in).
        self.older.clear();
        self.datapath.set_older_layouts(Vec::new());
        if std::mem::take(&mut self.grow_after_takeover) {
            self.reconciler.set_growth(Some(self.bounds));
            self.schedule.recompute();
        }
        self.serve();
        Ok(())
    }

    /// Programs hooked everywhere: ready, and new links are watched.
    fn serve(&mut self) {
        if let Some(patterns) = self.patterns.take()
            && !patterns.is_empty()
        {
            let tx = self.link_tx.clone();
            tokio::spawn(async move {
                if let Err(e) = links::watch(patterns, tx).await {
                    error!(error = %e, "interface discovery stopped; new pods will not be served");
                }
            });
        }
        // Names too (escaped): one deleted is released, and its entry in
        // the redirect map with it.
        let watched: Vec<String> = self
            .external
            .interfaces
            .iter()
            .map(|i| if takeover::is_glob(i) { i.clone() } else { glob::Pattern::escape(i) })
            .collect();
        if let Ok(patterns) = Patterns::new(&watched)
            && !patterns.is_empty()
        {
            let tx = self.external_link_tx.clone();
            tokio::spawn(async move {
                if let Err(e) = links::watch(patterns, tx).await {
                    error!(error = %e, "external interface discovery stopped; new uplinks will not be served");
                }
            });
        }
        self.serving = true;
        self.health.set_ready();
        info!(node = ?self.reconciler.policy().node, tiers = ?self.reconciler.policy().tiers, "locality");
        info!(interfaces = ?self.interfaces, patterns = ?self.interface_patterns, health = %self.health_addr, "agent ready");
    }

    /// Moves to larger maps ([`crate::growth`]): a second datapath of the
    /// same layout, programmed whole, takes over from this one as an
    /// upgrade does. When the larger maps cannot be had (memory, loading
    /// them, a write that fails), growth stops where it is and the held
    /// frontends go to the current maps (those that do not fit are refused
    /// and reported). A takeover that fails half way ends the agent, as at
    /// start, leaving both datapaths pinned for the next one to take over.
    fn grow(&mut self, target: Capacity) -> Result<(), AgentError> {
        let started = Instant::now();
        let from = self.datapath.sizes().capacity;
        let give_up = |agent: &mut Self, why: String| {
            warn!(from = ?from, to = ?target, error = %why, "the maps cannot grow; frontends that do not fit are refused");
            agent.reconciler.stop_growing();
            agent.schedule.recompute();
        };
        // Before the first takeover, an interrupted growth's directory is
        // among the layouts to take over, and its name is the one a growth
        // builds in: take over first with what fits, then grow.
        if !self.serving && self.older.iter().any(datapath::LayoutDir::is_growth) {
            info!("an interrupted growth is taken over first; the maps grow right after");
            self.reconciler.set_growth(None);
            self.grow_after_takeover = true;
            self.schedule.recompute();
            return Ok(());
        }
        // The larger datapath is a whole second one (conntrack and socket
        // maps included) until the smaller retires.
        let current: u64 = self.map_memory.iter().map(|m| m.bytes).sum();
        let needed = current + growth::kernel_bytes(target).saturating_sub(growth::kernel_bytes(from));
        if let Some(available) = available_memory()
            && !growth::fits_memory(needed, available)
        {
            let why = format!(
                "a second datapath with the larger maps takes about {} MiB and the node has {} MiB available",
                needed >> 20,
                available >> 20
            );
            give_up(self, why);
            return Ok(());
        }
        let (grown, logger, loaded) = match self.prepare_growth(target, started) {
            Ok(prepared) => prepared,
            Err(e) => {
                give_up(self, e);
                return Ok(());
            }
        };
        let programmed = started.elapsed();
        // What the datapaths being replaced serve: the grown one takes each.
        let mut served = self.datapath.attached_interfaces();
        if !self.serving {
            let patterns = self.patterns.as_ref().expect("not serving yet");
            let pinned = self.datapath.pinned_not_attached().into_iter();
            served.extend(
                pinned.chain(self.older.iter().flat_map(|l| l.pinned_interfaces())).filter(|i| patterns.matches(i)),
            );
        }
        let older = std::mem::take(&mut self.older);
        let running = std::mem::replace(&mut self.datapath, grown);
        let mut olds = vec![Old::Running(Some(Box::new(running)))];
        olds.extend(older.into_iter().map(Old::Pinned));
        let count = olds.len();
        let default_patterns = Patterns::default();
        let mut switch = Growth {
            datapath: &mut self.datapath,
            olds,
            interfaces: &self.interfaces,
            served: &served,
            patterns: self.patterns.as_ref().unwrap_or(&default_patterns),
            attach: self.attach,
            socket_lb: &self.socket_lb,
            external: &self.external,
        };
        let switched = switch_over(&mut switch, count);
        // From here the grown datapath serves (or serves beside the old one):
        // it stays when the agent stops, as any agent's datapath does.
        self.datapath.set_cleanup_on_exit(self.cleanup_on_exit);
        switched?;
        self.datapath.settle();
        if let Some(task) = std::mem::replace(&mut self.kernel_logger, logger) {
            task.abort();
        }
        // Passive health rebuilds its view (every id moved); the frontends
        // the held change touched go on as any pass's do (sockets to
        // backends it removed are ended).
        if let Some(passive) = &mut self.passive {
            passive.ids_moved();
        }
        let changed = self.reconciler.take_changed();
        self.hand_on(&changed);
        // Bound to the old maps: the collector's descriptors (joined here,
        // within the growth's own time: its maps must be closed before
        // the memory is read) and the sizes.
        drop(std::mem::replace(
            &mut self.collector,
            collect_conntrack(&self.datapath, self.conntrack_gc, &self.ct_stats)?,
        ));
        self.map_memory = datapath::memory::own_maps();
        self.growths += 1;
        let capacity = self.datapath.sizes().capacity;
        info!(
            from = ?from,
            to = ?capacity,
            frontends = self.reconciler.applied().frontend_count(),
            backends = self.reconciler.applied().backend_count(),
            load_ms = loaded.as_millis() as u64,
            program_ms = (programmed - loaded).as_millis() as u64,
            took_ms = started.elapsed().as_millis() as u64,
            "the maps grew"
        );
        if !self.serving {
            self.serve();
        }
        Ok(())
    }

    /// The larger datapath, loaded (its kernel-log reader started) and
    /// programmed whole; the time the load took. Dropped on an error, it
    /// removes itself.
    fn prepare_growth(
        &mut self,
        target: Capacity,
        started: Instant,
    ) -> Result<(Datapath, Option<JoinHandle<()>>, Duration), String> {
        let mut grown = self.datapath.open_grown(target, self.kernel_log).map_err(|e| e.to_string())?;
        let logger = read_kernel_log(&mut grown).map_err(|e| e.to_string())?;
        let loaded = started.elapsed();
        if let Err(e) = self.reconciler.regrow(target, &mut grown) {
            if let Some(task) = logger {
                task.abort();
            }
            return Err(e.to_string());
        }
        Ok((grown, logger, loaded))
    }

    /// Frontends a pass changed: their sockets to departed backends are
    /// ended (with socket-level load balancing), passive health looks again.
    fn hand_on(&mut self, changed: &BTreeSet<FrontendKey>) {
        if self.datapath.sockets_cgroup().is_some() {
            self.terminate_pending.extend(changed.iter().copied());
        }
        if !changed.is_empty()
            && let Some(passive) = &mut self.passive
        {
            passive.changed(changed.iter().copied());
        }
    }

    /// One step of passive health's round (see [`PassiveHealth::step`]).
    fn passive_step(&mut self) {
        let started = Instant::now();
        if let Some(passive) = &mut self.passive {
            let (verdict, done) = passive.step(started, &self.datapath, &mut self.reconciler, passive::STEP_IDS);
            if verdict {
                self.schedule.recompute();
            }
            tracing::debug!(took_us = started.elapsed().as_micros() as u64, done, "passive health step");
        }
    }

    /// A change or a failing watch: wait out the debounce window, then take
    /// in everything that arrived meanwhile.
    async fn on_signal(&mut self, signal: SourceEvent) {
        let mut pending = Some(signal);
        let window = self.schedule.debounce_wait(Instant::now());
        if !window.is_zero() {
            tokio::time::sleep(window).await;
        }
        while let Some(signal) = pending.take().or_else(|| self.signals.try_recv().ok()) {
            match self.schedule.on_event(signal) {
                Some(StaleChange::Failing { what, message }) => {
                    warn!(what, error = %message, "the API is failing; the datapath keeps its last good state (stale) while the agent retries");
                }
                Some(StaleChange::Resumed { what }) => info!(what, "the API works again"),
                None => {}
            }
        }
        self.health.set_stale(self.schedule.stale());
    }

    /// Ends the sockets translated to backends that left the frontends
    /// changed since the last call, on a blocking thread.
    async fn end_sockets(&mut self) {
        let changed = std::mem::take(&mut self.terminate_pending);
        let state = self.reconciler.state();
        // The changed frontends as they are now (the thread decides with
        // `Frontend::keeps_sockets_to`); a deleted one keeps none.
        let frontends: BTreeMap<FrontendKey, desired::Frontend> =
            changed.iter().filter_map(|key| Some((*key, state.frontends.get(key)?.clone()))).collect();
        let mut rev = match self.datapath.sock_rev() {
            Ok(rev) => rev,
            Err(e) => return warn!(error = %e, "reading the socket translations failed"),
        };
        let started = Instant::now();
        let tcp = self.terminate_tcp;
        let gone = tokio::task::spawn_blocking(move || {
            let keeps =
                |key: &FrontendKey, addr: &BackendAddr| frontends.get(key).is_some_and(|f| f.keeps_sockets_to(addr));
            let ended = terminate::victims(&rev.sockets(), &changed, keeps, tcp);
            let destroyed = terminate::terminate(&ended);
            // Only what is gone: a socket that could not be ended keeps
            // showing the VIP as its peer.
            let gone: Vec<_> = ended.into_iter().filter(|s| destroyed.contains(&s.cookie)).collect();
            rev.forget(&gone);
            gone.len()
        })
        .await
        .unwrap_or(0);
        if gone > 0 {
            self.metrics.sockets_terminated(gone as u64);
            info!(
                sockets = gone,
                took_ms = started.elapsed().as_millis() as u64,
                "ended sockets whose backend left their service"
            );
        }
    }

    /// An `inspect` request, answered between passes: the tables and the
    /// names behind them are of one generation.
    fn answer(&self, what: &str) -> String {
        let error = |message: String| serde_json::json!({ "error": message }).to_string();
        let generation = self.reconciler.generation();
        let bpffs = self.bpffs.clone();
        let json = |answer: Result<String, serde_json::Error>| answer.unwrap_or_else(|e| error(e.to_string()));
        match what {
            // Before the first pass the names are not known yet: inspect
            // reads the pinned maps unnamed.
            "services" | "inventory" if !self.serving => error("not serving yet".into()),
            "services" => {
                let by_id: std::collections::HashMap<u32, FrontendInfo> =
                    self.reconciler.frontend_infos().map(|f| (f.service_id, f)).collect();
                let rows = inspect::service_rows(&self.datapath, |id| by_id.get(&id), Some(generation));
                json(serde_json::to_string(&AgentServices { generation, bpffs, rows }))
            }
            "inventory" => {
                let inventory = self.reconciler.inventory();
                json(serde_json::to_string(&AgentInventory { generation, bpffs, inventory }))
            }
            other => error(format!("unknown request {other:?}; this agent answers: services, inventory")),
        }
    }

    /// The /metrics page.
    fn scrape(&self) -> String {
        let datapath = &self.datapath;
        let sizes = datapath.sizes();
        let applied = self.reconciler.applied();
        let view = AgentView {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            attach_mode: self.mode_name.clone(),
            stale: self.schedule.is_stale(),
            interfaces: datapath.attached_count(),
            ejections: self.passive.as_ref().map_or(0, PassiveHealth::ejections_total),
            map_growths: self.growths,
            health_unwatched: self.passive.as_ref().map_or(0, |p| p.unwatched() as u64),
            events: self.event_counts.outcomes().to_vec(),
            conntrack_gc: Some((
                self.ct_stats.expired.load(Relaxed),
                self.ct_stats.last_pass_us.load(Relaxed) as f64 / 1e6,
            )),
            socket_lb: datapath.sockets_cgroup().is_some() && !self.socket_lb.host_only,
            xdp: datapath.external_interfaces().into_iter().map(|(i, m)| (i, m.name())).collect(),
            map_memory: self.map_memory.clone(),
            objects: self
                .reconciler
                .objects()
                .iter()
                .flat_map(|(kind, valid, invalid)| [(*kind, "valid", *valid), (*kind, "invalid", *invalid)])
                .collect(),
            fill: vec![
                ("conntrack", self.ct_stats.live.load(Relaxed), u64::from(sizes.conntrack)),
                ("services", applied.frontend_count() as u64, u64::from(sizes.capacity.services)),
                ("backends", applied.backend_count() as u64, u64::from(sizes.capacity.backends.saturating_sub(1))),
                ("selection", applied.slots_used(), u64::from(sizes.capacity.slots)),
            ],
        };
        // The XDP path's counters only with --external-interface: a syscall
        // per id and scrape that an agent without it would spend on zeros.
        let outside = !self.external.interfaces.is_empty();
        let kernel = Kernel {
            backend: &|id| datapath.backend_stats(id),
            service: &|id| datapath.service_stats(id),
            xdp_backend: &|id| if outside { datapath.xdp_backend_stats(id) } else { None },
            xdp_service: &|id| if outside { datapath.xdp_service_stats(id) } else { None },
            datapath: datapath.stats().unwrap_or_default(),
        };
        metrics::render(&self.metrics, &view, self.reconciler.frontend_infos(), &kernel, self.metrics_backend_label)
    }

    /// Leaves the datapath serving (or removes it, with --cleanup-on-exit or
    /// --no-pin) and, when it stays, writes `state.json`: the names of what
    /// it leaves in the maps, for `inspect` while no agent runs.
    fn stop(self) {
        // Not when a newer agent has taken the socket (an upgrade): that one
        // has programmed the maps since, and writes its own when it stops.
        let leaves_names = self.serving
            && self.pin
            && !self.cleanup_on_exit
            && self.control.as_ref().is_none_or(ControlSocket::is_ours);
        if leaves_names {
            let started = Instant::now();
            let inventory = self.reconciler.inventory();
            match inventory.write(&self.state_dir) {
                Ok(()) => info!(
                    frontends = inventory.frontends.len(),
                    took_ms = started.elapsed().as_millis() as u64,
                    dir = %self.state_dir.display(),
                    "wrote state.json for inspect"
                ),
                Err(e) => {
                    warn!(dir = %self.state_dir.display(), error = %e, "writing state.json for `mcs-agent inspect` failed")
                }
            }
        }
        let Self { file_watcher, pending_kube, datapath, collector, control, cleanup_on_exit, pin, .. } = self;
        drop(control);
        drop(file_watcher);
        if let Some(task) = pending_kube {
            task.abort();
        }
        if cleanup_on_exit || !pin {
            info!("shutting down: detaching and removing pins");
        }
        let stats = datapath.stats().unwrap_or_default();
        datapath.shutdown();
        drop(collector);
        let counts: Vec<String> = stats.iter().map(|(s, n)| format!("{}={n}", s.name())).collect();
        info!(counters = %counts.join(" "), "stopped");
    }
}

/// Hands the kernel programs' log (with `--kernel-log`) to a task.
fn read_kernel_log(datapath: &mut Datapath) -> Result<Option<JoinHandle<()>>, AgentError> {
    let Some(logger) = datapath.take_kernel_logger() else { return Ok(None) };
    {
        // SAFETY: the logger owns the ring buffer's fd, open and unchanged for as
        // long as the AsyncFd owns the logger.
        let mut logger =
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
                .map_err(|e| AgentError::Config(format!("watching the kernel log ring buffer: {e}")))?;
        Ok(Some(tokio::spawn(async move {
            while let Ok(mut ready) = logger.readable_mut().await {
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
        })))
    }
}

/// The collector counts live flows on its own thread, so a scrape never
/// walks the maps; with expiry off it only counts (and removes closed flows
/// past their grace time, as the datapath would), every 10 s.
fn collect_conntrack(
    datapath: &Datapath,
    gc: ConntrackGc,
    stats: &Arc<conntrack::CollectorStats>,
) -> Result<conntrack::Running, AgentError> {
    let (ct, ct6) = datapath.conntrack_fds().context("the conntrack collector's map descriptors")?;
    let (xnat, xnat6) = datapath.xnat_conntrack_fds().context("the conntrack collector's map descriptors")?;
    let collector = conntrack::Collector::new(ct, ct6, gc.timeouts, stats.clone()).with_xnat(xnat, xnat6);
    collector.spawn(gc.interval).context("starting the conntrack collector")
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The programmed state to start from: an earlier agent's, read from its
/// pinned maps, or nothing.
fn adopt(datapath: &Datapath) -> Applied {
    let capacity = datapath.sizes().capacity;
    if !datapath.adopted() {
        return Applied::new(capacity);
    }
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
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), AgentError> {
    Agent::start(config).await?.run().await
}
