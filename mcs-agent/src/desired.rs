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

mod validate;
pub use self::validate::family_name;
use self::validate::*;

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

/// `(namespace, service name)`: what ties an import to its slices.
pub type ServiceRef = (String, String);

/// A ServiceImport, checked once when it arrives: passes read this, never
/// the object again, and only what a pass needs is kept.
#[derive(Debug)]
pub struct ImportEntry {
    origin: Origin,
    namespace: String,
    name: String,
    created: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// An MCS controller created a Service for it (an annotation of
    /// [`DERIVED_SERVICE_ANNOTATIONS`]): `--skip-derived` leaves it alone.
    derived: bool,
    /// The derived Service's name, as the annotation gives it.
    derived_service: Option<String>,
    valid: Result<Option<ValidImport>, ObjectError>,
    selector_results: Result<Option<Vec<BTreeSet<String>>>, (String, String)>,
}

impl ImportEntry {
    pub fn new(origin: &Origin, import: &ServiceImport) -> Self {
        let (namespace, name) = object_ref(&import.metadata);
        let annotations = import.metadata.annotations.as_ref();
        let derived = DERIVED_SERVICE_ANNOTATIONS.iter().find_map(|key| annotations.and_then(|a| a.get(*key)));
        Self {
            origin: origin.clone(),
            namespace,
            name,
            created: import.metadata.creation_timestamp.clone(),
            derived: derived.is_some(),
            derived_service: derived.filter(|name| !name.is_empty()).cloned(),
            valid: validate_import(origin, import),
            selector_results: cluster_selector_results(import),
        }
    }

    pub fn service(&self) -> ServiceRef {
        (self.namespace.clone(), self.name.clone())
    }

    fn error(&self, field: String, message: String) -> ObjectError {
        let origin = if self.origin.0.is_empty() { String::new() } else { format!("{}: ", self.origin) };
        let object = format!("{}/{}", self.namespace, self.name);
        ObjectError { origin, kind: "ServiceImport", object, field, message }
    }

    pub fn is_valid(&self) -> bool {
        self.valid.is_ok()
    }

    /// `service` is this import's own derived Service: named by its
    /// annotation, or owning the Service through `metadata.ownerReferences`.
    fn derived_from(&self, service: &ServiceIp) -> bool {
        service.namespace == self.namespace
            && (self.derived_service.as_deref() == Some(service.name.as_str())
                || service.owner_imports.contains(&self.name))
    }

    /// The ClusterSetIPs it asks for, when it is valid.
    fn vips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.valid.as_ref().ok().and_then(Option::as_ref).into_iter().flat_map(|v| v.vips.iter().map(|(ip, _)| *ip))
    }
}

/// An EndpointSlice, checked once when it arrives.
#[derive(Debug)]
pub struct SliceEntry {
    origin: Origin,
    namespace: String,
    name: String,
    /// Its `multicluster.kubernetes.io/service-name`: slices without it are not ours.
    service: Option<String>,
    valid: Result<Option<ValidSlice>, ObjectError>,
}

impl SliceEntry {
    pub fn new(origin: &Origin, slice: &EndpointSlice) -> Self {
        let (namespace, name) = object_ref(&slice.metadata);
        let service = slice.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)).cloned();
        // An unlabelled slice is never read: not worth checking.
        let valid = if service.is_some() { validate_slice(origin, slice) } else { Ok(None) };
        Self { origin: origin.clone(), namespace, name, service, valid }
    }

    pub fn service(&self) -> Option<ServiceRef> {
        self.service.as_ref().map(|s| (self.namespace.clone(), s.clone()))
    }

    pub fn is_valid(&self) -> bool {
        self.valid.is_ok()
    }

    fn sort_key(&self) -> (&str, &str, &Origin) {
        (&self.namespace, &self.name, &self.origin)
    }

    /// (address, `namespace/name`) of each endpoint, when it is valid.
    fn addresses(&self) -> BTreeSet<(IpAddr, std::sync::Arc<str>)> {
        let Ok(Some(valid)) = &self.valid else { return BTreeSet::new() };
        let name: std::sync::Arc<str> = format!("{}/{}", self.namespace, self.name).into();
        valid.endpoints.iter().map(|(ip, ..)| (*ip, name.clone())).collect()
    }
}

/// Everything one service is made of: its import(s) and its slices.
#[derive(Clone, Debug, Default)]
pub struct Group {
    pub imports: Vec<std::sync::Arc<ImportEntry>>,
    pub slices: Vec<std::sync::Arc<SliceEntry>>,
}

impl Group {
    pub fn is_empty(&self) -> bool {
        self.imports.is_empty() && self.slices.is_empty()
    }

    /// Same entries (by identity) in the same order: nothing to recompute.
    pub fn same_as(&self, other: &Group) -> bool {
        use std::sync::Arc;
        self.imports.len() == other.imports.len()
            && self.slices.len() == other.slices.len()
            && self.imports.iter().zip(&other.imports).all(|(a, b)| Arc::ptr_eq(a, b))
            && self.slices.iter().zip(&other.slices).all(|(a, b)| Arc::ptr_eq(a, b))
    }

    /// Puts slices in the order every pass reads them.
    pub fn sort(&mut self) {
        self.slices.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
    }
}

/// Groups a snapshot's objects by service.
pub fn group_snapshot(snapshot: &Snapshot) -> Vec<(ServiceRef, Group)> {
    let mut groups: BTreeMap<ServiceRef, Group> = BTreeMap::new();
    for (origin, import) in &snapshot.imports {
        let entry = ImportEntry::new(origin, import);
        groups.entry(entry.service()).or_default().imports.push(entry.into());
    }
    for (origin, slice) in &snapshot.slices {
        let entry = SliceEntry::new(origin, slice);
        if let Some(service) = entry.service() {
            groups.entry(service).or_default().slices.push(entry.into());
        }
    }
    groups
        .into_iter()
        .map(|(service, mut group)| {
            group.sort();
            (service, group)
        })
        .collect()
}

/// One service recomputed: its frontends and problems.
type Computed = (ServiceRef, Vec<(FrontendKey, Frontend)>, Vec<ObjectError>);

/// What one service contributed to the last pass.
#[derive(Debug, Default)]
struct Output {
    frontends: Vec<FrontendKey>,
    errors: Vec<ObjectError>,
}

/// What a pass changed: the frontends to re-plan, the problems that appeared
/// and those that went away.
#[derive(Debug, Default)]
pub struct Delta {
    pub frontends: BTreeSet<FrontendKey>,
    pub added: Vec<ObjectError>,
    /// As text: what was reported when it appeared.
    pub removed: Vec<String>,
    pub services: usize,
}

/// The objects by service and the desired state computed from them, kept
/// between passes so that a change recomputes only the services it touches.
///
/// Services depend on each other in three ways only, and all are indexed: a
/// ClusterSetIP claimed by several imports goes to one of them (`claims`),
/// and a ClusterSetIP may be neither an endpoint's address (`endpoints`) nor
/// a Service's ClusterIP (`cluster_ips`). A change recomputes its own service
/// and every service claiming an address whose claim or use changed.
#[derive(Debug, Default)]
pub struct Model {
    groups: HashMap<ServiceRef, Group>,
    /// Endpoint address -> slices (`namespace/name`) listing it, with counts.
    endpoints: HashMap<IpAddr, Listers>,
    /// ClusterSetIP -> services whose valid imports ask for it, with counts.
    claims: HashMap<IpAddr, BTreeMap<ServiceRef, u32>>,
    /// The cluster's Services by ClusterIP: a ClusterSetIP may not be one.
    cluster_ips: ClusterIps,
    outputs: HashMap<ServiceRef, Output>,
    state: DesiredState,
    /// ClusterSetIP -> the service serving it.
    held: BTreeMap<IpAddr, String>,
    /// Slots the desired tables take, over all frontends.
    slots: u64,
}

/// The slices listing one endpoint address: almost always one, so that case
/// takes no allocation of its own (at 100,000 endpoints this index is large).
#[derive(Debug)]
enum Listers {
    One(std::sync::Arc<str>),
    Many(BTreeMap<std::sync::Arc<str>, u32>),
}

impl Listers {
    fn add(&mut self, slice: std::sync::Arc<str>) {
        match self {
            Listers::One(only) => {
                let mut many = BTreeMap::from([(only.clone(), 1)]);
                *many.entry(slice).or_default() += 1;
                *self = Listers::Many(many);
            }
            Listers::Many(many) => *many.entry(slice).or_default() += 1,
        }
    }

    /// False when no slice lists the address any more.
    fn remove(&mut self, slice: &str) -> bool {
        match self {
            Listers::One(only) => **only != *slice,
            Listers::Many(many) => {
                if let Some(n) = many.get_mut(slice) {
                    *n -= 1;
                    if *n == 0 {
                        many.remove(slice);
                    }
                }
                !many.is_empty()
            }
        }
    }

    fn first(&self) -> Option<&std::sync::Arc<str>> {
        match self {
            Listers::One(only) => Some(only),
            Listers::Many(many) => many.keys().next(),
        }
    }
}

fn bump<K: Ord>(map: &mut BTreeMap<K, u32>, key: K, add: bool) {
    if add {
        *map.entry(key).or_default() += 1;
    } else if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

impl Model {
    pub fn with_held(held: BTreeMap<IpAddr, String>) -> Self {
        Self { held, ..Self::default() }
    }

    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    pub fn into_state(self) -> DesiredState {
        self.state
    }

    pub fn held(&self) -> &BTreeMap<IpAddr, String> {
        &self.held
    }

    /// Slots the desired selection tables take.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    pub fn service_count(&self) -> usize {
        self.groups.len()
    }

    pub fn services(&self) -> impl Iterator<Item = (&ServiceRef, &Group)> {
        self.groups.iter()
    }

    pub fn group(&self, service: &ServiceRef) -> Option<&Group> {
        self.groups.get(service)
    }

    /// Every current problem with an object.
    pub fn errors(&self) -> impl Iterator<Item = &ObjectError> {
        self.outputs.values().flat_map(|o| o.errors.iter())
    }

    /// (imports, invalid imports, slices, invalid slices) over all services.
    pub fn counts(&self) -> [u64; 4] {
        let mut c = [0u64; 4];
        for group in self.groups.values() {
            c[0] += group.imports.len() as u64;
            c[1] += group.imports.iter().filter(|i| !i.is_valid()).count() as u64;
            c[2] += group.slices.len() as u64;
            c[3] += group.slices.iter().filter(|s| !s.is_valid()).count() as u64;
        }
        c
    }

    /// Replaces services' objects (an empty group removes the service) and
    /// recomputes them and the services that depend on them.
    pub fn replace(&mut self, changes: Vec<(ServiceRef, Group)>, policy: &Policy, runtime: &Runtime) -> Delta {
        let mut dirty: BTreeSet<ServiceRef> = BTreeSet::new();
        let mut touched: BTreeSet<IpAddr> = BTreeSet::new();
        for (service, mut group) in changes {
            group.sort();
            let old = self.groups.remove(&service).unwrap_or_default();
            let addresses = |g: &Group| g.slices.iter().flat_map(|s| s.addresses()).collect::<BTreeSet<_>>();
            let (before, after) = (addresses(&old), addresses(&group));
            for (ip, slice) in before.difference(&after) {
                touched.insert(*ip);
                if let Some(listers) = self.endpoints.get_mut(ip)
                    && !listers.remove(slice)
                {
                    self.endpoints.remove(ip);
                }
            }
            for (ip, slice) in after.difference(&before) {
                touched.insert(*ip);
                match self.endpoints.get_mut(ip) {
                    Some(listers) => listers.add(slice.clone()),
                    None => {
                        self.endpoints.insert(*ip, Listers::One(slice.clone()));
                    }
                }
            }
            for (entries, add) in [(&old.imports, false), (&group.imports, true)] {
                for entry in entries.iter() {
                    for vip in entry.vips() {
                        touched.insert(vip);
                        let claimants = self.claims.entry(vip).or_default();
                        bump(claimants, service.clone(), add);
                        if claimants.is_empty() {
                            self.claims.remove(&vip);
                        }
                    }
                }
            }
            dirty.insert(service.clone());
            if !group.is_empty() {
                self.groups.insert(service, group);
            }
        }
        self.dirty_claimants(&touched, &mut dirty);
        self.recompute(dirty, policy, runtime)
    }

    /// Adds the services that claim or hold any of these addresses.
    fn dirty_claimants(&self, touched: &BTreeSet<IpAddr>, dirty: &mut BTreeSet<ServiceRef>) {
        for ip in touched {
            if let Some(claimants) = self.claims.get(ip) {
                dirty.extend(claimants.keys().cloned());
            }
            // A service that held this address and lost its claim must be seen too.
            if let Some(holder) = self.held.get(ip)
                && let Some((namespace, name)) = holder.split_once('/')
            {
                dirty.insert((namespace.to_owned(), name.to_owned()));
            }
        }
    }

    /// Replaces the cluster's Services by ClusterIP and recomputes the
    /// services claiming an address whose Service appeared, went or changed.
    pub fn set_cluster_ips(&mut self, cluster_ips: ClusterIps, policy: &Policy, runtime: &Runtime) -> Delta {
        let old = std::mem::replace(&mut self.cluster_ips, cluster_ips);
        let new = &self.cluster_ips;
        let touched: BTreeSet<IpAddr> = old
            .iter()
            .filter(|(ip, service)| new.get(ip) != Some(service))
            .chain(new.iter().filter(|(ip, service)| old.get(ip) != Some(service)))
            .map(|(ip, _)| *ip)
            .collect();
        let mut dirty = BTreeSet::new();
        self.dirty_claimants(&touched, &mut dirty);
        self.recompute(dirty, policy, runtime)
    }

    /// Why `entry` may not serve `vip` as far as the cluster's Services go: a
    /// Service holds it, or it lies in a Service range, and that Service is
    /// not the import's own derived one.
    fn service_conflict(&self, vip: IpAddr, entry: &ImportEntry, policy: &Policy) -> Option<String> {
        match self.cluster_ips.get(&vip) {
            Some(service) if entry.derived_from(service) => None,
            Some(service) => Some(format!(
                "{vip} is the ClusterIP of Service {service}; serving it would capture that Service's traffic (an import may share its address only with its own derived Service: {})",
                derived_conventions()
            )),
            None => policy.service_ranges.iter().find(|r| r.net.contains(&vip)).map(|range| {
                format!(
                    "{vip} lies in the Service range {} ({}): a Service may be given this address; choose a ClusterSetIP outside the cluster's Service ranges",
                    range.net, range.source
                )
            }),
        }
    }

    /// Recomputes every service (policy or passive health changed, or a full
    /// resync).
    pub fn recompute_all(&mut self, policy: &Policy, runtime: &Runtime) -> Delta {
        let dirty: BTreeSet<ServiceRef> = self.groups.keys().chain(self.outputs.keys()).cloned().collect();
        self.recompute(dirty, policy, runtime)
    }

    fn recompute(&mut self, dirty: BTreeSet<ServiceRef>, policy: &Policy, runtime: &Runtime) -> Delta {
        let mut delta = Delta { services: dirty.len(), ..Delta::default() };
        // Decide every dirty service against the state before this pass, then apply.
        let dirty: Vec<ServiceRef> = dirty.into_iter().collect();
        let compute = |part: &[ServiceRef]| -> Vec<Computed> {
            part.iter()
                .map(|service| {
                    let (frontends, errors) = self.compute_service(service, policy, runtime);
                    (service.clone(), frontends, errors)
                })
                .collect()
        };
        // A full pass over tens of thousands of services: on every CPU.
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        let results = if dirty.len() < 512 || workers == 1 {
            compute(&dirty)
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = dirty
                    .chunks(dirty.len().div_ceil(workers))
                    .map(|part| scope.spawn(move || compute(part)))
                    .collect();
                handles.into_iter().flat_map(|h| h.join().expect("a compute thread panicked")).collect::<Vec<_>>()
            })
        };
        let mut old_errors = Vec::new();
        for (service, ..) in &results {
            let Some(old) = self.outputs.remove(service) else { continue };
            let name = format!("{}/{}", service.0, service.1);
            for key in old.frontends {
                if let Some(f) = self.state.frontends.remove(&key) {
                    self.slots -= u64::from(f.table_size);
                }
                if self.held.get(&key.vip) == Some(&name) {
                    self.held.remove(&key.vip);
                }
                delta.frontends.insert(key);
            }
            old_errors.push(old.errors);
        }
        let old_errors: BTreeSet<String> = old_errors.iter().flatten().map(ToString::to_string).collect();
        let mut new_errors = BTreeSet::new();
        for (service, frontends, errors) in results {
            let name = format!("{}/{}", service.0, service.1);
            let mut keys = Vec::with_capacity(frontends.len());
            for (key, frontend) in frontends {
                self.slots += u64::from(frontend.table_size);
                self.held.insert(key.vip, name.clone());
                self.state.frontends.insert(key, frontend);
                delta.frontends.insert(key);
                keys.push(key);
            }
            for e in &errors {
                let text = e.to_string();
                if !old_errors.contains(&text) {
                    delta.added.push(e.clone());
                }
                new_errors.insert(text);
            }
            if !keys.is_empty() || !errors.is_empty() {
                self.outputs.insert(service, Output { frontends: keys, errors });
            }
        }
        // Problems of recomputed services that are gone now.
        delta.removed = old_errors.difference(&new_errors).cloned().collect();
        delta
    }

    /// Sizes every table for `per_backend` slots per backend (the slot
    /// budget), as a recompute would; the frontends whose size changed.
    pub fn resize_tables(&mut self, max: u32, per_backend: u32) -> BTreeSet<FrontendKey> {
        let mut changed = BTreeSet::new();
        for (key, f) in &mut self.state.frontends {
            let size = if f.weights.is_empty() { 0 } else { maglev::table_size_for(f.weights.len(), max, per_backend) };
            if size != f.table_size {
                self.slots = self.slots - u64::from(f.table_size) + u64::from(size);
                f.table_size = size;
                changed.insert(*key);
            }
        }
        changed
    }

    /// The first slice (by `namespace/name`) listing `ip` as an endpoint.
    fn endpoint_slice(&self, ip: IpAddr) -> Option<&str> {
        self.endpoints.get(&ip).and_then(Listers::first).map(|s| &**s)
    }

    /// Which import gets `vip`: of the valid imports asking for it, the one
    /// whose service serves it now, then the oldest, then the first by name.
    fn order_key<'a>(&self, vip: IpAddr, entry: &'a ImportEntry) -> impl Ord + 'a {
        let holds = self.held.get(&vip).and_then(|h| h.split_once('/'))
            == Some((entry.namespace.as_str(), entry.name.as_str()));
        let created = entry.created.as_ref().map(|t| t.0);
        (!holds, created.is_none(), created, &entry.namespace, &entry.name, &entry.origin)
    }

    fn owner(&self, vip: IpAddr, policy: &Policy) -> Option<&std::sync::Arc<ImportEntry>> {
        let claimants = self.claims.get(&vip)?;
        claimants
            .keys()
            .filter_map(|service| self.groups.get(service))
            .flat_map(|g| g.imports.iter())
            .filter(|entry| !(policy.skip_derived && entry.derived) && entry.vips().any(|v| v == vip))
            .filter(|entry| self.service_conflict(vip, entry, policy).is_none())
            .min_by(|a, b| self.order_key(vip, a).cmp(&self.order_key(vip, b)))
    }

    fn compute_service(
        &self,
        service: &ServiceRef,
        policy: &Policy,
        runtime: &Runtime,
    ) -> (Vec<(FrontendKey, Frontend)>, Vec<ObjectError>) {
        let mut errors = Vec::new();
        let mut frontends = Vec::new();
        let Some(group) = self.groups.get(service) else { return (frontends, errors) };
        let mut slices = Vec::new();
        for slice in &group.slices {
            match &slice.valid {
                Ok(Some(valid)) => {
                    errors.extend(valid.skipped.iter().cloned());
                    slices.push(valid);
                }
                Ok(None) => {}
                Err(e) => errors.push(e.clone()),
            }
        }
        let mut imports: Vec<&std::sync::Arc<ImportEntry>> = group.imports.iter().collect();
        imports.sort_by_key(|e| (e.created.as_ref().map(|t| t.0), &e.origin));
        let name = format!("{}/{}", service.0, service.1);
        for entry in imports {
            if policy.skip_derived && entry.derived {
                continue;
            }
            let valid = match &entry.valid {
                Ok(Some(valid)) => valid,
                Ok(None) => continue,
                Err(e) => {
                    errors.push(e.clone());
                    continue;
                }
            };
            errors.extend(valid.skipped.iter().cloned());
            // Families are independent, as ports are: a VIP that may not be
            // served is reported, the import's other VIP still is.
            let mut vips = Vec::new();
            for (vip, index) in &valid.vips {
                let why = vip_conflict(*vip, policy, |ip| self.endpoint_slice(ip))
                    .or_else(|| self.service_conflict(*vip, entry, policy));
                if let Some(why) = why {
                    errors.push(entry.error(format!("spec.ips[{index}]"), why));
                } else if let Some(owner) = self.owner(*vip, policy)
                    && !std::sync::Arc::ptr_eq(owner, entry)
                {
                    let owner = format!("{}/{}", owner.namespace, owner.name);
                    errors.push(
                        entry.error(
                            format!("spec.ips[{index}]"),
                            format!("{vip} is already the ClusterSetIP of {owner}"),
                        ),
                    );
                } else {
                    vips.push(*vip);
                }
            }
            if vips.is_empty() {
                continue;
            }
            let selector_results = match &entry.selector_results {
                Ok(results) => results.as_deref(),
                Err((field, message)) => {
                    // Alpha and optional: a shape we do not know leaves the import
                    // served by all clusters, and is reported.
                    errors.push(entry.error(field.clone(), format!("{message}; all clusters are used")));
                    None
                }
            };
            let tiers = valid.traffic_distribution.map_or_else(|| policy.tiers.clone(), TrafficDistribution::tiers);
            for vip in &vips {
                for (key, port_name) in &valid.ports {
                    let key = FrontendKey { vip: *vip, ..*key };
                    let mut endpoints: BTreeMap<BackendAddr, Endpoint> = BTreeMap::new();
                    for slice in &slices {
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
                        selector_results,
                        &tiers,
                        policy,
                        runtime,
                    );
                    let table_size = if weights.is_empty() {
                        0
                    } else {
                        maglev::table_size_for(weights.len(), policy.max_table_size, runtime.slots_per_backend())
                    };
                    frontends.push((
                        key,
                        Frontend {
                            service: name.clone(),
                            port_name: port_name.clone(),
                            endpoints,
                            tiers: tiers.clone(),
                            weights,
                            table_size,
                            affinity_timeout_secs: valid.affinity_timeout_secs,
                        },
                    ));
                }
            }
        }
        (frontends, errors)
    }
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
    fn sockets_stay_with_ready_drained_and_terminating_endpoints_only() {
        // Cluster b drained by weight; 10.1.0.2 not ready; 10.1.0.3 terminating but serving.
        let annotated = IMPORT.replace(
            "metadata: {name: web, namespace: demo}",
            "metadata: {name: web, namespace: demo, annotations: {mcs-agent.io/cluster-weights: \"a=1,b=0\"}}",
        );
        let yaml = format!(
            "{annotated}{}{}",
            slice(
                "web-a",
                "a",
                r#"[{addresses: ["10.1.0.1"]}, {addresses: ["10.1.0.2"], conditions: {ready: false}},
                   {addresses: ["10.1.0.3"], conditions: {ready: false, serving: true, terminating: true}}]"#
            ),
            slice("web-b", "b", r#"[{addresses: ["10.2.0.1"]}]"#)
        );
        let (state, _) = compute(&snapshot(&yaml), &Policy::default());
        let key = FrontendKey { vip: Ipv4Addr::new(10, 96, 0, 10).into(), port: 53, protocol: Protocol::Udp };
        let frontend = &state.frontends[&key];
        let keeps = |ip: [u8; 4]| frontend.keeps_sockets_to(&BackendAddr { ip: Ipv4Addr::from(ip).into(), port: 5353 });
        assert!(keeps([10, 1, 0, 1]), "ready");
        assert!(keeps([10, 2, 0, 1]), "drained by weight: still a member");
        assert!(keeps([10, 1, 0, 3]), "terminating but serving: draining");
        assert!(!keeps([10, 1, 0, 2]), "not ready: gone");
        assert!(!keeps([10, 9, 9, 9]), "never listed");
        assert!(
            !frontend.keeps_sockets_to(&BackendAddr { ip: Ipv4Addr::new(10, 1, 0, 1).into(), port: 53 }),
            "other port"
        );
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

    fn service(namespace: &str, name: &str, owner_imports: &[&str]) -> ServiceIp {
        let owner_imports = owner_imports.iter().map(|o| (*o).to_owned()).collect();
        ServiceIp { namespace: namespace.into(), name: name.into(), owner_imports }
    }

    fn with_cluster_ip(yaml: &str, owner: ServiceIp) -> Snapshot {
        let mut snapshot = snapshot(yaml);
        snapshot.cluster_ips.insert(Ipv4Addr::new(10, 96, 0, 10).into(), owner);
        snapshot
    }

    #[test]
    fn a_vip_that_is_a_services_cluster_ip_is_refused_naming_the_service() {
        let (state, errors) =
            compute(&with_cluster_ip(IMPORT, service("kube-system", "kube-dns", &[])), &Policy::default());
        assert!(state.frontends.is_empty(), "kube-dns's traffic must not be captured");
        let text = errors[0].to_string();
        assert!(
            text.contains(
                "ServiceImport demo/web: spec.ips[0]: 10.96.0.10 is the ClusterIP of Service kube-system/kube-dns"
            ),
            "{text}"
        );
        // Another import's derived Service is not this import's.
        let other = IMPORT.replace(
            "metadata: {name: web, namespace: demo}",
            "metadata: {name: web, namespace: demo, annotations: {multicluster.kubernetes.io/derived-service: derived-web}}",
        );
        let (state, errors) =
            compute(&with_cluster_ip(&other, service("demo", "derived-api", &[])), &Policy::default());
        assert!(state.frontends.is_empty() && errors[0].to_string().contains("Service demo/derived-api"));
        // Nor is a Service of the same name in another namespace.
        let (state, _) = compute(&with_cluster_ip(&other, service("prod", "derived-web", &[])), &Policy::default());
        assert!(state.frontends.is_empty());
    }

    #[test]
    fn each_derived_service_convention_lets_the_import_serve_its_services_cluster_ip() {
        let ranges = Policy {
            service_ranges: vec![ServiceRange {
                net: "10.96.0.0/12".parse().unwrap(),
                source: "--service-cidr".into(),
            }],
            ..Policy::default()
        };
        let annotated = |key: &str| {
            IMPORT.replace(
                "metadata: {name: web, namespace: demo}",
                &format!("metadata: {{name: web, namespace: demo, annotations: {{{key}: derived-abc}}}}"),
            )
        };
        let cases = [
            (
                "mcs-api controller and Cilium",
                annotated(ANNOTATION_DERIVED_SERVICE),
                service("demo", "derived-abc", &[]),
            ),
            ("AWS Cloud Map", annotated("multicluster.k8s.aws/derived-service"), service("demo", "derived-abc", &[])),
            ("ownerReference", IMPORT.to_owned(), service("demo", "anything", &["web"])),
        ];
        for (convention, yaml, owner) in cases {
            // Inside the Service range too: the derived Service's address is allowed there.
            let (state, errors) = compute(&with_cluster_ip(&yaml, owner), &ranges);
            assert!(errors.is_empty(), "{convention}: {errors:?}");
            assert_eq!(state.frontends.len(), 3, "{convention}: served");
        }
    }

    #[test]
    fn a_vip_in_a_service_range_is_refused_naming_the_range() {
        let policy = Policy {
            service_ranges: vec![ServiceRange {
                net: "10.96.0.0/12".parse().unwrap(),
                source: "ServiceCIDR kubernetes".into(),
            }],
            ..Policy::default()
        };
        let (state, errors) = compute(&snapshot(IMPORT), &policy);
        assert!(state.frontends.is_empty());
        let text = errors[0].to_string();
        assert!(
            text.contains("spec.ips[0]: 10.96.0.10 lies in the Service range 10.96.0.0/12 (ServiceCIDR kubernetes)"),
            "{text}"
        );
        // Outside every range, with no Service at the address: served.
        let outside = IMPORT.replace("10.96.0.10", "198.18.0.10");
        let (state, errors) = compute(&snapshot(&outside), &policy);
        assert!(errors.is_empty() && state.frontends.len() == 3, "{errors:?}");
    }

    #[test]
    fn a_service_that_appears_or_goes_recomputes_only_the_import_at_its_address() {
        let other = IMPORT.replace("name: web,", "name: api,").replace("10.96.0.10", "198.18.0.11");
        let (snap, errors) = parse_documents(&Origin("t.yaml".into()), &format!("{IMPORT}---{other}"));
        assert!(errors.is_empty(), "{errors:?}");
        let mut model = Model::default();
        let (policy, runtime) = (Policy::default(), Runtime::default());
        model.replace(group_snapshot(&snap), &policy, &runtime);
        assert_eq!(model.state().frontends.len(), 6);
        let dns = ClusterIps::from([(Ipv4Addr::new(10, 96, 0, 10).into(), service("kube-system", "kube-dns", &[]))]);
        let delta = model.set_cluster_ips(dns.clone(), &policy, &runtime);
        assert_eq!(delta.services, 1, "only demo/web claims 10.96.0.10");
        assert_eq!(model.state().frontends.len(), 3, "demo/web's three frontends are withdrawn");
        assert!(delta.added[0].to_string().contains("Service kube-system/kube-dns"));
        assert_eq!(model.set_cluster_ips(dns, &policy, &runtime).services, 0, "nothing changed: nothing recomputed");
        let delta = model.set_cluster_ips(ClusterIps::new(), &policy, &runtime);
        assert_eq!((delta.services, delta.removed.len()), (1, 1), "the Service went: the problem is resolved");
        assert_eq!(model.state().frontends.len(), 6);
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

#[cfg(test)]
mod incremental_tests {
    //! The incremental model against the whole-snapshot pass: after every
    //! change of a random sequence, recomputing only what the change touched
    //! gives the state and problems a full pass gives from the same start.

    use super::*;
    use crate::source::manifests::parse_documents;

    /// xorshift: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    const SERVICES: u64 = 6;
    /// VIPs and endpoint addresses share a pool, so imports contend for VIPs
    /// and endpoints capture them.
    fn addr(i: u64) -> String {
        format!("10.0.0.{}", i + 1)
    }

    fn random_service(rng: &mut Rng, i: u64) -> String {
        let mut yaml = String::new();
        if rng.next(5) > 0 {
            let ips = match rng.next(6) {
                0 => String::new(),
                1 => r#""not-an-ip""#.to_owned(),
                _ => format!(r#""{}""#, addr(rng.next(8))),
            };
            let created = if rng.next(3) == 0 {
                String::new()
            } else {
                format!("creationTimestamp: \"2026-01-0{}T00:00:00Z\"", 1 + rng.next(3))
            };
            let port = if rng.next(2) == 0 { "80" } else { "8080" };
            yaml.push_str(&format!(
                "apiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceImport\nmetadata: {{name: svc-{i}, namespace: ns, {created}}}\nspec:\n  type: ClusterSetIP\n  ips: [{ips}]\n  ports:\n  - {{name: http, port: {port}, protocol: TCP}}\n---\n"
            ));
        }
        for s in 0..rng.next(3) {
            let endpoints: Vec<String> = (0..rng.next(4))
                .map(|_| {
                    let ready = rng.next(4) > 0;
                    format!(
                        "  - addresses: [\"{}\"]\n    conditions: {{ready: {ready}}}\n",
                        addr(8 + rng.next(6).min(5) - if rng.next(3) == 0 { 8 } else { 0 })
                    )
                })
                .collect();
            let cluster = ["east", "west"][rng.next(2) as usize];
            let target = 8000 + rng.next(2);
            yaml.push_str(&format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-{s}\n  namespace: ns\n  labels: {{multicluster.kubernetes.io/service-name: svc-{i}, multicluster.kubernetes.io/source-cluster: {cluster}}}\naddressType: IPv4\nports:\n- {{name: http, port: {target}, protocol: TCP}}\nendpoints:\n{}---\n",
                if endpoints.is_empty() { "  []\n".to_owned() } else { endpoints.concat() }
            ).replace("endpoints:\n  []\n", "endpoints: []\n"));
        }
        yaml
    }

    fn groups(files: &BTreeMap<u64, String>) -> Vec<(ServiceRef, Group)> {
        let mut snapshot = Snapshot::default();
        for (i, yaml) in files {
            let (part, errors) = parse_documents(&Origin(format!("svc-{i}.yaml")), yaml);
            assert!(errors.is_empty(), "{errors:?}\n{yaml}");
            snapshot.imports.extend(part.imports);
            snapshot.slices.extend(part.slices);
        }
        group_snapshot(&snapshot)
    }

    fn sorted_errors(model: &Model) -> Vec<String> {
        let mut errors: Vec<String> = model.errors().map(ToString::to_string).collect();
        errors.sort();
        errors
    }

    #[test]
    fn incremental_passes_give_what_a_full_pass_gives() {
        let policy = Policy::default();
        let mut seen = [0usize; 4];
        for seed in 1..=40u64 {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
            let mut files: BTreeMap<u64, String> = BTreeMap::new();
            let mut incremental = Model::default();
            let mut cluster_ips = ClusterIps::new();
            for step in 0..60 {
                let held = incremental.held().clone();
                if rng.next(4) == 0 {
                    // The cluster's Services move (a pass of its own, as in the
                    // agent): one may hold a ClusterSetIP, owned by the import
                    // asking for it or not.
                    cluster_ips = (0..rng.next(3))
                        .map(|_| {
                            let owners =
                                if rng.next(2) == 0 { vec![format!("svc-{}", rng.next(SERVICES))] } else { vec![] };
                            let service =
                                ServiceIp { namespace: "ns".into(), name: "svc".into(), owner_imports: owners };
                            (addr(rng.next(8)).parse().unwrap(), service)
                        })
                        .collect();
                    incremental.set_cluster_ips(cluster_ips.clone(), &policy, &Runtime::default());
                } else {
                    // One to three services change at once, as in a debounce window.
                    let mut changed = BTreeSet::new();
                    for _ in 0..=rng.next(3) {
                        let i = rng.next(SERVICES);
                        changed.insert(i);
                        if rng.next(6) == 0 {
                            files.remove(&i);
                        } else {
                            files.insert(i, random_service(&mut rng, i));
                        }
                    }
                    // What the manifest source hands over: every object of each changed service.
                    let all = groups(&files);
                    let changes: Vec<(ServiceRef, Group)> = changed
                        .iter()
                        .map(|i| {
                            let service = ("ns".to_owned(), format!("svc-{i}"));
                            let group =
                                all.iter().find(|(s, _)| *s == service).map(|(_, g)| g.clone()).unwrap_or_default();
                            (service, group)
                        })
                        .collect();
                    incremental.replace(changes, &policy, &Runtime::default());
                }

                let mut full = Model::with_held(held);
                full.set_cluster_ips(cluster_ips.clone(), &policy, &Runtime::default());
                full.replace(groups(&files), &policy, &Runtime::default());
                assert_eq!(
                    incremental.state(),
                    full.state(),
                    "seed {seed} step {step}: the incremental state differs from a full pass\n{files:#?}"
                );
                assert_eq!(
                    sorted_errors(&incremental),
                    sorted_errors(&full),
                    "seed {seed} step {step}: problems differ"
                );
                assert_eq!(incremental.slots(), full.slots());
                let errors = sorted_errors(&full);
                seen[0] += full.state().frontends.len();
                seen[1] += errors.iter().filter(|e| e.contains("is already the ClusterSetIP")).count();
                seen[2] += errors.iter().filter(|e| e.contains("is the address of an endpoint")).count();
                seen[3] += errors.iter().filter(|e| e.contains("is the ClusterIP of Service")).count();
            }
        }
        // The sequences must exercise what makes services depend on each other.
        assert!(
            seen.iter().all(|&n| n > 100),
            "frontends, contended VIPs, captured VIPs, Services' ClusterIPs: {seen:?}"
        );
    }
}
