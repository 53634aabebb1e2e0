//! Writes MCS manifests the way an MCS controller would shape them: one
//! ServiceImport, one EndpointSlice per source cluster.

use std::{fmt::Write as _, fs, net::Ipv4Addr, path::Path};

/// (name, port, protocol)
pub type Port<'a> = (&'a str, u16, &'a str);

pub fn service_import(namespace: &str, name: &str, vip: Ipv4Addr, ports: &[Port<'_>]) -> String {
    service_import_with(namespace, name, vip, ports, &[], "")
}

/// With annotations and extra `spec` lines (each indented by two spaces).
pub fn service_import_with(
    namespace: &str,
    name: &str,
    vip: Ipv4Addr,
    ports: &[Port<'_>],
    annotations: &[(&str, &str)],
    spec_extra: &str,
) -> String {
    let mut meta = String::new();
    if !annotations.is_empty() {
        meta.push_str("  annotations:\n");
        for (key, value) in annotations {
            let _ = writeln!(meta, "    {key}: \"{value}\"");
        }
    }
    let mut yaml = format!(
        "apiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceImport\nmetadata:\n  name: {name}\n  namespace: {namespace}\n{meta}spec:\n  type: ClusterSetIP\n  ips: [\"{vip}\"]\n{spec_extra}  ports:\n"
    );
    for (port_name, port, protocol) in ports {
        let _ = writeln!(yaml, "  - {{name: {port_name}, port: {port}, protocol: {protocol}}}");
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
        let _ = writeln!(yaml, "- {{name: {port_name}, port: {port}, protocol: {protocol}}}");
    }
    yaml.push_str("endpoints:\n");
    if endpoints.is_empty() {
        yaml.push_str("[]\n");
    }
    for (ip, ready) in endpoints {
        let _ = writeln!(yaml, "- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}}}");
    }
    yaml
}

/// An endpoint with its locality.
pub struct ZonedEndpoint<'a> {
    pub ip: Ipv4Addr,
    pub ready: bool,
    pub zone: &'a str,
}

/// A slice whose endpoints carry zones, optionally labelled with a region.
pub fn endpoint_slice_zoned(
    namespace: &str,
    service: &str,
    cluster: &str,
    region: Option<&str>,
    ports: &[Port<'_>],
    endpoints: &[ZonedEndpoint<'_>],
) -> String {
    let plain: Vec<(Ipv4Addr, bool)> = endpoints.iter().map(|e| (e.ip, e.ready)).collect();
    let mut yaml = endpoint_slice(namespace, service, cluster, ports, &plain);
    if let Some(region) = region {
        yaml = yaml.replacen("  labels:\n", &format!("  labels:\n    topology.kubernetes.io/region: {region}\n"), 1);
    }
    for e in endpoints {
        let line = format!("- addresses: [\"{}\"]\n", e.ip);
        yaml = yaml.replacen(&line, &format!("{line}  zone: {}\n", e.zone), 1);
    }
    yaml
}

/// Replaces `dir/name` atomically, so the agent never reads half a file.
pub fn write(dir: &Path, name: &str, contents: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, contents).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    fs::rename(&tmp, dir.join(name)).unwrap_or_else(|e| panic!("renaming into {}: {e}", dir.display()));
}

pub fn remove(dir: &Path, name: &str) {
    fs::remove_file(dir.join(name)).unwrap_or_else(|e| panic!("removing {name}: {e}"));
}

/// A dual-stack ServiceImport in namespace `demo`: `ips` its IPv4 and IPv6
/// ClusterSetIPs, `ports` a YAML flow sequence of its ports.
pub fn dual_stack_import(name: &str, ips: [std::net::IpAddr; 2], ports: &str) -> String {
    let [a, b] = ips;
    format!(
        r#"apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata: {{name: {name}, namespace: demo}}
spec:
  type: ClusterSetIP
  ips: ["{a}", "{b}"]
  ipFamilies: [IPv4, IPv6]
  ports: {ports}
"#
    )
}

/// An EndpointSlice of one family (`IPv4`, `IPv6`) in namespace `demo`,
/// every address ready; `ports` a YAML flow sequence.
pub fn family_slice(
    name: &str,
    service: &str,
    cluster: &str,
    family: &str,
    ports: &str,
    ips: &[std::net::IpAddr],
) -> String {
    let endpoints: Vec<String> = ips.iter().map(|ip| format!(r#"{{addresses: ["{ip}"]}}"#)).collect();
    format!(
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: demo
  labels: {{multicluster.kubernetes.io/service-name: {service}, multicluster.kubernetes.io/source-cluster: {cluster}}}
addressType: {family}
ports: {ports}
endpoints: [{}]
"#,
        endpoints.join(", ")
    )
}
