//! The incremental [`Model`]: objects by service and the state computed
//! from them, recomputing only what a change touches.

use super::*;

#[cfg(test)]
mod tests;

/// One service recomputed: its frontends and problems.
type Computed = (ServiceRef, Vec<(FrontendKey, Frontend)>, Vec<ObjectError>);

/// What one service contributed to the last pass.
#[derive(Debug, Default)]
struct Output {
    frontends: Vec<FrontendKey>,
    errors: Vec<ObjectError>,
}

/// One service: its objects and what the last pass made of them, under one
/// key (two maps by service kept every name twice).
#[derive(Debug, Default)]
struct Service {
    group: Group,
    output: Output,
}

impl Service {
    fn is_empty(&self) -> bool {
        self.group.is_empty() && self.output.frontends.is_empty() && self.output.errors.is_empty()
    }
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
    /// Services with objects, or with frontends or problems from the last pass.
    services: HashMap<ServiceRef, Service>,
    /// Endpoint address -> slices (`namespace/name`) listing it, with counts.
    endpoints: ByAddress<Counted<std::sync::Arc<str>>>,
    /// ClusterSetIP -> services whose valid imports ask for it, with counts.
    claims: ByAddress<Counted<ServiceRef>>,
    /// The cluster's Services by ClusterIP: a ClusterSetIP may not be one.
    cluster_ips: ClusterIps,
    state: DesiredState,
    /// ClusterSetIP -> the service serving it.
    held: BTreeMap<IpAddr, String>,
    /// Slots the desired tables take, over all frontends.
    slots: u64,
}

/// Keys with counts, as a value of an index by address that almost always
/// holds one key once (one slice lists an endpoint, one service claims a
/// ClusterSetIP): that case takes no allocation of its own. At 10,000
/// services a one-key `BTreeMap` per address cost 0.6 KiB per service.
#[derive(Debug)]
enum Counted<K> {
    One(K),
    Many(BTreeMap<K, u32>),
}

impl<K: Ord + Clone> Counted<K> {
    fn add(&mut self, key: K) {
        match self {
            Counted::One(only) => {
                let mut many = BTreeMap::from([(only.clone(), 1)]);
                *many.entry(key).or_default() += 1;
                *self = Counted::Many(many);
            }
            Counted::Many(many) => *many.entry(key).or_default() += 1,
        }
    }

    /// False when no key is left.
    fn remove<Q: Ord + ?Sized>(&mut self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
    {
        match self {
            Counted::One(only) => (*only).borrow() != key,
            Counted::Many(many) => {
                if let Some(n) = many.get_mut(key) {
                    *n -= 1;
                    if *n == 0 {
                        many.remove(key);
                    }
                }
                // Back to the allocation-free case once one key is left once.
                if many.len() == 1
                    && let Some((only, 1)) = many.first_key_value().map(|(k, n)| (k.clone(), *n))
                {
                    *self = Counted::One(only);
                    return true;
                }
                !many.is_empty()
            }
        }
    }

    fn keys(&self) -> impl Iterator<Item = &K> {
        let (one, many) = match self {
            Counted::One(only) => (Some(only), None),
            Counted::Many(many) => (None, Some(many.keys())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

/// An index by address, one map per family: keyed by `IpAddr` (17 bytes,
/// padded to the value's alignment) an IPv4 entry took 16 bytes more, and
/// the endpoint index has an entry per endpoint address.
#[derive(Debug)]
struct ByAddress<V> {
    v4: HashMap<std::net::Ipv4Addr, V>,
    v6: HashMap<std::net::Ipv6Addr, V>,
}

impl<V> Default for ByAddress<V> {
    fn default() -> Self {
        Self { v4: HashMap::new(), v6: HashMap::new() }
    }
}

impl<V> ByAddress<V> {
    fn get(&self, ip: &IpAddr) -> Option<&V> {
        match ip {
            IpAddr::V4(ip) => self.v4.get(ip),
            IpAddr::V6(ip) => self.v6.get(ip),
        }
    }

    fn get_mut(&mut self, ip: &IpAddr) -> Option<&mut V> {
        match ip {
            IpAddr::V4(ip) => self.v4.get_mut(ip),
            IpAddr::V6(ip) => self.v6.get_mut(ip),
        }
    }

    fn insert(&mut self, ip: IpAddr, value: V) {
        match ip {
            IpAddr::V4(ip) => self.v4.insert(ip, value),
            IpAddr::V6(ip) => self.v6.insert(ip, value),
        };
    }

    fn remove(&mut self, ip: &IpAddr) {
        match ip {
            IpAddr::V4(ip) => self.v4.remove(ip),
            IpAddr::V6(ip) => self.v6.remove(ip),
        };
    }
}

/// Counts `key` in (or out of) the index entry of `ip`, dropping the entry
/// when nothing is left.
fn count<K: Ord + Clone>(index: &mut ByAddress<Counted<K>>, ip: IpAddr, key: K, add: bool) {
    match (index.get_mut(&ip), add) {
        (Some(keys), true) => keys.add(key),
        (None, true) => index.insert(ip, Counted::One(key)),
        (Some(keys), false) => {
            if !keys.remove(&key) {
                index.remove(&ip);
            }
        }
        (None, false) => {}
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

    /// Services with objects. Between passes every entry has objects: one
    /// left with neither objects nor output is removed by its recompute.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Services with objects, and their objects.
    pub fn services(&self) -> impl Iterator<Item = (&ServiceRef, &Group)> {
        self.services.iter().filter(|(_, s)| !s.group.is_empty()).map(|(r, s)| (r, &s.group))
    }

    pub fn group(&self, service: &ServiceRef) -> Option<&Group> {
        self.services.get(service).map(|s| &s.group).filter(|g| !g.is_empty())
    }

    /// Every current problem with an object.
    pub fn errors(&self) -> impl Iterator<Item = &ObjectError> {
        self.services.values().flat_map(|s| s.output.errors.iter())
    }

    /// (imports, invalid imports, slices, invalid slices) over all services.
    pub fn counts(&self) -> [u64; 4] {
        let mut c = [0u64; 4];
        for (_, group) in self.services() {
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
            let old = self.services.get_mut(&service).map(|s| std::mem::take(&mut s.group)).unwrap_or_default();
            let addresses = |g: &Group| g.slices.iter().flat_map(|s| s.addresses()).collect::<BTreeSet<_>>();
            let (before, after) = (addresses(&old), addresses(&group));
            for (ip, slice) in before.difference(&after) {
                touched.insert(*ip);
                count(&mut self.endpoints, *ip, slice.clone(), false);
            }
            for (ip, slice) in after.difference(&before) {
                touched.insert(*ip);
                count(&mut self.endpoints, *ip, slice.clone(), true);
            }
            for (entries, add) in [(&old.imports, false), (&group.imports, true)] {
                for entry in entries.iter() {
                    for vip in entry.vips() {
                        touched.insert(vip);
                        count(&mut self.claims, vip, service.clone(), add);
                    }
                }
            }
            dirty.insert(service.clone());
            if !group.is_empty() {
                self.services.entry(service).or_default().group = group;
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
        let dirty: BTreeSet<ServiceRef> = self.services.keys().cloned().collect();
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
            let Some(old) = self.services.get_mut(service).map(|s| std::mem::take(&mut s.output)) else { continue };
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
                self.services.entry(service).or_default().output = Output { frontends: keys, errors };
            } else if self.services.get(&service).is_some_and(Service::is_empty) {
                self.services.remove(&service);
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
        self.endpoints.get(&ip).and_then(|slices| slices.keys().next()).map(|s| &**s)
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
            .filter_map(|service| self.group(service))
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
        let Some(group) = self.group(service) else { return (frontends, errors) };
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
                        let Some(port) = slice.port(port_name, key.protocol) else {
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
