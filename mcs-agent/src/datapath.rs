//! The shell around the kernel: load and pin the object, attach the TC
//! programs to interfaces, execute plans against the maps.

use std::{
    fs, io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    ptr::NonNull,
    sync::atomic::{Ordering, fence},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::LinkType,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcError},
    },
    util::KernelVersion,
};
use mcs_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, LAYOUT_VERSION, MAP_AFFINITY, MAP_BACKENDS, MAP_CONNTRACK,
    MAP_REV_NAT, MAP_SELECTION, MAP_SERVICES, MAP_STATS, PIN_ROOT, PROG_EGRESS, PROG_INGRESS, RevNatKey, RevNatValue,
    ServiceKey, ServiceValue, Stat,
};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::plan::{Capacity, MapOp};

/// The eBPF object, built by this crate's build script from `mcs-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mcs-ebpf"));

/// How programs are hooked to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// TCX links when the kernel has them (6.6+), netlink clsact otherwise.
    Auto,
    /// TCX links (kernel 6.6+): owned by the agent's process, gone when it exits.
    Tcx,
    /// A clsact qdisc with direct-action filters: works on older kernels, but
    /// filters outlive a crashed agent (the next start removes them).
    Netlink,
}

impl AttachMode {
    fn resolve(self) -> AttachMode {
        match self {
            AttachMode::Auto => {
                let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
                if tcx { AttachMode::Tcx } else { AttachMode::Netlink }
            }
            other => other,
        }
    }
}

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error("loading the eBPF object into the kernel: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("map {0} is missing from the eBPF object (was it built from this source tree?)")]
    MissingMap(&'static str),
    #[error("interface {iface}: {message}")]
    Interface { iface: String, message: String },
    #[error("bpffs at {}: {message}", path.display())]
    Bpffs { path: PathBuf, message: String },
    #[error("pinning map {name} at {}: {source}", path.display())]
    Pin { name: &'static str, path: PathBuf, source: aya::pin::PinError },
}

/// Map sizes, chosen at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub capacity: Capacity,
    pub conntrack: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self { capacity: Capacity::default(), conntrack: mcs_common::DEFAULT_MAX_CONNTRACK }
    }
}

/// `SELECTION`, mapped into the agent's memory (the map is `BPF_F_MMAPABLE`):
/// writing a table is one copy instead of a syscall per slot.
struct SlotMemory {
    base: NonNull<u32>,
    slots: usize,
    bytes: usize,
}

impl SlotMemory {
    fn map(fd: &OwnedFd, slots: u32) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = (slots as usize * 4).div_ceil(page) * page;
        // SAFETY: a shared mapping of a map fd we own, of the size the kernel allows for it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u32>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { base, slots: slots as usize, bytes })
    }

    fn write(&mut self, offset: u32, ids: &[u32]) -> Result<(), MapError> {
        let start = offset as usize;
        let end = start.checked_add(ids.len()).filter(|end| *end <= self.slots).ok_or(MapError::OutOfBounds {
            index: offset.saturating_add(ids.len() as u32),
            max_entries: self.slots as u32,
        })?;
        // SAFETY: in bounds of the mapping, which lives as long as self; the
        // kernel only reads these slots once a SERVICES entry points at them.
        let slots = unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(start), end - start) };
        slots.copy_from_slice(ids);
        Ok(())
    }

    fn read(&self, index: u32) -> Option<u32> {
        // SAFETY: bounds checked; aligned u32 reads of a live mapping.
        ((index as usize) < self.slots).then(|| unsafe { self.base.as_ptr().add(index as usize).read_volatile() })
    }
}

impl Drop for SlotMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, Backend>,
    selection: SlotMemory,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    rev_nat: HashMap<MapData, RevNatKey, RevNatValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    stats: PerCpuArray<MapData, u64>,
}

pub struct Datapath {
    ebpf: Ebpf,
    maps: Maps,
    pin_dir: Option<PathBuf>,
    attached: Vec<Attachment>,
    unloaded: bool,
}

/// Our two links on one interface.
struct Attachment {
    iface: String,
    links: Vec<(&'static str, SchedClassifierLinkId)>,
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure `root` is a bpffs, mounting one if nothing is mounted there
/// (as inside `ip netns exec`, which remounts /sys without it).
pub fn ensure_bpffs(root: &Path) -> Result<(), DatapathError> {
    let err = |message: String| DatapathError::Bpffs { path: root.to_owned(), message };
    if let Ok(stat) = nix::sys::statfs::statfs(root)
        && stat.filesystem_type().0 == BPF_FS_MAGIC
    {
        return Ok(());
    }
    fs::create_dir_all(root).map_err(|e| err(format!("cannot create the mount point: {e}")))?;
    nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| err(format!("not a bpffs and mounting one failed: {e}")))?;
    info!(path = %root.display(), "mounted bpffs");
    Ok(())
}

/// `<bpffs>/mcs/v<LAYOUT_VERSION>`: where this layout's maps are pinned.
pub fn pin_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(PIN_ROOT).join(format!("v{LAYOUT_VERSION}"))
}

fn map_selection(ebpf: &mut Ebpf, pin: Option<&Path>, slots: u32) -> Result<SlotMemory, DatapathError> {
    let name = MAP_SELECTION;
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    if let Some(dir) = pin {
        let path = dir.join(name);
        map.pin(&path).map_err(|source| DatapathError::Pin { name, path, source })?;
    }
    let Map::Array(data) = &map else {
        return Err(DatapathError::Map { name, source: MapError::InvalidMapType { map_type: 0 } });
    };
    let io_err = |e| DatapathError::Map { name, source: MapError::IoError(e) };
    // The mapping holds its own reference to the map; the fd can close after.
    let fd = data.fd().as_fd().try_clone_to_owned().map_err(io_err)?;
    SlotMemory::map(&fd, slots.div_ceil(2) * 2).map_err(io_err)
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str, pin: Option<&Path>) -> Result<T, DatapathError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    if let Some(dir) = pin {
        let path = dir.join(name);
        map.pin(&path).map_err(|source| DatapathError::Pin { name, path, source })?;
    }
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

impl Datapath {
    /// Loads the programs and creates the maps. With `bpffs`, the maps are
    /// pinned under [`pin_dir`]; pins left by an earlier run are replaced.
    pub fn load(sizes: Sizes, bpffs: Option<&Path>) -> Result<Self, DatapathError> {
        let Sizes { capacity, conntrack } = sizes;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_SERVICES, capacity.services)
            .map_max_entries(MAP_BACKENDS, capacity.backends)
            .map_max_entries(MAP_SELECTION, capacity.slots.div_ceil(2))
            .map_max_entries(MAP_CONNTRACK, conntrack)
            .map_max_entries(MAP_REV_NAT, conntrack)
            .map_max_entries(MAP_AFFINITY, conntrack);
        let mut ebpf = loader.load(OBJECT)?;
        for name in [PROG_INGRESS, PROG_EGRESS] {
            program(&mut ebpf, name)?.load().map_err(|source| DatapathError::Program { name, source })?;
        }

        let pin_dir = match bpffs {
            Some(root) => {
                ensure_bpffs(root)?;
                let dir = pin_dir(root);
                if dir.exists() {
                    // Until the agent adopts pinned state across restarts, old pins
                    // only hold stale maps alive.
                    warn!(path = %dir.display(), "removing pinned maps left by an earlier run");
                    fs::remove_dir_all(&dir).map_err(|e| DatapathError::Bpffs {
                        path: dir.clone(),
                        message: format!("cannot remove stale pins: {e}"),
                    })?;
                }
                fs::create_dir_all(&dir).map_err(|e| DatapathError::Bpffs {
                    path: dir.clone(),
                    message: format!("cannot create the pin directory: {e}"),
                })?;
                Some(dir)
            }
            None => None,
        };
        let pin = pin_dir.as_deref();
        let maps = Maps {
            services: take(&mut ebpf, MAP_SERVICES, pin)?,
            backends: take(&mut ebpf, MAP_BACKENDS, pin)?,
            selection: map_selection(&mut ebpf, pin, capacity.slots)?,
            conntrack: take(&mut ebpf, MAP_CONNTRACK, pin)?,
            rev_nat: take(&mut ebpf, MAP_REV_NAT, pin)?,
            affinity: take(&mut ebpf, MAP_AFFINITY, pin)?,
            stats: take(&mut ebpf, MAP_STATS, pin)?,
        };
        Ok(Self { ebpf, maps, pin_dir, attached: Vec::new(), unloaded: false })
    }

    pub fn program_mut(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, name)
    }

    /// Hooks ingress (DNAT) and egress (reverse NAT) to `iface`, first in line.
    /// Our own programs found there from an earlier, crashed run are removed
    /// first: they would keep translating with stale maps.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachMode, DatapathError> {
        let iface_err = |message: String| DatapathError::Interface { iface: iface.to_owned(), message };
        if nix::net::if_::if_nametoindex(iface).is_err() {
            return Err(iface_err("no such interface in this network namespace".into()));
        }
        remove_stale(iface);
        let mode = mode.resolve();
        if mode == AttachMode::Netlink {
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => {}
                Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(iface_err(format!("adding the clsact qdisc: {e}"))),
            }
        }
        let mut links = Vec::new();
        for (name, attach_type) in [(PROG_INGRESS, TcAttachType::Ingress), (PROG_EGRESS, TcAttachType::Egress)] {
            let options = match mode {
                AttachMode::Netlink => TcAttachOptions::Netlink(NlOptions::default()),
                _ => TcAttachOptions::TcxOrder(LinkOrder::first()),
            };
            match program(&mut self.ebpf, name)?.attach_with_options(iface, attach_type, options) {
                Ok(id) => links.push((name, id)),
                Err(e) => {
                    // Never leave an interface half-attached (DNAT without reverse NAT).
                    self.detach_links(links);
                    return Err(iface_err(format!("attaching {name} ({mode:?}): {e}")));
                }
            }
        }
        info!(iface, ?mode, "attached");
        self.attached.push(Attachment { iface: iface.to_owned(), links });
        Ok(mode)
    }

    /// Detaches from `iface` (or forgets it, when the interface is already gone).
    pub fn forget(&mut self, iface: &str) -> bool {
        let Some(pos) = self.attached.iter().position(|a| a.iface == iface) else {
            return false;
        };
        let attachment = self.attached.remove(pos);
        self.detach_links(attachment.links);
        true
    }

    fn detach_links(&mut self, links: Vec<(&'static str, SchedClassifierLinkId)>) {
        for (name, id) in links {
            if let Ok(prog) = program(&mut self.ebpf, name)
                && let Err(e) = prog.detach(id)
            {
                // The kernel already dropped the link of a deleted interface.
                debug!(program = name, error = %e, "detach");
            }
        }
    }

    pub fn is_attached(&self, iface: &str) -> bool {
        self.attached.iter().any(|a| a.iface == iface)
    }

    /// Executes a plan's operations in order.
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<(), DatapathError> {
        let maps = &mut self.maps;
        let map_err = |name| move |source| DatapathError::Map { name, source };
        for op in ops {
            match op {
                MapOp::PutBackend { id, backend } => {
                    maps.backends.set(*id, backend, 0).map_err(map_err(MAP_BACKENDS))?;
                }
                MapOp::PutSlots { offset, ids } => {
                    maps.selection.write(*offset, ids).map_err(map_err(MAP_SELECTION))?;
                    // Slots must be visible before the SERVICES entry that points at them.
                    fence(Ordering::SeqCst);
                }
                MapOp::PutService { key, value } => {
                    maps.services.insert(key, value, 0).map_err(map_err(MAP_SERVICES))?;
                }
                MapOp::DeleteService { key } => match maps.services.remove(key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(source) => {
                        return Err(DatapathError::Map { name: MAP_SERVICES, source });
                    }
                },
                MapOp::PurgeAffinity { service_id, backend_ids } => {
                    // Collect first: deleting while iterating restarts the kernel's walk.
                    let stale: Vec<AffinityKey> = maps
                        .affinity
                        .iter()
                        .filter_map(Result::ok)
                        .filter(|(k, v)| {
                            k.service_id == *service_id
                                && backend_ids.as_ref().is_none_or(|ids| ids.contains(&v.backend_id))
                        })
                        .map(|(k, _)| k)
                        .collect();
                    for key in stale {
                        match maps.affinity.remove(&key) {
                            Ok(()) | Err(MapError::KeyNotFound) => {}
                            Err(source) => return Err(DatapathError::Map { name: MAP_AFFINITY, source }),
                        }
                    }
                }
                MapOp::ClearBackend { id } => {
                    maps.backends.set(*id, Backend::default(), 0).map_err(map_err(MAP_BACKENDS))?;
                }
            }
        }
        Ok(())
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

    pub fn conntrack_entries(&self) -> Vec<(CtKey, CtValue)> {
        self.maps.conntrack.iter().filter_map(Result::ok).collect()
    }

    pub fn rev_nat_entries(&self) -> Vec<(RevNatKey, RevNatValue)> {
        self.maps.rev_nat.iter().filter_map(Result::ok).collect()
    }

    pub fn affinity_entries(&self) -> Vec<(AffinityKey, AffinityValue)> {
        self.maps.affinity.iter().filter_map(Result::ok).collect()
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

    /// Seeds conntrack (tests and fixtures pin a flow without sending a first packet).
    pub fn insert_conntrack(&mut self, key: CtKey, value: CtValue) -> Result<(), DatapathError> {
        self.maps.conntrack.insert(key, value, 0).map_err(|source| DatapathError::Map { name: MAP_CONNTRACK, source })
    }

    /// Detaches from every interface and removes the pins. Dropping does the
    /// same; this is the variant that reports what happened.
    pub fn shutdown(self) {
        drop(self);
    }

    fn cleanup(&mut self) {
        if self.unloaded {
            return;
        }
        self.unloaded = true;
        for name in [PROG_INGRESS, PROG_EGRESS] {
            if let Ok(prog) = program(&mut self.ebpf, name) {
                // Unloading a program detaches every link aya holds for it.
                if let Err(e) = prog.unload() {
                    warn!(program = name, error = %e, "detaching failed");
                }
            }
        }
        for attachment in self.attached.drain(..) {
            debug!(iface = attachment.iface, "detached");
        }
        if let Some(dir) = self.pin_dir.take() {
            match fs::remove_dir_all(&dir) {
                Ok(()) => debug!(path = %dir.display(), "removed pins"),
                Err(e) => warn!(path = %dir.display(), error = %e, "removing pins failed"),
            }
            // Leave the shared parent only if another layout version still uses it.
            if let Some(parent) = dir.parent() {
                let _ = fs::remove_dir(parent);
            }
        }
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, DatapathError> {
    let program = ebpf.program_mut(name).ok_or(DatapathError::Program { name, source: ProgramError::NotLoaded })?;
    program.try_into().map_err(|source| DatapathError::Program { name, source })
}

/// Finds our programs on `iface` that this process did not attach and removes
/// them, saying so: a crashed agent's netlink filters (and any TCX link kept
/// alive by a pin) would otherwise keep translating with maps nobody updates.
pub fn remove_stale(iface: &str) -> Vec<String> {
    let mut removed = Vec::new();
    for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
        for name in [PROG_INGRESS, PROG_EGRESS] {
            match tc::qdisc_detach_program(iface, attach_type, name) {
                Ok(()) => {
                    warn!(
                        iface,
                        program = name,
                        ?attach_type,
                        "removed a stale netlink filter left by an earlier agent"
                    );
                    removed.push(format!("netlink {name} {attach_type:?}"));
                }
                Err(e) => debug!(iface, program = name, error = %e, "no stale netlink filter"),
            }
        }
        let Ok((_, programs)) = SchedClassifier::query_tcx(iface, attach_type) else {
            continue;
        };
        let stale: Vec<u32> = programs
            .iter()
            .filter(|p| matches!(p.name_as_str(), Some(PROG_INGRESS | PROG_EGRESS)))
            .map(|p| p.id())
            .collect();
        if stale.is_empty() {
            continue;
        }
        for link in aya::programs::loaded_links().filter_map(Result::ok) {
            if link.link_type().ok() == Some(LinkType::Tcx) && stale.contains(&link.program_id()) {
                match detach_link(link.id()) {
                    Ok(()) => {
                        warn!(
                            iface,
                            link = link.id(),
                            program = link.program_id(),
                            ?attach_type,
                            "detached a stale TCX link left by an earlier agent"
                        );
                        removed.push(format!("tcx link {} {attach_type:?}", link.id()));
                    }
                    Err(e) => {
                        warn!(iface, link = link.id(), error = %e, "a stale TCX link could not be detached; it may shadow this agent")
                    }
                }
            }
        }
    }
    removed
}

/// BPF_LINK_DETACH on a link we only know by id (aya exposes no such call).
fn detach_link(link_id: u32) -> io::Result<()> {
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let mut attr = [0u32; 4];
    attr[0] = link_id;
    // SAFETY: attr is a zeroed bpf_attr prefix of the size we pass.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_GET_FD_BY_ID, attr.as_ptr(), size_of_val(&attr)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attr = [std::os::fd::AsRawFd::as_raw_fd(&fd) as u32, 0, 0, 0];
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, attr.as_ptr(), size_of_val(&attr)) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
