//! Attaching the programs to interfaces: TCX links, or netlink filters
//! where TCX is missing, and taking over or removing an earlier agent's.

// One module split by concern: the pieces share the root's types and imports.
use super::*;

/// The netlink filter slot our programs own on every interface: replacing the
/// filter at this priority and handle swaps the program atomically.
pub(super) const NL_PRIORITY: u16 = 1;
pub(super) const NL_HANDLE: u32 = 0x4d43;

pub(super) fn hook_link_id(hook: &Hook) -> Option<u32> {
    match hook {
        Hook::Pinned { link_id, .. } => Some(*link_id),
        Hook::Owned(l) => <&FdLink>::try_from(l).ok()?.info().ok().map(|i| i.id()),
        Hook::Netlink(_) => None,
    }
}

/// Detaches one interface's hooks.
pub(super) fn release(iface: &str, hooks: Vec<Hook>) {
    for hook in hooks {
        match hook {
            Hook::Pinned { path, .. } => {
                // Removing the pin drops the last reference: the link detaches.
                if let Err(e) = fs::remove_file(&path) {
                    debug!(iface, error = %e, "unpinning a link");
                }
            }
            Hook::Owned(link) => {
                if let Err(e) = link.detach() {
                    // The kernel already dropped the link of a deleted interface.
                    debug!(iface, error = %e, "detach");
                }
            }
            Hook::Netlink(attach_type) => {
                if let Ok(link) =
                    SchedClassifierLink::attached(iface, attach_type, NL_PRIORITY, TcHandle::from(NL_HANDLE), None)
                    && let Err(e) = link.detach()
                {
                    debug!(iface, error = %e, "removing the netlink filter");
                }
            }
        }
    }
}

/// Opens an earlier agent's pinned link if it still hooks `iface`: the
/// interface may have been deleted and created again under the same name.
pub(super) fn adopt_link(path: &Path, iface: &str, attach_type: TcAttachType) -> Option<SchedClassifierLink> {
    let fd = FdLink::from(PinnedLink::from_pin(path).ok()?);
    let prog_id = fd.info().ok()?.program_id();
    let (_, programs) = SchedClassifier::query_tcx(iface, attach_type).ok()?;
    if !programs.iter().any(|p| p.id() == prog_id) {
        return None;
    }
    SchedClassifierLink::try_from(fd).ok()
}

/// Finds copies of our programs on `iface` that are not the hooks in `keep`
/// and removes them, saying so: a TCX link pinned by something else, or an
/// older agent's netlink filter at another priority, would translate with
/// maps nobody updates.
pub fn remove_stale(iface: &str, keep: &[u32], mode: AttachMode) -> Vec<String> {
    let mut removed = Vec::new();
    for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
        if mode != AttachMode::Netlink {
            // Our own netlink filters only matter in netlink mode; in TCX mode
            // every netlink copy is stale.
            for name in [PROG_INGRESS, PROG_EGRESS] {
                if tc::qdisc_detach_program(iface, attach_type, name).is_ok() {
                    warn!(
                        iface,
                        program = name,
                        ?attach_type,
                        "removed a stale netlink filter left by an earlier agent"
                    );
                    removed.push(format!("netlink {name} {attach_type:?}"));
                }
            }
        }
        let Ok((_, programs)) = SchedClassifier::query_tcx(iface, attach_type) else {
            continue;
        };
        let ours: Vec<u32> = programs
            .iter()
            .filter(|p| matches!(p.name_as_str(), Some(PROG_INGRESS | PROG_EGRESS)))
            .map(|p| p.id())
            .collect();
        if ours.is_empty() {
            continue;
        }
        for link in aya::programs::loaded_links().filter_map(Result::ok) {
            if link.link_type().ok() == Some(LinkType::Tcx)
                && ours.contains(&link.program_id())
                && !keep.contains(&link.id())
            {
                match detach_link(link.id()) {
                    Ok(()) => {
                        warn!(
                            iface,
                            link = link.id(),
                            program = link.program_id(),
                            ?attach_type,
                            "detached a stale TCX link left by an earlier agent"
                        );
                        removed.push(format!("tcx link {} {attach_type:?}", link.id()));
                    }
                    Err(e) => {
                        warn!(iface, link = link.id(), error = %e, "a stale TCX link could not be detached; it may shadow this agent")
                    }
                }
            }
        }
    }
    removed
}

/// BPF_LINK_DETACH on a link we only know by id (aya exposes no such call).
pub(super) fn detach_link(link_id: u32) -> io::Result<()> {
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let mut attr = [0u32; 4];
    attr[0] = link_id;
    // SAFETY: attr is a zeroed bpf_attr prefix of the size we pass.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_GET_FD_BY_ID, attr.as_ptr(), size_of_val(&attr)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attr = [fd.as_raw_fd() as u32, 0, 0, 0];
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, attr.as_ptr(), size_of_val(&attr)) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

impl Datapath {
    pub fn program_mut(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, name)
    }

    /// Hooks ingress (DNAT) and egress (reverse NAT) to `iface`, first in line.
    ///
    /// Our programs already there (an earlier agent's, through a pinned TCX link
    /// or our netlink filter slot) are replaced in place, atomically: no packet
    /// ever passes the interface without one of them. Copies of our programs
    /// we cannot replace (a TCX link pinned elsewhere) are removed.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<Attached, DatapathError> {
        let iface_err = |message: String| DatapathError::Interface { iface: iface.to_owned(), message };
        if nix::net::if_::if_nametoindex(iface).is_err() {
            return Err(iface_err("no such interface in this network namespace".into()));
        }
        let mode = mode.resolve();
        if mode == AttachMode::Netlink {
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => {}
                Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(iface_err(format!("adding the clsact qdisc: {e}"))),
            }
        }
        let mut hooks = Vec::new();
        let mut replaced = false;
        // Reverse NAT first: a reply must never meet a translation it cannot undo
        // (DNAT in place while the egress hook is still missing or older).
        for (name, attach_type) in [(PROG_EGRESS, TcAttachType::Egress), (PROG_INGRESS, TcAttachType::Ingress)] {
            let hooked = match mode {
                AttachMode::Netlink => self.hook_netlink(iface, name, attach_type),
                _ => self.hook_tcx(iface, name, attach_type),
            };
            match hooked {
                Ok((hook, was_there)) => {
                    replaced |= was_there;
                    hooks.push(hook);
                }
                Err(message) => {
                    // Never leave an interface half-attached (DNAT without reverse NAT),
                    // unless that half was there before us.
                    if !replaced {
                        release(iface, hooks);
                    }
                    return Err(iface_err(format!("attaching {name} ({mode:?}): {message}")));
                }
            }
        }
        let mut keep: Vec<u32> = hooks.iter().filter_map(hook_link_id).collect();
        keep.extend(self.protected_links());
        remove_stale(iface, &keep, mode);
        info!(iface, ?mode, replaced, "attached");
        self.attached.insert(iface.to_owned(), Attachment { hooks });
        Ok(if replaced { Attached::Replaced(mode) } else { Attached::New(mode) })
    }

    pub(super) fn hook_tcx(
        &mut self,
        iface: &str,
        name: &'static str,
        attach_type: TcAttachType,
    ) -> Result<(Hook, bool), String> {
        let pin = self.layout.as_ref().map(|l| l.link(iface, attach_type));
        // An earlier agent's pinned link on this very interface (this layout's,
        // else an older layout's): swap the program in place.
        let candidates: Vec<PathBuf> =
            pin.iter().cloned().chain(self.older.iter().map(|l| l.link(iface, attach_type))).collect();
        // An older layout's link on it (an upgrade, a growth): ours goes in
        // front of it even where this layout's own link is there too (a
        // growth interrupted before its switch left the grown link in front).
        let older_here = self.older.iter().any(|l| l.link(iface, attach_type).exists());
        let prog = program(&mut self.ebpf, name).map_err(|e| e.to_string())?;
        for found in candidates.iter().filter(|p| p.exists()) {
            let Some(link) = adopt_link(found, iface, attach_type) else {
                // A link of an interface that was deleted and created again.
                let _ = fs::remove_file(found);
                continue;
            };
            if pin.as_ref() != Some(found) || older_here {
                // An older layout's link: its programs know the flows of the older
                // maps, so they stay behind ours (see `CONFIG_F_HANDOFF`) until
                // `retire_layout` unpins them.
                drop(link);
                let options = TcAttachOptions::TcxOrder(LinkOrder::first());
                let id = prog.attach_with_options(iface, attach_type, options).map_err(|e| e.to_string())?;
                let fd = FdLink::try_from(prog.take_link(id).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
                let link_id = fd.info().map_err(|e| e.to_string())?.id();
                let path = pin.clone().expect("older layouts are only set with pins");
                // Pinned beside and renamed over this layout's own link, if
                // any: its pin gone, it detaches (ours is in front already).
                // `:` is in no interface name (`pinned_interfaces` skips it).
                let fresh = path.with_file_name(format!("{}:new", escape(iface)));
                let _ = fs::remove_file(&fresh);
                fd.pin(&fresh).map_err(|e| format!("pinning the link at {}: {e}", fresh.display()))?;
                fs::rename(&fresh, &path).map_err(|e| format!("moving the link's pin to {}: {e}", path.display()))?;
                return Ok((Hook::Pinned { path, link_id }, true));
            }
            let id = prog.attach_to_link(link).map_err(|e| format!("BPF_LINK_UPDATE: {e}"))?;
            let link = prog.take_link(id).map_err(|e| e.to_string())?;
            let fd = FdLink::try_from(link).map_err(|e| e.to_string())?;
            let link_id = fd.info().map_err(|e| e.to_string())?.id();
            return Ok((Hook::Pinned { path: found.clone(), link_id }, true));
        }
        let options = TcAttachOptions::TcxOrder(LinkOrder::first());
        let id = prog.attach_with_options(iface, attach_type, options).map_err(|e| e.to_string())?;
        let link = prog.take_link(id).map_err(|e| e.to_string())?;
        let Some(path) = pin else {
            return Ok((Hook::Owned(link), false));
        };
        let fd = FdLink::try_from(link).map_err(|e| e.to_string())?;
        let link_id = fd.info().map_err(|e| e.to_string())?.id();
        // Dropping the PinnedLink closes our fd; the pin keeps the link attached.
        fd.pin(&path).map_err(|e| format!("pinning the link at {}: {e}", path.display()))?;
        Ok((Hook::Pinned { path, link_id }, false))
    }

    pub(super) fn hook_netlink(
        &mut self,
        iface: &str,
        name: &'static str,
        attach_type: TcAttachType,
    ) -> Result<(Hook, bool), String> {
        let prog = program(&mut self.ebpf, name).map_err(|e| e.to_string())?;
        let handle = TcHandle::from(NL_HANDLE);
        // Replace in place when our filter is there (an earlier agent's), else create it.
        let existing =
            SchedClassifierLink::attached(iface, attach_type, NL_PRIORITY, handle, None).map_err(|e| e.to_string())?;
        let (id, replaced) = match prog.attach_to_link(existing) {
            Ok(id) => (id, true),
            Err(_) => {
                let options =
                    TcAttachOptions::Netlink(NlOptions { priority: NL_PRIORITY, handle, ..Default::default() });
                (prog.attach_with_options(iface, attach_type, options).map_err(|e| e.to_string())?, false)
            }
        };
        // The filter lives in the kernel on its own; forget aya's handle so
        // dropping the program does not remove it.
        std::mem::forget(prog.take_link(id).map_err(|e| e.to_string())?);
        Ok((Hook::Netlink(attach_type), replaced))
    }

    /// Links that are ours even though this call did not make them: this
    /// agent's hooks elsewhere, and every link pinned in our layout directories
    /// (an earlier agent's, still serving interfaces not taken over yet).
    pub(super) fn protected_links(&self) -> Vec<u32> {
        let mut ids = self.link_ids();
        ids.extend(&self.protected);
        for layout in self.layout.iter().chain(&self.older) {
            for iface in layout.pinned_interfaces() {
                for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
                    if let Ok(pinned) = PinnedLink::from_pin(layout.link(&iface, attach_type))
                        && let Ok(info) = FdLink::from(pinned).info()
                    {
                        ids.push(info.id());
                    }
                }
            }
        }
        ids
    }

    /// Detaches from `iface` (or forgets it, when the interface is already gone).
    pub fn forget(&mut self, iface: &str) -> bool {
        let Some(attachment) = self.attached.remove(iface) else {
            return false;
        };
        release(iface, attachment.hooks);
        true
    }

    /// Interfaces with a pinned link that this agent has not attached (yet).
    pub fn pinned_not_attached(&self) -> Vec<String> {
        let Some(layout) = &self.layout else { return Vec::new() };
        layout.pinned_interfaces().into_iter().filter(|i| !self.attached.contains_key(i)).collect()
    }

    /// Detaches and unpins an earlier agent's links on an interface this agent
    /// does not serve (no longer named by a flag or pattern, or gone).
    pub fn release_pinned(&mut self, iface: &str) {
        let Some(layout) = &self.layout else { return };
        for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
            let path = layout.link(iface, attach_type);
            if path.exists() {
                match fs::remove_file(&path) {
                    Ok(()) => info!(
                        iface,
                        direction = direction(attach_type),
                        "released a pinned link of an interface not served any more"
                    ),
                    Err(e) => warn!(iface, path = %path.display(), error = %e, "removing a pinned link failed"),
                }
            }
        }
    }

    pub fn is_attached(&self, iface: &str) -> bool {
        self.attached.contains_key(iface)
    }

    pub fn attached_count(&self) -> usize {
        self.attached.len()
    }
}
