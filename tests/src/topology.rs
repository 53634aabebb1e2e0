//! A flat, routed clusterset in namespaces.
//!
//! ```text
//!  client pod ns            node ns (agent)                 cluster ns (one per cluster)
//!  eth0 10.0.<i>.2 ── pod<i> 10.0.<i>.1                      pod IPs 10.<10+j>.0.<k>/32 on eth0
//!                           c<j> 10.255.<j>.1 ───────── eth0 10.255.<j>.2
//!                           route 10.<10+j>.0.0/16 via 10.255.<j>.2
//! ```
//! Clients reach ClusterSetIPs through their default route to the node, where
//! the agent's TC ingress on `pod<i>` translates them; pod IPs are routed
//! unchanged (no SNAT), as on a flat multi-cluster pod network.
//!
//! Dual-stack: every address `10.a.b.c` above has an IPv6 twin [`v6`]
//! `fd00:a:b::c` on the same interface, routed the same way.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The IPv6 twin of a clusterset address: `10.a.b.c` -> `fd00:a:b::c`.
pub fn v6(ip: Ipv4Addr) -> Ipv6Addr {
    let [_, a, b, c] = ip.octets();
    Ipv6Addr::new(0xfd00, a.into(), b.into(), 0, 0, 0, 0, c.into())
}

/// `ip addr add` of an IPv6 address, usable at once (no duplicate address detection).
fn add_v6(ns: &Netns, addr: &str, dev: &str) {
    ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"]);
}

use crate::{
    netns::{Netns, veth},
    traffic::Server,
};

pub struct Cluster {
    pub name: String,
    pub ns: Netns,
    index: u8,
    pods: u8,
}

impl Cluster {
    /// Adds a pod IP to this cluster and returns it.
    pub fn add_pod(&mut self) -> Ipv4Addr {
        self.pods += 1;
        let ip = Ipv4Addr::new(10, 10 + self.index, 0, self.pods);
        self.ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        add_v6(&self.ns, &format!("{}/128", v6(ip)), "eth0");
        ip
    }

    /// Adds `count` pods, each answering TCP on `tcp` and UDP on `udp` as
    /// `<cluster>/pod-<k>`, on both of its addresses; the servers stop when dropped.
    pub fn add_serving_pods(&mut self, count: usize, tcp: u16, udp: u16) -> (Vec<Ipv4Addr>, Vec<Server>) {
        let mut servers = Vec::new();
        let ips = (1..=count)
            .map(|k| {
                let ip = self.add_pod();
                let id = format!("{}/pod-{k}", self.name);
                servers.push(Server::tcp(&self.ns, ip, tcp, &id));
                servers.push(Server::udp(&self.ns, ip, udp, &id));
                servers.push(Server::tcp(&self.ns, v6(ip), tcp, &id));
                servers.push(Server::udp(&self.ns, v6(ip), udp, &id));
                ip
            })
            .collect();
        (ips, servers)
    }
}

pub struct Client {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// The node-side interface facing this client: where the agent attaches.
    pub node_iface: String,
}

pub struct Clusterset {
    pub node: Netns,
    pub clients: Vec<Client>,
    pub clusters: Vec<Cluster>,
}

impl Clusterset {
    pub fn new(clients: usize, cluster_names: &[&str]) -> Self {
        let node = Netns::new("mcs-node");
        node.sysctl("net.ipv4.ip_forward", "1");
        node.sysctl("net.ipv4.conf.all.rp_filter", "0");
        node.sysctl("net.ipv4.conf.default.rp_filter", "0");
        node.sysctl("net.ipv6.conf.all.forwarding", "1");
        let mut set = Self { node, clients: Vec::new(), clusters: Vec::new() };
        for _ in 0..clients {
            set.add_client();
        }
        for (j, name) in cluster_names.iter().enumerate() {
            let ns = Netns::new("mcs-cl");
            let j8 = j as u8;
            let node_if = format!("c{j}");
            veth(&set.node, &node_if, &ns, "eth0");
            set.node.ip(&["addr", "add", &format!("10.255.{j}.1/24"), "dev", &node_if]);
            ns.ip(&["addr", "add", &format!("10.255.{j}.2/24"), "dev", "eth0"]);
            ns.ip(&["route", "add", "default", "via", &format!("10.255.{j}.1")]);
            set.node.ip(&["route", "add", &format!("10.{}.0.0/16", 10 + j8), "via", &format!("10.255.{j}.2")]);
            let (node6, cluster6) = (v6(Ipv4Addr::new(10, 255, j8, 1)), v6(Ipv4Addr::new(10, 255, j8, 2)));
            add_v6(&set.node, &format!("{node6}/64"), &node_if);
            add_v6(&ns, &format!("{cluster6}/64"), "eth0");
            ns.ip(&["-6", "route", "add", "default", "via", &node6.to_string()]);
            let pods6 = Ipv6Addr::new(0xfd00, (10 + j8).into(), 0, 0, 0, 0, 0, 0);
            set.node.ip(&["-6", "route", "add", &format!("{pods6}/48"), "via", &cluster6.to_string()]);
            set.clusters.push(Cluster { name: (*name).to_owned(), ns, index: j8, pods: 0 });
        }
        set
    }

    /// A new client pod behind node interface `pod<i>`, at any time (as a CNI
    /// would create one while the agent runs).
    pub fn add_client(&mut self) -> &Client {
        let i = self.clients.len() as u8;
        let ns = Netns::new("mcs-pod");
        let node_iface = format!("pod{i}");
        veth(&self.node, &node_iface, &ns, "eth0");
        self.node.ip(&["addr", "add", &format!("10.0.{i}.1/24"), "dev", &node_iface]);
        let ip = Ipv4Addr::new(10, 0, i, 2);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.ip(&["route", "add", "default", "via", &format!("10.0.{i}.1")]);
        let gateway6 = v6(Ipv4Addr::new(10, 0, i, 1));
        add_v6(&self.node, &format!("{gateway6}/64"), &node_iface);
        add_v6(&ns, &format!("{}/64", v6(ip)), "eth0");
        ns.ip(&["-6", "route", "add", "default", "via", &gateway6.to_string()]);
        self.clients.push(Client { ns, ip, node_iface });
        self.clients.last().expect("just pushed")
    }

    pub fn client_ifaces(&self) -> Vec<String> {
        self.clients.iter().map(|c| c.node_iface.clone()).collect()
    }
}
