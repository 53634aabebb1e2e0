//! The shell around the kernel: load and pin the object, attach the TC
//! programs to interfaces, execute plans against the maps.

use std::{
    collections::BTreeMap,
    fs, io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    ptr::NonNull,
    sync::atomic::{Ordering, fence},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, MapInfo, MapType, PerCpuArray, PerCpuValues},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, Link as _, LinkType, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    },
    util::KernelVersion,
};
use mcs_common::{
    AffinityKey, AffinityValue, Backend, BackendStats, CT_DIR_ORIGINAL, CT_DIR_REPLY, CtKey, CtValue, FragKey,
    FragValue, Health, Ip4, Ip6, LAYOUT_VERSION, MAP_AFFINITY, MAP_AFFINITY6, MAP_BACKEND_STATS, MAP_BACKENDS,
    MAP_BACKENDS6, MAP_CONFIG, MAP_CT, MAP_CT6, MAP_FRAGS, MAP_FRAGS6, MAP_HEALTH, MAP_HOST_NETNS, MAP_SELECTION,
    MAP_SERVICE_STATS, MAP_SERVICES, MAP_SERVICES6, MAP_SOCK_EXCLUDE, MAP_SOCK_REV, MAP_SOCK_REV6, MAP_STATS, MapAddr,
    PIN_LINKS, PIN_ROOT, PROG_EGRESS, PROG_INGRESS, SelectionPair, ServiceKey, ServiceStats, ServiceValue, SockRevKey,
    SockRevValue, Stat, v3,
};
use thiserror::Error;
use tracing::{debug, info, warn};

mod sock;
pub use sock::{cgroup_id, cgroup2_root};

use crate::{
    desired::{BackendAddr, FrontendKey},
    plan::{Capacity, FamilyBackend, FamilyKey, MapOp, backend_addr, frontend_of},
};

/// The eBPF object, built by this crate's build script from `mcs-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mcs-ebpf"));

/// How programs are hooked to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// TCX links when the kernel has them (6.6+), netlink clsact otherwise.
    Auto,
    /// TCX links (kernel 6.6+), pinned in bpffs so they outlive the agent;
    /// a new agent swaps its programs in with BPF_LINK_UPDATE.
    Tcx,
    /// A clsact qdisc with direct-action filters at a fixed priority and
    /// handle (older kernels); a new agent replaces them in place.
    Netlink,
}

impl AttachMode {
    pub fn resolve(self) -> AttachMode {
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
    #[error("cgroup {}: {message}", path.display())]
    Cgroup { path: PathBuf, message: String },
    #[error("the eBPF object has no program {0}: it was built from other sources than this agent")]
    MissingProgram(&'static str),
    #[error("pinning {name} at {}: {source}", path.display())]
    Pin { name: String, path: PathBuf, source: aya::pin::PinError },
    #[error(
        "pinned map {name} at {} does not fit this agent ({message}); the layout changed without a version bump: run `mcs-agent uninstall` and start again",
        path.display()
    )]
    Incompatible { name: &'static str, path: PathBuf, message: String },
}

/// Which of the kernel programs' own log lines (aya-log) reach the agent's log.
/// Off by default: the level is a constant of the loaded programs, so the
/// verifier drops the logging code and a packet pays nothing for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum KernelLog {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

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

/// Map sizes, chosen at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub capacity: Capacity,
    pub conntrack: u32,
    /// Backend and service ids with their own counters.
    pub stats_entries: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            capacity: Capacity::default(),
            conntrack: mcs_common::DEFAULT_MAX_CONNTRACK,
            stats_entries: mcs_common::DEFAULT_STATS_ENTRIES,
        }
    }
}

/// `SELECTION`, mapped into the agent's memory (the map is `BPF_F_MMAPABLE`):
/// writing a table is one copy instead of a syscall per slot.
pub(crate) struct SlotMemory {
    base: NonNull<u32>,
    slots: usize,
    bytes: usize,
}

/// A shared, writable mapping of a `BPF_F_MMAPABLE` map's first `bytes`
/// (rounded up to whole pages); returns the base and the mapped length.
fn mmap_map<T>(fd: &OwnedFd, bytes: usize) -> io::Result<(NonNull<T>, usize)> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let bytes = bytes.div_ceil(page).max(1) * page;
    // SAFETY: a shared mapping of a map fd we hold, of the size the kernel allows for it.
    let ptr = unsafe {
        libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = NonNull::new(ptr.cast::<T>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
    Ok((base, bytes))
}

impl SlotMemory {
    fn map(fd: &OwnedFd, slots: u32) -> io::Result<Self> {
        let (base, bytes) = mmap_map(fd, slots as usize * 4)?;
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

    /// Maps a pinned `SELECTION` (for `inspect`, which only reads).
    pub(crate) fn open_pinned(path: &Path) -> io::Result<Self> {
        let info = MapInfo::from_pin(path).map_err(io::Error::other)?;
        let data = MapData::from_pin(path).map_err(io::Error::other)?;
        let fd = data.fd().as_fd().try_clone_to_owned()?;
        Self::map(&fd, info.max_entries() * 2)
    }

    pub(crate) fn read(&self, index: u32) -> Option<u32> {
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
    services6: HashMap<MapData, ServiceKey<Ip6>, ServiceValue>,
    backends6: Array<MapData, Backend<Ip6>>,
    selection: SlotMemory,
    /// `CT`, `CT6`: two entries per flow, one per direction.
    ct: HashMap<MapData, CtKey, CtValue>,
    ct6: HashMap<MapData, CtKey<Ip6>, CtValue<Ip6>>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    affinity6: HashMap<MapData, AffinityKey<Ip6>, AffinityValue>,
    stats: PerCpuArray<MapData, u64>,
    config: Array<MapData, u32>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    service_stats: PerCpuArray<MapData, ServiceStats>,
    /// `HEALTH`, mapped: passive health reads every backend without a syscall.
    health: HealthMemory,
    sock_exclude: HashMap<MapData, u64, u32>,
    sock_rev: HashMap<MapData, SockRevKey, SockRevValue>,
    /// `SOCK_REV`, `SOCK_REV6`: for the handles read off the loop.
    sock_rev_fds: [OwnedFd; 2],
    sock_rev6: HashMap<MapData, SockRevKey<Ip6>, SockRevValue<Ip6>>,
    host_netns: Array<MapData, u64>,
    /// Descriptors of the maps written in batches (the typed maps hide theirs).
    fds: BatchFds,
}

struct BatchFds {
    services: OwnedFd,
    services6: OwnedFd,
    backends: OwnedFd,
    backends6: OwnedFd,
    backend_stats: OwnedFd,
    service_stats: OwnedFd,
    /// For the conntrack collector's thread.
    ct: OwnedFd,
    ct6: OwnedFd,
}

fn map_fd(ebpf: &Ebpf, name: &'static str) -> Result<OwnedFd, DatapathError> {
    let data = match ebpf.map(name).ok_or(DatapathError::MissingMap(name))? {
        Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) | Map::PerCpuArray(d) => d,
        _ => return Err(DatapathError::MissingMap(name)),
    };
    data.fd().as_fd().try_clone_to_owned().map_err(|e| DatapathError::Map { name, source: MapError::IoError(e) })
}

/// Zeroed per-CPU values for `n` elements of `T`.
fn per_cpu_zeros<T>(n: usize) -> Result<Vec<u8>, MapError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| MapError::IoError(e))?;
    Ok(vec![0u8; n * cpus * std::mem::size_of::<T>().next_multiple_of(8)])
}

/// `HEALTH` (mmapable array of [`Health`]) in the agent's memory.
struct HealthMemory {
    base: NonNull<Health>,
    len: usize,
    bytes: usize,
}

impl HealthMemory {
    fn map(fd: &OwnedFd, len: u32) -> io::Result<Self> {
        let (base, bytes) = mmap_map(fd, len as usize * size_of::<Health>())?;
        Ok(Self { base, len: len as usize, bytes })
    }

    fn get(&self, id: u32) -> Option<Health> {
        // SAFETY: bounds checked; the kernel adds to these words concurrently,
        // and a torn read of one counter cannot happen for aligned u64s.
        ((id as usize) < self.len).then(|| unsafe { self.base.as_ptr().add(id as usize).read_volatile() })
    }

    fn zero(&mut self, id: u32) {
        if (id as usize) < self.len {
            // SAFETY: as above; the id is not in any table yet.
            unsafe { self.base.as_ptr().add(id as usize).write_volatile(Health::default()) };
        }
    }
}

impl Drop for HealthMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

fn map_health(ebpf: &mut Ebpf, len: u32) -> Result<HealthMemory, DatapathError> {
    let name = MAP_HEALTH;
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    let Map::Array(data) = &map else {
        return Err(DatapathError::Map { name, source: MapError::InvalidMapType { map_type: 0 } });
    };
    let io_err = |e| DatapathError::Map { name, source: MapError::IoError(e) };
    let fd = data.fd().as_fd().try_clone_to_owned().map_err(io_err)?;
    HealthMemory::map(&fd, len).map_err(io_err)
}

/// Zeroes one per-CPU counter entry; ids past the map's size have none.
fn zero<T: aya::Pod + Default + Clone>(map: &mut PerCpuArray<MapData, T>, id: u32) -> Result<(), MapError> {
    if id >= map.len() {
        return Ok(());
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| MapError::IoError(e))?;
    let values = PerCpuValues::try_from(vec![T::default(); cpus]).map_err(MapError::IoError)?;
    map.set(id, values, 0)
}

/// Where one layout version keeps its pins: `<bpffs>/mcs/v<N>/<MAP>` and
/// `<bpffs>/mcs/v<N>/links/<ingress|egress>/<iface>`.
#[derive(Clone, Debug)]
pub struct LayoutDir {
    pub version: u32,
    pub dir: PathBuf,
}

impl LayoutDir {
    pub fn new(bpffs: &Path, version: u32) -> Self {
        Self { version, dir: bpffs.join(PIN_ROOT).join(format!("v{version}")) }
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.dir.join(PIN_LINKS)
    }

    fn link(&self, iface: &str, attach_type: TcAttachType) -> PathBuf {
        self.links().join(direction(attach_type)).join(escape(iface))
    }

    /// Interfaces with a pinned link in this layout, sorted.
    pub fn pinned_interfaces(&self) -> Vec<String> {
        let mut names: Vec<String> = ["ingress", "egress"]
            .iter()
            .flat_map(|dir| fs::read_dir(self.links().join(dir)).into_iter().flatten())
            .filter_map(Result::ok)
            .filter_map(|e| unescape(e.file_name().to_str()?))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Layout versions other than `current` that have pins under `bpffs`.
    pub fn others(bpffs: &Path, current: u32) -> Vec<LayoutDir> {
        let mut found: Vec<LayoutDir> = fs::read_dir(bpffs.join(PIN_ROOT))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.strip_prefix('v')?.parse::<u32>().ok())
            .filter(|v| *v != current)
            .map(|v| LayoutDir::new(bpffs, v))
            .collect();
        found.sort_by_key(|l| l.version);
        found
    }
}

/// bpffs refuses names with a dot (reserved by the kernel), and interface
/// names may have one (`eth0.100`): `%` and `.` are percent-encoded.
fn escape(iface: &str) -> String {
    iface.replace('%', "%25").replace('.', "%2E")
}

fn unescape(name: &str) -> Option<String> {
    Some(name.replace("%2E", ".").replace("%25", "%"))
}

fn direction(attach_type: TcAttachType) -> &'static str {
    match attach_type {
        TcAttachType::Ingress => "ingress",
        _ => "egress",
    }
}

/// The netlink filter slot our programs own on every interface: replacing the
/// filter at this priority and handle swaps the program atomically.
const NL_PRIORITY: u16 = 1;
const NL_HANDLE: u32 = 0x4d43;

/// Our two hooks on one interface.
enum Hook {
    /// A TCX link pinned in bpffs: it stays attached after the agent exits,
    /// until the pin is removed.
    Pinned { path: PathBuf, link_id: u32 },
    /// A TCX link owned by this process only (`--no-pin`).
    Owned(SchedClassifierLink),
    /// A netlink filter at `NL_PRIORITY`/`NL_HANDLE`.
    Netlink(TcAttachType),
}

struct Attachment {
    hooks: Vec<Hook>,
}

/// What `attach` did on one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// Programs were hooked where none of ours were.
    New(AttachMode),
    /// Our programs were already there (an earlier agent's): swapped in place, no gap.
    Replaced(AttachMode),
}

/// The kernel state an agent finds at start, to rebuild its allocations from.
pub struct KernelState {
    /// `SERVICES` and `SERVICES6`, as frontends (or the unknown protocol).
    pub services: Vec<(Result<FrontendKey, u8>, ServiceValue)>,
    /// Non-free entries of `BACKENDS` and `BACKENDS6`.
    pub backends: Vec<(u32, BackendAddr)>,
}

pub struct Datapath {
    ebpf: Ebpf,
    maps: Maps,
    sizes: Sizes,
    layout: Option<LayoutDir>,
    /// Older layouts whose pinned links are taken over (updated in place and
    /// re-pinned under `layout`) when this agent attaches.
    older: Vec<LayoutDir>,
    /// The kernel programs' log reader, with `--kernel-log` on.
    logger: Option<KernelLogger>,
    /// The maps were found pinned (a restart), not created.
    adopted: bool,
    attached: BTreeMap<String, Attachment>,
    /// The socket programs' cgroup attachment (socket-level load balancing).
    sockets: Option<sock::SockAttachment>,
    /// Why the socket programs could not be loaded, if they could not.
    sock_load: Option<DatapathError>,
    /// What `CONFIG[0]` holds (`CONFIG_F_*`).
    config_flags: u32,
    /// Detach and unpin on drop (tests, the demo, `--no-pin`); otherwise the
    /// datapath outlives the agent.
    cleanup_on_exit: bool,
    finished: bool,
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
    warn!(
        path = %root.display(),
        "no bpffs there: mounted one of our own, which lives only as long as this mount namespace; \
         for pins that outlive the agent (hitless restarts), mount bpffs on the host (systemd's sys-fs-bpf.mount does)"
    );
    Ok(())
}

/// Forgets ClientIP affinity of these backends (all when `None`) for a
/// frontend, in one family's map.
fn purge_affinity<A: mcs_common::MapAddr>(
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

/// `<bpffs>/mcs/v<LAYOUT_VERSION>`: where this layout's maps are pinned.
pub fn pin_dir(bpffs: &Path) -> PathBuf {
    LayoutDir::new(bpffs, LAYOUT_VERSION).dir
}

/// What each map must look like to be adopted: type, key and value size, flags.
fn expected(name: &str) -> (MapType, usize, usize, u32) {
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
        MAP_HEALTH => (MapType::Array, 4, size_of::<Health>(), aya_obj_mmapable()),
        MAP_SOCK_REV => (MapType::LruHash, size_of::<SockRevKey>(), size_of::<SockRevValue>(), 0),
        MAP_SOCK_REV6 => (MapType::LruHash, size_of::<SockRevKey<Ip6>>(), size_of::<SockRevValue<Ip6>>(), 0),
        MAP_SOCK_EXCLUDE => (MapType::Hash, 8, 4, 0),
        MAP_HOST_NETNS => (MapType::Array, 4, 8, 0),
        _ => (MapType::PerCpuArray, 4, 8, 0),
    }
}

const fn aya_obj_mmapable() -> u32 {
    1 << 10 // BPF_F_MMAPABLE
}

/// Checks a pinned map against what this agent expects. `Ok(Some(n))` adopts
/// it with its pinned size `n`; `Ok(None)` means it is not there.
fn check_pinned(name: &'static str, path: &Path) -> Result<Option<u32>, DatapathError> {
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

fn map_selection(ebpf: &mut Ebpf, slots: u32) -> Result<SlotMemory, DatapathError> {
    let name = MAP_SELECTION;
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    let Map::Array(data) = &map else {
        return Err(DatapathError::Map { name, source: MapError::InvalidMapType { map_type: 0 } });
    };
    let io_err = |e| DatapathError::Map { name, source: MapError::IoError(e) };
    // The mapping holds its own reference to the map; the fd can close after.
    let fd = data.fd().as_fd().try_clone_to_owned().map_err(io_err)?;
    SlotMemory::map(&fd, slots.div_ceil(2) * 2).map_err(io_err)
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
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
        let Sizes { capacity, conntrack, stats_entries } = sizes;
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
            // Last: its size is read back below. Every backend id, whatever
            // --stats-entries: passive health must watch every backend, and
            // the map is not per-CPU (32 bytes an id, 8 MiB at the default
            // 262,144 backends).
            (MAP_HEALTH, capacity.backends),
        ];
        let layout = match pins {
            Some((root, version)) => {
                ensure_bpffs(root)?;
                let layout = LayoutDir::new(root, version);
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
        for (name, size) in &mut wanted {
            if *name == MAP_HEALTH {
                // As many ids as the backends map adopted or created has.
                *size = backends_size;
            }
            if let Some(layout) = &layout {
                let path = layout.map(name);
                match check_pinned(name, &path) {
                    Ok(Some(pinned)) if *name == MAP_STATS && pinned != Stat::COUNT => {
                        // Counters only: start them afresh rather than refuse to start.
                        warn!(path = %path.display(), "pinned counters have another size; starting them from zero");
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
                            warn!(
                                map = *name,
                                pinned,
                                requested = *size,
                                "adopting the pinned map with its own size; a new size takes `mcs-agent uninstall` and a restart"
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
            if *name == MAP_BACKENDS {
                backends_size = *size;
            }
            loader.map_max_entries(name, *size);
        }
        let level = kernel_log as u8;
        loader.override_global(aya_log::LEVEL, &level, false);
        let mut ebpf = loader.load(OBJECT)?;
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
        // Now, while every map descriptor the programs refer to is open (the
        // selection map's closes once it is mapped). A kernel without them
        // still gets the TC path.
        let sock_load = sock::load_programs(&mut ebpf).err();
        let [services, backends, slot_pairs, ct_entries, .., health_entries] = wanted.map(|(_, size)| size);
        let conntrack = ct_entries / 2;
        let capacity = Capacity { services, backends, slots: slot_pairs * 2 };
        let fds = BatchFds {
            services: map_fd(&ebpf, MAP_SERVICES)?,
            services6: map_fd(&ebpf, MAP_SERVICES6)?,
            backends: map_fd(&ebpf, MAP_BACKENDS)?,
            backends6: map_fd(&ebpf, MAP_BACKENDS6)?,
            backend_stats: map_fd(&ebpf, MAP_BACKEND_STATS)?,
            service_stats: map_fd(&ebpf, MAP_SERVICE_STATS)?,
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
            health: map_health(&mut ebpf, health_entries)?,
            sock_exclude: take(&mut ebpf, MAP_SOCK_EXCLUDE)?,
            sock_rev_fds: [map_fd(&ebpf, MAP_SOCK_REV)?, map_fd(&ebpf, MAP_SOCK_REV6)?],
            sock_rev: take(&mut ebpf, MAP_SOCK_REV)?,
            sock_rev6: take(&mut ebpf, MAP_SOCK_REV6)?,
            host_netns: take(&mut ebpf, MAP_HOST_NETNS)?,
        };
        let cleanup_on_exit = layout.is_none();
        let config_flags = maps.config.get(&0, 0).unwrap_or(0);
        Ok(Self {
            ebpf,
            maps,
            sizes: Sizes { capacity, conntrack, stats_entries },
            layout,
            older: Vec::new(),
            logger,
            adopted,
            attached: BTreeMap::new(),
            sockets: None,
            sock_load,
            config_flags,
            cleanup_on_exit,
            finished: false,
        })
    }

    /// Older layouts to take pinned links over from (see [`retire_layout`]).
    pub fn set_older_layouts(&mut self, older: Vec<LayoutDir>) {
        if self.layout.is_some() {
            self.older = older;
        }
    }

    /// Tells the programs whether an older layout's programs run behind them.
    pub fn set_handoff(&mut self, on: bool) -> Result<(), DatapathError> {
        self.set_config(mcs_common::CONFIG_F_HANDOFF, on)
    }

    fn set_config(&mut self, bit: u32, on: bool) -> Result<(), DatapathError> {
        let flags = if on { self.config_flags | bit } else { self.config_flags & !bit };
        self.maps.config.set(0, flags, 0).map_err(|source| DatapathError::Map { name: MAP_CONFIG, source })?;
        self.config_flags = flags;
        Ok(())
    }

    /// Counters of backend `id`, summed over CPUs (`None` past the map's size).
    pub fn backend_stats(&self, id: u32) -> Option<BackendStats> {
        let values = self.maps.backend_stats.get(&id, 0).ok()?;
        Some(values.iter().fold(BackendStats::default(), |a, v| a.plus(*v)))
    }

    /// How many backend ids have passive health counters (ids from 0).
    pub fn health_entries(&self) -> usize {
        self.maps.health.len
    }

    /// Passive health's counters of backend `id` (a memory read, no syscall).
    pub fn health(&self, id: u32) -> Option<Health> {
        self.maps.health.get(id)
    }

    /// Counters of service `id`, summed over CPUs.
    pub fn service_stats(&self, id: u32) -> Option<ServiceStats> {
        let values = self.maps.service_stats.get(&id, 0).ok()?;
        Some(values.iter().fold(ServiceStats::default(), |a, v| ServiceStats {
            new_flows: a.new_flows + v.new_flows,
            no_backend: a.no_backend + v.no_backend,
        }))
    }

    /// Descriptors of `CT` and `CT6` of their own, for the collector's thread.
    pub fn conntrack_fds(&self) -> Result<(OwnedFd, OwnedFd), DatapathError> {
        let dup =
            |fd: &OwnedFd, name| fd.try_clone().map_err(|e| DatapathError::Map { name, source: MapError::IoError(e) });
        Ok((dup(&self.maps.fds.ct, MAP_CT)?, dup(&self.maps.fds.ct6, MAP_CT6)?))
    }

    /// Flows in conntrack, both families (their original-direction entries;
    /// walks the maps: tools and tests, not the agent's loop).
    pub fn conntrack_len(&self) -> usize {
        let v4 = self.maps.ct.keys().filter(|k| k.as_ref().is_ok_and(|k| k.dir == CT_DIR_ORIGINAL)).count();
        v4 + self.maps.ct6.keys().filter(|k| k.as_ref().is_ok_and(|k| k.dir == CT_DIR_ORIGINAL)).count()
    }

    /// The kernel log reader, to be polled for records (see [`KernelLogger::flush`]).
    pub fn take_kernel_logger(&mut self) -> Option<KernelLogger> {
        self.logger.take()
    }

    /// The sizes in force (adopted maps keep theirs).
    pub fn sizes(&self) -> Sizes {
        self.sizes
    }

    /// True when the maps were found pinned by an earlier agent.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn layout(&self) -> Option<&LayoutDir> {
        self.layout.as_ref()
    }

    /// Detach and unpin everything when this value is dropped.
    pub fn set_cleanup_on_exit(&mut self, cleanup: bool) {
        self.cleanup_on_exit = cleanup || self.layout.is_none();
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

    pub fn program_mut(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, name)
    }

    /// Hooks ingress (DNAT) and egress (reverse NAT) to `iface`, first in line.
    ///
    /// Our programs already there (an earlier agent's, through a pinned TCX link
    /// or our netlink filter slot) are replaced in place, atomically: no packet
    /// ever passes the interface without one of them. Copies of our programs
    /// we cannot replace (a TCX link pinned elsewhere) are removed.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<Attached, DatapathError> {
        let iface_err = |message: String| DatapathError::Interface { iface: iface.to_owned(), message };
        if nix::net::if_::if_nametoindex(iface).is_err() {
            return Err(iface_err("no such interface in this network namespace".into()));
        }
        let mode = mode.resolve();
        if mode == AttachMode::Netlink {
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => {}
                Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(iface_err(format!("adding the clsact qdisc: {e}"))),
            }
        }
        let mut hooks = Vec::new();
        let mut replaced = false;
        // Reverse NAT first: a reply must never meet a translation it cannot undo
        // (DNAT in place while the egress hook is still missing or older).
        for (name, attach_type) in [(PROG_EGRESS, TcAttachType::Egress), (PROG_INGRESS, TcAttachType::Ingress)] {
            let hooked = match mode {
                AttachMode::Netlink => self.hook_netlink(iface, name, attach_type),
                _ => self.hook_tcx(iface, name, attach_type),
            };
            match hooked {
                Ok((hook, was_there)) => {
                    replaced |= was_there;
                    hooks.push(hook);
                }
                Err(message) => {
                    // Never leave an interface half-attached (DNAT without reverse NAT),
                    // unless that half was there before us.
                    if !replaced {
                        release(iface, hooks);
                    }
                    return Err(iface_err(format!("attaching {name} ({mode:?}): {message}")));
                }
            }
        }
        let mut keep: Vec<u32> = hooks.iter().filter_map(hook_link_id).collect();
        keep.extend(self.protected_links());
        remove_stale(iface, &keep, mode);
        info!(iface, ?mode, replaced, "attached");
        self.attached.insert(iface.to_owned(), Attachment { hooks });
        Ok(if replaced { Attached::Replaced(mode) } else { Attached::New(mode) })
    }

    fn hook_tcx(&mut self, iface: &str, name: &'static str, attach_type: TcAttachType) -> Result<(Hook, bool), String> {
        let pin = self.layout.as_ref().map(|l| l.link(iface, attach_type));
        // An earlier agent's pinned link on this very interface (this layout's,
        // else an older layout's): swap the program in place.
        let candidates: Vec<PathBuf> =
            pin.iter().cloned().chain(self.older.iter().map(|l| l.link(iface, attach_type))).collect();
        let prog = program(&mut self.ebpf, name).map_err(|e| e.to_string())?;
        for found in candidates.iter().filter(|p| p.exists()) {
            let Some(link) = adopt_link(found, iface, attach_type) else {
                // A link of an interface that was deleted and created again.
                let _ = fs::remove_file(found);
                continue;
            };
            if pin.as_ref() != Some(found) {
                // An older layout's link: its programs know the flows of the older
                // maps, so they stay behind ours (see `CONFIG_F_HANDOFF`) until
                // `retire_layout` unpins them.
                drop(link);
                let options = TcAttachOptions::TcxOrder(LinkOrder::first());
                let id = prog.attach_with_options(iface, attach_type, options).map_err(|e| e.to_string())?;
                let fd = FdLink::try_from(prog.take_link(id).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
                let link_id = fd.info().map_err(|e| e.to_string())?.id();
                let path = pin.clone().expect("older layouts are only set with pins");
                fd.pin(&path).map_err(|e| format!("pinning the link at {}: {e}", path.display()))?;
                return Ok((Hook::Pinned { path, link_id }, true));
            }
            let id = prog.attach_to_link(link).map_err(|e| format!("BPF_LINK_UPDATE: {e}"))?;
            let link = prog.take_link(id).map_err(|e| e.to_string())?;
            let fd = FdLink::try_from(link).map_err(|e| e.to_string())?;
            let link_id = fd.info().map_err(|e| e.to_string())?.id();
            return Ok((Hook::Pinned { path: found.clone(), link_id }, true));
        }
        let options = TcAttachOptions::TcxOrder(LinkOrder::first());
        let id = prog.attach_with_options(iface, attach_type, options).map_err(|e| e.to_string())?;
        let link = prog.take_link(id).map_err(|e| e.to_string())?;
        let Some(path) = pin else {
            return Ok((Hook::Owned(link), false));
        };
        let fd = FdLink::try_from(link).map_err(|e| e.to_string())?;
        let link_id = fd.info().map_err(|e| e.to_string())?.id();
        // Dropping the PinnedLink closes our fd; the pin keeps the link attached.
        fd.pin(&path).map_err(|e| format!("pinning the link at {}: {e}", path.display()))?;
        Ok((Hook::Pinned { path, link_id }, false))
    }

    fn hook_netlink(
        &mut self,
        iface: &str,
        name: &'static str,
        attach_type: TcAttachType,
    ) -> Result<(Hook, bool), String> {
        let prog = program(&mut self.ebpf, name).map_err(|e| e.to_string())?;
        let handle = TcHandle::from(NL_HANDLE);
        // Replace in place when our filter is there (an earlier agent's), else create it.
        let existing =
            SchedClassifierLink::attached(iface, attach_type, NL_PRIORITY, handle, None).map_err(|e| e.to_string())?;
        let (id, replaced) = match prog.attach_to_link(existing) {
            Ok(id) => (id, true),
            Err(_) => {
                let options =
                    TcAttachOptions::Netlink(NlOptions { priority: NL_PRIORITY, handle, ..Default::default() });
                (prog.attach_with_options(iface, attach_type, options).map_err(|e| e.to_string())?, false)
            }
        };
        // The filter lives in the kernel on its own; forget aya's handle so
        // dropping the program does not remove it.
        std::mem::forget(prog.take_link(id).map_err(|e| e.to_string())?);
        Ok((Hook::Netlink(attach_type), replaced))
    }

    /// Links that are ours even though this call did not make them: this
    /// agent's hooks elsewhere, and every link pinned in our layout directories
    /// (an earlier agent's, still serving interfaces not taken over yet).
    fn protected_links(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.attached.values().flat_map(|a| a.hooks.iter().filter_map(hook_link_id)).collect();
        for layout in self.layout.iter().chain(&self.older) {
            for iface in layout.pinned_interfaces() {
                for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
                    if let Ok(pinned) = PinnedLink::from_pin(layout.link(&iface, attach_type))
                        && let Ok(info) = FdLink::from(pinned).info()
                    {
                        ids.push(info.id());
                    }
                }
            }
        }
        ids
    }

    /// Detaches from `iface` (or forgets it, when the interface is already gone).
    pub fn forget(&mut self, iface: &str) -> bool {
        let Some(attachment) = self.attached.remove(iface) else {
            return false;
        };
        release(iface, attachment.hooks);
        true
    }

    /// Interfaces with a pinned link that this agent has not attached (yet).
    pub fn pinned_not_attached(&self) -> Vec<String> {
        let Some(layout) = &self.layout else { return Vec::new() };
        layout.pinned_interfaces().into_iter().filter(|i| !self.attached.contains_key(i)).collect()
    }

    /// Detaches and unpins an earlier agent's links on an interface this agent
    /// does not serve (no longer named by a flag or pattern, or gone).
    pub fn release_pinned(&mut self, iface: &str) {
        let Some(layout) = &self.layout else { return };
        for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
            let path = layout.link(iface, attach_type);
            if path.exists() {
                match fs::remove_file(&path) {
                    Ok(()) => info!(
                        iface,
                        direction = direction(attach_type),
                        "released a pinned link of an interface not served any more"
                    ),
                    Err(e) => warn!(iface, path = %path.display(), error = %e, "removing a pinned link failed"),
                }
            }
        }
    }

    pub fn is_attached(&self, iface: &str) -> bool {
        self.attached.contains_key(iface)
    }

    pub fn attached_count(&self) -> usize {
        self.attached.len()
    }
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
    fn put_backends(&mut self, ops: &[MapOp]) -> io::Result<()> {
        // Counters exist for the first `--stats-entries` ids only.
        let counted = self.maps.backend_stats.len();
        let (mut ids, mut ids4, mut ids6) = (Vec::new(), Vec::new(), Vec::new());
        let (mut v4, mut v6): (Vec<u8>, Vec<u8>) = (Vec::new(), Vec::new());
        for op in ops {
            let MapOp::PutBackend { id, backend } = op else { continue };
            if *id < counted {
                ids.extend_from_slice(&id.to_ne_bytes());
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
        let zeros = per_cpu_zeros::<BackendStats>(ids.len() / 4).map_err(io::Error::other)?;
        crate::batch::update(fds.backend_stats.as_fd(), &ids, &zeros, ids.len() / 4)?;
        crate::batch::update(fds.backends.as_fd(), &ids4, &v4, ids4.len() / 4)?;
        crate::batch::update(fds.backends6.as_fd(), &ids6, &v6, ids6.len() / 4)
    }

    /// Service entries in batches (their slots are already written).
    fn put_services(&mut self, ops: &[MapOp]) -> io::Result<()> {
        let counted = self.maps.service_stats.len();
        let (mut fresh, mut k4, mut v4, mut k6, mut v6) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for op in ops {
            let MapOp::PutService { key, value, fresh: is_fresh } = op else { continue };
            if *is_fresh && value.service_id < counted {
                fresh.extend_from_slice(&value.service_id.to_ne_bytes());
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
        let zeros = per_cpu_zeros::<ServiceStats>(fresh.len() / 4).map_err(io::Error::other)?;
        crate::batch::update(fds.service_stats.as_fd(), &fresh, &zeros, fresh.len() / 4)?;
        crate::batch::update(fds.services.as_fd(), &k4, &v4, v4.len() / size)?;
        crate::batch::update(fds.services6.as_fd(), &k6, &v6, v6.len() / size)
    }

    fn apply_one(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        let maps = &mut self.maps;
        let map_err = |name| move |source| DatapathError::Map { name, source };
        match op {
            MapOp::PutBackend { id, backend } => {
                // A new id: its counters must not carry an earlier backend's.
                zero(&mut maps.backend_stats, *id).map_err(map_err(MAP_BACKEND_STATS))?;
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

    pub fn services(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.maps.services.iter().filter_map(Result::ok).collect()
    }

    pub fn selection_slot(&self, slot: u32) -> Option<u32> {
        self.maps.selection.read(slot)
    }

    pub fn backend(&self, id: u32) -> Option<Backend> {
        self.maps.backends.get(&id, 0).ok()
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

    /// Stops the agent's hold on the datapath. Unless cleanup on exit was
    /// asked for, programs stay attached and maps pinned: the datapath keeps
    /// serving the last programmed state until the next agent adopts it.
    pub fn shutdown(self) {
        drop(self);
    }

    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if !self.cleanup_on_exit {
            let pinned =
                self.attached.values().flat_map(|a| &a.hooks).filter(|h| matches!(h, Hook::Pinned { .. })).count();
            info!(links = pinned, "leaving programs attached and maps pinned for the next agent");
            // Dropping a pinned link's fd leaves it attached; owned links never
            // exist with pins.
            return;
        }
        for (iface, attachment) in std::mem::take(&mut self.attached) {
            release(&iface, attachment.hooks);
            debug!(iface, "detached");
        }
        if let Some(sockets) = self.sockets.take() {
            sock::release_sockets(sockets);
        }
        if let Some(layout) = self.layout.take() {
            remove_layout(&layout);
        }
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Removes a layout's pins (links first: that detaches them) and its directory,
/// and the shared parent when no other layout uses it.
fn remove_layout(layout: &LayoutDir) {
    for iface in layout.pinned_interfaces() {
        for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
            let _ = fs::remove_file(layout.link(iface.as_str(), attach_type));
        }
    }
    match fs::remove_dir_all(&layout.dir) {
        Ok(()) => debug!(path = %layout.dir.display(), "removed pins"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %layout.dir.display(), error = %e, "removing pins failed"),
    }
    if let Some(parent) = layout.dir.parent() {
        let _ = fs::remove_dir(parent);
    }
}

fn hook_link_id(hook: &Hook) -> Option<u32> {
    match hook {
        Hook::Pinned { link_id, .. } => Some(*link_id),
        Hook::Owned(l) => <&FdLink>::try_from(l).ok()?.info().ok().map(|i| i.id()),
        Hook::Netlink(_) => None,
    }
}

/// Detaches one interface's hooks.
fn release(iface: &str, hooks: Vec<Hook>) {
    for hook in hooks {
        match hook {
            Hook::Pinned { path, .. } => {
                // Removing the pin drops the last reference: the link detaches.
                if let Err(e) = fs::remove_file(&path) {
                    debug!(iface, error = %e, "unpinning a link");
                }
            }
            Hook::Owned(link) => {
                if let Err(e) = link.detach() {
                    // The kernel already dropped the link of a deleted interface.
                    debug!(iface, error = %e, "detach");
                }
            }
            Hook::Netlink(attach_type) => {
                if let Ok(link) =
                    SchedClassifierLink::attached(iface, attach_type, NL_PRIORITY, TcHandle::from(NL_HANDLE), None)
                    && let Err(e) = link.detach()
                {
                    debug!(iface, error = %e, "removing the netlink filter");
                }
            }
        }
    }
}

/// Opens an earlier agent's pinned link if it still hooks `iface`: the
/// interface may have been deleted and created again under the same name.
fn adopt_link(path: &Path, iface: &str, attach_type: TcAttachType) -> Option<SchedClassifierLink> {
    let fd = FdLink::from(PinnedLink::from_pin(path).ok()?);
    let prog_id = fd.info().ok()?.program_id();
    let (_, programs) = SchedClassifier::query_tcx(iface, attach_type).ok()?;
    if !programs.iter().any(|p| p.id() == prog_id) {
        return None;
    }
    SchedClassifierLink::try_from(fd).ok()
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, DatapathError> {
    let program = ebpf.program_mut(name).ok_or(DatapathError::Program { name, source: ProgramError::NotLoaded })?;
    program.try_into().map_err(|source| DatapathError::Program { name, source })
}

/// Finds copies of our programs on `iface` that are not the hooks in `keep`
/// and removes them, saying so: a TCX link pinned by something else, or an
/// older agent's netlink filter at another priority, would translate with
/// maps nobody updates.
pub fn remove_stale(iface: &str, keep: &[u32], mode: AttachMode) -> Vec<String> {
    let mut removed = Vec::new();
    for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
        if mode != AttachMode::Netlink {
            // Our own netlink filters only matter in netlink mode; in TCX mode
            // every netlink copy is stale.
            for name in [PROG_INGRESS, PROG_EGRESS] {
                if tc::qdisc_detach_program(iface, attach_type, name).is_ok() {
                    warn!(
                        iface,
                        program = name,
                        ?attach_type,
                        "removed a stale netlink filter left by an earlier agent"
                    );
                    removed.push(format!("netlink {name} {attach_type:?}"));
                }
            }
        }
        let Ok((_, programs)) = SchedClassifier::query_tcx(iface, attach_type) else {
            continue;
        };
        let ours: Vec<u32> = programs
            .iter()
            .filter(|p| matches!(p.name_as_str(), Some(PROG_INGRESS | PROG_EGRESS)))
            .map(|p| p.id())
            .collect();
        if ours.is_empty() {
            continue;
        }
        for link in aya::programs::loaded_links().filter_map(Result::ok) {
            if link.link_type().ok() == Some(LinkType::Tcx)
                && ours.contains(&link.program_id())
                && !keep.contains(&link.id())
            {
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
    let attr = [fd.as_raw_fd() as u32, 0, 0, 0];
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, attr.as_ptr(), size_of_val(&attr)) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// What `uninstall` removed.
#[derive(Debug, Default)]
pub struct Uninstalled {
    pub layouts: Vec<u32>,
    pub links: usize,
    pub netlink_filters: usize,
}

/// Removes mcs-agent from this node: every pinned link (which detaches it),
/// every pinned map of every layout version, and our netlink filters on every
/// interface of this network namespace.
pub fn uninstall(bpffs: &Path) -> Result<Uninstalled, DatapathError> {
    let mut done = Uninstalled::default();
    ensure_bpffs(bpffs)?;
    for layout in LayoutDir::others(bpffs, u32::MAX) {
        done.links += layout.pinned_interfaces().len() * 2;
        remove_layout(&layout);
        done.layouts.push(layout.version);
    }
    let _ = fs::remove_dir(bpffs.join(PIN_ROOT));
    let interfaces = nix::net::if_::if_nameindex()
        .map_err(|e| DatapathError::Bpffs { path: bpffs.to_owned(), message: format!("listing interfaces: {e}") })?;
    for iface in interfaces.iter() {
        let Ok(name) = iface.name().to_str() else { continue };
        for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
            for prog in [PROG_INGRESS, PROG_EGRESS] {
                if tc::qdisc_detach_program(name, attach_type, prog).is_ok() {
                    done.netlink_filters += 1;
                }
            }
        }
    }
    Ok(done)
}

/// Copies established flows, affinity and socket translations (both
/// families) from an older layout's pinned maps into this agent's, where
/// their shapes are the same, mapping service and backend ids through the
/// frontends and addresses both sides know. Entries this agent already has
/// win.
///
/// A layout bump that changes `CtKey`/`CtValue`, the affinity or the
/// `SockRev` types must add a conversion here (see ARCHITECTURE.md). Layout
/// 3's two conntrack maps are converted into `CT` entries (see below).
pub fn carry_over(current: &mut Datapath, old: &LayoutDir) -> CarriedOver {
    fn open<K: aya::Pod, V: aya::Pod>(old: &LayoutDir, name: &'static str) -> Option<HashMap<MapData, K, V>> {
        let path = old.map(name);
        let (kind, key, value, _) = expected(name);
        let info = MapInfo::from_pin(&path).ok()?;
        if info.map_type().ok()? != kind || info.key_size() as usize != key || info.value_size() as usize != value {
            warn!(
                map = name,
                layout = old.version,
                "the older layout's map has another shape; its entries are not carried over"
            );
            return None;
        }
        let data = MapData::from_pin(&path).ok()?;
        let map = if kind == MapType::LruHash { Map::LruHashMap(data) } else { Map::HashMap(data) };
        HashMap::try_from(map).ok()
    }
    /// Copies `from` into `to`, each value through `convert` (None: skip).
    fn copy<K: aya::Pod, V: aya::Pod>(
        old: &LayoutDir,
        name: &'static str,
        to: &mut HashMap<MapData, K, V>,
        convert: impl Fn(&mut K, &mut V) -> bool,
    ) -> usize {
        let Some(from) = open::<K, V>(old, name) else { return 0 };
        let no_exist = 1; // BPF_NOEXIST
        let mut n = 0;
        for (mut k, mut v) in from.iter().filter_map(Result::ok) {
            if convert(&mut k, &mut v) && to.insert(k, v, no_exist).is_ok() {
                n += 1;
            }
        }
        n
    }
    let old_services = |name| -> Vec<(FrontendKey, u32)> {
        let pairs = |m: HashMap<MapData, ServiceKey, ServiceValue>| -> Vec<(FrontendKey, u32)> {
            m.iter().filter_map(Result::ok).filter_map(|(k, v)| Some((frontend_of(&k).ok()?, v.service_id))).collect()
        };
        let pairs6 = |m: HashMap<MapData, ServiceKey<Ip6>, ServiceValue>| -> Vec<(FrontendKey, u32)> {
            m.iter().filter_map(Result::ok).filter_map(|(k, v)| Some((frontend_of(&k).ok()?, v.service_id))).collect()
        };
        if name == MAP_SERVICES { open(old, name).map(pairs) } else { open(old, name).map(pairs6) }.unwrap_or_default()
    };
    let new_service_ids: BTreeMap<FrontendKey, u32> =
        current.kernel_state().services.into_iter().filter_map(|(k, v)| Some((k.ok()?, v.service_id))).collect();
    let service_id: BTreeMap<u32, u32> = old_services(MAP_SERVICES)
        .into_iter()
        .chain(old_services(MAP_SERVICES6))
        .filter_map(|(k, old_id)| Some((old_id, *new_service_ids.get(&k)?)))
        .collect();
    let old_backends =
        MapData::from_pin(old.map(MAP_BACKENDS)).ok().and_then(|d| Array::<_, Backend>::try_from(Map::Array(d)).ok());
    let old_backends6 = MapData::from_pin(old.map(MAP_BACKENDS6))
        .ok()
        .and_then(|d| Array::<_, Backend<Ip6>>::try_from(Map::Array(d)).ok());
    let new_backend_ids: BTreeMap<BackendAddr, u32> =
        current.kernel_state().backends.into_iter().map(|(id, b)| (b, id)).collect();
    // Ids are one space over both families: an id names a backend in one of them.
    let backend_id = |old_id: u32| -> u32 {
        let addr = old_backends
            .as_ref()
            .and_then(|m| m.get(&old_id, 0).ok())
            .filter(|b| *b != Backend::default())
            .map(|b| backend_addr(&b))
            .or_else(|| {
                old_backends6
                    .as_ref()
                    .and_then(|m| m.get(&old_id, 0).ok())
                    .filter(|b| *b != Backend::default())
                    .map(|b| backend_addr(&b))
            });
        addr.and_then(|a| new_backend_ids.get(&a).copied()).unwrap_or(mcs_common::NO_BACKEND)
    };
    let service = |id: u32| service_id.get(&id).copied();
    let maps = &mut current.maps;
    // One conversion per value type, instantiated for each family.
    macro_rules! ct {
        () => {
            |_: &mut _, v: &mut CtValue<_>| {
                v.backend_id = backend_id(v.backend_id);
                v.service_id = service(v.service_id).unwrap_or(0);
                true
            }
        };
    }
    macro_rules! sock {
        () => {
            |_: &mut _, v: &mut SockRevValue<_>| {
                v.backend_id = backend_id(v.backend_id);
                v.service_id = service(v.service_id).unwrap_or(0);
                true
            }
        };
    }
    macro_rules! affinity {
        () => {
            |k: &mut AffinityKey<_>, v: &mut AffinityValue| {
                let (Some(sid), bid) = (service(k.service_id), backend_id(v.backend_id)) else { return false };
                k.service_id = sid;
                v.backend_id = bid;
                bid != mcs_common::NO_BACKEND
            }
        };
    }
    /// Layout 3's entries, each through `convert` to an entry of `CT`, with
    /// the sibling derived from it when `sibling` (inserted only where
    /// missing, and only beside an entry that went in).
    fn convert<K: aya::Pod, V: aya::Pod, A: MapAddr + aya::Pod>(
        old: &LayoutDir,
        name: &'static str,
        to: &mut HashMap<MapData, CtKey<A>, CtValue<A>>,
        sibling: bool,
        convert: impl Fn(K, V) -> (CtKey<A>, CtValue<A>),
    ) -> usize
    where
        CtKey<A>: aya::Pod,
        CtValue<A>: aya::Pod,
    {
        let Some(from) = open::<K, V>(old, name) else { return 0 };
        let no_exist = 1; // BPF_NOEXIST
        let mut n = 0;
        for (k, v) in from.iter().filter_map(Result::ok) {
            let (key, value) = convert(k, v);
            if to.insert(key, value, no_exist).is_err() {
                continue;
            }
            n += 1;
            if sibling {
                let (sibling, sibling_value) = key.sibling(&value);
                let _ = to.insert(sibling, sibling_value, no_exist);
            }
        }
        n
    }
    macro_rules! from_v3_ct {
        () => {
            |k: v3::CtKey<_>, v: v3::CtValue<_>| {
                let key = CtKey {
                    src: k.client_ip,
                    dst: k.vip,
                    src_port: k.client_port,
                    dst_port: k.vip_port,
                    proto: k.proto,
                    dir: CT_DIR_ORIGINAL,
                    _pad: [0; 2],
                };
                let value = CtValue {
                    addr: v.backend_ip,
                    port: v.backend_port,
                    flags: v.flags,
                    _pad: 0,
                    backend_id: backend_id(v.backend_id),
                    service_id: service(v.service_id).unwrap_or(0),
                    closed_ns: v.closed_ns,
                    created_ns: v.created_ns,
                    paired_ns: 0,
                };
                (key, value)
            }
        };
    }
    macro_rules! from_v3_rev {
        () => {
            |k: v3::RevNatKey<_>, v: v3::RevNatValue<_>| {
                let key = CtKey {
                    src: k.backend_ip,
                    dst: k.client_ip,
                    src_port: k.backend_port,
                    dst_port: k.client_port,
                    proto: k.proto,
                    dir: CT_DIR_REPLY,
                    _pad: [0; 2],
                };
                // Layout 3 kept the service only on the client's side: the
                // reply entry goes without it (the reply path never reads it).
                let value = CtValue {
                    addr: v.vip,
                    port: v.vip_port,
                    flags: v.flags,
                    _pad: 0,
                    backend_id: backend_id(v.backend_id),
                    service_id: 0,
                    closed_ns: v.closed_ns,
                    created_ns: 0,
                    paired_ns: 0,
                };
                (key, value)
            }
        };
    }
    let conntrack = copy(old, MAP_CT, &mut maps.ct, ct!()) + copy(old, MAP_CT6, &mut maps.ct6, ct!());
    // A layout-3 `CONNTRACK` entry alone is not derived a reply: that
    // layout left one behind when a direct connection reused the tuple, and
    // a reply entry would capture that connection's replies. Its first
    // client packet puts the reply back (`paired_ns` 0: a check is due).
    // A `REV_NAT` entry brings its flow's original entry with it (only
    // packets to the VIP can meet that one).
    let converted = convert(old, v3::MAP_CONNTRACK, &mut maps.ct, false, from_v3_ct!())
        + convert(old, v3::MAP_CONNTRACK6, &mut maps.ct6, false, from_v3_ct!())
        + convert(old, v3::MAP_REV_NAT, &mut maps.ct, true, from_v3_rev!())
        + convert(old, v3::MAP_REV_NAT6, &mut maps.ct6, true, from_v3_rev!());
    let sockets =
        copy(old, MAP_SOCK_REV, &mut maps.sock_rev, sock!()) + copy(old, MAP_SOCK_REV6, &mut maps.sock_rev6, sock!());
    let affinity = copy(old, MAP_AFFINITY, &mut maps.affinity, affinity!())
        + copy(old, MAP_AFFINITY6, &mut maps.affinity6, affinity!());
    CarriedOver { conntrack, converted, sockets, affinity }
}

/// What [`carry_over`] copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CarriedOver {
    /// Conntrack entries of the same layout as ours (two per flow).
    pub conntrack: usize,
    /// Layout 3 conntrack and reverse-NAT entries converted.
    pub converted: usize,
    /// Socket-level translations.
    pub sockets: usize,
    pub affinity: usize,
}

/// Removes an older layout once this agent serves every interface: its
/// remaining pinned links (interfaces nobody serves now) and its maps.
pub fn retire_layout(layout: &LayoutDir) {
    remove_layout(layout);
    info!(version = layout.version, path = %layout.dir.display(), "removed the older layout's pins");
}

/// What of mcs-agent is still on this node: pinned layouts, and our TCX
/// programs on any interface. Empty after `uninstall`. (Netlink filters are
/// not listed: reading them needs a netlink dump aya does not expose;
/// `uninstall` removes them all the same.)
pub fn remains(bpffs: &Path) -> Vec<String> {
    let mut found: Vec<String> = LayoutDir::others(bpffs, u32::MAX)
        .iter()
        .map(|l| format!("pins of layout v{} in {}", l.version, l.dir.display()))
        .collect();
    for iface in nix::net::if_::if_nameindex().iter().flat_map(|list| list.iter()) {
        let Ok(name) = iface.name().to_str() else { continue };
        for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
            let programs = SchedClassifier::query_tcx(name, attach_type).map(|(_, p)| p).unwrap_or_default();
            if programs.iter().any(|p| matches!(p.name_as_str(), Some(PROG_INGRESS | PROG_EGRESS))) {
                found.push(format!("TCX {} program on {name}", direction(attach_type)));
            }
        }
    }
    found
}
