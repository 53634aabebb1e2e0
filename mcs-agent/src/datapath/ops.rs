//! The map-op executor: a plan's operations, in order, with batch writes.

// One module split by concern: the pieces share the root's types and imports.
use super::*;

/// Zeroed per-CPU values for `n` elements of `T`.
pub(super) fn per_cpu_zeros<T>(n: usize) -> Result<Vec<u8>, MapError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| MapError::IoError(e))?;
    Ok(vec![0u8; n * cpus * std::mem::size_of::<T>().next_multiple_of(8)])
}

/// Zeroes one per-CPU counter entry; ids past the map's size have none.
pub(super) fn zero<T: aya::Pod + Default + Clone>(map: &mut PerCpuArray<MapData, T>, id: u32) -> Result<(), MapError> {
    if id >= map.len() {
        return Ok(());
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| MapError::IoError(e))?;
    let values = PerCpuValues::try_from(vec![T::default(); cpus]).map_err(MapError::IoError)?;
    map.set(id, values, 0)
}

/// Forgets ClientIP affinity of these backends (all when `None`) for a
/// frontend, in one family's map.
pub(super) fn purge_affinity<A: mcs_common::MapAddr>(
    map: &mut HashMap<MapData, AffinityKey<A>, AffinityValue>,
    service_id: u32,
    backend_ids: Option<&[u32]>,
) -> Result<(), MapError> {
    // Collect first: deleting while iterating restarts the kernel's walk.
    let stale: Vec<AffinityKey<A>> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| k.service_id == service_id && backend_ids.is_none_or(|ids| ids.contains(&v.backend_id)))
        .map(|(k, _)| k)
        .collect();
    for key in stale {
        match map.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Datapath {
    /// Executes a plan's operations in order.
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<(), DatapathError> {
        // Runs of new backends and of service entries go in batches: at cold
        // start they are nearly every write. Order between runs is kept.
        type Batch = fn(&mut Datapath, &[MapOp]) -> io::Result<()>;
        let mut i = 0;
        while i < ops.len() {
            let (same, batch): (fn(&MapOp) -> bool, Batch) = match &ops[i] {
                MapOp::PutBackend { .. } => (|op| matches!(op, MapOp::PutBackend { .. }), Self::put_backends),
                MapOp::PutService { .. } => (|op| matches!(op, MapOp::PutService { .. }), Self::put_services),
                op => {
                    self.apply_one(op)?;
                    i += 1;
                    continue;
                }
            };
            let n = ops[i..].iter().take_while(|op| same(op)).count();
            let batched = n >= 8
                && batch(self, &ops[i..i + n])
                    .inspect_err(|e| debug!(error = %e, "batched map update failed; writing element by element"))
                    .is_ok();
            if !batched {
                ops[i..i + n].iter().try_for_each(|op| self.apply_one(op))?;
            }
            i += n;
        }
        Ok(())
    }

    /// New backends in batches: counters zeroed, then the addresses.
    /// On an error the caller writes them one by one (which reports it).
    pub(super) fn put_backends(&mut self, ops: &[MapOp]) -> io::Result<()> {
        // Counters exist for the first `--stats-entries` ids only (each
        // path's map: a pinned one keeps its own size).
        let counted = self.maps.backend_stats.len();
        let xdp_counted = self.maps.xdp_backend_stats.len();
        let (mut ids, mut xdp_ids, mut ids4, mut ids6) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut v4, mut v6): (Vec<u8>, Vec<u8>) = (Vec::new(), Vec::new());
        for op in ops {
            let MapOp::PutBackend { id, backend } = op else { continue };
            if *id < counted {
                ids.extend_from_slice(&id.to_ne_bytes());
            }
            if *id < xdp_counted {
                xdp_ids.extend_from_slice(&id.to_ne_bytes());
            }
            match backend {
                FamilyBackend::V4(b) => {
                    ids4.extend_from_slice(&id.to_ne_bytes());
                    v4.extend_from_slice(bytemuck::bytes_of(b));
                }
                FamilyBackend::V6(b) => {
                    ids6.extend_from_slice(&id.to_ne_bytes());
                    v6.extend_from_slice(bytemuck::bytes_of(b));
                }
            }
            self.maps.health.zero(*id);
        }
        let fds = &self.maps.fds;
        for (fd, ids) in [(&fds.backend_stats, &ids), (&fds.xdp_backend_stats, &xdp_ids)] {
            let zeros = per_cpu_zeros::<BackendStats>(ids.len() / 4).map_err(io::Error::other)?;
            crate::batch::update(fd.as_fd(), ids, &zeros, ids.len() / 4)?;
        }
        crate::batch::update(fds.backends.as_fd(), &ids4, &v4, ids4.len() / 4)?;
        crate::batch::update(fds.backends6.as_fd(), &ids6, &v6, ids6.len() / 4)
    }

    /// Service entries in batches (their slots are already written).
    pub(super) fn put_services(&mut self, ops: &[MapOp]) -> io::Result<()> {
        let counted = self.maps.service_stats.len();
        let xdp_counted = self.maps.xdp_service_stats.len();
        let (mut fresh, mut xdp_fresh) = (Vec::new(), Vec::new());
        let (mut k4, mut v4, mut k6, mut v6) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for op in ops {
            let MapOp::PutService { key, value, fresh: is_fresh } = op else { continue };
            if *is_fresh && value.service_id < counted {
                fresh.extend_from_slice(&value.service_id.to_ne_bytes());
            }
            if *is_fresh && value.service_id < xdp_counted {
                xdp_fresh.extend_from_slice(&value.service_id.to_ne_bytes());
            }
            match key {
                FamilyKey::V4(k) => {
                    k4.extend_from_slice(bytemuck::bytes_of(k));
                    v4.extend_from_slice(bytemuck::bytes_of(value));
                }
                FamilyKey::V6(k) => {
                    k6.extend_from_slice(bytemuck::bytes_of(k));
                    v6.extend_from_slice(bytemuck::bytes_of(value));
                }
            }
        }
        let fds = &self.maps.fds;
        let size = std::mem::size_of::<ServiceValue>();
        for (fd, ids) in [(&fds.service_stats, &fresh), (&fds.xdp_service_stats, &xdp_fresh)] {
            let zeros = per_cpu_zeros::<ServiceStats>(ids.len() / 4).map_err(io::Error::other)?;
            crate::batch::update(fd.as_fd(), ids, &zeros, ids.len() / 4)?;
        }
        crate::batch::update(fds.services.as_fd(), &k4, &v4, v4.len() / size)?;
        crate::batch::update(fds.services6.as_fd(), &k6, &v6, v6.len() / size)
    }

    pub(super) fn apply_one(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        let maps = &mut self.maps;
        let map_err = |name| move |source| DatapathError::Map { name, source };
        match op {
            MapOp::PutBackend { id, backend } => {
                // A new id: its counters must not carry an earlier backend's.
                zero(&mut maps.backend_stats, *id).map_err(map_err(MAP_BACKEND_STATS))?;
                zero(&mut maps.xdp_backend_stats, *id).map_err(map_err(MAP_XDP_BACKEND_STATS))?;
                maps.health.zero(*id);
                match backend {
                    FamilyBackend::V4(b) => maps.backends.set(*id, b, 0).map_err(map_err(MAP_BACKENDS))?,
                    FamilyBackend::V6(b) => maps.backends6.set(*id, b, 0).map_err(map_err(MAP_BACKENDS6))?,
                }
            }
            MapOp::PutSlots { offset, ids } => {
                maps.selection.write(*offset, ids).map_err(map_err(MAP_SELECTION))?;
                // Slots must be visible before the SERVICES entry that points at them.
                fence(Ordering::SeqCst);
            }
            MapOp::PutService { key, value, fresh } => {
                if *fresh {
                    zero(&mut maps.service_stats, value.service_id).map_err(map_err(MAP_SERVICE_STATS))?;
                    zero(&mut maps.xdp_service_stats, value.service_id).map_err(map_err(MAP_XDP_SERVICE_STATS))?;
                }
                match key {
                    FamilyKey::V4(k) => maps.services.insert(k, value, 0).map_err(map_err(MAP_SERVICES))?,
                    FamilyKey::V6(k) => maps.services6.insert(k, value, 0).map_err(map_err(MAP_SERVICES6))?,
                }
            }
            MapOp::DeleteService { key } => {
                let (name, result) = match key {
                    FamilyKey::V4(k) => (MAP_SERVICES, maps.services.remove(k)),
                    FamilyKey::V6(k) => (MAP_SERVICES6, maps.services6.remove(k)),
                };
                match result {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(source) => return Err(DatapathError::Map { name, source }),
                }
            }
            MapOp::PurgeAffinity { service_id, backend_ids } => {
                let ids = backend_ids.as_deref();
                purge_affinity(&mut maps.affinity, *service_id, ids).map_err(map_err(MAP_AFFINITY))?;
                purge_affinity(&mut maps.affinity6, *service_id, ids).map_err(map_err(MAP_AFFINITY6))?;
            }
            MapOp::ClearBackend { id, v6: false } => {
                maps.backends.set(*id, Backend::default(), 0).map_err(map_err(MAP_BACKENDS))?;
            }
            MapOp::ClearBackend { id, v6: true } => {
                maps.backends6.set(*id, Backend::default(), 0).map_err(map_err(MAP_BACKENDS6))?;
            }
        }
        Ok(())
    }

    /// Seeds or overwrites one conntrack entry (tests and fixtures pin a
    /// flow without sending a first packet, or age an entry without waiting).
    pub fn insert_conntrack(&mut self, key: CtKey, value: CtValue) -> Result<(), DatapathError> {
        self.maps.ct.insert(key, value, 0).map_err(|source| DatapathError::Map { name: MAP_CT, source })
    }

    /// Removes one conntrack entry (tests evict half a pair on purpose).
    pub fn remove_conntrack(&mut self, key: &CtKey) -> Result<(), DatapathError> {
        self.maps.ct.remove(key).map_err(|source| DatapathError::Map { name: MAP_CT, source })
    }
}
