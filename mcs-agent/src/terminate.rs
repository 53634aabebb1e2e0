//! Ending sockets whose backend left their service.
//!
//! A socket translated at `connect()` talks to its pod directly: when the
//! pod leaves the service nothing on the packet path notices, and a
//! connected UDP client (a DNS resolver, a metrics pusher) would send into
//! the void until it gives up. The agent finds such sockets by their cookie
//! in `SOCK_REV` and destroys them with `SOCK_DESTROY` (sock_diag, kernel
//! `CONFIG_INET_DIAG_DESTROY`), in every network namespace it can see: the
//! application gets ECONNABORTED and reconnects, through the VIP, to a live
//! backend. TCP sockets only with `--socket-lb-terminate-tcp` (an
//! established TCP connection to a pod that is going away may still finish
//! its work). Drained backends (weight 0, terminating but serving) are
//! members still: their sockets are left alone.
//!
//! aya cannot call the `bpf_sock_destroy` kfunc yet, hence sock_diag from
//! userspace; the netlink messages are small and fixed, written here.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io,
    net::IpAddr,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::PathBuf,
};

use crate::model::{BackendAddr, FrontendKey, Protocol};

/// A socket translated at the socket layer, as `SOCK_REV` records it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TranslatedSocket {
    pub cookie: u64,
    pub frontend: FrontendKey,
    pub backend: BackendAddr,
}

/// The sockets to end: those of a changed frontend whose backend is no
/// longer a member of it (`keeps` says who is), UDP always, TCP with `tcp`.
pub fn victims<'a>(
    sockets: impl IntoIterator<Item = &'a TranslatedSocket>,
    changed: &BTreeSet<FrontendKey>,
    keeps: impl Fn(&FrontendKey, &BackendAddr) -> bool,
    tcp: bool,
) -> Vec<TranslatedSocket> {
    sockets
        .into_iter()
        .filter(|s| s.frontend.protocol == Protocol::Udp || tcp)
        .filter(|s| changed.contains(&s.frontend) && !keeps(&s.frontend, &s.backend))
        .cloned()
        .collect()
}

/// Every network namespace this process can name: those of running
/// processes (`/proc/*/ns/net`, all of them with hostPID) and those bind
/// mounted by CNIs and `ip netns` (`/var/run/netns`), once each.
fn namespaces() -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    let mut paths = Vec::new();
    let proc_ns = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .map(|e| e.path().join("ns/net"));
    let named = std::fs::read_dir("/var/run/netns").into_iter().flatten().filter_map(Result::ok).map(|e| e.path());
    for path in proc_ns.chain(named) {
        if let Ok(meta) = std::fs::metadata(&path)
            && seen.insert((meta.dev(), meta.ino()))
        {
            paths.push(path);
        }
    }
    paths
}

/// (family, protocol) -> (cookie, destination words, destination port)
type Wanted = BTreeMap<(u8, u8), BTreeSet<(u64, [u32; 4], u16)>>;

/// Destroys these sockets wherever they are: a socket is matched by its
/// cookie *and* its destination, so a socket translated at `sendmsg()` (not
/// connected) or connected elsewhere since is left alone. Returns the
/// cookies of the sockets destroyed.
pub fn terminate(victims: &[TranslatedSocket]) -> Vec<u64> {
    if victims.is_empty() {
        return Vec::new();
    }
    let mut wanted: Wanted = BTreeMap::new();
    for v in victims {
        let proto = match v.frontend.protocol {
            Protocol::Tcp => libc::IPPROTO_TCP,
            Protocol::Udp => libc::IPPROTO_UDP,
        } as u8;
        // As the kernel reports it: wire order read as native words.
        let port = v.backend.port.to_be();
        match v.backend.ip {
            IpAddr::V4(ip) => {
                let word = u32::from_ne_bytes(ip.octets());
                wanted.entry((libc::AF_INET as u8, proto)).or_default().insert((v.cookie, [word, 0, 0, 0], port));
                // A dual-stack socket reaching an IPv4 backend: AF_INET6, ::ffff:a.b.c.d.
                let mapped = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), word];
                wanted.entry((libc::AF_INET6 as u8, proto)).or_default().insert((v.cookie, mapped, port));
            }
            IpAddr::V6(ip) => {
                let o = ip.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                wanted.entry((libc::AF_INET6 as u8, proto)).or_default().insert((
                    v.cookie,
                    [w(0), w(4), w(8), w(12)],
                    port,
                ));
            }
        }
    }
    // setns moves only the calling thread: one thread of its own walks the
    // namespaces, and ends with the last one.
    let walk = std::thread::spawn(move || {
        let mut destroyed = Vec::new();
        for ns in namespaces() {
            match end_in(&ns, &wanted) {
                Ok(ended) => destroyed.extend(ended),
                Err(e) => {
                    tracing::debug!(error = %e, ns = %ns.display(), "a network namespace's sockets could not be read")
                }
            }
        }
        destroyed
    });
    walk.join().unwrap_or_default()
}

/// Enters `ns` and destroys the wanted sockets found there.
fn end_in(ns: &std::path::Path, wanted: &Wanted) -> io::Result<Vec<u64>> {
    nix::sched::setns(File::open(ns)?, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    let diag = SockDiag::open()?;
    let mut ended = Vec::new();
    for ((family, proto), sockets) in wanted {
        let ids = match diag.dump(*family, *proto) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::debug!(error = %e, family, proto, "sock_diag dump");
                continue;
            }
        };
        for id in ids.into_iter().filter(|id| sockets.contains(&(id.cookie(), id.dst, id.dport))) {
            match diag.destroy(*family, *proto, &id) {
                Ok(()) => ended.push(id.cookie()),
                Err(e) => tracing::debug!(error = %e, "SOCK_DESTROY"),
            }
        }
    }
    Ok(ended)
}

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// `struct inet_diag_sockid`, as the kernel lays it out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

impl SockId {
    fn cookie(&self) -> u64 {
        u64::from(self.cookie[1]) << 32 | u64::from(self.cookie[0])
    }
}

/// `struct nlmsghdr` + `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Request {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

struct SockDiag {
    fd: OwnedFd,
}

impl SockDiag {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned it.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    fn send(&self, request: &Request) -> io::Result<()> {
        // SAFETY: a plain-old-data struct of the length we pass.
        let rc =
            unsafe { libc::send(self.fd.as_raw_fd(), (request as *const Request).cast(), size_of::<Request>(), 0) };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: a buffer of the length we pass.
        let rc = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc as usize) }
    }

    fn request(kind: u16, flags: u16, family: u8, protocol: u8, id: SockId) -> Request {
        Request {
            len: size_of::<Request>() as u32,
            kind,
            flags,
            seq: 1,
            pid: 0,
            family,
            protocol,
            ext: 0,
            pad: 0,
            // Every state but TIME_WAIT (6) and NEW_SYN_RECV (12): those are
            // not sockets an application holds.
            states: !((1 << 6) | (1 << 12)),
            id,
        }
    }

    /// Every socket of this family and protocol in the namespace.
    fn dump(&self, family: u8, protocol: u8) -> io::Result<Vec<SockId>> {
        self.send(&Self::request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            protocol,
            SockId::default(),
        ))?;
        let mut ids = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
                if len < 16 || off + len > n {
                    return Ok(ids);
                }
                match kind {
                    NLMSG_DONE => return Ok(ids),
                    NLMSG_ERROR => {
                        let errno = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().expect("4 bytes"));
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    _ => {
                        // inet_diag_msg: family, state, timer, retrans, then the id.
                        let body = off + 16 + 4;
                        if body + size_of::<SockId>() <= off + len {
                            // SAFETY: in bounds; SockId is plain old data, read unaligned.
                            ids.push(unsafe { buf.as_ptr().add(body).cast::<SockId>().read_unaligned() });
                        }
                    }
                }
                off += (len + 3) & !3;
            }
        }
    }

    fn destroy(&self, family: u8, protocol: u8, id: &SockId) -> io::Result<()> {
        self.send(&Self::request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, family, protocol, *id))?;
        let mut buf = [0u8; 256];
        let n = self.recv(&mut buf)?;
        if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
            let errno = i32::from_ne_bytes(buf[16..20].try_into().expect("4 bytes"));
            if errno != 0 {
                return Err(io::Error::from_raw_os_error(-errno));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn socket(cookie: u64, protocol: Protocol, backend: u8) -> TranslatedSocket {
        TranslatedSocket {
            cookie,
            frontend: FrontendKey { vip: Ipv4Addr::new(10, 96, 0, 10).into(), port: 53, protocol },
            backend: BackendAddr { ip: Ipv4Addr::new(10, 10, 0, backend).into(), port: 5353 },
        }
    }

    #[test]
    fn only_sockets_to_a_backend_that_left_a_changed_frontend_end() {
        let sockets = [
            socket(1, Protocol::Udp, 1),
            socket(2, Protocol::Udp, 2),
            socket(3, Protocol::Tcp, 2),
            socket(4, Protocol::Udp, 3),
        ];
        let changed: BTreeSet<FrontendKey> = sockets.iter().map(|s| s.frontend).collect();
        // Backend 2 left; 3 is drained (weight 0), still a member.
        let keeps = |_: &FrontendKey, b: &BackendAddr| b.ip != IpAddr::from(Ipv4Addr::new(10, 10, 0, 2));
        let udp_only: Vec<u64> = victims(&sockets, &changed, keeps, false).iter().map(|s| s.cookie).collect();
        assert_eq!(udp_only, [2]);
        let with_tcp: Vec<u64> = victims(&sockets, &changed, keeps, true).iter().map(|s| s.cookie).collect();
        assert_eq!(with_tcp, [2, 3]);
        // A frontend that did not change is not looked at.
        assert!(victims(&sockets, &BTreeSet::new(), keeps, true).is_empty());
    }
}
