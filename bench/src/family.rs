//! IPv6 beside IPv4 through real sockets: new TCP connections per second
//! (connect, request, response, close; one client, back to back) to a pod
//! directly and through a dual-stack import's VIP of each family, in one
//! dual-stack clusterset, rounds interleaved so drift hits every path alike.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use mcs_tests::{
    agent::Agent,
    manifests,
    topology::{Clusterset, v6},
};
use serde::Serialize;

use crate::load::{self, Workload};

const PODS: usize = 10;
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub family: &'static str,
    pub path: &'static str,
    /// Median over rounds.
    pub connections_per_sec: f64,
    pub rounds: usize,
}

fn manifest(pods: &[Ipv4Addr]) -> String {
    let slice = |suffix: &str, family: &str, ips: Vec<String>| {
        let endpoints: Vec<String> = ips.iter().map(|ip| format!(r#"{{addresses: ["{ip}"]}}"#)).collect();
        format!(
            r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: fam-{suffix}
  namespace: bench
  labels: {{multicluster.kubernetes.io/service-name: fam, multicluster.kubernetes.io/source-cluster: bench}}
addressType: {family}
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: [{}]
"#,
            endpoints.join(", ")
        )
    };
    format!(
        r#"apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata: {{name: fam, namespace: bench}}
spec: {{type: ClusterSetIP, ips: ["{VIP4}", "{}"], ipFamilies: [IPv4, IPv6], ports: [{{name: http, port: 80, protocol: TCP}}]}}
---
{}---
{}"#,
        v6(VIP4),
        slice("4", "IPv4", pods.iter().map(ToString::to_string).collect()),
        slice("6", "IPv6", pods.iter().map(|ip| v6(*ip).to_string()).collect())
    )
}

pub fn measure(agent: &Path, rounds: usize, seconds: f64) -> Result<Vec<Row>> {
    let started = Instant::now();
    let mut set = Clusterset::new(1, &["bench"]);
    // As the data path lab: many short connections from one client.
    set.clients[0].ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000");
    set.clients[0].ns.sysctl("net.ipv4.tcp_tw_reuse", "1");
    set.clusters[0].ns.sysctl("net.core.somaxconn", "4096");
    let pods: Vec<Ipv4Addr> = (0..PODS).map(|_| set.clusters[0].add_pod()).collect();
    let _servers = load::Servers::start(&set.clusters[0].ns, &pods, 8080, 5353)?;
    let dir = tempfile::tempdir()?;
    manifests::write(dir.path(), "fam.yaml", &manifest(&pods));
    let _agent = Agent::start_binary(agent, &set.node, dir.path(), &set.client_ifaces(), &[]);
    let paths: [(&'static str, &'static str, SocketAddr); 4] = [
        ("IPv4", "direct", SocketAddr::new(pods[0].into(), 8080)),
        ("IPv4", "mcs-agent", SocketAddr::new(VIP4.into(), 80)),
        ("IPv6", "direct", SocketAddr::new(v6(pods[0]).into(), 8080)),
        ("IPv6", "mcs-agent", SocketAddr::new(IpAddr::V6(v6(VIP4)), 80)),
    ];
    let mut rates = vec![Vec::new(); paths.len()];
    // Warm-up: neighbours resolved, first connections out of the way.
    let client = [&set.clients[0].ns];
    let crr = |target, seconds| -> Result<f64> {
        let run = load::run(Workload::TcpCrr, &client, target, Duration::from_secs_f64(seconds));
        if run.errors > 0 || run.transactions == 0 {
            bail!("{target}: {} of {} new connections failed", run.errors, run.errors + run.transactions);
        }
        Ok(run.rate)
    };
    for (_, _, target) in paths {
        crr(target, 0.2)?;
    }
    for _ in 0..rounds {
        for (i, (_, _, target)) in paths.iter().enumerate() {
            rates[i].push(crr(*target, seconds)?);
        }
    }
    eprintln!("bench: IPv4 and IPv6 new connections, {rounds} rounds, in {:.1?}", started.elapsed());
    Ok(paths
        .iter()
        .zip(rates)
        .map(|((family, path, _), mut r)| {
            r.sort_by(f64::total_cmp);
            Row { family, path, connections_per_sec: r[r.len() / 2], rounds: r.len() }
        })
        .collect())
}
