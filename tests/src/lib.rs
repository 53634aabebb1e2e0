//! The netns lab: namespaces, a flat multi-cluster topology, the agent as a
//! process, backend servers and clients. Shared by the datapath tests,
//! `cargo xtask demo` and the benchmarks so that all three build the same thing.
//!
//! Everything lives in namespaces this process creates under unique names, and
//! every guard deletes exactly what it created, on panic too.

pub mod agent;
pub mod bpffs;
pub mod cgroup;
pub mod disruption;
pub mod ethtool;
pub mod fakeapi;
pub mod frame;
pub mod manifests;
pub mod netns;
pub mod packet;
pub mod peer;
pub mod testrun;
pub mod topology;
pub mod traffic;
