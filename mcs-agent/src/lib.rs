//! mcs-agent: the Kubernetes MCS ClusterSetIP datapath, as a library for the
//! binary, the integration tests and the benchmarks.
//!
//! Data flows one way: a source produces a [`model::Snapshot`];
//! [`desired::compute`] decides the frontends; [`plan::Applied::plan`] turns
//! the change into ordered map writes; [`datapath::Datapath::apply`] executes them.

pub mod agent;
pub mod batch;
pub mod cli;
pub mod commands;
pub mod conntrack;
pub mod datapath;
pub mod desired;
pub mod events;
pub mod growth;
pub mod health;
pub mod inspect;
pub mod inventory;
pub mod locality;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod outlier;
pub mod plan;
pub mod reconcile;
pub mod source;
pub mod terminate;
#[cfg(test)]
mod testing;

/// Lowers the calling thread to nice 19. Background work (the manifest
/// resync walk, the conntrack collector) then yields the CPUs to the
/// reconcile loop: on a small node a change must not wait behind it.
/// Best effort: without the permission the thread keeps its priority.
pub fn background_thread() {
    // SAFETY: plain syscalls on the calling thread; Linux's setpriority
    // with a thread id sets that thread's nice value.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}
