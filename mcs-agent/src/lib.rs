//! mcs-agent: the Kubernetes MCS ClusterSetIP datapath, as a library for the
//! binary, the integration tests and the benchmarks.
//!
//! Data flows one way: a source produces a [`model::Snapshot`];
//! [`desired::compute`] decides the frontends; [`plan::Applied::plan`] turns
//! the change into ordered map writes; [`datapath::Datapath::apply`] executes them.

pub mod batch;
pub mod datapath;
pub mod desired;
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
