//! The kernel's side of a growth ([`crate::growth`] decides when and to
//! what): the larger datapath takes over from the serving one in the order
//! an upgrade keeps ([`super::switch`]), the serving one counting as the
//! older layout: flows carried, programs swapped in front with handoff,
//! the smaller maps retired.

use tracing::info;

use super::{
    config::{External, SocketLb},
    error::AgentError,
    switch::Switch,
    takeover::{apply_socket_lb, attach_externals, prepare_external, take_over},
};
use crate::{
    datapath::{self, AttachMode, Datapath, LayoutDir, OldMaps},
    source::links::Patterns,
};

/// What a grown datapath takes over from.
pub enum Old {
    /// The datapath it grew from (taken when it retires).
    Running(Option<Box<Datapath>>),
    /// An older layout's pins the agent had not taken over yet (a growth
    /// before the first takeover).
    Pinned(LayoutDir),
}

pub struct Growth<'a> {
    /// The grown datapath, programmed.
    pub datapath: &'a mut Datapath,
    pub olds: Vec<Old>,
    /// `--interface`.
    pub interfaces: &'a [String],
    /// The interfaces the old datapaths serve.
    pub served: &'a [String],
    pub patterns: &'a Patterns,
    pub attach: AttachMode,
    pub socket_lb: &'a SocketLb,
    pub external: &'a External,
}

impl Switch for Growth<'_> {
    type Error = AgentError;

    fn carry_over(&mut self, layout: usize) {
        let old: &dyn OldMaps = match &self.olds[layout] {
            Old::Running(Some(datapath)) => datapath.as_ref(),
            Old::Running(None) => return,
            Old::Pinned(layout) => layout,
        };
        let carried = datapath::carry_over(self.datapath, old);
        info!(
            conntrack = carried.conntrack,
            sockets = carried.sockets,
            affinity = carried.affinity,
            "carried flows over to the grown maps"
        );
    }

    fn set_handoff(&mut self, on: bool) -> Result<(), AgentError> {
        Ok(self.datapath.set_handoff(on)?)
    }

    fn take_over(&mut self) -> Result<(), AgentError> {
        // XDP has one program per interface and nothing behind it: the old
        // datapath's links are handed over and swapped in place, with the
        // source NAT settings in the grown maps first (the pod interfaces'
        // programs translate local backends' replies by them).
        let names = prepare_external(self.external, self.datapath)?;
        for old in &mut self.olds {
            if let Old::Running(Some(datapath)) = old {
                self.datapath.take_externals(datapath)?;
            }
        }
        attach_externals(self.external, self.datapath, names.as_deref().unwrap_or_default())?;
        // Pinned, the maps of flows from outside are the old datapath's
        // own; held by the process (`--no-pin`), they were copied before
        // the swap, and what the old programs opened since comes over now.
        if names.is_some() && self.datapath.layout().is_none() {
            for old in &self.olds {
                if let Old::Running(Some(datapath)) = old {
                    datapath::carry_over(self.datapath, datapath.as_ref());
                }
            }
        }
        take_over(self.datapath, self.interfaces, self.served, self.patterns, self.attach)?;
        apply_socket_lb(self.socket_lb, self.datapath)?;
        // Pinned, the old socket links went with the swap; held by this
        // process (`--no-pin`), they go now, before the last copy.
        for old in &mut self.olds {
            if let Old::Running(Some(datapath)) = old {
                datapath.release_socket_links();
            }
        }
        Ok(())
    }

    fn retire(&mut self, layout: usize) {
        match &mut self.olds[layout] {
            Old::Running(datapath) => {
                if let Some(datapath) = datapath.take() {
                    datapath.retire();
                }
            }
            Old::Pinned(layout) => datapath::retire_layout(layout),
        }
    }
}
