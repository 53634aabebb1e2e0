//! Two states -> the ordered map writes between them. Pure, and the owner of
//! every id and table region the kernel sees.
//!
//! Order makes each frontend switch atomically: new backends, then new
//! selection tables, then the one `SERVICES` entry that points at them, then
//! deletions. Backend ids and table regions released by a plan are quarantined
//! until the next plan, so a packet that read the old service entry just before
//! the flip never finds its slot or backend reused for someone else.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash as _, Hasher as _},
    net::IpAddr,
};

use mcs_common::{
    Backend, Ip4, Ip6, MapAddr, ServiceKey, ServiceValue, ip_to_map, ip6_from_map, ip6_to_map, port_to_map,
};
use thiserror::Error;

use crate::{
    desired::{BackendAddr, DesiredState, Frontend, FrontendKey, Protocol},
    maglev,
};

/// Map sizes the plan must fit in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services: u32,
    pub backends: u32,
    pub slots: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            services: mcs_common::DEFAULT_MAX_SERVICES,
            backends: mcs_common::DEFAULT_MAX_BACKENDS,
            slots: mcs_common::DEFAULT_MAX_SELECTION_SLOTS,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend {
        id: u32,
        backend: FamilyBackend,
    },
    PutSlots {
        offset: u32,
        ids: Vec<u32>,
    },
    PutService {
        key: FamilyKey,
        value: ServiceValue,
        /// The service id is newly allocated: its counters start from zero.
        fresh: bool,
    },
    DeleteService {
        key: FamilyKey,
    },
    /// Forget ClientIP affinity of these backends (all when `None`) for a frontend.
    PurgeAffinity {
        service_id: u32,
        backend_ids: Option<Vec<u32>>,
    },
    /// Frees a backend id in its family's array.
    ClearBackend {
        id: u32,
        v6: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error(
    "ServiceImport {service} frontend {frontend}: {}, {resource} are exhausted ({capacity} in all); raise {flag}",
    if *kept { "its update is not programmed (the previous version keeps serving)" } else { "not programmed" }
)]
pub struct CapacityError {
    pub service: String,
    pub frontend: FrontendKey,
    pub resource: &'static str,
    pub capacity: u32,
    pub flag: &'static str,
    /// An earlier version of the frontend is programmed and keeps serving.
    pub kept: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Region {
    offset: u32,
    len: u32,
}

/// First-fit allocator of contiguous selection-table slots.
#[derive(Clone, Debug)]
struct SlotAllocator {
    /// offset -> length of each free run; runs never touch.
    free: BTreeMap<u32, u32>,
}

impl SlotAllocator {
    fn new(capacity: u32) -> Self {
        Self { free: if capacity == 0 { BTreeMap::new() } else { BTreeMap::from([(0, capacity)]) } }
    }

    fn alloc(&mut self, len: u32) -> Option<Region> {
        if len == 0 {
            return Some(Region::default());
        }
        let (&offset, &run) = self.free.iter().find(|&(_, &run)| run >= len)?;
        self.free.remove(&offset);
        if run > len {
            self.free.insert(offset + len, run - len);
        }
        Some(Region { offset, len })
    }

    /// Takes a region that is already in use (adopted from the kernel) out of
    /// the free runs. False when it is not entirely free (overlap, out of range).
    fn reserve(&mut self, region: Region) -> bool {
        if region.len == 0 {
            return true;
        }
        let Some((&offset, &run)) = self.free.range(..=region.offset).next_back() else {
            return false;
        };
        let end = region.offset as u64 + region.len as u64;
        if end > offset as u64 + run as u64 {
            return false;
        }
        self.free.remove(&offset);
        if region.offset > offset {
            self.free.insert(offset, region.offset - offset);
        }
        let tail = (offset as u64 + run as u64 - end) as u32;
        if tail > 0 {
            self.free.insert(end as u32, tail);
        }
        true
    }

    fn release(&mut self, region: Region) {
        if region.len == 0 {
            return;
        }
        let (mut offset, mut len) = (region.offset, region.len);
        if let Some((&prev, &prev_len)) = self.free.range(..offset).next_back()
            && prev + prev_len == offset
        {
            self.free.remove(&prev);
            offset = prev;
            len += prev_len;
        }
        if let Some(next_len) = self.free.remove(&(offset + len)) {
            len += next_len;
        }
        self.free.insert(offset, len);
    }

    #[cfg(test)]
    fn largest_free(&self) -> u32 {
        self.free.values().copied().max().unwrap_or(0)
    }
}

/// Smallest-free-first ids in `first..limit`, so freed ids are reused.
#[derive(Clone, Debug)]
struct IdPool {
    next: u32,
    limit: u32,
    free: BTreeSet<u32>,
}

impl IdPool {
    fn new(first: u32, limit: u32) -> Self {
        Self { next: first, limit, free: BTreeSet::new() }
    }

    /// A pool whose `used` ids are taken (adopted from the kernel).
    fn with_used(first: u32, limit: u32, used: &BTreeSet<u32>) -> Self {
        let next = used.last().map_or(first, |last| last + 1).max(first);
        let free = (first..next).filter(|id| !used.contains(id)).collect();
        Self { next, limit, free }
    }

    fn available(&self) -> u64 {
        self.free.len() as u64 + u64::from(self.limit.saturating_sub(self.next))
    }

    fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.next < self.limit).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    fn release(&mut self, id: u32) {
        self.free.insert(id);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct AppliedFrontend {
    service_id: u32,
    region: Region,
    /// Digest of what the table was built from; equal digests, equal tables.
    /// `ADOPTED` for a table found in the kernel at start, whose input is unknown.
    digest: u64,
    /// For an adopted table: a hash of its slots' backend ids, so the first
    /// plan keeps it as it is when it would build the very same table.
    adopted_slots: Option<u64>,
    /// Distinct backends in the table, sorted.
    members: Vec<BackendAddr>,
    affinity_timeout_secs: u32,
}

#[derive(Clone, Debug, Default)]
struct Quarantine {
    service_ids: Vec<u32>,
    backend_ids: Vec<u32>,
    regions: Vec<Region>,
}

/// What the kernel holds, as far as the agent has programmed it.
#[derive(Clone, Debug)]
pub struct Applied {
    capacity: Capacity,
    frontends: BTreeMap<FrontendKey, AppliedFrontend>,
    backend_ids: BTreeMap<BackendAddr, u32>,
    /// How many frontends' tables name each backend: at zero its id is freed.
    backend_refs: BTreeMap<BackendAddr, u32>,
    service_pool: IdPool,
    backend_pool: IdPool,
    slots: SlotAllocator,
    quarantine: Quarantine,
}

/// The result of [`Applied::plan`]: apply `ops` in order, then adopt `next`.
#[derive(Debug)]
pub struct Plan {
    pub ops: Vec<MapOp>,
    pub next: Applied,
    pub errors: Vec<CapacityError>,
}

impl Plan {
    pub fn summary(&self) -> PlanSummary {
        PlanSummary::of(&self.ops)
    }
}

impl PlanSummary {
    pub fn of(ops: &[MapOp]) -> Self {
        let mut s = PlanSummary::default();
        for op in ops {
            match op {
                MapOp::PutBackend { .. } => s.backends_added += 1,
                MapOp::PutSlots { ids, .. } => s.slots_written += ids.len(),
                MapOp::PutService { .. } => s.services_written += 1,
                MapOp::DeleteService { .. } => s.services_deleted += 1,
                MapOp::PurgeAffinity { .. } => {}
                MapOp::ClearBackend { .. } => s.backends_removed += 1,
            }
        }
        s
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanSummary {
    pub services_written: usize,
    pub services_deleted: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    pub slots_written: usize,
}

impl PlanSummary {
    pub fn plus(self, o: Self) -> Self {
        Self {
            services_written: self.services_written + o.services_written,
            services_deleted: self.services_deleted + o.services_deleted,
            backends_added: self.backends_added + o.backends_added,
            backends_removed: self.backends_removed + o.backends_removed,
            slots_written: self.slots_written + o.slots_written,
        }
    }
}

/// A backend's share as an integer Maglev weight (parts per million, at least 1).
fn weight_units(share: f64) -> u32 {
    (share * 1_000_000.0).round().max(1.0) as u32
}

/// The weighted Maglev table of a frontend, one backend address per slot.
pub fn selection_table(frontend: &Frontend) -> Vec<BackendAddr> {
    let table = Table::build(frontend);
    table.slots.iter().map(|&i| table.members[i as usize]).collect()
}

/// A frontend's selection table: its distinct members, sorted, and per slot
/// an index into them.
#[derive(Debug, Default)]
struct Table {
    members: Vec<BackendAddr>,
    slots: Vec<u32>,
}

impl Table {
    fn build(frontend: &Frontend) -> Self {
        let mut input: Vec<(BackendAddr, u32)> =
            frontend.weights.iter().map(|w| (w.addr, weight_units(w.share))).collect();
        if input.is_empty() || frontend.table_size == 0 {
            return Self::default();
        }
        input.sort_by_key(|(addr, _)| *addr);
        let raw = maglev::build(&input, frontend.table_size);
        let mut index = vec![u32::MAX; input.len()];
        for &i in &raw {
            index[i as usize] = 0;
        }
        let mut members = Vec::new();
        for (i, slot) in index.iter_mut().enumerate() {
            if *slot == 0 {
                *slot = members.len() as u32;
                members.push(input[i].0);
            }
        }
        let slots = raw.iter().map(|&i| index[i as usize]).collect();
        Self { members, slots }
    }

    /// Tables of many frontends, on every CPU: at cold start there are
    /// tens of thousands.
    fn build_all<'a>(frontends: Vec<(&'a FrontendKey, &'a Frontend)>) -> BTreeMap<FrontendKey, Table> {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        if frontends.len() < 256 || workers == 1 {
            return frontends.into_iter().map(|(k, f)| (*k, Self::build(f))).collect();
        }
        let chunk = frontends.len().div_ceil(workers);
        std::thread::scope(|scope| {
            let handles: Vec<_> = frontends
                .chunks(chunk)
                .map(|part| scope.spawn(move || part.iter().map(|(k, f)| (**k, Self::build(f))).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("a table builder panicked")).collect()
        })
    }
}

/// The digest of a table adopted from the kernel, whose input is unknown.
const ADOPTED: u64 = 0;

fn slots_digest(ids: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ids.hash(&mut h);
    h.finish()
}

fn digest(frontend: &Frontend) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    frontend.table_size.hash(&mut h);
    frontend.affinity_timeout_secs.hash(&mut h);
    for w in &frontend.weights {
        w.addr.hash(&mut h);
        weight_units(w.share).hash(&mut h);
    }
    h.finish()
}

/// A frontend's key in its family's map (`SERVICES` or `SERVICES6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FamilyKey {
    V4(ServiceKey<Ip4>),
    V6(ServiceKey<Ip6>),
}

/// A backend in its family's array (`BACKENDS` or `BACKENDS6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FamilyBackend {
    V4(Backend<Ip4>),
    V6(Backend<Ip6>),
}

impl FamilyBackend {
    pub fn addr(&self) -> BackendAddr {
        match self {
            FamilyBackend::V4(b) => backend_addr(b),
            FamilyBackend::V6(b) => backend_addr(b),
        }
    }
}

/// A map-order address as an `IpAddr`.
pub trait ToIp: MapAddr {
    fn to_ip(self) -> IpAddr;
}

impl ToIp for Ip4 {
    fn to_ip(self) -> IpAddr {
        IpAddr::V4(self.to_ne_bytes().into())
    }
}

impl ToIp for Ip6 {
    fn to_ip(self) -> IpAddr {
        IpAddr::V6(ip6_from_map(self).into())
    }
}

pub fn service_key(key: &FrontendKey) -> FamilyKey {
    let (port, proto) = (port_to_map(key.port), key.protocol.number());
    match key.vip {
        IpAddr::V4(vip) => FamilyKey::V4(ServiceKey { vip: ip_to_map(vip.octets()), port, proto, _pad: 0 }),
        IpAddr::V6(vip) => FamilyKey::V6(ServiceKey { vip: ip6_to_map(vip.octets()), port, proto, _pad: 0 }),
    }
}

pub fn backend_value(addr: &BackendAddr) -> FamilyBackend {
    let port = port_to_map(addr.port);
    match addr.ip {
        IpAddr::V4(ip) => FamilyBackend::V4(Backend { ip: ip_to_map(ip.octets()), port, _pad: 0 }),
        IpAddr::V6(ip) => FamilyBackend::V6(Backend { ip: ip6_to_map(ip.octets()), port, _pad: 0 }),
    }
}

pub fn backend_addr<A: ToIp>(b: &Backend<A>) -> BackendAddr {
    BackendAddr { ip: b.ip.to_ip(), port: u16::from_be(b.port) }
}

/// A map key read back: its frontend, or the unknown protocol number.
pub fn frontend_of<A: ToIp>(key: &ServiceKey<A>) -> Result<FrontendKey, u8> {
    let protocol = match key.proto {
        mcs_common::IPPROTO_TCP => Protocol::Tcp,
        mcs_common::IPPROTO_UDP => Protocol::Udp,
        other => return Err(other),
    };
    Ok(FrontendKey { vip: key.vip.to_ip(), port: u16::from_be(key.port), protocol })
}

impl Applied {
    /// The state of freshly created, empty maps.
    pub fn new(capacity: Capacity) -> Self {
        Self {
            capacity,
            frontends: BTreeMap::new(),
            backend_ids: BTreeMap::new(),
            backend_refs: BTreeMap::new(),
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
        let mut backend_refs: BTreeMap<BackendAddr, u32> = BTreeMap::new();
        for f in frontends.values() {
            for addr in &f.members {
                *backend_refs.entry(*addr).or_default() += 1;
            }
        }
        let applied = Self {
            capacity,
            frontends,
            backend_ids,
            backend_refs,
            service_pool: IdPool::with_used(1, capacity.services.saturating_add(1), &service_ids),
            backend_pool: IdPool::with_used(1, capacity.backends, &used_backends),
            slots,
            quarantine: Quarantine::default(),
        };
        // Ids of duplicate addresses are taken but unreferenced: clear them.
        let orphans: Vec<u32> =
            addr_of.iter().filter(|(id, a)| applied.backend_ids.get(a) != Some(id)).map(|(id, _)| *id).collect();
        let mut applied = applied;
        applied.quarantine.backend_ids.extend(&orphans);
        (applied, problems)
    }

    /// The backend id of an address, while some frontend uses it.
    pub fn backend_id(&self, addr: &BackendAddr) -> Option<u32> {
        self.backend_ids.get(addr).copied()
    }

    /// Every backend some frontend uses, with its id.
    pub fn backends(&self) -> impl Iterator<Item = (&BackendAddr, u32)> {
        self.backend_ids.iter().map(|(a, id)| (a, *id))
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
        self.backend_ids.len()
    }

    /// Plans every frontend: desired and programmed.
    pub fn plan(&self, desired: &DesiredState) -> Plan {
        let keys: BTreeSet<FrontendKey> = self.frontends.keys().chain(desired.frontends.keys()).copied().collect();
        self.plan_keys(desired, &keys)
    }

    fn release_ref(&mut self, addr: &BackendAddr, unreferenced: &mut BTreeSet<BackendAddr>) {
        if let Some(n) = self.backend_refs.get_mut(addr) {
            *n -= 1;
            if *n == 0 {
                self.backend_refs.remove(addr);
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
                members.iter().filter(|a| !next.backend_ids.contains_key(a)).copied().collect();
            // After a restart: a table the kernel already holds exactly is kept,
            // so adopting costs no writes and moves no flow.
            if let Some(old) = old
                && let Some(adopted) = old.adopted_slots
                && new_addrs.is_empty()
                && old.affinity_timeout_secs == frontend.affinity_timeout_secs
                && old.region.len as usize == table.len()
            {
                let member_ids: Vec<u32> = members.iter().map(|a| next.backend_ids[a]).collect();
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
                next.backend_ids.insert(addr, id);
                unreferenced.remove(&addr);
                puts_backend.push(MapOp::PutBackend { id, backend: backend_value(&addr) });
            }
            for addr in &members {
                *next.backend_refs.entry(*addr).or_default() += 1;
                unreferenced.remove(addr);
            }
            if region.len > 0 {
                // Tables have thousands of slots but few members: look each member up
                // once, then map slots through the (sorted) member list.
                let member_ids: Vec<u32> = members.iter().map(|a| next.backend_ids[a]).collect();
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
                    .map(|a| next.backend_ids[a])
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
            if let Some(id) = next.backend_ids.remove(&addr) {
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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{desired::Protocol, locality::Weighted};

    /// Small prime tables keep the expectations readable.
    const SIZE: u32 = 7;

    fn key(last: u8, port: u16) -> FrontendKey {
        FrontendKey { vip: Ipv4Addr::new(10, 96, 0, last).into(), port, protocol: Protocol::Tcp }
    }

    fn addr(last: u8) -> BackendAddr {
        BackendAddr { ip: Ipv4Addr::new(10, 1, 0, last).into(), port: 80 }
    }

    fn frontend(backends: &[u8]) -> Frontend {
        let weights: Vec<Weighted> = backends
            .iter()
            .map(|&last| Weighted { addr: addr(last), share: 1.0 / backends.len() as f64, tier: 0, cluster: None })
            .collect();
        Frontend {
            service: "demo/web".into(),
            port_name: "http".into(),
            endpoints: Vec::new(),
            tiers: vec![],
            table_size: if weights.is_empty() { 0 } else { SIZE },
            weights,
            affinity_timeout_secs: 0,
        }
    }

    fn with_affinity(mut f: Frontend) -> Frontend {
        f.affinity_timeout_secs = 10_800;
        f
    }

    fn desired(frontends: &[(FrontendKey, Frontend)]) -> DesiredState {
        DesiredState { frontends: frontends.iter().cloned().collect() }
    }

    /// The maps as the kernel would hold them after a sequence of plans.
    #[derive(Default)]
    struct FakeKernel {
        services: BTreeMap<FrontendKey, ServiceValue>,
        backends: BTreeMap<u32, BackendAddr>,
        slots: BTreeMap<u32, u32>,
    }

    fn frontend_key(key: &FamilyKey) -> FrontendKey {
        match key {
            FamilyKey::V4(k) => frontend_of(k).unwrap(),
            FamilyKey::V6(k) => frontend_of(k).unwrap(),
        }
    }

    impl FakeKernel {
        fn apply(&mut self, ops: &[MapOp]) {
            for op in ops {
                match op {
                    MapOp::PutBackend { id, backend } => {
                        let addr = match backend {
                            FamilyBackend::V4(b) => backend_addr(b),
                            FamilyBackend::V6(b) => backend_addr(b),
                        };
                        self.backends.insert(*id, addr);
                    }
                    MapOp::PutSlots { offset, ids } => {
                        for (i, id) in ids.iter().enumerate() {
                            self.slots.insert(offset + i as u32, *id);
                        }
                    }
                    MapOp::PutService { key, value, .. } => {
                        self.services.insert(frontend_key(key), *value);
                    }
                    MapOp::DeleteService { key } => {
                        self.services.remove(&frontend_key(key));
                    }
                    MapOp::PurgeAffinity { .. } => {}
                    MapOp::ClearBackend { id, .. } => {
                        self.backends.remove(id);
                    }
                }
            }
        }

        fn adopt(&self, capacity: Capacity) -> (Applied, Vec<String>) {
            let services: Vec<_> = self.services.iter().map(|(k, v)| (Ok(*k), *v)).collect();
            let backends: Vec<_> = self.backends.iter().map(|(k, v)| (*k, *v)).collect();
            Applied::adopt(capacity, &services, &backends, |i| Some(self.slots.get(&i).copied().unwrap_or(0)))
        }
    }

    #[test]
    fn a_restarted_agent_adopts_the_kernel_state_and_writes_nothing_for_it() {
        let capacity = Capacity { services: 16, backends: 16, slots: 64 };
        let state = desired(&[(key(1, 80), frontend(&[1, 2, 3])), (key(2, 53), with_affinity(frontend(&[2, 4])))]);
        let mut kernel = FakeKernel::default();
        let first = Applied::new(capacity).plan(&state);
        kernel.apply(&first.ops);
        // Something the old agent had quarantined is released by now.
        let second = first.next.plan(&desired(&[(key(1, 80), frontend(&[1, 2, 3]))]));
        kernel.apply(&second.ops);
        let third = second.next.plan(&state);
        kernel.apply(&third.ops);

        let (adopted, problems) = kernel.adopt(capacity);
        assert!(problems.is_empty(), "{problems:?}");
        let again = adopted.plan(&state);
        assert!(again.ops.is_empty(), "an unchanged state writes nothing: {:?}", kinds(&again.ops));
        assert!(again.errors.is_empty());

        // A change after adoption touches only its frontend, in fresh slots and ids.
        let changed = desired(&[(key(1, 80), frontend(&[1, 2, 3, 5])), (key(2, 53), with_affinity(frontend(&[2, 4])))]);
        let plan = again.next.plan(&changed);
        assert_eq!(kinds(&plan.ops), ["backend", "slots", "service"]);
        let used: BTreeSet<u32> = kernel.backends.keys().copied().collect();
        let MapOp::PutBackend { id, .. } = plan.ops[0] else { unreachable!() };
        assert!(!used.contains(&id), "new backend id {id} collides with an adopted one {used:?}");
        let MapOp::PutSlots { offset, ref ids } = plan.ops[1] else { unreachable!() };
        for v in kernel.services.values() {
            let (a, b) = (v.slot_offset, v.slot_offset + v.slot_count);
            assert!(offset + ids.len() as u32 <= a || offset >= b, "new table overlaps an adopted one");
        }
    }

    #[test]
    fn adoption_rebuilds_what_it_cannot_trust() {
        let capacity = Capacity { services: 16, backends: 16, slots: 64 };
        let state = desired(&[(key(1, 80), frontend(&[1, 2]))]);
        let mut kernel = FakeKernel::default();
        kernel.apply(&Applied::new(capacity).plan(&state).ops);
        // A backend the table names has vanished.
        let first_backend = *kernel.backends.keys().next().unwrap();
        kernel.backends.remove(&first_backend);
        let (adopted, problems) = kernel.adopt(capacity);
        assert_eq!(problems.len(), 1, "{problems:?}");
        let plan = adopted.plan(&state);
        assert!(kinds(&plan.ops).contains(&"service"), "the frontend is rewritten: {:?}", kinds(&plan.ops));
    }

    fn kinds(ops: &[MapOp]) -> Vec<&'static str> {
        ops.iter()
            .map(|op| match op {
                MapOp::PutBackend { .. } => "backend",
                MapOp::PutSlots { .. } => "slots",
                MapOp::PutService { .. } => "service",
                MapOp::DeleteService { .. } => "delete",
                MapOp::PurgeAffinity { .. } => "purge",
                MapOp::ClearBackend { .. } => "clear",
            })
            .collect()
    }

    fn slots(op: &MapOp) -> (u32, BTreeSet<u32>) {
        let MapOp::PutSlots { offset, ids } = op else { panic!("{op:?}") };
        assert_eq!(ids.len(), SIZE as usize);
        (*offset, ids.iter().copied().collect())
    }

    #[test]
    fn a_new_service_is_written_backends_then_table_then_flip() {
        let plan = Applied::new(Capacity::default()).plan(&desired(&[(key(1, 80), frontend(&[2, 3]))]));
        assert!(plan.errors.is_empty());
        assert_eq!(kinds(&plan.ops), ["backend", "backend", "slots", "service"]);
        assert_eq!(slots(&plan.ops[2]), (0, BTreeSet::from([1, 2])));
        let MapOp::PutService { value, .. } = &plan.ops[3] else { panic!() };
        assert_eq!((value.service_id, value.slot_offset, value.slot_count), (1, 0, SIZE));
    }

    #[test]
    fn an_unchanged_state_plans_nothing() {
        let state = desired(&[(key(1, 80), frontend(&[2]))]);
        let first = Applied::new(Capacity::default()).plan(&state);
        assert!(first.next.plan(&state).ops.is_empty());
    }

    #[test]
    fn an_update_writes_a_new_region_and_frees_the_old_one_a_plan_later() {
        let first = Applied::new(Capacity::default()).plan(&desired(&[(key(1, 80), frontend(&[2, 3]))]));
        let second = first.next.plan(&desired(&[(key(1, 80), frontend(&[2, 4]))]));
        assert_eq!(kinds(&second.ops), ["backend", "slots", "service", "clear"]);
        // The old region is still quarantined: the new table lands after it.
        assert_eq!(slots(&second.ops[1]), (SIZE, BTreeSet::from([1, 3])));
        // 10.1.0.3 (id 2) is cleared now but its id is not reused yet.
        assert_eq!(second.ops[3], MapOp::ClearBackend { id: 2, v6: false });
        let third = second.next.plan(&desired(&[(key(1, 80), frontend(&[5]))]));
        assert_eq!(third.ops[0], MapOp::PutBackend { id: 2, backend: backend_value(&addr(5)) });
        assert_eq!(slots(&third.ops[1]), (0, BTreeSet::from([2])));
    }

    #[test]
    fn a_removed_service_is_deleted_and_its_backends_cleared() {
        let first = Applied::new(Capacity::default())
            .plan(&desired(&[(key(1, 80), frontend(&[2])), (key(2, 80), frontend(&[2, 3]))]));
        // Both frontends share 10.1.0.2:80, which gets one id.
        assert_eq!(first.next.backend_count(), 2);
        let second = first.next.plan(&desired(&[(key(1, 80), frontend(&[2]))]));
        assert_eq!(kinds(&second.ops), ["delete", "clear"]);
        assert_eq!(second.next.frontend_count(), 1);
        let third = second.next.plan(&desired(&[]));
        assert_eq!(kinds(&third.ops), ["delete", "clear"]);
        assert_eq!((third.next.frontend_count(), third.next.backend_count()), (0, 0));
    }

    #[test]
    fn a_service_without_ready_backends_gets_an_empty_table() {
        let plan = Applied::new(Capacity::default()).plan(&desired(&[(key(1, 80), frontend(&[]))]));
        assert_eq!(kinds(&plan.ops), ["service"]);
        let MapOp::PutService { value, .. } = &plan.ops[0] else { panic!() };
        assert_eq!(value.slot_count, 0);
    }

    #[test]
    fn capacity_limits_reject_only_what_does_not_fit_and_say_which_flag() {
        let capacity = Capacity { services: 1, backends: 3, slots: 3 * SIZE };
        let plan = Applied::new(capacity).plan(&desired(&[(key(1, 80), frontend(&[2])), (key(2, 80), frontend(&[3]))]));
        assert_eq!(plan.next.frontend_count(), 1);
        assert_eq!(plan.errors.len(), 1);
        let text = plan.errors[0].to_string();
        assert!(text.contains("10.96.0.2:80/TCP") && text.contains("--max-services"), "{text}");

        let capacity = Capacity { services: 8, backends: 3, slots: 16 };
        let plan = Applied::new(capacity).plan(&desired(&[(key(1, 80), frontend(&[2, 3, 4]))]));
        assert!(plan.ops.is_empty());
        assert!(plan.errors[0].to_string().contains("--max-backends"));

        let capacity = Capacity { services: 8, backends: 16, slots: SIZE - 1 };
        let plan = Applied::new(capacity).plan(&desired(&[(key(1, 80), frontend(&[2, 3]))]));
        assert!(plan.ops.is_empty());
        assert!(plan.errors[0].to_string().contains("--max-selection-slots"));
    }

    #[test]
    fn a_failed_update_keeps_the_old_version_serving() {
        let capacity = Capacity { services: 8, backends: 16, slots: SIZE + 2 };
        let first = Applied::new(capacity).plan(&desired(&[(key(1, 80), frontend(&[2]))]));
        let mut bigger = frontend(&[2, 3, 4]);
        bigger.table_size = 11;
        let second = first.next.plan(&desired(&[(key(1, 80), bigger)]));
        assert_eq!(second.errors.len(), 1);
        let text = second.errors[0].to_string();
        assert!(text.contains("the previous version keeps serving"), "{text}");
        assert!(second.ops.is_empty(), "{:?}", second.ops);
        assert_eq!(second.next.backend_count(), 1);
    }

    /// The capacity freeze: with every slot taken, a change to a programmed
    /// frontend must still be applied (its table rewritten where it is).
    #[test]
    fn with_no_room_for_a_second_table_an_update_is_rewritten_in_place() {
        let capacity = Capacity { services: 8, backends: 16, slots: SIZE };
        let first = Applied::new(capacity).plan(&desired(&[(key(1, 80), frontend(&[2]))]));
        let second = first.next.plan(&desired(&[(key(1, 80), frontend(&[2, 3, 4]))]));
        assert!(second.errors.is_empty(), "{:?}", second.errors);
        assert_eq!(kinds(&second.ops), ["backend", "backend", "slots", "service"]);
        let (offset, ids) = slots(&second.ops[2]);
        assert_eq!((offset, ids.len()), (0, 3), "the same region, now over three backends");
        let third = second.next.plan(&desired(&[(key(1, 80), frontend(&[3]))]));
        assert!(third.errors.is_empty(), "{:?}", third.errors);
        assert_eq!(kinds(&third.ops), ["slots", "service", "clear", "clear"]);
        assert_eq!(third.next.backend_count(), 1);
    }

    /// Planning only the frontends a change touched gives what planning all does.
    #[test]
    fn planning_touched_frontends_matches_planning_all() {
        let start =
            desired(&[(key(1, 80), frontend(&[2, 3])), (key(2, 80), frontend(&[3, 4])), (key(3, 80), frontend(&[5]))]);
        let base = Applied::new(Capacity::default()).plan(&start).next;
        let mut changed = start.clone();
        changed.frontends.insert(key(1, 80), frontend(&[2, 6]));
        changed.frontends.remove(&key(3, 80));
        let all = base.plan(&changed);
        let touched = base.plan_keys(&changed, &BTreeSet::from([key(1, 80), key(3, 80)]));
        assert_eq!(all.ops, touched.ops);
        assert_eq!(kinds(&touched.ops), ["backend", "slots", "service", "delete", "clear"]);
        assert_eq!(touched.next.backend_count(), 4, "3 is still used by 10.96.0.2, 5 is cleared");
    }

    #[test]
    fn a_backend_leaving_an_affinity_service_purges_its_affinity() {
        let first = Applied::new(Capacity::default()).plan(&desired(&[(key(1, 80), with_affinity(frontend(&[2, 3])))]));
        let MapOp::PutService { value, .. } = &first.ops[3] else { panic!() };
        assert_eq!(value.affinity_timeout_secs, 10_800);
        let second = first.next.plan(&desired(&[(key(1, 80), with_affinity(frontend(&[2])))]));
        assert_eq!(kinds(&second.ops), ["slots", "service", "purge", "clear"]);
        assert_eq!(second.ops[2], MapOp::PurgeAffinity { service_id: 1, backend_ids: Some(vec![2]) });
        let third = second.next.plan(&desired(&[]));
        assert_eq!(kinds(&third.ops), ["delete", "purge", "clear"]);
        assert_eq!(third.ops[1], MapOp::PurgeAffinity { service_id: 1, backend_ids: None });
    }

    #[test]
    fn weights_shape_the_table() {
        let mut f = frontend(&[2, 3]);
        f.table_size = 251;
        f.weights[0].share = 0.9;
        f.weights[1].share = 0.1;
        let table = selection_table(&f);
        let heavy = table.iter().filter(|a| **a == addr(2)).count();
        assert!((224..=228).contains(&heavy), "{heavy} of 251 slots for a 90 % backend");
    }

    #[test]
    fn slot_regions_coalesce_when_released() {
        let mut slots = SlotAllocator::new(10);
        let a = slots.alloc(3).unwrap();
        let b = slots.alloc(3).unwrap();
        let c = slots.alloc(4).unwrap();
        assert!(slots.alloc(1).is_none());
        slots.release(a);
        slots.release(c);
        slots.release(b);
        assert_eq!(slots.largest_free(), 10);
        assert_eq!(slots.alloc(10), Some(Region { offset: 0, len: 10 }));
    }
}
