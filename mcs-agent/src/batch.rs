//! `BPF_MAP_UPDATE_BATCH` (kernel 5.6+): many elements of one map in one
//! syscall. A cold start at 10,000 services writes 110,000 elements; one
//! syscall each was most of its map-writing time.

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
    // SAFETY: attr points at key and value buffers of `count` elements each,
    // alive for the call; the kernel reads at most size_of::<BatchAttr>() bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
