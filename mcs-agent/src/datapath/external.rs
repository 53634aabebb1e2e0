//! External interfaces (`--external-interface`): `mcs_xdp` on the node's
//! uplink for ClusterSetIP traffic from outside the node, `mcs_uplink` at
//! its TC ingress, and the source NAT settings both read.

// One module split by concern: the pieces share the root's types and imports.
use super::*;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    maps::lpm_trie::{Key as LpmKey, LpmTrie},
    programs::{Xdp, XdpMode, xdp::XdpLink},
};
use ipnet::IpNet;
use mcs_common::{
    MAP_XNAT, MAP_XNAT_SRC, MAP_XNAT_SRC6, PROG_UPLINK, PROG_XDP, XNAT_F_SOURCE_FILTER4, XNAT_F_SOURCE_FILTER6,
    XnatConfig,
};

/// How the XDP program is hooked to an external interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttach {
    /// Native (in the driver) where the driver has it, else generic.
    #[default]
    Auto,
    /// Native only: an interface whose driver lacks it fails.
    Native,
    /// Generic (in the stack, after the skb is built): any driver, slower.
    Generic,
}

/// The mode an interface's XDP program runs in (`/metrics`, the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpRunMode {
    Native,
    Generic,
}

impl XdpRunMode {
    pub const fn name(self) -> &'static str {
        match self {
            XdpRunMode::Native => "native",
            XdpRunMode::Generic => "generic",
        }
    }
}

/// Our hooks on one external interface, held by this process.
pub(super) struct ExternalHooks {
    xdp: XdpLink,
    uplink: SchedClassifierLink,
    mode: XdpRunMode,
}

/// What flows from outside are translated to (`XNAT[0]`) and who may send them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Xnat {
    pub addr4: Option<Ipv4Addr>,
    pub addr6: Option<Ipv6Addr>,
    /// The source NAT ports, inclusive.
    pub ports: (u16, u16),
    /// Empty: every client.
    pub sources: Vec<IpNet>,
}

impl Xnat {
    fn config(&self) -> XnatConfig {
        // Both filters with any range: ranges of one family only leave the
        // other family no client to serve.
        let flags = if self.sources.is_empty() { 0 } else { XNAT_F_SOURCE_FILTER4 | XNAT_F_SOURCE_FILTER6 };
        XnatConfig {
            addr4: self.addr4.map_or(0, |a| mcs_common::ip_to_map(a.octets())),
            addr6: self.addr6.map_or([0; 4], |a| mcs_common::ip6_to_map(a.octets())),
            port_lo: self.ports.0,
            port_count: self.ports.1 - self.ports.0 + 1,
            flags,
        }
    }
}

impl Datapath {
    /// Programs `XNAT` and the source ranges. The ranges first: a filter
    /// turned on before its ranges would refuse every client for a moment.
    pub fn set_xnat(&mut self, xnat: &Xnat) -> Result<(), DatapathError> {
        let v4 = xnat.sources.iter().filter_map(|n| match n {
            IpNet::V4(n) => Some(LpmKey::new(u32::from(n.prefix_len()), mcs_common::ip_to_map(n.network().octets()))),
            IpNet::V6(_) => None,
        });
        replace_ranges(&mut self.ebpf, MAP_XNAT_SRC, v4)?;
        let v6 = xnat.sources.iter().filter_map(|n| match n {
            IpNet::V6(n) => Some(LpmKey::new(u32::from(n.prefix_len()), mcs_common::ip6_to_map(n.network().octets()))),
            IpNet::V4(_) => None,
        });
        replace_ranges(&mut self.ebpf, MAP_XNAT_SRC6, v6)?;
        let name = MAP_XNAT;
        let map = self.ebpf.map_mut(name).ok_or(DatapathError::MissingMap(name))?;
        let mut array = Array::<_, XnatConfig>::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        array.set(0, xnat.config(), 0).map_err(|source| DatapathError::Map { name, source })
    }

    /// Hooks `mcs_uplink` (TC ingress) and then `mcs_xdp` to `iface`. An XDP
    /// program already there that is not ours (a CNI's) is never replaced.
    pub fn attach_external(&mut self, iface: &str, how: XdpAttach) -> Result<XdpRunMode, DatapathError> {
        let iface_err = |message: String| DatapathError::Interface { iface: iface.to_owned(), message };
        if let Some(hooks) = self.external.get(iface) {
            return Ok(hooks.mode);
        }
        let ifindex = nix::net::if_::if_nametoindex(iface)
            .map_err(|_| iface_err("no such interface in this network namespace".into()))?;
        // The TC half first: XDP hands it packets from its first run on.
        let prog = program(&mut self.ebpf, PROG_UPLINK)?;
        let options = TcAttachOptions::TcxOrder(LinkOrder::first());
        let id = prog
            .attach_with_options(iface, TcAttachType::Ingress, options)
            .map_err(|e| iface_err(format!("attaching {PROG_UPLINK} (TCX ingress): {e}")))?;
        let uplink = prog.take_link(id).map_err(|e| iface_err(e.to_string()))?;
        let xdp: &mut Xdp = self
            .ebpf
            .program_mut(PROG_XDP)
            .ok_or(DatapathError::MissingProgram(PROG_XDP))?
            .try_into()
            .map_err(|source| DatapathError::Program { name: PROG_XDP, source })?;
        let tries: &[(XdpMode, XdpRunMode)] = match how {
            XdpAttach::Auto => &[(XdpMode::Driver, XdpRunMode::Native), (XdpMode::Skb, XdpRunMode::Generic)],
            XdpAttach::Native => &[(XdpMode::Driver, XdpRunMode::Native)],
            XdpAttach::Generic => &[(XdpMode::Skb, XdpRunMode::Generic)],
        };
        let mut failures = Vec::new();
        for &(mode, run) in tries {
            match xdp.attach_to_if_index(ifindex, mode) {
                Ok(id) => {
                    let link = xdp.take_link(id).map_err(|e| iface_err(e.to_string()))?;
                    if !failures.is_empty() {
                        warn!(iface, tried = ?failures, "native XDP refused; serving with generic XDP (slower)");
                    }
                    info!(iface, mode = run.name(), "XDP attached: serving ClusterSetIP traffic from outside");
                    self.external.insert(iface.to_owned(), ExternalHooks { xdp: link, uplink, mode: run });
                    return Ok(run);
                }
                Err(e) => failures.push(format!("{}: {}", run.name(), xdp_error(&e, iface))),
            }
        }
        // Nothing left half-attached.
        let _ = uplink.detach();
        Err(iface_err(format!("attaching {PROG_XDP}: {}", failures.join("; "))))
    }

    /// Takes over `old`'s external interfaces (a growth): each XDP link gets
    /// this datapath's program in place (BPF_LINK_UPDATE), so no packet
    /// from outside meets no program. The TC half reads nothing but the
    /// packet, so the old link stays as it is.
    pub fn take_externals(&mut self, old: &mut Datapath) -> Result<(), DatapathError> {
        for (iface, hooks) in std::mem::take(&mut old.external) {
            let xdp: &mut Xdp = self
                .ebpf
                .program_mut(PROG_XDP)
                .ok_or(DatapathError::MissingProgram(PROG_XDP))?
                .try_into()
                .map_err(|source| DatapathError::Program { name: PROG_XDP, source })?;
            let ExternalHooks { xdp: link, uplink, mode } = hooks;
            let id = xdp.attach_to_link(link).map_err(|e| DatapathError::Interface {
                iface: iface.clone(),
                message: format!("swapping the XDP program in place: {e}"),
            })?;
            let link = xdp
                .take_link(id)
                .map_err(|e| DatapathError::Interface { iface: iface.clone(), message: e.to_string() })?;
            self.external.insert(iface, ExternalHooks { xdp: link, uplink, mode });
        }
        Ok(())
    }

    /// The external interfaces served, with their XDP mode.
    pub fn external_interfaces(&self) -> Vec<(String, XdpRunMode)> {
        self.external.iter().map(|(i, h)| (i.clone(), h.mode)).collect()
    }

    /// Detaches from one external interface.
    pub fn forget_external(&mut self, iface: &str) -> bool {
        let Some(hooks) = self.external.remove(iface) else { return false };
        release_external(iface, hooks);
        true
    }

    pub(super) fn release_externals(&mut self) {
        for (iface, hooks) in std::mem::take(&mut self.external) {
            release_external(&iface, hooks);
        }
    }
}

/// Makes an LPM trie hold exactly `keys`: the new ranges in, then the ones
/// no longer asked for out.
fn replace_ranges<K: aya::Pod + PartialEq>(
    ebpf: &mut Ebpf,
    name: &'static str,
    keys: impl Iterator<Item = LpmKey<K>>,
) -> Result<(), DatapathError> {
    let err = |source| DatapathError::Map { name, source };
    let map = ebpf.map_mut(name).ok_or(DatapathError::MissingMap(name))?;
    let mut trie = LpmTrie::<_, K, u8>::try_from(map).map_err(err)?;
    let wanted: Vec<LpmKey<K>> = keys.collect();
    for key in &wanted {
        trie.insert(key, 1, 0).map_err(err)?;
    }
    let stale: Vec<LpmKey<K>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted.iter().any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data()))
        .collect();
    for key in stale {
        trie.remove(&key).map_err(err)?;
    }
    Ok(())
}

fn release_external(iface: &str, hooks: ExternalHooks) {
    use aya::programs::links::Link as _;
    if let Err(e) = hooks.xdp.detach() {
        debug!(iface, error = %e, "detaching XDP");
    }
    if let Err(e) = hooks.uplink.detach() {
        debug!(iface, error = %e, "detaching the uplink TC program");
    }
}

/// The kernel's refusal, said in the operator's terms where it is a known one.
fn xdp_error(e: &ProgramError, iface: &str) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    if text.contains("Device or resource busy") || text.contains("File exists") {
        return format!(
            "another XDP program is attached to {iface} (a CNI's, or a load balancer's): it is not replaced; detach it or pick another interface ({text})"
        );
    }
    if text.contains("Invalid argument") || text.contains("Numerical result out of range") {
        return format!(
            "{text} (native XDP on veth and most drivers needs an MTU of at most about 3,500 bytes without XDP fragment support; lower the MTU or use --xdp-mode generic)"
        );
    }
    text
}

/// For the log: a family served from outside, or why not.
pub fn describe_xnat(xnat: &Xnat) -> String {
    let addr = |a: Option<IpAddr>| a.map_or_else(|| "off".to_owned(), |a| a.to_string());
    format!(
        "IPv4 {}, IPv6 {}, ports {}-{}",
        addr(xnat.addr4.map(IpAddr::V4)),
        addr(xnat.addr6.map(IpAddr::V6)),
        xnat.ports.0,
        xnat.ports.1
    )
}
