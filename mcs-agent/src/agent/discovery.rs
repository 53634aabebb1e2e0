//! Interfaces found by `--interface-pattern` (and `--external-interface`
//! globs, for the XDP programs): attach to one that appears,
//! forget one that goes away, and never leave a gap on one that was
//! attached already. The datapath is behind a trait, so the cases (a
//! rename, a missed removal, an explicit interface) are tested without links.

use std::{collections::BTreeMap, fmt::Display};

use tracing::{info, warn};

use crate::{
    datapath::{AttachMode, Datapath, DatapathError, XdpAttach},
    source::links::LinkEvent,
};

/// The programs' hooks on interfaces.
pub trait Hooks {
    type Error: Display;
    fn is_attached(&self, iface: &str) -> bool;
    fn attach(&mut self, iface: &str) -> Result<(), Self::Error>;
    /// Stops tracking an interface that is gone (its hooks went with it).
    fn forget(&mut self, iface: &str);
}

/// The datapath, attaching in one mode.
pub struct DatapathHooks<'a>(pub &'a mut Datapath, pub AttachMode);

impl Hooks for DatapathHooks<'_> {
    type Error = DatapathError;

    fn is_attached(&self, iface: &str) -> bool {
        self.0.is_attached(iface)
    }

    fn attach(&mut self, iface: &str) -> Result<(), DatapathError> {
        self.0.attach(iface, self.1).map(|_| ())
    }

    fn forget(&mut self, iface: &str) {
        self.0.forget(iface);
    }
}

/// The XDP programs on external interfaces (`--external-interface` globs).
pub struct ExternalHooks<'a>(pub &'a mut Datapath, pub XdpAttach);

impl Hooks for ExternalHooks<'_> {
    type Error = DatapathError;

    fn is_attached(&self, iface: &str) -> bool {
        self.0.external_interfaces().iter().any(|(i, _)| i == iface)
    }

    fn attach(&mut self, iface: &str) -> Result<(), DatapathError> {
        self.0.attach_external(iface, self.1).map(|mode| {
            info!(iface, mode = mode.name(), "serving a new external interface");
        })
    }

    fn forget(&mut self, iface: &str) {
        self.0.forget_external(iface);
    }
}

/// Links attached through a pattern, by ifindex.
#[derive(Debug, Default)]
pub struct Discovered {
    names: BTreeMap<u32, String>,
}

impl Discovered {
    /// Attaches to a pattern-matched link that appeared; forgets one that went away.
    pub fn on_event(&mut self, event: LinkEvent, hooks: &mut impl Hooks) {
        let discovered = &mut self.names;
        match event {
            LinkEvent::Present { name, index } => {
                if discovered.get(&index) == Some(&name) {
                    return;
                }
                // A renamed link: start over.
                if let Some(old) = discovered.remove(&index) {
                    hooks.forget(&old);
                }
                // Attached already (an explicit --interface): keep it, never leave a gap.
                if hooks.is_attached(&name) && !discovered.values().any(|n| *n == name) {
                    discovered.insert(index, name);
                    return;
                }
                // A new link reusing the name of one whose removal we missed.
                if hooks.is_attached(&name) {
                    hooks.forget(&name);
                    discovered.retain(|_, n| *n != name);
                }
                match hooks.attach(&name) {
                    Ok(()) => {
                        discovered.insert(index, name);
                    }
                    // Often a link that vanished again at once; the next event retries.
                    Err(e) => warn!(iface = name, error = %e, "attaching to a discovered interface failed"),
                }
            }
            LinkEvent::Gone { index, .. } => {
                // The name it was attached by: a rename since changed the
                // event's.
                if let Some(name) = discovered.remove(&index) {
                    hooks.forget(&name);
                    info!(iface = name, "interface gone");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Records what the loop asked of the datapath.
    #[derive(Default)]
    struct Fake {
        attached: BTreeSet<String>,
        /// Interfaces whose attach fails (vanished again).
        failing: BTreeSet<String>,
        log: Vec<String>,
    }

    impl Hooks for Fake {
        type Error = String;

        fn is_attached(&self, iface: &str) -> bool {
            self.attached.contains(iface)
        }

        fn attach(&mut self, iface: &str) -> Result<(), String> {
            self.log.push(format!("attach {iface}"));
            if self.failing.contains(iface) {
                return Err("no such device".into());
            }
            self.attached.insert(iface.to_owned());
            Ok(())
        }

        fn forget(&mut self, iface: &str) {
            self.log.push(format!("forget {iface}"));
            self.attached.remove(iface);
        }
    }

    fn present(name: &str, index: u32) -> LinkEvent {
        LinkEvent::Present { name: name.into(), index }
    }

    fn gone(name: &str, index: u32) -> LinkEvent {
        LinkEvent::Gone { name: name.into(), index }
    }

    #[test]
    fn a_new_link_is_attached_once_and_forgotten_when_gone() {
        let (mut d, mut hooks) = (Discovered::default(), Fake::default());
        d.on_event(present("veth1", 7), &mut hooks);
        d.on_event(present("veth1", 7), &mut hooks);
        d.on_event(gone("veth1", 7), &mut hooks);
        d.on_event(gone("veth1", 7), &mut hooks);
        assert_eq!(hooks.log, ["attach veth1", "forget veth1"]);
    }

    #[test]
    fn a_renamed_link_starts_over() {
        let (mut d, mut hooks) = (Discovered::default(), Fake::default());
        d.on_event(present("veth1", 7), &mut hooks);
        d.on_event(present("veth9", 7), &mut hooks);
        assert_eq!(hooks.log, ["attach veth1", "forget veth1", "attach veth9"]);
    }

    #[test]
    fn a_link_renamed_away_from_the_pattern_is_forgotten_by_the_name_it_had() {
        let (mut d, mut hooks) = (Discovered::default(), Fake::default());
        d.on_event(present("veth1", 7), &mut hooks);
        // The watch reports a rename to a name no pattern matches as gone,
        // under the new name: the hooks go by the old one.
        d.on_event(gone("eth7", 7), &mut hooks);
        assert_eq!(hooks.log, ["attach veth1", "forget veth1"]);
        assert!(!hooks.is_attached("veth1"));
    }

    #[test]
    fn an_explicit_interface_is_kept_without_a_gap_and_not_forgotten_by_others() {
        let mut hooks = Fake { attached: BTreeSet::from(["veth0".to_owned()]), ..Default::default() };
        let mut d = Discovered::default();
        d.on_event(present("veth0", 3), &mut hooks);
        assert!(hooks.log.is_empty(), "attached already: no detach, no re-attach ({:?})", hooks.log);
        // A link gone that was never discovered leaves everything alone.
        d.on_event(gone("veth5", 9), &mut hooks);
        assert!(hooks.log.is_empty() && hooks.is_attached("veth0"));
    }

    #[test]
    fn a_name_reused_after_a_missed_removal_is_attached_afresh() {
        let (mut d, mut hooks) = (Discovered::default(), Fake::default());
        d.on_event(present("veth1", 7), &mut hooks);
        // veth1 went and came back with a new index; the removal was missed.
        d.on_event(present("veth1", 8), &mut hooks);
        assert_eq!(hooks.log, ["attach veth1", "forget veth1", "attach veth1"]);
        // The old index is no longer ours: its late removal changes nothing.
        d.on_event(gone("veth1", 7), &mut hooks);
        assert_eq!(hooks.log.len(), 3);
        assert!(hooks.is_attached("veth1"));
    }

    #[test]
    fn a_failed_attach_is_retried_by_the_next_event() {
        let (mut d, mut hooks) = (Discovered::default(), Fake::default());
        hooks.failing.insert("veth1".into());
        d.on_event(present("veth1", 7), &mut hooks);
        hooks.failing.clear();
        d.on_event(present("veth1", 7), &mut hooks);
        assert_eq!(hooks.log, ["attach veth1", "attach veth1"]);
        assert!(hooks.is_attached("veth1"));
    }
}
