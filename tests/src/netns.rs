//! Network namespaces as guards.

use std::{
    fs::File,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use nix::sched::{CloneFlags, setns};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test, process or earlier run uses at the same time.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Runs a command and panics with its output if it fails: lab setup errors are fatal.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e} (is iproute2 installed? `cargo xtask setup`)"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // IPv6 addresses, link-local ones included, usable at once: duplicate
        // address detection would hold a fresh link's first packets for a
        // second or two.
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        ns
    }

    /// A handle on a namespace someone else owns: never deleted by this value.
    pub fn existing(name: &str) -> Borrowed {
        Borrowed(std::mem::ManuallyDrop::new(Self { name: name.to_owned() }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets it creates
    /// stay in the namespace after the thread ends.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            setns(file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Like [`Netns::run`], but the thread keeps running in the background.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            setns(file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes every interface inside it, veth peers included.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Connects two namespaces with a veth pair, created inside `a` so the root
/// namespace never sees it.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) {
    a.ip(&["link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name()]);
    a.ip(&["link", "set", a_name, "up"]);
    b.ip(&["link", "set", b_name, "up"]);
}

/// A [`Netns`] that is not deleted on drop (see [`Netns::existing`]).
pub struct Borrowed(std::mem::ManuallyDrop<Netns>);

impl std::ops::Deref for Borrowed {
    type Target = Netns;

    fn deref(&self) -> &Netns {
        &self.0
    }
}
