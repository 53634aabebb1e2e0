//! Passive health in a real clusterset: a cluster whose pods stop answering
//! (its route black-holed, its slices unchanged) stops getting new
//! connections within about a second, and gets them back once it answers.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use mcs_tests::{
    agent::{Agent, agent_binary, probe},
    bpffs::ScratchBpffs,
    manifests::{self, Port, endpoint_slice, service_import},
    topology::Clusterset,
    traffic::Server,
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORTS: &[Port<'static>] = &[("http", 8080, "TCP")];

/// (attempt started, reached cluster or None when it failed)
type Log = Arc<Mutex<Vec<(Instant, Option<String>)>>>;

fn attempt(target: SocketAddrV4) -> Option<String> {
    use std::io::{BufRead as _, Write as _};
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(target), Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    stream.write_all(b"hello\n").ok()?;
    let mut line = String::new();
    std::io::BufReader::new(stream).read_line(&mut line).ok()?;
    Some(line.split('/').next()?.to_owned())
}

#[test]
fn a_black_holed_cluster_is_ejected_within_a_second_and_returns_when_it_answers() {
    let mut set = Clusterset::new(1, &["cluster-a", "cluster-b", "cluster-c"]);
    let dir = tempfile::tempdir().unwrap();
    let mut servers = Vec::new();
    manifests::write(dir.path(), "web.yaml", &service_import("demo", "web", VIP, &[("http", 80, "TCP")]));
    for cluster in &mut set.clusters {
        let pods: Vec<(Ipv4Addr, bool)> = (1..=2).map(|_| (cluster.add_pod(), true)).collect();
        for (k, (ip, _)) in pods.iter().enumerate() {
            servers.push(Server::tcp(&cluster.ns, *ip, 8080, &format!("{}/pod-{}", cluster.name, k + 1)));
        }
        manifests::write(
            dir.path(),
            &format!("{}.yaml", cluster.name),
            &endpoint_slice("demo", "web", &cluster.name, PORTS, &pods),
        );
    }
    let _agent = Agent::start(
        &set.node,
        dir.path(),
        &set.client_ifaces(),
        &["--locality-tiers", "any", "--outlier-base-ejection-secs", "3"],
    );

    // Sixteen clients opening connections back to back.
    let log: Log = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (log, stop) = (log.clone(), stop.clone());
            set.clients[0].ns.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let reached = attempt(SocketAddrV4::new(VIP, 80));
                    log.lock().unwrap().push((started, reached));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let reached = |from: Instant, cluster: &str| {
        log.lock().unwrap().iter().filter(|(t, r)| *t >= from && r.as_deref() == Some(cluster)).count()
    };
    assert!(reached(Instant::now() - Duration::from_secs(1), "cluster-c") > 0, "cluster-c serves at first");

    // cluster-c's pods stop answering; its slices still say ready.
    let holed = Instant::now();
    set.node.ip(&["route", "replace", "blackhole", "10.12.0.0/16"]);
    // When the agent says both of its pods are out, from its own /metrics.
    let ejected_after = loop {
        let (_, metrics) = probe(&set.node, "/metrics").expect("/metrics");
        let out: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("mcs_agent_backend_ejected{") && l.contains("cluster=\"cluster-c\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if out >= 2.0 {
            break holed.elapsed();
        }
        assert!(holed.elapsed() < Duration::from_secs(10), "cluster-c was never ejected:\n{metrics}");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_secs(2));
    let (failed, last_failure) = {
        let log = log.lock().unwrap();
        let failures: Vec<Instant> = log.iter().filter(|(t, r)| *t >= holed && r.is_none()).map(|(t, _)| *t).collect();
        (failures.len(), failures.iter().max().copied())
    };
    let stopped_after = last_failure.map_or(Duration::ZERO, |t| t - holed);
    let window = Instant::now() - Duration::from_millis(1000);
    let ok_recent = log.lock().unwrap().iter().filter(|(t, r)| *t >= window && r.is_some()).count();
    let failed_recent = log.lock().unwrap().iter().filter(|(t, r)| *t >= window && r.is_none()).count();

    // It answers again: after its ejection (3 s) it is probed and returns.
    let restored = Instant::now();
    set.node.ip(&["route", "replace", "10.12.0.0/16", "via", "10.255.2.2"]);
    let deadline = restored + Duration::from_secs(15);
    let back = loop {
        if let Some(t) = log
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, r)| *t >= restored && r.as_deref() == Some("cluster-c"))
            .map(|(t, _)| *t)
            .min()
        {
            break t - restored;
        }
        assert!(Instant::now() < deadline, "cluster-c never got connections back");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(5));
    let share_after = {
        let since = Instant::now() - Duration::from_secs(2);
        let log = log.lock().unwrap();
        let all = log.iter().filter(|(t, r)| *t >= since && r.is_some()).count();
        let c = log.iter().filter(|(t, r)| *t >= since && r.as_deref() == Some("cluster-c")).count();
        c as f64 / all.max(1) as f64
    };
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.join();
    }
    eprintln!(
        "black-holed cluster-c: both pods ejected {ejected_after:.0?} after the black hole; last failed connection started {:.0?} after it ({failed} failed in all); \
         in the last second before restoring: {ok_recent} ok, {failed_recent} failed; \
         first connection to cluster-c {back:.1?} after restoring; its share 5 s later {:.0}%",
        stopped_after,
        share_after * 100.0
    );
    assert!(ejected_after <= Duration::from_millis(1500), "ejected only after {ejected_after:?}");
    assert!(
        stopped_after <= Duration::from_millis(1500),
        "new connections kept going to the dead cluster for {stopped_after:?}"
    );
    assert_eq!(failed_recent, 0, "no failures once ejected");
    assert!(ok_recent > 50, "the other clusters take the load");
    assert!(back <= Duration::from_secs(6), "cluster-c returns after its 3 s ejection and a probe: {back:?}");
    assert!(share_after > 0.2, "cluster-c is back to its share: {:.0}%", share_after * 100.0);
    drop(servers);
}

/// Passive health watches every backend id, not only the ids with packet
/// counters (`--stats-entries`, 16,384 by default): with 20,000 backends
/// programmed first, a backend past id 16,384 that refuses connections is
/// ejected.
#[test]
fn a_refusing_backend_past_id_16384_is_ejected_among_20000() {
    let mut set = Clusterset::new(1, &["cluster-a"]);
    let dir = tempfile::tempdir().unwrap();
    let (bpffs, state) = (ScratchBpffs::new(), tempfile::tempdir().unwrap());
    // 2,000 services of 10 endpoints each, at addresses never dialled.
    let mut filler = String::new();
    for i in 0..2000u32 {
        let vip = Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8);
        filler.push_str(&service_import("fill", &format!("s{i}"), vip, PORTS));
        let pods: Vec<(Ipv4Addr, bool)> = (0..10)
            .map(|k| {
                let n = i * 10 + k;
                (Ipv4Addr::new(10, 100, (n >> 8) as u8, (n & 0xff) as u8), true)
            })
            .collect();
        filler.push_str("---\n");
        filler.push_str(&endpoint_slice("fill", &format!("s{i}"), "cluster-b", PORTS, &pods));
        filler.push_str("---\n");
    }
    manifests::write(dir.path(), "filler.yaml", &filler);
    let (bpffs_arg, state_arg) = (bpffs.arg(), state.path().display().to_string());
    let mut agent =
        Agent::start(&set.node, dir.path(), &set.client_ifaces(), &["--bpffs", &bpffs_arg, "--state-dir", &state_arg]);

    // Then the service under test: one pod answers, one refuses (no listener: RST).
    let cluster = &mut set.clusters[0];
    let (good, bad) = (cluster.add_pod(), cluster.add_pod());
    let _server = Server::tcp(&cluster.ns, good, 8080, "cluster-a/pod-1");
    let generation = agent.generation();
    // One file, so that one pass takes both: with two, the pass after the
    // first write may run before the second is seen.
    let web = service_import("demo", "web", VIP, &[("http", 80, "TCP")])
        + "---\n"
        + &endpoint_slice("demo", "web", "cluster-a", PORTS, &[(good, true), (bad, true)]);
    manifests::write(dir.path(), "web.yaml", &web);
    agent.wait_reconciled_after(generation);

    // The refusing backend's row, or the frontend's row when it has none.
    let inspect = || -> Result<Value, Value> {
        let out = std::process::Command::new(agent_binary())
            .args(["inspect", "services", "-o", "json", "--bpffs", &bpffs_arg, "--state-dir", &state_arg])
            .output()
            .expect("running mcs-agent inspect");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rows: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let row = rows.as_array().unwrap().iter().find(|r| r["frontend"] == "10.96.0.10:80/TCP").cloned();
        let row = row.expect("the frontend is programmed");
        row["backends"].as_array().unwrap().iter().find(|b| b["address"] == format!("{bad}:8080")).cloned().ok_or(row)
    };
    let id = inspect().unwrap_or_else(|row| panic!("{bad}:8080 not in {row:#}"))["backend_id"].as_u64().unwrap();
    assert!(id > 16_384, "the refusing backend's id {id} must be past the counted ids");

    let started = Instant::now();
    let mut failed = 0;
    let ejected = || {
        let (_, metrics) = probe(&set.node, "/metrics").expect("/metrics");
        metrics
            .lines()
            .filter(|l| l.starts_with("mcs_agent_backend_ejected{") && l.contains("cluster=\"cluster-a\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
            >= 1.0
    };
    while !ejected() {
        for _ in 0..10 {
            let target = SocketAddrV4::new(VIP, 80);
            failed += usize::from(set.clients[0].ns.run(move || attempt(target)).is_none());
        }
        assert!(started.elapsed() < Duration::from_secs(20), "never ejected; {failed} connections failed");
    }
    let took = started.elapsed();
    // The running agent answers inspect between passes: the ejection shows
    // there as soon as a pass has taken it in.
    let shown = Instant::now();
    while inspect().map(|b| b["condition"].clone()).ok() != Some("ejected".into()) {
        assert!(shown.elapsed() < Duration::from_secs(3), "inspect names the ejected backend: {:#?}", inspect());
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..20 {
        let target = SocketAddrV4::new(VIP, 80);
        assert!(set.clients[0].ns.run(move || attempt(target)).is_some(), "a connection went to the ejected backend");
    }
    let (_, metrics) = probe(&set.node, "/metrics").expect("/metrics");
    assert!(metrics.contains("mcs_agent_outlier_unwatched_backends 0"), "every backend is watched");
    eprintln!("backend id {id} ejected {took:.1?} after the first connection attempt, {failed} failed");
}
