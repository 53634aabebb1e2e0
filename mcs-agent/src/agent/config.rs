//! What `mcs-agent run` was asked to do, checked and in the library's types:
//! the command line (`cli::RunArgs::config`) builds it, the agent
//! runs it. Nothing here touches the kernel.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    conntrack,
    datapath::{AttachMode, KernelLog, Sizes},
    desired::Policy,
    outlier::OutlierConfig,
    plan::Capacity,
    source::{kube::Peers, links::Patterns},
};

/// Where objects come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of YAML files, watched.
    Manifests(PathBuf),
    /// The Kubernetes API.
    Kube {
        kubeconfig: Option<PathBuf>,
        /// The agents that share the reporting of invalid objects.
        peers: Option<Peers>,
    },
}

/// How the socket programs are to be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketLbMode {
    /// Where the kernel and a cgroup2 mount allow it; a warning otherwise.
    Auto,
    /// A failure to attach is fatal (`--socket-lb on`).
    Required,
    /// Detached entirely (`--socket-lb off --socket-lb-host-namespace off`).
    Off,
}

/// What `--external-*` and `--xdp-mode` asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct External {
    /// `--external-interface`: names or globs. Empty: no XDP.
    pub interfaces: Vec<String>,
    /// The source NAT settings; addresses not given are found at attach.
    pub snat: crate::datapath::Xnat,
    pub mode: crate::datapath::XdpAttach,
}

/// What `--socket-lb*` asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketLb {
    pub mode: SocketLbMode,
    /// Translate at the socket for the node's own network namespace only
    /// (`--socket-lb off`, host namespace on): pods go the TC path.
    pub host_only: bool,
    /// `--socket-lb-cgroup`; the host's cgroup2 root when absent.
    pub cgroup: Option<PathBuf>,
    pub exclude: Vec<PathBuf>,
}

/// Connection tracking's expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackGc {
    /// Idle timeouts; [`conntrack::Timeouts::never`] with expiry off.
    pub timeouts: conntrack::Timeouts,
    /// How often the collector walks the maps (it counts them even with expiry off).
    pub interval: Duration,
    pub expiry: bool,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub source: SourceConfig,
    /// `--interface`: failing to attach to one is fatal.
    pub interfaces: Vec<String>,
    /// `--interface-pattern`, as given (for the log) and compiled.
    pub interface_patterns: Vec<String>,
    pub patterns: Patterns,
    pub attach: AttachMode,
    pub kernel_log: KernelLog,
    pub bpffs: PathBuf,
    /// Pin maps and links (not `--no-pin`).
    pub pin: bool,
    pub layout_version: u32,
    pub cleanup_on_exit: bool,
    /// The sizes to start with (see [`crate::growth`]).
    pub sizes: Sizes,
    /// How far the maps may grow (`--max-*`).
    pub bounds: Capacity,
    pub conntrack: ConntrackGc,
    /// At most one reconcile per this long.
    pub debounce: Duration,
    /// A full re-read this often.
    pub resync: Duration,
    pub health_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    /// Passive health, or none.
    pub outlier: Option<OutlierConfig>,
    pub outlier_interval: Duration,
    pub metrics_backend_label: bool,
    pub socket_lb: SocketLb,
    /// End TCP sockets too when their backend leaves.
    pub terminate_tcp: bool,
    pub external: External,
    pub state_dir: PathBuf,
    /// The policy the flags give, before the Node and ClusterProperty fill gaps.
    pub policy: Policy,
}
