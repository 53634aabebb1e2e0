//! Writes MCS manifests the way an MCS controller would shape them: one
//! ServiceImport, one EndpointSlice per source cluster.

use std::{fmt::Write as _, fs, net::Ipv4Addr, path::Path};

/// (name, port, protocol)
pub type Port<'a> = (&'a str, u16, &'a str);

pub fn service_import(namespace: &str, name: &str, vip: Ipv4Addr, ports: &[Port<'_>]) -> String {
    let mut yaml = format!(
        "apiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceImport\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  type: ClusterSetIP\n  ips: [\"{vip}\"]\n  ports:\n"
    );
    for (port_name, port, protocol) in ports {
        let _ = writeln!(
            yaml,
            "  - {{name: {port_name}, port: {port}, protocol: {protocol}}}"
        );
    }
    yaml
}

/// `endpoints`: (address, ready)
pub fn endpoint_slice(
    namespace: &str,
    service: &str,
    cluster: &str,
    ports: &[Port<'_>],
    endpoints: &[(Ipv4Addr, bool)],
) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-{cluster}\n  namespace: {namespace}\n  labels:\n    multicluster.kubernetes.io/service-name: {service}\n    multicluster.kubernetes.io/source-cluster: {cluster}\naddressType: IPv4\nports:\n"
    );
    for (port_name, port, protocol) in ports {
        let _ = writeln!(
            yaml,
            "- {{name: {port_name}, port: {port}, protocol: {protocol}}}"
        );
    }
    yaml.push_str("endpoints:\n");
    if endpoints.is_empty() {
        yaml.push_str("[]\n");
    }
    for (ip, ready) in endpoints {
        let _ = writeln!(
            yaml,
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}}}"
        );
    }
    yaml
}

/// Replaces `dir/name` atomically, so the agent never reads half a file.
pub fn write(dir: &Path, name: &str, contents: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, contents).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    fs::rename(&tmp, dir.join(name))
        .unwrap_or_else(|e| panic!("renaming into {}: {e}", dir.display()));
}

pub fn remove(dir: &Path, name: &str) {
    fs::remove_file(dir.join(name)).unwrap_or_else(|e| panic!("removing {name}: {e}"));
}
