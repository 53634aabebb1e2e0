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
    MAP_XNAT, MAP_XNAT_CT, MAP_XNAT_CT6, MAP_XNAT_SRC, MAP_XNAT_SRC6, MAP_XNAT_UPLINKS, PROG_UPLINK, PROG_XDP,
    UPLINK_GENERIC, UPLINK_NATIVE, XNAT_F_SOURCE_FILTER4, XNAT_F_SOURCE_FILTER6, XnatConfig,
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

/// How one of our hooks on an external interface is held.
enum Held<L> {
    /// By this process only (no pins: `--no-pin`, tests): gone with it.
    Owned(L),
    /// Pinned under `<bpffs>/mcs/external/`: attached until the pin is
    /// removed, so the uplink stays served while the agent restarts; the
    /// next agent swaps its program in with BPF_LINK_UPDATE.
    Pinned(PathBuf),
}

/// Our hooks on one external interface.
pub(super) struct ExternalHooks {
    xdp: Held<XdpLink>,
    uplink: Held<SchedClassifierLink>,
    mode: XdpRunMode,
}

/// Where the external interfaces' links are pinned: beside the layout
/// directories, not in one, since XDP has one program per interface, which
/// every layout and growth in turn updates in place.
fn external_dir(layout: &LayoutDir) -> PathBuf {
    layout.dir.parent().map(|p| p.join("external")).unwrap_or_else(|| layout.dir.join("external"))
}

/// Where `XNAT_CT` and `XNAT_CT6` are pinned: in the external directory, so
/// a restart, a growth and a layout upgrade all use the very map the XDP
/// program in the link used until its swap. A copy, as the TC path's
/// conntrack gets, would lose the flows opened between the copy and the
/// swap (no older program stands behind XDP to take them). The name
/// carries `NatValue`'s own version: a change of its layout starts afresh
/// under a new name. Ids in entries made by another datapath may name
/// other backends after a growth: counters check the address, and a UDP
/// flow whose id no longer names its backend is balanced afresh once.
pub(super) fn external_map(layout: &LayoutDir, name: &str) -> Result<PathBuf, DatapathError> {
    let dir = external_dir(layout);
    fs::create_dir_all(&dir).map_err(|e| DatapathError::Bpffs {
        path: dir.clone(),
        message: format!("cannot create the pin directory: {e}"),
    })?;
    Ok(external_map_pin(layout, name))
}

/// The path [`external_map`] gives, for readers (`inspect`): nothing is
/// created, and it may not exist.
pub fn external_map_pin(layout: &LayoutDir, name: &str) -> PathBuf {
    external_dir(layout).join(format!("{name}_V{XNAT_LAYOUT}"))
}

/// The layout of `NatValue` (and the external pins' names).
const XNAT_LAYOUT: u32 = 1;

/// Removes the shared maps of flows from outside once no external link is
/// pinned (cleanup on exit of the last datapath).
fn remove_external_maps(dir: &Path) {
    if pinned_externals(dir).is_empty() {
        for name in [MAP_XNAT_CT, MAP_XNAT_CT6] {
            let _ = fs::remove_file(dir.join(format!("{name}_V{XNAT_LAYOUT}")));
        }
        let _ = fs::remove_dir(dir);
    }
}

/// `xdp-<mode>-<iface>` (the mode is in the name: the link does not say it)
/// and `tc-<iface>`.
fn xdp_pin(dir: &Path, mode: XdpRunMode, iface: &str) -> PathBuf {
    dir.join(format!("xdp-{}-{}", mode.name(), escape(iface)))
}

fn tc_pin(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("tc-{}", escape(iface)))
}

/// Interfaces with a pinned external link in `dir`.
fn pinned_externals(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let rest = name
                .strip_prefix("tc-")
                .or_else(|| name.strip_prefix("xdp-native-"))
                .or_else(|| name.strip_prefix("xdp-generic-"))?;
            unescape(rest)
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Removes every pinned external link under `bpffs` (which detaches them)
/// and their directory; how many there were.
pub(super) fn remove_external_pins(bpffs: &Path) -> usize {
    let dir = bpffs.join(PIN_ROOT).join("external");
    let mut removed = 0;
    for entry in fs::read_dir(&dir).into_iter().flatten().filter_map(Result::ok) {
        let link = entry.file_name().to_str().is_some_and(|n| n.starts_with("xdp-") || n.starts_with("tc-"));
        if fs::remove_file(entry.path()).is_ok() && link {
            removed += 1;
        }
    }
    let _ = fs::remove_dir(&dir);
    removed
}

/// The external links pinned under `bpffs` (for `uninstall --check`).
pub(super) fn external_pins(bpffs: &Path) -> Vec<String> {
    let dir = bpffs.join(PIN_ROOT).join("external");
    pinned_externals(&dir)
        .into_iter()
        .map(|i| format!("XDP and TC programs pinned for external interface {i}"))
        .collect()
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
        // The filter turned off before its ranges go, on after they come.
        if xnat.sources.is_empty() {
            self.write_xnat(xnat)?;
        }
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
        self.write_xnat(xnat)
    }

    fn write_xnat(&mut self, xnat: &Xnat) -> Result<(), DatapathError> {
        let name = MAP_XNAT;
        let map = self.ebpf.map_mut(name).ok_or(DatapathError::MissingMap(name))?;
        let mut array = Array::<_, XnatConfig>::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        array.set(0, xnat.config(), 0).map_err(|source| DatapathError::Map { name, source })
    }

    /// Hooks `mcs_uplink` (TC ingress) and then `mcs_xdp` to `iface`. An
    /// earlier agent's (pinned) are swapped in place, with no gap; an XDP
    /// program already there that is not ours (a CNI's) is never replaced.
    pub fn attach_external(&mut self, iface: &str, how: XdpAttach) -> Result<XdpRunMode, DatapathError> {
        let iface_err = |message: String| DatapathError::Interface { iface: iface.to_owned(), message };
        if let Some(hooks) = self.external.get(iface) {
            return Ok(hooks.mode);
        }
        if let Some(e) = &self.xdp_load {
            return Err(iface_err(format!("the kernel refused the external interface programs: {e}")));
        }
        let ifindex = nix::net::if_::if_nameindex()
            .ok()
            .and_then(|list| list.iter().find(|i| i.name().to_str() == Ok(iface)).map(|i| i.index()))
            .ok_or_else(|| iface_err("no such interface in this network namespace".into()))?;
        let dir = self.layout.as_ref().map(external_dir);
        if let Some(dir) = &dir {
            fs::create_dir_all(dir).map_err(|e| DatapathError::Bpffs {
                path: dir.clone(),
                message: format!("cannot create the pin directory: {e}"),
            })?;
        }
        // The TC half first: XDP hands it packets from its first run on.
        let uplink = self.hook_uplink(iface, dir.as_deref()).map_err(iface_err)?;
        let xdp: &mut Xdp = self
            .ebpf
            .program_mut(PROG_XDP)
            .ok_or(DatapathError::MissingProgram(PROG_XDP))?
            .try_into()
            .map_err(|source| DatapathError::Program { name: PROG_XDP, source })?;
        // An earlier agent's link, pinned: our program in its place, if it
        // runs in a mode `--xdp-mode` allows.
        for mode in [XdpRunMode::Native, XdpRunMode::Generic] {
            let Some(path) = dir.as_deref().map(|d| xdp_pin(d, mode, iface)) else { break };
            if !path.exists() {
                continue;
            }
            let allowed = match how {
                XdpAttach::Auto => true,
                XdpAttach::Native => mode == XdpRunMode::Native,
                XdpAttach::Generic => mode == XdpRunMode::Generic,
            };
            if !allowed {
                // The kernel takes one XDP mode at a time: the old link goes first.
                warn!(
                    iface,
                    from = mode.name(),
                    "changing the XDP mode: the uplink is unserved until it is attached again"
                );
                let _ = fs::remove_file(&path);
                continue;
            }
            let swapped = PinnedLink::from_pin(&path)
                .map_err(|e| e.to_string())
                .and_then(|p| XdpLink::try_from(FdLink::from(p)).map_err(|e| e.to_string()))
                .and_then(|link| xdp.attach_to_link(link).map_err(|e| xdp_error(&e, iface)))
                .and_then(|id| xdp.take_link(id).map_err(|e| e.to_string()));
            match swapped {
                Ok(link) => {
                    // Our descriptor goes; the pin holds the link.
                    drop(FdLink::try_from(link).map_err(|e| iface_err(e.to_string()))?);
                    info!(iface, mode = mode.name(), "XDP program replaced in place (BPF_LINK_UPDATE)");
                    self.external.insert(iface.to_owned(), ExternalHooks { xdp: Held::Pinned(path), uplink, mode });
                    self.sync_uplinks(false);
                    return Ok(mode);
                }
                // A link whose interface was deleted (and maybe created again).
                Err(e) if e.contains("Link has been severed") => {
                    info!(iface, "a pinned XDP link of a deleted interface: attaching afresh");
                    let _ = fs::remove_file(&path);
                }
                // Anything else: the earlier agent's program keeps serving.
                Err(e) => return Err(iface_err(format!("swapping the pinned XDP program in place: {e}"))),
            }
        }
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
                    let held = match dir.as_deref() {
                        None => Held::Owned(link),
                        Some(dir) => {
                            let path = xdp_pin(dir, run, iface);
                            let fd = FdLink::try_from(link).map_err(|e| iface_err(e.to_string()))?;
                            fd.pin(&path)
                                .map_err(|e| iface_err(format!("pinning the XDP link at {}: {e}", path.display())))?;
                            Held::Pinned(path)
                        }
                    };
                    if !failures.is_empty() {
                        warn!(iface, tried = ?failures, "native XDP refused; serving with generic XDP (slower)");
                    }
                    if run == XdpRunMode::Generic {
                        warn!(
                            iface,
                            "generic XDP sees TCP segments merged by GRO, whose partial checksums it cannot translate: turn GRO off on this interface (ethtool -K {iface} gro off)"
                        );
                    }
                    info!(iface, mode = run.name(), "XDP attached: serving ClusterSetIP traffic from outside");
                    self.external.insert(iface.to_owned(), ExternalHooks { xdp: held, uplink, mode: run });
                    self.sync_uplinks(false);
                    return Ok(run);
                }
                Err(e) => failures.push(format!("{}: {}", run.name(), xdp_error(&e, iface))),
            }
        }
        // Nothing left half-attached.
        release(iface, uplink);
        Err(iface_err(format!("attaching {PROG_XDP}: {}", failures.join("; "))))
    }

    /// `mcs_uplink` at `iface`'s TC ingress: an earlier agent's pinned link
    /// updated in place, else a new link, first in line.
    fn hook_uplink(&mut self, iface: &str, dir: Option<&Path>) -> Result<Held<SchedClassifierLink>, String> {
        let pin = dir.map(|d| tc_pin(d, iface));
        let prog = program(&mut self.ebpf, PROG_UPLINK).map_err(|e| e.to_string())?;
        if let Some(path) = &pin
            && path.exists()
        {
            if let Some(link) = adopt_link(path, iface, TcAttachType::Ingress) {
                let id = prog.attach_to_link(link).map_err(|e| format!("BPF_LINK_UPDATE of {PROG_UPLINK}: {e}"))?;
                let link = prog.take_link(id).map_err(|e| e.to_string())?;
                drop(FdLink::try_from(link).map_err(|e| e.to_string())?);
                return Ok(Held::Pinned(path.clone()));
            }
            let _ = fs::remove_file(path);
        }
        let options = TcAttachOptions::TcxOrder(LinkOrder::first());
        let id = prog
            .attach_with_options(iface, TcAttachType::Ingress, options)
            .map_err(|e| format!("attaching {PROG_UPLINK} (TCX ingress): {e}"))?;
        let link = prog.take_link(id).map_err(|e| e.to_string())?;
        let Some(path) = pin else { return Ok(Held::Owned(link)) };
        let fd = FdLink::try_from(link).map_err(|e| e.to_string())?;
        fd.pin(&path).map_err(|e| format!("pinning the link at {}: {e}", path.display()))?;
        Ok(Held::Pinned(path))
    }

    /// Releases earlier agents' pinned external links of interfaces not in
    /// `keep` (no longer named by `--external-interface`, or gone).
    pub fn release_unlisted_externals(&mut self, keep: &[String]) {
        let Some(dir) = self.layout.as_ref().map(external_dir) else { return };
        for iface in pinned_externals(&dir) {
            if keep.contains(&iface) {
                continue;
            }
            if let Some(hooks) = self.external.remove(&iface) {
                release_external(&iface, hooks);
            }
            let _ = fs::remove_file(tc_pin(&dir, &iface));
            for mode in [XdpRunMode::Native, XdpRunMode::Generic] {
                let _ = fs::remove_file(xdp_pin(&dir, mode, &iface));
            }
            info!(iface, "released an external interface not served any more");
            // Its own entry only: the interfaces kept are attached after
            // this, one by one, and an earlier agent's programs on them
            // read the same map meanwhile.
            if let Ok(ifindex) = nix::net::if_::if_nametoindex(iface.as_str())
                && let Some(map) = self.ebpf.map_mut(MAP_XNAT_UPLINKS)
                && let Ok(mut uplinks) = aya::maps::HashMap::<_, u32, u32>::try_from(map)
            {
                let _ = uplinks.remove(&ifindex);
            }
        }
    }

    /// Takes over `old`'s external interfaces (a growth). Links held by
    /// the old process (`--no-pin`) get this datapath's programs in place
    /// (BPF_LINK_UPDATE), so no packet from outside meets no program;
    /// pinned ones are found by [`Datapath::attach_external`] and updated
    /// the same way.
    pub fn take_externals(&mut self, old: &mut Datapath) -> Result<(), DatapathError> {
        for (iface, hooks) in std::mem::take(&mut old.external) {
            let ExternalHooks { xdp: Held::Owned(link), uplink: Held::Owned(uplink), mode } = hooks else { continue };
            let err = |message: String| DatapathError::Interface { iface: iface.clone(), message };
            // The TC half first, as at attach: it reads this datapath's maps.
            let tc = program(&mut self.ebpf, PROG_UPLINK)?;
            let id = tc.attach_to_link(uplink).map_err(|e| err(format!("swapping {PROG_UPLINK} in place: {e}")))?;
            let uplink = tc.take_link(id).map_err(|e| err(e.to_string()))?;
            let xdp = self.xdp_program_mut()?;
            let id = xdp.attach_to_link(link).map_err(|e| err(format!("swapping the XDP program in place: {e}")))?;
            let link = xdp.take_link(id).map_err(|e| err(e.to_string()))?;
            self.external.insert(iface, ExternalHooks { xdp: Held::Owned(link), uplink: Held::Owned(uplink), mode });
        }
        self.sync_uplinks(false);
        Ok(())
    }

    /// `XNAT_UPLINKS` made to hold the interfaces served, with their mode:
    /// where `mcs_xdp` may redirect a packet, and whether it checks the
    /// MTU. `trim`: also without any other (not while the interfaces are
    /// attached one by one: an earlier agent's programs on the others read
    /// the same map). Best effort: a stale or missing entry only sends
    /// packets through the stack, or lets a redirect to a vanished
    /// interface fail (dropped, as the interface is).
    fn sync_uplinks(&mut self, trim: bool) {
        let wanted: Vec<(u32, u32)> = self
            .external
            .iter()
            .filter_map(|(iface, hooks)| {
                let mode = if hooks.mode == XdpRunMode::Native { UPLINK_NATIVE } else { UPLINK_GENERIC };
                nix::net::if_::if_nametoindex(iface.as_str()).ok().map(|i| (i, mode))
            })
            .collect();
        let name = MAP_XNAT_UPLINKS;
        let Some(map) = self.ebpf.map_mut(name) else { return };
        let mut uplinks = match aya::maps::HashMap::<_, u32, u32>::try_from(map) {
            Ok(m) => m,
            Err(e) => return warn!(map = name, error = %e, "external interfaces not written"),
        };
        let stale: Vec<u32> =
            uplinks.keys().filter_map(Result::ok).filter(|k| !wanted.iter().any(|(i, _)| i == k)).collect();
        for (ifindex, mode) in &wanted {
            if let Err(e) = uplinks.insert(ifindex, mode, 0) {
                warn!(ifindex, error = %e, "an external interface not written: packets to it go through the stack");
            }
        }
        for ifindex in stale.into_iter().filter(|_| trim) {
            let _ = uplinks.remove(&ifindex);
        }
    }

    /// The XDP program (BPF_PROG_TEST_RUN in tests and benchmarks).
    pub fn xdp_program_mut(&mut self) -> Result<&mut Xdp, DatapathError> {
        if self.xdp_load.is_some() {
            return Err(DatapathError::Program { name: PROG_XDP, source: ProgramError::NotLoaded });
        }
        self.ebpf
            .program_mut(PROG_XDP)
            .ok_or(DatapathError::MissingProgram(PROG_XDP))?
            .try_into()
            .map_err(|source| DatapathError::Program { name: PROG_XDP, source })
    }

    /// The external interfaces served, with their XDP mode.
    pub fn external_interfaces(&self) -> Vec<(String, XdpRunMode)> {
        self.external.iter().map(|(i, h)| (i.clone(), h.mode)).collect()
    }

    /// Detaches from one external interface.
    pub fn forget_external(&mut self, iface: &str) -> bool {
        let Some(hooks) = self.external.remove(iface) else { return false };
        release_external(iface, hooks);
        self.sync_uplinks(true);
        true
    }

    /// Detaches every external interface (cleanup on exit), pins included.
    pub(super) fn release_externals(&mut self) {
        for (iface, hooks) in std::mem::take(&mut self.external) {
            release_external(&iface, hooks);
        }
        if let Some(dir) = self.layout.as_ref().map(external_dir) {
            remove_external_maps(&dir);
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
    release(iface, hooks.xdp);
    release(iface, hooks.uplink);
}

fn release<L: aya::programs::links::Link>(iface: &str, held: Held<L>) {
    match held {
        // Removing the pin drops the last reference: the link detaches.
        Held::Pinned(path) => {
            if let Err(e) = fs::remove_file(&path) {
                debug!(iface, path = %path.display(), error = %e, "unpinning an external link");
            }
        }
        Held::Owned(link) => {
            if let Err(e) = link.detach() {
                debug!(iface, error = %e, "detaching an external link");
            }
        }
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
            "another XDP program is attached to {iface} (a CNI's, a load balancer's, or an earlier agent's pinned under another --bpffs: `mcs-agent uninstall` removes those): it is not replaced; detach it or pick another interface ({text})"
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
