//! Objects checked once, when they arrive: an import's and a slice's
//! entries, and the groups of them that make one service.

use super::*;

/// `(namespace, service name)`: what ties an import to its slices.
pub type ServiceRef = (String, String);

/// A ServiceImport, checked once when it arrives: passes read this, never
/// the object again, and only what a pass needs is kept.
#[derive(Debug)]
pub struct ImportEntry {
    pub(super) origin: Origin,
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) created: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// An MCS controller created a Service for it (an annotation of
    /// [`DERIVED_SERVICE_ANNOTATIONS`]): `--skip-derived` leaves it alone.
    pub(super) derived: bool,
    /// The derived Service's name, as the annotation gives it.
    pub(super) derived_service: Option<String>,
    pub(super) valid: Result<Option<ValidImport>, ObjectError>,
    pub(super) selector_results: Result<Option<Vec<BTreeSet<String>>>, (String, String)>,
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

    pub(super) fn error(&self, field: String, message: String) -> ObjectError {
        let origin = if self.origin.0.is_empty() { String::new() } else { format!("{}: ", self.origin) };
        let object = format!("{}/{}", self.namespace, self.name);
        ObjectError { origin, kind: "ServiceImport", object, field, message }
    }

    pub fn is_valid(&self) -> bool {
        self.valid.is_ok()
    }

    /// `service` is this import's own derived Service: named by its
    /// annotation, or owning the Service through `metadata.ownerReferences`.
    pub(super) fn derived_from(&self, service: &ServiceIp) -> bool {
        service.namespace == self.namespace
            && (self.derived_service.as_deref() == Some(service.name.as_str())
                || service.owner_imports.contains(&self.name))
    }

    /// The ClusterSetIPs it asks for, when it is valid.
    pub(super) fn vips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.valid.as_ref().ok().and_then(Option::as_ref).into_iter().flat_map(|v| v.vips.iter().map(|(ip, _)| *ip))
    }
}

/// An EndpointSlice, checked once when it arrives.
#[derive(Debug)]
pub struct SliceEntry {
    pub(super) origin: Origin,
    pub(super) namespace: String,
    pub(super) name: String,
    /// Its `multicluster.kubernetes.io/service-name`: slices without it are not ours.
    pub(super) service: Option<String>,
    pub(super) valid: Result<Option<ValidSlice>, ObjectError>,
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

    pub(super) fn sort_key(&self) -> (&str, &str, &Origin) {
        (&self.namespace, &self.name, &self.origin)
    }

    /// (address, `namespace/name`) of each endpoint, when it is valid.
    pub(super) fn addresses(&self) -> BTreeSet<(IpAddr, std::sync::Arc<str>)> {
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
