//! Ids and selection-table regions: which are handed out and which are free.

use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Region {
    pub(super) offset: u32,
    pub(super) len: u32,
}

/// First-fit allocator of contiguous selection-table slots.
#[derive(Clone, Debug)]
pub(super) struct SlotAllocator {
    /// offset -> length of each free run; runs never touch.
    free: BTreeMap<u32, u32>,
}

impl SlotAllocator {
    pub(super) fn new(capacity: u32) -> Self {
        Self { free: if capacity == 0 { BTreeMap::new() } else { BTreeMap::from([(0, capacity)]) } }
    }

    pub(super) fn alloc(&mut self, len: u32) -> Option<Region> {
        if len == 0 {
            return Some(Region::default());
        }
        let (&offset, &run) = self.free.iter().find(|&(_, &run)| run >= len)?;
        self.free.remove(&offset);
        if run > len {
            self.free.insert(offset + len, run - len);
        }
        Some(Region { offset, len })
    }

    /// Takes a region that is already in use (adopted from the kernel) out of
    /// the free runs. False when it is not entirely free (overlap, out of range).
    pub(super) fn reserve(&mut self, region: Region) -> bool {
        if region.len == 0 {
            return true;
        }
        let Some((&offset, &run)) = self.free.range(..=region.offset).next_back() else {
            return false;
        };
        let end = region.offset as u64 + region.len as u64;
        if end > offset as u64 + run as u64 {
            return false;
        }
        self.free.remove(&offset);
        if region.offset > offset {
            self.free.insert(offset, region.offset - offset);
        }
        let tail = (offset as u64 + run as u64 - end) as u32;
        if tail > 0 {
            self.free.insert(end as u32, tail);
        }
        true
    }

    pub(super) fn release(&mut self, region: Region) {
        if region.len == 0 {
            return;
        }
        let (mut offset, mut len) = (region.offset, region.len);
        if let Some((&prev, &prev_len)) = self.free.range(..offset).next_back()
            && prev + prev_len == offset
        {
            self.free.remove(&prev);
            offset = prev;
            len += prev_len;
        }
        if let Some(next_len) = self.free.remove(&(offset + len)) {
            len += next_len;
        }
        self.free.insert(offset, len);
    }

    #[cfg(test)]
    pub(super) fn largest_free(&self) -> u32 {
        self.free.values().copied().max().unwrap_or(0)
    }
}

/// Smallest-free-first ids in `first..limit`, so freed ids are reused.
#[derive(Clone, Debug)]
pub(super) struct IdPool {
    next: u32,
    limit: u32,
    free: BTreeSet<u32>,
}

impl IdPool {
    pub(super) fn new(first: u32, limit: u32) -> Self {
        Self { next: first, limit, free: BTreeSet::new() }
    }

    /// A pool whose `used` ids are taken (adopted from the kernel).
    pub(super) fn with_used(first: u32, limit: u32, used: &BTreeSet<u32>) -> Self {
        let next = used.last().map_or(first, |last| last + 1).max(first);
        let free = (first..next).filter(|id| !used.contains(id)).collect();
        Self { next, limit, free }
    }

    pub(super) fn available(&self) -> u64 {
        self.free.len() as u64 + u64::from(self.limit.saturating_sub(self.next))
    }

    pub(super) fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.next < self.limit).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    pub(super) fn release(&mut self, id: u32) {
        self.free.insert(id);
    }
}
