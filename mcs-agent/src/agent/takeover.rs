//! The kernel's side of a takeover (the order is [`super::switch`]'s): carry
//! an older layout's flows over, hook this agent's programs everywhere, and
//! attach the socket programs as `--socket-lb*` asked.

use std::path::PathBuf;

use tracing::{info, warn};

use super::{
    config::{External, SocketLb, SocketLbMode},
    error::{AgentError, Context as _},
    switch::Switch,
};
use crate::{
    datapath::{self, AttachMode, Attached, Datapath},
    source::links::Patterns,
};

pub struct Takeover<'a> {
    pub datapath: &'a mut Datapath,
    pub older: &'a [datapath::LayoutDir],
    pub interfaces: &'a [String],
    pub patterns: &'a Patterns,
    pub attach: AttachMode,
    pub socket_lb: &'a SocketLb,
    pub external: &'a External,
    /// Copies made so far: the first of each layout is logged.
    pub carried: usize,
}

impl Switch for Takeover<'_> {
    type Error = AgentError;

    fn carry_over(&mut self, layout: usize) {
        let layout = &self.older[layout];
        let carried = datapath::carry_over(self.datapath, layout);
        if self.carried < self.older.len() {
            info!(
                from = layout.version,
                conntrack = carried.conntrack,
                converted = carried.converted,
                sockets = carried.sockets,
                affinity = carried.affinity,
                "carried over an older layout's flows"
            );
        }
        self.carried += 1;
    }

    fn set_handoff(&mut self, on: bool) -> Result<(), AgentError> {
        Ok(self.datapath.set_handoff(on)?)
    }

    fn take_over(&mut self) -> Result<(), AgentError> {
        // The source NAT settings before the pod interfaces' programs, which
        // translate local backends' replies by them.
        apply_external(self.external, self.datapath)?;
        take_over(self.datapath, self.interfaces, &[], self.patterns, self.attach)?;
        apply_socket_lb(self.socket_lb, self.datapath)
    }

    fn retire(&mut self, layout: usize) {
        datapath::retire_layout(&self.older[layout]);
    }
}

/// Hooks this agent's programs everywhere: explicit interfaces (failing is
/// fatal), interfaces an earlier agent hooked that still match, and `also`
/// (those a datapath this one grew from served). Where an earlier agent's
/// programs are attached they are swapped atomically.
pub(super) fn take_over(
    datapath: &mut Datapath,
    interfaces: &[String],
    also: &[String],
    patterns: &Patterns,
    mode: AttachMode,
) -> Result<(), AgentError> {
    let mut replaced = 0;
    for iface in interfaces {
        if let Attached::Replaced(_) = datapath.attach(iface, mode).with_context(|| format!("--interface {iface}"))? {
            replaced += 1;
        }
    }
    let also = also.iter().filter(|i| !interfaces.contains(i)).cloned().map(|i| (i, true));
    let pinned = datapath.pinned_not_attached().into_iter().map(|i| (i, false));
    for (iface, served) in also.chain(pinned).collect::<Vec<_>>() {
        if datapath.is_attached(&iface) {
            continue;
        }
        let present = nix::net::if_::if_nametoindex(iface.as_str()).is_ok();
        if present && (served || patterns.matches(&iface)) {
            match datapath.attach(&iface, mode) {
                Ok(Attached::Replaced(_)) => replaced += 1,
                Ok(Attached::New(_)) => {}
                // The datapath grown from retires next: this interface
                // would be left unserved.
                // (One deleted meanwhile, a pod gone, is left out.)
                Err(e) if served && nix::net::if_::if_nametoindex(iface.as_str()).is_ok() => {
                    return Err(e).with_context(|| format!("taking over {iface} from the smaller maps"));
                }
                Err(e) => {
                    warn!(iface, error = %e, "taking over a pinned interface failed; the earlier agent's programs stay")
                }
            }
        } else {
            datapath.release_pinned(&iface);
        }
    }
    if replaced > 0 {
        info!(interfaces = replaced, "replaced an earlier agent's programs in place");
    }
    Ok(())
}

/// Attaches (or detaches) the socket programs once the maps hold the whole
/// state. By default a failure is a warning: pods are still served by the
/// TC path.
pub(super) fn apply_socket_lb(socket_lb: &SocketLb, datapath: &mut Datapath) -> Result<(), AgentError> {
    if socket_lb.mode == SocketLbMode::Off {
        datapath.detach_sockets();
        return Ok(());
    }
    let attached = (|| -> Result<PathBuf, AgentError> {
        let cgroup = match &socket_lb.cgroup {
            Some(path) => path.clone(),
            None => {
                let root = datapath::cgroup2_root().ok_or_else(|| {
                    AgentError::Config(
                        "no cgroup2 mount in /proc/self/mounts (mount the host's, or pass --socket-lb-cgroup)".into(),
                    )
                })?;
                // The root cgroup's id is 1; anything else is a cgroup
                // namespace's view (a container), which covers only itself.
                if datapath::cgroup_id(&root)? != 1 {
                    return Err(AgentError::Config(format!(
                        "the cgroup2 mount at {} is not the host's root (a cgroup namespace?): mount the host's cgroup2 and pass --socket-lb-cgroup",
                        root.display()
                    )));
                }
                root
            }
        };
        datapath.set_sock_exclude(&socket_lb.exclude).context("--socket-lb-exclude-cgroup")?;
        datapath.set_sock_host_only(socket_lb.host_only).context("--socket-lb")?;
        datapath.attach_sockets(&cgroup).context("--socket-lb-cgroup")?;
        Ok(cgroup)
    })();
    match attached {
        Ok(_) => Ok(()),
        Err(e) if socket_lb.mode == SocketLbMode::Auto => {
            warn!(
                error = crate::agent::error::chain(&e),
                "socket-level load balancing could not be attached: pods are served by the TC path (an earlier agent's socket programs, if any, stay)"
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Serves the external interfaces (`--external-interface`): the source NAT
/// settings first (an address not given is the first interface's), then
/// the programs on every interface named or matched. Failing is fatal: an
/// operator who asked for it relies on it.
pub(super) fn apply_external(external: &External, datapath: &mut Datapath) -> Result<(), AgentError> {
    let names = prepare_external(external, datapath)?;
    attach_externals(external, datapath, names.as_deref().unwrap_or_default())
}

/// Hooks the programs to the interfaces [`prepare_external`] found.
pub(super) fn attach_externals(
    external: &External,
    datapath: &mut Datapath,
    names: &[String],
) -> Result<(), AgentError> {
    for iface in names {
        datapath.attach_external(iface, external.mode).with_context(|| format!("--external-interface {iface}"))?;
    }
    Ok(())
}

/// The source NAT settings into the maps (an address not given is the
/// first interface's), and earlier agents' links of interfaces no longer
/// named released; the interfaces to serve. Cleared when none is named.
pub(super) fn prepare_external(
    external: &External,
    datapath: &mut Datapath,
) -> Result<Option<Vec<String>>, AgentError> {
    if external.interfaces.is_empty() {
        // An earlier agent's, of a flag since dropped; and no address is
        // translated back at pod interfaces any more.
        datapath.release_unlisted_externals(&[]);
        datapath.set_xnat(&crate::datapath::Xnat::default()).context("clearing the source NAT settings")?;
        return Ok(None);
    }
    let present: Vec<String> = nix::net::if_::if_nameindex()
        .map(|list| list.iter().map(|i| i.name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let mut names: Vec<String> = Vec::new();
    for wanted in &external.interfaces {
        // A glob may match nothing yet: interfaces that appear later are
        // served as they come (the agent's link watch).
        let matched: Vec<&String> = if is_glob(wanted) {
            let pattern = glob::Pattern::new(wanted)
                .map_err(|e| AgentError::Config(format!("--external-interface {wanted:?}: {}", e.msg)))?;
            present.iter().filter(|i| pattern.matches(i)).collect()
        } else {
            present.iter().filter(|i| *i == wanted).collect()
        };
        if matched.is_empty() && !is_glob(wanted) {
            return Err(AgentError::Config(format!(
                "--external-interface {wanted}: no such interface in this network namespace"
            )));
        }
        for iface in matched {
            if !names.contains(iface) {
                names.push(iface.clone());
            }
        }
    }
    let mut snat = external.snat.clone();
    if let Some(first) = names.first() {
        let (addr4, addr6) = interface_addresses(first);
        snat.addr4 = snat.addr4.or(addr4);
        snat.addr6 = snat.addr6.or(addr6);
    }
    if snat.addr4.is_none() && snat.addr6.is_none() {
        return Err(AgentError::Config(match names.first() {
            Some(first) => format!(
                "--external-interface {first}: it has no address to translate flows from outside to; give --external-snat-address"
            ),
            None => format!(
                "--external-interface {}: no interface matches yet, so none gives the address to translate flows from outside to; give --external-snat-address",
                external.interfaces.join(",")
            ),
        }));
    }
    warn_port_overlap(snat.ports);
    for addr in [snat.addr4.map(std::net::IpAddr::V4), snat.addr6.map(std::net::IpAddr::V6)].into_iter().flatten() {
        if !is_local(addr) {
            warn!(%addr, "--external-snat-address is not an address of this node: replies to it will not come back here");
        }
    }
    datapath.set_xnat(&snat).context("--external-snat-address, --external-source-cidr")?;
    datapath.release_unlisted_externals(&names);
    info!(interfaces = ?names, snat = %datapath::describe_xnat(&snat), "serving ClusterSetIP traffic from outside");
    Ok(Some(names))
}

/// Whether an `--external-interface` is a glob (served as interfaces
/// appear) rather than a name.
pub(super) fn is_glob(name: &str) -> bool {
    name.contains(['*', '?', '['])
}

/// Whether `addr` is assigned to an interface of this network namespace.
fn is_local(addr: std::net::IpAddr) -> bool {
    nix::ifaddrs::getifaddrs().into_iter().flatten().filter_map(|a| a.address).any(|a| {
        a.as_sockaddr_in().map(|s| std::net::IpAddr::V4(s.ip())) == Some(addr)
            || a.as_sockaddr_in6().map(|s| std::net::IpAddr::V6(s.ip())) == Some(addr)
    })
}

/// The first IPv4 and the first global IPv6 address of `iface`.
fn interface_addresses(iface: &str) -> (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>) {
    let (mut v4, mut v6) = (None, None);
    for ifa in nix::ifaddrs::getifaddrs().into_iter().flatten().filter(|a| a.interface_name == iface) {
        let Some(addr) = ifa.address else { continue };
        if let Some(a) = addr.as_sockaddr_in() {
            v4 = v4.or(Some(a.ip()));
        } else if let Some(a) = addr.as_sockaddr_in6() {
            let ip = a.ip();
            // Link-local addresses do not route to other clusters.
            if ip.segments()[0] & 0xffc0 != 0xfe80 {
                v6 = v6.or(Some(ip));
            }
        }
    }
    (v4, v6)
}

/// A source NAT port the node may also use for its own connections would
/// take their replies.
fn warn_port_overlap((low, high): (u16, u16)) {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else { return };
    let mut ports = text.split_whitespace().filter_map(|p| p.parse::<u16>().ok());
    if let (Some(first), Some(last)) = (ports.next(), ports.next())
        && low <= last
        && first <= high
    {
        warn!(
            snat_ports = format!("{low}-{high}"),
            local_ports = format!("{first}-{last}"),
            "--external-snat-ports overlaps net.ipv4.ip_local_port_range: the node's own connections may lose replies to translated flows"
        );
    }
}
