//! Objects -> desired datapath state. Pure: no I/O, no clocks.
//!
//! A ServiceImport of type ClusterSetIP becomes one frontend per port
//! (`VIP:port/protocol`). Each frontend's backends are the ready endpoints of
//! the EndpointSlices labelled with the import's name, at the slice port that
//! has the same name and protocol as the import port.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use thiserror::Error;

use crate::{
    locality::{
        self, ANNOTATION_CLUSTER_WEIGHTS, DEFAULT_TIERS, LABEL_REGION, NodeLocality, Tier, TrafficDistribution,
        Weighted,
    },
    maglev,
    model::{LABEL_SERVICE_NAME, LABEL_SOURCE_CLUSTER, Origin, ServiceImport, Snapshot, object_ref},
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
            "SCTP" => Err("protocol SCTP is not supported by the mcs-agent datapath (TCP and UDP are)".to_owned()),
            other => Err(format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)")),
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
    /// One entry of `spec.ips`: each family's ClusterSetIP is its own frontend.
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", std::net::SocketAddr::new(self.vip, self.port), self.protocol)
    }
}

/// A pod `IP:port` that serves a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::net::SocketAddr::new(self.ip, self.port))
    }
}

/// An endpoint's EndpointSlice conditions, reduced to what selection uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// `ready` true or absent.
    Ready,
    /// Not ready, but `serving` and `terminating`: a last resort.
    Terminating,
    NotReady,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    /// `multicluster.kubernetes.io/source-cluster` of its slice.
    pub cluster: Option<String>,
    /// `endpoints[].zone`.
    pub zone: Option<String>,
    /// `topology.kubernetes.io/region` label of its slice.
    pub region: Option<String>,
    /// `endpoints[].nodeName`.
    pub node: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: BackendAddr,
    pub locality: Locality,
    pub condition: Condition,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Frontend {
    /// `namespace/name` of the ServiceImport.
    pub service: String,
    /// The import port's name (empty when unnamed).
    pub port_name: String,
    /// Every endpoint at this port, sorted by address, no duplicates.
    pub endpoints: Vec<Endpoint>,
    /// The tiers used (the configured ones, or those `spec.trafficDistribution` asks for).
    pub tiers: Vec<Tier>,
    /// Backends with a share of new connections, sorted by address.
    pub weights: Vec<Weighted>,
    /// Maglev table size for these weights (0 when nothing is usable).
    pub table_size: u32,
    /// ClientIP affinity timeout; 0 without affinity.
    pub affinity_timeout_secs: u32,
}

impl Frontend {
    /// Backends that receive new connections.
    pub fn backends(&self) -> impl Iterator<Item = &BackendAddr> {
        self.weights.iter().map(|w| &w.addr)
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
}

/// The node's view: where it is, and how it prefers endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub node: NodeLocality,
    pub tiers: Vec<Tier>,
    pub max_table_size: u32,
    /// Leave imports that a derived Service already serves to kube-proxy.
    pub skip_derived: bool,
    /// `--clusterset-ip-cidr`: when one of a family is set, a ClusterSetIP of
    /// that family must fall in one of them.
    pub vip_cidrs: Vec<ipnet::IpNet>,
    /// This node's own addresses: never a ClusterSetIP (it would capture the
    /// node's traffic).
    pub node_addresses: BTreeSet<IpAddr>,
    /// The node has IPv6 (not disabled): IPv6 ClusterSetIPs can be served.
    pub ipv6: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            node: NodeLocality::default(),
            tiers: DEFAULT_TIERS.to_vec(),
            max_table_size: maglev::DEFAULT_MAX_TABLE_SIZE,
            skip_derived: false,
            vip_cidrs: Vec::new(),
            node_addresses: BTreeSet::new(),
            ipv6: true,
        }
    }
}

/// Set by MCS implementations that also create a Service for the import
/// (e.g. the mcs-api controller's `derived-<hash>` Service).
pub const ANNOTATION_DERIVED_SERVICE: &str = "multicluster.kubernetes.io/derived-service";

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;

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

impl ObjectError {
    /// A builder of errors about one object: `err(field, message)`.
    pub fn about(
        origin: &Origin,
        kind: &'static str,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> impl Fn(String, String) -> ObjectError {
        let origin = if origin.0.is_empty() { String::new() } else { format!("{origin}: ") };
        let (namespace, name) = object_ref(meta);
        let object = format!("{namespace}/{name}");
        move |field, message| ObjectError { origin: origin.clone(), kind, object: object.clone(), field, message }
    }
}

struct ValidImport {
    namespace: String,
    name: String,
    /// Each ClusterSetIP with its index in `spec.ips` (for error messages).
    vips: Vec<(IpAddr, usize)>,
    ports: Vec<(FrontendKey, String)>,
    affinity_timeout_secs: u32,
    traffic_distribution: Option<TrafficDistribution>,
    cluster_weights: Option<BTreeMap<String, u32>>,
    /// Ports left out (a protocol the datapath does not carry): reported,
    /// while the other ports are served.
    skipped: Vec<ObjectError>,
}

/// Checks one ServiceImport. `Ok(None)`: valid but has no VIP to serve
/// (Headless, or no IP allocated yet).
fn validate_import(origin: &Origin, import: &ServiceImport) -> Result<Option<ValidImport>, ObjectError> {
    let (namespace, name) = object_ref(&import.metadata);
    let err = ObjectError::about(origin, "ServiceImport", &import.metadata);
    if name.is_empty() {
        return Err(err("metadata.name".into(), "is required".into()));
    }
    let spec = &import.spec;
    match spec.type_.as_deref() {
        Some("ClusterSetIP") => {}
        Some("Headless") => return Ok(None),
        Some(other) => {
            return Err(err("spec.type".into(), format!("{other:?} is not ClusterSetIP or Headless")));
        }
        None => {
            return Err(err("spec.type".into(), "is required (ClusterSetIP or Headless)".into()));
        }
    }
    if spec.ips.len() > 2 {
        return Err(err(
            "spec.ips".into(),
            format!("has {} addresses; at most 2 (one per IP family) are allowed", spec.ips.len()),
        ));
    }
    let mut vips: Vec<(IpAddr, usize)> = Vec::new();
    for (i, raw) in spec.ips.iter().enumerate() {
        let ip: IpAddr =
            raw.parse().map_err(|_| err(format!("spec.ips[{i}]"), format!("{raw:?} is not an IP address")))?;
        if vips.iter().any(|(other, _)| other.is_ipv4() == ip.is_ipv4()) {
            return Err(err(
                format!("spec.ips[{i}]"),
                format!("a second {} address; one per family is allowed", family_name(ip)),
            ));
        }
        if let Some(why) = never_a_vip(ip) {
            return Err(err(format!("spec.ips[{i}]"), format!("{ip} cannot be a ClusterSetIP: {why}")));
        }
        vips.push((ip, i));
    }
    // Optional; when present it names the family of each entry of `ips`.
    if !spec.ip_families.is_empty() {
        if spec.ip_families.len() != spec.ips.len() {
            return Err(err(
                "spec.ipFamilies".into(),
                format!(
                    "lists {} families for {} addresses in spec.ips; they must match element by element",
                    spec.ip_families.len(),
                    spec.ips.len()
                ),
            ));
        }
        for (ip, i) in &vips {
            let family = &spec.ip_families[*i];
            if family != family_name(*ip) {
                return Err(err(
                    format!("spec.ipFamilies[{i}]"),
                    format!("{family:?} does not match spec.ips[{i}] {ip} ({})", family_name(*ip)),
                ));
            }
        }
    }
    let mut ports = Vec::with_capacity(spec.ports.len());
    let mut seen = BTreeSet::new();
    let mut skipped = Vec::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let number = u16::try_from(port.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| err(format!("spec.ports[{i}].port"), format!("{} is out of range 1-65535", port.port)))?;
        let protocol = match Protocol::parse(port.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(message) => {
                // Ports are independent: this one is left out, the others serve.
                skipped.push(err(format!("spec.ports[{i}].protocol"), format!("{message}; this port is not served")));
                continue;
            }
        };
        if !seen.insert((number, protocol)) {
            return Err(err(format!("spec.ports[{i}]"), format!("duplicate port {number}/{protocol}")));
        }
        ports.push((number, protocol, port.name.clone().unwrap_or_default()));
    }
    let affinity_timeout_secs = match spec.session_affinity.as_deref() {
        None | Some("" | "None") => 0,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(i64::from(DEFAULT_AFFINITY_TIMEOUT_SECS));
            if !(1..=86_400).contains(&timeout) {
                return Err(err(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                    format!("{timeout} is out of range 1-86400"),
                ));
            }
            timeout as u32
        }
        Some(other) => {
            return Err(err("spec.sessionAffinity".into(), format!("{other:?} is not ClientIP or None")));
        }
    };
    let cluster_weights = match import.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_CLUSTER_WEIGHTS)) {
        Some(value) => Some(
            locality::parse_cluster_weights(value)
                .map_err(|m| err(format!("metadata.annotations[{ANNOTATION_CLUSTER_WEIGHTS}]"), m))?,
        ),
        None => None,
    };
    if vips.is_empty() {
        return Ok(None);
    }
    let ports = ports
        .into_iter()
        .map(|(port, protocol, port_name)| {
            (FrontendKey { vip: Ipv4Addr::UNSPECIFIED.into(), port, protocol }, port_name)
        })
        .collect();
    Ok(Some(ValidImport {
        namespace,
        name,
        vips,
        ports,
        affinity_timeout_secs,
        traffic_distribution: TrafficDistribution::parse(spec.traffic_distribution.as_deref()),
        cluster_weights,
        skipped,
    }))
}

struct ValidSlice {
    /// Ports left out (a protocol the datapath does not carry).
    skipped: Vec<ObjectError>,
    /// (name, protocol) -> port number
    ports: BTreeMap<(String, Protocol), u16>,
    endpoints: Vec<(IpAddr, Locality, Condition)>,
}

/// `IPv4` or `IPv6`, as `ipFamilies` and `addressType` spell them.
pub fn family_name(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Checks one EndpointSlice. `Ok(None)`: an FQDN slice (not served).
fn validate_slice(origin: &Origin, slice: &EndpointSlice) -> Result<Option<ValidSlice>, ObjectError> {
    let err = ObjectError::about(origin, "EndpointSlice", &slice.metadata);
    let v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        "FQDN" => return Ok(None),
        other => {
            return Err(err("addressType".into(), format!("{other:?} is not IPv4, IPv6 or FQDN")));
        }
    };
    let mut ports = BTreeMap::new();
    let mut skipped = Vec::new();
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        let protocol = match Protocol::parse(port.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(message) => {
                skipped.push(err(format!("ports[{i}].protocol"), format!("{message}; this port is not served")));
                continue;
            }
        };
        // A port without a number means "all ports" in the API; nothing to translate to.
        let Some(raw) = port.port else { continue };
        let number = u16::try_from(raw)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| err(format!("ports[{i}].port"), format!("{raw} is out of range 1-65535")))?;
        ports.insert((port.name.clone().unwrap_or_default(), protocol), number);
    }
    let label = |key: &str| slice.metadata.labels.as_ref().and_then(|l| l.get(key)).cloned();
    let (cluster, region) = (label(LABEL_SOURCE_CLUSTER), label(LABEL_REGION));
    let mut endpoints = Vec::new();
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        let conditions = endpoint.conditions.as_ref();
        let condition = if conditions.and_then(|c| c.ready).unwrap_or(true) {
            Condition::Ready
        } else if conditions.and_then(|c| c.serving).unwrap_or(false)
            && conditions.and_then(|c| c.terminating).unwrap_or(false)
        {
            Condition::Terminating
        } else {
            Condition::NotReady
        };
        let locality = Locality {
            cluster: cluster.clone(),
            zone: endpoint.zone.clone(),
            region: region.clone(),
            node: endpoint.node_name.clone(),
        };
        for (j, raw) in endpoint.addresses.iter().enumerate() {
            let ip: IpAddr =
                if v6 { raw.parse::<Ipv6Addr>().map(IpAddr::from) } else { raw.parse::<Ipv4Addr>().map(IpAddr::from) }
                    .map_err(|_| {
                        err(
                            format!("endpoints[{i}].addresses[{j}]"),
                            format!(
                                "{raw:?} is not an {} address (addressType {})",
                                slice.address_type, slice.address_type
                            ),
                        )
                    })?;
            endpoints.push((ip, locality.clone(), condition));
        }
    }
    Ok(Some(ValidSlice { skipped, ports, endpoints }))
}

/// What the agent knows at run time beyond the objects and the node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Runtime {
    /// ClusterSetIP -> the import serving it: a newcomer never takes it over.
    pub held: BTreeMap<IpAddr, String>,
    /// Backends passive health ejected: no new connections, unhealthy in their tier.
    pub ejected: BTreeSet<BackendAddr>,
    /// Backends back from an ejection: unhealthy in their tier, but each gets
    /// [`PROBE_SHARE`] of new connections to prove itself.
    pub probing: BTreeSet<BackendAddr>,
}

/// The share of a frontend's new connections a probing backend gets.
pub const PROBE_SHARE: f64 = 0.05;

/// `status.clusterSelectorResults` (KEP-5939): ordered sets of cluster ids.
/// `Ok(None)` when absent; `Err((field, message))` for a shape we do not know.
fn cluster_selector_results(import: &ServiceImport) -> Result<Option<Vec<BTreeSet<String>>>, (String, String)> {
    let Some(results) = import.status.as_ref().and_then(|s| s.get("clusterSelectorResults")) else {
        return Ok(None);
    };
    let field = "status.clusterSelectorResults".to_owned();
    let list = results.as_array().ok_or_else(|| (field.clone(), "is not a list".to_owned()))?;
    list.iter()
        .enumerate()
        .map(|(i, result)| {
            let clusters = match result.get("clusters") {
                None => return Ok(BTreeSet::new()),
                Some(c) => c,
            };
            let field = format!("{field}[{i}].clusters");
            clusters
                .as_array()
                .ok_or_else(|| (field.clone(), "is not a list of cluster ids".to_owned()))?
                .iter()
                .map(|c| {
                    c.as_str().map(str::to_owned).ok_or_else(|| (field.clone(), format!("{c} is not a cluster id")))
                })
                .collect()
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// KEP-5939: the clusters of the first result with at least one endpoint
/// that is ready or serving (and not ejected); all clusters when none has.
fn selected_clusters<'a>(
    results: &'a [BTreeSet<String>],
    endpoints: &[Endpoint],
    ejected: &BTreeSet<BackendAddr>,
) -> Option<&'a BTreeSet<String>> {
    results.iter().find(|clusters| {
        endpoints.iter().any(|e| {
            e.condition != Condition::NotReady
                && !ejected.contains(&e.addr)
                && e.locality.cluster.as_ref().is_some_and(|c| clusters.contains(c))
        })
    })
}

/// Addresses that can never be a ClusterSetIP, whatever the flags say.
fn never_a_vip(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => {
            return if ip.is_unspecified() {
                Some("the unspecified address ::")
            } else if ip.is_loopback() {
                Some("the loopback address; it would capture the pod's own traffic")
            } else if ip.is_multicast() {
                Some("a multicast address")
            } else if ip.is_unicast_link_local() {
                Some("a link-local address (fe80::/10)")
            } else if ip.to_ipv4_mapped().is_some() {
                Some("an IPv4-mapped address (::ffff:0:0/96); list the IPv4 address itself")
            } else {
                None
            };
        }
    };
    if ip.is_unspecified() || ip.octets()[0] == 0 {
        Some("an unspecified (0.0.0.0/8) address")
    } else if ip.is_loopback() {
        Some("a loopback address; it would capture the pod's own traffic")
    } else if ip.is_broadcast() {
        Some("the broadcast address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_link_local() {
        Some("a link-local address (169.254.0.0/16, e.g. cloud metadata)")
    } else {
        None
    }
}

/// Why `vip` must not be served on this node, given where pods and the node are.
fn vip_conflict(vip: IpAddr, policy: &Policy, endpoints: &BTreeMap<IpAddr, String>) -> Option<String> {
    let same_family: Vec<&ipnet::IpNet> =
        policy.vip_cidrs.iter().filter(|net| net.addr().is_ipv4() == vip.is_ipv4()).collect();
    if !same_family.is_empty() && !same_family.iter().any(|net| net.contains(&vip)) {
        let cidrs: Vec<String> = same_family.iter().map(ToString::to_string).collect();
        return Some(format!("{vip} is outside --clusterset-ip-cidr {}", cidrs.join(", ")));
    }
    if vip.is_ipv6() && !policy.ipv6 {
        return Some(format!(
            "{vip} is IPv6 and this node has IPv6 disabled (net.ipv6.conf.all.disable_ipv6); the import's other family is still served"
        ));
    }
    if policy.node_addresses.contains(&vip) {
        return Some(format!("{vip} is an address of this node; serving it would capture the node's traffic"));
    }
    if let Some(slice) = endpoints.get(&vip) {
        return Some(format!(
            "{vip} is the address of an endpoint in EndpointSlice {slice}; serving it would capture that pod's traffic"
        ));
    }
    None
}

/// Shares of new connections for one frontend: KEP-5939 cluster selection
/// first, then passive health (ejected and probing backends count as
/// unhealthy in their tier), then locality tiers and weights.
fn health_weights(
    endpoints: &[Endpoint],
    cluster_weights: Option<&BTreeMap<String, u32>>,
    selector_results: Option<&[BTreeSet<String>]>,
    tiers: &[locality::Tier],
    policy: &Policy,
    runtime: &Runtime,
) -> Vec<locality::Weighted> {
    let selected = selector_results.and_then(|r| selected_clusters(r, endpoints, &runtime.ejected));
    let in_selection = |e: &Endpoint| {
        selected.is_none_or(|clusters| e.locality.cluster.as_ref().is_some_and(|c| clusters.contains(c)))
    };
    let out_of_service = |e: &Endpoint| runtime.ejected.contains(&e.addr) || runtime.probing.contains(&e.addr);
    let view: Vec<Endpoint> = endpoints
        .iter()
        .filter(|e| in_selection(e))
        .map(|e| if out_of_service(e) { Endpoint { condition: Condition::NotReady, ..e.clone() } } else { e.clone() })
        .collect();
    let mut weights = locality::weights(&view, cluster_weights, tiers, &policy.node);
    let probing: Vec<&Endpoint> = endpoints
        .iter()
        .filter(|e| in_selection(e) && runtime.probing.contains(&e.addr) && e.condition == Condition::Ready)
        .collect();
    if probing.is_empty() {
        return weights;
    }
    if weights.is_empty() {
        // Nothing else serves: the probing backends are all there is.
        let view: Vec<Endpoint> =
            endpoints.iter().filter(|e| in_selection(e) && !runtime.ejected.contains(&e.addr)).cloned().collect();
        return locality::weights(&view, cluster_weights, tiers, &policy.node);
    }
    let probe_total = (PROBE_SHARE * probing.len() as f64).min(0.5);
    for w in &mut weights {
        w.share *= 1.0 - probe_total;
    }
    for e in probing {
        let Some(tier) = locality::tier_of(e, tiers, &policy.node) else { continue };
        weights.push(locality::Weighted {
            addr: e.addr,
            share: probe_total / (probe_total / PROBE_SHARE).round().max(1.0),
            tier,
            cluster: e.locality.cluster.clone(),
        });
    }
    weights.sort_by_key(|w| w.addr);
    weights
}

/// Computes what the datapath should hold. Invalid objects are reported and
/// left out whole; everything else is still computed.
pub fn compute(snapshot: &Snapshot, policy: &Policy) -> (DesiredState, Vec<ObjectError>) {
    compute_with(snapshot, policy, &Runtime::default())
}

/// [`compute`], knowing which import holds each ClusterSetIP now (`held`:
/// VIP -> `namespace/name`, what the datapath serves). Of two imports with one
/// ClusterSetIP, the one holding it keeps it; otherwise the older (by
/// `metadata.creationTimestamp`), then the first by name. The other is reported.
pub fn compute_with(snapshot: &Snapshot, policy: &Policy, runtime: &Runtime) -> (DesiredState, Vec<ObjectError>) {
    let held = &runtime.held;
    let mut errors = Vec::new();

    // Slices by (namespace, service name).
    let mut slices: BTreeMap<(String, String), Vec<ValidSlice>> = BTreeMap::new();
    // Every pod address of every slice: none may become a ClusterSetIP.
    let mut endpoint_ips: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut ordered_slices: Vec<_> = snapshot.slices.iter().collect();
    ordered_slices.sort_by_key(|(origin, s)| (object_ref(&s.metadata), origin.clone()));
    for (origin, slice) in ordered_slices {
        let Some(service) = slice.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
            continue;
        };
        match validate_slice(origin, slice) {
            Ok(Some(mut valid)) => {
                errors.append(&mut valid.skipped);
                let (namespace, name) = object_ref(&slice.metadata);
                for (ip, _, _) in &valid.endpoints {
                    endpoint_ips.entry(*ip).or_insert_with(|| format!("{namespace}/{name}"));
                }
                slices.entry((namespace, service.clone())).or_default().push(valid);
            }
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }

    // Imports in a stable order so that a VIP conflict always rejects the same
    // one: the current holder of a VIP first, then the oldest, then by name.
    let mut imports: Vec<_> = snapshot.imports.iter().collect();
    imports.sort_by_key(|(origin, i)| {
        let (namespace, name) = object_ref(&i.metadata);
        let service = format!("{namespace}/{name}");
        let holds = held.values().any(|holder| *holder == service);
        let created = i.metadata.creation_timestamp.as_ref().map(|t| t.0);
        (!holds, created.is_none(), created, (namespace, name), origin.clone())
    });
    let mut state = DesiredState::default();
    let mut vip_owner: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (origin, import) in imports {
        let derived = import.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(ANNOTATION_DERIVED_SERVICE));
        if policy.skip_derived && derived {
            continue;
        }
        let mut valid = match validate_import(origin, import) {
            Ok(Some(valid)) => valid,
            Ok(None) => continue,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        errors.append(&mut valid.skipped);
        let service = format!("{}/{}", valid.namespace, valid.name);
        // Families are independent, as ports are: a VIP that may not be
        // served is reported, the import's other VIP still is.
        let mut vips = Vec::new();
        for (vip, index) in &valid.vips {
            let err = ObjectError::about(origin, "ServiceImport", &import.metadata);
            if let Some(why) = vip_conflict(*vip, policy, &endpoint_ips) {
                errors.push(err(format!("spec.ips[{index}]"), why));
            } else if let Some(owner) = vip_owner.get(vip) {
                errors.push(err(format!("spec.ips[{index}]"), format!("{vip} is already the ClusterSetIP of {owner}")));
            } else {
                vips.push(*vip);
            }
        }
        if vips.is_empty() {
            continue;
        }
        for vip in &vips {
            vip_owner.insert(*vip, service.clone());
        }
        let selector_results = match cluster_selector_results(import) {
            Ok(results) => results,
            Err((field, message)) => {
                // Alpha and optional: a shape we do not know leaves the import
                // served by all clusters, and is reported.
                let err = ObjectError::about(origin, "ServiceImport", &import.metadata);
                errors.push(err(field, format!("{message}; all clusters are used")));
                None
            }
        };
        let own_slices = slices.get(&(valid.namespace.clone(), valid.name.clone()));
        let tiers = valid.traffic_distribution.map_or_else(|| policy.tiers.clone(), TrafficDistribution::tiers);
        let frontends = vips.iter().flat_map(|vip| {
            valid.ports.iter().map(move |(key, port_name)| (FrontendKey { vip: *vip, ..*key }, port_name.clone()))
        });
        for (key, port_name) in frontends {
            let mut endpoints: BTreeMap<BackendAddr, Endpoint> = BTreeMap::new();
            for slice in own_slices.into_iter().flatten() {
                let Some(&port) = slice.ports.get(&(port_name.clone(), key.protocol)) else {
                    continue;
                };
                // A frontend is balanced over endpoints of its own family.
                for (ip, locality, condition) in
                    slice.endpoints.iter().filter(|(ip, ..)| ip.is_ipv4() == key.vip.is_ipv4())
                {
                    let addr = BackendAddr { ip: *ip, port };
                    endpoints.entry(addr).or_insert_with(|| Endpoint {
                        addr,
                        locality: locality.clone(),
                        condition: *condition,
                    });
                }
            }
            let endpoints: Vec<Endpoint> = endpoints.into_values().collect();
            let weights = health_weights(
                &endpoints,
                valid.cluster_weights.as_ref(),
                selector_results.as_deref(),
                &tiers,
                policy,
                runtime,
            );
            let table_size =
                if weights.is_empty() { 0 } else { maglev::table_size(weights.len(), policy.max_table_size) };
            state.frontends.insert(
                key,
                Frontend {
                    service: service.clone(),
                    port_name,
                    endpoints,
                    tiers: tiers.clone(),
                    weights,
                    table_size,
                    affinity_timeout_secs: valid.affinity_timeout_secs,
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
        let key = FrontendKey { vip: Ipv4Addr::new(10, 96, 0, 10).into(), port: vip_port, protocol };
        state.frontends[&key].backends().map(ToString::to_string).collect()
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
            slice("web-b", "cluster-b", r#"[{addresses: ["10.2.0.2"], conditions: {ready: true}}]"#)
        );
        let (state, errors) = compute(&snapshot(&yaml), &Policy::default());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(state.frontends.len(), 3);
        assert_eq!(addrs(&state, 80, Protocol::Tcp), ["10.1.0.2:8080", "10.2.0.2:8080"]);
        assert_eq!(addrs(&state, 4242, Protocol::Tcp), ["10.1.0.2:42", "10.2.0.2:42"]);
        assert_eq!(addrs(&state, 53, Protocol::Udp), ["10.1.0.2:5353", "10.2.0.2:5353"]);
        let key = FrontendKey { vip: Ipv4Addr::new(10, 96, 0, 10).into(), port: 80, protocol: Protocol::Tcp };
        assert_eq!(state.frontends[&key].weights[1].cluster.as_deref(), Some("cluster-b"));
        assert_eq!(state.frontends[&key].endpoints.len(), 3, "the unready endpoint is kept for tier health");
    }

    #[test]
    fn headless_imports_and_unlabelled_or_foreign_slices_produce_nothing() {
        let yaml = IMPORT.replace("ClusterSetIP", "Headless") + &slice("web-a", "a", r#"[{addresses: ["10.1.0.2"]}]"#);
        let (state, errors) = compute(&snapshot(&yaml), &Policy::default());
        assert!(errors.is_empty() && state.frontends.is_empty());

        let orphan =
            slice("other", "a", r#"[{addresses: ["10.1.0.2"]}]"#).replace("service-name: web", "service-name: nope");
        let (state, errors) = compute(&snapshot(&format!("{IMPORT}{orphan}")), &Policy::default());
        assert!(errors.is_empty());
        assert!(state.frontends.values().all(|f| f.weights.is_empty()));
    }

    #[test]
    fn bad_fields_are_named_and_only_that_object_is_skipped() {
        let cases = [
            (IMPORT.replace("port: 80,", "port: 70000,"), "spec.ports[0].port", "70000 is out of range"),
            (IMPORT.replace(r#"["10.96.0.10"]"#, r#"["10.96.0.x"]"#), "spec.ips[0]", "not an IP address"),
            (IMPORT.replace(r#"["10.96.0.10"]"#, r#"["10.96.0.10", "fd00::1", "fd00::2"]"#), "spec.ips", "at most 2"),
        ];
        let healthy = r#"
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceImport
metadata: {name: ok, namespace: demo}
spec: {type: ClusterSetIP, ips: ["10.96.0.11"], ports: [{port: 80}]}
"#;
        for (yaml, field, message) in cases {
            let (state, errors) = compute(&snapshot(&format!("{yaml}{healthy}")), &Policy::default());
            assert_eq!(errors.len(), 1, "{errors:?}");
            let text = errors[0].to_string();
            assert!(text.starts_with("test.yaml"), "{text}");
            assert!(text.contains("ServiceImport demo/web"), "{text}");
            assert!(text.contains(field) && text.contains(message), "{text}");
            assert_eq!(state.frontends.len(), 1, "the healthy import must still be served");
        }
    }

    #[test]
    fn a_port_with_an_unsupported_protocol_is_skipped_and_the_other_ports_serve() {
        for (protocol, message) in [("SCTP", "SCTP is not supported"), ("ICMP", "unknown protocol")] {
            let import = IMPORT.replace("protocol: UDP", &format!("protocol: {protocol}"));
            let slice_yaml = slice("web-a", "a", r#"[{addresses: ["10.1.0.1"]}]"#)
                .replace("ports:\n", &format!("ports:\n- {{name: sctp, port: 9, protocol: {protocol}}}\n"));
            let (state, errors) = compute(&snapshot(&format!("{import}{slice_yaml}")), &Policy::default());
            let texts: Vec<String> = errors.iter().map(ToString::to_string).collect();
            assert_eq!(texts.len(), 2, "{texts:?}");
            assert!(
                texts.iter().any(|t| t.contains("ServiceImport demo/web: spec.ports[2].protocol")
                    && t.contains(message)
                    && t.contains("this port is not served")),
                "{texts:?}"
            );
            assert!(texts.iter().any(|t| t.contains("EndpointSlice demo/web-a: ports[0].protocol")), "{texts:?}");
            assert_eq!(addrs(&state, 80, Protocol::Tcp), ["10.1.0.1:8080"], "the TCP ports keep working");
            assert_eq!(state.frontends.len(), 2, "http and tcp2; not the {protocol} port");
        }
    }

    #[test]
    fn a_bad_slice_is_skipped_and_the_others_still_serve() {
        let yaml = format!(
            "{IMPORT}{}{}",
            slice("web-a", "a", r#"[{addresses: ["10.1.0.999"]}]"#),
            slice("web-b", "b", r#"[{addresses: ["10.2.0.2"]}]"#)
        );
        let (state, errors) = compute(&snapshot(&yaml), &Policy::default());
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("EndpointSlice demo/web-a: endpoints[0].addresses[0]"));
        assert_eq!(addrs(&state, 80, Protocol::Tcp), ["10.2.0.2:8080"]);
    }

    #[test]
    fn addresses_that_can_never_be_a_vip_are_refused_with_the_field() {
        for (vip, why) in [
            ("127.0.0.1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("0.0.0.0", "unspecified"),
        ] {
            let yaml = IMPORT.replace("10.96.0.10", vip);
            let (state, errors) = compute(&snapshot(&yaml), &Policy::default());
            assert!(state.frontends.is_empty(), "{vip} served");
            let message = errors[0].to_string();
            assert!(message.contains("demo/web: spec.ips[0]") && message.contains(why), "{message}");
        }
    }

    #[test]
    fn a_vip_may_not_capture_a_pod_or_the_node() {
        // An import whose ClusterSetIP is another service's pod.
        let pod = slice("web-a", "a", r#"[{addresses: ["10.96.0.10"]}]"#);
        let (state, errors) = compute(&snapshot(&format!("{IMPORT}{pod}")), &Policy::default());
        assert!(state.frontends.is_empty());
        assert!(
            errors[0]
                .to_string()
                .contains("spec.ips[0]: 10.96.0.10 is the address of an endpoint in EndpointSlice demo/web-a"),
            "{}",
            errors[0]
        );
        // The node's own address.
        let policy = Policy { node_addresses: [Ipv4Addr::new(10, 96, 0, 10).into()].into(), ..Policy::default() };
        let (state, errors) = compute(&snapshot(IMPORT), &policy);
        assert!(state.frontends.is_empty());
        assert!(errors[0].to_string().contains("is an address of this node"), "{}", errors[0]);
    }

    #[test]
    fn the_allow_list_bounds_clusterset_ips() {
        let policy = Policy { vip_cidrs: vec!["10.97.0.0/16".parse().unwrap()], ..Policy::default() };
        let (state, errors) = compute(&snapshot(IMPORT), &policy);
        assert!(state.frontends.is_empty());
        assert!(errors[0].to_string().contains("spec.ips[0]: 10.96.0.10 is outside --clusterset-ip-cidr 10.97.0.0/16"));
        let policy = Policy { vip_cidrs: vec!["10.96.0.0/16".parse().unwrap()], ..Policy::default() };
        let (state, errors) = compute(&snapshot(IMPORT), &policy);
        assert!(errors.is_empty() && !state.frontends.is_empty());
    }

    #[test]
    fn the_import_holding_a_vip_keeps_it_and_else_the_oldest_wins() {
        // "aaa" sorts first, but "web" serves the VIP today: a newcomer never takes it.
        let newcomer = IMPORT.replace("name: web,", "name: aaa,");
        let yaml = format!("{IMPORT}---{newcomer}");
        let held = BTreeMap::from([(Ipv4Addr::new(10, 96, 0, 10).into(), "demo/web".to_owned())]);
        let runtime = Runtime { held, ..Runtime::default() };
        let (state, errors) = compute_with(&snapshot(&yaml), &Policy::default(), &runtime);
        assert!(state.frontends.values().all(|f| f.service == "demo/web"));
        assert!(
            errors[0].to_string().contains("demo/aaa: spec.ips[0]: 10.96.0.10 is already the ClusterSetIP of demo/web")
        );
        // Nobody holds it yet: the older object wins, whatever the names.
        let old = IMPORT
            .replace("metadata: {name: web,", "metadata: {creationTimestamp: \"2026-01-01T00:00:00Z\", name: web,");
        let young = newcomer
            .replace("metadata: {name: aaa,", "metadata: {creationTimestamp: \"2026-06-01T00:00:00Z\", name: aaa,");
        let (state, _) = compute(&snapshot(&format!("{old}---{young}")), &Policy::default());
        assert!(state.frontends.values().all(|f| f.service == "demo/web"));
    }

    /// Shares per cluster of the http frontend.
    fn shares(state: &DesiredState) -> BTreeMap<String, f64> {
        let key = FrontendKey { vip: Ipv4Addr::new(10, 96, 0, 10).into(), port: 80, protocol: Protocol::Tcp };
        let mut by: BTreeMap<String, f64> = BTreeMap::new();
        for w in &state.frontends[&key].weights {
            *by.entry(w.cluster.clone().unwrap_or_default()).or_default() += (w.share * 1000.0).round() / 1000.0;
        }
        by
    }

    const SELECTOR_RESULTS: &str = "status:\n  clusterSelectorResults:\n  - clusters: [self]\n  - clusters: [self, peer]\n  - clusters: [self, peer, far]\n";

    fn three_clusters(self_ready: bool, peer_ready: bool) -> String {
        let ready = |r: bool| if r { "true" } else { "false" };
        format!(
            "{IMPORT}{SELECTOR_RESULTS}{}{}{}",
            slice(
                "web-self",
                "self",
                &format!("[{{addresses: [\"10.1.0.1\"], conditions: {{ready: {}}}}}]", ready(self_ready))
            ),
            slice(
                "web-peer",
                "peer",
                &format!("[{{addresses: [\"10.2.0.1\"], conditions: {{ready: {}}}}}]", ready(peer_ready))
            ),
            slice("web-far", "far", r#"[{addresses: ["10.3.0.1"]}]"#),
        )
    }

    #[test]
    fn kep_5939_uses_the_first_result_with_a_ready_endpoint_then_all_clusters() {
        let any = Policy { tiers: vec![locality::Tier::Any], ..Policy::default() };
        let (state, errors) = compute(&snapshot(&three_clusters(true, true)), &any);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(shares(&state), BTreeMap::from([("self".into(), 1.0)]), "the first result serves alone");
        let (state, _) = compute(&snapshot(&three_clusters(false, true)), &any);
        assert_eq!(shares(&state), BTreeMap::from([("peer".into(), 1.0)]), "self down: its region peers take over");
        // Nothing ready in any result: all clusters (here: only far is ready).
        let empty = three_clusters(false, false).replace("  - clusters: [self, peer, far]\n", "");
        let (state, _) = compute(&snapshot(&empty), &any);
        assert_eq!(shares(&state), BTreeMap::from([("far".into(), 1.0)]));
        // Selection first, then tiers: the node's own zone does not pull traffic
        // out of the selected clusters.
        let near_far = Policy {
            node: NodeLocality { cluster: Some("far".into()), ..NodeLocality::default() },
            tiers: vec![locality::Tier::Cluster, locality::Tier::Any],
            ..Policy::default()
        };
        let (state, _) = compute(&snapshot(&three_clusters(true, true)), &near_far);
        assert_eq!(shares(&state), BTreeMap::from([("self".into(), 1.0)]));
    }

    #[test]
    fn an_ejected_cluster_counts_as_having_no_usable_endpoint() {
        let any = Policy { tiers: vec![locality::Tier::Any], ..Policy::default() };
        let self_pod = BackendAddr { ip: Ipv4Addr::new(10, 1, 0, 1).into(), port: 8080 };
        let runtime = Runtime { ejected: [self_pod].into(), ..Runtime::default() };
        let (state, _) = compute_with(&snapshot(&three_clusters(true, true)), &any, &runtime);
        assert_eq!(shares(&state), BTreeMap::from([("peer".into(), 1.0)]));
    }

    #[test]
    fn an_unknown_selector_result_shape_is_reported_and_all_clusters_serve() {
        let yaml = format!(
            "{IMPORT}status:\n  clusterSelectorResults: [{{clusters: self}}]\n{}",
            slice("web-a", "a", r#"[{addresses: ["10.1.0.1"]}]"#)
        );
        let (state, errors) = compute(&snapshot(&yaml), &Policy::default());
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().contains("status.clusterSelectorResults[0].clusters: is not a list"),
            "{}",
            errors[0]
        );
        assert_eq!(addrs(&state, 80, Protocol::Tcp), ["10.1.0.1:8080"], "the import is still served");
    }

    #[test]
    fn ejected_backends_spill_their_tier_and_probing_ones_get_a_small_share() {
        let policy = Policy {
            node: NodeLocality { cluster: Some("a".into()), ..NodeLocality::default() },
            tiers: vec![locality::Tier::Cluster, locality::Tier::Any],
            ..Policy::default()
        };
        let yaml = format!(
            "{IMPORT}{}{}",
            slice("web-a", "a", r#"[{addresses: ["10.1.0.1"]}, {addresses: ["10.1.0.2"]}]"#),
            slice("web-b", "b", r#"[{addresses: ["10.2.0.1"]}]"#)
        );
        let pod = |last| BackendAddr { ip: Ipv4Addr::new(10, 1, 0, last).into(), port: 8080 };
        let (state, _) = compute(&snapshot(&yaml), &policy);
        assert_eq!(shares(&state), BTreeMap::from([("a".into(), 1.0)]));
        // One of two local pods ejected: tier health 1.4 × 1/2 = 70 %.
        let ejected = Runtime { ejected: [pod(2)].into(), ..Runtime::default() };
        let (state, _) = compute_with(&snapshot(&yaml), &policy, &ejected);
        assert_eq!(shares(&state), BTreeMap::from([("a".into(), 0.7), ("b".into(), 0.3)]));
        // Back and probing: 5 % for it, the rest as before.
        let probing = Runtime { probing: [pod(2)].into(), ..Runtime::default() };
        let (state, _) = compute_with(&snapshot(&yaml), &policy, &probing);
        let key = FrontendKey { vip: Ipv4Addr::new(10, 96, 0, 10).into(), port: 80, protocol: Protocol::Tcp };
        let probe = state.frontends[&key].weights.iter().find(|w| w.addr == pod(2)).unwrap().share;
        assert!((probe - PROBE_SHARE).abs() < 1e-9, "{probe}");
        let total: f64 = state.frontends[&key].weights.iter().map(|w| w.share).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_duplicate_vip_rejects_the_later_import() {
        let second = IMPORT.replace("name: web,", "name: zzz,");
        let (state, errors) = compute(&snapshot(&format!("{IMPORT}---{second}")), &Policy::default());
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().contains("demo/zzz: spec.ips[0]: 10.96.0.10 is already the ClusterSetIP of demo/web")
        );
        assert!(state.frontends.values().all(|f| f.service == "demo/web"));
    }

    #[test]
    fn derived_imports_are_served_unless_left_to_kube_proxy() {
        let yaml = IMPORT.replace(
            "metadata: {name: web, namespace: demo}",
            "metadata: {name: web, namespace: demo, annotations: {multicluster.kubernetes.io/derived-service: derived-abc}}",
        );
        let (state, _) = compute(&snapshot(&yaml), &Policy::default());
        assert_eq!(state.frontends.len(), 3, "served by default: our TC hook runs before kube-proxy");
        let skip = Policy { skip_derived: true, ..Policy::default() };
        assert!(compute(&snapshot(&yaml), &skip).0.frontends.is_empty());
    }

    #[test]
    fn a_pending_import_is_valid_but_not_served() {
        let pending = IMPORT.replace(r#"ips: ["10.96.0.10"]"#, "ips: []");
        let (state, errors) = compute(&snapshot(&pending), &Policy::default());
        assert!(errors.is_empty() && state.frontends.is_empty());
    }

    const DUAL_STACK: &str = r#"
apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata: {name: web, namespace: demo}
spec:
  type: ClusterSetIP
  ips: ["10.96.0.10", "fd00:96::10"]
  ipFamilies: [IPv4, IPv6]
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a4
  namespace: demo
  labels: {multicluster.kubernetes.io/service-name: web, multicluster.kubernetes.io/source-cluster: a}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: ["10.1.0.1"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a6
  namespace: demo
  labels: {multicluster.kubernetes.io/service-name: web, multicluster.kubernetes.io/source-cluster: a}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: ["fd00:1::1"]}, {addresses: ["fd00:1::2"]}]
"#;

    #[test]
    fn each_ip_of_a_dual_stack_import_is_a_frontend_over_endpoints_of_its_family() {
        let (state, errors) = compute(&snapshot(DUAL_STACK), &Policy::default());
        assert!(errors.is_empty(), "{errors:?}");
        let v4 =
            &state.frontends[&FrontendKey { vip: "10.96.0.10".parse().unwrap(), port: 80, protocol: Protocol::Tcp }];
        let v6 =
            &state.frontends[&FrontendKey { vip: "fd00:96::10".parse().unwrap(), port: 80, protocol: Protocol::Tcp }];
        assert_eq!(v4.backends().map(ToString::to_string).collect::<Vec<_>>(), ["10.1.0.1:8080"]);
        assert_eq!(
            v6.backends().map(ToString::to_string).collect::<Vec<_>>(),
            ["[fd00:1::1]:8080", "[fd00:1::2]:8080"]
        );
        assert_eq!(v4.service, v6.service);
    }

    #[test]
    fn ip_families_must_match_ips_and_a_family_the_node_lacks_is_reported() {
        let swapped = DUAL_STACK.replace("ipFamilies: [IPv4, IPv6]", "ipFamilies: [IPv6, IPv4]");
        let (state, errors) = compute(&snapshot(&swapped), &Policy::default());
        assert!(state.frontends.is_empty());
        assert!(
            errors[0]
                .to_string()
                .contains("demo/web: spec.ipFamilies[0]: \"IPv6\" does not match spec.ips[0] 10.96.0.10"),
            "{errors:?}"
        );
        let short = DUAL_STACK.replace("ipFamilies: [IPv4, IPv6]", "ipFamilies: [IPv4]");
        let (_, errors) = compute(&snapshot(&short), &Policy::default());
        assert!(errors[0].to_string().contains("spec.ipFamilies: lists 1 families for 2 addresses"), "{errors:?}");
        let two_v4 = DUAL_STACK.replace(r#""fd00:96::10""#, r#""10.96.0.11""#).replace("ipFamilies: [IPv4, IPv6]", "");
        let (_, errors) = compute(&snapshot(&two_v4), &Policy::default());
        assert!(errors[0].to_string().contains("spec.ips[1]: a second IPv4 address"), "{errors:?}");

        let no_v6 = Policy { ipv6: false, ..Policy::default() };
        let (state, errors) = compute(&snapshot(DUAL_STACK), &no_v6);
        assert_eq!(state.frontends.len(), 1, "the IPv4 VIP is still served");
        assert!(errors[0].to_string().contains("spec.ips[1]: fd00:96::10 is IPv6 and this node has IPv6 disabled"));
    }

    #[test]
    fn ipv6_vips_are_checked_like_ipv4_ones() {
        for (vip, why) in [("::1", "loopback"), ("fe80::1", "link-local"), ("::ffff:10.96.0.10", "IPv4-mapped")] {
            let yaml = DUAL_STACK.replace("fd00:96::10", vip);
            let (_, errors) = compute(&snapshot(&yaml), &Policy::default());
            assert!(errors[0].to_string().contains(why), "{vip}: {errors:?}");
        }
        // A pod's address, and a range per family.
        let (_, errors) = compute(&snapshot(&DUAL_STACK.replace("fd00:96::10", "fd00:1::2")), &Policy::default());
        assert!(errors[0].to_string().contains("capture that pod's traffic"), "{errors:?}");
        let policy = Policy {
            vip_cidrs: vec!["10.96.0.0/16".parse().unwrap(), "fd00:97::/112".parse().unwrap()],
            ..Policy::default()
        };
        let (state, errors) = compute(&snapshot(DUAL_STACK), &policy);
        assert_eq!(state.frontends.len(), 1);
        assert!(
            errors[0].to_string().contains("spec.ips[1]: fd00:96::10 is outside --clusterset-ip-cidr fd00:97::/112")
        );
        let slice = DUAL_STACK.replace(r#"addresses: ["fd00:1::1"]"#, r#"addresses: ["10.1.0.9"]"#);
        let (_, errors) = compute(&snapshot(&slice), &Policy::default());
        assert!(
            errors[0].to_string().contains("endpoints[0].addresses[0]: \"10.1.0.9\" is not an IPv6 address"),
            "{errors:?}"
        );
    }
}
