//! `cargo xtask demo`: a two-cluster clusterset in namespaces, the agent on
//! the example manifests, and real traffic to the ClusterSetIP.
//!
//! `mcs-demo --agent PATH [--requests N]` (as root). A binary of the lab crate
//! rather than code in xtask: xtask must build on a bare machine, before
//! `cargo xtask setup` has installed what the agent's eBPF object needs.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use mcs_tests::{
    agent::{Agent, probe},
    bpffs::ScratchBpffs,
    manifests::{self, ZonedEndpoint, endpoint_slice_zoned},
    netns::Netns,
    topology::Clusterset,
    traffic::{Server, tcp_request, udp_request},
};

/// The embedded default: deploy/examples, whose addresses match the topology below.
const EXAMPLES: &[(&str, &str)] = &[
    ("web-serviceimport.yaml", include_str!("../../../deploy/examples/web-serviceimport.yaml")),
    ("web-cluster-east.yaml", include_str!("../../../deploy/examples/web-cluster-east.yaml")),
    ("web-cluster-west.yaml", include_str!("../../../deploy/examples/web-cluster-west.yaml")),
    ("headless-serviceimport.yaml", include_str!("../../../deploy/examples/headless-serviceimport.yaml")),
];
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const CLUSTERS: [&str; 2] = ["cluster-east", "cluster-west"];
/// Pods per cluster and their zones, as in deploy/examples.
const PODS: [&[&str]; 2] = [&["east-1a", "east-1a", "east-1b"], &["west-1a", "west-1a"]];
/// Where the demo's node (and so its client pod) is.
/// The demo cleans up after itself: a production agent leaves the datapath
/// serving when it stops (`mcs-agent uninstall` removes it).
const NODE: [&str; 7] = ["--cluster-id", "cluster-east", "--zone", "east-1a", "--region", "east", "--cleanup-on-exit"];
const PORTS: [(&str, u16, &str); 3] = [("http", 8080, "TCP"), ("dns", 5353, "UDP"), ("tcp2", 42, "TCP")];

#[derive(Debug, Parser)]
#[command(
    name = "mcs-demo",
    about = "A two-cluster clusterset in network namespaces with mcs-agent serving it (as root)"
)]
struct Args {
    /// The mcs-agent binary to run.
    #[arg(long)]
    agent: PathBuf,
    /// TCP requests to send in each round.
    #[arg(long, default_value_t = 300)]
    requests: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    run(&args.agent, args.requests)
}

fn run(agent_binary: &Path, requests: usize) -> Result<()> {
    println!("\n== mcs-agent demo: a clusterset of {} clusters in network namespaces", CLUSTERS.len());
    let mut set = Clusterset::new(1, &CLUSTERS);
    let mut servers = Vec::new();
    let mut pods: Vec<Vec<(Ipv4Addr, &str)>> = Vec::new();
    for (cluster, zones) in set.clusters.iter_mut().zip(PODS) {
        let mut ips = Vec::new();
        for zone in zones {
            let ip = cluster.add_pod();
            for port in [8080, 42] {
                servers.push(Server::tcp(&cluster.ns, ip, port, &format!("{}/{ip}:{port}", cluster.name)));
            }
            servers.push(Server::udp(&cluster.ns, ip, 5353, &format!("{}/{ip}:5353", cluster.name)));
            ips.push((ip, *zone));
        }
        let listing: Vec<String> = ips.iter().map(|(ip, zone)| format!("{ip} ({zone})")).collect();
        println!("   {:<13} pods {}   (netns {})", cluster.name, listing.join(", "), cluster.ns.name());
        pods.push(ips);
    }
    let client = &set.clients[0];
    println!(
        "   client pod    {}   (netns {}) behind node interface {}",
        client.ip,
        client.ns.name(),
        client.node_iface
    );
    println!(
        "   node          netns {} runs mcs-agent as a node of cluster-east, zone east-1a, region east; pod IPs are routed flat, no SNAT",
        set.node.name()
    );

    let dir = tempfile::tempdir().context("manifests directory")?;
    for (name, yaml) in EXAMPLES {
        manifests::write(dir.path(), name, yaml);
    }
    println!(
        "   manifests     deploy/examples: ServiceImport demo/web, ClusterSetIP {VIP}, ports http 80/TCP, dns 53/UDP, tcp2 4242/TCP"
    );

    // Pins on a bpffs of the demo's own, so `mcs-agent inspect` can read them
    // from here (`ip netns exec` gives the agent a private /sys).
    let bpffs = ScratchBpffs::new();
    let state = tempfile::tempdir().context("state directory")?;
    let mut args: Vec<String> = NODE.iter().map(|s| (*s).to_owned()).collect();
    args.extend(["--bpffs".into(), bpffs.arg(), "--state-dir".into(), state.path().display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let mut agent = Agent::start_binary(agent_binary, &set.node, dir.path(), &set.client_ifaces(), &args);
    println!("   agent ready in {:.0?}: {}", started.elapsed(), agent_mode(&agent));

    let ns = &client.ns;
    println!(
        "   locality tiers zone,region,any: a tier takes min(100%, 1.4 x ready/total) of new connections, the rest spills on"
    );
    println!("\n[1] {requests} TCP connections to {VIP}:80 (connect, request, reply, close), everything ready");
    tcp_round(ns, client.ip, SocketAddrV4::new(VIP, 80), requests)?;

    println!("\n[2] {} UDP requests to {VIP}:53", requests / 3);
    let mut answers = Answers::default();
    for _ in 0..requests / 3 {
        let reply = udp_request(ns, SocketAddrV4::new(VIP, 53)).context("UDP through the ClusterSetIP")?;
        ensure!(reply.reply_from == SocketAddr::V4(SocketAddrV4::new(VIP, 53)), "reply not from the VIP");
        answers.add(&reply.identity);
    }
    answers.print();

    println!("\n[3] named port: VIP port tcp2/4242 maps to the slices' tcp2, pod port 42");
    let mut answers = Answers::default();
    for _ in 0..20 {
        answers.add(&tcp_request(ns, SocketAddrV4::new(VIP, 4242)).context("tcp2")?.identity);
    }
    answers.print();

    let east = |ready: [bool; 3]| {
        let endpoints: Vec<ZonedEndpoint<'_>> =
            pods[0].iter().zip(ready).map(|((ip, zone), ready)| ZonedEndpoint { ip: *ip, ready, zone }).collect();
        endpoint_slice_zoned("demo", "web", "cluster-east", Some("east"), &PORTS, &endpoints)
    };
    for (step, title, ready) in [
        (
            "[4]",
            "one of the two east-1a pods turns unready: zone tier health 1.4 x 1/2 = 70%, 30% spills to the region",
            [true, false, true],
        ),
        (
            "[5]",
            "all of cluster-east turns unready: everything fails over to the next tier, cluster-west",
            [false, false, false],
        ),
    ] {
        println!("\n{step} {title}");
        let generation = agent.generation();
        let changed = Instant::now();
        manifests::write(dir.path(), "web-cluster-east.yaml", &east(ready));
        agent.wait_reconciled_after(generation);
        println!(
            "    file change to programmed datapath: {:.0?} (including the agent's 100 ms debounce window)",
            changed.elapsed()
        );
        tcp_round(ns, client.ip, SocketAddrV4::new(VIP, 80), requests)?;
    }

    println!("\n[6] what the agent shows an operator: `mcs-agent inspect services`");
    let inspect = std::process::Command::new(agent_binary)
        .args(["inspect", "services", "--bpffs", &bpffs.arg(), "--state-dir"])
        .arg(state.path())
        .output()
        .context("running mcs-agent inspect")?;
    ensure!(inspect.status.success(), "inspect failed: {}", String::from_utf8_lossy(&inspect.stderr));
    for line in String::from_utf8_lossy(&inspect.stdout).lines() {
        println!("    {line}");
    }
    // What it shows is what the kernel holds, named: each backend once, every
    // one in the table with its cluster and tier, and the table whole.
    let json = std::process::Command::new(agent_binary)
        .args(["inspect", "services", "-o", "json", "--bpffs", &bpffs.arg(), "--state-dir"])
        .arg(state.path())
        .output()
        .context("running mcs-agent inspect -o json")?;
    let rows: serde_json::Value = serde_json::from_slice(&json.stdout).context("inspect -o json")?;
    for row in rows.as_array().context("inspect -o json: an array")? {
        let backends = row["backends"].as_array().context("a row's backends")?;
        let addresses: std::collections::BTreeSet<&str> =
            backends.iter().filter_map(|b| b["address"].as_str()).collect();
        ensure!(addresses.len() == backends.len(), "inspect lists a backend twice: {row}");
        ensure!(!row["generation"].is_null(), "the running agent answers inspect: {row}");
        let held: Vec<&serde_json::Value> =
            backends.iter().filter(|b| b["table_share"].as_f64().unwrap_or(0.0) > 0.0).collect();
        ensure!(held.iter().all(|b| b["cluster"].is_string() && b["tier"] != "-"), "unnamed backends in {row}");
        let share: f64 = held.iter().filter_map(|b| b["table_share"].as_f64()).sum();
        ensure!(held.is_empty() || (share - 1.0).abs() < 1e-9, "the table is not whole: {row}");
    }
    println!("\n    and a few lines of its /metrics (new connections by source cluster and tier, drops):");
    let (_, metrics) = probe(&set.node, "/metrics").context("scraping /metrics")?;
    for line in metrics.lines().filter(|l| {
        (l.starts_with("mcs_agent_backend_new_connections_total{") && l.contains("port=\"80/TCP\""))
            || l.starts_with("mcs_agent_datapath_drops_total")
            || l.starts_with("mcs_agent_frontend_backends{")
    }) {
        println!("    {line}");
    }

    println!("\n[7] the ServiceImport is deleted");
    let generation = agent.generation();
    manifests::remove(dir.path(), "web-serviceimport.yaml");
    agent.wait_reconciled_after(generation);
    match tcp_request(ns, SocketAddrV4::new(VIP, 80)) {
        Ok(reply) => bail!("the VIP still answered after the import was deleted: {reply:?}"),
        Err(e) => println!("    {VIP}:80 no longer answers: {e}"),
    }

    let (clean, logs) = agent.stop();
    let counters = logs.iter().find_map(|l| l.split("counters=").nth(1)).unwrap_or("(not reported)");
    println!("\nagent stopped {}; kernel counters: {counters}", if clean { "cleanly" } else { "with an error" });
    drop(servers);
    drop(set);
    println!("cleaned up: namespaces deleted, programs detached, nothing pinned\n");
    ensure!(clean, "the agent did not exit cleanly:\n{}", logs.join("\n"));
    Ok(())
}

fn agent_mode(agent: &Agent) -> String {
    agent.logs().iter().find(|l| l.contains("attached")).cloned().unwrap_or_default()
}

fn tcp_round(ns: &Netns, client: Ipv4Addr, target: SocketAddrV4, n: usize) -> Result<()> {
    let mut answers = Answers::default();
    let started = Instant::now();
    for _ in 0..n {
        let reply = tcp_request(ns, target).context("TCP through the ClusterSetIP")?;
        ensure!(reply.reply_from == SocketAddr::V4(target), "getpeername said {}, not the VIP", reply.reply_from);
        ensure!(reply.peer_seen.ip() == client, "the backend saw {}, not the client", reply.peer_seen);
        answers.add(&reply.identity);
    }
    answers.print();
    let elapsed = started.elapsed().max(Duration::from_millis(1));
    println!(
        "    every reply came from {target} as the client saw it; every backend saw the client as {client} ({:.0} connections/s, unoptimised demo loop)",
        n as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

/// The tier of a demo pod as seen from the demo's node (east-1a, region east).
fn tier_of(pod: &str) -> &'static str {
    match pod.split(':').next().unwrap_or_default() {
        "10.10.0.1" | "10.10.0.2" => "zone",
        "10.10.0.3" => "region",
        _ => "any",
    }
}

#[derive(Default)]
struct Answers(BTreeMap<String, usize>);

impl Answers {
    fn add(&mut self, identity: &str) {
        *self.0.entry(identity.to_owned()).or_default() += 1;
    }

    fn print(&self) {
        let total: usize = self.0.values().sum();
        println!("    {:<14} {:<20} {:<8} {:>8} {:>7}", "cluster", "pod", "tier", "answers", "share");
        for (identity, count) in &self.0 {
            let (cluster, pod) = identity.split_once('/').unwrap_or(("?", identity));
            let share = 100.0 * *count as f64 / total.max(1) as f64;
            println!("    {cluster:<14} {pod:<20} {:<8} {count:>8} {share:>6.1}%", tier_of(pod));
        }
    }
}
