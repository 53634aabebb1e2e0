//! `/metrics`: what the datapath did, per ClusterSetIP, source cluster and
//! locality tier, and how the agent is doing. Kernel counters are read at
//! scrape time (per-CPU maps, summed); labels come from the [`Inventory`].
//!
//! Cardinality: every label is bounded by what is programmed (imports,
//! ports, clusters, zones, tiers); the `backend` label (pod IP:port) only
//! with `--metrics-backend-label`.
//!
//! Paths: the per-frontend and per-backend counters without a `path` label
//! are the pod paths' (TC, socket-level load balancing); the same series
//! with `path="xdp"` count flows from outside the node (`--external-interface`),
//! and exist only where those counters are not all zero (a node without
//! external interfaces pays nothing for them).

use std::{
    collections::BTreeSet,
    sync::atomic::AtomicU64,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mcs_common::{BackendStats, ServiceStats, Stat};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
    registry::{Registry, Unit},
};

use crate::inventory::FrontendInfo;

type Labels = Vec<(String, String)>;

/// Metrics the agent keeps between scrapes.
#[derive(Clone)]
pub struct AgentMetrics {
    reconcile_seconds: Histogram,
    reconcile_failures: Counter,
    last_reconcile: Gauge<f64, AtomicU64>,
    sockets_terminated: Counter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            // 100 µs to ~26 s.
            reconcile_seconds: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 4.0, 10,
            )),
            reconcile_failures: Counter::default(),
            last_reconcile: Gauge::default(),
            sockets_terminated: Counter::default(),
        }
    }
}

impl AgentMetrics {
    pub fn reconciled(&self, took: Duration) {
        self.reconcile_seconds.observe(took.as_secs_f64());
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.last_reconcile.set(now.as_secs_f64());
    }

    pub fn reconcile_failed(&self) {
        self.reconcile_failures.inc();
    }

    pub fn sockets_terminated(&self, n: u64) {
        self.sockets_terminated.inc_by(n);
    }
}

/// What the agent knows of itself at scrape time.
#[derive(Clone, Debug, Default)]
pub struct AgentView {
    pub version: String,
    pub attach_mode: String,
    pub stale: bool,
    pub interfaces: usize,
    /// (kind, state "valid"/"invalid", count)
    pub objects: Vec<(&'static str, &'static str, u64)>,
    /// (map, entries used, capacity)
    pub fill: Vec<(&'static str, u64, u64)>,
    /// Passive health ejections since the agent started.
    pub ejections: u64,
    /// Times the maps grew since the agent started (see [`crate::growth`]).
    pub map_growths: u64,
    /// Backends passive health cannot watch (their id is past the HEALTH
    /// map, which covers `--max-backends`: a guard that stays 0).
    pub health_unwatched: u64,
    /// Problems offered for Kubernetes Events, by outcome (published,
    /// failed, other_node, rate_limited, dropped).
    pub events: Vec<(&'static str, u64)>,
    /// The conntrack collector (when on): flows expired since the start,
    /// and its last pass's duration in seconds.
    pub conntrack_gc: Option<(u64, f64)>,
    /// Socket-level load balancing is attached (to this cgroup).
    pub socket_lb: bool,
    /// External interfaces served by XDP, with the mode (`native`, `generic`).
    pub xdp: Vec<(String, &'static str)>,
    /// Kernel memory charged for each of the agent's maps (read at start
    /// and after each growth).
    pub map_memory: Vec<crate::datapath::memory::MapMemory>,
}

/// Kernel counters, read on demand.
pub struct Kernel<'a> {
    /// The pod paths' (TC, socket-level load balancing) counters of a
    /// backend or service id (`None`: the id has none).
    pub backend: &'a dyn Fn(u32) -> Option<BackendStats>,
    pub service: &'a dyn Fn(u32) -> Option<ServiceStats>,
    /// The same for flows from outside the node (XDP); an agent without
    /// external interfaces may answer `None` without reading them.
    pub xdp_backend: &'a dyn Fn(u32) -> Option<BackendStats>,
    pub xdp_service: &'a dyn Fn(u32) -> Option<ServiceStats>,
    pub datapath: Vec<(Stat, u64)>,
}

/// The `path` label of the XDP path's series.
const PATH_XDP: (&str, &str) = ("path", "xdp");

/// One backend's counters into the three backend families, under `base`
/// and `path` (none: the pod paths).
fn count_backend(
    families: [&Family<Labels, Counter>; 3],
    base: &Labels,
    path: Option<(&str, &str)>,
    stats: BackendStats,
) {
    let [new_flows, packets, bytes] = families;
    let with_path = |mut l: Labels| {
        l.extend(path.map(|(k, v)| (k.to_owned(), v.to_owned())));
        l
    };
    new_flows.get_or_create(&with_path(base.clone())).inc_by(stats.new_flows);
    for (direction, p, b) in
        [("to_backend", stats.packets_to, stats.bytes_to), ("from_backend", stats.packets_from, stats.bytes_from)]
    {
        let mut l = base.clone();
        l.push(("direction".into(), direction.into()));
        let l = with_path(l);
        packets.get_or_create(&l).inc_by(p);
        bytes.get_or_create(&l).inc_by(b);
    }
}

/// Drops, by reason: the datapath events that lose a packet.
fn drop_reason(stat: Stat) -> Option<&'static str> {
    match stat {
        Stat::NoBackend => Some("no_backend"),
        Stat::CtInsertFailed => Some("conntrack_insert_failed"),
        Stat::RewriteFailed => Some("rewrite_failed"),
        Stat::XdpNoBackend => Some("no_backend"),
        Stat::XdpMidstream => Some("xdp_midstream_miss"),
        Stat::SnatExhausted => Some("snat_exhausted"),
        Stat::XdpUnroutable => Some("xdp_unroutable"),
        _ => None,
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// The exposition text (OpenMetrics, which Prometheus reads).
pub fn render(
    agent: &AgentMetrics,
    view: &AgentView,
    frontends: impl IntoIterator<Item = FrontendInfo>,
    kernel: &Kernel<'_>,
    backend_label: bool,
) -> String {
    let mut registry = Registry::with_prefix("mcs_agent");

    let new_flows = Family::<Labels, Counter>::default();
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let weight = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let frontend_flows = Family::<Labels, Counter>::default();
    let frontend_drops = Family::<Labels, Counter>::default();
    let frontend_backends = Family::<Labels, Gauge>::default();
    let ejected = Family::<Labels, Gauge>::default();
    // A backend id shared by two frontends is counted once, under the first.
    let mut counted = BTreeSet::new();
    // One frontend described at a time: the whole inventory at once was
    // 2.4 KiB per service per scrape (235 MiB at 100,000 services).
    let mut programmed = 0;
    for frontend in frontends {
        programmed += 1;
        let port = format!("{}/{}", frontend.port, frontend.protocol);
        let service = &frontend.service;
        if let Some(stats) = (kernel.service)(frontend.service_id) {
            let l = labels(&[("service", service), ("port", &port)]);
            frontend_flows.get_or_create(&l).inc_by(stats.new_flows);
            frontend_drops
                .get_or_create(&labels(&[("service", service), ("port", &port), ("reason", "no_backend")]))
                .inc_by(stats.no_backend);
        }
        let xdp = (kernel.xdp_service)(frontend.service_id).filter(|s| *s != ServiceStats::default());
        if let Some(stats) = xdp {
            frontend_flows
                .get_or_create(&labels(&[("service", service), ("port", &port), PATH_XDP]))
                .inc_by(stats.new_flows);
            frontend_drops
                .get_or_create(&labels(&[("service", service), ("port", &port), ("reason", "no_backend"), PATH_XDP]))
                .inc_by(stats.no_backend);
        }
        let serving = frontend.backends.iter().filter(|b| b.backend_id.is_some()).count();
        frontend_backends.get_or_create(&labels(&[("service", service), ("port", &port)])).set(serving as i64);
        for backend in &frontend.backends {
            let cluster = backend.cluster.as_deref().unwrap_or("");
            let zone = backend.zone.as_deref().unwrap_or("");
            if backend.health == "ejected" {
                let l = labels(&[("service", service), ("port", &port), ("cluster", cluster), ("zone", zone)]);
                ejected.get_or_create(&l).inc();
            }
            let Some(id) = backend.backend_id else { continue };
            let mut base = labels(&[
                ("service", service),
                ("port", &port),
                ("cluster", cluster),
                ("zone", zone),
                ("tier", &backend.tier),
            ]);
            if backend_label {
                base.push(("backend".into(), format!("{}:{}", backend.ip, backend.port)));
            }
            weight.get_or_create(&base).set(weight.get_or_create(&base).get() + backend.weight);
            if !counted.insert(id) {
                continue;
            }
            if let Some(stats) = (kernel.backend)(id) {
                count_backend([&new_flows, &packets, &bytes], &base, None, stats);
            }
            if let Some(stats) = (kernel.xdp_backend)(id).filter(|s| *s != BackendStats::default()) {
                count_backend([&new_flows, &packets, &bytes], &base, Some(PATH_XDP), stats);
            }
        }
    }
    registry.register(
        "backend_new_connections",
        "New connections (TCP) and flows (UDP) sent to backends, by ClusterSetIP, source cluster, zone and tier; without path: from pods and the node (TC, socket-level load balancing), path=xdp: from outside the node",
        new_flows,
    );
    registry.register(
        "backend_packets",
        "Packets to and from backends, by ClusterSetIP, source cluster, zone and tier; without path: the pod paths (TC, socket-level load balancing), path=xdp: flows from outside the node",
        packets,
    );
    registry.register_with_unit(
        "backend",
        "IP bytes to and from backends, by ClusterSetIP, source cluster, zone and tier; without path: the pod paths (TC, socket-level load balancing), path=xdp: flows from outside the node",
        Unit::Bytes,
        bytes,
    );
    registry.register(
        "backend_ejected",
        "Backends passive health ejected (no new connections), by ClusterSetIP port, source cluster and zone",
        ejected,
    );
    let ejections = Counter::<u64>::default();
    ejections.inc_by(view.ejections);
    registry.register("outlier_ejections", "Passive health ejections since the agent started", ejections);
    let growths = Counter::<u64>::default();
    growths.inc_by(view.map_growths);
    registry.register(
        "map_growths",
        "Times the datapath moved to larger maps (frontends, backends or selection slots past 7/8 full) since the agent started",
        growths,
    );
    let unwatched = Gauge::<i64>::default();
    unwatched.set(i64::try_from(view.health_unwatched).unwrap_or(i64::MAX));
    registry.register(
        "outlier_unwatched_backends",
        "Backends passive health does not watch: their id is past the HEALTH map's size, which covers --max-backends (stays 0)",
        unwatched,
    );
    let events = Family::<Labels, Counter>::default();
    for (outcome, count) in &view.events {
        events.get_or_create(&labels(&[("outcome", outcome)])).inc_by(*count);
    }
    registry.register(
        "events",
        "Problems with objects offered as Kubernetes Events, by outcome: published, failed, other_node (another node reports the object), rate_limited, dropped (queue full)",
        events,
    );
    if let Some((expired, pass_secs)) = view.conntrack_gc {
        let counter = Counter::<u64>::default();
        counter.inc_by(expired);
        registry.register(
            "conntrack_expired",
            "Flows the conntrack collector removed as idle past their timeout",
            counter,
        );
        let gauge = Gauge::<f64, AtomicU64>::default();
        gauge.set(pass_secs);
        registry.register(
            "conntrack_gc_duration_seconds",
            "How long the conntrack collector's last pass over both maps took",
            gauge,
        );
    }
    let socket_lb = Gauge::<i64>::default();
    socket_lb.set(i64::from(view.socket_lb));
    registry.register(
        "socket_lb_attached",
        "1 while socket-level load balancing is attached for pods (connect/sendmsg translated at the socket)",
        socket_lb,
    );
    registry.register(
        "backend_weight",
        "Intended share of a frontend's new connections (0-1), by source cluster, zone and tier: spill-over shows here",
        weight,
    );
    registry.register(
        "frontend_new_connections",
        "New connections and flows per ClusterSetIP port; without path: the pod paths (TC, socket-level load balancing), path=xdp: from outside the node",
        frontend_flows,
    );
    registry.register(
        "frontend_drops",
        "Packets to a ClusterSetIP port dropped, by reason; without path: the pod paths (TC, socket-level load balancing), path=xdp: from outside the node",
        frontend_drops,
    );
    registry.register(
        "frontend_backends",
        "Backends receiving new connections per ClusterSetIP port",
        frontend_backends,
    );

    let events = Family::<Labels, Counter>::default();
    let drops = Family::<Labels, Counter>::default();
    for (stat, value) in &kernel.datapath {
        events.get_or_create(&labels(&[("event", stat.name())])).inc_by(*value);
        if let Some(reason) = drop_reason(*stat) {
            drops.get_or_create(&labels(&[("reason", reason)])).inc_by(*value);
        }
    }
    registry.register(
        "datapath_events",
        "Datapath events on every attached interface (see `mcs-agent inspect stats`)",
        events,
    );
    registry.register("datapath_drops", "Packets the datapath dropped, by reason", drops);

    registry.register(
        "reconcile_duration_seconds",
        "Time to read, decide and write one reconcile pass",
        agent.reconcile_seconds.clone(),
    );
    registry.register(
        "reconcile_failures",
        "Reconcile passes whose map writes failed (retried)",
        agent.reconcile_failures.clone(),
    );
    registry.register(
        "sockets_terminated",
        "Sockets ended because their backend left the service (socket-level load balancing)",
        agent.sockets_terminated.clone(),
    );
    registry.register(
        "last_reconcile_timestamp_seconds",
        "Unix time of the last successful reconcile pass",
        agent.last_reconcile.clone(),
    );
    let objects = Family::<Labels, Gauge>::default();
    for (kind, state, count) in &view.objects {
        objects.get_or_create(&labels(&[("kind", kind), ("state", state)])).set(*count as i64);
    }
    registry.register("objects", "ServiceImports and EndpointSlices seen, valid or invalid (skipped)", objects);
    let frontends = Gauge::<i64>::default();
    frontends.set(programmed);
    registry.register("frontends", "Frontends (ClusterSetIP:port/protocol) programmed", frontends);
    let entries = Family::<Labels, Gauge>::default();
    let capacity = Family::<Labels, Gauge>::default();
    for (map, used, cap) in &view.fill {
        entries.get_or_create(&labels(&[("map", map)])).set(*used as i64);
        capacity.get_or_create(&labels(&[("map", map)])).set(*cap as i64);
    }
    registry.register("map_entries", "Entries in use in a datapath map (selection: slots)", entries);
    let memory = Family::<Labels, Gauge>::default();
    for m in &view.map_memory {
        memory.get_or_create(&labels(&[("map", &m.map)])).set(m.bytes as i64);
    }
    registry.register_with_unit(
        "map_memory",
        "Kernel memory charged for a BPF map of the agent (per-CPU maps: every CPU's copy)",
        Unit::Bytes,
        memory,
    );
    registry.register("map_capacity", "Capacity of a datapath map (selection: slots)", capacity);
    let stale = Gauge::<i64>::default();
    stale.set(i64::from(view.stale));
    registry.register(
        "stale",
        "1 while a watch of the Kubernetes API fails (the datapath keeps its last good state)",
        stale,
    );
    let xdp = Family::<Labels, Gauge>::default();
    for (iface, mode) in &view.xdp {
        xdp.get_or_create(&labels(&[("interface", iface), ("mode", mode)])).set(1);
    }
    registry.register(
        "xdp_attached",
        "1 for each external interface whose XDP program serves ClusterSetIP traffic from outside, by mode (native: in the driver; generic: in the stack)",
        xdp,
    );
    let interfaces = Gauge::<i64>::default();
    interfaces.set(view.interfaces as i64);
    registry.register("interfaces_attached", "Interfaces with the agent's programs attached", interfaces);
    let layout = mcs_common::LAYOUT_VERSION.to_string();
    registry.register(
        "build",
        "The agent's version, map layout version and attach mode",
        Info::new(labels(&[
            ("version", &view.version),
            ("layout_version", &layout),
            ("attach_mode", &view.attach_mode),
        ])),
    );

    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::BackendInfo;

    fn frontend() -> FrontendInfo {
        let backend = |id: u32, ip: &str| BackendInfo {
            ip: ip.parse().unwrap(),
            port: 8080,
            backend_id: Some(id),
            cluster: Some("a".into()),
            zone: None,
            region: None,
            tier: "any".into(),
            weight: 0.5,
            condition: "ready".into(),
            health: "healthy".into(),
        };
        FrontendInfo {
            vip: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: "TCP".into(),
            service: "demo/web".into(),
            port_name: "http".into(),
            service_id: 1,
            table_size: 251,
            affinity_timeout_secs: 0,
            tiers: vec!["any".into()],
            backends: vec![backend(1, "10.10.0.1"), backend(2, "10.10.0.2")],
        }
    }

    fn stats(new_flows: u64) -> BackendStats {
        BackendStats { new_flows, packets_to: 10 * new_flows, bytes_to: 0, packets_from: 0, bytes_from: 0 }
    }

    /// The sample lines (no comments) of one rendering, with backend 1
    /// counted `xdp` times on the XDP path and backend 2 never.
    fn samples(xdp: u64) -> Vec<String> {
        let kernel = Kernel {
            backend: &|id| Some(stats(u64::from(id))),
            service: &|_| Some(ServiceStats { new_flows: 3, no_backend: 1 }),
            xdp_backend: &|id| Some(if id == 1 { stats(xdp) } else { BackendStats::default() }),
            xdp_service: &|_| Some(ServiceStats { new_flows: xdp, no_backend: 0 }),
            datapath: Vec::new(),
        };
        let text = render(&AgentMetrics::default(), &AgentView::default(), [frontend()], &kernel, false);
        text.lines().filter(|l| !l.starts_with('#')).map(str::to_owned).collect()
    }

    #[test]
    fn the_pod_paths_series_keep_their_labels_and_the_xdp_path_adds_its_own() {
        let lines = samples(7);
        let has = |line: &str| assert!(lines.iter().any(|l| l == line), "{line} in:\n{}", lines.join("\n"));
        // The pod paths (TC, socket), without a path label, as before.
        has(r#"mcs_agent_frontend_new_connections_total{service="demo/web",port="80/TCP"} 3"#);
        has(r#"mcs_agent_frontend_drops_total{service="demo/web",port="80/TCP",reason="no_backend"} 1"#);
        // Both backends have these labels: 1 + 2.
        has(
            r#"mcs_agent_backend_new_connections_total{service="demo/web",port="80/TCP",cluster="a",zone="",tier="any"} 3"#,
        );
        // Flows from outside: the same labels and path="xdp".
        has(r#"mcs_agent_frontend_new_connections_total{service="demo/web",port="80/TCP",path="xdp"} 7"#);
        has(r#"mcs_agent_frontend_drops_total{service="demo/web",port="80/TCP",reason="no_backend",path="xdp"} 0"#);
        has(
            r#"mcs_agent_backend_new_connections_total{service="demo/web",port="80/TCP",cluster="a",zone="",tier="any",path="xdp"} 7"#,
        );
        has(
            r#"mcs_agent_backend_packets_total{service="demo/web",port="80/TCP",cluster="a",zone="",tier="any",direction="to_backend",path="xdp"} 70"#,
        );
        has(
            r#"mcs_agent_backend_bytes_total{service="demo/web",port="80/TCP",cluster="a",zone="",tier="any",direction="from_backend",path="xdp"} 0"#,
        );
    }

    #[test]
    fn xdp_series_are_left_out_where_their_counters_are_all_zero() {
        let lines = samples(0);
        assert!(lines.iter().all(|l| !l.contains("path=")), "{}", lines.join("\n"));
        // Backend 2's XDP counters are zero: one series of both
        // backends' labels per path.
        let xdp = samples(5);
        let backend = xdp.iter().filter(|l| l.starts_with("mcs_agent_backend_new_connections_total{")).count();
        assert_eq!(backend, 2, "one pod-path series and one xdp series: {xdp:#?}");
    }
}
