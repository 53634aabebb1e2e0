//! The kernel's side of a takeover (the order is [`super::switch`]'s): carry
//! an older layout's flows over, hook this agent's programs everywhere, and
//! attach the socket programs as `--socket-lb*` asked.

use std::path::PathBuf;

use tracing::{info, warn};

use super::{
    config::{SocketLb, SocketLbMode},
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
