//! Memory-mapped maps: `SELECTION` and `HEALTH` read and written
//! without a syscall.

// One module split by concern: the pieces share the root's types and imports.
use super::*;

/// `SELECTION`, mapped into the agent's memory (the map is `BPF_F_MMAPABLE`):
/// writing a table is one copy instead of a syscall per slot.
pub(crate) struct SlotMemory {
    base: NonNull<u32>,
    slots: usize,
    bytes: usize,
    /// The mapping holds the map by itself; the descriptor stays open so
    /// the map shows in fdinfo, where its kernel memory is read (/metrics).
    _fd: OwnedFd,
}

/// A shared, writable mapping of a `BPF_F_MMAPABLE` map's first `bytes`
/// (rounded up to whole pages); returns the base and the mapped length.
pub(super) fn mmap_map<T>(fd: &OwnedFd, bytes: usize) -> io::Result<(NonNull<T>, usize)> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let bytes = bytes.div_ceil(page).max(1) * page;
    // SAFETY: a shared mapping of a map fd we hold, of the size the kernel allows for it.
    let ptr = unsafe {
        libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = NonNull::new(ptr.cast::<T>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
    Ok((base, bytes))
}

impl SlotMemory {
    pub(super) fn map(fd: OwnedFd, slots: u32) -> io::Result<Self> {
        let (base, bytes) = mmap_map(&fd, slots as usize * 4)?;
        Ok(Self { base, slots: slots as usize, bytes, _fd: fd })
    }

    pub(super) fn write(&mut self, offset: u32, ids: &[u32]) -> Result<(), MapError> {
        let start = offset as usize;
        let end = start.checked_add(ids.len()).filter(|end| *end <= self.slots).ok_or(MapError::OutOfBounds {
            index: offset.saturating_add(ids.len() as u32),
            max_entries: self.slots as u32,
        })?;
        // SAFETY: in bounds of the mapping, which lives as long as self; the
        // kernel only reads these slots once a SERVICES entry points at them.
        let slots = unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(start), end - start) };
        slots.copy_from_slice(ids);
        Ok(())
    }

    /// Maps a pinned `SELECTION` (for `inspect`, which only reads).
    pub(crate) fn open_pinned(path: &Path) -> io::Result<Self> {
        let info = MapInfo::from_pin(path).map_err(io::Error::other)?;
        let data = MapData::from_pin(path).map_err(io::Error::other)?;
        let fd = data.fd().as_fd().try_clone_to_owned()?;
        Self::map(fd, info.max_entries() * 2)
    }

    pub(crate) fn read(&self, index: u32) -> Option<u32> {
        // SAFETY: bounds checked; aligned u32 reads of a live mapping.
        ((index as usize) < self.slots).then(|| unsafe { self.base.as_ptr().add(index as usize).read_volatile() })
    }
}

impl Drop for SlotMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

/// `HEALTH` (mmapable array of [`Health`]) in the agent's memory.
pub(super) struct HealthMemory {
    base: NonNull<Health>,
    pub(super) len: usize,
    bytes: usize,
    /// Open for fdinfo, as [`SlotMemory`]'s.
    _fd: OwnedFd,
}

impl HealthMemory {
    pub(super) fn map(fd: OwnedFd, len: u32) -> io::Result<Self> {
        let (base, bytes) = mmap_map(&fd, len as usize * size_of::<Health>())?;
        Ok(Self { base, len: len as usize, bytes, _fd: fd })
    }

    pub(super) fn get(&self, id: u32) -> Option<Health> {
        // SAFETY: bounds checked; the kernel adds to these words concurrently,
        // and a torn read of one counter cannot happen for aligned u64s.
        ((id as usize) < self.len).then(|| unsafe { self.base.as_ptr().add(id as usize).read_volatile() })
    }

    pub(super) fn zero(&mut self, id: u32) {
        if (id as usize) < self.len {
            // SAFETY: as above; the id is not in any table yet.
            unsafe { self.base.as_ptr().add(id as usize).write_volatile(Health::default()) };
        }
    }
}

impl Drop for HealthMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
