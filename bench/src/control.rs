//! Control plane: cold start to fully programmed, one endpoint change from
//! the manifest event to the kernel map, the agent's memory, and kube-proxy's
//! rule loads for the same services.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use mcs_agent::datapath::pin_dir;
use mcs_common::{IPPROTO_TCP, MAP_SERVICES, ServiceKey, ServiceValue, ip_to_map, port_to_map};
use mcs_tests::{agent::Agent, bpffs::ScratchBpffs, netns::Netns};
use serde::Serialize;

use crate::{
    kubeproxy::{self, ServicePort},
    lab::{self, ENDPOINTS, feed},
    stats::{Summary, summarize},
};

#[derive(Clone, Debug, Serialize)]
pub struct ControlPlane {
    pub services: usize,
    pub endpoints_per_service: usize,
    /// Process start to "agent ready" (maps programmed, programs loaded).
    pub cold_start_ms: Summary,
    /// The agent's own breakdown: loading the datapath (creating the maps,
    /// verifying the programs), then its first pass.
    pub cold_load_ms: Summary,
    pub cold_read_ms: Summary,
    pub cold_compute_ms: Summary,
    pub cold_apply_ms: Summary,
    /// Manifest renamed into place to the SERVICES entry flipped in the kernel.
    pub change_ms: Summary,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    /// The agent's own memory (heap, stacks): RSS less the BPF maps it has mmapped.
    pub rss_anon_mib: f64,
    /// BPF maps mmapped by the agent (selection tables, health counters):
    /// kernel memory that RSS counts because the agent maps it.
    pub rss_maps_mib: f64,
    pub iptables_restore_full_ms: Summary,
    pub iptables_restore_change_ms: Summary,
    pub nft_full_ms: Summary,
    pub nft_change_ms: Summary,
    /// Times the maps grew in the last cold start (default sizes outgrown).
    pub growths: usize,
}

/// The value of one `name=value` field in an agent log line.
fn field(line: &str, name: &str) -> Option<f64> {
    line.split(&format!("{name}=")).nth(1)?.split_whitespace().next()?.parse().ok()
}

/// (VmRSS, VmHWM, RssAnon, RssFile) in MiB.
fn rss_mib(pid: u32) -> (f64, f64, f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0, kib("RssAnon:") / 1024.0, kib("RssFile:") / 1024.0)
}

fn changed_endpoints(change: usize) -> Vec<Ipv4Addr> {
    // Nine fixed endpoints and a tenth that moves each time: one endpoint
    // removed and one added, the common rollout step.
    let mut eps: Vec<Ipv4Addr> = (1..ENDPOINTS as u8).map(|k| Ipv4Addr::new(10, 10, 0, k)).collect();
    eps.push(Ipv4Addr::new(10, 10, 1 + (change / 250) as u8 % 200, (change % 250) as u8 + 1));
    eps
}

pub struct Options<'a> {
    pub agent: &'a Path,
    pub agent_args: &'a [String],
    pub services: usize,
    pub cold_starts: usize,
    pub changes: usize,
    pub rule_loads: usize,
    pub iptables_restore: &'a str,
}

pub fn measure(opts: &Options<'_>) -> Result<ControlPlane> {
    let started = Instant::now();
    let count = opts.services;
    let measured = count / 2;
    let pods: Vec<Ipv4Addr> = (1..=ENDPOINTS as u8).map(|k| Ipv4Addr::new(10, 10, 0, k)).collect();
    let mut services = lab::services(count, measured, &pods);
    let manifests = tempfile::tempdir().context("manifest directory")?;
    lab::write_manifests(manifests.path(), &services);
    let measured_name = services.iter().find(|s| s.vip == lab::vip(measured)).expect("measured service").name.clone();

    let (mut cold, mut load, mut read, mut compute, mut apply) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut change = Vec::new();
    let (mut rss, mut peak, mut anon, mut maps) = (0.0, 0.0, 0.0, 0.0);
    let mut growths = 0;
    for run in 0..opts.cold_starts {
        let node = Netns::new("mcs-bench-cp");
        let bpffs = ScratchBpffs::new();
        // No pod interfaces: this measures programming, not traffic.
        let mut args: Vec<String> = vec![
            "--bpffs".into(),
            bpffs.path().display().to_string(),
            "--interface-pattern".into(),
            "mcs-bench-none-*".into(),
        ];
        args.extend(opts.agent_args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let t0 = Instant::now();
        let mut agent = Agent::start_binary(opts.agent, &node, manifests.path(), &[], &args);
        cold.push(t0.elapsed().as_secs_f64() * 1e3);
        let first =
            agent.wait_for(|l| l.contains("reconciled") && l.contains("generation=1 "), Duration::from_secs(120));
        // Agents before this line was logged give no load time. A growth
        // loads a second datapath: both count.
        let logs = agent.logs();
        let loads: Vec<&String> = logs.iter().filter(|l| l.contains("datapath loaded")).collect();
        let loaded: f64 = loads
            .iter()
            .map(|l| field(l, "maps_us").unwrap_or(f64::NAN) + field(l, "programs_us").unwrap_or(f64::NAN))
            .sum();
        load.push(if loads.is_empty() { f64::NAN } else { loaded / 1e3 });
        growths = logs.iter().filter(|l| l.contains("the maps grew")).count();
        read.push(field(&first, "read_us").unwrap_or(f64::NAN) / 1e3);
        compute.push(field(&first, "compute_us").unwrap_or(f64::NAN) / 1e3);
        apply.push(field(&first, "apply_us").unwrap_or(f64::NAN) / 1e3);
        let frontends = field(&first, "frontends").unwrap_or(0.0) as usize;
        if frontends != services.len() {
            bail!("the agent programmed {frontends} frontends, expected {}: {first}", services.len());
        }
        if run + 1 == opts.cold_starts {
            // Past the first passive health tick, which builds its view of
            // every backend on the loop as the agent turns ready (0.3 s at
            // 100,000 services): the changes measured are isolated ones.
            std::thread::sleep(Duration::from_millis(1000));
            (rss, peak, anon, maps) = rss_mib(agent.pid().context("agent pid")?);
            change = measure_changes(opts.changes, &bpffs, manifests.path(), &measured_name, &mut services, measured)?;
        }
        let (ok, log) = agent.stop();
        if !ok {
            bail!("the agent did not stop cleanly:\n{}", log.join("\n"));
        }
        eprintln!("bench: control plane, cold start {} of {}: {:.0} ms", run + 1, opts.cold_starts, cold[run]);
    }

    let (full_ipt, change_ipt, full_nft, change_nft) = rule_loads(opts, &services, measured)?;
    eprintln!("bench: control plane measured in {:.1?}", started.elapsed());
    Ok(ControlPlane {
        services: count,
        endpoints_per_service: ENDPOINTS,
        cold_start_ms: summarize(&cold),
        cold_load_ms: summarize(&load),
        cold_read_ms: summarize(&read),
        cold_compute_ms: summarize(&compute),
        cold_apply_ms: summarize(&apply),
        change_ms: summarize(&change),
        rss_mib: rss,
        peak_rss_mib: peak,
        rss_anon_mib: anon,
        rss_maps_mib: maps,
        iptables_restore_full_ms: summarize(&full_ipt),
        iptables_restore_change_ms: summarize(&change_ipt),
        nft_full_ms: summarize(&full_nft),
        nft_change_ms: summarize(&change_nft),
        growths,
    })
}

fn measure_changes(
    changes: usize,
    bpffs: &ScratchBpffs,
    dir: &Path,
    name: &str,
    services: &mut [ServicePort],
    measured: usize,
) -> Result<Vec<f64>> {
    let ports: Vec<ServicePort> = services.iter().filter(|s| s.name == name).cloned().collect();
    let refs: Vec<&ServicePort> = ports.iter().collect();
    let samples = time_changes(changes, bpffs, measured, |c| {
        let text = lab::service_manifest(&refs, &changed_endpoints(c));
        let tmp = dir.join(format!(".{name}.yaml.tmp"));
        std::fs::write(&tmp, text)?;
        // The clock starts when `rename` makes the change visible.
        Ok(Some((tmp, dir.join(format!("{name}.yaml")))))
    })?;
    for s in services.iter_mut().filter(|s| s.name == name) {
        s.endpoints = changed_endpoints(changes.saturating_sub(1));
    }
    Ok(samples)
}

/// Times `changes` endpoint changes of the measured service, each from the
/// moment it is made (`change(c)`, or the rename it returns) to its
/// `SERVICES` entry changing in the kernel.
fn time_changes(
    changes: usize,
    bpffs: &ScratchBpffs,
    measured: usize,
    mut change: impl FnMut(usize) -> Result<Option<(PathBuf, PathBuf)>>,
) -> Result<Vec<f64>> {
    let pin: PathBuf = pin_dir(bpffs.path()).join(MAP_SERVICES);
    let data = MapData::from_pin(&pin).with_context(|| format!("opening the agent's pinned {}", pin.display()))?;
    let map: BpfHashMap<MapData, ServiceKey, ServiceValue> =
        BpfHashMap::try_from(Map::HashMap(data)).context("SERVICES is not a hash map")?;
    let key = ServiceKey {
        vip: ip_to_map(lab::vip(measured).octets()),
        port: port_to_map(lab::TCP_PORT),
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    let mut samples = Vec::with_capacity(changes);
    for c in 0..changes {
        let before = map.get(&key, 0).context("the measured service is not in SERVICES")?;
        let mut t0 = Instant::now();
        if let Some((from, to)) = change(c)? {
            t0 = Instant::now();
            std::fs::rename(from, to)?;
        }
        loop {
            let now = map.get(&key, 0).context("the measured service vanished from SERVICES")?;
            if bytemuck::bytes_of(&now) != bytemuck::bytes_of(&before) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("change {c}: the kernel map did not change within 10 s");
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        samples.push(t0.elapsed().as_secs_f64() * 1e3);
        // Past the agent's 100 ms debounce window, so each change is a lone change
        // (a burst is coalesced by design and would measure the window instead).
        std::thread::sleep(Duration::from_millis(110 + (c % 7) as u64 * 5));
    }
    Ok(samples)
}

/// Kubernetes mode: the same services served by a list/watch API server of
/// our own (pages of 500, as the real one honours `limit`), one agent from
/// cold, then endpoint changes from the API's write to the kernel map.
#[derive(Clone, Debug, Serialize)]
pub struct KubeControl {
    pub services: usize,
    pub endpoints_per_service: usize,
    /// Process start to "agent ready".
    pub ready_ms: f64,
    pub rss_mib: f64,
    pub rss_anon_mib: f64,
    pub rss_maps_mib: f64,
    /// The EndpointSlice written to the API to the SERVICES entry flipped.
    pub change_ms: Summary,
}

pub fn measure_kube(agent_binary: &Path, agent_args: &[String], count: usize, changes: usize) -> Result<KubeControl> {
    use mcs_agent::{model::Origin, source::manifests::parse_documents};
    use mcs_tests::fakeapi::{self, Api, IMPORTS, NODES, SLICES};
    let started = Instant::now();
    let measured = count / 2;
    let pods: Vec<Ipv4Addr> = (1..=ENDPOINTS as u8).map(|k| Ipv4Addr::new(10, 10, 0, k)).collect();
    let services = lab::services(count, measured, &pods);
    let api = Api::default();
    api.set_page_limit(500);
    // The manifests' objects, as JSON: what the API server holds.
    let objects = |ports: &[&ServicePort], endpoints: &[Ipv4Addr]| -> Result<(serde_json::Value, serde_json::Value)> {
        let (snapshot, errors) =
            parse_documents(&Origin(ports[0].name.clone()), &lab::service_manifest(ports, endpoints));
        if !errors.is_empty() || snapshot.imports.len() != 1 || snapshot.slices.len() != 1 {
            bail!("the benchmark's manifest for {} does not parse: {errors:?}", ports[0].name);
        }
        Ok((serde_json::to_value(&snapshot.imports[0].1)?, serde_json::to_value(&snapshot.slices[0].1)?))
    };
    let mut i = 0;
    let mut measured_ports = Vec::new();
    while i < services.len() {
        let ports: Vec<&ServicePort> = services[i..].iter().take_while(|s| s.name == services[i].name).collect();
        i += ports.len();
        let (import, slice) = objects(&ports, &ports[0].endpoints)?;
        api.put(IMPORTS, import);
        api.put(SLICES, slice);
        if ports[0].vip == lab::vip(measured) {
            measured_ports = ports.into_iter().cloned().collect::<Vec<_>>();
        }
    }
    api.put(NODES, serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}));

    let node = Netns::new("mcs-bench-kube");
    let bpffs = ScratchBpffs::new();
    let dir = tempfile::tempdir().context("kubeconfig directory")?;
    let port = node.run(|| std::net::TcpListener::bind("127.0.0.1:0").map(|l| l.local_addr().map(|a| a.port())))??;
    let _server = api.serve(&node, port);
    let kubeconfig = fakeapi::kubeconfig(dir.path(), port);
    let mut args: Vec<String> = [
        "run",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--node-name",
        "node-1",
        "--bpffs",
        &bpffs.path().display().to_string(),
        "--interface-pattern",
        "mcs-bench-none-*",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(agent_args.iter().cloned());
    let t0 = Instant::now();
    let mut agent = Agent::spawn(agent_binary, &node, &args);
    agent.wait_for(|l| l.contains("agent ready"), Duration::from_secs(300));
    let ready_ms = t0.elapsed().as_secs_f64() * 1e3;
    // As in manifests mode: past the first passive health tick.
    std::thread::sleep(Duration::from_millis(1000));
    let (rss, _, anon, maps) = rss_mib(agent.pid().context("agent pid")?);
    let refs: Vec<&ServicePort> = measured_ports.iter().collect();
    let change = time_changes(changes, &bpffs, measured, |c| {
        let (_, slice) = objects(&refs, &changed_endpoints(c))?;
        api.put(SLICES, slice);
        Ok(None)
    })?;
    let (ok, log) = agent.stop();
    if !ok {
        bail!("the agent did not stop cleanly:\n{}", log.join("\n"));
    }
    eprintln!("bench: Kubernetes mode at {count} services measured in {:.1?}", started.elapsed());
    Ok(KubeControl {
        services: count,
        endpoints_per_service: ENDPOINTS,
        ready_ms,
        rss_mib: rss,
        rss_anon_mib: anon,
        rss_maps_mib: maps,
        change_ms: summarize(&change),
    })
}

type Loads = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

fn rule_loads(opts: &Options<'_>, services: &[ServicePort], measured: usize) -> Result<Loads> {
    let index = services.iter().position(|s| s.vip == lab::vip(measured)).expect("measured service");
    let (mut full_ipt, mut change_ipt, mut full_nft, mut change_nft) = (vec![], vec![], vec![], vec![]);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for round in 0..opts.rule_loads {
        // One 10k-service nft transaction takes minutes on this kernel (see
        // kubeproxy::nftables_parts): measured once, iptables-restore every round.
        let paths: &[bool] = if round == 0 { &[false, true] } else { &[false] };
        for &nft in paths {
            let node = Netns::new("mcs-bench-kp");
            let mut current = services.to_vec();
            let full = if nft { kubeproxy::nftables(&current) } else { kubeproxy::iptables(&current) };
            let took = if nft {
                feed(&node, &["nft", "-f", "-"], &full)?
            } else {
                feed(&node, &[opts.iptables_restore], &full)?
            };
            if nft {
                full_nft.push(ms(took))
            } else {
                full_ipt.push(ms(took))
            }
            // Each partial sync costs about a second at 10k services: 20 samples, first round only.
            let partial_changes = if round == 0 { opts.changes.min(20) } else { 0 };
            for c in 0..partial_changes {
                let stale = current[index].endpoints.clone();
                current[index].endpoints = changed_endpoints(1000 + c);
                let gone: Vec<Ipv4Addr> =
                    stale.into_iter().filter(|ip| !current[index].endpoints.contains(ip)).collect();
                let took = if nft {
                    feed(&node, &["nft", "-f", "-"], &kubeproxy::nftables_partial(&current, index, &gone))?
                } else {
                    let restore = [opts.iptables_restore, "--noflush"];
                    feed(&node, &restore, &kubeproxy::iptables_partial(&current, index, &gone))?
                };
                if nft { change_nft.push(ms(took)) } else { change_ipt.push(ms(took)) }
            }
        }
    }
    Ok((full_ipt, change_ipt, full_nft, change_nft))
}
