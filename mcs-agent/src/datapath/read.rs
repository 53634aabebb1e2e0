//! Readers of kernel state: counters, conntrack, the programmed services.

// One module split by concern: the pieces share the root's types and imports.
use super::*;

/// One id's counters in a per-CPU backend counter map, summed over CPUs
/// (`None` past the map's size).
pub(crate) fn sum_backend(map: &PerCpuArray<MapData, BackendStats>, id: u32) -> Option<BackendStats> {
    let values = map.get(&id, 0).ok()?;
    Some(values.iter().fold(BackendStats::default(), |a, v| a.plus(*v)))
}

/// As [`sum_backend`], for a service counter map.
pub(crate) fn sum_service(map: &PerCpuArray<MapData, ServiceStats>, id: u32) -> Option<ServiceStats> {
    let values = map.get(&id, 0).ok()?;
    Some(values.iter().fold(ServiceStats::default(), |a, v| ServiceStats {
        new_flows: a.new_flows + v.new_flows,
        no_backend: a.no_backend + v.no_backend,
    }))
}

impl Datapath {
    /// Counters of backend `id` on the pod paths (TC, socket), summed over
    /// CPUs (`None` past the map's size).
    pub fn backend_stats(&self, id: u32) -> Option<BackendStats> {
        sum_backend(&self.maps.backend_stats, id)
    }

    /// Counters of backend `id` for flows from outside the node (XDP).
    pub fn xdp_backend_stats(&self, id: u32) -> Option<BackendStats> {
        sum_backend(&self.maps.xdp_backend_stats, id)
    }

    /// How many backend ids have passive health counters (ids from 0).
    pub fn health_entries(&self) -> usize {
        self.maps.health.len
    }

    /// Passive health's counters of backend `id` (a memory read, no syscall).
    pub fn health(&self, id: u32) -> Option<Health> {
        self.maps.health.get(id)
    }

    /// Counters of service `id` on the pod paths, summed over CPUs.
    pub fn service_stats(&self, id: u32) -> Option<ServiceStats> {
        sum_service(&self.maps.service_stats, id)
    }

    /// Counters of service `id` for flows from outside the node (XDP).
    pub fn xdp_service_stats(&self, id: u32) -> Option<ServiceStats> {
        sum_service(&self.maps.xdp_service_stats, id)
    }

    /// Descriptors of `CT` and `CT6` of their own, for the collector's thread.
    pub fn conntrack_fds(&self) -> Result<(OwnedFd, OwnedFd), DatapathError> {
        let dup =
            |fd: &OwnedFd, name| fd.try_clone().map_err(|e| DatapathError::Map { name, source: MapError::IoError(e) });
        Ok((dup(&self.maps.fds.ct, MAP_CT)?, dup(&self.maps.fds.ct6, MAP_CT6)?))
    }

    /// `XNAT_CT` and `XNAT_CT6` (flows from outside), for the conntrack collector.
    pub fn xnat_conntrack_fds(&self) -> Result<(OwnedFd, OwnedFd), DatapathError> {
        use aya::maps::IterableMap as _;
        let dup = |data: &MapData, name| {
            data.fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| DatapathError::Map { name, source: MapError::IoError(e) })
        };
        Ok((dup(self.maps.xnat_ct.map(), MAP_XNAT_CT)?, dup(self.maps.xnat_ct6.map(), MAP_XNAT_CT6)?))
    }

    /// Flows in conntrack, both families (their original-direction entries;
    /// walks the maps: tools and tests, not the agent's loop).
    pub fn conntrack_len(&self) -> usize {
        let v4 = self.maps.ct.keys().filter(|k| k.as_ref().is_ok_and(|k| k.dir == CT_DIR_ORIGINAL)).count();
        v4 + self.maps.ct6.keys().filter(|k| k.as_ref().is_ok_and(|k| k.dir == CT_DIR_ORIGINAL)).count()
    }

    /// What the maps hold, for rebuilding the agent's allocations after a restart.
    pub fn kernel_state(&self) -> KernelState {
        let maps = &self.maps;
        let services = (maps.services.iter().filter_map(Result::ok).map(|(k, v)| (frontend_of(&k), v)))
            .chain(maps.services6.iter().filter_map(Result::ok).map(|(k, v)| (frontend_of(&k), v)))
            .collect();
        let ids = 1..self.sizes.capacity.backends;
        let backends = (ids.clone().filter_map(|id| Some((id, maps.backends.get(&id, 0).ok()?))))
            .filter(|(_, b)| *b != Backend::default())
            .map(|(id, b)| (id, backend_addr(&b)))
            .chain(
                ids.filter_map(|id| Some((id, maps.backends6.get(&id, 0).ok()?)))
                    .filter(|(_, b)| *b != Backend::default())
                    .map(|(id, b)| (id, backend_addr(&b))),
            )
            .collect();
        KernelState { services, backends }
    }

    /// Packet counters, summed over CPUs.
    pub fn stats(&self) -> Result<Vec<(Stat, u64)>, DatapathError> {
        Stat::ALL
            .iter()
            .map(|&stat| {
                let values = self
                    .maps
                    .stats
                    .get(&(stat as u32), 0)
                    .map_err(|source| DatapathError::Map { name: MAP_STATS, source })?;
                Ok((stat, values.iter().sum()))
            })
            .collect()
    }

    pub fn stat(&self, stat: Stat) -> u64 {
        self.maps.stats.get(&(stat as u32), 0).map_or(0, |values| values.iter().sum())
    }

    /// IPv4 conntrack entries of one direction (`CT_DIR_*`).
    pub fn conntrack_entries(&self, dir: u8) -> Vec<(CtKey, CtValue)> {
        self.maps.ct.iter().filter_map(Result::ok).filter(|(k, _)| k.dir == dir).collect()
    }

    pub fn affinity_entries(&self) -> Vec<(AffinityKey, AffinityValue)> {
        self.maps.affinity.iter().filter_map(Result::ok).collect()
    }

    /// Every frontend programmed, both families.
    pub fn kernel_services(&self) -> Vec<(FrontendKey, ServiceValue)> {
        let maps = &self.maps;
        let v4 = maps.services.iter().filter_map(Result::ok).filter_map(|(k, v)| Some((frontend_of(&k).ok()?, v)));
        let v6 = maps.services6.iter().filter_map(Result::ok).filter_map(|(k, v)| Some((frontend_of(&k).ok()?, v)));
        v4.chain(v6).collect()
    }

    /// A backend id's address, in whichever family's array holds it.
    pub fn backend_address(&self, id: u32) -> Option<BackendAddr> {
        match self.maps.backends.get(&id, 0).ok().filter(|b| *b != Backend::default()) {
            Some(b) => Some(backend_addr(&b)),
            None => self.maps.backends6.get(&id, 0).ok().filter(|b| *b != Backend::default()).map(|b| backend_addr(&b)),
        }
    }

    pub fn services(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.maps.services.iter().filter_map(Result::ok).collect()
    }

    pub fn selection_slot(&self, slot: u32) -> Option<u32> {
        self.maps.selection.read(slot)
    }

    pub fn backend(&self, id: u32) -> Option<Backend> {
        self.maps.backends.get(&id, 0).ok()
    }
}
