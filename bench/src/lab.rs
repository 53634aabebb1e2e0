//! The benchmark's clusterset: client pod namespaces, the node namespace
//! where the datapath under test runs, and one backend namespace with ten pod
//! addresses. A fresh lab per measured configuration, so no conntrack state,
//! TIME_WAIT socket or netfilter hook of one path leaks into the next.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use mcs_tests::{
    agent::Agent,
    manifests::{self, Port},
    netns::Netns,
    topology::Clusterset,
};
use serde::Serialize;

use crate::{kubeproxy::ServicePort, load::Servers};

pub const ENDPOINTS: usize = 10;
pub const TCP_PORT: u16 = 80;
pub const TCP_TARGET: u16 = 8080;
pub const UDP_PORT: u16 = 53;
pub const UDP_TARGET: u16 = 5353;
pub const NAMESPACE: &str = "bench";
/// See [`crate::kubeproxy::nftables_parts`].
pub const NFT_SERVICES_PER_TRANSACTION: usize = 500;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Path4 {
    /// Straight to a pod address, nothing translated.
    Direct,
    /// mcs-agent's TC programs on the ClusterSetIP.
    McsAgent,
    /// mcs-agent's socket-level load balancing: the backend is picked at
    /// connect()/sendmsg(), packets go to the pod untranslated.
    SocketLb,
    /// kube-proxy iptables mode.
    Iptables,
    /// kube-proxy nftables mode.
    Nftables,
    /// Straight to a pod address with the agent attached as it runs by
    /// default (TC programs and socket LB): what traffic that is not to a
    /// ClusterSetIP pays for the agent being there.
    Attached,
}

impl Path4 {
    pub const ALL: [Path4; 6] =
        [Path4::Direct, Path4::McsAgent, Path4::SocketLb, Path4::Iptables, Path4::Nftables, Path4::Attached];

    pub fn label(self) -> &'static str {
        match self {
            Path4::Direct => "direct",
            Path4::McsAgent => "mcs-agent",
            Path4::SocketLb => "mcs-agent socket LB",
            Path4::Iptables => "kube-proxy iptables",
            Path4::Nftables => "kube-proxy nftables",
            Path4::Attached => "pod to pod, agent attached",
        }
    }
}

/// Where the measured service sits among the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    /// Last: kube-proxy's iptables scan visits every other service first.
    Last,
    Middle,
}

impl Position {
    pub fn index(self, services: usize) -> usize {
        match self {
            Position::Last => services - 1,
            Position::Middle => services / 2,
        }
    }
}

pub fn vip(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + index as u32 + 1)
}

/// Endpoints of the services nobody calls: distinct, never routed.
fn idle_endpoint(index: usize, k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 32, 0, 0)) + (index * ENDPOINTS + k) as u32)
}

/// `count` services of ten endpoints; `measured` gets the real pods and a UDP port too.
pub fn services(count: usize, measured: usize, pods: &[Ipv4Addr]) -> Vec<ServicePort> {
    let mut out = Vec::with_capacity(count + 1);
    for i in 0..count {
        let endpoints: Vec<Ipv4Addr> =
            if i == measured { pods.to_vec() } else { (0..ENDPOINTS).map(|k| idle_endpoint(i, k)).collect() };
        let port = |port_name: &str, port, protocol, target_port| ServicePort {
            namespace: NAMESPACE.into(),
            name: format!("svc-{i:05}"),
            port_name: port_name.into(),
            vip: vip(i),
            port,
            protocol,
            target_port,
            endpoints: endpoints.clone(),
        };
        out.push(port("http", TCP_PORT, "TCP", TCP_TARGET));
        if i == measured {
            out.push(port("dns", UDP_PORT, "UDP", UDP_TARGET));
        }
    }
    out
}

/// Writes one file per service (a ServiceImport and its EndpointSlice), as an
/// MCS controller would create objects.
pub fn write_manifests(dir: &Path, services: &[ServicePort]) {
    let mut i = 0;
    while i < services.len() {
        let name = services[i].name.clone();
        let ports: Vec<&ServicePort> = services[i..].iter().take_while(|s| s.name == name).collect();
        i += ports.len();
        manifests::write(dir, &format!("{name}.yaml"), &service_manifest(&ports, &ports[0].endpoints));
    }
}

pub fn service_manifest(ports: &[&ServicePort], endpoints: &[Ipv4Addr]) -> String {
    let import_ports: Vec<Port<'_>> = ports.iter().map(|p| (p.port_name.as_str(), p.port, p.protocol)).collect();
    let slice_ports: Vec<Port<'_>> = ports.iter().map(|p| (p.port_name.as_str(), p.target_port, p.protocol)).collect();
    let eps: Vec<(Ipv4Addr, bool)> = endpoints.iter().map(|&ip| (ip, true)).collect();
    format!(
        "{}---\n{}",
        manifests::service_import(NAMESPACE, &ports[0].name, ports[0].vip, &import_ports),
        manifests::endpoint_slice(NAMESPACE, &ports[0].name, "bench", &slice_ports, &eps)
    )
}

/// Clients, node, backends and their servers.
pub struct Lab {
    pub set: Clusterset,
    pub pods: Vec<Ipv4Addr>,
    _servers: Servers,
}

impl Lab {
    pub fn new(clients: usize) -> Result<Self> {
        let mut set = Clusterset::new(clients, &["bench"]);
        for client in &set.clients {
            // Tens of thousands of short connections per run: a wide port range and
            // reuse of TIME_WAIT ports keep the client from running out.
            client.ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000");
            client.ns.sysctl("net.ipv4.tcp_tw_reuse", "1");
        }
        let backend = &mut set.clusters[0];
        backend.ns.sysctl("net.core.somaxconn", "4096");
        let pods: Vec<Ipv4Addr> = (0..ENDPOINTS).map(|_| backend.add_pod()).collect();
        let servers = Servers::start(&backend.ns, &pods, TCP_TARGET, UDP_TARGET).context("starting backend servers")?;
        Ok(Self { set, pods, _servers: servers })
    }

    pub fn node(&self) -> &Netns {
        &self.set.node
    }

    pub fn clients(&self, n: usize) -> Vec<&Netns> {
        self.set.clients.iter().take(n).map(|c| &c.ns).collect()
    }
}

/// Feeds `input` to a command run inside `ns`; returns how long it took.
pub fn feed(ns: &Netns, command: &[&str], input: &str) -> Result<Duration> {
    use std::io::Write as _;
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .args(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?} (is it installed? `cargo xtask setup`)"))?;
    child.stdin.take().expect("piped").write_all(input.as_bytes()).with_context(|| format!("feeding {command:?}"))?;
    let out = child.wait_with_output()?;
    let elapsed = started.elapsed();
    if !out.status.success() {
        bail!("{command:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(elapsed)
}

/// What the node runs for one configuration; torn down on drop.
pub enum Installed {
    Nothing,
    /// Held, not read: dropping stops the agent, then removes its manifests.
    Agent {
        _agent: Agent,
        _manifests: tempfile::TempDir,
    },
    Rules,
}

/// Installs `path` for `services` in the lab's node namespace and returns
/// the addresses the clients dial.
pub fn install(
    lab: &Lab,
    path: Path4,
    services: &[ServicePort],
    measured: usize,
    agent_args: &[&str],
    iptables_restore: &str,
    sock_cgroup: Option<&str>,
) -> Result<(Installed, SocketAddrV4, SocketAddrV4)> {
    let vip = vip(measured);
    let (tcp, udp) = (SocketAddrV4::new(vip, TCP_PORT), SocketAddrV4::new(vip, UDP_PORT));
    let installed = match path {
        Path4::Direct => {
            let pod = lab.pods[0];
            return Ok((Installed::Nothing, SocketAddrV4::new(pod, TCP_TARGET), SocketAddrV4::new(pod, UDP_TARGET)));
        }
        Path4::McsAgent | Path4::SocketLb | Path4::Attached => {
            let dir = tempfile::tempdir().context("manifest directory")?;
            write_manifests(dir.path(), services);
            let mut args = vec!["--no-pin"];
            let cgroup;
            if matches!(path, Path4::SocketLb | Path4::Attached) {
                // The bench process itself is in this cgroup (see main.rs):
                // its client threads' sockets are translated at connect().
                cgroup = sock_cgroup.context("socket LB needs the bench's cgroup")?.to_owned();
                args.extend(["--socket-lb", "on", "--socket-lb-cgroup", &cgroup]);
            }
            args.extend_from_slice(agent_args);
            let agent = Agent::start(lab.node(), dir.path(), &lab.set.client_ifaces(), &args);
            let installed = Installed::Agent { _agent: agent, _manifests: dir };
            if path == Path4::Attached {
                let pod = lab.pods[0];
                return Ok((installed, SocketAddrV4::new(pod, TCP_TARGET), SocketAddrV4::new(pod, UDP_TARGET)));
            }
            installed
        }
        Path4::Iptables => {
            feed(lab.node(), &[iptables_restore], &crate::kubeproxy::iptables(services))?;
            Installed::Rules
        }
        Path4::Nftables => {
            for part in crate::kubeproxy::nftables_parts(services, NFT_SERVICES_PER_TRANSACTION) {
                feed(lab.node(), &["nft", "-f", "-"], &part)?;
            }
            Installed::Rules
        }
    };
    Ok((installed, tcp, udp))
}
