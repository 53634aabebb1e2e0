//! Where the datapath's time goes: each mcs-agent program's runs and run
//! time, from the kernel's own statistics (`BPF_ENABLE_STATS`). While any
//! process holds them on, the kernel times every BPF program run, which
//! costs each run two clock reads: the rates are measured without them, and
//! a profiled run of each workload follows, whose rate is not recorded.

use std::{collections::BTreeMap, os::fd::OwnedFd};

use anyhow::{Context as _, Result, bail};
use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};
use serde::Serialize;

use crate::{Key, load::Run};

/// Statistics on for as long as this lives (the kernel counts holders).
struct StatsOn(#[allow(dead_code)] OwnedFd);

/// Run time (ns) and runs by program name, summed over every loaded program
/// of that name: the agent's are all named `mcs_*`.
fn programs() -> BTreeMap<String, (u64, u64)> {
    let mut by_name: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for info in loaded_programs().flatten() {
        let Some(name) = info.name_as_str().filter(|n| n.starts_with("mcs_")) else { continue };
        let entry = by_name.entry(name.to_owned()).or_default();
        entry.0 += u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
        entry.1 += info.run_count();
    }
    by_name
}

/// One program's share of a transaction.
#[derive(Clone, Debug, Serialize)]
pub struct ProgramCost {
    pub program: String,
    /// Runs per transaction (a TCP connection, a request and its answer).
    pub runs_per_op: f64,
    pub ns_per_run: f64,
}

/// What a profiled run's programs cost.
#[derive(Clone, Debug, Serialize)]
pub struct Cost {
    pub transactions: u64,
    pub programs: Vec<ProgramCost>,
    /// All programs' run time per transaction.
    pub bpf_ns_per_op: f64,
}

/// A profiled run of one configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Profile {
    #[serde(flatten)]
    pub key: Key,
    #[serde(flatten)]
    pub cost: Cost,
}

/// Runs `run` with the statistics on, and divides what each program did
/// by the transactions it completed. An error when the kernel keeps no
/// statistics or the run completed nothing: the caller warns and goes on
/// without this profile.
pub fn profile(key: Key, run: impl FnOnce() -> Run) -> Result<Profile> {
    Ok(Profile { key, cost: measure(run)? })
}

/// As [`profile`], for any run.
pub fn measure(run: impl FnOnce() -> Run) -> Result<Cost> {
    let on = StatsOn(enable_stats(Stats::RunTime).context("BPF_ENABLE_STATS (the run-time statistics)")?);
    let before = programs();
    let done = run();
    let after = programs();
    drop(on);
    if done.transactions == 0 {
        bail!("the profiled run completed no transaction ({} errors)", done.errors);
    }
    let ops = done.transactions as f64;
    let programs: Vec<ProgramCost> = after
        .iter()
        .filter_map(|(name, &(ns, runs))| {
            let (ns0, runs0) = before.get(name).copied().unwrap_or_default();
            let (ns, runs) = (ns.saturating_sub(ns0), runs.saturating_sub(runs0));
            (runs > 0).then(|| ProgramCost {
                program: name.clone(),
                runs_per_op: runs as f64 / ops,
                ns_per_run: ns as f64 / runs as f64,
            })
        })
        .collect();
    let bpf_ns_per_op = programs.iter().map(|p| p.runs_per_op * p.ns_per_run).sum();
    Ok(Cost { transactions: done.transactions, programs, bpf_ns_per_op })
}
