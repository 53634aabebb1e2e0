//! kube-proxy's iptables and nftables rule sets for a set of services,
//! reproduced from what kube-proxy (1.31+) writes, so the comparison runs
//! against the real kernel paths: the linear KUBE-SERVICES scan with
//! `statistic` chains in iptables mode, the `service-ips` verdict map and
//! `numgen` vmaps in nftables mode. Conntrack, DNAT and the masquerade-mark
//! rules are all there; only rules for service types we do not create
//! (NodePort, LoadBalancer, external IPs) are left out.

use std::{fmt::Write as _, net::Ipv4Addr};

/// kube-proxy's `--cluster-cidr`: traffic from outside it is masqueraded.
pub const CLUSTER_CIDR: &str = "10.0.0.0/8";

/// One service port with its endpoints, as kube-proxy sees it.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: &'static str,
    pub target_port: u16,
    pub endpoints: Vec<Ipv4Addr>,
}

impl ServicePort {
    fn id(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

/// kube-proxy names chains after a hash of the service port (base32 of a
/// SHA-256); any stable 16-character hash gives the kernel the same work.
fn chain_hash(text: &str) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325_u64;
    for byte in text.bytes() {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016X}")
}

fn svc_chain(sp: &ServicePort) -> String {
    format!("KUBE-SVC-{}", chain_hash(&format!("{}{}", sp.id(), sp.protocol)))
}

fn sep_chain(sp: &ServicePort, ep: Ipv4Addr) -> String {
    format!("KUBE-SEP-{}", chain_hash(&format!("{}{}{ep}:{}", sp.id(), sp.protocol, sp.target_port)))
}

/// The complete `iptables-restore` input for these services, in order: the
/// first service's KUBE-SERVICES rule is matched first.
pub fn iptables(services: &[ServicePort]) -> String {
    let mut out = String::with_capacity(services.len() * 2048);
    out.push_str(
        "*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-CANARY - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
",
    );
    // nfacct needs a module this kernel may lack and counts nothing we measure.
    out = out.replace(" -m nfacct --nfacct-name ct_state_invalid_dropped_pkts", "");
    out.push_str(&nat_table(services));
    out
}

fn declare_service_chains(out: &mut String, sp: &ServicePort) {
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(sp));
    for &ep in &sp.endpoints {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(sp, ep));
    }
}

/// KUBE-SERVICES: one rule per service port in order, then the NodePort catch-all.
fn kube_services_rules(out: &mut String, services: &[ServicePort]) {
    for sp in services {
        let proto = sp.protocol.to_ascii_lowercase();
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {proto} -p {proto} -d {}/32 --dport {} -j {}",
            sp.id(),
            sp.vip,
            sp.port,
            svc_chain(sp)
        );
    }
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
}

/// A service's KUBE-SVC chain (masquerade mark, `statistic` choice) and its KUBE-SEP chains.
fn service_chain_rules(out: &mut String, sp: &ServicePort) {
    let proto = sp.protocol.to_ascii_lowercase();
    let svc = svc_chain(sp);
    let _ = writeln!(
        out,
        "-A {svc} -m comment --comment \"{} cluster IP\" -m {proto} -p {proto} -d {}/32 --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        sp.id(),
        sp.vip,
        sp.port
    );
    let n = sp.endpoints.len();
    for (i, &ep) in sp.endpoints.iter().enumerate() {
        let sep = sep_chain(sp, ep);
        let target = format!("{ep}:{}", sp.target_port);
        if i + 1 < n {
            let probability = 1.0 / (n - i) as f64;
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{} -> {target}\" -m statistic --mode random --probability {probability:.10} -j {sep}",
                sp.id()
            );
        } else {
            let _ = writeln!(out, "-A {svc} -m comment --comment \"{} -> {target}\" -j {sep}", sp.id());
        }
    }
    for &ep in &sp.endpoints {
        let sep = sep_chain(sp, ep);
        let _ = writeln!(out, "-A {sep} -m comment --comment {} -s {ep}/32 -j KUBE-MARK-MASQ", sp.id());
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {} -m {proto} -p {proto} -j DNAT --to-destination {ep}:{}",
            sp.id(),
            sp.target_port
        );
    }
}

/// The nat table of a first sync: base chains and hooks, every service.
fn nat_table(services: &[ServicePort]) -> String {
    let mut out = String::with_capacity(services.len() * 1536);
    out.push_str(
        "*nat\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-SERVICES - [0:0]\n",
    );
    for sp in services {
        declare_service_chains(&mut out, sp);
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
",
    );
    kube_services_rules(&mut out, services);
    for sp in services {
        service_chain_rules(&mut out, sp);
    }
    out.push_str("COMMIT\n");
    out
}

/// kube-proxy's partial sync after one service's endpoints changed: rewrite
/// KUBE-SERVICES and that service's chains, delete its stale endpoint chains
/// (`iptables-restore --noflush`).
pub fn iptables_partial(services: &[ServicePort], changed: usize, stale: &[Ipv4Addr]) -> String {
    let sp = &services[changed];
    let mut out = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    declare_service_chains(&mut out, sp);
    // A chain must be empty to be deleted: declaring it in the header flushes it.
    for &ep in stale {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(sp, ep));
    }
    kube_services_rules(&mut out, services);
    service_chain_rules(&mut out, sp);
    for &ep in stale {
        let _ = writeln!(out, "-X {}", sep_chain(sp, ep));
    }
    out.push_str("COMMIT\n");
    out
}

fn nft_proto(sp: &ServicePort) -> String {
    sp.protocol.to_ascii_lowercase()
}

/// kube-proxy's nft chain names: `<kind>-<hash>-<ns>/<name>/<proto>/<port name><suffix>`.
fn nft_chain(kind: &str, sp: &ServicePort, hashed: &str, suffix: &str) -> String {
    let hash = chain_hash(&format!("{}{}{hashed}", sp.id(), sp.protocol));
    format!("{kind}-{}-{}/{}/{}/{}{suffix}", &hash[..8], sp.namespace, sp.name, nft_proto(sp), sp.port_name)
}

fn nft_svc_chain(sp: &ServicePort) -> String {
    nft_chain("service", sp, "", "")
}

fn nft_ep_chain(sp: &ServicePort, ep: Ipv4Addr) -> String {
    nft_chain("endpoint", sp, &ep.to_string(), &format!("__{ep}/{}", sp.target_port))
}

fn nft_service_chains(out: &mut String, sp: &ServicePort) {
    let proto = nft_proto(sp);
    // Endpoint chains first: the service's vmap jumps to them.
    for &ep in &sp.endpoints {
        let ep_chain = nft_ep_chain(sp, ep);
        let _ = writeln!(out, "add chain ip kube-proxy {ep_chain}");
        let _ = writeln!(out, "flush chain ip kube-proxy {ep_chain}");
        let _ = writeln!(out, "add rule ip kube-proxy {ep_chain} ip saddr {ep} jump mark-for-masquerade");
        let _ = writeln!(out, "add rule ip kube-proxy {ep_chain} meta l4proto {proto} dnat to {ep}:{}", sp.target_port);
    }
    let chain = nft_svc_chain(sp);
    let _ = writeln!(out, "add chain ip kube-proxy {chain}");
    let _ = writeln!(out, "flush chain ip kube-proxy {chain}");
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} ip daddr {} {proto} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        sp.vip, sp.port
    );
    let arms: Vec<String> =
        sp.endpoints.iter().enumerate().map(|(i, &ep)| format!("{i} : goto {}", nft_ep_chain(sp, ep))).collect();
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
        sp.endpoints.len(),
        arms.join(" , ")
    );
}

const NFT_BASE: &str = "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }
add chain ip kube-proxy mark-for-masquerade
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add chain ip kube-proxy masquerading
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add chain ip kube-proxy services
add chain ip kube-proxy filter-prerouting { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }
add chain ip kube-proxy filter-output { type filter hook output priority -110 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy forward
add rule ip kube-proxy filter-forward ct state new jump forward
add rule ip kube-proxy forward ct state invalid drop
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }
add chain ip kube-proxy service-endpoints-check
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
";

/// The complete `nft -f` input for kube-proxy's nftables mode: one
/// transaction, as kube-proxy's full sync writes it.
pub fn nftables(services: &[ServicePort]) -> String {
    nftables_parts(services, services.len().max(1)).concat()
}

/// The same rule set in transactions of `per` services each. The kernel binds
/// every anonymous `numgen` vmap of a transaction against all the others, so
/// one 10,000-service transaction takes minutes on this kernel (measured once
/// in the control-plane section); the data path only needs the final rules.
pub fn nftables_parts(services: &[ServicePort], per: usize) -> Vec<String> {
    let mut parts = Vec::new();
    for (i, chunk) in services.chunks(per.max(1)).enumerate() {
        let mut out = String::with_capacity(chunk.len() * 2048);
        if i == 0 {
            out.push_str(NFT_BASE);
        }
        for sp in chunk {
            nft_service_chains(&mut out, sp);
        }
        let ips: std::collections::BTreeSet<String> = chunk.iter().map(|sp| sp.vip.to_string()).collect();
        let _ = writeln!(
            out,
            "add element ip kube-proxy cluster-ips {{ {} }}",
            ips.into_iter().collect::<Vec<_>>().join(" , ")
        );
        let elements: Vec<String> = chunk
            .iter()
            .map(|sp| format!("{} . {} . {} : goto {}", sp.vip, nft_proto(sp), sp.port, nft_svc_chain(sp)))
            .collect();
        let _ = writeln!(out, "add element ip kube-proxy service-ips {{ {} }}", elements.join(" , "));
        parts.push(out);
    }
    if parts.is_empty() {
        parts.push(NFT_BASE.to_owned());
    }
    parts
}

/// kube-proxy's nftables transaction after one service's endpoints changed:
/// rewrite its service chain, add new endpoint chains, delete stale ones.
pub fn nftables_partial(services: &[ServicePort], changed: usize, stale: &[Ipv4Addr]) -> String {
    let sp = &services[changed];
    let mut out = String::new();
    nft_service_chains(&mut out, sp);
    for &ep in stale {
        let chain = nft_ep_chain(sp, ep);
        let _ = writeln!(out, "flush chain ip kube-proxy {chain}");
        let _ = writeln!(out, "delete chain ip kube-proxy {chain}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services(n: usize) -> Vec<ServicePort> {
        (0..n)
            .map(|i| ServicePort {
                namespace: "bench".into(),
                name: format!("svc-{i}"),
                port_name: "http".into(),
                vip: Ipv4Addr::new(10, 96, 0, i as u8 + 1),
                port: 80,
                protocol: "TCP",
                target_port: 8080,
                endpoints: (1..=3).map(|k| Ipv4Addr::new(10, 10, i as u8, k)).collect(),
            })
            .collect()
    }

    #[test]
    fn iptables_chooses_each_endpoint_with_kube_proxys_probabilities() {
        let rules = iptables(&services(2));
        let statistic: Vec<&str> = rules.lines().filter(|l| l.contains("--probability")).collect();
        // 3 endpoints: 1/3, then 1/2 of the rest, then the last unconditionally.
        assert_eq!(statistic.len(), 4, "{rules}");
        assert!(statistic[0].contains("--probability 0.3333333333"), "{}", statistic[0]);
        assert!(statistic[1].contains("--probability 0.5000000000"), "{}", statistic[1]);
        assert_eq!(rules.lines().filter(|l| l.contains("-j DNAT --to-destination 10.10.1.3:8080")).count(), 1);
        // The service rules come in input order and before the NodePort catch-all.
        let services_rules: Vec<&str> = rules.lines().filter(|l| l.starts_with("-A KUBE-SERVICES")).collect();
        assert!(services_rules[0].contains("10.96.0.1/32") && services_rules[1].contains("10.96.0.2/32"));
        assert!(services_rules[2].contains("KUBE-NODEPORTS"));
    }

    #[test]
    fn partial_sync_rewrites_kube_services_and_one_service() {
        let all = services(3);
        let partial = iptables_partial(&all, 1, &[Ipv4Addr::new(10, 10, 1, 9)]);
        assert_eq!(partial.lines().filter(|l| l.starts_with("-A KUBE-SERVICES")).count(), 4, "{partial}");
        assert!(partial.contains("10.10.1.1:8080") && !partial.contains("10.10.2.1:8080"), "{partial}");
        assert_eq!(partial.lines().filter(|l| l.starts_with("-X KUBE-SEP-")).count(), 1);
        assert!(partial.ends_with("COMMIT\n"));
    }

    #[test]
    fn nftables_maps_every_service_and_spreads_with_numgen() {
        let rules = nftables(&services(2));
        assert!(rules.contains("10.96.0.2 . tcp . 80 : goto service-"), "{rules}");
        assert_eq!(rules.lines().filter(|l| l.contains("numgen random mod 3 vmap")).count(), 2);
        assert_eq!(rules.lines().filter(|l| l.contains("dnat to 10.10.0.")).count(), 3);
    }
}
