//! Kubernetes mode: reflectors over ServiceImports, the MCS EndpointSlices,
//! this node and the ClusterProperty feed the same pure reconcile as
//! standalone mode; Services and ServiceCIDRs tell which addresses a
//! ClusterSetIP must not take. Every watch event is only a "something changed" signal;
//! the agent recomputes from the whole cache (level-triggered).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt::Debug,
    hash::Hash,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{Node, ObjectReference, Pod, Service},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, info};

pub(crate) mod index;
mod slice;

pub use index::{ServiceIndex, Touched};
pub use slice::StoredSlice;

use crate::{
    desired::{DERIVED_SERVICE_ANNOTATIONS, Group, ImportEntry, ObjectError, ServiceRange, ServiceRef, SliceEntry},
    model::{
        ClusterIps, LABEL_SERVICE_NAME, LABEL_SOURCE_CLUSTER, MCS_GROUP, Origin, ServiceImport, Snapshot, object_ref,
        service_ips,
    },
};

pub const CLUSTER_PROPERTY_GROUP: &str = "about.k8s.io";
/// Served versions of the ClusterProperty API, preferred first (the CRD in
/// deploy/crds serves v1beta1; older installations v1alpha1).
pub const CLUSTER_PROPERTY_VERSIONS: [&str; 2] = ["v1beta1", "v1alpha1"];
/// The well-known ClusterProperty that names this cluster (KEP-2149).
pub const CLUSTER_ID_PROPERTY: &str = "cluster.clusterset.k8s.io";
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
pub const LABEL_REGION: &str = "topology.kubernetes.io/region";

#[derive(Debug, Error)]
pub enum KubeSourceError {
    #[error(
        "no ServiceImport API: neither multicluster.x-k8s.io/v1beta1 nor v1alpha1 serves serviceimports (install the MCS CRDs: deploy/crds)"
    )]
    NotInstalled,
    #[error("asking the API server which ServiceImport version it serves: {0}")]
    Discovery(#[source] kube::Error),
}

/// What the watchers report to the agent's loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// A cache changed (or a watch started or restarted).
    Changed,
    /// These manifest files changed (standalone mode).
    Files(Vec<std::path::PathBuf>),
    /// These services' ServiceImports or EndpointSlices changed (Kubernetes mode).
    Services(Vec<ServiceRef>),
    /// A watch failed; it backs off and retries on its own. `what` names the resource.
    Error { what: &'static str, message: String },
    /// The watch of `what` works again after an `Error`.
    Resumed { what: &'static str },
}

/// The ServiceImport API to watch: v1beta1 when served, else v1alpha1.
pub async fn service_import_resource(client: &Client) -> Result<ApiResource, KubeSourceError> {
    for version in ["v1beta1", "v1alpha1"] {
        match client.list_api_group_resources(&format!("{MCS_GROUP}/{version}")).await {
            Ok(list) if list.resources.iter().any(|r| r.name == "serviceimports") => {
                let gvk = GroupVersionKind::gvk(MCS_GROUP, version, "ServiceImport");
                return Ok(ApiResource::from_gvk_with_plural(&gvk, "serviceimports"));
            }
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(KubeSourceError::Discovery(e)),
        }
    }
    Err(KubeSourceError::NotInstalled)
}

/// The first of `versions` of `group` that serves `plural`, by discovery.
async fn discover(client: &Client, group: &str, versions: &[&str], kind: &str, plural: &str) -> Option<ApiResource> {
    for version in versions {
        if let Ok(list) = client.list_api_group_resources(&format!("{group}/{version}")).await
            && list.resources.iter().any(|r| r.name == plural)
        {
            return Some(ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural));
        }
    }
    None
}

/// Served versions of the ServiceCIDR API, preferred first (GA in
/// Kubernetes 1.33, beta in 1.31 and 1.32).
pub const SERVICE_CIDR_VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// Keeps of an EndpointSlice what the agent reads: its name, the MCS and
/// region labels, ports and endpoints' addresses, conditions, zone and node.
/// Managed fields (often half an object), annotations, targetRefs and hints
/// are dropped as objects arrive: at 10,000 services the reflector holds
/// every slice.
fn prune_slice(slice: &mut StoredSlice) {
    let meta = &mut slice.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    if let Some(labels) = &mut meta.labels {
        labels.retain(|key, _| [LABEL_SERVICE_NAME, LABEL_SOURCE_CLUSTER, LABEL_REGION].contains(&key.as_str()));
    }
}

/// Keeps of a ServiceImport what the agent reads: managed fields go, and of
/// the annotations those it reads (the derived Service's, the cluster
/// weights), of the status its cluster selector results.
fn prune_import(import: &mut DynamicObject) {
    let meta = &mut import.metadata;
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.retain(|key, _| {
            DERIVED_SERVICE_ANNOTATIONS.contains(&key.as_str()) || key == crate::locality::ANNOTATION_CLUSTER_WEIGHTS
        });
    }
    if let Some(status) = import.data.get_mut("status").and_then(serde_json::Value::as_object_mut) {
        status.retain(|key, _| key == "clusterSelectorResults");
    }
}

/// Keeps of a Service only what the ClusterSetIP safety rules read (its
/// name, ClusterIPs and ownerReferences): a cluster has many Services and
/// the agent holds them all.
fn prune_service(service: &mut Service) {
    let meta = &mut service.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.labels = None;
    service.status = None;
    if let Some(spec) = service.spec.take() {
        service.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ip: spec.cluster_ip,
            cluster_ips: spec.cluster_ips,
            ..Default::default()
        });
    }
}

/// How often a failing resource is asked whether it answers again: a watch
/// that resumes without any change yields no event to notice it by.
const RECOVERY_PROBE: Duration = Duration::from_secs(2);

/// Delays between the retries of a failing watch: from 250 ms, doubling, at
/// most 2 s, each drawn between half and all of that (jitter, so a fleet of
/// agents does not retry in step).
///
/// kube's default grows to 30 s, so an agent whose API had been away for
/// a while noticed its return up to 30 s late, and a change compacted away
/// meanwhile (410 Gone: one more failure before the relist) later still.
/// With this cap the relist follows within about 4 s (two retries). The
/// price is at most one request per watch every 1 to 2 s per agent while
/// the API fails, which fail fast or are shed by API Priority and Fairness.
///
/// A reset counts only after [`RetryBackoff::QUIET`] without a failure:
/// kube resets the backoff on any event, and its watcher emits one (`Init`)
/// without asking the API before each relist, so a list that kept failing
/// would otherwise be retried every 250 ms forever.
#[derive(Clone, Debug)]
pub struct RetryBackoff {
    next: Duration,
    last_failure: Option<Instant>,
    /// xorshift state for the jitter, seeded per watch.
    seed: u64,
}

impl RetryBackoff {
    pub const FIRST: Duration = Duration::from_millis(250);
    pub const MAX: Duration = Duration::from_secs(2);
    pub const QUIET: Duration = Duration::from_secs(10);

    pub fn new() -> Self {
        use std::hash::{BuildHasher as _, Hasher as _};
        let seed = std::collections::hash_map::RandomState::new().build_hasher().finish() | 1;
        Self { next: Self::FIRST, last_failure: None, seed }
    }

    /// The delay before retrying a failure at `now`.
    pub fn next_at(&mut self, now: Instant) -> Duration {
        if self.last_failure.is_some_and(|last| now.saturating_duration_since(last) >= Self::QUIET) {
            self.next = Self::FIRST;
        }
        self.last_failure = Some(now);
        let ceiling = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        // Between half and all of the ceiling.
        let fraction = 0.5 + (self.seed % 1024) as f64 / 2048.0;
        ceiling.mul_f64(fraction)
    }

    /// The watch worked at `now`: start again from the first delay, unless
    /// it failed within [`RetryBackoff::QUIET`].
    pub fn reset_at(&mut self, now: Instant) {
        if self.last_failure.is_none_or(|last| now.saturating_duration_since(last) >= Self::QUIET) {
            self.next = Self::FIRST;
        }
    }
}

impl Default for RetryBackoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Iterator for RetryBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_at(Instant::now()))
    }
}

impl kube::runtime::utils::Backoff for RetryBackoff {
    fn reset(&mut self) {
        self.reset_at(Instant::now());
    }
}

/// An object's service, for a [`ServiceIndex`].
type ServiceOf<K> = fn(&K) -> Option<ServiceRef>;

/// What a reflector's events signal beyond "something changed".
struct Signals<K> {
    /// Only a change to what this reads of an object matters.
    fingerprint: Option<fn(&K) -> u64>,
    /// Objects by service: a change names the services it touched.
    index: Option<(Arc<Mutex<ServiceIndex>>, ServiceOf<K>)>,
}

impl<K> Default for Signals<K> {
    fn default() -> Self {
        Self { fingerprint: None, index: None }
    }
}

/// Runs one reflector until the agent stops, reporting every change and
/// error, and when the resource answers again after an error.
fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    what: &'static str,
    events: UnboundedSender<SourceEvent>,
    prune: fn(&mut K),
    signals: Signals<K>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let Signals { fingerprint, index } = signals;
    tokio::spawn(async move {
        // Every event goes into the index, whatever is signalled.
        let touched = |event: &watcher::Event<K>| {
            index
                .as_ref()
                .map(|(index, service)| index.lock().unwrap_or_else(|e| e.into_inner()).on_event(event, service))
        };
        let mut seen = HashMap::new();
        // The same selectors as the watch, one object at most: the cheapest
        // request that needs the same permission and the same server.
        let mut probe_params = ListParams::default().limit(1);
        probe_params.label_selector = config.label_selector.clone();
        probe_params.field_selector = config.field_selector.clone();
        let mut stream =
            watcher(api.clone(), config).backoff(RetryBackoff::new()).modify(prune).reflect(writer).boxed();
        let mut failing = false;
        loop {
            let signal = tokio::select! {
                event = stream.next() => match event {
                    None => break,
                    Some(Ok(event)) if failing => {
                        touched(&event);
                        failing = false;
                        if events.send(SourceEvent::Resumed { what }).is_err() {
                            break;
                        }
                        SourceEvent::Changed
                    }
                    Some(Ok(event)) => {
                        if let Some(fingerprint) = fingerprint
                            && !event_matters(&event, fingerprint, &mut seen)
                        {
                            continue;
                        }
                        match touched(&event) {
                            Some(Touched::Services(services)) if services.is_empty() => continue,
                            Some(Touched::Services(services)) => SourceEvent::Services(services),
                            Some(Touched::Nothing) => continue,
                            Some(Touched::All) | None => SourceEvent::Changed,
                        }
                    }
                    Some(Err(e)) => {
                        failing = true;
                        SourceEvent::Error { what, message: e.to_string() }
                    }
                },
                () = tokio::time::sleep(RECOVERY_PROBE), if failing => {
                    if api.list_metadata(&probe_params).await.is_err() {
                        continue;
                    }
                    failing = false;
                    SourceEvent::Resumed { what }
                }
            };
            if events.send(signal).is_err() {
                break;
            }
        }
        debug!(what, "watch ended");
    });
}

/// Where the other nodes' agents run: the DaemonSet's pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peers {
    pub namespace: String,
    /// A label selector of the agent's pods.
    pub selector: String,
}

/// Keeps of an agent's pod only its node and Ready condition: all an agent
/// needs of the others (which one reports an object's Events).
fn prune_peer(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.metadata.labels = None;
    pod.metadata.owner_references = None;
    let node_name = pod.spec.take().and_then(|s| s.node_name);
    pod.spec = Some(k8s_openapi::api::core::v1::PodSpec { node_name, ..Default::default() });
    let ready = pod.status.take().and_then(|s| s.conditions).into_iter().flatten().find(|c| c.type_ == "Ready");
    pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
        conditions: ready.map(|c| {
            vec![k8s_openapi::api::core::v1::PodCondition { type_: c.type_, status: c.status, ..Default::default() }]
        }),
        ..Default::default()
    });
}

/// A reflector whose changes and failures are nobody's business but its
/// readers': it neither triggers a reconcile nor makes the agent stale.
fn spawn_quiet_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    what: &'static str,
    prune: fn(&mut K),
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    tokio::spawn(async move {
        let mut stream = watcher(api, config).backoff(RetryBackoff::new()).modify(prune).reflect(writer).boxed();
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                debug!(what, error = %e, "watch failed; retrying");
            }
        }
    });
}

/// Whether a watch event changes what `fingerprint` reads of its objects:
/// a Service whose status, labels or annotations changed leaves the agent
/// nothing to do, and must not cost a pass over every import.
fn event_matters<K: Resource>(
    event: &watcher::Event<K>,
    fingerprint: fn(&K) -> u64,
    seen: &mut HashMap<String, u64>,
) -> bool {
    let key =
        |k: &K| format!("{}/{}", k.meta().namespace.as_deref().unwrap_or(""), k.meta().name.as_deref().unwrap_or(""));
    match event {
        watcher::Event::Apply(k) | watcher::Event::InitApply(k) => {
            let print = fingerprint(k);
            seen.insert(key(k), print) != Some(print)
        }
        watcher::Event::Delete(k) => {
            seen.remove(&key(k));
            true
        }
        watcher::Event::Init | watcher::Event::InitDone => true,
    }
}

/// What VIP safety reads of a Service: its ClusterIPs and owners.
fn service_fingerprint(service: &Service) -> u64 {
    use std::hash::{DefaultHasher, Hasher as _};
    let mut h = DefaultHasher::new();
    let spec = service.spec.as_ref();
    spec.and_then(|s| s.cluster_ip.as_ref()).hash(&mut h);
    spec.and_then(|s| s.cluster_ips.as_ref()).hash(&mut h);
    for owner in service.metadata.owner_references.iter().flatten() {
        (&owner.api_version, &owner.kind, &owner.name).hash(&mut h);
    }
    h.finish()
}

/// The caches the agent reads.
pub struct KubeSource {
    import_resource: ApiResource,
    imports: Store<DynamicObject>,
    slices: Store<StoredSlice>,
    /// Every Service, pruned to its ClusterIPs and owners.
    services: Store<Service>,
    service_cidrs: Option<Store<DynamicObject>>,
    node: Option<Store<Node>>,
    /// The agents' pods, pruned to node and Ready condition: who reports
    /// which object's Events.
    peers: Option<Store<Pod>>,
    property: Option<Store<DynamicObject>>,
    /// Checked objects by (kind, uid) with the resourceVersion they were
    /// checked at: an unchanged object is never converted or checked again,
    /// and its service is not recomputed.
    entries: Mutex<HashMap<ObjectId, (Option<String>, Checked)>>,
    /// Slices by service, from the watch events (an import is named as
    /// its service).
    slice_index: Arc<Mutex<ServiceIndex>>,
    /// Services whose import was invalid at the last full pass: its problem
    /// is among the source's, which only a full pass replaces.
    invalid: Mutex<HashSet<ServiceRef>>,
}

/// An import's service: its own namespace and name.
fn import_service(import: &DynamicObject) -> Option<ServiceRef> {
    Some(object_ref(&import.metadata))
}

/// A slice's service: the `multicluster.kubernetes.io/service-name` label.
fn slice_service(slice: &StoredSlice) -> Option<ServiceRef> {
    let name = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some((object_ref(&slice.metadata).0, name.clone()))
}

/// An object's entry: the cached one while its uid and resourceVersion are
/// the same, else `convert`'s (cached in `next`).
fn checked(
    cache: &mut HashMap<ObjectId, (Option<String>, Checked)>,
    next: Option<&mut HashMap<ObjectId, (Option<String>, Checked)>>,
    import: bool,
    meta: &ObjectMeta,
    convert: &dyn Fn() -> Checked,
) -> Checked {
    let (namespace, name) = object_ref(meta);
    let id = (import, meta.uid.clone().unwrap_or_else(|| format!("{namespace}/{name}")));
    let checked = match cache.remove(&id) {
        Some((version, checked)) if version == meta.resource_version && version.is_some() => checked,
        _ => convert(),
    };
    next.unwrap_or(cache).insert(id, (meta.resource_version.clone(), checked.clone()));
    checked
}

/// (is a ServiceImport, uid).
type ObjectId = (bool, String);

#[derive(Clone)]
enum Checked {
    Import(Arc<ImportEntry>),
    Slice(Arc<SliceEntry>),
    Invalid(ObjectError),
}

impl KubeSource {
    /// Finds the APIs and starts the watches. `node_name` selects this node's
    /// Node object (locality labels); without it, locality comes from flags
    /// only. `peers` finds the other agents, which share Event reporting.
    pub async fn start(
        client: Client,
        node_name: Option<&str>,
        peers: Option<&Peers>,
        events: UnboundedSender<SourceEvent>,
    ) -> Result<Self, KubeSourceError> {
        let import_resource = service_import_resource(&client).await?;
        info!(version = import_resource.api_version, "watching ServiceImports");

        let writer = Writer::new(import_resource.clone());
        let imports = writer.as_reader();
        let api = Api::<DynamicObject>::all_with(client.clone(), &import_resource);
        // Named as their services: the index keeps nothing, it only names them.
        let index = Some((Arc::new(Mutex::new(ServiceIndex::own_names())), import_service as ServiceOf<_>));
        spawn_reflector(
            api,
            watcher::Config::default(),
            writer,
            "ServiceImport",
            events.clone(),
            prune_import,
            Signals { index, ..Signals::default() },
        );

        let (slices, writer) = reflector::store();
        let slice_index = Arc::new(Mutex::new(ServiceIndex::default()));
        let config = watcher::Config::default().labels(LABEL_SERVICE_NAME);
        spawn_reflector(
            Api::<StoredSlice>::all(client.clone()),
            config,
            writer,
            "EndpointSlice",
            events.clone(),
            prune_slice,
            Signals { index: Some((slice_index.clone(), slice_service as ServiceOf<_>)), ..Signals::default() },
        );

        let (services, writer) = reflector::store();
        let config = watcher::Config::default();
        let api = Api::<Service>::all(client.clone());
        spawn_reflector(
            api,
            config,
            writer,
            "Service",
            events.clone(),
            prune_service,
            Signals { fingerprint: Some(service_fingerprint), ..Signals::default() },
        );

        let service_cidrs = match discover(
            &client,
            "networking.k8s.io",
            &SERVICE_CIDR_VERSIONS,
            "ServiceCIDR",
            "servicecidrs",
        )
        .await
        {
            Some(resource) => {
                Some(watch_discovered(&client, &resource, watcher::Config::default(), "ServiceCIDR", events.clone()))
            }
            None => {
                info!(
                    "no ServiceCIDR API (networking.k8s.io v1 or v1beta1): the Service ranges come from --service-cidr only"
                );
                None
            }
        };

        let node = node_name.map(|name| {
            let (store, writer) = reflector::store();
            let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
            spawn_reflector(
                Api::<Node>::all(client.clone()),
                config,
                writer,
                "Node",
                events.clone(),
                keep,
                Signals::default(),
            );
            store
        });
        let peers = peers.map(|peers| {
            let (store, writer) = reflector::store();
            let api = Api::<Pod>::namespaced(client.clone(), &peers.namespace);
            let config = watcher::Config::default().labels(&peers.selector);
            spawn_quiet_reflector(api, config, writer, "agent pods (Event reporting)", prune_peer);
            store
        });

        let property = match discover(
            &client,
            CLUSTER_PROPERTY_GROUP,
            &CLUSTER_PROPERTY_VERSIONS,
            "ClusterProperty",
            "clusterproperties",
        )
        .await
        {
            Some(resource) => {
                let config = watcher::Config::default().fields(&format!("metadata.name={CLUSTER_ID_PROPERTY}"));
                Some(watch_discovered(&client, &resource, config, "ClusterProperty", events))
            }
            None => {
                info!(
                    "no ClusterProperty API (about.k8s.io v1beta1 or v1alpha1): the cluster id comes from --cluster-id only"
                );
                None
            }
        };
        Ok(Self {
            import_resource,
            imports,
            slices,
            services,
            service_cidrs,
            node,
            peers,
            property,
            entries: Default::default(),
            slice_index,
            invalid: Default::default(),
        })
    }

    /// A source with no API behind it, fed by hand as the reflectors feed
    /// it (see [`offline::Feed`]).
    #[cfg(test)]
    fn offline(
        import_resource: ApiResource,
        slice_index: Arc<Mutex<ServiceIndex>>,
    ) -> (Self, Writer<DynamicObject>, Writer<StoredSlice>) {
        let imports = Writer::new(import_resource.clone());
        let (slices, slice_writer) = reflector::store();
        let source = Self {
            import_resource,
            imports: imports.as_reader(),
            slices,
            services: reflector::store().0,
            service_cidrs: None,
            node: None,
            peers: None,
            property: None,
            entries: Default::default(),
            slice_index,
            invalid: Default::default(),
        };
        (source, imports, slice_writer)
    }

    /// Waits until every cache has its first complete list.
    pub async fn wait_ready(&self) {
        let _ = self.imports.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
        // Never program before the Services are known: a ClusterSetIP that is
        // a Service's ClusterIP would capture its traffic until they are.
        let _ = self.services.wait_until_ready().await;
        if let Some(cidrs) = &self.service_cidrs {
            let _ = cidrs.wait_until_ready().await;
        }
        if let Some(node) = &self.node {
            let _ = node.wait_until_ready().await;
        }
        if let Some(property) = &self.property {
            let _ = property.wait_until_ready().await;
        }
    }

    /// The objects, as the pure core takes them, plus conversion errors.
    pub fn snapshot(&self) -> (Snapshot, Vec<ObjectError>) {
        snapshot_from(&self.imports.state(), &self.slices.state())
    }

    /// Every service with its checked objects, plus conversion errors.
    /// Objects unchanged since the last call (same uid and resourceVersion)
    /// come back as the same entries, so the reconciler skips their services.
    pub fn groups(&self) -> (Vec<(ServiceRef, Group)>, Vec<ObjectError>) {
        let mut cache = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut next: HashMap<ObjectId, (Option<String>, Checked)> = HashMap::with_capacity(cache.len());
        let mut groups: BTreeMap<ServiceRef, Group> = BTreeMap::new();
        let mut errors = Vec::new();
        let mut invalid = HashSet::new();
        for object in self.imports.state() {
            match checked(&mut cache, Some(&mut next), true, &object.metadata, &|| import_entry(&object)) {
                Checked::Import(entry) => groups.entry(entry.service()).or_default().imports.push(entry),
                Checked::Invalid(e) => {
                    invalid.insert(object_ref(&object.metadata));
                    errors.push(e);
                }
                Checked::Slice(_) => {}
            }
        }
        for object in self.slices.state() {
            if let Checked::Slice(entry) =
                checked(&mut cache, Some(&mut next), false, &object.metadata, &|| slice_entry(&object))
                && let Some(service) = entry.service()
            {
                groups.entry(service).or_default().slices.push(entry);
            }
        }
        *cache = next;
        *self.invalid.lock().unwrap_or_else(|e| e.into_inner()) = invalid;
        let groups = groups
            .into_iter()
            .map(|(service, mut group)| {
                group.sort();
                (service, group)
            })
            .collect();
        (groups, errors)
    }

    /// These services with their checked objects, found through the
    /// indexes kept from the watch events (a service with none comes back
    /// empty: it was deleted). `None` when a full pass must decide: an
    /// import that is invalid now, or was at the last full pass (its
    /// problem is among the source's, which a full pass replaces).
    pub fn groups_of(&self, services: &BTreeSet<ServiceRef>) -> Option<Vec<(ServiceRef, Group)>> {
        {
            let invalid = self.invalid.lock().unwrap_or_else(|e| e.into_inner());
            if services.iter().any(|s| invalid.contains(s)) {
                return None;
            }
        }
        let slice_names: Vec<Vec<String>> = {
            let index = self.slice_index.lock().unwrap_or_else(|e| e.into_inner());
            services.iter().map(|s| index.names(s)).collect()
        };
        let mut cache = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut groups = Vec::with_capacity(services.len());
        for (service, slices) in services.iter().zip(slice_names) {
            let mut group = Group::default();
            // An import is named as its service. Gone meanwhile: its own event follows.
            let key = reflector::ObjectRef::new_with(&service.1, self.import_resource.clone()).within(&service.0);
            if let Some(object) = self.imports.get(&key) {
                match checked(&mut cache, None, true, &object.metadata, &|| import_entry(&object)) {
                    Checked::Import(entry) => group.imports.push(entry),
                    Checked::Invalid(_) => return None,
                    Checked::Slice(_) => {}
                }
            }
            for name in slices {
                let Some(object) = self.slices.get(&reflector::ObjectRef::new(&name).within(&service.0)) else {
                    continue;
                };
                if let Checked::Slice(entry) =
                    checked(&mut cache, None, false, &object.metadata, &|| slice_entry(&object))
                    && entry.service().as_ref() == Some(service)
                {
                    group.slices.push(entry);
                }
            }
            group.sort();
            groups.push((service.clone(), group));
        }
        Some(groups)
    }

    /// Every Service's ClusterIPs (the first Service by name if two list one).
    pub fn cluster_ips(&self) -> ClusterIps {
        let mut ips = ClusterIps::new();
        for service in self.services.state() {
            for (ip, owner) in service_ips(&service) {
                match ips.get(&ip) {
                    Some(first) if (&first.namespace, &first.name) <= (&owner.namespace, &owner.name) => {}
                    _ => {
                        ips.insert(ip, owner);
                    }
                }
            }
        }
        ips
    }

    /// The ranges of the ServiceCIDR objects (`spec.cidrs`), sorted.
    pub fn service_ranges(&self) -> Vec<ServiceRange> {
        let Some(store) = &self.service_cidrs else { return Vec::new() };
        let mut ranges: Vec<ServiceRange> = store
            .state()
            .iter()
            .flat_map(|object| {
                let source = format!("ServiceCIDR {}", object.metadata.name.as_deref().unwrap_or_default());
                let cidrs = object.data.get("spec").and_then(|s| s.get("cidrs")).and_then(|c| c.as_array());
                cidrs
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.as_str()?.parse::<ipnet::IpNet>().ok())
                    .map(move |net| ServiceRange { net, source: source.clone() })
                    .collect::<Vec<_>>()
            })
            .collect();
        ranges.sort_by(|a, b| (a.net, &a.source).cmp(&(b.net, &b.source)));
        ranges
    }

    /// The agents' pods, for Event reporting (with `--peer-namespace`).
    pub fn peers(&self) -> Option<Store<Pod>> {
        self.peers.clone()
    }

    /// Zone and region labels of this node, when it is known.
    pub fn node_locality(&self) -> (Option<String>, Option<String>) {
        let Some(node) = self.node.as_ref().and_then(|s| s.state().into_iter().next()) else {
            return (None, None);
        };
        let labels = node.labels();
        (labels.get(LABEL_ZONE).cloned(), labels.get(LABEL_REGION).cloned())
    }

    /// This node's IPv4 addresses as the API knows them (`status.addresses`).
    pub fn node_addresses(&self) -> Vec<std::net::IpAddr> {
        let Some(node) = self.node.as_ref().and_then(|s| s.state().into_iter().next()) else {
            return Vec::new();
        };
        node.status.iter().flat_map(|s| s.addresses.iter().flatten()).filter_map(|a| a.address.parse().ok()).collect()
    }

    /// `spec.value` of ClusterProperty `cluster.clusterset.k8s.io`.
    pub fn cluster_id(&self) -> Option<String> {
        let property = self.property.as_ref()?.state().into_iter().next()?;
        property.data.get("spec")?.get("value")?.as_str().map(str::to_owned)
    }

    /// The references Events about these problems attach to, looked up in
    /// one walk of each cache (a problem whose object is gone is left out).
    pub fn references<'e>(&self, errors: &[&'e ObjectError]) -> Vec<(&'e ObjectError, ObjectReference)> {
        if errors.is_empty() {
            return Vec::new();
        }
        let reference = |kind: &str, meta: &ObjectMeta, api_version: &str| {
            let (namespace, name) = object_ref(meta);
            ObjectReference {
                api_version: Some(api_version.to_owned()),
                kind: Some(kind.to_owned()),
                namespace: Some(namespace),
                name: Some(name),
                uid: meta.uid.clone(),
                ..ObjectReference::default()
            }
        };
        let mut found: HashMap<(&str, String), ObjectReference> = HashMap::new();
        let wanted: std::collections::HashSet<(&str, &str)> =
            errors.iter().map(|e| (e.kind, e.object.as_str())).collect();
        let mut look = |kind: &'static str, meta: &ObjectMeta, api_version: &str| {
            let (namespace, name) = object_ref(meta);
            let object = format!("{namespace}/{name}");
            if wanted.contains(&(kind, object.as_str())) {
                found.insert((kind, object), reference(kind, meta, api_version));
            }
        };
        if wanted.iter().any(|(kind, _)| *kind == "ServiceImport") {
            for o in self.imports.state() {
                look("ServiceImport", &o.metadata, &self.import_resource.api_version);
            }
        }
        if wanted.iter().any(|(kind, _)| *kind == "EndpointSlice") {
            for o in self.slices.state() {
                look("EndpointSlice", &o.metadata, "discovery.k8s.io/v1");
            }
        }
        errors.iter().filter_map(|e| Some((*e, found.get(&(e.kind, e.object.clone()))?.clone()))).collect()
    }
}

/// Watches a resource found by discovery into a store of its own.
fn watch_discovered(
    client: &Client,
    resource: &ApiResource,
    config: watcher::Config,
    what: &'static str,
    events: UnboundedSender<SourceEvent>,
) -> Store<DynamicObject> {
    let writer = Writer::new(resource.clone());
    let store = writer.as_reader();
    spawn_reflector(Api::all_with(client.clone(), resource), config, writer, what, events, keep, Signals::default());
    store
}

/// The reflectors that keep their objects whole.
fn keep<K>(_: &mut K) {}

/// Converts cached objects into a [`Snapshot`]; a ServiceImport whose fields do
/// not fit the schema is reported with its field path and left out.
pub fn snapshot_from(
    imports: &[std::sync::Arc<DynamicObject>],
    slices: &[std::sync::Arc<StoredSlice>],
) -> (Snapshot, Vec<ObjectError>) {
    let mut snapshot = Snapshot::default();
    let mut errors = Vec::new();
    for object in imports {
        match import_from(object) {
            Ok(import) => snapshot.imports.push((Origin::default(), import)),
            Err(e) => errors.push(e),
        }
    }
    snapshot.slices = slices.iter().map(|s| (Origin::default(), s.to_slice())).collect();
    (snapshot, errors)
}

/// A watched ServiceImport as the typed object; a field that does not fit
/// the schema is named.
/// An EndpointSlice checked.
fn slice_entry(object: &StoredSlice) -> Checked {
    Checked::Slice(Arc::new(SliceEntry::new(&Origin::default(), &object.to_slice())))
}

/// A ServiceImport checked, or why it is invalid.
fn import_entry(object: &DynamicObject) -> Checked {
    match import_from(object) {
        Ok(import) => Checked::Import(Arc::new(ImportEntry::new(&Origin::default(), &import))),
        Err(e) => Checked::Invalid(e),
    }
}

fn import_from(object: &DynamicObject) -> Result<ServiceImport, ObjectError> {
    let value =
        serde_json::to_value(object).map_err(|e| conversion_error(&object.metadata, String::new(), e.to_string()))?;
    serde_path_to_error::deserialize::<_, ServiceImport>(value)
        .map_err(|e| conversion_error(&object.metadata, e.path().to_string(), e.inner().to_string()))
}

fn conversion_error(meta: &ObjectMeta, field: String, message: String) -> ObjectError {
    ObjectError::about(&Origin::default(), "ServiceImport", meta)(field, message)
}

/// The Kubernetes source without an API server, for tests of what it makes
/// of objects: each change goes in as the reflectors take a watch event in
/// (pruned, into the store, into the index), and says what it touched.
#[cfg(test)]
pub(crate) mod offline {
    use super::*;

    pub struct Feed {
        imports: Writer<DynamicObject>,
        slices: Writer<StoredSlice>,
        import_index: ServiceIndex,
        slice_index: Arc<Mutex<ServiceIndex>>,
    }

    impl Feed {
        pub fn new() -> (Self, KubeSource) {
            let resource = ApiResource::from_gvk_with_plural(
                &kube::api::GroupVersionKind::gvk(MCS_GROUP, "v1beta1", "ServiceImport"),
                "serviceimports",
            );
            let slice_index = Arc::new(Mutex::new(ServiceIndex::default()));
            let (source, imports, slices) = KubeSource::offline(resource, slice_index.clone());
            (Self { imports, slices, import_index: ServiceIndex::own_names(), slice_index }, source)
        }

        /// An import added or changed (`Some`), or deleted.
        pub fn import(&mut self, mut object: DynamicObject, deleted: bool) -> Touched {
            prune_import(&mut object);
            let event = if deleted { watcher::Event::Delete(object) } else { watcher::Event::Apply(object) };
            self.imports.apply_watcher_event(&event);
            self.import_index.on_event(&event, import_service)
        }

        pub fn slice(&mut self, mut object: StoredSlice, deleted: bool) -> Touched {
            prune_slice(&mut object);
            let event = if deleted { watcher::Event::Delete(object) } else { watcher::Event::Apply(object) };
            self.slices.apply_watcher_event(&event);
            self.slice_index.lock().unwrap_or_else(|e| e.into_inner()).on_event(&event, slice_service)
        }

        /// Both watches list everything anew (after a 410 Gone, say): the
        /// objects listed replace the stores and the slice index.
        pub fn relist(&mut self, imports: Vec<DynamicObject>, slices: Vec<StoredSlice>) -> [Touched; 2] {
            fn list<K: Resource + Clone>(
                objects: Vec<K>,
                prune: fn(&mut K),
                mut take: impl FnMut(&watcher::Event<K>) -> Touched,
            ) -> Touched {
                take(&watcher::Event::Init);
                for mut object in objects {
                    prune(&mut object);
                    take(&watcher::Event::InitApply(object));
                }
                take(&watcher::Event::InitDone)
            }
            let (writer, index) = (&mut self.imports, &mut self.import_index);
            let imports = list(imports, prune_import, |event| {
                writer.apply_watcher_event(event);
                index.on_event(event, import_service)
            });
            let (writer, index) = (&mut self.slices, &self.slice_index);
            let slices = list(slices, prune_slice, |event| {
                writer.apply_watcher_event(event);
                index.lock().unwrap_or_else(|e| e.into_inner()).on_event(event, slice_service)
            });
            [imports, slices]
        }
    }
}

#[cfg(test)]
mod tests {
    //! The watcher wiring against kube-rs's mock client: a scripted fake API
    //! server answers discovery, lists and watches.

    use std::{
        collections::{BTreeMap, VecDeque},
        sync::{Arc, Mutex},
        time::Duration,
    };

    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tokio::sync::mpsc;
    use tower_test::mock;

    use super::*;

    /// Objects as they arrive are pruned to what the agent reads: checked,
    /// they give the same entries as whole.
    #[test]
    fn pruned_objects_check_as_the_whole_ones() {
        let managed = json!([{"manager": "kubectl", "operation": "Apply", "fieldsV1": {"f:spec": {}}}]);
        let json = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-a", "namespace": "demo", "uid": "u1", "resourceVersion": "7", "managedFields": managed,
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "labels": {LABEL_SERVICE_NAME: "web", LABEL_SOURCE_CLUSTER: "a", LABEL_REGION: "r1", "app": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "zone": "z1", "nodeName": "n1",
                    "targetRef": {"kind": "Pod", "name": "web-0"}, "hints": {"forZones": [{"name": "z1"}]}},
                {"addresses": ["10.0.0.2", "10.0.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true},
                    "hostname": "web-1", "deprecatedTopology": {"a": "b"}}]
        });
        // Stored: what the watch decodes, pruned as it arrives.
        let mut stored: StoredSlice = serde_json::from_value(json.clone()).unwrap();
        prune_slice(&mut stored);
        assert!(stored.metadata.managed_fields.is_none() && stored.metadata.annotations.is_none());
        assert_eq!(stored.metadata.labels.as_ref().unwrap().len(), 3);
        let whole: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json).unwrap();
        let entry = |s: &k8s_openapi::api::discovery::v1::EndpointSlice| {
            format!("{:?}", SliceEntry::new(&Origin::default(), s))
        };
        assert_eq!(entry(&stored.to_slice()), entry(&whole));
        // A service scaled to zero: the API sends its endpoints as null.
        let empty = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-b", "namespace": "demo", "labels": {LABEL_SERVICE_NAME: "web"}},
            "addressType": "IPv4", "ports": null, "endpoints": null});
        let stored: StoredSlice = serde_json::from_value(empty.clone()).expect("endpoints: null is no endpoints");
        let whole: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(empty).unwrap();
        assert!(stored.endpoints.is_empty());
        assert_eq!(entry(&stored.to_slice()), entry(&whole));

        let import: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport",
            "metadata": {"name": "web", "namespace": "demo", "uid": "u2", "resourceVersion": "8", "managedFields": managed,
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}",
                    "multicluster.kubernetes.io/derived-service": "derived-web",
                    "mcs-agent.io/cluster-weights": "a=3,b=1"}},
            "spec": {"type": "ClusterSetIP", "ips": ["198.18.0.10"], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
            "status": {"clusterSelectorResults": [{"clusters": ["a"]}], "clusters": [{"cluster": "a"}, {"cluster": "b"}]}
        }))
        .unwrap();
        let mut pruned = import.clone();
        prune_import(&mut pruned);
        assert!(pruned.metadata.managed_fields.is_none());
        assert_eq!(pruned.metadata.annotations.as_ref().unwrap().len(), 2);
        assert_eq!(pruned.data["status"], json!({"clusterSelectorResults": [{"clusters": ["a"]}]}));
        let entry = |o: &DynamicObject| format!("{:?}", ImportEntry::new(&Origin::default(), &import_from(o).unwrap()));
        assert_eq!(entry(&pruned), entry(&import));
    }

    const IMPORTS: &str = "/apis/multicluster.x-k8s.io/v1alpha1/serviceimports";
    const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
    const NODES: &str = "/api/v1/nodes";
    const PROPERTIES: &str = "/apis/about.k8s.io/v1alpha1/clusterproperties";
    const SERVICES: &str = "/api/v1/services";
    const SERVICE_CIDRS: &str = "/apis/networking.k8s.io/v1/servicecidrs";

    enum Watch {
        /// Send these (type, object) events, then end the response.
        Events(Vec<(&'static str, Value)>),
        /// Fail the watch with an HTTP error.
        Fail(u16),
    }

    #[derive(Default)]
    struct Fake {
        /// resource path -> name -> object
        current: BTreeMap<&'static str, BTreeMap<String, Value>>,
        scripts: BTreeMap<&'static str, VecDeque<Watch>>,
        requests: Vec<String>,
    }

    fn json_response(status: u16, body: &Value) -> Response<Body> {
        Response::builder()
            .status(StatusCode::from_u16(status).unwrap())
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap()
    }

    fn not_found() -> Response<Body> {
        json_response(
            404,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
        )
    }

    fn name_of(object: &Value) -> String {
        object["metadata"]["name"].as_str().unwrap().to_owned()
    }

    /// Serves requests until the test ends. Watches without a script are held open.
    fn serve(fake: Arc<Mutex<Fake>>, handle: mock::Handle<Request<Body>, Response<Body>>) {
        tokio::spawn(async move {
            let mut handle = Box::pin(handle);
            let mut parked = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                let path = request.uri().path().to_owned();
                let query = request.uri().query().unwrap_or_default().to_owned();
                let mut fake = fake.lock().unwrap();
                fake.requests.push(format!("{} {path}?{query}", request.method()));
                let resource =
                    [IMPORTS, SLICES, NODES, PROPERTIES, SERVICES, SERVICE_CIDRS].into_iter().find(|r| *r == path);
                let response = match (path.as_str(), resource) {
                    ("/apis/multicluster.x-k8s.io/v1alpha1", _) => json_response(
                        200,
                        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "multicluster.x-k8s.io/v1alpha1",
                            "resources": [{"name": "serviceimports", "singularName": "serviceimport", "namespaced": true,
                            "kind": "ServiceImport", "verbs": ["get", "list", "watch"]}]}),
                    ),
                    ("/apis/about.k8s.io/v1alpha1", _) => json_response(
                        200,
                        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "about.k8s.io/v1alpha1",
                            "resources": [{"name": "clusterproperties", "singularName": "clusterproperty", "namespaced": false,
                            "kind": "ClusterProperty", "verbs": ["get", "list", "watch"]}]}),
                    ),
                    ("/apis/networking.k8s.io/v1", _) => json_response(
                        200,
                        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "networking.k8s.io/v1",
                            "resources": [{"name": "servicecidrs", "singularName": "servicecidr", "namespaced": false,
                            "kind": "ServiceCIDR", "verbs": ["get", "list", "watch"]}]}),
                    ),
                    (path, None) if path.ends_with("/events") && request.method() == http::Method::POST => {
                        json_response(
                            201,
                            &json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
                            "metadata": {"name": "web.1", "namespace": "demo"}, "eventTime": "2026-11-21T00:00:00.000000Z"}),
                        )
                    }
                    (_, Some(resource)) if query.contains("watch=true") => {
                        match fake.scripts.get_mut(resource).and_then(VecDeque::pop_front) {
                            Some(Watch::Events(events)) => {
                                let mut lines = Vec::new();
                                for (kind, object) in events {
                                    let objects = fake.current.entry(resource).or_default();
                                    if kind == "DELETED" {
                                        objects.remove(&name_of(&object));
                                    } else {
                                        objects.insert(name_of(&object), object.clone());
                                    }
                                    lines.extend(serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap());
                                    lines.push(b'\n');
                                }
                                Response::builder().body(Body::from(lines)).unwrap()
                            }
                            Some(Watch::Fail(code)) => json_response(
                                code,
                                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "injected", "code": code}),
                            ),
                            None => {
                                parked.push(send);
                                continue;
                            }
                        }
                    }
                    (_, Some(resource)) => {
                        let items: Vec<Value> =
                            fake.current.get(resource).map(|m| m.values().cloned().collect()).unwrap_or_default();
                        json_response(
                            200,
                            &json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}),
                        )
                    }
                    _ => not_found(),
                };
                send.send_response(response);
            }
        });
    }

    fn import(name: &str, ip: &str, port: u16) -> Value {
        json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
            "metadata": {"name": name, "namespace": "demo", "resourceVersion": "2", "uid": format!("uid-{name}")},
            "spec": {"type": "ClusterSetIP", "ips": [ip], "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}})
    }

    fn slice(name: &str, service: &str, ips: &[&str]) -> Value {
        let endpoints: Vec<Value> =
            ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}})).collect();
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "demo", "resourceVersion": "2",
                "labels": {"multicluster.kubernetes.io/service-name": service, "multicluster.kubernetes.io/source-cluster": "a"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": endpoints})
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn ports(source: &KubeSource) -> Vec<(String, i64)> {
        let (snapshot, errors) = source.snapshot();
        assert!(errors.is_empty(), "{errors:?}");
        let mut ports: Vec<_> =
            snapshot.imports.iter().map(|(_, i)| (i.metadata.name.clone().unwrap(), i.spec.ports[0].port)).collect();
        ports.sort();
        ports
    }

    fn slice_addresses(source: &KubeSource) -> usize {
        source.snapshot().0.slices.iter().map(|(_, s)| s.endpoints.len()).sum()
    }

    #[tokio::test]
    async fn watches_follow_lists_updates_deletes_and_resume_after_an_error() {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let fake = Arc::new(Mutex::new(Fake::default()));
        {
            let mut f = fake.lock().unwrap();
            f.current.insert(IMPORTS, BTreeMap::from([("web".into(), import("web", "10.96.0.10", 80))]));
            f.current.insert(SLICES, BTreeMap::from([("web-a".into(), slice("web-a", "web", &["10.1.0.1"]))]));
            f.current.insert(
                NODES,
                BTreeMap::from([(
                    "node-1".into(),
                    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1", "resourceVersion": "2",
                        "labels": {"topology.kubernetes.io/zone": "z1", "topology.kubernetes.io/region": "r1"}}}),
                )]),
            );
            f.scripts.insert(
                IMPORTS,
                VecDeque::from([
                    Watch::Events(vec![("ADDED", import("api", "10.96.0.11", 443))]),
                    // The watch breaks: the agent must say so, keep its caches, and resume.
                    Watch::Fail(500),
                    Watch::Events(vec![
                        ("MODIFIED", import("web", "10.96.0.10", 8080)),
                        ("DELETED", import("api", "10.96.0.11", 443)),
                    ]),
                ]),
            );
            f.current.insert(
                PROPERTIES,
                BTreeMap::from([(
                    CLUSTER_ID_PROPERTY.into(),
                    json!({"apiVersion": "about.k8s.io/v1alpha1", "kind": "ClusterProperty",
                        "metadata": {"name": CLUSTER_ID_PROPERTY, "resourceVersion": "2"}, "spec": {"value": "cluster-a"}}),
                )]),
            );
            f.current.insert(
                SERVICES,
                BTreeMap::from([
                    (
                        "kube-dns".into(),
                        json!({"apiVersion": "v1", "kind": "Service",
                            "metadata": {"name": "kube-dns", "namespace": "kube-system", "resourceVersion": "2",
                                "annotations": {"big": "x".repeat(1000)}, "managedFields": [{"manager": "kubectl"}]},
                            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "selector": {"k8s-app": "kube-dns"},
                                "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}),
                    ),
                    (
                        "derived-abc".into(),
                        json!({"apiVersion": "v1", "kind": "Service",
                            "metadata": {"name": "derived-abc", "namespace": "demo", "resourceVersion": "2",
                                "ownerReferences": [{"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
                                    "name": "web", "uid": "uid-web"}]},
                            "spec": {"clusterIP": "10.96.5.5"}}),
                    ),
                    (
                        "headless".into(),
                        json!({"apiVersion": "v1", "kind": "Service",
                            "metadata": {"name": "headless", "namespace": "demo", "resourceVersion": "2"},
                            "spec": {"clusterIP": "None"}}),
                    ),
                ]),
            );
            f.current.insert(
                SERVICE_CIDRS,
                BTreeMap::from([(
                    "kubernetes".into(),
                    json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                        "metadata": {"name": "kubernetes", "resourceVersion": "2"},
                        "spec": {"cidrs": ["10.96.0.0/12", "fd00:10:96::/112"]}}),
                )]),
            );
            f.scripts.insert(
                SLICES,
                VecDeque::from([Watch::Events(vec![("MODIFIED", slice("web-a", "web", &["10.1.0.1", "10.1.0.2"]))])]),
            );
        }
        serve(fake.clone(), handle);
        let client = Client::new(service, "default");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let source = KubeSource::start(client.clone(), Some("node-1"), None, tx).await.expect("start");
        assert_eq!(
            source.import_resource.api_version, "multicluster.x-k8s.io/v1alpha1",
            "v1beta1 is not served: fall back"
        );
        tokio::time::timeout(Duration::from_secs(10), source.wait_ready()).await.expect("initial lists");

        eventually("the watched ADDED import", || ports(&source).len() == 2).await;
        eventually("the slice update", || slice_addresses(&source) == 2).await;
        eventually("resumption after the failed watch", || ports(&source) == [("web".to_owned(), 8080)]).await;
        // The watches named the services they changed, and the indexes find
        // their objects without a walk of the caches.
        let mut events = Vec::new();
        while let Ok(event) = rx.try_recv() {
            events.push(event);
        }
        let named: BTreeSet<ServiceRef> = events
            .iter()
            .filter_map(|e| if let SourceEvent::Services(s) = e { Some(s.clone()) } else { None })
            .flatten()
            .collect();
        let demo = |name: &str| ("demo".to_owned(), name.to_owned());
        assert!(named.contains(&demo("web")) && named.contains(&demo("api")), "{named:?}");
        let groups = source.groups_of(&BTreeSet::from([demo("web"), demo("api")])).expect("all valid");
        let counts: Vec<(String, usize, usize)> =
            groups.iter().map(|(s, g)| (s.1.clone(), g.imports.len(), g.slices.len())).collect();
        assert_eq!(
            counts,
            [("api".into(), 0, 0), ("web".into(), 1, 1)],
            "the deleted import's service comes back empty"
        );
        assert_eq!(source.node_locality(), (Some("z1".into()), Some("r1".into())));
        assert_eq!(source.cluster_id().as_deref(), Some("cluster-a"), "from ClusterProperty cluster.clusterset.k8s.io");
        let cluster_ips = source.cluster_ips();
        let dns = &cluster_ips[&"10.96.0.10".parse().unwrap()];
        assert_eq!(dns.to_string(), "kube-system/kube-dns");
        assert_eq!(
            cluster_ips[&"10.96.5.5".parse().unwrap()].owner_imports,
            ["web"],
            "owned by ServiceImport demo/web"
        );
        assert_eq!(cluster_ips.len(), 2, "a headless Service has no ClusterIP: {cluster_ips:?}");
        let kept = source.services.state();
        let kept = kept.iter().find(|s| s.metadata.name.as_deref() == Some("kube-dns")).unwrap();
        assert!(
            kept.metadata.annotations.is_none() && kept.metadata.managed_fields.is_none(),
            "Services are kept pruned"
        );
        assert!(kept.spec.as_ref().unwrap().ports.is_none() && kept.spec.as_ref().unwrap().selector.is_none());
        let ranges: Vec<String> = source.service_ranges().iter().map(|r| format!("{} {}", r.net, r.source)).collect();
        assert_eq!(ranges, ["10.96.0.0/12 ServiceCIDR kubernetes", "fd00:10:96::/112 ServiceCIDR kubernetes"]);
        let problem = ObjectError {
            origin: String::new(),
            kind: "ServiceImport",
            object: "demo/web".into(),
            field: "spec.ports[0].port".into(),
            message: "70000 is out of range 1-65535".into(),
        };
        let gone = ObjectError { object: "demo/gone".into(), ..problem.clone() };
        let references = source.references(&[&problem, &gone]);
        assert_eq!(references.len(), 1, "an object no longer listed gets no Event");
        let reference = references[0].1.clone();
        assert_eq!(reference.uid.as_deref(), Some("uid-web"));
        assert_eq!(reference.api_version.as_deref(), Some("multicluster.x-k8s.io/v1alpha1"));

        // The agent's only write: an Event on an invalid object.
        use kube::runtime::events::{Event, EventType, Recorder, Reporter};
        let recorder =
            Recorder::new(client, Reporter { controller: "mcs-agent".into(), instance: Some("node-1".into()) });
        let event = Event {
            type_: EventType::Warning,
            reason: "InvalidObject".into(),
            note: Some("spec.ports[0].port: 70000 is out of range 1-65535".into()),
            action: "Program".into(),
            secondary: None,
        };
        recorder.publish(&event, &reference).await.expect("event published");

        while let Ok(event) = rx.try_recv() {
            events.push(event);
        }
        let error = events.iter().position(|e| matches!(e, SourceEvent::Error { what: "ServiceImport", .. }));
        let error = error.expect("the failed watch is reported");
        assert!(events[error..].contains(&SourceEvent::Changed), "and the resumed watch is reported after it");

        let requests = fake.lock().unwrap().requests.clone();
        assert_every_call_is_granted_and_every_grant_used(&requests);
        assert!(
            requests.iter().any(|r| r.starts_with("GET /apis/multicluster.x-k8s.io/v1beta1")),
            "v1beta1 was tried first"
        );
        assert!(
            requests.iter().any(|r| r.starts_with(&format!("GET {SLICES}"))
                && r.contains("labelSelector=multicluster.kubernetes.io%2Fservice-name")),
            "slices are selected by label: {requests:?}"
        );
        assert!(
            requests
                .iter()
                .any(|r| r.starts_with(&format!("GET {NODES}")) && r.contains("fieldSelector=metadata.name%3Dnode-1"))
        );
    }

    /// RBAC covers exactly what the code calls: each request maps to a rule of
    /// deploy/clusterrole.yaml, and each rule's resource is used.
    fn assert_every_call_is_granted_and_every_grant_used(requests: &[String]) {
        use k8s_openapi::api::rbac::v1::ClusterRole;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/clusterrole.yaml");
        let role: ClusterRole = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let rules = role.rules.unwrap();
        let granted = |group: &str, resource: &str, verb: &str| {
            rules.iter().any(|r| {
                r.api_groups.as_ref().is_some_and(|g| g.iter().any(|g| g == group))
                    && r.resources.as_ref().is_some_and(|rs| rs.iter().any(|x| x == resource))
                    && r.verbs.iter().any(|v| v == verb)
            })
        };
        let mut used = std::collections::BTreeSet::new();
        for request in requests {
            let (method, rest) = request.split_once(' ').unwrap();
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            let (group, tail) = match parts.as_slice() {
                ["api", "v1", tail @ ..] => ("", tail),
                ["apis", group, _version, tail @ ..] => (*group, tail),
                _ => panic!("unexpected request {request}"),
            };
            let resource = match tail {
                // Discovery of a group version: open to every authenticated client.
                [] => continue,
                [resource] | ["namespaces", _, resource] => *resource,
                [resource, _name] | ["namespaces", _, resource, _name] => *resource,
                _ => panic!("unexpected request {request}"),
            };
            let verb = match method {
                "GET" if query.contains("watch=true") => "watch",
                "GET" => "list",
                "POST" => "create",
                "PATCH" => "patch",
                other => panic!("the agent must not {other}: {request}"),
            };
            assert!(
                granted(group, resource, verb),
                "{request} needs {verb} on {group}/{resource}, not in the ClusterRole"
            );
            used.insert(resource.to_owned());
        }
        for rule in &rules {
            for resource in rule.resources.iter().flatten() {
                assert!(used.contains(resource), "the ClusterRole grants {resource} but the code never calls it");
            }
        }
    }

    #[tokio::test]
    async fn without_the_crds_start_fails_and_names_the_fix() {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            let mut handle = Box::pin(handle);
            while let Some((_, send)) = handle.next_request().await {
                send.send_response(not_found());
            }
        });
        let (tx, _rx) = mpsc::unbounded_channel();
        let error = KubeSource::start(Client::new(service, "default"), None, None, tx)
            .await
            .err()
            .expect("no ServiceImport API");
        assert!(error.to_string().contains("install the MCS CRDs"), "{error}");
    }

    #[test]
    fn only_a_services_cluster_ips_or_owners_changing_triggers_a_reconcile() {
        let service = |ip: &str, annotation: &str| -> Service {
            serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "dns", "namespace": "kube-system", "annotations": {"note": annotation}},
                "spec": {"clusterIP": ip}}))
            .unwrap()
        };
        let mut seen = HashMap::new();
        let mut matters = |event: watcher::Event<Service>| {
            let event = match event {
                watcher::Event::Apply(mut s) => {
                    prune_service(&mut s);
                    watcher::Event::Apply(s)
                }
                other => other,
            };
            event_matters(&event, service_fingerprint, &mut seen)
        };
        assert!(matters(watcher::Event::Apply(service("10.96.0.10", "a"))), "a new Service");
        assert!(!matters(watcher::Event::Apply(service("10.96.0.10", "b"))), "an annotation changed: nothing to do");
        assert!(matters(watcher::Event::Apply(service("10.96.0.11", "b"))), "its ClusterIP changed");
        assert!(matters(watcher::Event::Delete(service("10.96.0.11", "b"))), "deleted");
        assert!(matters(watcher::Event::Apply(service("10.96.0.11", "b"))), "back again");
    }

    #[test]
    fn a_schema_violation_is_reported_with_its_field() {
        let mut bad = import("web", "10.96.0.10", 80);
        bad["spec"]["ports"][0]["port"] = json!("eighty");
        let object: DynamicObject = serde_json::from_value(bad).unwrap();
        let (snapshot, errors) = snapshot_from(&[Arc::new(object)], &[]);
        assert!(snapshot.imports.is_empty());
        assert_eq!(errors[0].field, "spec.ports[0].port");
        assert!(errors[0].to_string().starts_with("ServiceImport demo/web: spec.ports[0].port:"), "{}", errors[0]);
    }

    #[test]
    fn retries_double_from_a_quarter_second_to_two_seconds_with_jitter() {
        let (mut backoff, t0) = (RetryBackoff::new(), Instant::now());
        for (i, ceiling) in [250, 500, 1000, 2000, 2000, 2000].into_iter().enumerate() {
            let ceiling = Duration::from_millis(ceiling);
            let delay = backoff.next_at(t0 + Duration::from_secs(i as u64));
            assert!(delay >= ceiling / 2 && delay <= ceiling, "{delay:?} within {ceiling:?}");
        }
        // Two agents do not retry in step.
        let (a, b): (Vec<_>, Vec<_>) = (RetryBackoff::new().take(8).collect(), RetryBackoff::new().take(8).collect());
        assert_ne!(a, b);
    }

    #[test]
    fn a_success_between_failures_does_not_reset_the_backoff_only_a_quiet_spell_does() {
        let (mut backoff, t0) = (RetryBackoff::new(), Instant::now());
        let mut at = t0;
        // A list that keeps failing, with the watcher's Init (a reset) before each try.
        for ceiling in [250, 500, 1000, 2000, 2000] {
            backoff.reset_at(at);
            let delay = backoff.next_at(at);
            assert!(
                delay > Duration::from_millis(ceiling) / 2 - Duration::from_millis(1),
                "{delay:?} for {ceiling} ms"
            );
            at += delay;
        }
        // Working for the quiet spell: the next failure starts over.
        backoff.reset_at(at + RetryBackoff::QUIET);
        assert!(backoff.next_at(at + RetryBackoff::QUIET) <= RetryBackoff::FIRST);
        // A failure long after the last one starts over too, reset or not.
        backoff.next_at(at + RetryBackoff::QUIET);
        backoff.next_at(at + RetryBackoff::QUIET);
        assert!(backoff.next_at(at + RetryBackoff::QUIET * 3) <= RetryBackoff::FIRST);
    }
}
