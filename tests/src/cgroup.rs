//! A cgroup v2 directory of the test's own, and clients that run in it.
//!
//! Socket-level load balancing attaches to a cgroup; tests never use the
//! root one (that would translate every process on the machine). The agent
//! runs under `ip netns exec`, which hides the cgroup2 mount below /sys, so
//! it is given the directory through `/proc/<test pid>/root`, which resolves
//! in the test's own mount namespace.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use crate::netns::{Netns, unique};

/// The cgroup2 mount point, from the mount table.
pub fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("reading /proc/self/mounts");
    mounts
        .lines()
        .find_map(|line| {
            let mut f = line.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(dir))
        })
        .expect(
            "no cgroup2 mount: socket-level load balancing tests need cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup)",
        )
}

/// A fresh child of the cgroup2 root, removed on drop.
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new(prefix: &str) -> Self {
        let path = cgroup2_mount().join(unique(prefix));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Self { path }
    }

    /// A child of this cgroup (removed with it).
    pub fn child(&self, name: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        path
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves this whole process into the cgroup (its threads' new sockets
    /// belong to it) until the guard drops, which moves it back.
    pub fn join_self(&self) -> Membership {
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("reading /proc/self/cgroup");
        let previous = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(|p| cgroup2_mount().join(p.trim_start_matches('/')))
            .expect("this process has no cgroup v2 membership");
        std::fs::write(self.path.join("cgroup.procs"), std::process::id().to_string())
            .unwrap_or_else(|e| panic!("joining {}: {e}", self.path.display()));
        Membership { previous }
    }

    /// The same directory as the agent (under `ip netns exec`) can open it.
    pub fn agent_path(&self) -> String {
        agent_path(&self.path)
    }
}

/// This process's stay in a [`TestCgroup`].
pub struct Membership {
    previous: PathBuf,
}

impl Drop for Membership {
    fn drop(&mut self) {
        let _ = std::fs::write(self.previous.join("cgroup.procs"), std::process::id().to_string());
    }
}

/// `path` as seen through this process's root, from another mount namespace.
pub fn agent_path(path: &Path) -> String {
    format!("/proc/{}/root{}", std::process::id(), path.display())
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Children first; a cgroup with processes left cannot go (clients
        // are waited for, so there are none).
        if let Ok(entries) = std::fs::read_dir(&self.path) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// What one request of `mcs-sockclient` saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok { identity: String, peer_seen: SocketAddr, reply_from: SocketAddr, local: SocketAddr },
    Err { errno: i32, message: String },
}

impl Outcome {
    fn parse(line: &str) -> Self {
        let mut f = line.splitn(5, ' ');
        match f.next() {
            Some("ok") => {
                let mut next = || f.next().unwrap_or_else(|| panic!("short client line {line:?}"));
                let identity = next().to_owned();
                let addr = |s: &str| s.trim().parse().unwrap_or_else(|_| panic!("bad address in {line:?}"));
                let (peer_seen, reply_from, local) = (addr(next()), addr(next()), addr(next()));
                Outcome::Ok { identity, peer_seen, reply_from, local }
            }
            Some("err") => Outcome::Err {
                errno: f.next().and_then(|n| n.parse().ok()).unwrap_or(0),
                message: f.collect::<Vec<_>>().join(" "),
            },
            _ => panic!("unexpected client line {line:?}"),
        }
    }

    pub fn identity(&self) -> Option<&str> {
        match self {
            Outcome::Ok { identity, .. } => Some(identity),
            Outcome::Err { .. } => None,
        }
    }
}

fn client_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join("mcs-sockclient");
    assert!(path.exists(), "{} not found: `cargo build -p mcs-tests --bins` (cargo test builds it)", path.display());
    path
}

fn command(ns: &Netns, cgroup: Option<&Path>, mode: &str, target: SocketAddr, count: usize, hold: bool) -> Command {
    let mut cmd = Command::new(client_binary());
    cmd.args(["--netns", ns.name()]);
    if let Some(cgroup) = cgroup {
        cmd.arg("--cgroup").arg(cgroup);
    }
    if hold {
        cmd.arg("--hold");
    }
    cmd.args([mode, &target.to_string(), &count.to_string()]);
    cmd
}

/// `count` requests from a process in `ns` (and `cgroup`), one socket each.
pub fn requests(ns: &Netns, cgroup: Option<&Path>, mode: &str, target: SocketAddr, count: usize) -> Vec<Outcome> {
    let out = command(ns, cgroup, mode, target, count, false).output().expect("running mcs-sockclient");
    assert!(out.status.success(), "mcs-sockclient failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(Outcome::parse).collect()
}

/// A client process holding one socket, a request per [`HeldClient::request`].
pub struct HeldClient {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    first: bool,
}

impl HeldClient {
    pub fn start(ns: &Netns, cgroup: Option<&Path>, mode: &str, target: SocketAddr) -> Self {
        let mut child = command(ns, cgroup, mode, target, usize::MAX, true)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning mcs-sockclient");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self { child, stdin, stdout, first: true }
    }

    pub fn request(&mut self) -> Outcome {
        if !std::mem::take(&mut self.first) {
            let stdin = self.stdin.as_mut().expect("stdin");
            stdin.write_all(b"next\n").expect("writing to mcs-sockclient");
            stdin.flush().expect("flush");
        }
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reading mcs-sockclient");
        Outcome::parse(line.trim_end())
    }
}

impl Drop for HeldClient {
    fn drop(&mut self) {
        // EOF on stdin ends it.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}
