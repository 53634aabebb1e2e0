//! Raw map syscalls where aya has none or takes its own copies:
//! `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_LOOKUP_BATCH` (kernel 5.6+), many
//! elements of one map in one syscall (a cold start at 10,000 services
//! writes 110,000 elements; one syscall each was most of its map-writing
//! time), and single lookups and deletes on a borrowed descriptor (the
//! conntrack collector's thread holds descriptors, not aya maps).

use std::{io, os::fd::AsRawFd as _, os::fd::BorrowedFd};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `count` elements: `keys` and `values` are the elements' bytes
/// back to back (for per-CPU maps, each value is every CPU's, each rounded
/// up to 8 bytes). Fails with the kernel's error, having written the
/// elements before the one that failed.
pub fn update(map: BorrowedFd<'_>, keys: &[u8], values: &[u8], count: usize) -> io::Result<()> {
    if count == 0 {
        return Ok(());
    }
    debug_assert!(keys.len().is_multiple_of(count) && values.len().is_multiple_of(count));
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(count).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: attr points at key and value buffers of `count` elements each.
    unsafe { bpf(BPF_MAP_UPDATE_BATCH, (&mut attr as *mut BatchAttr).cast(), std::mem::size_of::<BatchAttr>()) }
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// # Safety
/// `attr` is a `union bpf_attr` member for `cmd` of `size` bytes whose
/// pointers reference buffers of the sizes the kernel will use, alive for
/// the call.
unsafe fn bpf(cmd: libc::c_long, attr: *mut u8, size: usize) -> io::Result<()> {
    // SAFETY: as the caller promised.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size as u32) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Where a [`lookup`] walk stands: the kernel's cursor (a hash map's bucket).
#[derive(Default)]
pub struct Cursor {
    token: u64,
    started: bool,
    done: bool,
}

impl Cursor {
    pub fn done(&self) -> bool {
        self.done
    }
}

/// Reads the next elements of a hash map into `keys` and `values` (at most
/// as many as both hold, each `key_size` / `value_size` bytes) and returns
/// how many it read. A map changing meanwhile may show an element twice or
/// not at all, as any walk of a live hash map.
///
/// # Safety
/// `key_size` and `value_size` are the map's.
pub unsafe fn lookup(
    map: BorrowedFd<'_>,
    cursor: &mut Cursor,
    keys: &mut [u8],
    key_size: usize,
    values: &mut [u8],
    value_size: usize,
) -> io::Result<usize> {
    if cursor.done {
        return Ok(0);
    }
    let capacity = (keys.len() / key_size).min(values.len() / value_size);
    let mut next = 0u64;
    let mut attr = BatchAttr {
        in_batch: if cursor.started { &cursor.token as *const u64 as u64 } else { 0 },
        out_batch: &mut next as *mut u64 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: u32::try_from(capacity).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `keys` and `values` hold `count` elements of the map's key and
    // value sizes (the caller's sizes); the cursors are 8 bytes, more than a
    // hash map's 4-byte bucket index.
    match unsafe { bpf(BPF_MAP_LOOKUP_BATCH, (&mut attr as *mut BatchAttr).cast(), std::mem::size_of::<BatchAttr>()) } {
        Ok(()) => {}
        // The end of the map: `count` holds the last elements.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => cursor.done = true,
        Err(e) => return Err(e),
    }
    cursor.token = next;
    cursor.started = true;
    Ok(attr.count as usize)
}

/// The `map_elem` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// Whether a hash map holds no element (it has no first key).
pub fn is_empty(map: BorrowedFd<'_>, key_size: usize) -> io::Result<bool> {
    let mut first = vec![0u8; key_size.max(1)];
    // A null key asks for the first one; `value` is `next_key` here.
    let mut attr = ElemAttr { map_fd: map.as_raw_fd() as u32, value: first.as_mut_ptr() as u64, ..ElemAttr::default() };
    // SAFETY: `first` has the map's key size, the kernel's write.
    match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, (&mut attr as *mut ElemAttr).cast(), std::mem::size_of::<ElemAttr>()) } {
        Ok(()) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(true),
        Err(e) => Err(e),
    }
}

/// One element's value into `value`; `Ok(false)` when the key is absent.
///
/// # Safety
/// `key` and `value` have the map's key and value sizes.
pub unsafe fn get(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        ..ElemAttr::default()
    };
    // SAFETY: `key` and `value` are the map's key and value sizes (the caller's promise).
    match unsafe { bpf(BPF_MAP_LOOKUP_ELEM, (&mut attr as *mut ElemAttr).cast(), std::mem::size_of::<ElemAttr>()) } {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes one element; `Ok(false)` when it was already gone.
///
/// # Safety
/// `key` has the map's key size.
pub unsafe fn delete(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<bool> {
    let mut attr = ElemAttr { map_fd: map.as_raw_fd() as u32, key: key.as_ptr() as u64, ..ElemAttr::default() };
    // SAFETY: `key` is the map's key size (the caller's promise).
    match unsafe { bpf(BPF_MAP_DELETE_ELEM, (&mut attr as *mut ElemAttr).cast(), std::mem::size_of::<ElemAttr>()) } {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}
