//! Sources turn the outside world into a [`crate::model::Snapshot`] and a
//! "something changed" signal. Standalone mode reads a manifests directory.

pub mod kube;
pub mod links;
pub mod manifests;
