//! Memory by structure: the agent's control-plane structures built in this
//! process from the benchmark's manifests, with a counting allocator, so a
//! regression in the agent's own memory names the structure that grew.
//!
//! The stages are the agent's own: the manifest cache parses the files, the
//! model computes the desired state, the reconciler plans it (ids, tables)
//! against maps that take the writes and keep nothing, passive health builds
//! its view, and `inspect` or a scrape builds an inventory for the answer.
//! Heap only: the process's RSS adds allocator retention and the mmapped maps
//! (the control-plane table reports both).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    path::Path,
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
    time::Instant,
};

use anyhow::{Context as _, Result};
use mcs_agent::{
    agent::passive::{HealthCounters, PassiveHealth},
    datapath::{DatapathError, KernelState},
    desired::{Model, Policy, Runtime},
    outlier::OutlierConfig,
    plan::{Applied, Capacity, MapOp},
    reconcile::{KernelMaps, Reconciler},
    source::manifests::Cache,
};
use mcs_common::Health;
use serde::Serialize;

/// Counts the bytes held and the most held since the last [`reset_peak`].
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every call goes to the system allocator unchanged; the counters
// only observe the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> usize {
    LIVE.load(Relaxed)
}

fn reset_peak() -> usize {
    let now = live();
    PEAK.store(now, Relaxed);
    now
}

/// Maps that take every write and hold nothing: the plan's own memory is
/// what is measured.
struct Discard;

impl KernelMaps for Discard {
    fn apply(&mut self, _: &[MapOp]) -> Result<(), DatapathError> {
        Ok(())
    }

    fn kernel_state(&self) -> KernelState {
        KernelState { services: Vec::new(), backends: Vec::new() }
    }

    fn selection_slot(&self, _: u32) -> Option<u32> {
        None
    }
}

/// Every backend id counted, none moving.
struct Quiet(usize);

impl HealthCounters for Quiet {
    fn health(&self, id: u32) -> Option<Health> {
        ((id as usize) < self.0).then(Health::default)
    }

    fn health_entries(&self) -> usize {
        self.0
    }
}

/// One structure's live heap after it is built.
#[derive(Clone, Debug, Serialize)]
pub struct Part {
    pub structure: &'static str,
    pub what: &'static str,
    pub bytes: usize,
    pub per_service: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Breakdown {
    pub services: usize,
    pub endpoints_per_service: usize,
    /// Held once the first pass is done, by structure.
    pub parts: Vec<Part>,
    /// Everything the reconciler and passive health hold.
    pub retained: usize,
    /// The most held at once during the first pass.
    pub first_pass_peak: usize,
    /// Built for one `inspect` answer, then dropped.
    pub inventory: usize,
}

/// Builds the structures from the manifests in `dir` (`services` of them).
pub fn measure(dir: &Path, services: usize, endpoints: usize) -> Result<Breakdown> {
    let started = Instant::now();
    let policy = Policy::default();
    let runtime = Runtime::default();
    // Room for every service and endpoint, as the benchmark's agents have.
    let capacity = Capacity {
        services: (services as u32 * 2).max(mcs_common::DEFAULT_MAX_SERVICES),
        backends: ((services * endpoints) as u32 * 2).max(mcs_common::DEFAULT_MAX_BACKENDS),
        slots: mcs_common::DEFAULT_MAX_SELECTION_SLOTS,
    };
    let per = |bytes: usize| bytes as f64 / services as f64;
    let part = |structure, what, bytes: usize| Part { structure, what, bytes, per_service: per(bytes) };

    // The stages on their own: the parsed files, then the desired state.
    let base = reset_peak();
    let mut cache = Cache::default();
    let read = cache.read_dir(dir).context("reading the benchmark's manifests")?;
    let changes = read.changes;
    drop(read.problems);
    let parsed = live() - base;
    let mut model = Model::default();
    let delta = model.replace(changes, &policy, &runtime);
    drop(delta);
    // The groups the model keeps share their objects with the cache.
    let desired = live() - base - parsed;
    drop(model);
    drop(cache);

    // The agent's way, whole: the reconciler holds its own cache and model.
    let base = reset_peak();
    let mut reconciler = Reconciler::new(Applied::new(capacity), policy);
    reconciler.from_manifests(dir, &mut Discard).context("the first pass")?;
    reconciler.take_changed();
    let first_pass_peak = PEAK.load(Relaxed) - base;
    let whole = live() - base;
    let before_view = live();
    let mut passive = PassiveHealth::new(OutlierConfig::default());
    passive.tick(Instant::now(), &Quiet(capacity.backends as usize), &mut reconciler);
    let view = live() - before_view;

    let before_inventory = live();
    let inventory = reconciler.inventory();
    let inventory_bytes = live() - before_inventory;
    drop(inventory);

    let plan = whole.saturating_sub(parsed + desired);
    let parts = vec![
        part("manifest cache", "each file's parsed, validated objects", parsed),
        part("desired state", "each frontend's endpoints, localities, tiers and weights; the model's indexes", desired),
        part("plan", "ids, selection tables and frontends as programmed; pass bookkeeping", plan),
        part("passive health view", "each backend id's address and counters; ready backends per frontend", view),
    ];
    eprintln!("bench: memory by structure at {services} services measured in {:.1?}", started.elapsed());
    drop(passive);
    drop(reconciler);
    Ok(Breakdown {
        services,
        endpoints_per_service: endpoints,
        parts,
        retained: whole + view,
        first_pass_peak,
        inventory: inventory_bytes,
    })
}
