//! What an operator sees: `/metrics` and `mcs-agent inspect`, checked
//! against what the backends themselves saw.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use mcs_tests::{
    agent::{Agent, agent_binary, probe},
    bpffs::ScratchBpffs,
    manifests::{self, Port, endpoint_slice, service_import},
    topology::Clusterset,
    traffic::{Reply, Server, tcp_request, udp_request},
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const IMPORT_PORTS: &[Port<'static>] = &[("http", 80, "TCP"), ("dns", 53, "UDP")];
const SLICE_PORTS: &[Port<'static>] = &[("http", 8080, "TCP"), ("dns", 5353, "UDP")];

struct Lab {
    set: Clusterset,
    dir: tempfile::TempDir,
    state: tempfile::TempDir,
    bpffs: ScratchBpffs,
    _servers: Vec<Server>,
}

/// Two clusters of two pods; the node is in cluster-a, one of whose pods is
/// not ready: cluster-a's tier takes 70 % (1.4 × 1/2), cluster-b's the rest.
fn lab() -> Lab {
    let mut set = Clusterset::new(1, &["cluster-a", "cluster-b"]);
    let dir = tempfile::tempdir().unwrap();
    let mut servers = Vec::new();
    manifests::write(dir.path(), "web.yaml", &service_import("demo", "web", VIP, IMPORT_PORTS));
    manifests::write(dir.path(), "empty.yaml", &service_import("demo", "empty", EMPTY_VIP, &[("http", 80, "TCP")]));
    for cluster in &mut set.clusters {
        let (ips, serving) = cluster.add_serving_pods(2, 8080, 5353);
        servers.extend(serving);
        // cluster-a's second pod is not ready.
        let endpoints: Vec<(Ipv4Addr, bool)> =
            ips.iter().enumerate().map(|(k, ip)| (*ip, !(cluster.name == "cluster-a" && k == 1))).collect();
        let yaml = endpoint_slice("demo", "web", &cluster.name, SLICE_PORTS, &endpoints);
        manifests::write(dir.path(), &format!("web-{}.yaml", cluster.name), &yaml);
    }
    Lab { set, dir, state: tempfile::tempdir().unwrap(), bpffs: ScratchBpffs::new(), _servers: servers }
}

impl Lab {
    fn agent(&self) -> Agent {
        let (bpffs, state) = (self.bpffs.arg(), self.state.path().display().to_string());
        let args =
            ["--bpffs", &bpffs, "--state-dir", &state, "--cluster-id", "cluster-a", "--locality-tiers", "cluster,any"];
        Agent::start(&self.set.node, self.dir.path(), &self.set.client_ifaces(), &args)
    }

    fn inspect(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(agent_binary())
            .arg("inspect")
            .args(args)
            .args(["--bpffs", &self.bpffs.arg(), "--state-dir"])
            .arg(self.state.path())
            .output()
            .expect("running mcs-agent inspect")
    }

    fn inspect_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.inspect(&all);
        assert!(out.status.success(), "inspect {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("inspect -o json prints JSON")
    }
}

/// Sends `tcp` connections and `udp` requests through the VIP; per cluster,
/// how many each cluster's pods answered.
/// New flows per answering cluster, and per protocol. Every TCP connection
/// is new (a bare SYN on a reused port opens a fresh entry), but a UDP flow
/// is a client 5-tuple: the kernel picks UDP source ports at random, so 100
/// requests reuse one now and then (~18 % of runs), and a reused port while
/// its conntrack entry lives is the same flow, to the same backend.
struct Traffic {
    per_cluster: BTreeMap<String, u64>,
    tcp_flows: u64,
    udp_flows: u64,
}

fn traffic(lab: &Lab, tcp: usize, udp: usize) -> Traffic {
    let mut udp_ports: BTreeSet<SocketAddr> = BTreeSet::new();
    let mut per_cluster: BTreeMap<String, u64> = BTreeMap::new();
    let client = &lab.set.clients[0].ns;
    let mut count = |reply: Reply| {
        *per_cluster.entry(reply.identity.split('/').next().unwrap().to_owned()).or_default() += 1;
    };
    for _ in 0..tcp {
        count(tcp_request(client, SocketAddrV4::new(VIP, 80)).expect("TCP through the VIP"));
    }
    for _ in 0..udp {
        let reply = udp_request(client, SocketAddrV4::new(VIP, 53)).expect("UDP through the VIP");
        if udp_ports.insert(reply.local) {
            count(reply);
        }
    }
    Traffic { per_cluster, tcp_flows: tcp as u64, udp_flows: udp_ports.len() as u64 }
}

fn scrape(lab: &Lab) -> prometheus_parse::Scrape {
    let (code, body) = probe(&lab.set.node, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200, "{body}");
    // Prometheus naming: counters' samples end in _total, byte counters say
    // their unit, durations are in seconds.
    for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        if kind == "counter" {
            assert!(
                body.lines().any(|l| l.starts_with(&format!("{name}_total"))),
                "counter {name} without _total samples"
            );
        }
        assert!(!name.contains("milliseconds") && !name.contains("_ms"), "{name}: base units");
    }
    assert!(body.contains("mcs_agent_backend_bytes_total"), "bytes carry their unit");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("the exposition parses")
}

fn value(sample: &prometheus_parse::Sample) -> f64 {
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        _ => f64::NAN,
    }
}

/// Sum of `metric` over samples whose labels include every pair of `with`.
fn sum(scrape: &prometheus_parse::Scrape, metric: &str, with: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && with.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(value)
        .sum()
}

#[test]
fn metrics_count_per_cluster_and_tier_exactly_what_the_backends_saw() {
    let lab = lab();
    let _agent = lab.agent();
    let traffic = traffic(&lab, 200, 100);
    let seen = &traffic.per_cluster;
    assert!(seen.len() == 2, "both tiers served: {seen:?}");
    // No endpoints: refused by drop, counted.
    let client = &lab.set.clients[0].ns;
    let _ = client.run(|| {
        std::net::TcpStream::connect_timeout(&SocketAddrV4::new(EMPTY_VIP, 80).into(), Duration::from_millis(300))
    });

    let scrape = scrape(&lab);
    for sample in &scrape.samples {
        assert!(sample.metric.starts_with("mcs_agent_"), "unprefixed metric {}", sample.metric);
    }
    let new = "mcs_agent_backend_new_connections_total";
    for (cluster, tier) in [("cluster-a", "cluster"), ("cluster-b", "any")] {
        let counted = sum(&scrape, new, &[("service", "demo/web"), ("cluster", cluster), ("tier", tier)]);
        assert_eq!(counted, seen[cluster] as f64, "{cluster}: metrics vs what its pods answered ({seen:?})");
        let to = sum(&scrape, "mcs_agent_backend_packets_total", &[("cluster", cluster), ("direction", "to_backend")]);
        let from =
            sum(&scrape, "mcs_agent_backend_packets_total", &[("cluster", cluster), ("direction", "from_backend")]);
        assert!(to >= counted && from >= counted, "{cluster}: packets to {to}, from {from}, connections {counted}");
        assert!(sum(&scrape, "mcs_agent_backend_bytes_total", &[("cluster", cluster)]) > 0.0);
    }
    assert_eq!(
        sum(&scrape, "mcs_agent_frontend_new_connections_total", &[("service", "demo/web"), ("port", "80/TCP")]),
        traffic.tcp_flows as f64
    );
    assert_eq!(
        sum(&scrape, "mcs_agent_frontend_new_connections_total", &[("service", "demo/web"), ("port", "53/UDP")]),
        traffic.udp_flows as f64
    );
    let weight_a =
        sum(&scrape, "mcs_agent_backend_weight", &[("service", "demo/web"), ("port", "80/TCP"), ("tier", "cluster")]);
    assert!((weight_a - 0.7).abs() < 1e-6, "cluster tier's intended share: {weight_a}");
    assert!(
        sum(&scrape, "mcs_agent_frontend_drops_total", &[("service", "demo/empty"), ("reason", "no_backend")]) >= 1.0
    );
    assert!(sum(&scrape, "mcs_agent_datapath_drops_total", &[("reason", "no_backend")]) >= 1.0);
    assert_eq!(sum(&scrape, "mcs_agent_frontends", &[]), 3.0);
    assert_eq!(sum(&scrape, "mcs_agent_objects", &[("kind", "ServiceImport"), ("state", "valid")]), 2.0);
    assert_eq!(sum(&scrape, "mcs_agent_stale", &[]), 0.0);
    assert_eq!(sum(&scrape, "mcs_agent_interfaces_attached", &[]), 1.0);
    // Live flows as the conntrack collector's last pass counted them (it
    // walks the maps every 10 s, off the agent's loop): every UDP flow (each
    // was answered: 120 s of idle), and the TCP connections not yet 10 s
    // past their close.
    let (udp, all) = (traffic.udp_flows as f64, (traffic.tcp_flows + traffic.udp_flows) as f64);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut counted = sum(&scrape, "mcs_agent_map_entries", &[("map", "conntrack")]);
    while !(udp..=all).contains(&counted) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(250));
        counted = sum(&self::scrape(&lab), "mcs_agent_map_entries", &[("map", "conntrack")]);
    }
    assert!((udp..=all).contains(&counted), "conntrack counts {counted} flows; {udp} UDP and {all} in all were sent");
    assert!(sum(&scrape, "mcs_agent_map_capacity", &[("map", "conntrack")]) > 0.0);
    assert!(sum(&scrape, "mcs_agent_reconcile_duration_seconds_count", &[]) >= 1.0);
    assert!(sum(&scrape, "mcs_agent_last_reconcile_timestamp_seconds", &[]) > 1.7e9);
    assert!(
        scrape.samples.iter().any(|s| s.metric == "mcs_agent_build_info" && s.labels.get("layout_version").is_some())
    );
    // No pod addresses in labels unless asked for.
    assert!(scrape.samples.iter().all(|s| s.labels.get("backend").is_none()));
}

#[test]
fn inspect_shows_the_programmed_state_while_running_and_stopped() {
    let lab = lab();
    let agent = lab.agent();
    let seen = traffic(&lab, 40, 0).per_cluster;

    let services = lab.inspect_json(&["services"]);
    let web = services.as_array().unwrap().iter().find(|s| s["frontend"] == "10.96.0.10:80/TCP").expect("the frontend");
    assert_eq!(web["service"], "demo/web");
    assert_eq!(web["port_name"], "http");
    assert!(web["table_size"].as_u64().unwrap() > 0);
    let all = web["backends"].as_array().unwrap();
    let unready: Vec<&Value> = all.iter().filter(|b| b["condition"] == "not-ready").collect();
    assert_eq!(unready.len(), 1, "the unready pod is listed: {all:?}");
    assert_eq!(unready[0]["table_share"], 0.0, "and holds no slot");
    let backends: Vec<&Value> = all.iter().filter(|b| b["condition"] == "ready").collect();
    assert_eq!(backends.len(), 3, "the ready pods fill the table: {all:?}");
    let share: f64 = backends.iter().map(|b| b["table_share"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-9);
    for b in &backends {
        let (weight, table) = (b["weight"].as_f64().unwrap(), b["table_share"].as_f64().unwrap());
        assert!((weight - table).abs() < 0.01, "the table follows the weights: {b}");
        let tier = if b["cluster"] == "cluster-a" { "cluster" } else { "any" };
        assert_eq!(b["tier"], tier, "{b}");
    }
    let per_cluster = |cluster: &str| -> u64 {
        backends.iter().filter(|b| b["cluster"] == cluster).map(|b| b["new_connections"].as_u64().unwrap()).sum()
    };
    assert_eq!(per_cluster("cluster-a") + per_cluster("cluster-b"), 40);
    assert_eq!(per_cluster("cluster-a"), *seen.get("cluster-a").unwrap_or(&0));
    let empty =
        services.as_array().unwrap().iter().find(|s| s["frontend"] == "10.96.0.20:80/TCP").expect("empty frontend");
    assert_eq!(empty["table_size"], 0);

    let flows = lab.inspect_json(&["conntrack", "--service", "demo/web"]);
    let flows = flows.as_array().unwrap();
    assert_eq!(flows.len(), 40, "one entry per connection");
    assert!(
        flows
            .iter()
            .all(|f| f["vip"] == "10.96.0.10:80" && f["protocol"] == "TCP" && f["age_secs"].as_f64().unwrap() >= 0.0)
    );
    assert!(flows.iter().all(|f| f["state"] == "closed"), "both sides closed every connection: {:?}", flows[0]);
    assert!(lab.inspect_json(&["conntrack", "--service", "demo/other"]).as_array().unwrap().is_empty());
    let stats = lab.inspect_json(&["stats"]);
    let new_flow = stats.as_array().unwrap().iter().find(|s| s["event"] == "new_flow").unwrap();
    assert_eq!(new_flow["count"], 40);

    let text = String::from_utf8(lab.inspect(&["services"]).stdout).unwrap();
    assert!(text.contains("10.96.0.10:80/TCP  demo/web (http)") && text.contains("cluster-b"), "{text}");

    // Stopped, the datapath still serves and inspect still reads it.
    drop(agent);
    let again = lab.inspect_json(&["services"]);
    assert_eq!(again.as_array().unwrap().len(), 3);

    let empty = ScratchBpffs::new();
    let out = std::process::Command::new(agent_binary())
        .args(["inspect", "services", "--bpffs", &empty.arg()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no mcs-agent state is pinned"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Right after a change, `inspect services` shows the kernel's tables with
/// the names of the same generation: the running agent answers it. A pod
/// that turns ready is listed once, ready, with its cluster, tier and share
/// of the table (read from a state.json rewritten every 2 s, it was listed
/// twice: once from the table with no names, once as not ready with none).
/// Stopped, the agent leaves the names of what it left in the maps.
#[test]
fn inspect_right_after_a_change_names_what_the_kernel_holds() {
    let lab = lab();
    let mut agent = lab.agent();
    let rows = lab.inspect_json(&["services"]);
    let web = |rows: &Value| rows.as_array().unwrap().iter().find(|s| s["frontend"] == "10.96.0.10:80/TCP").cloned();
    let before = web(&rows).expect("the frontend");
    let first = before["generation"].as_u64().expect("the running agent answers, with its generation");
    let unready = before["backends"].as_array().unwrap().iter().find(|b| b["condition"] == "not-ready").cloned();
    let unready = unready.expect("cluster-a's unready pod");
    let cluster_a: Vec<(Ipv4Addr, bool)> = before["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["cluster"] == "cluster-a")
        .map(|b| (b["address"].as_str().unwrap().parse::<SocketAddrV4>().unwrap().ip().to_owned(), true))
        .collect();
    assert_eq!(cluster_a.len(), 2, "{before:#}");

    let generation = agent.generation();
    let yaml = endpoint_slice("demo", "web", "cluster-a", SLICE_PORTS, &cluster_a);
    manifests::write(lab.dir.path(), "web-cluster-a.yaml", &yaml);
    agent.wait_reconciled_after(generation);
    let after = web(&lab.inspect_json(&["services"])).expect("the frontend");
    assert!(after["generation"].as_u64().unwrap() > first, "a newer generation: {after:#}");
    let backends = after["backends"].as_array().unwrap();
    let addresses: BTreeSet<&str> = backends.iter().map(|b| b["address"].as_str().unwrap()).collect();
    assert_eq!(addresses.len(), backends.len(), "each backend once: {after:#}");
    let turned = backends.iter().find(|b| b["address"] == unready["address"]).expect("the pod that turned ready");
    assert_eq!(turned["condition"], "ready", "{turned:#}");
    assert_eq!(turned["cluster"], "cluster-a");
    assert_eq!(turned["tier"], "cluster");
    assert!(turned["backend_id"].as_u64().unwrap() > 0);
    // The kernel's table: all of it is held, and it follows the weights the names carry.
    let share: f64 = backends.iter().map(|b| b["table_share"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-9, "{after:#}");
    for b in backends {
        let (weight, table) = (b["weight"].as_f64().expect("named"), b["table_share"].as_f64().unwrap());
        assert!((weight - table).abs() < 0.01, "the table follows the weights: {b}");
    }
    let text = String::from_utf8(lab.inspect(&["services"]).stdout).unwrap();
    assert!(text.contains("(from the running agent, generation"), "{text}");

    // Stopped, the pinned maps answer, with no generation, named by the
    // state.json the agent wrote as it stopped.
    drop(agent);
    let stopped = web(&lab.inspect_json(&["services"])).expect("the frontend");
    assert!(stopped["generation"].is_null(), "{stopped:#}");
    assert_eq!(stopped["backends"].as_array().unwrap().len(), backends.len());
    let left = stopped["backends"].as_array().unwrap().iter().find(|b| b["address"] == unready["address"]).unwrap();
    assert_eq!(
        (&left["cluster"], &left["tier"], &left["condition"]),
        (&"cluster-a".into(), &"cluster".into(), &"ready".into()),
        "{left:#}"
    );
    let text = String::from_utf8(lab.inspect(&["services"]).stdout).unwrap();
    assert!(text.contains("named by the state.json the last agent left when it stopped at generation"), "{text}");
}

/// Kernel memory per map: `inspect maps` reads it for the pinned maps, and
/// the running agent reports the same in `mcs_agent_map_memory_bytes`.
#[test]
fn inspect_maps_and_metrics_give_the_kernel_memory_of_each_map() {
    let lab = lab();
    let _agent = lab.agent();
    let maps = lab.inspect_json(&["maps"]);
    let maps = maps.as_array().unwrap();
    let named = |name: &str| maps.iter().find(|m| m["map"] == name).unwrap_or_else(|| panic!("{name} in {maps:?}"));
    for name in ["SERVICES", "BACKENDS", "SELECTION", "CT", "HEALTH", "BACKEND_STATS"] {
        let m = named(name);
        assert!(m["max_entries"].as_u64().unwrap() > 0 && m["bytes"].as_u64().unwrap() > 0, "{m}");
    }
    // Two entries per flow: CT is twice the size of AFFINITY.
    assert_eq!(named("CT")["max_entries"].as_u64().unwrap(), 2 * named("AFFINITY")["max_entries"].as_u64().unwrap());
    let text = String::from_utf8(lab.inspect(&["maps"]).stdout).unwrap();
    assert!(text.contains("KERNEL MEMORY") && text.contains("total "), "{text}");

    let scrape = scrape(&lab);
    for name in ["SERVICES", "CT", "BACKEND_STATS"] {
        let reported = sum(&scrape, "mcs_agent_map_memory_bytes", &[("map", name)]);
        assert_eq!(reported, named(name)["bytes"].as_f64().unwrap(), "{name}: /metrics and inspect agree");
    }
}
