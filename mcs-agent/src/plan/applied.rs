//! [`Applied`]: what the kernel holds, and the plan from it to a desired state.

use super::*;

impl Applied {
    /// The state of freshly created, empty maps.
    pub fn new(capacity: Capacity) -> Self {
        Self {
            capacity,
            frontends: BTreeMap::new(),
            backends: BTreeMap::new(),
            service_pool: IdPool::new(1, capacity.services.saturating_add(1)),
            // Backend id 0 is NO_BACKEND; ids index the BACKENDS array.
            backend_pool: IdPool::new(1, capacity.backends),
            slots: SlotAllocator::new(capacity.slots),
            quarantine: Quarantine::default(),
        }
    }

    /// Rebuilds the allocation state from what an earlier agent left in the
    /// kernel (`services`: the SERVICES entries; `backends`: non-free BACKENDS
    /// entries; `slot(i)`: SELECTION slot `i`). Tables are kept until the
    /// first plan, which rewrites only those it would build differently.
    /// Entries that do not fit (out of range, overlapping, unknown protocol,
    /// naming a free backend id) are returned as problems and rebuilt afresh.
    pub fn adopt(
        capacity: Capacity,
        services: &[(Result<FrontendKey, u8>, ServiceValue)],
        backends: &[(u32, BackendAddr)],
        slot: impl Fn(u32) -> Option<u32>,
    ) -> (Self, Vec<String>) {
        let mut problems = Vec::new();
        let mut backend_ids: BTreeMap<BackendAddr, u32> = BTreeMap::new();
        let mut addr_of: BTreeMap<u32, BackendAddr> = BTreeMap::new();
        for (id, addr) in backends {
            let addr = *addr;
            addr_of.insert(*id, addr);
            // Two ids for one address cannot come from a plan; keep the first,
            // the other is unreferenced and cleared by the first plan.
            backend_ids.entry(addr).or_insert(*id);
        }
        let mut slots = SlotAllocator::new(capacity.slots);
        let mut frontends = BTreeMap::new();
        let mut service_ids = BTreeSet::new();
        for (key, value) in services {
            let frontend = match key {
                Ok(frontend) => *frontend,
                Err(other) => {
                    problems.push(format!("adopted SERVICES entry with protocol {other}: rewritten"));
                    continue;
                }
            };
            let region = Region { offset: value.slot_offset, len: value.slot_count };
            let ids: Option<Vec<u32>> = (0..region.len).map(|i| slot(region.offset.checked_add(i)?)).collect();
            let members: Option<BTreeSet<BackendAddr>> =
                ids.as_ref().and_then(|ids| ids.iter().map(|id| addr_of.get(id).copied()).collect());
            let (Some(ids), Some(members)) = (ids, members) else {
                problems.push(format!("adopted frontend {frontend}: its table names a free backend id; rebuilt"));
                continue;
            };
            if value.service_id == 0 || value.service_id > capacity.services || !service_ids.insert(value.service_id) {
                problems.push(format!(
                    "adopted frontend {frontend}: service id {} out of range or reused; rebuilt",
                    value.service_id
                ));
                continue;
            }
            if !slots.reserve(region) {
                service_ids.remove(&value.service_id);
                problems.push(format!(
                    "adopted frontend {frontend}: its table overlaps another or is out of range; rebuilt"
                ));
                continue;
            }
            let members: Vec<BackendAddr> = members.into_iter().collect();
            // Slots must name the id the plan would give each member.
            let canonical = ids.iter().all(|id| backend_ids.get(&addr_of[id]) == Some(id));
            frontends.insert(
                frontend,
                AppliedFrontend {
                    service_id: value.service_id,
                    region,
                    digest: ADOPTED,
                    adopted_slots: canonical.then(|| slots_digest(&ids)),
                    members,
                    affinity_timeout_secs: value.affinity_timeout_secs,
                },
            );
        }
        let used_backends: BTreeSet<u32> = addr_of.keys().copied().collect();
        let mut backends: BTreeMap<BackendAddr, BackendId> =
            backend_ids.iter().map(|(addr, id)| (*addr, BackendId { id: *id, refs: 0 })).collect();
        drop(backend_ids);
        for f in frontends.values() {
            for addr in &f.members {
                if let Some(b) = backends.get_mut(addr) {
                    b.refs += 1;
                }
            }
        }
        let applied = Self {
            capacity,
            frontends,
            backends,
            service_pool: IdPool::with_used(1, capacity.services.saturating_add(1), &service_ids),
            backend_pool: IdPool::with_used(1, capacity.backends, &used_backends),
            slots,
            quarantine: Quarantine::default(),
        };
        // Ids of duplicate addresses are taken but unreferenced: clear them.
        let orphans: Vec<u32> =
            addr_of.iter().filter(|(id, a)| applied.backend_id(a) != Some(**id)).map(|(id, _)| *id).collect();
        let mut applied = applied;
        applied.quarantine.backend_ids.extend(&orphans);
        (applied, problems)
    }

    /// The backend id of an address, while some frontend uses it.
    pub fn backend_id(&self, addr: &BackendAddr) -> Option<u32> {
        self.backends.get(addr).map(|b| b.id)
    }

    /// Every backend some frontend uses, with its id.
    pub fn backends(&self) -> impl Iterator<Item = (&BackendAddr, u32)> {
        self.backends.iter().map(|(a, b)| (a, b.id))
    }

    /// The service id and table size of a programmed frontend.
    pub fn frontend(&self, key: &FrontendKey) -> Option<(u32, u32)> {
        self.frontends.get(key).map(|f| (f.service_id, f.region.len))
    }

    /// Selection slots in use, over all frontends.
    pub fn slots_used(&self) -> u64 {
        self.frontends.values().map(|f| u64::from(f.region.len)).sum()
    }

    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// Every programmed frontend.
    pub fn keys(&self) -> impl Iterator<Item = &FrontendKey> {
        self.frontends.keys()
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Plans every frontend: desired and programmed.
    pub fn plan(&self, desired: &DesiredState) -> Plan {
        let keys: BTreeSet<FrontendKey> = self.frontends.keys().chain(desired.frontends.keys()).copied().collect();
        self.plan_keys(desired, &keys)
    }

    fn release_ref(&mut self, addr: &BackendAddr, unreferenced: &mut BTreeSet<BackendAddr>) {
        if let Some(b) = self.backends.get_mut(addr)
            && b.refs > 0
        {
            b.refs -= 1;
            if b.refs == 0 {
                unreferenced.insert(*addr);
            }
        }
    }

    /// Plans the frontends in `keys` only (those a change touched): each is
    /// written, rewritten or deleted to match `desired`; the others are not
    /// looked at.
    pub fn plan_keys(&self, desired: &DesiredState, keys: &BTreeSet<FrontendKey>) -> Plan {
        let mut next = self.clone();
        let (ops, errors) = next.plan_in_place(desired, keys);
        Plan { ops, next, errors }
    }

    /// [`Applied::plan_keys`] without the copy (which costs O(all frontends)):
    /// `self` becomes the state after the writes. When the writes fail, the
    /// caller must not keep `self` (re-adopt the kernel's state instead).
    pub fn plan_in_place(
        &mut self,
        desired: &DesiredState,
        keys: &BTreeSet<FrontendKey>,
    ) -> (Vec<MapOp>, Vec<CapacityError>) {
        let next = self;
        let quarantine = std::mem::take(&mut next.quarantine);
        quarantine.service_ids.into_iter().for_each(|id| next.service_pool.release(id));
        quarantine.backend_ids.into_iter().for_each(|id| next.backend_pool.release(id));
        quarantine.regions.into_iter().for_each(|r| next.slots.release(r));

        let mut puts_backend = Vec::new();
        let mut puts_slots = Vec::new();
        let mut puts_service = Vec::new();
        let mut deletes = Vec::new();
        let mut errors = Vec::new();
        // Backends whose last reference went: cleared unless taken again.
        let mut unreferenced: BTreeSet<BackendAddr> = BTreeSet::new();

        let gone: Vec<FrontendKey> = keys
            .iter()
            .filter(|k| !desired.frontends.contains_key(k) && next.frontends.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            let old = next.frontends.remove(&key).expect("listed above");
            deletes.push(MapOp::DeleteService { key: service_key(&key) });
            if old.affinity_timeout_secs != 0 {
                // The id will serve another frontend: its affinity must not.
                deletes.push(MapOp::PurgeAffinity { service_id: old.service_id, backend_ids: None });
            }
            for addr in &old.members {
                next.release_ref(addr, &mut unreferenced);
            }
            next.quarantine.service_ids.push(old.service_id);
            next.quarantine.regions.push(old.region);
        }

        let mut purges = Vec::new();
        let stale: Vec<(&FrontendKey, &Frontend, u64)> = keys
            .iter()
            .filter_map(|k| desired.frontends.get_key_value(k))
            .map(|(k, f)| (k, f, digest(f)))
            .filter(|(k, _, digest)| next.frontends.get(k).is_none_or(|old| old.digest != *digest))
            .collect();
        let mut tables = Table::build_all(stale.iter().map(|(k, f, _)| (*k, *f)).collect());
        for (key, frontend, digest) in stale {
            let old = next.frontends.get(key);
            let capacity_error = |resource, capacity, flag, kept| CapacityError {
                service: frontend.service.clone(),
                frontend: *key,
                resource,
                capacity,
                flag,
                kept,
            };
            let kept = old.is_some();
            let len = frontend.table_size;
            // Capacity first: a table is built only when it has somewhere to go.
            let service_id = match old {
                Some(old) => old.service_id,
                None => match next.service_pool.alloc() {
                    Some(id) => id,
                    None => {
                        errors.push(capacity_error("service entries", next.capacity.services, "--max-services", kept));
                        continue;
                    }
                },
            };
            // A new region, so the frontend flips from the old table to the
            // new one in one write. With none free, a table of the same size is
            // rewritten in place: each slot names an old or a new member
            // (both programmed) while the rewrite runs.
            let region = match next.slots.alloc(len) {
                Some(region) => Some(region),
                None if old.is_some_and(|o| o.region.len == len) => None,
                None => {
                    if old.is_none() {
                        next.service_pool.release(service_id);
                    }
                    errors.push(capacity_error("selection slots", next.capacity.slots, "--max-selection-slots", kept));
                    continue;
                }
            };
            let Table { members, slots: table } = tables.remove(key).unwrap_or_default();
            let new_addrs: Vec<BackendAddr> =
                members.iter().filter(|a| !next.backends.contains_key(a)).copied().collect();
            // After a restart: a table the kernel already holds exactly is kept,
            // so adopting costs no writes and moves no flow.
            if let Some(old) = old
                && let Some(adopted) = old.adopted_slots
                && new_addrs.is_empty()
                && old.affinity_timeout_secs == frontend.affinity_timeout_secs
                && old.region.len as usize == table.len()
            {
                let member_ids: Vec<u32> = members.iter().map(|a| next.backends[a].id).collect();
                let ids: Vec<u32> = table.iter().map(|&i| member_ids[i as usize]).collect();
                if slots_digest(&ids) == adopted {
                    if let Some(region) = region {
                        next.slots.release(region);
                    }
                    let kept = next.frontends.get_mut(key).expect("old is an entry of next");
                    kept.digest = digest;
                    kept.adopted_slots = None;
                    continue;
                }
            }
            if (new_addrs.len() as u64) > next.backend_pool.available() {
                if let Some(region) = region {
                    next.slots.release(region);
                }
                if old.is_none() {
                    next.service_pool.release(service_id);
                }
                errors.push(capacity_error("backend ids", next.capacity.backends - 1, "--max-backends", kept));
                continue;
            }
            let region = region.unwrap_or_else(|| old.expect("in place only over an old table").region);
            for addr in new_addrs {
                let id = next.backend_pool.alloc().expect("availability checked above");
                next.backends.insert(addr, BackendId { id, refs: 0 });
                unreferenced.remove(&addr);
                puts_backend.push(MapOp::PutBackend { id, backend: backend_value(&addr) });
            }
            for addr in &members {
                if let Some(b) = next.backends.get_mut(addr) {
                    b.refs += 1;
                }
                unreferenced.remove(addr);
            }
            if region.len > 0 {
                // Tables have thousands of slots but few members: look each member up
                // once, then map slots through the (sorted) member list.
                let member_ids: Vec<u32> = members.iter().map(|a| next.backends[a].id).collect();
                let ids = table.iter().map(|&i| member_ids[i as usize]).collect();
                puts_slots.push(MapOp::PutSlots { offset: region.offset, ids });
            }
            puts_service.push(MapOp::PutService {
                key: service_key(key),
                value: ServiceValue {
                    service_id,
                    slot_offset: region.offset,
                    slot_count: region.len,
                    affinity_timeout_secs: frontend.affinity_timeout_secs,
                    ..ServiceValue::default()
                },
                fresh: old.is_none(),
            });
            let old_members = old.map(|o| o.members.clone()).unwrap_or_default();
            if let Some(old) = old
                && old.affinity_timeout_secs != 0
            {
                // A backend that leaves breaks the affinity to it.
                let gone: Vec<u32> = old
                    .members
                    .iter()
                    .filter(|a| members.binary_search(a).is_err())
                    .map(|a| next.backends[a].id)
                    .collect();
                if !gone.is_empty() || frontend.affinity_timeout_secs == 0 {
                    let backend_ids = (frontend.affinity_timeout_secs != 0).then_some(gone);
                    purges.push(MapOp::PurgeAffinity { service_id, backend_ids });
                }
            }
            let previous = next.frontends.insert(
                *key,
                AppliedFrontend {
                    service_id,
                    region,
                    digest,
                    adopted_slots: None,
                    members,
                    affinity_timeout_secs: frontend.affinity_timeout_secs,
                },
            );
            for addr in &old_members {
                next.release_ref(addr, &mut unreferenced);
            }
            if let Some(previous) = previous
                && previous.region != region
            {
                next.quarantine.regions.push(previous.region);
            }
        }

        let mut clears = Vec::new();
        for addr in unreferenced {
            if let Some(BackendId { id, .. }) = next.backends.remove(&addr) {
                next.quarantine.backend_ids.push(id);
                clears.push(MapOp::ClearBackend { id, v6: addr.ip.is_ipv6() });
            }
        }

        let mut ops = puts_backend;
        ops.extend(puts_slots);
        ops.extend(puts_service);
        ops.extend(deletes);
        ops.extend(purges);
        ops.extend(clears);
        (ops, errors)
    }
}
