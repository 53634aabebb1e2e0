//! Loading the programs and creating or adopting the maps.

// One module split by concern: the pieces share the root's types and imports.
use super::*;

/// Forwards the kernel programs' records to `tracing` (target `mcs_kernel`).
pub struct KernelLogBridge;

impl log::Log for KernelLogBridge {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "mcs_kernel", "{message}"),
            log::Level::Warn => tracing::warn!(target: "mcs_kernel", "{message}"),
            log::Level::Info => tracing::info!(target: "mcs_kernel", "{message}"),
            log::Level::Debug => tracing::debug!(target: "mcs_kernel", "{message}"),
            log::Level::Trace => tracing::trace!(target: "mcs_kernel", "{message}"),
        }
    }

    fn flush(&self) {}
}

pub type KernelLogger = aya_log::EbpfLogger<KernelLogBridge>;

pub(super) fn map_fd(ebpf: &Ebpf, name: &'static str) -> Result<OwnedFd, DatapathError> {
    let data = match ebpf.map(name).ok_or(DatapathError::MissingMap(name))? {
        Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) | Map::PerCpuArray(d) => d,
        _ => return Err(DatapathError::MissingMap(name)),
    };
    data.fd().as_fd().try_clone_to_owned().map_err(|e| DatapathError::Map { name, source: MapError::IoError(e) })
}

pub(super) fn map_health(ebpf: &mut Ebpf, len: u32) -> Result<HealthMemory, DatapathError> {
    let name = MAP_HEALTH;
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    let Map::Array(data) = &map else {
        return Err(DatapathError::Map { name, source: MapError::InvalidMapType { map_type: 0 } });
    };
    let io_err = |e| DatapathError::Map { name, source: MapError::IoError(e) };
    let fd = data.fd().as_fd().try_clone_to_owned().map_err(io_err)?;
    HealthMemory::map(fd, len).map_err(io_err)
}

/// What each map must look like to be adopted: type, key and value size, flags.
pub(super) fn expected(name: &str) -> (MapType, usize, usize, u32) {
    use std::mem::size_of;
    match name {
        MAP_SERVICES => (MapType::Hash, size_of::<ServiceKey>(), size_of::<ServiceValue>(), 0),
        MAP_BACKENDS => (MapType::Array, 4, size_of::<Backend>(), 0),
        MAP_SERVICES6 => (MapType::Hash, size_of::<ServiceKey<Ip6>>(), size_of::<ServiceValue>(), 0),
        MAP_BACKENDS6 => (MapType::Array, 4, size_of::<Backend<Ip6>>(), 0),
        MAP_CT6 => (MapType::LruHash, size_of::<CtKey<Ip6>>(), size_of::<CtValue<Ip6>>(), 0),
        MAP_AFFINITY6 => (MapType::LruHash, size_of::<AffinityKey<Ip6>>(), size_of::<AffinityValue>(), 0),
        MAP_FRAGS => (MapType::LruHash, size_of::<FragKey>(), size_of::<FragValue>(), 0),
        MAP_FRAGS6 => (MapType::LruHash, size_of::<FragKey<Ip6>>(), size_of::<FragValue<Ip6>>(), 0),
        MAP_SELECTION => (MapType::Array, 4, size_of::<SelectionPair>(), aya_obj_mmapable()),
        MAP_CT => (MapType::LruHash, size_of::<CtKey>(), size_of::<CtValue>(), 0),
        // Layout 3's, read only to carry their flows over.
        v3::MAP_CONNTRACK => (MapType::LruHash, size_of::<v3::CtKey<Ip4>>(), size_of::<v3::CtValue<Ip4>>(), 0),
        v3::MAP_REV_NAT => (MapType::LruHash, size_of::<v3::RevNatKey<Ip4>>(), size_of::<v3::RevNatValue<Ip4>>(), 0),
        v3::MAP_CONNTRACK6 => (MapType::LruHash, size_of::<v3::CtKey<Ip6>>(), size_of::<v3::CtValue<Ip6>>(), 0),
        v3::MAP_REV_NAT6 => (MapType::LruHash, size_of::<v3::RevNatKey<Ip6>>(), size_of::<v3::RevNatValue<Ip6>>(), 0),
        MAP_AFFINITY => (MapType::LruHash, size_of::<AffinityKey>(), size_of::<AffinityValue>(), 0),
        MAP_CONFIG => (MapType::Array, 4, 4, 0),
        MAP_BACKEND_STATS => (MapType::PerCpuArray, 4, size_of::<BackendStats>(), 0),
        MAP_SERVICE_STATS => (MapType::PerCpuArray, 4, size_of::<ServiceStats>(), 0),
        MAP_XDP_BACKEND_STATS => (MapType::PerCpuArray, 4, size_of::<BackendStats>(), 0),
        MAP_XDP_SERVICE_STATS => (MapType::PerCpuArray, 4, size_of::<ServiceStats>(), 0),
        MAP_HEALTH => (MapType::Array, 4, size_of::<Health>(), aya_obj_mmapable()),
        MAP_SOCK_REV => (MapType::LruHash, size_of::<SockRevKey>(), size_of::<SockRevValue>(), 0),
        MAP_SOCK_REV6 => (MapType::LruHash, size_of::<SockRevKey<Ip6>>(), size_of::<SockRevValue<Ip6>>(), 0),
        MAP_SOCK_EXCLUDE => (MapType::Hash, 8, 4, 0),
        MAP_HOST_NETNS => (MapType::Array, 4, 8, 0),
        MAP_XNAT_CT => (MapType::LruHash, size_of::<CtKey>(), size_of::<NatValue>(), 0),
        MAP_XNAT_CT6 => (MapType::LruHash, size_of::<CtKey<Ip6>>(), size_of::<NatValue<Ip6>>(), 0),
        MAP_XNAT => (MapType::Array, 4, size_of::<XnatConfig>(), 0),
        MAP_XNAT_SRC => (MapType::LpmTrie, 8, 1, 0),
        MAP_XNAT_SRC6 => (MapType::LpmTrie, 20, 1, 0),
        MAP_XNAT_UPLINKS => (MapType::Hash, 4, 4, 0),
        MAP_XNAT_IP_ID => (MapType::Array, 4, 8, 0),
        _ => (MapType::PerCpuArray, 4, 8, 0),
    }
}

pub(super) const fn aya_obj_mmapable() -> u32 {
    1 << 10 // BPF_F_MMAPABLE
}

/// Checks a pinned map against what this agent expects. `Ok(Some(n))` adopts
/// it with its pinned size `n`; `Ok(None)` means it is not there.
pub(super) fn check_pinned(name: &'static str, path: &Path) -> Result<Option<u32>, DatapathError> {
    if !path.exists() {
        return Ok(None);
    }
    let incompatible = |message: String| DatapathError::Incompatible { name, path: path.to_owned(), message };
    let info = MapInfo::from_pin(path).map_err(|e| incompatible(format!("cannot open it: {e}")))?;
    let (kind, key, value, flags) = expected(name);
    let found = info.map_type().map_err(|e| incompatible(e.to_string()))?;
    if found != kind || info.key_size() as usize != key || info.value_size() as usize != value {
        return Err(incompatible(format!(
            "{found:?} with {}-byte keys and {}-byte values, expected {kind:?} with {key} and {value}",
            info.key_size(),
            info.value_size()
        )));
    }
    if info.map_flags() & flags != flags {
        return Err(incompatible(format!("flags {:#x}, expected {flags:#x}", info.map_flags())));
    }
    Ok(Some(info.max_entries()))
}

pub(super) fn map_selection(ebpf: &mut Ebpf, slots: u32) -> Result<SlotMemory, DatapathError> {
    let name = MAP_SELECTION;
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    let Map::Array(data) = &map else {
        return Err(DatapathError::Map { name, source: MapError::InvalidMapType { map_type: 0 } });
    };
    let io_err = |e| DatapathError::Map { name, source: MapError::IoError(e) };
    let fd = data.fd().as_fd().try_clone_to_owned().map_err(io_err)?;
    SlotMemory::map(fd, slots.div_ceil(2) * 2).map_err(io_err)
}

pub(super) fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

/// `mcs_uplink` and `mcs_xdp` into the kernel.
fn load_external_programs(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    program(ebpf, PROG_UPLINK)?.load().map_err(|source| DatapathError::Program { name: PROG_UPLINK, source })?;
    let xdp: &mut aya::programs::Xdp = ebpf
        .program_mut(PROG_XDP)
        .ok_or(DatapathError::MissingProgram(PROG_XDP))?
        .try_into()
        .map_err(|source| DatapathError::Program { name: PROG_XDP, source })?;
    xdp.load().map_err(|source| DatapathError::Program { name: PROG_XDP, source })
}

pub(super) fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, DatapathError> {
    let program = ebpf.program_mut(name).ok_or(DatapathError::Program { name, source: ProgramError::NotLoaded })?;
    program.try_into().map_err(|source| DatapathError::Program { name, source })
}

impl Datapath {
    /// Loads the programs and creates unpinned maps, removed on drop
    /// (fixtures, benchmarks).
    pub fn load(sizes: Sizes, bpffs: Option<&Path>) -> Result<Self, DatapathError> {
        let mut dp = Self::open(sizes, bpffs.map(|root| (root, LAYOUT_VERSION)), KernelLog::Off)?;
        dp.cleanup_on_exit = true;
        Ok(dp)
    }

    /// Loads the programs. With `pins` (bpffs root, layout version), maps
    /// pinned there by an earlier agent are adopted as they are (their
    /// contents, and their sizes where they differ from `sizes`) and missing
    /// ones are created and pinned. Nothing is attached yet.
    pub fn open(sizes: Sizes, pins: Option<(&Path, u32)>, kernel_log: KernelLog) -> Result<Self, DatapathError> {
        let layout = match pins {
            Some((root, version)) => {
                ensure_bpffs(root)?;
                Some(LayoutDir::new(root, version))
            }
            None => None,
        };
        Self::open_at(sizes, layout, kernel_log)
    }

    /// [`Datapath::open`], pinned in `layout`'s directory (a layout's own,
    /// or its growth directory) on a bpffs already there.
    pub(super) fn open_at(
        sizes: Sizes,
        layout: Option<LayoutDir>,
        kernel_log: KernelLog,
    ) -> Result<Self, DatapathError> {
        let Sizes { capacity, conntrack, stats_entries, xnat_conntrack, external } = sizes;
        let mut wanted = [
            (MAP_SERVICES, capacity.services),
            (MAP_BACKENDS, capacity.backends),
            (MAP_SELECTION, capacity.slots.div_ceil(2)),
            // Two entries per flow.
            (MAP_CT, conntrack.saturating_mul(2)),
            (MAP_AFFINITY, conntrack),
            (MAP_STATS, Stat::COUNT),
            (MAP_CONFIG, 1),
            (MAP_BACKEND_STATS, capacity.backends.min(stats_entries)),
            (MAP_SERVICE_STATS, capacity.services.saturating_add(1).min(stats_entries)),
            // After those two: sized as they are, adopted or created (below).
            (MAP_XDP_BACKEND_STATS, capacity.backends.min(stats_entries)),
            (MAP_XDP_SERVICE_STATS, capacity.services.saturating_add(1).min(stats_entries)),
            (MAP_SERVICES6, capacity.services),
            (MAP_BACKENDS6, capacity.backends),
            (MAP_CT6, conntrack.saturating_mul(2)),
            (MAP_AFFINITY6, conntrack),
            (MAP_FRAGS, mcs_common::DEFAULT_MAX_FRAGS),
            (MAP_FRAGS6, mcs_common::DEFAULT_MAX_FRAGS),
            (MAP_SOCK_REV, conntrack),
            (MAP_SOCK_REV6, conntrack),
            (MAP_SOCK_EXCLUDE, 256),
            (MAP_HOST_NETNS, 1),
            (MAP_XNAT_CT, xnat_conntrack.saturating_mul(2)),
            (MAP_XNAT_CT6, xnat_conntrack.saturating_mul(2)),
            (MAP_XNAT, 1),
            (MAP_XNAT_SRC, 1024),
            (MAP_XNAT_SRC6, 1024),
            (MAP_XNAT_UPLINKS, mcs_common::XNAT_UPLINKS_MAX),
            (MAP_XNAT_IP_ID, 1),
            // Last: its size is read back below. Every backend id, whatever
            // --stats-entries: passive health must watch every backend, and
            // the map is not per-CPU (32 bytes an id, 8 MiB at the default
            // 262,144 backends).
            (MAP_HEALTH, capacity.backends),
        ];
        let layout = match layout {
            Some(layout) => {
                for dir in ["ingress", "egress"] {
                    fs::create_dir_all(layout.links().join(dir)).map_err(|e| DatapathError::Bpffs {
                        path: layout.dir.clone(),
                        message: format!("cannot create the pin directory: {e}"),
                    })?;
                }
                Some(layout)
            }
            None => None,
        };
        let mut adopted = false;
        let mut loader = EbpfLoader::new();
        let mut backends_size = capacity.backends;
        // The pod paths' counters' sizes: the XDP path's cover the same ids,
        // on a node that serves outside clients (elsewhere one entry each:
        // per-CPU arrays cost every CPU their size).
        let (mut backend_stats_size, mut service_stats_size) = (0, 0);
        for (name, size) in &mut wanted {
            match *name {
                // As many ids as the backends map adopted or created has.
                MAP_HEALTH => *size = backends_size,
                MAP_XDP_BACKEND_STATS => *size = if external { backend_stats_size } else { 1 },
                MAP_XDP_SERVICE_STATS => *size = if external { service_stats_size } else { 1 },
                _ => {}
            }
            if let Some(layout) = &layout {
                // Flows from outside live beside the layouts, in one map every
                // datapath shares (see `external_map`): XDP has no older
                // program behind ours to hand a flow it does not know to.
                let path = if matches!(*name, MAP_XNAT_CT | MAP_XNAT_CT6) {
                    external_map(layout, name)?
                } else {
                    layout.map(name)
                };
                match check_pinned(name, &path) {
                    Ok(Some(pinned)) if *name == MAP_STATS && pinned != Stat::COUNT => {
                        // Counters only: start them afresh rather than refuse to start.
                        warn!(path = %path.display(), "pinned counters have another size; starting them from zero");
                        let _ = fs::remove_file(&path);
                    }
                    Ok(Some(pinned))
                        if matches!(*name, MAP_XNAT_CT | MAP_XNAT_CT6)
                            && pinned == 2 * XNAT_TOKEN_SIZE
                            && pinned != *size =>
                    {
                        // The token size of a node that served nobody from
                        // outside: nothing to keep.
                        let _ = fs::remove_file(&path);
                    }
                    Ok(Some(pinned))
                        if matches!(*name, MAP_XDP_BACKEND_STATS | MAP_XDP_SERVICE_STATS) && pinned != *size =>
                    {
                        // Counters only, sized for another --external-interface
                        // choice: started afresh.
                        let _ = fs::remove_file(&path);
                    }
                    Ok(Some(pinned)) if *name == MAP_HEALTH && pinned != *size => {
                        // Evidence only (an agent before this one sized it to
                        // --stats-entries): a fresh map that covers every
                        // backend id is worth a few lost samples. Programs
                        // still attached keep the old map until replaced.
                        warn!(
                            pinned,
                            backends = *size,
                            "the pinned passive health map does not cover every backend id; starting it afresh"
                        );
                        let _ = fs::remove_file(&path);
                    }
                    Ok(Some(pinned)) => {
                        if pinned != *size {
                            // A grown map stays grown; a map smaller than
                            // the state needs grows while serving.
                            info!(
                                map = *name,
                                pinned,
                                requested = *size,
                                "adopting the pinned map with its own size (the maps grow as imports need, up to --max-*)"
                            );
                            *size = pinned;
                        }
                        adopted |= *name == MAP_SERVICES;
                    }
                    Ok(None) => {}
                    Err(e) => return Err(e),
                }
                loader.map_pin_path(name, path);
            }
            match *name {
                MAP_BACKENDS => backends_size = *size,
                MAP_BACKEND_STATS => backend_stats_size = *size,
                MAP_SERVICE_STATS => service_stats_size = *size,
                _ => {}
            }
            loader.map_max_entries(name, *size);
        }
        let level = kernel_log as u8;
        loader.override_global(aya_log::LEVEL, &level, false);
        let started = std::time::Instant::now();
        let mut ebpf = loader.load(OBJECT)?;
        let maps_done = started.elapsed();
        // Before the programs load: they refer to the log ring buffer, which
        // the logger takes out of `ebpf` and must keep open.
        let logger = match kernel_log {
            KernelLog::Off => None,
            _ => Some(aya_log::EbpfLogger::init_with_logger(&mut ebpf, KernelLogBridge).map_err(|e| {
                DatapathError::Map { name: "AYA_LOGS", source: MapError::IoError(io::Error::other(e)) }
            })?),
        };
        for name in [PROG_INGRESS, PROG_EGRESS] {
            program(&mut ebpf, name)?.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        // Only `--external-interface` needs them: a kernel that refuses them
        // still serves pods (attaching an external interface then fails, saying why).
        let xdp_load = load_external_programs(&mut ebpf).err();
        // Now, while every map descriptor the programs refer to is open (the
        // selection map leaves `ebpf` once it is mapped). A kernel without them
        // still gets the TC path.
        let tc_done = started.elapsed();
        let sock_load = sock::load_programs(&mut ebpf).err();
        // Where a cold start goes before the first pass: creating (and
        // preallocating) the maps, and the verifier (the TC programs, then
        // the socket programs).
        tracing::info!(
            maps_us = maps_done.as_micros() as u64,
            programs_us = (started.elapsed() - maps_done).as_micros() as u64,
            tc_us = (tc_done - maps_done).as_micros() as u64,
            "datapath loaded"
        );
        let [services, backends, slot_pairs, ct_entries, .., health_entries] = wanted.map(|(_, size)| size);
        let xnat_conntrack = wanted.iter().find(|(n, _)| *n == MAP_XNAT_CT).map_or(xnat_conntrack, |(_, s)| s / 2);
        let conntrack = ct_entries / 2;
        let capacity = Capacity { services, backends, slots: slot_pairs * 2 };
        let fds = BatchFds {
            services: map_fd(&ebpf, MAP_SERVICES)?,
            services6: map_fd(&ebpf, MAP_SERVICES6)?,
            backends: map_fd(&ebpf, MAP_BACKENDS)?,
            backends6: map_fd(&ebpf, MAP_BACKENDS6)?,
            backend_stats: map_fd(&ebpf, MAP_BACKEND_STATS)?,
            service_stats: map_fd(&ebpf, MAP_SERVICE_STATS)?,
            xdp_backend_stats: map_fd(&ebpf, MAP_XDP_BACKEND_STATS)?,
            xdp_service_stats: map_fd(&ebpf, MAP_XDP_SERVICE_STATS)?,
            ct: map_fd(&ebpf, MAP_CT)?,
            ct6: map_fd(&ebpf, MAP_CT6)?,
        };
        let maps = Maps {
            fds,
            services: take(&mut ebpf, MAP_SERVICES)?,
            backends: take(&mut ebpf, MAP_BACKENDS)?,
            services6: take(&mut ebpf, MAP_SERVICES6)?,
            backends6: take(&mut ebpf, MAP_BACKENDS6)?,
            affinity6: take(&mut ebpf, MAP_AFFINITY6)?,
            selection: map_selection(&mut ebpf, capacity.slots)?,
            ct: take(&mut ebpf, MAP_CT)?,
            ct6: take(&mut ebpf, MAP_CT6)?,
            affinity: take(&mut ebpf, MAP_AFFINITY)?,
            stats: take(&mut ebpf, MAP_STATS)?,
            config: take(&mut ebpf, MAP_CONFIG)?,
            backend_stats: take(&mut ebpf, MAP_BACKEND_STATS)?,
            service_stats: take(&mut ebpf, MAP_SERVICE_STATS)?,
            xdp_backend_stats: take(&mut ebpf, MAP_XDP_BACKEND_STATS)?,
            xdp_service_stats: take(&mut ebpf, MAP_XDP_SERVICE_STATS)?,
            health: map_health(&mut ebpf, health_entries)?,
            sock_exclude: take(&mut ebpf, MAP_SOCK_EXCLUDE)?,
            sock_rev_fds: [map_fd(&ebpf, MAP_SOCK_REV)?, map_fd(&ebpf, MAP_SOCK_REV6)?],
            sock_rev: take(&mut ebpf, MAP_SOCK_REV)?,
            sock_rev6: take(&mut ebpf, MAP_SOCK_REV6)?,
            host_netns: take(&mut ebpf, MAP_HOST_NETNS)?,
            xnat_ct: take(&mut ebpf, MAP_XNAT_CT)?,
            xnat_ct6: take(&mut ebpf, MAP_XNAT_CT6)?,
        };
        let cleanup_on_exit = layout.is_none();
        let config_flags = maps.config.get(&0, 0).unwrap_or(0);
        Ok(Self {
            ebpf,
            maps,
            sizes: Sizes { capacity, conntrack, stats_entries, xnat_conntrack, external },
            layout,
            older: Vec::new(),
            protected: Vec::new(),
            logger,
            adopted,
            attached: BTreeMap::new(),
            external: BTreeMap::new(),
            sockets: None,
            sock_load,
            xdp_load,
            config_flags,
            cleanup_on_exit,
            finished: false,
        })
    }
}
