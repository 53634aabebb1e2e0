//! The command line: every subcommand and flag, and the parsers that turn
//! flag values into the library's types. The binary parses [`Cli`] and
//! hands each subcommand to the library.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    agent::{
        config::{Config, ConntrackGc, External, SocketLb, SocketLbMode, SourceConfig},
        error::{AgentError, Context as _},
    },
    conntrack,
    datapath::{self, AttachMode, KernelLog, Sizes},
    desired::{self, Policy},
    growth,
    locality::{self, NodeLocality, Tier},
    maglev,
    outlier::OutlierConfig,
    plan::Capacity,
    source::{kube::Peers, links::Patterns},
};

/// eBPF datapath for Kubernetes Multi-Cluster Services (KEP-1645).
///
/// Makes every ServiceImport's ClusterSetIP answer at kernel speed: TC programs on
/// the interfaces that face client pods translate `ClusterSetIP:port` to a ready
/// pod `IP:port` in any cluster of the clusterset and translate the replies back.
#[derive(Debug, Parser)]
#[command(name = "mcs-agent", version, propagate_version = true)]
pub struct Cli {
    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `mcs_agent=debug`).
    #[arg(long, global = true, env = "MCS_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Program the datapath and keep it in sync until SIGINT or SIGTERM.
    ///
    /// Standalone mode reads ServiceImports (multicluster.x-k8s.io v1beta1 or
    /// v1alpha1) and EndpointSlices (discovery.k8s.io/v1, labelled
    /// multicluster.kubernetes.io/service-name) from the YAML files in --manifests
    /// and follows every change to them within a second. Invalid objects are
    /// reported with file, object and field, and skipped; the rest keeps working.
    ///
    /// Kubernetes mode (no --manifests) watches ServiceImports (v1beta1, else
    /// v1alpha1), EndpointSlices labelled multicluster.kubernetes.io/service-name,
    /// this node (NODE_NAME) and the ClusterProperty cluster.clusterset.k8s.io.
    /// RBAC: get/list/watch on serviceimports, endpointslices, nodes and
    /// clusterproperties; create/patch on events.k8s.io events (deploy/clusterrole.yaml).
    ///
    /// Examples: `mcs-agent run --manifests deploy/examples --interface veth-pod1`;
    /// in a DaemonSet: `mcs-agent run --interface-pattern 'veth*'`.
    Run(Box<RunArgs>),
    /// Remove mcs-agent from this node: detach its programs from every
    /// interface and remove every pinned map and link, of every layout version.
    ///
    /// `run` never does this on its own (a stopped agent leaves the datapath
    /// serving its last state, for the next agent to adopt). Run it after
    /// deleting the DaemonSet, e.g. with deploy/uninstall/.
    Uninstall {
        /// Where bpffs is mounted.
        #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf", env = "MCS_BPFFS")]
        bpffs: PathBuf,
        /// Keep running after uninstalling, until SIGTERM (in a DaemonSet, the
        /// pod then stays Ready to show that its node is clean).
        #[arg(long)]
        stay: bool,
        /// Remove nothing: exit 0 if nothing of mcs-agent is left on this node,
        /// 1 (listing what is) otherwise.
        #[arg(long, conflicts_with = "stay")]
        check: bool,
    },
    /// Show this node's datapath: frontends and their backends, flows,
    /// affinity, counters.
    ///
    /// Reads the pinned maps (works while the agent is stopped too) and names
    /// what is behind each id: the running agent answers on its control
    /// socket in --state-dir, a stopped one left state.json there.
    /// Examples: `mcs-agent inspect services`, `mcs-agent inspect conntrack
    /// --service demo/web -o json`.
    Inspect(InspectArgs),
    /// Validate manifests and print the frontends and backends they produce.
    ///
    /// Touches nothing in the kernel. Exits non-zero when an object is invalid.
    Check {
        /// Directory of Kubernetes YAML (`*.yaml`, `*.yml`) or JSON (`*.json`) files.
        #[arg(long, value_name = "DIR")]
        manifests: PathBuf,
        #[command(flatten)]
        locality: LocalityArgs,
    },
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(subcommand)]
    pub what: InspectWhat,
    /// `table` for people, `json` for tools.
    #[arg(short = 'o', long, value_enum, default_value = "table", global = true)]
    pub output: Output,
    /// Where bpffs is mounted (the agent's --bpffs).
    #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf", env = "MCS_BPFFS", global = true)]
    pub bpffs: PathBuf,
    /// The agent's --state-dir.
    #[arg(long, value_name = "DIR", default_value = "/run/mcs-agent", env = "MCS_STATE_DIR", global = true)]
    pub state_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum InspectWhat {
    /// Each ClusterSetIP:port/protocol with its ServiceImport, table size and
    /// backends (cluster, zone, tier, intended weight, share of the table, counters).
    Services,
    /// Translated flows: client, ClusterSetIP, backend, protocol, age, state,
    /// path (`pod`, or `xdp` for flows from outside the node, with the node
    /// address and port their backend sees).
    Conntrack {
        /// Only this ServiceImport's flows (namespace/name).
        #[arg(long, value_name = "NS/NAME")]
        service: Option<String>,
    },
    /// ClientIP affinity entries: client, backend, idle time.
    Affinity,
    /// The datapath's event counters.
    Stats,
    /// Each pinned map: its capacity and the kernel memory charged for it
    /// (per-CPU maps count every CPU's copy; `mcs_agent_map_memory_bytes`
    /// in /metrics says the same for a running agent).
    Maps,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Where this node is and how it prefers endpoints. Each flag can also come
/// from its environment variable (a DaemonSet sets them from the downward API).
#[derive(Debug, Args)]
pub struct LocalityArgs {
    /// This node's cluster (the `multicluster.kubernetes.io/source-cluster` value of its own slices).
    #[arg(long, value_name = "ID", env = "MCS_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// This node's zone (compared with `endpoints[].zone`).
    #[arg(long, value_name = "ZONE", env = "MCS_ZONE")]
    pub zone: Option<String>,
    /// This node's region (compared with the slice label `topology.kubernetes.io/region`).
    #[arg(long, value_name = "REGION", env = "MCS_REGION")]
    pub region: Option<String>,
    /// This node's name (compared with `endpoints[].nodeName`, for PreferSameNode).
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Region of a cluster whose slices carry no region label (repeatable;
    /// in the environment, comma-separated).
    #[arg(long = "cluster-region", value_name = "CLUSTER=REGION", env = "MCS_CLUSTER_REGIONS", value_delimiter = ',', value_parser = parse_cluster_region)]
    pub cluster_regions: Vec<(String, String)>,
    /// Locality tiers in order of preference: node, zone, cluster, region, any.
    ///
    /// A tier takes min(100%, 1.4 x ready/total) of new connections and the
    /// rest spills to the next one. `cluster,region,any` is "self cluster, then
    /// same region, then any"; `any` alone turns locality off (a ServiceImport's
    /// spec.trafficDistribution still applies to it).
    #[arg(long, value_name = "TIERS", env = "MCS_LOCALITY_TIERS", default_value = "zone,region,any", value_parser = parse_tier_list)]
    pub locality_tiers: TierList,
    /// Largest Maglev table per frontend, in slots (a prime). Tables get about
    /// 1000 slots per backend up to this size; smaller saves kernel memory (4 bytes
    /// a slot) at the price of more reshuffling when a backend changes.
    #[arg(long, value_name = "SLOTS", default_value_t = maglev::DEFAULT_MAX_TABLE_SIZE, value_parser = parse_table_size)]
    pub maglev_max_table_size: u32,
    /// Leave ServiceImports that carry `multicluster.kubernetes.io/derived-service`
    /// to kube-proxy. By default they are programmed too: the TC hook runs
    /// before kube-proxy's netfilter rules.
    #[arg(long, env = "MCS_SKIP_DERIVED")]
    pub skip_derived: bool,
    /// Where ClusterSetIPs may be (repeatable; in the environment,
    /// comma-separated), e.g. the clusterset's VIP ranges `10.96.0.0/16` and
    /// `fd00:96::/112`. Each family is checked against its own ranges (none
    /// given for a family: any address of it); a ClusterSetIP outside them is
    /// reported and skipped, the import's other family still served.
    /// With or without it, loopback, link-local, multicast and broadcast
    /// addresses, this node's addresses and any endpoint's address are refused.
    #[arg(long = "clusterset-ip-cidr", value_name = "CIDR", env = "MCS_CLUSTERSET_IP_CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub clusterset_ip_cidrs: Vec<ipnet::IpNet>,
    /// The cluster's Service ranges (repeatable; in the environment,
    /// comma-separated), e.g. kubeadm's and kind's default `10.96.0.0/12`.
    /// A ClusterSetIP inside one is refused unless it is the ClusterIP of the
    /// import's own derived Service: any Service may be given such an address
    /// and the VIP would capture its traffic. In Kubernetes mode the ranges of
    /// the ServiceCIDR objects (networking.k8s.io/v1, Kubernetes 1.33+) are
    /// added to these, and every Service's ClusterIP is refused whatever the
    /// ranges; give the flag on older clusters and in standalone mode.
    #[arg(long = "service-cidr", value_name = "CIDR", env = "MCS_SERVICE_CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub service_cidrs: Vec<ipnet::IpNet>,
}

impl LocalityArgs {
    /// The policy these flags give, before the Node and ClusterProperty fill gaps.
    pub fn policy(&self) -> Policy {
        let LocalityArgs {
            cluster_id,
            zone,
            region,
            node_name,
            cluster_regions,
            locality_tiers,
            maglev_max_table_size,
            skip_derived,
            clusterset_ip_cidrs,
            service_cidrs,
        } = self;
        Policy {
            node: NodeLocality {
                node: node_name.clone(),
                zone: zone.clone(),
                region: region.clone(),
                cluster: cluster_id.clone(),
                cluster_regions: cluster_regions.iter().cloned().collect(),
            },
            tiers: locality_tiers.0.clone(),
            max_table_size: *maglev_max_table_size,
            skip_derived: *skip_derived,
            vip_cidrs: clusterset_ip_cidrs.clone(),
            node_addresses: Default::default(),
            service_ranges: service_cidrs
                .iter()
                .map(|net| desired::ServiceRange { net: *net, source: "--service-cidr".into() })
                .collect(),
            ipv6: ipv6_enabled(),
        }
    }
}

/// A whole `--locality-tiers` value (clap would read a bare `Vec` as repeated flags).
#[derive(Clone, Debug)]
pub struct TierList(Vec<Tier>);

fn parse_tier_list(value: &str) -> Result<TierList, String> {
    locality::parse_tiers(value).map(TierList)
}

fn parse_cluster_region(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((cluster, region)) if !cluster.is_empty() && !region.is_empty() => {
            Ok((cluster.to_owned(), region.to_owned()))
        }
        _ => Err(format!("{value:?} is not CLUSTER=REGION")),
    }
}

fn parse_cidr(value: &str) -> Result<ipnet::IpNet, String> {
    value
        .parse::<ipnet::IpNet>()
        .map(|net| net.trunc())
        .map_err(|_| format!("{value:?} is not a CIDR like 10.96.0.0/16 or fd00:96::/112"))
}

/// IPv6 is on in this network namespace: the kernel has it and it is not
/// disabled by sysctl.
fn ipv6_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6").is_ok_and(|v| v.trim() == "0")
}

fn parse_table_size(value: &str) -> Result<u32, String> {
    let size: u32 = value.parse().map_err(|_| format!("{value:?} is not a number"))?;
    if size < 251 || !maglev::is_prime(size) {
        return Err(format!("{size} must be a prime of at least 251 (e.g. 16381, 65521)"));
    }
    Ok(size)
}

/// `LOW-HIGH`, both in 1024-65535.
fn port_range(text: &str) -> Result<(u16, u16), String> {
    let (low, high) = text.split_once('-').ok_or_else(|| format!("{text:?}: expected LOW-HIGH, e.g. 61000-65535"))?;
    let parse = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("{p:?}: {e}"));
    let (low, high) = (parse(low)?, parse(high)?);
    if low < 1024 || low > high {
        return Err(format!("{text:?}: LOW must be at least 1024 and at most HIGH"));
    }
    Ok((low, high))
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Standalone mode: a directory of Kubernetes YAML files (`*.yaml`, `*.yml`;
    /// multi-document and List allowed) or JSON files (`*.json`, one object or
    /// a List; read about 2.5 times faster). Without it the agent watches the
    /// Kubernetes API (in-cluster config, --kubeconfig or KUBECONFIG).
    #[arg(long, value_name = "DIR", env = "MCS_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for Kubernetes mode (default: in-cluster config, then KUBECONFIG, then ~/.kube/config).
    #[arg(long, value_name = "PATH", conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,
    /// The namespace of the agents' pods (the DaemonSet passes its own, from
    /// the downward API). The agents share the reporting of invalid objects:
    /// each object gets its Events from one Ready agent, chosen by hashing
    /// the object's uid over their nodes. Without it, every agent reports
    /// every invalid object. Needs list and watch on pods there.
    #[arg(long, value_name = "NAMESPACE", env = "POD_NAMESPACE", conflicts_with = "manifests")]
    pub peer_namespace: Option<String>,
    /// The label selector of the agents' pods in `--peer-namespace`.
    #[arg(
        long,
        value_name = "SELECTOR",
        env = "MCS_PEER_SELECTOR",
        default_value = "app.kubernetes.io/name=mcs-agent"
    )]
    pub peer_selector: String,
    /// An interface facing client pods (repeatable). Ingress gets DNAT, egress reverse NAT.
    /// Failing to attach to one is fatal.
    #[arg(
        long = "interface",
        value_name = "IFACE",
        required_unless_present_any = ["interface_patterns", "external_interfaces"]
    )]
    pub interfaces: Vec<String>,
    /// Attach to every interface whose name matches this glob (repeatable), now
    /// and whenever one appears: `veth*` (Calico: `cali*`, Cilium: `lxc*`, AWS VPC CNI: `eni*`).
    /// Interfaces that go away are forgotten.
    #[arg(long = "interface-pattern", value_name = "GLOB", env = "MCS_INTERFACE_PATTERNS", value_delimiter = ',')]
    pub interface_patterns: Vec<String>,
    /// How to hook the programs: TCX links (kernel 6.6+) or netlink clsact filters.
    #[arg(long, value_enum, default_value = "auto", env = "MCS_ATTACH")]
    pub attach: AttachMode,
    /// Let the kernel programs log rare events (a failed rewrite or conntrack
    /// insert, a malformed packet) at this level and above, into this log
    /// (target `mcs_kernel`). Off costs nothing per packet: the verifier drops
    /// the logging code.
    #[arg(long, value_enum, default_value = "off", env = "MCS_KERNEL_LOG")]
    pub kernel_log: KernelLog,
    /// Where bpffs is (or is to be mounted). Maps are pinned under <BPFFS>/mcs/v<layout>/.
    #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf", env = "MCS_BPFFS")]
    pub bpffs: PathBuf,
    /// Do not pin maps or links: the datapath lives and dies with this
    /// process, and nothing is left in bpffs.
    #[arg(long)]
    pub no_pin: bool,
    /// On SIGINT/SIGTERM, detach the programs and remove the pins (tests, demos).
    /// Without it a stopped agent leaves the datapath serving its last state,
    /// and the next agent adopts it without dropping a connection.
    #[arg(long)]
    pub cleanup_on_exit: bool,
    /// Test only: pretend the map layout has this version (pins go under
    /// <BPFFS>/mcs/v<N>/), to exercise an upgrade across a layout change.
    #[arg(long, value_name = "N", hide = true, default_value_t = mcs_common::LAYOUT_VERSION)]
    pub layout_version: u32,
    /// Most frontends (ClusterSetIP:port/protocol entries) the maps may grow
    /// to. The maps start at --initial-services and grow while serving, as
    /// the imports need, without dropping a connection; past this bound a
    /// frontend is refused (an Event and a log line name it).
    #[arg(long, default_value_t = growth::BOUNDS.services)]
    pub max_services: u32,
    /// Most backends (distinct pod IP:port pairs) the maps may grow to.
    #[arg(long, default_value_t = growth::BOUNDS.backends)]
    pub max_backends: u32,
    /// Most selection-table slots, over all frontends, the maps may grow to
    /// (4 bytes each). Short of it, tables are sized down to fit.
    #[arg(long, default_value_t = growth::BOUNDS.slots)]
    pub max_selection_slots: u32,
    /// Frontends the maps hold at start (at most --max-services). A node
    /// that will serve more can start there and skip a growth.
    #[arg(long, default_value_t = growth::INITIAL.services)]
    pub initial_services: u32,
    /// Backends the maps hold at start (at most --max-backends).
    #[arg(long, default_value_t = growth::INITIAL.backends)]
    pub initial_backends: u32,
    /// Selection slots at start (at most --max-selection-slots).
    #[arg(long, default_value_t = growth::INITIAL.slots)]
    pub initial_selection_slots: u32,
    /// Capacity of the connection-tracking tables (least recently used flows are evicted).
    #[arg(long, default_value_t = mcs_common::DEFAULT_MAX_CONNTRACK)]
    pub max_conntrack: u32,
    /// Idle timeout, in seconds, of a UDP flow the backend has not answered
    /// (Linux conntrack's `udp_timeout`). Then the flow is forgotten and its
    /// next datagram is balanced afresh (a new backend may get it).
    #[arg(long, value_name = "SECONDS", default_value_t = 30, env = "MCS_CONNTRACK_UDP_TIMEOUT")]
    pub conntrack_udp_timeout: u64,
    /// Idle timeout, in seconds, of a UDP flow seen in both directions
    /// (Linux conntrack's `udp_timeout_stream`).
    #[arg(long, value_name = "SECONDS", default_value_t = 120, env = "MCS_CONNTRACK_UDP_STREAM_TIMEOUT")]
    pub conntrack_udp_stream_timeout: u64,
    /// Idle timeout, in seconds, of a TCP connection whose SYN the backend
    /// has not answered.
    #[arg(long, value_name = "SECONDS", default_value_t = 60, env = "MCS_CONNTRACK_TCP_SYN_TIMEOUT")]
    pub conntrack_tcp_syn_timeout: u64,
    /// Idle timeout, in seconds, of an established TCP connection (6 hours,
    /// Cilium's default; kube-proxy sets 24 hours). A connection idle longer
    /// loses its translation: keep it shorter than your longest idle
    /// connection without keepalives only knowingly. Closed connections
    /// (both FINs or a RST) go 10 s after closing.
    #[arg(long, value_name = "SECONDS", default_value_t = 21_600, env = "MCS_CONNTRACK_TCP_TIMEOUT")]
    pub conntrack_tcp_timeout: u64,
    /// How often, in seconds, a background thread walks the conntrack maps,
    /// removes expired flows and counts the live ones (what
    /// `mcs_agent_map_entries{map="conntrack"}` reports). Flows expire up to
    /// this much (plus 10 s) past their timeout; a pass that takes long
    /// (hundreds of milliseconds at a million flows) stretches the interval
    /// to 20 times its duration, so the collector stays near 5 % of a CPU.
    /// 0 turns expiry off: flows
    /// then leave only by their close or LRU eviction (the maps are still
    /// counted, every 10 s).
    #[arg(long, value_name = "SECONDS", default_value_t = 10, env = "MCS_CONNTRACK_GC_INTERVAL")]
    pub conntrack_gc_interval: u64,
    /// Backends and frontends with their own packet counters (per-CPU maps:
    /// this many × 40 bytes × CPUs of kernel memory). Ids are handed out
    /// smallest first, so only nodes with more backends than this miss some.
    /// Passive health is not bound by it: it watches every backend.
    #[arg(long, value_name = "N", default_value_t = mcs_common::DEFAULT_STATS_ENTRIES)]
    pub stats_entries: u32,
    /// At most one reconcile per this many milliseconds. A change after a quiet
    /// period is applied at once; changes arriving within the window of the
    /// previous reconcile wait for the window's end and are applied together.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub debounce_ms: u64,
    /// Re-read everything this often even without change events.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub resync_secs: u64,
    /// Serve /healthz (liveness), /readyz (programmed, attached, not stale) and
    /// /metrics (Prometheus) here.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9878", env = "MCS_HEALTH_ADDR")]
    pub health_addr: std::net::SocketAddr,
    /// Also serve /metrics (and the probes) here, e.g. `$(POD_IP):9879` in a
    /// DaemonSet, for Prometheus to scrape; the health address stays on loopback.
    #[arg(long, value_name = "ADDR", env = "MCS_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Passive health: eject backends whose connection attempts fail (SYNs
    /// unanswered, or answered by RST) from new connections, with no control-plane
    /// change; their tier's share spills to the next one. Established
    /// connections are never moved.
    #[arg(long, value_enum, default_value = "on", env = "MCS_OUTLIER_DETECTION")]
    pub outlier_detection: OnOff,
    /// Consecutive connect failures that eject a backend.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub outlier_consecutive_failures: u32,
    /// First ejection's length; each further one lasts this much longer (at most 300 s).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub outlier_base_ejection_secs: u64,
    /// Never eject more than this share of a frontend's backends.
    #[arg(long, value_name = "PERCENT", default_value_t = 50)]
    pub outlier_max_ejection_percent: u32,
    /// How often the kernel's connect counters are read.
    #[arg(long, value_name = "MS", default_value_t = 250)]
    pub outlier_interval_ms: u64,
    /// Label per-backend metrics with the pod's IP:port too (one series per
    /// endpoint: mind the cardinality on large clustersets).
    #[arg(long)]
    pub metrics_backend_label: bool,
    /// Socket-level load balancing: pick the backend when a process calls
    /// connect() (TCP, connected UDP) or sendmsg() (unconnected UDP) to a
    /// ClusterSetIP, so its packets go to the pod directly with no per-packet
    /// translation; recvmsg() and getpeername() still show the ClusterSetIP.
    /// It also serves hostNetwork pods and node processes, which the TC
    /// programs on pod interfaces never see. Default: on where the kernel and
    /// a cgroup2 mount allow it (a warning otherwise, and the TC path serves
    /// pods); `on` makes a failure to attach fatal; `off` leaves pods to the
    /// TC path and keeps translating only the node's own namespace (see
    /// --socket-lb-host-namespace).
    #[arg(long, value_enum, env = "MCS_SOCKET_LB")]
    pub socket_lb: Option<OnOff>,
    /// With --socket-lb off, keep translating at the socket for the node's
    /// own network namespace only (hostNetwork pods, node daemons): no TC
    /// program is on their path, so without this they cannot reach a
    /// ClusterSetIP. `off` detaches the socket programs entirely.
    #[arg(long, value_enum, default_value = "on", env = "MCS_SOCKET_LB_HOST_NAMESPACE")]
    pub socket_lb_host_namespace: OnOff,
    /// When a backend leaves a service (removed, or not ready), sockets
    /// translated to it at connect() are ended (the application gets
    /// ECONNABORTED and reconnects through the ClusterSetIP). UDP sockets
    /// always; TCP sockets too with this flag. A drained backend (weight 0,
    /// terminating but serving) keeps its sockets. Needs the kernel's
    /// CONFIG_INET_DIAG_DESTROY and sight of the pods' network namespaces
    /// (/var/run/netns, or /proc with hostPID).
    #[arg(long, env = "MCS_SOCKET_LB_TERMINATE_TCP")]
    pub socket_lb_terminate_tcp: bool,
    /// The cgroup v2 directory whose processes get socket-level load
    /// balancing. Default: the root of the host's cgroup2 mount (every pod and
    /// process of the node).
    #[arg(long, value_name = "PATH", env = "MCS_SOCKET_LB_CGROUP")]
    pub socket_lb_cgroup: Option<PathBuf>,
    /// Leave the sockets of this cgroup and its descendants (12 levels deep)
    /// to the TC path, for sidecar meshes that must see the ClusterSetIP
    /// (repeatable; a pod's cgroup, or a QoS class's).
    #[arg(
        long = "socket-lb-exclude-cgroup",
        value_name = "PATH",
        env = "MCS_SOCKET_LB_EXCLUDE_CGROUPS",
        value_delimiter = ','
    )]
    pub socket_lb_exclude_cgroups: Vec<PathBuf>,
    /// An interface where ClusterSetIP traffic from outside the node arrives
    /// (repeatable, or a glob such as `bond*`, now and whenever one appears): VMs, hosts
    /// and gateways that route the ClusterSetIP range to this node. An XDP
    /// program balances it as the pod paths do and translates it with source
    /// NAT to a node address (--external-snat-address), so a backend in any
    /// cluster answers through this node. An XDP program already there that
    /// is not this agent's (a CNI's) is never replaced: attaching fails.
    #[arg(long = "external-interface", value_name = "IFACE", env = "MCS_EXTERNAL_INTERFACES", value_delimiter = ',')]
    pub external_interfaces: Vec<String>,
    /// The node address flows from outside are translated to, one per family
    /// (repeatable). Default: the first --external-interface's first address
    /// of each family (IPv6: a global one); a family without one is not served.
    #[arg(
        long = "external-snat-address",
        value_name = "IP",
        env = "MCS_EXTERNAL_SNAT_ADDRESSES",
        value_delimiter = ','
    )]
    pub external_snat_addresses: Vec<std::net::IpAddr>,
    /// The ports flows from outside are translated to, `LOW-HIGH`. Keep it
    /// out of the node's own ephemeral ports (net.ipv4.ip_local_port_range,
    /// 32768-60999 by default) and NodePorts: a reply to a port in the range
    /// is taken for a translated flow's. Each backend gets the whole range.
    #[arg(long, value_name = "LOW-HIGH", default_value = "61000-65535", value_parser = port_range, env = "MCS_EXTERNAL_SNAT_PORTS")]
    pub external_snat_ports: (u16, u16),
    /// Serve clients from outside only from these ranges (repeatable, both
    /// families); traffic from anyone else passes the XDP program untouched.
    /// Default: every client.
    #[arg(
        long = "external-source-cidr",
        value_name = "CIDR",
        env = "MCS_EXTERNAL_SOURCE_CIDRS",
        value_delimiter = ','
    )]
    pub external_source_cidrs: Vec<ipnet::IpNet>,
    /// How XDP is hooked: `native` in the driver (fastest; veth has it),
    /// `generic` in the stack (any driver), `auto` native where the driver
    /// has it. The mode in force is logged and in `mcs_agent_xdp_attached`.
    #[arg(long, value_enum, default_value = "auto", env = "MCS_XDP_MODE")]
    pub xdp_mode: datapath::XdpAttach,
    /// Capacity of the connection table of flows from outside (least
    /// recently used evicted; two entries each, preallocated: about 190
    /// bytes a flow for IPv4 and 240 for IPv6 of kernel memory).
    #[arg(long, default_value_t = 65_536, env = "MCS_MAX_EXTERNAL_CONNTRACK")]
    pub max_external_conntrack: u32,
    /// Where `mcs-agent inspect` finds the agent: its control socket
    /// (agent.sock) while it runs, and the state.json it writes when it stops
    /// (services, clusters, zones, tiers behind each id).
    #[arg(long, value_name = "DIR", default_value = "/run/mcs-agent", env = "MCS_STATE_DIR")]
    pub state_dir: PathBuf,
    #[command(flatten)]
    pub locality: LocalityArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

impl RunArgs {
    /// The configuration these flags give. Checks what can be checked
    /// without touching the kernel: the manifest directory, the interface
    /// patterns, the excluded cgroups.
    pub fn config(self) -> Result<Config, AgentError> {
        let RunArgs {
            manifests,
            kubeconfig,
            peer_namespace,
            peer_selector,
            interfaces,
            interface_patterns,
            attach,
            kernel_log,
            bpffs,
            no_pin,
            cleanup_on_exit,
            layout_version,
            max_services,
            max_backends,
            max_selection_slots,
            initial_services,
            initial_backends,
            initial_selection_slots,
            max_conntrack,
            conntrack_udp_timeout,
            conntrack_udp_stream_timeout,
            conntrack_tcp_syn_timeout,
            conntrack_tcp_timeout,
            conntrack_gc_interval,
            stats_entries,
            debounce_ms,
            resync_secs,
            health_addr,
            metrics_addr,
            outlier_detection,
            outlier_consecutive_failures,
            outlier_base_ejection_secs,
            outlier_max_ejection_percent,
            outlier_interval_ms,
            metrics_backend_label,
            socket_lb,
            socket_lb_host_namespace,
            socket_lb_terminate_tcp,
            socket_lb_cgroup,
            socket_lb_exclude_cgroups,
            external_interfaces,
            external_snat_addresses,
            external_snat_ports,
            external_source_cidrs,
            xdp_mode,
            max_external_conntrack,
            state_dir,
            locality,
        } = self;
        if external_interfaces.is_empty()
            && (!external_snat_addresses.is_empty()
                || !external_source_cidrs.is_empty()
                || xdp_mode != datapath::XdpAttach::Auto)
        {
            return Err(AgentError::Config(
                "--external-snat-address, --external-source-cidr and --xdp-mode need --external-interface".into(),
            ));
        }
        if external_source_cidrs.len() > 1024 {
            return Err(AgentError::Config(format!(
                "--external-source-cidr: {} ranges, at most 1,024 (merge adjacent ones)",
                external_source_cidrs.len()
            )));
        }
        if !external_interfaces.is_empty() && interfaces.is_empty() && interface_patterns.is_empty() {
            tracing::warn!(
                "--external-interface without --interface or --interface-pattern: a backend on this node cannot answer clients from outside (its replies are translated back at its pod interface)"
            );
        }
        let mut snat =
            datapath::Xnat { ports: external_snat_ports, sources: external_source_cidrs, ..Default::default() };
        for addr in external_snat_addresses {
            if addr.is_unspecified() || addr.is_multicast() || addr.is_loopback() {
                return Err(AgentError::Config(format!(
                    "--external-snat-address {addr}: not a unicast address of the node"
                )));
            }
            let taken = match addr {
                std::net::IpAddr::V4(a) => snat.addr4.replace(a).is_some(),
                std::net::IpAddr::V6(a) => snat.addr6.replace(a).is_some(),
            };
            if taken {
                return Err(AgentError::Config(format!("--external-snat-address {addr}: one address per family")));
            }
        }
        for path in &socket_lb_exclude_cgroups {
            datapath::cgroup_id(path).context("--socket-lb-exclude-cgroup")?;
        }
        let patterns = Patterns::new(&interface_patterns).map_err(|e| AgentError::Config(e.to_string()))?;
        let bounds = Capacity { services: max_services, backends: max_backends, slots: max_selection_slots };
        let source = match manifests {
            Some(dir) if !dir.is_dir() => {
                return Err(AgentError::Config(format!("--manifests {}: not a directory", dir.display())));
            }
            Some(dir) => SourceConfig::Manifests(dir),
            None => SourceConfig::Kube {
                kubeconfig,
                peers: peer_namespace.map(|namespace| Peers { namespace, selector: peer_selector }),
            },
        };
        let conntrack = if conntrack_gc_interval > 0 {
            ConntrackGc {
                timeouts: conntrack::Timeouts {
                    udp: Duration::from_secs(conntrack_udp_timeout),
                    udp_stream: Duration::from_secs(conntrack_udp_stream_timeout),
                    tcp_syn: Duration::from_secs(conntrack_tcp_syn_timeout),
                    tcp: Duration::from_secs(conntrack_tcp_timeout),
                },
                interval: Duration::from_secs(conntrack_gc_interval),
                expiry: true,
            }
        } else {
            // Off: the collector still counts (and removes closed flows past
            // their grace time, as the datapath would), every 10 s.
            ConntrackGc { timeouts: conntrack::Timeouts::never(), interval: Duration::from_secs(10), expiry: false }
        };
        let outlier = (outlier_detection == OnOff::On).then(|| OutlierConfig {
            consecutive_failures: outlier_consecutive_failures.max(1),
            base_ejection: Duration::from_secs(outlier_base_ejection_secs.max(1)),
            max_ejection: Duration::from_secs(300).max(Duration::from_secs(outlier_base_ejection_secs)),
            max_ejected_percent: outlier_max_ejection_percent.min(100),
        });
        // `--socket-lb off` keeps the node's own namespace translated unless
        // that is turned off too; then a failure there is a warning, as by default.
        let host_only = socket_lb == Some(OnOff::Off);
        let mode = match (socket_lb, socket_lb_host_namespace) {
            (None, _) | (Some(OnOff::Off), OnOff::On) => SocketLbMode::Auto,
            (Some(OnOff::On), _) => SocketLbMode::Required,
            (Some(OnOff::Off), OnOff::Off) => SocketLbMode::Off,
        };
        Ok(Config {
            source,
            interfaces,
            interface_patterns,
            patterns,
            attach,
            kernel_log,
            bpffs,
            pin: !no_pin,
            layout_version,
            cleanup_on_exit,
            sizes: Sizes {
                capacity: growth::initial(
                    Capacity { services: initial_services, backends: initial_backends, slots: initial_selection_slots },
                    bounds,
                ),
                conntrack: max_conntrack,
                stats_entries,
                xnat_conntrack: if external_interfaces.is_empty() {
                    datapath::XNAT_TOKEN_SIZE
                } else {
                    max_external_conntrack.max(datapath::XNAT_TOKEN_SIZE)
                },
                external: !external_interfaces.is_empty(),
            },
            bounds,
            conntrack,
            debounce: Duration::from_millis(debounce_ms),
            resync: Duration::from_secs(resync_secs.max(1)),
            health_addr,
            metrics_addr,
            outlier,
            outlier_interval: Duration::from_millis(outlier_interval_ms.max(10)),
            metrics_backend_label,
            socket_lb: SocketLb { mode, host_only, cgroup: socket_lb_cgroup, exclude: socket_lb_exclude_cgroups },
            terminate_tcp: socket_lb_terminate_tcp,
            external: External { interfaces: external_interfaces, snat, mode: xdp_mode },
            state_dir,
            policy: locality.policy(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser as _;

    use super::*;

    /// The DaemonSet's arguments are a contract with this CLI: they must parse.
    #[test]
    fn the_daemonsets_arguments_parse() {
        let text = include_str!("../../deploy/daemonset.yaml");
        let doc: serde_json::Value = serde_saphyr::from_str(text).expect("deploy/daemonset.yaml is YAML");
        let args = &doc["spec"]["template"]["spec"]["containers"][0]["args"];
        let args: Vec<String> = args
            .as_array()
            .expect("the container has args")
            .iter()
            .map(|a| a.as_str().expect("string args").to_owned())
            .collect();
        let cli = Cli::try_parse_from(std::iter::once("mcs-agent".to_owned()).chain(args.clone()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let Command::Run(run) = cli.command else { panic!("the DaemonSet runs `run`") };
        assert_eq!(run.socket_lb_cgroup.as_deref(), Some(Path::new("/host/cgroup")));
    }

    fn config(args: &[&str]) -> Result<Config, AgentError> {
        let cli = Cli::try_parse_from(["mcs-agent", "run"].iter().chain(args)).expect("the arguments parse");
        let Command::Run(run) = cli.command else { unreachable!() };
        run.config()
    }

    #[test]
    fn flags_become_a_configuration() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let manifests = dir.path().to_str().expect("a UTF-8 path");
        let c =
            config(&["--manifests", manifests, "--interface", "veth0", "--debounce-ms", "50", "--resync-secs", "0"])
                .expect("a configuration");
        assert!(matches!(&c.source, SourceConfig::Manifests(d) if d == dir.path()));
        assert_eq!(c.debounce, Duration::from_millis(50));
        assert_eq!(c.resync, Duration::from_secs(1), "a resync of 0 s would spin: at least 1 s");
        assert!(c.pin && c.conntrack.expiry && c.outlier.is_some());
        assert_eq!(c.socket_lb.mode, SocketLbMode::Auto);

        let c =
            config(&["--interface", "veth0", "--no-pin", "--conntrack-gc-interval", "0", "--outlier-detection", "off"])
                .expect("a configuration");
        assert!(matches!(c.source, SourceConfig::Kube { peers: None, .. }));
        assert!(!c.pin && c.outlier.is_none());
        assert_eq!(c.conntrack.timeouts, conntrack::Timeouts::never(), "expiry off expires nothing");
        assert!(!c.conntrack.expiry);
    }

    #[test]
    fn socket_lb_flags_combine_as_documented() {
        let mode = |args: &[&str]| {
            let mut all = vec!["--interface", "veth0"];
            all.extend(args);
            let c = config(&all).expect("a configuration");
            (c.socket_lb.mode, c.socket_lb.host_only)
        };
        assert_eq!(mode(&[]), (SocketLbMode::Auto, false));
        assert_eq!(mode(&["--socket-lb", "on"]), (SocketLbMode::Required, false));
        assert_eq!(mode(&["--socket-lb", "off"]), (SocketLbMode::Auto, true), "the host namespace stays, best effort");
        assert_eq!(mode(&["--socket-lb", "off", "--socket-lb-host-namespace", "off"]), (SocketLbMode::Off, true));
    }

    #[test]
    fn bad_flags_name_themselves() {
        let e = config(&["--manifests", "/nonexistent/mcs", "--interface", "veth0"]).unwrap_err();
        assert_eq!(e.to_string(), "--manifests /nonexistent/mcs: not a directory");
        let e = config(&["--interface-pattern", "veth[", "--interface", "veth0"]).unwrap_err();
        assert!(e.to_string().starts_with("--interface-pattern \"veth[\": "), "{e}");
        let e = config(&["--interface", "veth0", "--socket-lb-exclude-cgroup", "/nonexistent/cg"]).unwrap_err();
        assert_eq!(e.to_string(), "--socket-lb-exclude-cgroup");
    }

    #[test]
    fn snat_ports_are_a_range_above_the_well_known_ports() {
        assert_eq!(port_range("61000-65535"), Ok((61000, 65535)));
        assert_eq!(port_range("2000-2000"), Ok((2000, 2000)));
        for bad in ["61000", "65535-61000", "80-90", "a-b", "61000-70000"] {
            assert!(port_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn external_flags_size_the_flows_from_outside_and_take_one_address_per_family() {
        let c = config(&["--interface", "veth0", "--external-interface", "eth0"]).unwrap();
        assert_eq!(c.sizes.xnat_conntrack, 65_536, "served: its own size");
        assert_eq!(c.external.snat.ports, (61000, 65535));
        let c = config(&["--interface", "veth0"]).unwrap();
        assert_eq!(c.sizes.xnat_conntrack, datapath::XNAT_TOKEN_SIZE, "not served: a token size");
        let e = config(&[
            "--external-interface",
            "eth0",
            "--external-snat-address",
            "10.0.0.1",
            "--external-snat-address",
            "10.0.0.2",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("one address per family"), "{e}");
        let e = config(&["--external-interface", "eth0", "--external-snat-address", "0.0.0.0"]).unwrap_err();
        assert!(e.to_string().starts_with("--external-snat-address 0.0.0.0"), "{e}");
        let e = config(&["--interface", "veth0", "--xdp-mode", "native"]).unwrap_err();
        assert!(e.to_string().contains("need --external-interface"), "{e}");
    }
}
