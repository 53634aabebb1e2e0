//! Objects -> desired datapath state. Pure: no I/O, no clocks.
//!
//! A ServiceImport of type ClusterSetIP becomes one frontend per port
//! (`VIP:port/protocol`). Each frontend's backends are the ready endpoints of
//! the EndpointSlices labelled with the import's name, at the slice port that
//! has the same name and protocol as the import port.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use thiserror::Error;

use crate::{
    locality::{
        self, ANNOTATION_CLUSTER_WEIGHTS, DEFAULT_TIERS, LABEL_REGION, NodeLocality, Tier, TrafficDistribution,
        Weighted,
    },
    maglev,
    model::{
        ClusterIps, LABEL_SERVICE_NAME, LABEL_SOURCE_CLUSTER, Origin, ServiceImport, ServiceIp, Snapshot, object_ref,
    },
};

// The endpoint and address types live in the model, below every decision
// module; every module imports them from there.
use crate::model::{BackendAddr, Condition, Endpoint, FrontendKey, Locality, Protocol};

mod entry;
mod incremental;
#[cfg(test)]
mod tests;
mod validate;

use self::validate::*;
pub use self::{entry::*, incremental::*, validate::family_name};

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
    /// Whether sockets connected to `addr` may stay: it is an endpoint that
    /// is ready or still serving (drained by weight or terminating counts).
    pub fn keeps_sockets_to(&self, addr: &BackendAddr) -> bool {
        self.endpoints
            .binary_search_by(|e| e.addr.cmp(addr))
            .is_ok_and(|i| self.endpoints[i].condition != Condition::NotReady)
    }

    /// The endpoint at `addr`.
    pub fn endpoint(&self, addr: &BackendAddr) -> Option<&Endpoint> {
        self.endpoints.binary_search_by(|e| e.addr.cmp(addr)).ok().map(|i| &self.endpoints[i])
    }

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
    /// The cluster's Service ranges (`--service-cidr`, ServiceCIDR objects):
    /// a ClusterSetIP in one would take an address a Service may be given.
    pub service_ranges: Vec<ServiceRange>,
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
            service_ranges: Vec::new(),
            ipv6: true,
        }
    }
}

/// Set by MCS implementations that also create a Service for the import
/// (e.g. the mcs-api controller's `derived-<hash>` Service).
pub const ANNOTATION_DERIVED_SERVICE: &str = "multicluster.kubernetes.io/derived-service";

/// The annotations on a ServiceImport that name its derived Service (in the
/// import's namespace): the mcs-api controller's and Cilium's, and the AWS
/// Cloud Map controller's. Such a Service holds the ClusterSetIP as its
/// ClusterIP and is the one Service an import may share its address with.
pub const DERIVED_SERVICE_ANNOTATIONS: [&str; 2] = [ANNOTATION_DERIVED_SERVICE, "multicluster.k8s.aws/derived-service"];

/// The conventions by which an import's own derived Service is recognised,
/// as problems name them.
pub fn derived_conventions() -> String {
    let annotations: Vec<String> = DERIVED_SERVICE_ANNOTATIONS.iter().map(|a| format!("annotation {a}")).collect();
    format!("{}, or an ownerReference to the ServiceImport", annotations.join(", "))
}

/// A Service range and where it was learnt, for the problem that names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRange {
    pub net: ipnet::IpNet,
    /// `--service-cidr` or `ServiceCIDR <name>`.
    pub source: String,
}

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
    /// Selection slots per backend the tables are sized for: the slot budget
    /// lowers it when the tables would not fit (0: [`maglev::SLOTS_PER_BACKEND`]).
    pub slots_per_backend: u32,
}

impl Runtime {
    pub fn slots_per_backend(&self) -> u32 {
        if self.slots_per_backend == 0 { maglev::SLOTS_PER_BACKEND } else { self.slots_per_backend }
    }
}

/// The share of a frontend's new connections a probing backend gets.
pub const PROBE_SHARE: f64 = 0.05;

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

/// Why `vip` must not be served on this node, given where pods and the node are.
fn vip_conflict<'a>(
    vip: IpAddr,
    policy: &Policy,
    endpoint_slice: impl Fn(IpAddr) -> Option<&'a str>,
) -> Option<String> {
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
    if let Some(slice) = endpoint_slice(vip) {
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
            tier: u8::try_from(tier).expect("a handful of tiers"),
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
///
/// The whole-snapshot pass: the same per-service code as the incremental
/// [`Model`], over every service at once.
pub fn compute_with(snapshot: &Snapshot, policy: &Policy, runtime: &Runtime) -> (DesiredState, Vec<ObjectError>) {
    let mut model = Model::with_held(runtime.held.clone());
    model.set_cluster_ips(snapshot.cluster_ips.clone(), policy, runtime);
    model.replace(group_snapshot(snapshot), policy, runtime);
    let errors = model.errors().cloned().collect();
    (model.into_state(), errors)
}
