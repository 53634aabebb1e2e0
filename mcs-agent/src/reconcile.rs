//! The level-triggered loop: on any change, recompute everything from the
//! whole snapshot and apply the difference.

use std::{collections::BTreeSet, path::Path, time::Instant};

use tracing::{info, warn};

use crate::{
    datapath::{Datapath, DatapathError},
    desired::{self, BackendAddr, DesiredState, ObjectError, Policy, Runtime},
    inventory::Inventory,
    model::Snapshot,
    plan::{Applied, PlanSummary},
    source::manifests,
};

/// Outcome of one pass, for logs and tests.
#[derive(Debug, Default)]
pub struct Report {
    pub generation: u64,
    pub frontends: usize,
    pub backends: usize,
    pub summary: PlanSummary,
    /// Time spent reading and parsing the source (manifest mode).
    pub read_us: u64,
    /// Time spent deciding the desired state (locality, weights, Maglev tables).
    pub compute_us: u64,
    /// Time spent planning and writing the maps.
    pub apply_us: u64,
    pub problems: Vec<String>,
    /// Invalid objects, structured (for Kubernetes Events).
    pub object_errors: Vec<ObjectError>,
    /// Problems not reported by the previous pass.
    pub new_problems: BTreeSet<String>,
}

pub struct Reconciler {
    applied: Applied,
    policy: Policy,
    generation: u64,
    /// Problems already logged, so a periodic resync does not repeat them.
    reported: BTreeSet<String>,
    /// Timings of the pass in progress, reported with it.
    read_us: u64,
    compute_us: u64,
    /// Parsed manifest files, re-read only when they change.
    manifests: manifests::Cache,
    /// VIP holders and passive health, fed to every pass.
    runtime: Runtime,
    /// What is programmed, for people (metrics labels, `inspect`).
    inventory: Inventory,
    inventory_changed: bool,
    /// Objects seen by the last pass: (kind, valid, invalid).
    objects: [(&'static str, u64, u64); 2],
}

impl Reconciler {
    pub fn new(applied: Applied, policy: Policy) -> Self {
        Self {
            applied,
            policy,
            generation: 0,
            reported: BTreeSet::new(),
            read_us: 0,
            compute_us: 0,
            manifests: manifests::Cache::default(),
            runtime: Runtime::default(),
            inventory: Inventory::default(),
            inventory_changed: false,
            objects: [("ServiceImport", 0, 0), ("EndpointSlice", 0, 0)],
        }
    }

    /// Reads the manifests directory and brings the datapath to it.
    pub fn from_manifests(&mut self, dir: &Path, datapath: &mut Datapath) -> Result<Report, DatapathError> {
        let started = Instant::now();
        let (snapshot, problems) = match self.manifests.read_dir(dir) {
            Ok(read) => read,
            Err(e) => {
                // An unreadable directory must not wipe the datapath: keep the last good state.
                warn!(error = %e, "manifests unreadable; keeping the last programmed state");
                return Ok(Report { generation: self.generation, problems: vec![e.to_string()], ..Report::default() });
            }
        };
        self.read_us = started.elapsed().as_micros() as u64;
        self.apply_snapshot(&snapshot, problems, datapath)
    }

    pub fn apply_snapshot(
        &mut self,
        snapshot: &Snapshot,
        mut problems: Vec<String>,
        datapath: &mut Datapath,
    ) -> Result<Report, DatapathError> {
        let started = Instant::now();
        let (state, object_errors) = desired::compute_with(snapshot, &self.policy, &self.runtime);
        self.runtime.held = state.frontends.iter().map(|(key, f)| (key.vip, f.service.clone())).collect();
        let invalid = |kind| object_errors.iter().filter(|e| e.kind == kind).count() as u64;
        let (imports, slices) = (snapshot.imports.len() as u64, snapshot.slices.len() as u64);
        self.objects = [
            ("ServiceImport", imports.saturating_sub(invalid("ServiceImport")), invalid("ServiceImport")),
            ("EndpointSlice", slices.saturating_sub(invalid("EndpointSlice")), invalid("EndpointSlice")),
        ];
        self.compute_us = started.elapsed().as_micros() as u64;
        problems.extend(object_errors.iter().map(ToString::to_string));
        let mut report = self.apply_state(&state, problems, datapath)?;
        report.object_errors = object_errors;
        Ok(report)
    }

    pub fn apply_state(
        &mut self,
        state: &DesiredState,
        mut problems: Vec<String>,
        datapath: &mut Datapath,
    ) -> Result<Report, DatapathError> {
        let started = Instant::now();
        let plan = self.applied.plan(state);
        problems.extend(plan.errors.iter().map(ToString::to_string));
        let summary = plan.summary();
        if !plan.ops.is_empty() {
            // On failure the old Applied stays: the next pass re-plans against it and
            // rewrites whatever this one left half done.
            datapath.apply(&plan.ops)?;
        }
        self.applied = plan.next;
        self.generation += 1;
        if summary != PlanSummary::default() || self.generation == 1 {
            self.inventory = Inventory::build(state, &self.applied, &self.runtime);
            self.inventory_changed = true;
        }

        let current: BTreeSet<String> = problems.iter().cloned().collect();
        let new_problems: BTreeSet<String> = current.difference(&self.reported).cloned().collect();
        for problem in &new_problems {
            warn!(problem = %problem, "object skipped");
        }
        for fixed in self.reported.difference(&current) {
            info!(problem = %fixed, "resolved");
        }
        self.reported = current;

        let (read_us, compute_us) = (std::mem::take(&mut self.read_us), std::mem::take(&mut self.compute_us));
        let report = Report {
            generation: self.generation,
            read_us,
            compute_us,
            apply_us: started.elapsed().as_micros() as u64,
            frontends: self.applied.frontend_count(),
            backends: self.applied.backend_count(),
            summary,
            problems,
            object_errors: Vec::new(),
            new_problems,
        };
        if summary != PlanSummary::default() || report.generation == 1 {
            info!(
                generation = report.generation,
                frontends = report.frontends,
                backends = report.backends,
                services_written = summary.services_written,
                services_deleted = summary.services_deleted,
                backends_added = summary.backends_added,
                backends_removed = summary.backends_removed,
                skipped = report.problems.len(),
                read_us = report.read_us,
                compute_us = report.compute_us,
                apply_us = report.apply_us,
                "reconciled"
            );
        }
        Ok(report)
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

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// True once after each pass that changed what is programmed.
    pub fn take_inventory_changed(&mut self) -> bool {
        std::mem::take(&mut self.inventory_changed)
    }

    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    /// (kind, valid, invalid) objects of the last pass.
    pub fn objects(&self) -> &[(&'static str, u64, u64)] {
        &self.objects
    }

    /// Locality can change at run time (the Node's labels, the ClusterProperty).
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }
}
