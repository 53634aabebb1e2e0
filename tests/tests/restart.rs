//! Restarts and upgrades under continuous load: the agent must never fail a
//! connection on its own account. Pins live on a bpffs of the test's own
//! (`--bpffs`), as the host's /sys/fs/bpf does for a DaemonSet.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType};
use mcs_tests::{
    agent::{Agent, agent_binary, probe},
    bpffs::ScratchBpffs,
    disruption::{Load, Phase},
    manifests::{self, Port, endpoint_slice, service_import},
    netns::Netns,
    topology::Clusterset,
    traffic::{Server, tcp_request},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// One test of this file at a time: each runs continuous load and counts a
/// failed request as a failure of the agent; four at once on a 2-CPU
/// machine made one of them time out.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
const IMPORT_PORTS: &[Port<'static>] = &[("http", 80, "TCP"), ("dns", 53, "UDP")];
const SLICE_PORTS: &[Port<'static>] = &[("http", 8080, "TCP"), ("dns", 5353, "UDP")];

/// Samples the TCX chain of one interface as fast as it can, counting
/// samples where either direction had none of our programs.
struct Watch {
    stop: Arc<AtomicBool>,
    samples: Arc<AtomicU64>,
    gaps: Arc<AtomicU64>,
    handle: Option<JoinHandle<BTreeSet<(u32, &'static str)>>>,
}

impl Watch {
    fn start(node: &Netns, iface: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(AtomicU64::new(0));
        let gaps = Arc::new(AtomicU64::new(0));
        let (flag, count, missing) = (stop.clone(), samples.clone(), gaps.clone());
        let handle = node.spawn(move || {
            // Program ids seen, to prove each agent swapped its own programs in.
            let mut seen = BTreeSet::new();
            'sample: while !flag.load(Ordering::Relaxed) {
                let mut complete = true;
                for (attach_type, name) in
                    [(TcAttachType::Ingress, "mcs_ingress"), (TcAttachType::Egress, "mcs_egress")]
                {
                    // The query lists program ids, then opens each: a program freed in
                    // between (just replaced) fails the whole query. Such a sample says
                    // nothing either way, so it is not counted.
                    let Ok((_, programs)) = SchedClassifier::query_tcx(iface, attach_type) else {
                        continue 'sample;
                    };
                    let ours: Vec<u32> =
                        programs.iter().filter(|p| p.name_as_str() == Some(name)).map(|p| p.id()).collect();
                    complete &= !ours.is_empty();
                    seen.extend(ours.into_iter().map(|id| (id, name)));
                }
                count.fetch_add(1, Ordering::Relaxed);
                if !complete {
                    missing.fetch_add(1, Ordering::Relaxed);
                }
            }
            seen
        });
        Self { stop, samples, gaps, handle: Some(handle) }
    }

    fn finish(mut self) -> (u64, u64, BTreeSet<(u32, &'static str)>) {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.handle.take().expect("running").join().expect("watch thread");
        (self.samples.load(Ordering::Relaxed), self.gaps.load(Ordering::Relaxed), seen)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Lab {
    set: Clusterset,
    dir: tempfile::TempDir,
    bpffs: ScratchBpffs,
    /// Every serving pod, both clusters.
    pods: Vec<Ipv4Addr>,
    _servers: Vec<Server>,
}

impl Lab {
    fn new() -> Self {
        let mut set = Clusterset::new(1, &["cluster-a", "cluster-b"]);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut servers = Vec::new();
        let mut pods = Vec::new();
        manifests::write(dir.path(), "web-import.yaml", &service_import("demo", "web", VIP, IMPORT_PORTS));
        for cluster in &mut set.clusters {
            let (ips, serving) = cluster.add_serving_pods(2, 8080, 5353);
            servers.extend(serving);
            pods.extend(&ips);
            let endpoints: Vec<(Ipv4Addr, bool)> = ips.into_iter().map(|ip| (ip, true)).collect();
            let yaml = endpoint_slice("demo", "web", &cluster.name, SLICE_PORTS, &endpoints);
            manifests::write(dir.path(), &format!("web-{}.yaml", cluster.name), &yaml);
        }
        Self { set, dir, bpffs: ScratchBpffs::new(), pods, _servers: servers }
    }

    fn agent(&self, binary: &std::path::Path, extra: &[&str]) -> Agent {
        let mut args = vec!["--bpffs".to_owned(), self.bpffs.arg()];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start_binary(binary, &self.set.node, self.dir.path(), &self.set.client_ifaces(), &args)
    }
}

fn report(kind: &str, phase: &Phase) -> String {
    format!(
        "{kind:<40} tcp {:>5} ok {:>2} failed, longest gap {:>4} ms | udp {:>5} ok {:>2} failed, longest gap {:>4} ms",
        phase.tcp.ok,
        phase.tcp.failed,
        phase.tcp.longest_gap.as_millis(),
        phase.udp.ok,
        phase.udp.failed,
        phase.udp.longest_gap.as_millis()
    )
}

/// Our netlink filters on `iface` in `ns`: (ingress, egress) counts.
fn netlink_filters(ns: &Netns, iface: &str) -> (usize, usize) {
    let count = |dir: &str, name: &str| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns.name(), "tc", "filter", "show", "dev", iface, dir])
            .output()
            .expect("tc");
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(name)).count()
    };
    (count("ingress", "mcs_ingress"), count("egress", "mcs_egress"))
}

#[test]
fn netlink_filters_are_replaced_in_place_under_load() {
    let _serial = serial();
    let lab = Lab::new();
    let binary = agent_binary();
    let mut agent = lab.agent(&binary, &["--attach", "netlink"]);
    assert_eq!(netlink_filters(&lab.set.node, "pod0"), (1, 1));
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, node) = (stop.clone(), lab.set.node.name().to_owned());
    // Samples the filters from another thread while the agents come and go.
    let sampler = std::thread::spawn(move || {
        let ns = Netns::existing(&node);
        let (mut samples, mut gaps, mut doubles) = (0, 0, 0);
        while !flag.load(Ordering::Relaxed) {
            let (ingress, egress) = netlink_filters(&ns, "pod0");
            samples += 1;
            gaps += usize::from(ingress == 0 || egress == 0);
            doubles += usize::from(ingress > 1 || egress > 1);
        }
        (samples, gaps, doubles)
    });
    let load = Load::start(&lab.set.clients[0].ns, SocketAddrV4::new(VIP, 80), SocketAddrV4::new(VIP, 53), 8);
    let settle = || std::thread::sleep(Duration::from_millis(800));
    settle();
    load.mark();
    agent.crash();
    settle();
    agent = lab.agent(&binary, &["--attach", "netlink"]);
    settle();
    let crash = load.mark();
    agent.stop();
    agent = lab.agent(&binary, &["--attach", "netlink"]);
    settle();
    let term = load.mark();
    let (_, fates) = load.finish();
    stop.store(true, Ordering::Relaxed);
    let (samples, gaps, doubles) = sampler.join().unwrap();
    let lines = [report("netlink: SIGKILL, restart", &crash), report("netlink: SIGTERM, restart", &term)];
    eprintln!(
        "disruption (client view):\n{}\nfilters: {samples} samples, {gaps} without ours, {doubles} with two",
        lines.join("\n")
    );
    for phase in [&crash, &term] {
        assert_eq!((phase.tcp.failed, phase.udp.failed), (0, 0), "{:?}\n{}", phase.errors, lines.join("\n"));
    }
    assert!(fates.iter().all(|f| f.broken.is_none() && f.moved_to.is_none()), "{fates:?}");
    assert!(samples > 10);
    assert_eq!((gaps, doubles), (0, 0), "one filter of ours per direction at every instant");
    agent.stop();
    lab.set.node.exec(&[&binary.display().to_string(), "uninstall", "--bpffs", &lab.bpffs.arg()]);
    assert_eq!(netlink_filters(&lab.set.node, "pod0"), (0, 0), "uninstall removes the filters");
}

#[test]
fn restarts_and_upgrades_under_load_fail_no_connection() {
    let _serial = serial();
    let lab = Lab::new();
    let binary = agent_binary();
    // "A differently built binary": another file, loaded as another program.
    let other_build = tempfile::tempdir().expect("tempdir");
    let next_binary = other_build.path().join("mcs-agent-next");
    std::fs::copy(&binary, &next_binary).expect("copying the agent binary");
    let next_layout = (mcs_common::LAYOUT_VERSION + 1).to_string();

    let mut agent = lab.agent(&binary, &[]);
    let watch = Watch::start(&lab.set.node, "pod0");
    let load = Load::start(&lab.set.clients[0].ns, SocketAddrV4::new(VIP, 80), SocketAddrV4::new(VIP, 53), 8);
    let settle = || std::thread::sleep(Duration::from_millis(800));
    settle();
    let mut phases = vec![("steady state", load.mark())];

    // (1) Crash: SIGKILL, and the kubelet restarts it a moment later.
    agent.crash();
    settle();
    agent = lab.agent(&binary, &[]);
    settle();
    phases.push(("SIGKILL, restart after 0.8 s", load.mark()));

    // (2) A normal stop (rolling update, node drain of the agent).
    let (clean, logs) = agent.stop();
    assert!(clean, "SIGTERM ends the agent with status 0:\n{}", logs.join("\n"));
    settle();
    agent = lab.agent(&binary, &[]);
    settle();
    phases.push(("SIGTERM, restart after 0.8 s", load.mark()));

    // (3) An upgrade to another build: its programs replace the running ones.
    agent.stop();
    agent = lab.agent(&next_binary, &[]);
    settle();
    phases.push(("SIGTERM, another binary", load.mark()));

    // (4) An upgrade across a layout version: new maps, flows carried over,
    // links moved, the old layout's pins removed.
    let old_dir = mcs_agent::datapath::pin_dir(lab.bpffs.path());
    assert!(old_dir.exists());
    agent.stop();
    agent = lab.agent(&next_binary, &["--layout-version", &next_layout]);
    settle();
    phases.push(("SIGTERM, layout version bump", load.mark()));
    assert!(!old_dir.exists(), "the old layout's pins are removed after the upgrade");
    let new_dir = mcs_agent::datapath::LayoutDir::new(lab.bpffs.path(), mcs_common::LAYOUT_VERSION + 1).dir;
    assert!(new_dir.join("links/ingress/pod0").exists(), "the link now lives under the new layout");

    let (last, fates) = load.finish();
    phases.push(("after the last restart", last));
    let (samples, gaps, seen) = watch.finish();

    let lines: Vec<String> = phases.iter().map(|(kind, phase)| report(kind, phase)).collect();
    eprintln!("disruption (client view):\n{}", lines.join("\n"));
    eprintln!("program presence on pod0: {samples} samples, {gaps} without our programs");
    for (kind, phase) in &phases {
        assert_eq!(
            (phase.tcp.failed, phase.udp.failed),
            (0, 0),
            "{kind}: failed connections or requests: {:?}\n{}",
            phase.errors,
            lines.join("\n")
        );
        assert!(phase.tcp.ok > 0 && phase.udp.ok > 0, "{kind}: no traffic completed");
    }
    for fate in &fates {
        assert!(fate.broken.is_none(), "a long-lived connection broke: {fate:?}");
        assert!(fate.moved_to.is_none(), "a long-lived connection changed backend: {fate:?}");
        assert!(fate.requests > 20, "a long-lived connection stalled: {fate:?}");
    }
    assert!(samples > 100, "the watch sampled the interface");
    assert_eq!(gaps, 0, "there was an instant with no program attached");
    let ingress: BTreeSet<u32> = seen.iter().filter(|(_, n)| *n == "mcs_ingress").map(|(id, _)| *id).collect();
    assert_eq!(ingress.len(), 5, "each of the five agents swapped in its own program: {seen:?}");

    // Removing mcs-agent from the node is explicit.
    let (clean, _) = agent.stop();
    assert!(clean);
    let ingress_now = lab.set.node.run(|| SchedClassifier::query_tcx("pod0", TcAttachType::Ingress).unwrap().1.len());
    assert_eq!(ingress_now, 1, "a stopped agent leaves the datapath serving");
    let check = |ns: &Netns| {
        std::process::Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(&binary)
            .args(["uninstall", "--check", "--bpffs", &lab.bpffs.arg()])
            .status()
            .expect("mcs-agent uninstall --check")
            .success()
    };
    assert!(!check(&lab.set.node), "--check sees what is left");
    lab.set.node.exec(&[&binary.display().to_string(), "uninstall", "--bpffs", &lab.bpffs.arg()]);
    assert!(check(&lab.set.node), "--check says the node is clean");
    let left = lab.set.node.run(|| {
        [TcAttachType::Ingress, TcAttachType::Egress]
            .map(|t| SchedClassifier::query_tcx("pod0", t).unwrap().1.len())
            .iter()
            .sum::<usize>()
    });
    assert_eq!(left, 0, "uninstall detaches everything");
    assert!(!lab.bpffs.path().join("mcs").exists(), "uninstall removes every pin");
}

/// `mcs_agent_map_growths_total` from the agent's /metrics.
fn growths(node: &Netns) -> u64 {
    let (_, metrics) = probe(node, "/metrics").expect("/metrics answers");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("mcs_agent_map_growths_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no mcs_agent_map_growths_total in /metrics:\n{metrics}"))
}

/// The pinned BACKENDS map's size.
fn pinned_backends(lab: &Lab) -> u64 {
    let dir = mcs_agent::datapath::pin_dir(lab.bpffs.path());
    let maps = mcs_agent::datapath::memory::pinned_maps(&dir);
    maps.iter().find(|m| m.map == "BACKENDS").map(|m| m.max_entries).expect("BACKENDS is pinned")
}

/// Imports enough to outgrow maps started small: `count` services of one
/// port each on their own VIPs, every pod an endpoint on a port of its own
/// (new backends), the first on the pods' served port.
fn more_imports(lab: &Lab, count: u8) -> Vec<SocketAddrV4> {
    let mut yaml = String::new();
    let mut vips = Vec::new();
    for i in 0..count {
        let vip = Ipv4Addr::new(10, 96, 1, 1 + i);
        let port = if i == 0 { 8080 } else { 9000 + u16::from(i) };
        let name = format!("more-{i}");
        yaml.push_str(&service_import("demo", &name, vip, &[("http", 80, "TCP")]));
        yaml.push_str("---\n");
        let endpoints: Vec<(Ipv4Addr, bool)> = lab.pods.iter().map(|ip| (*ip, true)).collect();
        yaml.push_str(&endpoint_slice("demo", &name, "cluster-a", &[("http", port, "TCP")], &endpoints));
        yaml.push_str("---\n");
        vips.push(SocketAddrV4::new(vip, 80));
    }
    manifests::write(lab.dir.path(), "more.yaml", &yaml);
    vips
}

#[test]
fn the_maps_grow_under_load_and_fail_no_connection() {
    let _serial = serial();
    let lab = Lab::new();
    let binary = agent_binary();
    // Room for 15 backends; the lab's import has 8 (4 pods, 2 ports).
    let small = ["--initial-backends", "16", "--initial-services", "16"];
    let agent = lab.agent(&binary, &small);
    assert_eq!(pinned_backends(&lab), 16);
    assert_eq!(growths(&lab.set.node), 0);
    let watch = Watch::start(&lab.set.node, "pod0");
    let load = Load::start(&lab.set.clients[0].ns, SocketAddrV4::new(VIP, 80), SocketAddrV4::new(VIP, 53), 8);
    std::thread::sleep(Duration::from_millis(800));
    let steady = load.mark();

    // 4 services of 4 new backends each (the first shares the served
    // port): 8 + 12 backends outgrow 16 while the load runs.
    let vips = more_imports(&lab, 4);
    let mut agent = agent;
    agent.wait_for(|l| l.contains("the maps grew"), Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(800));
    let (grown, fates) = load.finish();
    let (samples, gaps, _) = watch.finish();

    let phases = [("steady state", &steady), ("growth and after", &grown)];
    let lines: Vec<String> = phases.iter().map(|(k, p)| report(k, p)).collect();
    eprintln!("disruption (client view):\n{}", lines.join("\n"));
    for line in agent.logs().iter().filter(|l| l.contains("grew") || l.contains("must grow") || l.contains("carried")) {
        eprintln!("{line}");
    }
    for (kind, phase) in phases {
        assert_eq!((phase.tcp.failed, phase.udp.failed), (0, 0), "{kind}: {:?}\n{}", phase.errors, lines.join("\n"));
        assert!(phase.tcp.ok > 0 && phase.udp.ok > 0, "{kind}: no traffic completed");
    }
    for fate in &fates {
        assert!(fate.broken.is_none(), "a long-lived connection broke: {fate:?}");
        assert!(fate.moved_to.is_none(), "a long-lived connection changed backend: {fate:?}");
    }
    assert!(samples > 100, "the watch sampled the interface");
    assert_eq!(gaps, 0, "there was an instant with no program attached");

    // Grown, under the layout's own directory, and counted.
    assert_eq!(growths(&lab.set.node), 1);
    assert_eq!(pinned_backends(&lab), 65_536, "12 + 8 backends and half again, in steps of 65,536");
    let layout = mcs_agent::datapath::LayoutDir::new(lab.bpffs.path(), mcs_common::LAYOUT_VERSION);
    assert!(!layout.growth().dir.exists(), "the growth directory was moved into place");
    assert!(layout.dir.join("links/ingress/pod0").exists());
    let reply = tcp_request(&lab.set.clients[0].ns, vips[0]).expect("an import that came with the growth is served");
    assert_eq!(reply.reply_from, std::net::SocketAddr::V4(vips[0]), "the client saw the VIP answer");
    assert!(reply.identity.contains("/pod-"), "a pod answered: {}", reply.identity);

    // A restart adopts the grown maps as they are: no growth.
    let (clean, logs) = agent.stop();
    assert!(clean, "{}", logs.join("\n"));
    let agent = lab.agent(&binary, &small);
    assert_eq!(pinned_backends(&lab), 65_536);
    assert_eq!(growths(&lab.set.node), 0, "the adopted maps already fit");
    tcp_request(&lab.set.clients[0].ns, vips[0]).expect("served after the restart");

    // A fresh node whose state outgrows the first maps grows before it is ready.
    agent.stop();
    lab.set.node.exec(&[&binary.display().to_string(), "uninstall", "--bpffs", &lab.bpffs.arg()]);
    let agent = lab.agent(&binary, &small);
    assert_eq!(growths(&lab.set.node), 1, "grown before ready");
    assert_eq!(pinned_backends(&lab), 65_536);
    tcp_request(&lab.set.clients[0].ns, SocketAddrV4::new(VIP, 80)).expect("served once ready");
    tcp_request(&lab.set.clients[0].ns, vips[0]).expect("served once ready");
    let (clean, _) = agent.stop();
    assert!(clean);
    lab.set.node.exec(&[&binary.display().to_string(), "uninstall", "--bpffs", &lab.bpffs.arg()]);

    // Unpinned (--no-pin), the same: the larger maps take over from maps
    // this process holds.
    let no_pin: Vec<&str> = small.iter().copied().chain(["--no-pin"]).collect();
    let agent = lab.agent(&binary, &no_pin);
    assert_eq!(growths(&lab.set.node), 1, "grown before ready");
    tcp_request(&lab.set.clients[0].ns, vips[0]).expect("served once ready");
    let (clean, logs) = agent.stop();
    assert!(clean, "{}", logs.join("\n"));
    assert!(!lab.bpffs.path().join("mcs").exists(), "nothing pinned");
    let left = lab.set.node.run(|| SchedClassifier::query_tcx("pod0", TcAttachType::Ingress).unwrap().1.len());
    assert_eq!(left, 0, "an unpinned datapath goes with its agent");
}

#[test]
fn an_interrupted_growth_is_finished_or_taken_over_by_the_next_agent() {
    let _serial = serial();
    let lab = Lab::new();
    let binary = agent_binary();
    let layout = mcs_agent::datapath::LayoutDir::new(lab.bpffs.path(), mcs_common::LAYOUT_VERSION);
    let growth = layout.growth();
    let agent = lab.agent(&binary, &[]);
    let load = Load::start(&lab.set.clients[0].ns, SocketAddrV4::new(VIP, 80), SocketAddrV4::new(VIP, 53), 4);
    let settle = || std::thread::sleep(Duration::from_millis(600));
    settle();
    let mut phases = vec![("steady state", load.mark())];

    // A crash after the smaller maps were retired and before the grown ones
    // moved into place leaves only the growth directory, serving.
    agent.crash();
    std::fs::rename(&layout.dir, &growth.dir).expect("bpffs renames a directory");
    let agent = lab.agent(&binary, &[]);
    assert!(layout.dir.join("links/ingress/pod0").exists() && !growth.dir.exists(), "moved into place");
    settle();
    phases.push(("growth directory alone", load.mark()));

    // A crash before the switch: the growth directory serves beside the
    // layout's own (here an empty one): taken over as an older layout.
    agent.crash();
    std::fs::rename(&layout.dir, &growth.dir).expect("rename");
    std::fs::create_dir(&layout.dir).expect("mkdir");
    let agent = lab.agent(&binary, &[]);
    assert!(!growth.dir.exists(), "taken over and retired");
    assert!(layout.dir.join("links/ingress/pod0").exists());
    settle();
    phases.push(("growth directory beside the layout's", load.mark()));

    let (last, fates) = load.finish();
    phases.push(("after", last));
    let lines: Vec<String> = phases.iter().map(|(kind, phase)| report(kind, phase)).collect();
    eprintln!("disruption (client view):\n{}", lines.join("\n"));
    for (kind, phase) in &phases {
        assert_eq!((phase.tcp.failed, phase.udp.failed), (0, 0), "{kind}: {:?}\n{}", phase.errors, lines.join("\n"));
    }
    for fate in &fates {
        assert!(fate.broken.is_none(), "a long-lived connection broke: {fate:?}");
        assert!(fate.moved_to.is_none(), "a long-lived connection changed backend: {fate:?}");
    }
    let (clean, _) = agent.stop();
    assert!(clean);
    lab.set.node.exec(&[&binary.display().to_string(), "uninstall", "--bpffs", &lab.bpffs.arg()]);
    assert!(!lab.bpffs.path().join("mcs").exists(), "uninstall removes every pin");
}
