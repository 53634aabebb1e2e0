//! A bpffs of the test's own, mounted on a scratch directory: the only way
//! for pins to outlive an agent started under `ip netns exec`, which gives
//! every child a fresh /sys (and so a fresh, empty /sys/fs/bpf).

use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Unmounted (lazily) on drop, on panic too.
pub struct ScratchBpffs {
    dir: tempfile::TempDir,
}

impl ScratchBpffs {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("scratch directory for a bpffs");
        mount(Some("bpf"), dir.path(), Some("bpf"), MsFlags::empty(), None::<&str>)
            .unwrap_or_else(|e| panic!("mounting a bpffs on {}: {e} (needs root)", dir.path().display()));
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn arg(&self) -> String {
        self.dir.path().display().to_string()
    }
}

impl Default for ScratchBpffs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ScratchBpffs {
    fn drop(&mut self) {
        let _ = umount2(self.dir.path(), MntFlags::MNT_DETACH);
    }
}
