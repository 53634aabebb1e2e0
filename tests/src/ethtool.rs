//! Transmit checksum offload, set with the ethtool ioctl (no `ethtool`
//! binary needed): off, a veth's frames carry complete checksums as a
//! NIC's wire does, which the XDP lab needs.

use std::io;

use crate::netns::Netns;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_STXCSUM: u32 = 0x17;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

fn set(ns: &Netns, iface: &str, cmd: u32, on: bool) -> io::Result<()> {
    let iface = iface.to_owned();
    ns.run(move || {
        let mut value = EthtoolValue { cmd, data: u32::from(on) };
        // SAFETY: a zeroed ifreq is valid; the name is copied within bounds
        // (interface names are at most 15 bytes and a NUL).
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(iface.bytes().take(libc::IFNAMSIZ - 1)) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_data = (&raw mut value).cast();
        // SAFETY: plain socket call.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: ifr points at a live ethtool_value for the call's duration.
        let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut ifr) };
        let err = io::Error::last_os_error();
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        if rc < 0 { Err(err) } else { Ok(()) }
    })
}

/// Turns transmit checksum offload on or off on `iface` in `ns`.
pub fn set_tx_checksum(ns: &Netns, iface: &str, on: bool) {
    set(ns, iface, ETHTOOL_STXCSUM, on)
        .unwrap_or_else(|e| panic!("ethtool tx checksum on {iface} in {}: {e}", ns.name()));
}
