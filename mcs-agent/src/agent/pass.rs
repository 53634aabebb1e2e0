//! One reconcile pass: read what the source says changed, bring the
//! datapath to it, and offer new problems for Kubernetes Events.

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf};

use tracing::info;

use super::{schedule::Due, sources::Source};
use crate::{
    datapath::DatapathError,
    desired::{ObjectError, Policy},
    events::{EventSink, Problem},
    reconcile::{KernelMaps, Reconciler},
};

#[cfg(test)]
mod tests;

/// One pass: read the source, bring the datapath to it, report new problems
/// (as Kubernetes Events too, in Kubernetes mode).
pub fn reconcile(
    source: &Source,
    flags: &Policy,
    node_addresses: BTreeSet<IpAddr>,
    reconciler: &mut Reconciler,
    datapath: &mut impl KernelMaps,
    events: Option<&EventSink>,
    due: Due,
) -> Result<(), DatapathError> {
    let mut policy = flags.clone();
    policy.node_addresses = node_addresses;
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
            // Only the services the watches named, when no full pass is due:
            // a regroup of every object is O(objects) per change.
            let some = match due.full {
                true => None,
                false if due.services.is_empty() => Some(Vec::new()),
                false => kube.groups_of(&due.services),
            };
            let mut report = match some {
                Some(groups) if groups.is_empty() => Default::default(),
                Some(groups) => reconciler.apply_some_groups(groups, datapath)?,
                None => {
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
                }
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

/// This network namespace's addresses: none may become a ClusterSetIP.
pub fn local_addresses() -> BTreeSet<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let address = a.address?;
            match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
                (_, Some(v6)) => Some(IpAddr::V6(v6.ip())),
                _ => None,
            }
        })
        .collect()
}
