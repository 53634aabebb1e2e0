//! Pins: where each layout version keeps its maps and links on bpffs,
//! and how a node is cleaned of them.

// One module split by concern: the pieces share the root's types and imports.
use super::*;

/// Where one layout version keeps its pins: `<bpffs>/mcs/v<N>/<MAP>` and
/// `<bpffs>/mcs/v<N>/links/<ingress|egress>/<iface>`.
#[derive(Clone, Debug)]
pub struct LayoutDir {
    pub version: u32,
    pub dir: PathBuf,
}

impl LayoutDir {
    pub fn new(bpffs: &Path, version: u32) -> Self {
        Self { version, dir: bpffs.join(PIN_ROOT).join(format!("v{version}")) }
    }

    /// Where a larger datapath of this layout is built before it takes
    /// over (see [`crate::growth`]): `<bpffs>/mcs/grow-v<N>`, renamed to
    /// `v<N>` once the old one is retired.
    pub fn growth(&self) -> LayoutDir {
        self.sibling(format!("{GROWTH_PREFIX}v{}", self.version))
    }

    /// This is a growth directory (see [`LayoutDir::growth`]).
    pub fn is_growth(&self) -> bool {
        self.dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(GROWTH_PREFIX))
    }

    /// The layout's own directory, for a growth directory.
    pub fn main(&self) -> LayoutDir {
        self.sibling(format!("v{}", self.version))
    }

    /// This version in another directory beside this one.
    fn sibling(&self, name: String) -> LayoutDir {
        let parent = self.dir.parent().map(Path::to_path_buf).unwrap_or_default();
        LayoutDir { version: self.version, dir: parent.join(name) }
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.dir.join(PIN_LINKS)
    }

    pub(super) fn link(&self, iface: &str, attach_type: TcAttachType) -> PathBuf {
        self.links().join(direction(attach_type)).join(escape(iface))
    }

    /// Interfaces with a pinned link in this layout, sorted.
    pub fn pinned_interfaces(&self) -> Vec<String> {
        let mut names: Vec<String> = ["ingress", "egress"]
            .iter()
            .flat_map(|dir| fs::read_dir(self.links().join(dir)).into_iter().flatten())
            .filter_map(Result::ok)
            .filter_map(|e| unescape(e.file_name().to_str().filter(|n| !n.contains(':'))?))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Layout versions other than `current` that have pins under `bpffs`,
    /// and every growth directory an interrupted growth left (of any
    /// version: its programs may serve flows, so it is taken over as an
    /// older layout is).
    pub fn others(bpffs: &Path, current: u32) -> Vec<LayoutDir> {
        let mut found: Vec<LayoutDir> = fs::read_dir(bpffs.join(PIN_ROOT))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_owned();
                let (growth, rest) = match name.strip_prefix(GROWTH_PREFIX) {
                    Some(rest) => (true, rest.to_owned()),
                    None => (false, name.clone()),
                };
                let version = rest.strip_prefix('v')?.parse::<u32>().ok()?;
                (growth || version != current).then(|| LayoutDir { version, dir: bpffs.join(PIN_ROOT).join(&name) })
            })
            .collect();
        found.sort_by(|a, b| (a.version, &a.dir).cmp(&(b.version, &b.dir)));
        found
    }

    /// Finishes a growth that was interrupted after the old datapath was
    /// retired and before its successor moved into the layout's directory:
    /// the successor is the layout now.
    pub fn recover_growth(bpffs: &Path, version: u32) {
        let main = LayoutDir::new(bpffs, version);
        let growth = main.growth();
        if main.dir.exists() || !growth.dir.exists() {
            return;
        }
        match fs::rename(&growth.dir, &main.dir) {
            Ok(()) => {
                info!(from = %growth.dir.display(), to = %main.dir.display(), "finished an interrupted growth of the maps")
            }
            Err(e) => {
                warn!(path = %growth.dir.display(), error = %e, "moving a grown datapath into place failed; it is taken over as an older layout")
            }
        }
    }
}

/// The name of a growth directory before its `v<N>`.
const GROWTH_PREFIX: &str = "grow-";

/// bpffs refuses names with a dot (reserved by the kernel), and interface
/// names may have one (`eth0.100`): `%` and `.` are percent-encoded.
pub(super) fn escape(iface: &str) -> String {
    iface.replace('%', "%25").replace('.', "%2E")
}

pub(super) fn unescape(name: &str) -> Option<String> {
    Some(name.replace("%2E", ".").replace("%25", "%"))
}

pub(super) fn direction(attach_type: TcAttachType) -> &'static str {
    match attach_type {
        TcAttachType::Ingress => "ingress",
        _ => "egress",
    }
}

pub(super) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure `root` is a bpffs, mounting one if nothing is mounted there
/// (as inside `ip netns exec`, which remounts /sys without it).
pub fn ensure_bpffs(root: &Path) -> Result<(), DatapathError> {
    let err = |message: String| DatapathError::Bpffs { path: root.to_owned(), message };
    if let Ok(stat) = nix::sys::statfs::statfs(root)
        && stat.filesystem_type().0 == BPF_FS_MAGIC
    {
        return Ok(());
    }
    fs::create_dir_all(root).map_err(|e| err(format!("cannot create the mount point: {e}")))?;
    nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| err(format!("not a bpffs and mounting one failed: {e}")))?;
    warn!(
        path = %root.display(),
        "no bpffs there: mounted one of our own, which lives only as long as this mount namespace; \
         for pins that outlive the agent (hitless restarts), mount bpffs on the host (systemd's sys-fs-bpf.mount does)"
    );
    Ok(())
}

/// `<bpffs>/mcs/v<LAYOUT_VERSION>`: where this layout's maps are pinned.
pub fn pin_dir(bpffs: &Path) -> PathBuf {
    LayoutDir::new(bpffs, LAYOUT_VERSION).dir
}

/// Removes a layout's pins (links first: that detaches them) and its directory,
/// and the shared parent when no other layout uses it.
pub(super) fn remove_layout(layout: &LayoutDir) {
    for iface in layout.pinned_interfaces() {
        for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
            let _ = fs::remove_file(layout.link(iface.as_str(), attach_type));
        }
    }
    match fs::remove_dir_all(&layout.dir) {
        Ok(()) => debug!(path = %layout.dir.display(), "removed pins"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %layout.dir.display(), error = %e, "removing pins failed"),
    }
    if let Some(parent) = layout.dir.parent() {
        let _ = fs::remove_dir(parent);
    }
}

/// What `uninstall` removed.
#[derive(Debug, Default)]
pub struct Uninstalled {
    pub layouts: Vec<u32>,
    pub links: usize,
    pub netlink_filters: usize,
}

/// Removes mcs-agent from this node: every pinned link (which detaches it),
/// every pinned map of every layout version, and our netlink filters on every
/// interface of this network namespace.
pub fn uninstall(bpffs: &Path) -> Result<Uninstalled, DatapathError> {
    let mut done = Uninstalled::default();
    ensure_bpffs(bpffs)?;
    for layout in LayoutDir::others(bpffs, u32::MAX) {
        done.links += layout.pinned_interfaces().len() * 2;
        remove_layout(&layout);
        done.layouts.push(layout.version);
    }
    done.links += remove_external_pins(bpffs);
    let _ = fs::remove_dir(bpffs.join(PIN_ROOT));
    let interfaces = nix::net::if_::if_nameindex()
        .map_err(|e| DatapathError::Bpffs { path: bpffs.to_owned(), message: format!("listing interfaces: {e}") })?;
    for iface in interfaces.iter() {
        let Ok(name) = iface.name().to_str() else { continue };
        for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
            for prog in [PROG_INGRESS, PROG_EGRESS] {
                if tc::qdisc_detach_program(name, attach_type, prog).is_ok() {
                    done.netlink_filters += 1;
                }
            }
        }
    }
    Ok(done)
}

/// Removes an older layout once this agent serves every interface: its
/// remaining pinned links (interfaces nobody serves now) and its maps.
pub fn retire_layout(layout: &LayoutDir) {
    remove_layout(layout);
    info!(version = layout.version, path = %layout.dir.display(), "removed the older layout's pins");
}

/// What of mcs-agent is still on this node: pinned layouts, and our TCX
/// programs on any interface. Empty after `uninstall`. (Netlink filters are
/// not listed: reading them needs a netlink dump aya does not expose;
/// `uninstall` removes them all the same.)
pub fn remains(bpffs: &Path) -> Vec<String> {
    let mut found: Vec<String> = LayoutDir::others(bpffs, u32::MAX)
        .iter()
        .map(|l| format!("pins of layout v{} in {}", l.version, l.dir.display()))
        .collect();
    found.extend(external_pins(bpffs));
    for iface in nix::net::if_::if_nameindex().iter().flat_map(|list| list.iter()) {
        let Ok(name) = iface.name().to_str() else { continue };
        for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
            let programs = SchedClassifier::query_tcx(name, attach_type).map(|(_, p)| p).unwrap_or_default();
            if programs.iter().any(|p| matches!(p.name_as_str(), Some(PROG_INGRESS | PROG_EGRESS))) {
                found.push(format!("TCX {} program on {name}", direction(attach_type)));
            }
        }
    }
    found
}

impl Datapath {
    /// Older layouts to take pinned links over from (see [`retire_layout`]).
    pub fn set_older_layouts(&mut self, older: Vec<LayoutDir>) {
        if self.layout.is_some() {
            self.older = older;
        }
    }

    pub fn layout(&self) -> Option<&LayoutDir> {
        self.layout.as_ref()
    }
}
