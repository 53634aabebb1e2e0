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
    MAP_SERVICE_STATS, MAP_SERVICES, MAP_SERVICES6, MAP_SOCK_EXCLUDE, MAP_SOCK_REV, MAP_SOCK_REV6, MAP_STATS,
    MAP_XDP_BACKEND_STATS, MAP_XDP_SERVICE_STATS, MAP_XNAT, MAP_XNAT_CT, MAP_XNAT_CT6, MAP_XNAT_IP_ID, MAP_XNAT_SRC,
    MAP_XNAT_SRC6, MAP_XNAT_UPLINKS, MapAddr, NatValue, PIN_LINKS, PIN_ROOT, PROG_EGRESS, PROG_INGRESS, PROG_UPLINK,
    PROG_XDP, SelectionPair, ServiceKey, ServiceStats, ServiceValue, SockRevKey, SockRevValue, Stat, XnatConfig, v3,
};
use thiserror::Error;
use tracing::{debug, info, warn};

mod attach;
mod carry;
mod external;
mod grow;
mod load;
pub mod memory;
mod mmap;
mod ops;
mod pins;
mod read;
mod sock;

pub(crate) use self::mmap::*;
pub(crate) use self::read::{sum_backend, sum_service};
pub use self::{attach::*, carry::*, external::*, load::*, pins::*};
pub use sock::{cgroup_id, cgroup2_root};

use crate::{
    model::{BackendAddr, FrontendKey},
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

/// `XNAT_CT`'s size on a node without external interfaces: an LRU map is
/// preallocated, and nothing fills it.
pub const XNAT_TOKEN_SIZE: u32 = 64;

/// Map sizes, chosen at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub capacity: Capacity,
    pub conntrack: u32,
    /// Backend and service ids with their own counters.
    pub stats_entries: u32,
    /// Flows from outside the node (`XNAT_CT`, two entries each): the
    /// conntrack size with `--external-interface`, a token size without.
    pub xnat_conntrack: u32,
    /// `--external-interface` given: the XDP path's counters are sized as
    /// the pod paths' (one entry each otherwise).
    pub external: bool,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            capacity: Capacity::default(),
            conntrack: mcs_common::DEFAULT_MAX_CONNTRACK,
            stats_entries: mcs_common::DEFAULT_STATS_ENTRIES,
            xnat_conntrack: XNAT_TOKEN_SIZE,
            external: false,
        }
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
    /// `XDP_BACKEND_STATS`, `XDP_SERVICE_STATS`: the same counters for
    /// flows from outside the node (`--external-interface`).
    xdp_backend_stats: PerCpuArray<MapData, BackendStats>,
    xdp_service_stats: PerCpuArray<MapData, ServiceStats>,
    /// `HEALTH`, mapped: passive health reads every backend without a syscall.
    health: HealthMemory,
    sock_exclude: HashMap<MapData, u64, u32>,
    sock_rev: HashMap<MapData, SockRevKey, SockRevValue>,
    /// `SOCK_REV`, `SOCK_REV6`: for the handles read off the loop.
    sock_rev_fds: [OwnedFd; 2],
    sock_rev6: HashMap<MapData, SockRevKey<Ip6>, SockRevValue<Ip6>>,
    host_netns: Array<MapData, u64>,
    /// `XNAT_CT`, `XNAT_CT6`: flows from outside (`--external-interface`).
    xnat_ct: HashMap<MapData, CtKey, NatValue>,
    xnat_ct6: HashMap<MapData, CtKey<Ip6>, NatValue<Ip6>>,
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
    xdp_backend_stats: OwnedFd,
    xdp_service_stats: OwnedFd,
    /// For the conntrack collector's thread.
    ct: OwnedFd,
    ct6: OwnedFd,
}

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
    /// Link ids of the datapath this one grows from (see
    /// [`crate::growth`]): kept attached, behind ours, until it is retired.
    protected: Vec<u32>,
    /// The kernel programs' log reader, with `--kernel-log` on.
    logger: Option<KernelLogger>,
    /// The maps were found pinned (a restart), not created.
    adopted: bool,
    attached: BTreeMap<String, Attachment>,
    /// External interfaces (`--external-interface`): XDP and the uplink TC program.
    external: BTreeMap<String, ExternalHooks>,
    /// The socket programs' cgroup attachment (socket-level load balancing).
    sockets: Option<sock::SockAttachment>,
    /// Why the socket programs could not be loaded, if they could not.
    sock_load: Option<DatapathError>,
    /// Why the external interfaces' programs could not be loaded, if they could not.
    xdp_load: Option<DatapathError>,
    /// What `CONFIG[0]` holds (`CONFIG_F_*`).
    config_flags: u32,
    /// Detach and unpin on drop (tests, the demo, `--no-pin`); otherwise the
    /// datapath outlives the agent.
    cleanup_on_exit: bool,
    finished: bool,
}

impl Datapath {
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

    /// Detach and unpin everything when this value is dropped.
    pub fn set_cleanup_on_exit(&mut self, cleanup: bool) {
        self.cleanup_on_exit = cleanup || self.layout.is_none();
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
        // Outside clients' flows first: their local backends' replies are
        // translated back by the pod interfaces' programs.
        self.release_externals();
        for (iface, attachment) in std::mem::take(&mut self.attached) {
            release(&iface, attachment.hooks);
            debug!(iface, "detached");
        }
        self.release_socket_links();
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
