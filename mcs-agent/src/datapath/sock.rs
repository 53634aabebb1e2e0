//! Socket-level load balancing: the cgroup programs, where they are
//! attached, and which cgroups they leave alone.
//!
//! Links are pinned under `<layout>/links/cgroup/<hook>` like the TCX ones,
//! so they outlive the agent. A new agent attaches its own links first and
//! only then removes the earlier pins: both sets run on the same maps, and a
//! call the first one translated is not a VIP call for the second, so there
//! is no moment without translation and none with it done twice.

use std::{
    fs::{self, File},
    os::fd::OwnedFd,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::programs::{CgroupAttachMode, links::FdLink};
use mcs_common::{
    Backend, CONFIG_F_SOCK_EXCLUDE, CONFIG_F_SOCK_HOST_ONLY, MAP_HOST_NETNS, MAP_SOCK_EXCLUDE, PROG_SOCK, ServiceKey,
    SockHook, SockRevKey, SockRevValue, ip_to_map, ip6_to_map,
};
use tracing::{debug, info};

use super::{Datapath, DatapathError, LayoutDir};
use crate::{
    plan::{ToIp, backend_addr, frontend_of},
    terminate::TranslatedSocket,
};

/// statfs magic of a cgroup v2 mount.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The socket programs on one cgroup.
pub(super) struct SockAttachment {
    pub(super) cgroup: PathBuf,
    links: Vec<SockLink>,
}

impl SockAttachment {
    /// Its pins moved (see `Datapath::settle`).
    pub(super) fn moved(&mut self, moved: &impl Fn(&mut PathBuf)) {
        for link in &mut self.links {
            if let SockLink::Pinned(path) = link {
                moved(path);
            }
        }
    }
}

enum SockLink {
    /// Pinned: stays attached after the agent exits.
    Pinned(PathBuf),
    /// This process's only (`--no-pin`): detached when dropped.
    Owned(#[allow(dead_code)] FdLink),
}

impl LayoutDir {
    fn sock_links(&self) -> PathBuf {
        self.links().join("cgroup")
    }

    fn sock_link(&self, hook: SockHook) -> PathBuf {
        self.sock_links().join(hook.pin_name())
    }
}

/// Opens `path` as a cgroup v2 directory, or says what it is instead.
fn open_cgroup(path: &Path) -> Result<File, DatapathError> {
    let err = |message: String| DatapathError::Cgroup { path: path.to_owned(), message };
    let dir = File::open(path).map_err(|e| err(format!("cannot open it: {e}")))?;
    let fs = nix::sys::statfs::fstatfs(&dir).map_err(|e| err(format!("statfs: {e}")))?;
    if fs.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        return Err(err("not a cgroup v2 directory (socket-level load balancing attaches to cgroup2 only)".into()));
    }
    Ok(dir)
}

/// The id the kernel gives a cgroup v2 directory (its inode number), as
/// `bpf_get_current_ancestor_cgroup_id` returns it.
pub fn cgroup_id(path: &Path) -> Result<u64, DatapathError> {
    let dir = open_cgroup(path)?;
    dir.metadata()
        .map(|m| m.ino())
        .map_err(|e| DatapathError::Cgroup { path: path.to_owned(), message: format!("stat: {e}") })
}

/// The host's cgroup v2 mount point, from the mount table (the default
/// attach point: every process of the node is below it). Inside a cgroup
/// namespace the mount shows the namespace's own cgroup, whose id is not the
/// root's (1): that one is refused by the caller.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

/// Loads (verifies) the socket programs.
pub(super) fn load_programs(ebpf: &mut aya::Ebpf) -> Result<(), DatapathError> {
    for (name, _) in PROG_SOCK {
        let program = ebpf.program_mut(name).ok_or(DatapathError::MissingProgram(name))?;
        let loaded = match program {
            aya::programs::Program::CgroupSockAddr(p) => p.load(),
            aya::programs::Program::SockOps(p) => p.load(),
            aya::programs::Program::CgroupSock(p) => p.load(),
            _ => return Err(DatapathError::MissingProgram(name)),
        };
        loaded.map_err(|source| DatapathError::Program { name, source })?;
    }
    Ok(())
}

/// Attaches one socket program to the cgroup behind `dir`, as a link (kernel
/// 5.7+: always one of many on its cgroup; the kernel refuses any flag with it).
fn attach_one(ebpf: &mut aya::Ebpf, name: &'static str, dir: &File, cgroup: &Path) -> Result<FdLink, DatapathError> {
    let err = |source| DatapathError::Program { name, source };
    let link: Result<FdLink, _> = match ebpf.program_mut(name).ok_or(DatapathError::MissingProgram(name))? {
        aya::programs::Program::CgroupSockAddr(p) => {
            let id = p.attach(dir, CgroupAttachMode::Single).map_err(err)?;
            FdLink::try_from(p.take_link(id).map_err(err)?)
        }
        aya::programs::Program::SockOps(p) => {
            let id = p.attach(dir, CgroupAttachMode::Single).map_err(err)?;
            FdLink::try_from(p.take_link(id).map_err(err)?)
        }
        aya::programs::Program::CgroupSock(p) => {
            let id = p.attach(dir, CgroupAttachMode::Single).map_err(err)?;
            FdLink::try_from(p.take_link(id).map_err(err)?)
        }
        _ => return Err(DatapathError::MissingProgram(name)),
    };
    link.map_err(|e| DatapathError::Cgroup { path: cgroup.to_owned(), message: format!("{name}: {e}") })
}

impl Datapath {
    /// Attaches the socket programs to `cgroup` (every process below it),
    /// replacing an earlier agent's. Nothing is left half-attached: on an
    /// error the links made so far are dropped and earlier ones stay.
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let dir = open_cgroup(cgroup)?;
        let mut made = Vec::new();
        if let Some(e) = &self.sock_load {
            return Err(DatapathError::Cgroup {
                path: cgroup.to_owned(),
                message: format!("cannot load the socket programs: {e}"),
            });
        }
        for (name, _) in PROG_SOCK {
            made.push(attach_one(&mut self.ebpf, name, &dir, cgroup)?);
        }
        let mut links = Vec::new();
        for ((_, hook), link) in PROG_SOCK.into_iter().zip(made) {
            let Some(layout) = &self.layout else {
                links.push(SockLink::Owned(link));
                continue;
            };
            let path = layout.sock_link(hook);
            fs::create_dir_all(layout.sock_links())
                .map_err(|e| DatapathError::Bpffs { path: layout.dir.clone(), message: e.to_string() })?;
            // Pinned beside, then renamed over the earlier agent's pin: the
            // hook always has one of the two links (bpffs names take no dot).
            let fresh = layout.sock_links().join(format!("{}-new", hook.pin_name()));
            let _ = fs::remove_file(&fresh);
            link.pin(&fresh).map_err(|e| DatapathError::Pin {
                name: hook.pin_name().into(),
                path: fresh.clone(),
                source: e,
            })?;
            fs::rename(&fresh, &path).map_err(|e| DatapathError::Bpffs {
                path: path.clone(),
                message: format!("replacing the pinned link: {e}"),
            })?;
            links.push(SockLink::Pinned(path));
        }
        // An older layout's socket links run before ours (attached first) on
        // its own maps: gone now, so the last copy of its state is complete.
        for layout in &self.older {
            for (_, hook) in PROG_SOCK {
                let _ = fs::remove_file(layout.sock_link(hook));
            }
        }
        info!(cgroup = %cgroup.display(), "socket-level load balancing attached");
        self.sockets = Some(SockAttachment { cgroup: cgroup.to_owned(), links });
        Ok(())
    }

    /// Detaches the socket programs, this agent's and any an earlier agent
    /// pinned (`--socket-lb off` after it was on). True if any were there.
    pub fn detach_sockets(&mut self) -> bool {
        let mut found = self.sockets.take().is_some_and(|s| {
            release_sockets(s);
            true
        });
        for layout in self.layout.iter().chain(&self.older) {
            for (_, hook) in PROG_SOCK {
                let path = layout.sock_link(hook);
                if path.exists() && fs::remove_file(&path).is_ok() {
                    found = true;
                }
            }
        }
        if found {
            info!("socket-level load balancing detached");
        }
        found
    }

    /// The cgroup the socket programs are attached to, if they are.
    pub fn sockets_cgroup(&self) -> Option<&Path> {
        self.sockets.as_ref().map(|s| s.cgroup.as_path())
    }

    /// Cgroups (and their descendants) that socket-level load balancing
    /// leaves to the TC path. Replaces the earlier set.
    pub fn set_sock_exclude(&mut self, cgroups: &[PathBuf]) -> Result<(), DatapathError> {
        let ids = cgroups.iter().map(|p| cgroup_id(p)).collect::<Result<Vec<_>, _>>()?;
        let map_err = |source| DatapathError::Map { name: MAP_SOCK_EXCLUDE, source };
        let old: Vec<u64> = self.maps.sock_exclude.keys().filter_map(Result::ok).collect();
        for id in &ids {
            self.maps.sock_exclude.insert(id, 1, 0).map_err(map_err)?;
        }
        for id in old.iter().filter(|id| !ids.contains(id)) {
            let _ = self.maps.sock_exclude.remove(id);
        }
        self.set_config(CONFIG_F_SOCK_EXCLUDE, !ids.is_empty())
    }
}

/// The cookie of this process's network namespace (SO_NETNS_COOKIE, kernel 5.14+).
fn own_netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an out-buffer of the length we pass.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

type SockRevMap<A> = aya::maps::HashMap<aya::maps::MapData, SockRevKey<A>, SockRevValue<A>>;

/// Its own descriptors of `SOCK_REV` and `SOCK_REV6`: reading every entry
/// (up to twice the conntrack size) happens off the agent's loop.
pub struct SockRev {
    v4: SockRevMap<mcs_common::Ip4>,
    v6: SockRevMap<mcs_common::Ip6>,
}

impl SockRev {
    /// Every socket the socket programs translated and still remember.
    pub fn sockets(&self) -> Vec<TranslatedSocket> {
        fn entries<A: ToIp>(map: &SockRevMap<A>) -> impl Iterator<Item = TranslatedSocket> + '_ {
            map.iter().filter_map(Result::ok).filter_map(|(k, v)| {
                let frontend =
                    frontend_of(&ServiceKey { vip: v.vip, port: v.vip_port, proto: v.proto, _pad: 0 }).ok()?;
                let backend = backend_addr(&Backend { ip: k.backend_ip, port: k.backend_port, _pad: 0 });
                Some(TranslatedSocket { cookie: k.cookie(), frontend, backend })
            })
        }
        entries(&self.v4).chain(entries(&self.v6)).collect()
    }

    /// Forgets sockets (ended ones).
    pub fn forget(&mut self, sockets: &[TranslatedSocket]) {
        for s in sockets {
            let port = s.backend.port.to_be();
            match s.backend.ip {
                std::net::IpAddr::V4(ip) => {
                    let _ = self.v4.remove(&SockRevKey::new(s.cookie, ip_to_map(ip.octets()), port));
                }
                std::net::IpAddr::V6(ip) => {
                    let _ = self.v6.remove(&SockRevKey::new(s.cookie, ip6_to_map(ip.octets()), port));
                }
            }
        }
    }
}

impl Datapath {
    /// A handle on the socket translations that another thread can own.
    pub fn sock_rev(&self) -> Result<SockRev, DatapathError> {
        fn open<A: mcs_common::MapAddr>(name: &'static str, fd: &OwnedFd) -> Result<SockRevMap<A>, DatapathError> {
            let err = |source| DatapathError::Map { name, source };
            let fd = fd.try_clone().map_err(|e| err(aya::maps::MapError::IoError(e)))?;
            let data = aya::maps::MapData::from_fd(fd).map_err(err)?;
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(err)
        }
        let [v4, v6] = &self.maps.sock_rev_fds;
        Ok(SockRev { v4: open(mcs_common::MAP_SOCK_REV, v4)?, v6: open(mcs_common::MAP_SOCK_REV6, v6)? })
    }

    /// With `on`, the socket programs translate only sockets of this
    /// process's (the node's) network namespace: pods go through the TC
    /// path, hostNetwork clients, which no TC program sees, are still served.
    pub fn set_sock_host_only(&mut self, on: bool) -> Result<(), DatapathError> {
        if on {
            let cookie =
                own_netns_cookie().map_err(|e| DatapathError::Map { name: MAP_HOST_NETNS, source: e.into() })?;
            self.maps
                .host_netns
                .set(0, cookie, 0)
                .map_err(|source| DatapathError::Map { name: MAP_HOST_NETNS, source })?;
        }
        self.set_config(CONFIG_F_SOCK_HOST_ONLY, on)
    }
}

/// Removing the pin (or dropping an owned link) detaches it.
pub(super) fn release_sockets(attachment: SockAttachment) {
    for link in attachment.links {
        if let SockLink::Pinned(path) = link
            && let Err(e) = fs::remove_file(&path)
        {
            debug!(path = %path.display(), error = %e, "unpinning a socket link");
        }
    }
}
