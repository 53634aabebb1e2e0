//! Objects -> desired datapath state. Pure: no I/O, no clocks.
//!
//! A ServiceImport of type ClusterSetIP becomes one frontend per port
//! (`VIP:port/protocol`). Each frontend's backends are the ready endpoints of
//! the EndpointSlices labelled with the import's name, at the slice port that
//! has the same name and protocol as the import port.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use thiserror::Error;

use crate::model::{
    LABEL_SERVICE_NAME, LABEL_SOURCE_CLUSTER, Origin, ServiceImport, Snapshot, object_ref,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => mcs_common::IPPROTO_TCP,
            Protocol::Udp => mcs_common::IPPROTO_UDP,
        }
    }

    /// Kubernetes spelling; absent or empty means TCP.
    fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.unwrap_or("") {
            "" | "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Err(
                "protocol SCTP is not supported by the mcs-agent datapath (TCP and UDP are)"
                    .to_owned(),
            ),
            other => Err(format!(
                "unknown protocol {other:?} (expected TCP, UDP or SCTP)"
            )),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// `ClusterSetIP:port/protocol`, what a client dials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.vip, self.port, self.protocol)
    }
}

/// A pod `IP:port` that serves a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub addr: BackendAddr,
    /// `multicluster.kubernetes.io/source-cluster` of its slice, if labelled.
    pub cluster: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// `namespace/name` of the ServiceImport.
    pub service: String,
    /// The import port's name (empty when unnamed).
    pub port_name: String,
    /// Sorted by address, no duplicates.
    pub backends: Vec<DesiredBackend>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
}

/// A rejected object: which one, where it came from, and which field is wrong.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{origin}{kind} {object}: {field}: {message}")]
pub struct ObjectError {
    /// `file (document n): ` in standalone mode, empty for API objects.
    pub origin: String,
    pub kind: &'static str,
    /// `namespace/name`
    pub object: String,
    pub field: String,
    pub message: String,
}

fn origin_prefix(origin: &Origin) -> String {
    if origin.0.is_empty() {
        String::new()
    } else {
        format!("{origin}: ")
    }
}

struct ValidImport {
    namespace: String,
    name: String,
    vip: Ipv4Addr,
    ports: Vec<(FrontendKey, String)>,
}

/// Checks one ServiceImport. `Ok(None)`: valid but has no IPv4 VIP to serve
/// (Headless, IPv6-only, or no IP allocated yet).
fn validate_import(
    origin: &Origin,
    import: &ServiceImport,
) -> Result<Option<ValidImport>, ObjectError> {
    let (namespace, name) = object_ref(&import.metadata);
    let err = |field: String, message: String| ObjectError {
        origin: origin_prefix(origin),
        kind: "ServiceImport",
        object: format!("{namespace}/{name}"),
        field,
        message,
    };
    if name.is_empty() {
        return Err(err("metadata.name".into(), "is required".into()));
    }
    let spec = &import.spec;
    match spec.type_.as_deref() {
        Some("ClusterSetIP") => {}
        Some("Headless") => return Ok(None),
        Some(other) => {
            return Err(err(
                "spec.type".into(),
                format!("{other:?} is not ClusterSetIP or Headless"),
            ));
        }
        None => {
            return Err(err(
                "spec.type".into(),
                "is required (ClusterSetIP or Headless)".into(),
            ));
        }
    }
    if spec.ips.len() > 2 {
        return Err(err(
            "spec.ips".into(),
            format!(
                "has {} addresses; at most 2 (one per IP family) are allowed",
                spec.ips.len()
            ),
        ));
    }
    let mut vip = None;
    for (i, raw) in spec.ips.iter().enumerate() {
        let ip: IpAddr = raw.parse().map_err(|_| {
            err(
                format!("spec.ips[{i}]"),
                format!("{raw:?} is not an IP address"),
            )
        })?;
        if let IpAddr::V4(v4) = ip {
            if vip.is_some() {
                return Err(err(
                    format!("spec.ips[{i}]"),
                    "a second IPv4 address; one per family is allowed".into(),
                ));
            }
            if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() {
                return Err(err(
                    format!("spec.ips[{i}]"),
                    format!("{v4} cannot be a service address"),
                ));
            }
            vip = Some(v4);
        }
    }
    let mut ports = Vec::with_capacity(spec.ports.len());
    let mut seen = BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let number = u16::try_from(port.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                err(
                    format!("spec.ports[{i}].port"),
                    format!("{} is out of range 1-65535", port.port),
                )
            })?;
        let protocol = Protocol::parse(port.protocol.as_deref())
            .map_err(|m| err(format!("spec.ports[{i}].protocol"), m))?;
        if !seen.insert((number, protocol)) {
            return Err(err(
                format!("spec.ports[{i}]"),
                format!("duplicate port {number}/{protocol}"),
            ));
        }
        ports.push((number, protocol, port.name.clone().unwrap_or_default()));
    }
    let Some(vip) = vip else {
        return Ok(None);
    };
    let ports = ports
        .into_iter()
        .map(|(port, protocol, port_name)| {
            (
                FrontendKey {
                    vip,
                    port,
                    protocol,
                },
                port_name,
            )
        })
        .collect();
    Ok(Some(ValidImport {
        namespace,
        name,
        vip,
        ports,
    }))
}

struct ValidSlice {
    cluster: Option<String>,
    /// (name, protocol) -> port number
    ports: BTreeMap<(String, Protocol), u16>,
    ready: Vec<Ipv4Addr>,
}

/// Checks one EndpointSlice. `Ok(None)`: not an IPv4 slice (IPv6 and FQDN are not served).
fn validate_slice(
    origin: &Origin,
    slice: &EndpointSlice,
) -> Result<Option<ValidSlice>, ObjectError> {
    let (namespace, name) = object_ref(&slice.metadata);
    let err = |field: String, message: String| ObjectError {
        origin: origin_prefix(origin),
        kind: "EndpointSlice",
        object: format!("{namespace}/{name}"),
        field,
        message,
    };
    match slice.address_type.as_str() {
        "IPv4" => {}
        "IPv6" | "FQDN" => return Ok(None),
        other => {
            return Err(err(
                "addressType".into(),
                format!("{other:?} is not IPv4, IPv6 or FQDN"),
            ));
        }
    }
    let mut ports = BTreeMap::new();
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        let protocol = Protocol::parse(port.protocol.as_deref())
            .map_err(|m| err(format!("ports[{i}].protocol"), m))?;
        // A port without a number means "all ports" in the API; nothing to translate to.
        let Some(raw) = port.port else { continue };
        let number = u16::try_from(raw).ok().filter(|p| *p != 0).ok_or_else(|| {
            err(
                format!("ports[{i}].port"),
                format!("{raw} is out of range 1-65535"),
            )
        })?;
        ports.insert((port.name.clone().unwrap_or_default(), protocol), number);
    }
    let mut ready = Vec::new();
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        let is_ready = endpoint
            .conditions
            .as_ref()
            .and_then(|c| c.ready)
            .unwrap_or(true);
        for (j, raw) in endpoint.addresses.iter().enumerate() {
            let ip: Ipv4Addr = raw.parse().map_err(|_| {
                err(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{raw:?} is not an IPv4 address"),
                )
            })?;
            if is_ready {
                ready.push(ip);
            }
        }
    }
    let cluster = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SOURCE_CLUSTER))
        .cloned();
    Ok(Some(ValidSlice {
        cluster,
        ports,
        ready,
    }))
}

/// Computes what the datapath should hold. Invalid objects are reported and
/// left out whole; everything else is still computed.
pub fn compute(snapshot: &Snapshot) -> (DesiredState, Vec<ObjectError>) {
    let mut errors = Vec::new();

    // Slices by (namespace, service name).
    let mut slices: BTreeMap<(String, String), Vec<ValidSlice>> = BTreeMap::new();
    let mut ordered_slices: Vec<_> = snapshot.slices.iter().collect();
    ordered_slices.sort_by_key(|(origin, s)| (object_ref(&s.metadata), origin.clone()));
    for (origin, slice) in ordered_slices {
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
        else {
            continue;
        };
        match validate_slice(origin, slice) {
            Ok(Some(valid)) => {
                let (namespace, _) = object_ref(&slice.metadata);
                slices
                    .entry((namespace, service.clone()))
                    .or_default()
                    .push(valid);
            }
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }

    // Imports in a stable order so that a VIP conflict always rejects the same one.
    let mut imports: Vec<_> = snapshot.imports.iter().collect();
    imports.sort_by_key(|(origin, i)| (object_ref(&i.metadata), origin.clone()));
    let mut state = DesiredState::default();
    let mut vip_owner: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for (origin, import) in imports {
        let valid = match validate_import(origin, import) {
            Ok(Some(valid)) => valid,
            Ok(None) => continue,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let service = format!("{}/{}", valid.namespace, valid.name);
        if let Some(owner) = vip_owner.get(&valid.vip) {
            errors.push(ObjectError {
                origin: origin_prefix(origin),
                kind: "ServiceImport",
                object: service.clone(),
                field: "spec.ips".into(),
                message: format!("{} is already the ClusterSetIP of {owner}", valid.vip),
            });
            continue;
        }
        vip_owner.insert(valid.vip, service.clone());
        let own_slices = slices.get(&(valid.namespace.clone(), valid.name.clone()));
        for (key, port_name) in valid.ports {
            let mut backends: BTreeMap<BackendAddr, Option<String>> = BTreeMap::new();
            for slice in own_slices.into_iter().flatten() {
                let Some(&port) = slice.ports.get(&(port_name.clone(), key.protocol)) else {
                    continue;
                };
                for &ip in &slice.ready {
                    backends
                        .entry(BackendAddr { ip, port })
                        .or_insert_with(|| slice.cluster.clone());
                }
            }
            let backends = backends
                .into_iter()
                .map(|(addr, cluster)| DesiredBackend { addr, cluster })
                .collect();
            state.frontends.insert(
                key,
                Frontend {
                    service: service.clone(),
                    port_name,
                    backends,
                },
            );
        }
    }
    (state, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifests::parse_documents;

    fn snapshot(yaml: &str) -> Snapshot {
        let (snapshot, errors) = parse_documents(&Origin("test.yaml".into()), yaml);
        assert!(errors.is_empty(), "{errors:?}");
        snapshot
    }

    const IMPORT: &str = r#"
apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata: {name: web, namespace: demo}
spec:
  type: ClusterSetIP
  ips: ["10.96.0.10"]
  ports:
  - {name: http, port: 80, protocol: TCP}
  - {name: tcp2, port: 4242}
  - {name: dns, port: 53, protocol: UDP}
"#;

    fn slice(name: &str, cluster: &str, endpoints: &str) -> String {
        format!(
            r#"
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: demo
  labels:
    multicluster.kubernetes.io/service-name: web
    multicluster.kubernetes.io/source-cluster: {cluster}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: tcp2, port: 42, protocol: TCP}}
- {{name: dns, port: 5353, protocol: UDP}}
endpoints: {endpoints}
"#
        )
    }

    fn addrs(state: &DesiredState, vip_port: u16, protocol: Protocol) -> Vec<String> {
        let key = FrontendKey {
            vip: Ipv4Addr::new(10, 96, 0, 10),
            port: vip_port,
            protocol,
        };
        state.frontends[&key]
            .backends
            .iter()
            .map(|b| b.addr.to_string())
            .collect()
    }

    #[test]
    fn ports_map_by_name_and_protocol_and_only_ready_endpoints_serve() {
        let yaml = format!(
            "{IMPORT}{}{}",
            slice(
                "web-a",
                "cluster-a",
                r#"[{addresses: ["10.1.0.2"]}, {addresses: ["10.1.0.3"], conditions: {ready: false}}]"#
            ),
            slice(
                "web-b",
                "cluster-b",
                r#"[{addresses: ["10.2.0.2"], conditions: {ready: true}}]"#
            )
        );
        let (state, errors) = compute(&snapshot(&yaml));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(state.frontends.len(), 3);
        assert_eq!(
            addrs(&state, 80, Protocol::Tcp),
            ["10.1.0.2:8080", "10.2.0.2:8080"]
        );
        assert_eq!(
            addrs(&state, 4242, Protocol::Tcp),
            ["10.1.0.2:42", "10.2.0.2:42"]
        );
        assert_eq!(
            addrs(&state, 53, Protocol::Udp),
            ["10.1.0.2:5353", "10.2.0.2:5353"]
        );
        let key = FrontendKey {
            vip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            protocol: Protocol::Tcp,
        };
        assert_eq!(
            state.frontends[&key].backends[1].cluster.as_deref(),
            Some("cluster-b")
        );
    }

    #[test]
    fn headless_imports_and_unlabelled_or_foreign_slices_produce_nothing() {
        let yaml = IMPORT.replace("ClusterSetIP", "Headless")
            + &slice("web-a", "a", r#"[{addresses: ["10.1.0.2"]}]"#);
        let (state, errors) = compute(&snapshot(&yaml));
        assert!(errors.is_empty() && state.frontends.is_empty());

        let orphan = slice("other", "a", r#"[{addresses: ["10.1.0.2"]}]"#)
            .replace("service-name: web", "service-name: nope");
        let (state, errors) = compute(&snapshot(&format!("{IMPORT}{orphan}")));
        assert!(errors.is_empty());
        assert!(state.frontends.values().all(|f| f.backends.is_empty()));
    }

    #[test]
    fn bad_fields_are_named_and_only_that_object_is_skipped() {
        let cases = [
            (
                IMPORT.replace("port: 80,", "port: 70000,"),
                "spec.ports[0].port",
                "70000 is out of range",
            ),
            (
                IMPORT.replace("protocol: UDP", "protocol: ICMP"),
                "spec.ports[2].protocol",
                "unknown protocol",
            ),
            (
                IMPORT.replace("protocol: UDP", "protocol: SCTP"),
                "spec.ports[2].protocol",
                "SCTP is not supported",
            ),
            (
                IMPORT.replace(r#"["10.96.0.10"]"#, r#"["10.96.0.x"]"#),
                "spec.ips[0]",
                "not an IP address",
            ),
            (
                IMPORT.replace(
                    r#"["10.96.0.10"]"#,
                    r#"["10.96.0.10", "fd00::1", "fd00::2"]"#,
                ),
                "spec.ips",
                "at most 2",
            ),
        ];
        let healthy = r#"
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceImport
metadata: {name: ok, namespace: demo}
spec: {type: ClusterSetIP, ips: ["10.96.0.11"], ports: [{port: 80}]}
"#;
        for (yaml, field, message) in cases {
            let (state, errors) = compute(&snapshot(&format!("{yaml}{healthy}")));
            assert_eq!(errors.len(), 1, "{errors:?}");
            let text = errors[0].to_string();
            assert!(text.starts_with("test.yaml"), "{text}");
            assert!(text.contains("ServiceImport demo/web"), "{text}");
            assert!(text.contains(field) && text.contains(message), "{text}");
            assert_eq!(
                state.frontends.len(),
                1,
                "the healthy import must still be served"
            );
        }
    }

    #[test]
    fn a_bad_slice_is_skipped_and_the_others_still_serve() {
        let yaml = format!(
            "{IMPORT}{}{}",
            slice("web-a", "a", r#"[{addresses: ["10.1.0.999"]}]"#),
            slice("web-b", "b", r#"[{addresses: ["10.2.0.2"]}]"#)
        );
        let (state, errors) = compute(&snapshot(&yaml));
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .to_string()
                .contains("EndpointSlice demo/web-a: endpoints[0].addresses[0]")
        );
        assert_eq!(addrs(&state, 80, Protocol::Tcp), ["10.2.0.2:8080"]);
    }

    #[test]
    fn a_duplicate_vip_rejects_the_later_import() {
        let second = IMPORT.replace("name: web,", "name: zzz,");
        let (state, errors) = compute(&snapshot(&format!("{IMPORT}---{second}")));
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .to_string()
                .contains("demo/zzz: spec.ips: 10.96.0.10 is already the ClusterSetIP of demo/web")
        );
        assert!(state.frontends.values().all(|f| f.service == "demo/web"));
    }

    #[test]
    fn ipv6_only_and_pending_imports_are_valid_but_not_served() {
        let v6 = IMPORT.replace(r#"["10.96.0.10"]"#, r#"["fd00::10"]"#);
        let pending = IMPORT.replace(r#"ips: ["10.96.0.10"]"#, "ips: []");
        for yaml in [v6, pending] {
            let (state, errors) = compute(&snapshot(&yaml));
            assert!(errors.is_empty() && state.frontends.is_empty());
        }
    }
}
