//! Growth (see [`crate::growth`]): a larger datapath of the same layout,
//! built beside the serving one, which then retires.

// One module split by concern: the pieces share the root's types and imports.
use super::*;

impl Datapath {
    /// Loads a datapath like this one with maps of `capacity`: pinned in the
    /// layout's growth directory when this one is pinned, attached nowhere.
    /// Dropped before it takes over, it removes itself. Its programs hand
    /// off to this one's (kept attached behind them) until this one retires.
    pub fn open_grown(&self, capacity: Capacity, kernel_log: KernelLog) -> Result<Datapath, DatapathError> {
        if let Some(layout) = self.layout.as_ref().filter(|l| l.is_growth()) {
            // Its pins could not be moved into place: a growth from here
            // would build where it serves.
            return Err(DatapathError::Bpffs {
                path: layout.dir.clone(),
                message: "the datapath still serves from its growth directory; the next start takes it over".into(),
            });
        }
        let layout = self.layout.as_ref().map(LayoutDir::growth);
        if let Some(leftover) = &layout {
            // Of a growth of this agent's that failed before it took over
            // (an interrupted one is taken over before the agent grows).
            remove_layout(leftover);
        }
        let mut grown = Self::open_at(Sizes { capacity, ..self.sizes }, layout, kernel_log)?;
        if grown.adopted {
            return Err(DatapathError::Bpffs {
                path: grown.layout.as_ref().map(|l| l.dir.clone()).unwrap_or_default(),
                message: "a leftover growth directory could not be removed".into(),
            });
        }
        grown.cleanup_on_exit = true;
        grown.protected = self.link_ids();
        grown.older = self.layout.iter().chain(&self.older).cloned().collect();
        Ok(grown)
    }

    /// The interfaces this datapath's programs are attached to.
    pub fn attached_interfaces(&self) -> Vec<String> {
        self.attached.keys().cloned().collect()
    }

    /// Ids of this datapath's TCX links.
    pub(super) fn link_ids(&self) -> Vec<u32> {
        self.attached.values().flat_map(|a| a.hooks.iter().filter_map(hook_link_id)).collect()
    }

    /// Steps aside for the datapath grown from it, which has taken over
    /// every interface and the socket hooks: its links are detached (netlink
    /// filters were replaced in place and stay), its pins removed.
    pub fn retire(mut self) {
        self.finished = true;
        for (iface, attachment) in std::mem::take(&mut self.attached) {
            let hooks: Vec<Hook> =
                attachment.hooks.into_iter().filter(|hook| !matches!(hook, Hook::Netlink(_))).collect();
            release(&iface, hooks);
        }
        self.release_socket_links();
        if let Some(layout) = self.layout.take() {
            remove_layout(&layout);
            info!(path = %layout.dir.display(), "retired the datapath grown from");
        }
    }

    /// Once the datapath grown from is retired: moves this one's pins from
    /// the growth directory to the layout's own, where every tool looks.
    /// bpffs renames a directory with what is pinned in it, links included:
    /// nothing detaches. Should that fail (the old directory could not be
    /// removed), it serves from the growth directory, which the next start
    /// takes over as an older layout; it grows no more until then.
    pub fn settle(&mut self) {
        self.protected.clear();
        self.older.clear();
        if let Some(growth) = self.layout.clone().filter(LayoutDir::is_growth) {
            let main = growth.main();
            if let Err(e) = fs::rename(&growth.dir, &main.dir) {
                warn!(
                    from = %growth.dir.display(),
                    to = %main.dir.display(),
                    error = %e,
                    "moving the grown datapath's pins into place failed; it serves from where it is, grows no more, and the next start takes it over"
                );
                return;
            }
            let moved = |path: &mut PathBuf| {
                if let Ok(rest) = path.strip_prefix(&growth.dir) {
                    *path = main.dir.join(rest);
                }
            };
            for hook in self.attached.values_mut().flat_map(|a| a.hooks.iter_mut()) {
                if let Hook::Pinned { path, .. } = hook {
                    moved(path);
                }
            }
            if let Some(sockets) = &mut self.sockets {
                sockets.moved(&moved);
            }
            self.layout = Some(main);
        }
    }

    /// Detaches this datapath's socket programs (a growth, once the grown
    /// datapath's are attached: translations must all go to its maps before
    /// its last copy of them).
    pub fn release_socket_links(&mut self) {
        if let Some(sockets) = self.sockets.take() {
            sock::release_sockets(sockets);
        }
    }
}
