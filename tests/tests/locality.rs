//! Locality-aware selection with real connections: three clusters in two
//! regions, a client in zone r1-a of cluster-a.
//!
//! | cluster   | region | zone | pods |
//! |-----------|--------|------|------|
//! | cluster-a | r1     | r1-a | a1, a2 (the client's zone) |
//! | cluster-b | r1     | r1-b | b1, b2 |
//! | cluster-c | r2     | r2-a | c1, c2 (region from `--cluster-region`) |
//!
//! Shares are measured over many connections; the hash of each connection's
//! ephemeral port picks a Maglev slot, so the split follows the table within
//! sampling noise. Tolerances are stated per assertion (about 4 standard
//! deviations of a binomial at that sample size).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use mcs_tests::{
    agent::Agent,
    manifests::{self, Port, ZonedEndpoint, endpoint_slice_zoned, service_import_with},
    topology::Clusterset,
    traffic::{Connection, Server, tcp_request},
};
use tempfile::TempDir;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const IMPORT_PORTS: &[Port<'static>] = &[("http", 80, "TCP")];
const SLICE_PORTS: &[Port<'static>] = &[("http", 8080, "TCP")];
const CLUSTERS: [(&str, Option<&str>, &str); 3] =
    [("cluster-a", Some("r1"), "r1-a"), ("cluster-b", Some("r1"), "r1-b"), ("cluster-c", None, "r2-a")];
const NODE_FLAGS: &[&str] =
    &["--cluster-id", "cluster-a", "--zone", "r1-a", "--region", "r1", "--cluster-region", "cluster-c=r2"];

struct Lab {
    set: Clusterset,
    dir: TempDir,
    /// cluster -> its pods
    pods: BTreeMap<&'static str, Vec<Ipv4Addr>>,
    _servers: Vec<Server>,
}

impl Lab {
    fn new() -> Self {
        let mut set = Clusterset::new(1, &CLUSTERS.map(|(name, _, _)| name));
        let mut pods = BTreeMap::new();
        let mut servers = Vec::new();
        for (cluster, (name, _, _)) in set.clusters.iter_mut().zip(CLUSTERS) {
            let ips: Vec<Ipv4Addr> = (1..=2)
                .map(|k| {
                    let ip = cluster.add_pod();
                    let id = format!("{}{k}", &name[name.len() - 1..]);
                    servers.push(Server::tcp(&cluster.ns, ip, 8080, &id));
                    ip
                })
                .collect();
            pods.insert(name, ips);
        }
        let lab = Self { set, dir: tempfile::tempdir().unwrap(), pods, _servers: servers };
        for (name, _, _) in CLUSTERS {
            lab.write_slice(name, &[]);
        }
        lab
    }

    fn write_import(&self, annotations: &[(&str, &str)], spec_extra: &str) {
        let yaml = service_import_with("demo", "web", VIP, IMPORT_PORTS, annotations, spec_extra);
        manifests::write(self.dir.path(), "web-import.yaml", &yaml);
    }

    fn write_slice(&self, cluster: &str, not_ready: &[Ipv4Addr]) {
        let (_, region, zone) = CLUSTERS.iter().find(|(n, _, _)| *n == cluster).unwrap();
        let endpoints: Vec<ZonedEndpoint<'_>> =
            self.pods[cluster].iter().map(|&ip| ZonedEndpoint { ip, ready: !not_ready.contains(&ip), zone }).collect();
        let yaml = endpoint_slice_zoned("demo", "web", cluster, *region, SLICE_PORTS, &endpoints);
        manifests::write(self.dir.path(), &format!("web-{cluster}.yaml"), &yaml);
    }

    fn agent(&self, extra: &[&str]) -> Agent {
        let mut flags = NODE_FLAGS.to_vec();
        flags.extend_from_slice(extra);
        Agent::start(&self.set.node, self.dir.path(), &self.set.client_ifaces(), &flags)
    }

    /// `n` new connections; answers counted by pod name (a1, b2, ...).
    fn spread(&self, n: usize) -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let reply = tcp_request(&self.set.clients[0].ns, SocketAddrV4::new(VIP, 80)).expect("through the VIP");
            *seen.entry(reply.identity).or_default() += 1;
        }
        seen
    }
}

/// Fraction of answers from pods whose name starts with `prefix` (a cluster letter).
fn share(seen: &BTreeMap<String, usize>, prefix: &str) -> f64 {
    let total: usize = seen.values().sum();
    seen.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| *v).sum::<usize>() as f64 / total as f64
}

fn update(agent: &mut Agent, change: impl FnOnce()) {
    let generation = agent.generation();
    change();
    agent.wait_reconciled_after(generation);
}

#[test]
fn the_local_zone_takes_everything_then_spills_by_the_health_rule() {
    let lab = Lab::new();
    lab.write_import(&[], "");
    let mut agent = lab.agent(&[]);

    let seen = lab.spread(300);
    assert_eq!(share(&seen, "a"), 1.0, "all ready in zone r1-a: every new connection stays there: {seen:?}");
    assert!(seen.contains_key("a1") && seen.contains_key("a2"));

    // Half the local zone is unready: health min(1, 1.4 × 1/2) = 70 % stays,
    // 30 % spills to the same-region tier (cluster-b), none to r2.
    update(&mut agent, || lab.write_slice("cluster-a", &[lab.pods["cluster-a"][1]]));
    let n = 2000;
    let seen = lab.spread(n);
    let (local, region, remote) = (share(&seen, "a"), share(&seen, "b"), share(&seen, "c"));
    println!(
        "spill over {n} connections: zone {local:.3} (expected 0.700), region {region:.3} (0.300), r2 {remote:.3} (0)"
    );
    assert!((local - 0.70).abs() <= 0.04, "zone share {local:.3}, expected 0.70 ± 0.04: {seen:?}");
    assert!((region - 0.30).abs() <= 0.04, "region share {region:.3}, expected 0.30 ± 0.04");
    assert_eq!(remote, 0.0);
    assert!(!seen.contains_key("a2"), "the unready pod gets nothing");

    // The whole zone unready: the region tier takes everything.
    update(&mut agent, || lab.write_slice("cluster-a", &lab.pods["cluster-a"].clone()));
    let seen = lab.spread(200);
    assert_eq!(share(&seen, "b"), 1.0, "{seen:?}");

    // And with the region gone too, the other region.
    update(&mut agent, || lab.write_slice("cluster-b", &lab.pods["cluster-b"].clone()));
    let seen = lab.spread(200);
    assert_eq!(share(&seen, "c"), 1.0, "{seen:?}");
}

#[test]
fn cluster_weights_split_new_connections_and_zero_drains_without_breaking_open_ones() {
    let lab = Lab::new();
    let weights = "mcs-agent.io/cluster-weights";
    lab.write_import(&[(weights, "cluster-a=90,cluster-b=10")], "");
    // Locality off, so the weights alone decide.
    let mut agent = lab.agent(&["--locality-tiers", "any"]);

    let n = 2000;
    let seen = lab.spread(n);
    let (a, b, c) = (share(&seen, "a"), share(&seen, "b"), share(&seen, "c"));
    println!("cluster weights 90/10 over {n} connections: cluster-a {a:.3}, cluster-b {b:.3}, cluster-c {c:.3}");
    assert!((a - 0.90).abs() <= 0.03, "cluster-a {a:.3}, expected 0.90 ± 0.03: {seen:?}");
    assert!((b - 0.10).abs() <= 0.03, "cluster-b {b:.3}, expected 0.10 ± 0.03");
    assert_eq!(c, 0.0, "an unlisted cluster gets nothing without `*=`");

    // An open connection to cluster-b, then cluster-b is drained.
    let mut open = None;
    for _ in 0..200 {
        let mut conn = Connection::open(&lab.set.clients[0].ns, SocketAddrV4::new(VIP, 80)).unwrap();
        if conn.request().unwrap().identity.starts_with('b') {
            open = Some(conn);
            break;
        }
    }
    let mut open = open.expect("a connection to cluster-b");
    update(&mut agent, || lab.write_import(&[(weights, "cluster-a=100,cluster-b=0")], ""));
    let seen = lab.spread(300);
    assert_eq!(share(&seen, "a"), 1.0, "a drained cluster gets no new connection: {seen:?}");
    for _ in 0..5 {
        assert!(open.request().expect("the drained cluster's open connection keeps working").identity.starts_with('b'));
    }
}

#[test]
fn client_ip_affinity_holds_across_100_connections() {
    let lab = Lab::new();
    lab.write_import(&[], "  sessionAffinity: ClientIP\n");
    let agent = lab.agent(&["--locality-tiers", "any"]);
    let seen = lab.spread(100);
    assert_eq!(seen.len(), 1, "one client, one backend, for 100 connections: {seen:?}");
    let counters = agent.stop().1.into_iter().find(|l| l.contains("counters=")).unwrap();
    assert!(counters.contains("affinity_hit=99"), "{counters}");
}
