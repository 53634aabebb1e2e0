//! The reconcile loop's core: a change to some objects recomputes the
//! services they belong to (and those that depend on them), plans the
//! frontends that moved and writes only what differs. A whole-snapshot pass
//! (start, resync, a policy or health change) goes through the same steps
//! with every service.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Instant,
};

use tracing::{info, warn};

use crate::{
    datapath::{Datapath, DatapathError, KernelState},
    desired::{Delta, DesiredState, Group, Model, ObjectError, Policy, Runtime, ServiceRef},
    growth,
    inventory::{FrontendInfo, Inventory},
    maglev,
    model::{BackendAddr, ClusterIps, FrontendKey, Snapshot},
    plan::{Applied, Capacity, MapOp, PlanSummary},
    source::manifests,
};

/// What a pass needs of the kernel: writing the ordered map operations, and
/// reading back what the maps hold when a write failed half way. The
/// datapath is one; the tests below hold the maps in memory instead.
pub trait KernelMaps {
    fn apply(&mut self, ops: &[MapOp]) -> Result<(), DatapathError>;
    fn kernel_state(&self) -> KernelState;
    fn selection_slot(&self, slot: u32) -> Option<u32>;
}

impl KernelMaps for Datapath {
    fn apply(&mut self, ops: &[MapOp]) -> Result<(), DatapathError> {
        Datapath::apply(self, ops)
    }

    fn kernel_state(&self) -> KernelState {
        Datapath::kernel_state(self)
    }

    fn selection_slot(&self, slot: u32) -> Option<u32> {
        Datapath::selection_slot(self, slot)
    }
}

/// Outcome of one pass, for logs and tests.
#[derive(Debug, Default)]
pub struct Report {
    pub generation: u64,
    pub frontends: usize,
    pub backends: usize,
    pub summary: PlanSummary,
    /// Services recomputed by this pass.
    pub services: usize,
    /// Time spent reading and parsing the source (manifest mode).
    pub read_us: u64,
    /// Time spent deciding the desired state (locality, weights).
    pub compute_us: u64,
    /// Time spent planning (Maglev tables) and writing the maps.
    pub apply_us: u64,
    /// Every current problem (full passes; see [`Reconciler::problems`]).
    pub problems: Vec<String>,
    /// Invalid objects reported for the first time by this pass (for Kubernetes Events).
    pub object_errors: Vec<ObjectError>,
    /// Problems not reported by the previous pass.
    pub new_problems: BTreeSet<String>,
}

/// The share of `--max-selection-slots` the desired tables may take; the
/// rest leaves room for a new table to be written beside the one it replaces.
fn slot_budget(slots: u32) -> u64 {
    u64::from(slots) - u64::from(slots) / 8
}

pub struct Reconciler {
    applied: Applied,
    policy: Policy,
    generation: u64,
    /// Object problems reported and not resolved since.
    reported: BTreeSet<String>,
    /// Frontends that did not fit, by frontend.
    capacity: BTreeMap<FrontendKey, String>,
    /// The source's own problems (unreadable files, YAML errors).
    source_problems: BTreeSet<String>,
    /// Timings of the pass in progress, reported with it.
    read_us: u64,
    /// Parsed manifest files, re-read only when they change.
    manifests: manifests::Cache,
    /// A first read made while the datapath loaded (and how long it took):
    /// the first pass takes it instead of reading.
    primed: Option<(manifests::Read, u64)>,
    /// Manifest files parsed so far (changed ones only).
    parsed_files: u64,
    /// Passive health and the slot budget, fed to every pass.
    runtime: Runtime,
    /// Objects by service and the desired state, kept between passes.
    model: Model,
    /// Frontends changed since the last [`Reconciler::take_changed`].
    changed: BTreeSet<FrontendKey>,
    /// Backend ids handed out or freed since the last
    /// [`Reconciler::take_backend_changes`]; `None` after a re-adoption
    /// (every id may have changed).
    backend_changes: Option<Vec<(u32, Option<BackendAddr>)>>,
    /// Frontends a failed write left unplanned: planned again next pass.
    pending: BTreeSet<FrontendKey>,
    /// How far the maps may grow (`--max-*`); `None`: they never do.
    bounds: Option<Capacity>,
    /// The capacity a pass found the maps must grow to: its frontends are
    /// held (pending) until [`Reconciler::regrow`] programs larger maps.
    outgrown: Option<Capacity>,
    /// Read and compute time of a pass that held its frontends for a
    /// growth: reported with the pass that programs them.
    held_us: (u64, u64),
}

/// Frontends planned and written together (see `Reconciler::finish`).
const PLAN_CHUNK: usize = 1024;

impl Reconciler {
    pub fn new(applied: Applied, policy: Policy) -> Self {
        Self {
            applied,
            policy,
            generation: 0,
            reported: BTreeSet::new(),
            capacity: BTreeMap::new(),
            source_problems: BTreeSet::new(),
            read_us: 0,
            manifests: manifests::Cache::default(),
            primed: None,
            parsed_files: 0,
            runtime: Runtime::default(),
            model: Model::default(),
            changed: BTreeSet::new(),
            backend_changes: None,
            pending: BTreeSet::new(),
            bounds: None,
            outgrown: None,
            held_us: (0, 0),
        }
    }

    /// A reconciler that knows which service holds each ClusterSetIP, as
    /// one with a history would: the reference a fresh pass is compared to.
    #[cfg(test)]
    pub(crate) fn seeded(applied: Applied, policy: Policy, held: BTreeMap<std::net::IpAddr, String>) -> Self {
        Self { model: Model::with_held(held), ..Self::new(applied, policy) }
    }

    #[cfg(test)]
    pub(crate) fn held(&self) -> &BTreeMap<std::net::IpAddr, String> {
        self.model.held()
    }

    /// Lets the maps grow up to `bounds`: a pass whose desired state comes
    /// near a map's size writes nothing and asks for larger maps instead
    /// ([`Reconciler::take_outgrown`]). `None` (the default): a frontend
    /// that does not fit is refused.
    pub fn set_growth(&mut self, bounds: Option<Capacity>) {
        self.bounds = bounds;
    }

    /// The capacity the last pass asked the maps to grow to, once.
    pub fn take_outgrown(&mut self) -> Option<Capacity> {
        self.outgrown.take()
    }

    /// What the desired state needs of the maps, as far as a pass can tell
    /// without walking every backend: the backends programmed now and the
    /// new addresses of the frontends about to be planned (freed ones are
    /// not subtracted: it errs towards growing).
    fn demand(&self, keys: &BTreeSet<FrontendKey>) -> growth::Demand {
        let state = self.model.state();
        let mut new: BTreeSet<&BackendAddr> = BTreeSet::new();
        for frontend in keys.iter().filter_map(|key| state.frontends.get(key)) {
            new.extend(frontend.weights.iter().map(|w| &w.addr).filter(|a| self.applied.backend_id(a).is_none()));
        }
        // Slots are not refused: the slot budget sizes every table down to
        // fit. They must grow only when the tables would not fit at the
        // smallest size, which is worth a walk only when they come near.
        let budget = slot_budget(self.applied.capacity().slots);
        let slots = if self.model.slots() * 8 > budget * 7 {
            let smallest = *maglev::SLOT_LADDER.last().expect("a ladder");
            let max = self.policy.max_table_size;
            let sizes = state.frontends.values().filter(|f| !f.weights.is_empty());
            sizes.map(|f| u64::from(maglev::table_size_for(f.weights.len(), max, smallest))).sum()
        } else {
            self.model.slots()
        };
        growth::Demand {
            services: state.frontends.len() as u64,
            backends: (self.applied.backend_count() + new.len()) as u64,
            slots,
        }
    }

    /// Moves to empty maps of `capacity` (a larger datapath, see
    /// [`crate::growth`]) and programs every frontend into them. On an
    /// error the old allocation state is back, growth stops at the old
    /// capacity, and the held frontends are planned by the next pass
    /// against the old maps (those that do not fit are refused, as
    /// without growth).
    pub fn regrow(&mut self, capacity: Capacity, datapath: &mut impl KernelMaps) -> Result<Report, DatapathError> {
        let started = Instant::now();
        let old = std::mem::replace(&mut self.applied, Applied::new(capacity));
        let held = std::mem::take(&mut self.pending);
        self.pending = self.model.state().frontends.keys().copied().collect();
        // Not logged id by id: every id is new (a million at 100,000 services).
        let changes = self.backend_changes.take();
        // A full pass: tables shrunk to fit the old slots may grow back.
        let delta = Delta { services: self.model.service_count(), ..Delta::default() };
        match self.finish(delta, started, None, datapath) {
            Ok(report) => {
                // `backend_changes` stays `None`: passive health starts its
                // view afresh. Every frontend was written, but only the held ones changed.
                self.changed = held;
                Ok(report)
            }
            Err(e) => {
                self.applied = old;
                self.pending = held.into_iter().chain(self.model.state().frontends.keys().copied()).collect();
                self.backend_changes = changes;
                self.bounds = Some(self.applied.capacity());
                Err(e)
            }
        }
    }

    /// Growth failed outside the maps (creating them, taking over): the
    /// held frontends go to the current maps next pass, and growth stops.
    pub fn stop_growing(&mut self) {
        self.bounds = Some(self.applied.capacity());
        self.pending.extend(self.model.state().frontends.keys().copied());
    }

    /// Takes a first read of the manifests made elsewhere (the agent reads
    /// while its datapath loads): the next [`Reconciler::from_manifests`]
    /// applies it instead of reading. Files changed since are the file
    /// watcher's to report, as for any pass.
    pub fn prime_manifests(&mut self, cache: manifests::Cache, read: manifests::Read, read_us: u64) {
        self.manifests = cache;
        self.primed = Some((read, read_us));
    }

    /// Reads the whole manifests directory (re-parsing changed files only)
    /// and brings the datapath to it.
    pub fn from_manifests(&mut self, dir: &Path, datapath: &mut impl KernelMaps) -> Result<Report, DatapathError> {
        if let Some((read, read_us)) = self.primed.take() {
            self.read_us = read_us;
            self.parsed_files += read.parsed as u64;
            return self.apply_changes(read.changes, Some(read.problems), datapath);
        }
        let started = Instant::now();
        let read = match self.manifests.read_dir(dir) {
            Ok(read) => read,
            Err(e) => {
                // An unreadable directory must not wipe the datapath: keep the last good state.
                warn!(error = %e, "manifests unreadable; keeping the last programmed state");
                return Ok(Report { generation: self.generation, problems: vec![e.to_string()], ..Report::default() });
            }
        };
        self.read_us = started.elapsed().as_micros() as u64;
        self.parsed_files += read.parsed as u64;
        self.apply_changes(read.changes, Some(read.problems), datapath)
    }

    /// Manifest files parsed so far: a pass that parsed none and changed
    /// nothing was only a repeated event.
    pub fn parsed_files(&self) -> u64 {
        self.parsed_files
    }

    /// Re-reads only these manifest files (as the file watcher named them).
    pub fn from_manifest_paths(
        &mut self,
        paths: &[PathBuf],
        datapath: &mut impl KernelMaps,
    ) -> Result<Report, DatapathError> {
        let started = Instant::now();
        let read = self.manifests.read_paths(paths);
        self.read_us = started.elapsed().as_micros() as u64;
        self.parsed_files += read.parsed as u64;
        // A first read not applied yet goes first: the cache holds it already.
        let mut changes = match self.primed.take() {
            Some((primed, read_us)) => {
                self.read_us += read_us;
                primed.changes
            }
            None => Vec::new(),
        };
        changes.extend(read.changes);
        self.apply_changes(changes, Some(read.problems), datapath)
    }

    /// A whole snapshot (tests, tools): every service is replaced.
    pub fn apply_snapshot(
        &mut self,
        snapshot: &Snapshot,
        problems: Vec<String>,
        datapath: &mut impl KernelMaps,
    ) -> Result<Report, DatapathError> {
        self.apply_groups(crate::desired::group_snapshot(snapshot), problems, datapath)
    }

    /// Every service the source knows, with its objects: services whose
    /// entries are the very ones of the last pass are not recomputed.
    pub fn apply_groups(
        &mut self,
        groups: Vec<(ServiceRef, Group)>,
        problems: Vec<String>,
        datapath: &mut impl KernelMaps,
    ) -> Result<Report, DatapathError> {
        let listed: BTreeSet<&ServiceRef> = groups.iter().map(|(s, _)| s).collect();
        let gone: Vec<(ServiceRef, Group)> = self
            .model
            .services()
            .filter(|(s, _)| !listed.contains(s))
            .map(|(s, _)| (s.clone(), Group::default()))
            .collect();
        let mut changes: Vec<(ServiceRef, Group)> = groups
            .into_iter()
            .filter(|(service, group)| self.model.group(service).is_none_or(|old| !old.same_as(group)))
            .collect();
        changes.extend(gone);
        self.apply_changes(changes, Some(problems), datapath)
    }

    /// These services with their objects (the others stay as they are):
    /// those whose entries are the very ones of the last pass are not
    /// recomputed.
    pub fn apply_some_groups(
        &mut self,
        groups: Vec<(ServiceRef, Group)>,
        datapath: &mut impl KernelMaps,
    ) -> Result<Report, DatapathError> {
        let changes: Vec<(ServiceRef, Group)> = groups
            .into_iter()
            .filter(|(service, group)| {
                let known = self.model.group(service);
                known.is_none_or(|old| !old.same_as(group)) && !(known.is_none() && group.is_empty())
            })
            .collect();
        self.apply_changes(changes, None, datapath)
    }

    /// Replaces the objects of these services and brings the datapath to the
    /// result. `source_problems`, when given, replaces the source's list.
    pub fn apply_changes(
        &mut self,
        changes: Vec<(ServiceRef, Group)>,
        source_problems: Option<Vec<String>>,
        datapath: &mut impl KernelMaps,
    ) -> Result<Report, DatapathError> {
        let started = Instant::now();
        let delta = self.model.replace(changes, &self.policy, &self.runtime);
        self.finish(delta, started, source_problems, datapath)
    }

    /// Replaces the cluster's Services by ClusterIP; the services claiming an
    /// address whose Service changed are recomputed.
    pub fn set_cluster_ips(
        &mut self,
        cluster_ips: ClusterIps,
        datapath: &mut impl KernelMaps,
    ) -> Result<Report, DatapathError> {
        let started = Instant::now();
        let delta = self.model.set_cluster_ips(cluster_ips, &self.policy, &self.runtime);
        self.finish(delta, started, None, datapath)
    }

    /// Recomputes every service (after a policy or health change, and as the
    /// periodic check that the incremental state is what a full pass gives).
    pub fn recompute_all(&mut self, datapath: &mut impl KernelMaps) -> Result<Report, DatapathError> {
        let started = Instant::now();
        let delta = self.model.recompute_all(&self.policy, &self.runtime);
        self.finish(delta, started, None, datapath)
    }

    /// Slot budget: when the desired tables do not fit, every table is sized
    /// for fewer slots per backend (the same step for all, so shares stay
    /// even); on a full pass it grows back once it fits with room to spare.
    fn fit_budget(&mut self, may_grow: bool) -> Option<Delta> {
        let budget = slot_budget(self.applied.capacity().slots);
        let current = self.runtime.slots_per_backend();
        let over = self.model.slots() > budget;
        let may_grow = may_grow && current < maglev::SLOTS_PER_BACKEND;
        if !over && !may_grow {
            return None;
        }
        let counts: Vec<usize> = self.model.state().frontends.values().map(|f| f.weights.len()).collect();
        let max = self.policy.max_table_size;
        let (per, total) = if over {
            maglev::fit_budget(&counts, max, budget)
        } else {
            // Growing back needs a fifth of the budget spare, so that a few
            // services more do not shrink every table again.
            let (per, total) = maglev::fit_budget(&counts, max, budget / 5 * 4);
            if per <= current {
                return None;
            }
            (per, total)
        };
        if per == current {
            warn!(
                slots_per_backend = per,
                needed = total,
                budget,
                "the selection tables do not fit even at the smallest size; raise --max-selection-slots"
            );
            return None;
        }
        self.runtime.slots_per_backend = per;
        let delta = Delta { frontends: self.model.resize_tables(max, per), ..Delta::default() };
        let shrunk: Vec<String> = self
            .model
            .state()
            .frontends
            .iter()
            .filter(|(_, f)| f.table_size < maglev::table_size(f.weights.len(), max))
            .map(|(key, f)| format!("{} {key}", f.service))
            .collect();
        let examples = shrunk.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
        if per < maglev::SLOTS_PER_BACKEND {
            warn!(
                slots_per_backend = per,
                slots = self.model.slots(),
                budget,
                frontends = shrunk.len(),
                examples = %examples,
                "selection slot budget: tables sized down to fit --max-selection-slots (more disruption when a backend changes; see ARCHITECTURE.md)"
            );
        } else {
            info!(slots_per_backend = per, slots = self.model.slots(), "selection tables back to full size");
        }
        Some(delta)
    }

    fn finish(
        &mut self,
        mut delta: Delta,
        started: Instant,
        source_problems: Option<Vec<String>>,
        datapath: &mut impl KernelMaps,
    ) -> Result<Report, DatapathError> {
        let full = delta.services >= self.model.service_count().max(1);
        if let Some(resized) = self.fit_budget(full) {
            delta.frontends.extend(resized.frontends);
            delta.added.extend(resized.added);
            delta.removed.extend(resized.removed);
            delta.services = delta.services.max(resized.services);
        }
        let compute_us = started.elapsed().as_micros() as u64;
        let applying = Instant::now();
        let mut keys = std::mem::take(&mut self.pending);
        keys.extend(delta.frontends.iter().copied());
        // Near a map's size: write nothing, hold the frontends, and ask for
        // larger maps (the agent grows the datapath, then regrows into it).
        let outgrown =
            self.bounds.and_then(|bounds| growth::grown(self.applied.capacity(), self.demand(&keys), bounds));
        if let Some(target) = outgrown {
            info!(from = ?self.applied.capacity(), to = ?target, "the maps must grow");
            self.outgrown = Some(target);
            self.pending = std::mem::take(&mut keys);
        }
        // In chunks: a plan holds each new table's slots until it is written,
        // and at cold start that is every table (40 MB at 10,000 frontends).
        // Each chunk is a complete plan of its frontends, so any prefix of
        // the chunks leaves every frontend switched whole or not at all.
        let mut summary = PlanSummary::default();
        let mut errors = Vec::new();
        let ordered: Vec<FrontendKey> = keys.iter().copied().collect();
        for chunk in ordered.chunks(PLAN_CHUNK) {
            let chunk: BTreeSet<FrontendKey> = chunk.iter().copied().collect();
            let (ops, chunk_errors) = self.applied.plan_in_place(self.model.state(), &chunk);
            summary = summary.plus(PlanSummary::of(&ops));
            errors.extend(chunk_errors);
            if let Some(log) = &mut self.backend_changes {
                for op in &ops {
                    match op {
                        MapOp::PutBackend { id, backend } => log.push((*id, Some(backend.addr()))),
                        MapOp::ClearBackend { id, .. } => log.push((*id, None)),
                        _ => {}
                    }
                }
            }
            if !ops.is_empty()
                && let Err(e) = datapath.apply(&ops)
            {
                self.backend_changes = None;
                // What the kernel holds is now unknown: start again from it, as a
                // restarted agent would, and plan every frontend next pass.
                let kernel = datapath.kernel_state();
                let (applied, _) = Applied::adopt(self.applied.capacity(), &kernel.services, &kernel.backends, |i| {
                    datapath.selection_slot(i)
                });
                self.pending = self.model.state().frontends.keys().chain(applied.keys()).copied().collect();
                self.applied = applied;
                return Err(e);
            }
        }
        if outgrown.is_none() {
            self.generation += 1;
        }
        if delta.services >= 1000 {
            // A big pass (start, resync) frees most of what it parsed and
            // built; glibc keeps freed heap unless asked to give it back.
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
        }
        self.changed.extend(keys.iter().copied());

        // Problems: objects (from the delta), capacity (by frontend), the source.
        let mut new_problems = BTreeSet::new();
        let mut resolved = Vec::new();
        for text in &delta.removed {
            if self.reported.remove(text) {
                resolved.push(text.clone());
            }
        }
        let mut object_errors = Vec::new();
        for error in delta.added {
            let text = error.to_string();
            if self.reported.insert(text.clone()) {
                new_problems.insert(text);
                object_errors.push(error);
            }
        }
        let mut capacity_now: BTreeMap<FrontendKey, String> = BTreeMap::new();
        for error in &errors {
            capacity_now.insert(error.frontend, error.to_string());
        }
        for key in &keys {
            let before = self.capacity.remove(key);
            let now = capacity_now.remove(key);
            match (before, now) {
                (Some(b), Some(n)) if b == n => {
                    self.capacity.insert(*key, n);
                }
                (before, now) => {
                    if let Some(b) = before {
                        resolved.push(b);
                    }
                    if let Some(n) = now {
                        new_problems.insert(n.clone());
                        self.capacity.insert(*key, n);
                    }
                }
            }
        }
        if let Some(problems) = source_problems {
            let problems: BTreeSet<String> = problems.into_iter().collect();
            resolved.extend(self.source_problems.difference(&problems).cloned());
            new_problems.extend(problems.difference(&self.source_problems).cloned());
            self.source_problems = problems;
        }
        for problem in &new_problems {
            warn!(problem = %problem, "object skipped");
        }
        for fixed in &resolved {
            info!(problem = %fixed, "resolved");
        }

        let (held_read, held_compute) = std::mem::take(&mut self.held_us);
        let read_us = std::mem::take(&mut self.read_us) + held_read;
        let compute_us = compute_us + held_compute;
        if outgrown.is_some() {
            self.held_us = (read_us, compute_us);
        }
        let report = Report {
            generation: self.generation,
            read_us,
            compute_us,
            apply_us: applying.elapsed().as_micros() as u64,
            frontends: self.applied.frontend_count(),
            backends: self.applied.backend_count(),
            services: delta.services,
            summary,
            // Listing every problem costs a copy of each: full passes only.
            problems: if full { self.problems() } else { Vec::new() },
            object_errors,
            new_problems,
        };
        if summary != PlanSummary::default() || (report.generation == 1 && outgrown.is_none()) {
            info!(
                generation = report.generation,
                frontends = report.frontends,
                backends = report.backends,
                services = report.services,
                services_written = summary.services_written,
                services_deleted = summary.services_deleted,
                backends_added = summary.backends_added,
                backends_removed = summary.backends_removed,
                skipped = self.problem_count(),
                read_us = report.read_us,
                compute_us = report.compute_us,
                apply_us = report.apply_us,
                "reconciled"
            );
        }
        Ok(report)
    }

    /// Every current problem: invalid objects, frontends that do not fit,
    /// the source's own.
    pub fn problems(&self) -> Vec<String> {
        self.reported.iter().chain(self.capacity.values()).chain(&self.source_problems).cloned().collect()
    }

    fn problem_count(&self) -> usize {
        self.reported.len() + self.capacity.len() + self.source_problems.len()
    }

    /// Passive health's verdict; true when it differs from the last one.
    pub fn set_health(&mut self, ejected: BTreeSet<BackendAddr>, probing: BTreeSet<BackendAddr>) -> bool {
        let changed = ejected != self.runtime.ejected || probing != self.runtime.probing;
        self.runtime.ejected = ejected;
        self.runtime.probing = probing;
        changed
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub fn state(&self) -> &DesiredState {
        self.model.state()
    }

    /// What is programmed, described for people (built on demand: at 100,000
    /// services it is large).
    pub fn inventory(&self) -> Inventory {
        Inventory {
            schema: crate::inventory::SCHEMA,
            layout_version: mcs_common::LAYOUT_VERSION,
            generation: Some(self.generation),
            frontends: self.frontend_infos().collect(),
        }
    }

    /// The programmed frontends as [`Inventory`] describes them, each built
    /// when it is reached (a scrape walks them once). Frontends that did not
    /// fit (capacity) are left out: they are not programmed.
    pub fn frontend_infos(&self) -> impl Iterator<Item = FrontendInfo> + '_ {
        let state = self.model.state();
        state
            .frontends
            .iter()
            .filter_map(|(key, frontend)| Inventory::frontend(key, frontend, &self.applied, &self.runtime))
    }

    /// Passes completed so far.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Backend ids handed out (with their address) or freed since the last
    /// call, in order; `None` when the caller must read them all again
    /// ([`Applied::backends`]).
    pub fn take_backend_changes(&mut self) -> Option<Vec<(u32, Option<BackendAddr>)>> {
        self.backend_changes.replace(Vec::new())
    }

    /// Frontends written, rewritten or deleted since the last call.
    pub fn take_changed(&mut self) -> BTreeSet<FrontendKey> {
        std::mem::take(&mut self.changed)
    }

    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    /// (kind, valid, invalid) objects.
    pub fn objects(&self) -> [(&'static str, u64, u64); 2] {
        let [imports, bad_imports, slices, bad_slices] = self.model.counts();
        [("ServiceImport", imports - bad_imports, bad_imports), ("EndpointSlice", slices - bad_slices, bad_slices)]
    }

    /// Locality can change at run time (the Node's labels, the ClusterProperty).
    /// True when it changed: a full recompute is due.
    pub fn set_policy(&mut self, policy: Policy) -> bool {
        let changed = policy != self.policy;
        self.policy = policy;
        changed
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Selection slots per backend the tables are sized for now.
    pub fn slots_per_backend(&self) -> u32 {
        self.runtime.slots_per_backend()
    }
}

#[cfg(test)]
pub(crate) mod memory;

#[cfg(test)]
mod tests {
    //! Passes against maps held in memory: what is written, what is not, and
    //! how a write that fails half way is recovered, with no kernel.

    use super::{memory::Maps, *};
    use crate::{model::Origin, plan::Capacity, source::manifests::parse_documents};

    fn snapshot(pods: &[&str]) -> Snapshot {
        let (snapshot, errors) = parse_documents(&Origin("test.yaml".into()), &manifest(pods));
        assert!(errors.is_empty(), "{errors:?}");
        snapshot
    }

    fn manifest(pods: &[&str]) -> String {
        let endpoints: String =
            pods.iter().map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n")).collect();
        format!(
            r#"apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata: {{name: web, namespace: demo}}
spec:
  type: ClusterSetIP
  ips: ["198.18.0.10"]
  ports: [{{name: http, port: 80, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-west
  namespace: demo
  labels: {{multicluster.kubernetes.io/service-name: web, multicluster.kubernetes.io/source-cluster: west}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
{endpoints}"#
        )
    }

    fn addrs(pods: &[&str]) -> BTreeSet<BackendAddr> {
        pods.iter().map(|ip| BackendAddr { ip: ip.parse().unwrap(), port: 8080 }).collect()
    }

    fn reconciler() -> Reconciler {
        let capacity = Capacity { services: 16, backends: 64, slots: 1 << 16 };
        Reconciler::new(Applied::new(capacity), Policy::default())
    }

    #[test]
    fn a_pass_writes_the_table_and_an_unchanged_state_writes_nothing() {
        let (mut reconciler, mut maps) = (reconciler(), Maps::default());
        let pods = ["10.1.0.1", "10.1.0.2", "10.1.0.3"];
        reconciler.apply_snapshot(&snapshot(&pods), Vec::new(), &mut maps).expect("written");
        assert_eq!(maps.table("198.18.0.10"), addrs(&pods), "every slot names a ready pod, and every pod has slots");
        let writes = maps.writes;
        let report = reconciler.apply_snapshot(&snapshot(&pods), Vec::new(), &mut maps).expect("written");
        assert_eq!((maps.writes, report.summary), (writes, PlanSummary::default()), "nothing changed, nothing written");

        // One pod leaves: the table no longer names it, and its id is freed.
        reconciler.apply_snapshot(&snapshot(&pods[..2]), Vec::new(), &mut maps).expect("written");
        assert_eq!(maps.table("198.18.0.10"), addrs(&pods[..2]));
        assert_eq!(maps.backends.len(), 2);
    }

    #[test]
    fn a_first_read_made_while_the_datapath_loads_is_applied_once_with_later_changes_on_top() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.yaml");
        let primed = |pods: &[&str]| {
            std::fs::write(&file, manifest(pods)).unwrap();
            let mut cache = manifests::Cache::default();
            let read = cache.read_dir(dir.path()).expect("readable");
            let mut reconciler = reconciler();
            reconciler.prime_manifests(cache, read, 7);
            reconciler
        };
        // The first full pass applies it, without reading again.
        let (mut reconciler, mut maps) = (primed(&["10.1.0.1", "10.1.0.2"]), Maps::default());
        let report = reconciler.from_manifests(dir.path(), &mut maps).expect("written");
        assert_eq!((maps.table("198.18.0.10"), report.read_us), (addrs(&["10.1.0.1", "10.1.0.2"]), 7));
        std::fs::write(&file, manifest(&["10.1.0.3"])).unwrap();
        reconciler.from_manifests(dir.path(), &mut maps).expect("written");
        assert_eq!(maps.table("198.18.0.10"), addrs(&["10.1.0.3"]), "the next full pass reads");

        // A change the watcher names before the first full pass: both apply.
        let (mut reconciler, mut maps) = (primed(&["10.1.0.1"]), Maps::default());
        std::fs::write(
            dir.path().join("other.yaml"),
            manifest(&["10.1.0.4"]).replace("198.18.0.10", "198.18.0.11").replace(": web", ": other"),
        )
        .unwrap();
        reconciler.from_manifest_paths(&[dir.path().join("other.yaml")], &mut maps).expect("written");
        assert_eq!(maps.table("198.18.0.10"), addrs(&["10.1.0.1"]));
        assert_eq!(maps.table("198.18.0.11"), addrs(&["10.1.0.4"]));
    }

    #[test]
    fn a_write_that_fails_half_way_is_read_back_and_finished_by_the_next_pass() {
        let (mut reconciler, mut maps) = (reconciler(), Maps::default());
        let pods = ["10.1.0.1", "10.1.0.2"];
        reconciler.apply_snapshot(&snapshot(&pods), Vec::new(), &mut maps).expect("written");
        let grown = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"];
        maps.fail = true;
        assert!(reconciler.apply_snapshot(&snapshot(&grown), Vec::new(), &mut maps).is_err());
        // The old table still serves whole: the service entry flips last.
        assert_eq!(maps.table("198.18.0.10"), addrs(&pods));
        // The same objects again: nothing new to compute, but the frontend is
        // planned anew from what the maps hold, and finished.
        reconciler.apply_snapshot(&snapshot(&grown), Vec::new(), &mut maps).expect("written");
        assert_eq!(maps.table("198.18.0.10"), addrs(&grown));
    }

    const SMALL: Capacity = Capacity { services: 16, backends: 8, slots: 1 << 16 };
    const SEVEN: [&str; 7] = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6", "10.1.0.7"];

    /// Maps of 7 backend ids that may grow, and a pass of 7 backends: past
    /// 7/8 of them.
    fn outgrown() -> (Reconciler, Maps) {
        let mut reconciler = Reconciler::new(Applied::new(SMALL), Policy::default());
        reconciler.set_growth(Some(Capacity { services: 1024, backends: 1 << 20, slots: 1 << 20 }));
        let mut maps = Maps::default();
        reconciler.apply_snapshot(&snapshot(&SEVEN), Vec::new(), &mut maps).expect("held");
        (reconciler, maps)
    }

    #[test]
    fn a_state_that_outgrows_the_maps_is_held_and_programmed_whole_into_larger_ones() {
        let (small, pods) = (SMALL, SEVEN);
        // 7 backends pass 7/8 of the 7 ids: nothing is written, growth is asked.
        let (mut reconciler, maps) = outgrown();
        assert_eq!(maps.writes, 0, "nothing half-applied into maps about to be replaced");
        let target = reconciler.take_outgrown().expect("the backends must grow");
        assert_eq!(target, Capacity { backends: 65_536, ..small });
        assert_eq!(reconciler.take_outgrown(), None, "asked once");

        // Into the larger (empty) maps: every frontend, whole.
        let mut grown = Maps::default();
        reconciler.regrow(target, &mut grown).expect("programmed");
        assert_eq!(grown.table("198.18.0.10"), addrs(&pods));
        assert_eq!(reconciler.applied().capacity(), target);
        assert_eq!(reconciler.take_backend_changes(), None, "every id is new: passive health starts afresh");
        // A change afterwards is planned against the larger maps as usual.
        reconciler.apply_snapshot(&snapshot(&pods[..2]), Vec::new(), &mut grown).expect("written");
        assert_eq!(grown.table("198.18.0.10"), addrs(&pods[..2]));
    }

    #[test]
    fn when_growth_fails_the_held_state_goes_to_the_current_maps_as_far_as_it_fits() {
        let (small, pods) = (SMALL, SEVEN);
        let (mut reconciler, mut maps) = outgrown();
        let target = reconciler.take_outgrown().expect("asked");
        // The larger maps fail half way: back to the old allocation.
        let mut grown = Maps { fail: true, ..Maps::default() };
        assert!(reconciler.regrow(target, &mut grown).is_err());
        assert_eq!(reconciler.applied().capacity(), small);
        // The next pass programs the held frontend into the current maps
        // (seven backends fit in seven ids), and asks for no growth again.
        reconciler.recompute_all(&mut maps).expect("written");
        assert_eq!(reconciler.take_outgrown(), None, "growth stops at the capacity it failed from");
        assert_eq!(maps.table("198.18.0.10"), addrs(&pods));
    }

    #[test]
    fn tables_that_fit_once_sized_down_do_not_grow_the_slots() {
        let capacity = Capacity { services: 16, backends: 64, slots: 4096 };
        let mut reconciler = Reconciler::new(Applied::new(capacity), Policy::default());
        reconciler.set_growth(Some(Capacity { services: 1024, backends: 1 << 20, slots: 1 << 26 }));
        let mut maps = Maps::default();
        let pods = ["10.1.0.1", "10.1.0.2", "10.1.0.3"];
        reconciler.apply_snapshot(&snapshot(&pods), Vec::new(), &mut maps).expect("written");
        assert_eq!(reconciler.take_outgrown(), None, "the slot budget sizes the table down instead");
        let (_, value) = maps.services.iter().next().expect("programmed");
        assert!(value.slot_count < maglev::table_size(3, maglev::DEFAULT_MAX_TABLE_SIZE), "sized down");
        assert_eq!(maps.table("198.18.0.10"), addrs(&pods));
    }
}
