//! A client in its own process, so it can sit in a cgroup of the test's
//! making (socket-level load balancing sees a socket's cgroup; a thread of
//! the test binary cannot have its own).
//!
//! `mcs-sockclient [--netns NAME] [--cgroup DIR] [--hold] tcp|udp|udp-connected ADDR COUNT`
//!
//! Joins the cgroup, enters the namespace, then makes COUNT requests and
//! prints one line each: `ok <identity> <peer seen by the server> <reply
//! from / getpeername> <local>` or `err <errno> <message>`. With `--hold`
//! one socket serves every request (a new one after a failed request) and
//! each request after the first waits for a line on stdin.

use std::{
    fs::File,
    io::{self, BufRead as _, Write as _},
    net::SocketAddr,
    path::PathBuf,
};

use mcs_tests::traffic::{self, Reply};
use nix::sched::{CloneFlags, setns};

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut netns, mut cgroup, mut hold) = (None, None, false);
    let mode = loop {
        match args.next().as_deref() {
            Some("--netns") => netns = args.next(),
            Some("--cgroup") => cgroup = args.next().map(PathBuf::from),
            Some("--hold") => hold = true,
            Some(mode) => break mode.to_owned(),
            None => usage(),
        }
    };
    let target: SocketAddr = args.next().and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
    let count: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    if let Some(cgroup) = cgroup {
        // "0": the writing process itself. Before any socket exists: a
        // socket belongs to the cgroup it was created in.
        std::fs::write(cgroup.join("cgroup.procs"), "0")
            .unwrap_or_else(|e| fail(&format!("joining {}: {e}", cgroup.display())));
    }
    if let Some(name) = netns {
        let path = format!("/var/run/netns/{name}");
        let file = File::open(&path).unwrap_or_else(|e| fail(&format!("opening {path}: {e}")));
        setns(file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| fail(&format!("setns {path}: {e}")));
    }
    let mut client = traffic::Client::new(&mode, target).unwrap_or_else(|e| fail(&format!("mode {mode}: {e}")));
    let stdin = io::stdin();
    let mut out = io::stdout().lock();
    for i in 0..count {
        if hold && i > 0 {
            let mut line = String::new();
            if stdin.lock().read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
        }
        let result = client.request();
        // An ended socket is replaced, as an application reconnects.
        let failed = result.is_err();
        let line = match result {
            Ok(Reply { identity, peer_seen, reply_from, local }) => {
                format!("ok {identity} {peer_seen} {reply_from} {local}")
            }
            Err(e) => format!("err {} {e}", e.raw_os_error().unwrap_or(0)),
        };
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
        if !hold || failed {
            client = traffic::Client::new(&mode, target).unwrap_or_else(|e| fail(&format!("mode {mode}: {e}")));
        }
    }
}

fn usage() -> ! {
    fail("usage: mcs-sockclient [--netns NAME] [--cgroup DIR] [--hold] tcp|udp|udp-connected ADDR [COUNT]")
}

fn fail(message: &str) -> ! {
    eprintln!("mcs-sockclient: {message}");
    std::process::exit(2)
}
