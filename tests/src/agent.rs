//! The real `mcs-agent` binary, run inside the node namespace as a user would.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::netns::Netns;

/// The agent binary: `$MCS_AGENT_BIN`, else `mcs-agent` next to the running
/// test executable's profile directory (where `cargo build` puts it).
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MCS_AGENT_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join("mcs-agent");
    assert!(
        path.exists(),
        "{} not found: build it first (`cargo build -p mcs-agent`; `cargo xtask test` does) or set MCS_AGENT_BIN",
        path.display()
    );
    path
}

/// A running agent; SIGTERM and wait on drop.
pub struct Agent {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// Starts `mcs-agent run --manifests <dir> --interface ...` in `ns`,
    /// waiting until it reports ready.
    pub fn start(ns: &Netns, manifests: &Path, interfaces: &[String], extra: &[&str]) -> Self {
        Self::start_binary(&agent_binary(), ns, manifests, interfaces, extra)
    }

    pub fn start_binary(binary: &Path, ns: &Netns, manifests: &Path, interfaces: &[String], extra: &[&str]) -> Self {
        let mut args = vec!["run".to_owned(), "--manifests".to_owned(), manifests.display().to_string()];
        for iface in interfaces {
            args.extend(["--interface".to_owned(), iface.clone()]);
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        // Socket-level load balancing only where a test asks for it, on a
        // cgroup of its own (under `ip netns exec` the default finds no
        // cgroup2 mount anyway).
        if !extra.iter().any(|a| a.starts_with("--socket-lb")) {
            args.extend(["--socket-lb", "off", "--socket-lb-host-namespace", "off"].map(str::to_owned));
        }
        let mut agent = Self::spawn(binary, ns, &args);
        // Generous: a release agent programs 10,000 services in well under a second,
        // a debug build on a loaded 2-core machine can take much longer.
        agent.wait_for(|l| l.contains("agent ready"), Duration::from_secs(120));
        agent
    }

    /// Starts `binary args...` in `ns` without waiting for anything.
    pub fn spawn(binary: &Path, ns: &Netns, args: &[String]) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name()]).arg(binary).args(args);
        cmd.env("MCS_LOG", "info").stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning mcs-agent");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("MCS_TEST_VERBOSE").is_some() {
                    eprintln!("agent: {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Self { child: Some(child), lines }
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The agent's process id (`ip netns exec` execs the binary in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn logs(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a log line matching `pred`; panics with the log if it never comes
    /// or the agent exits.
    pub fn wait_for(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.lines.lock().unwrap().iter().find(|l| pred(l)) {
                return line.clone();
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                std::thread::sleep(Duration::from_millis(100));
                panic!("mcs-agent exited ({status}):\n{}", self.logs().join("\n"));
            }
            assert!(Instant::now() < deadline, "timed out waiting for the agent; log:\n{}", self.logs().join("\n"));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The highest `generation=` the agent has reported as reconciled.
    pub fn generation(&self) -> u64 {
        self.logs()
            .iter()
            .filter(|l| l.contains("reconciled"))
            .filter_map(|l| l.split("generation=").nth(1)?.split_whitespace().next()?.parse().ok())
            .max()
            .unwrap_or(0)
    }

    /// Waits until a reconcile newer than `after` changed the datapath.
    pub fn wait_reconciled_after(&mut self, after: u64) {
        self.wait_for(
            |l| {
                l.contains("reconciled")
                    && l.split("generation=")
                        .nth(1)
                        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                        .is_some_and(|g| g > after)
            },
            Duration::from_secs(5),
        );
    }

    /// Kills the agent without letting it clean up, as a crash would.
    pub fn crash(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then the exit status and the complete log.
    pub fn stop(mut self) -> (bool, Vec<String>) {
        let ok = self.terminate();
        std::thread::sleep(Duration::from_millis(50));
        (ok, self.logs())
    }

    fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        // Kubernetes' default grace period. In manifests mode the exit waits
        // for the kernel to tear down the agent's inotify instance, which on
        // a loaded machine has taken over 10 s (an SRCU grace period).
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                if !status.success() {
                    eprintln!("agent {} ended with {status} after SIGTERM", child.id());
                }
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Where it is stuck, for the failure's record.
        let stacks = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("for t in /proc/{}/task/*; do echo \"$t $(cat $t/comm)\"; cat $t/stack; done", child.id()))
            .output();
        eprintln!(
            "agent {} still running 30 s after SIGTERM, killed; its threads:\n{}",
            child.id(),
            stacks.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
        );
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// `GET path` on the agent's health endpoint (`127.0.0.1:9878` in `ns`):
/// the status code and body, or `None` when nothing answers.
pub fn probe(ns: &Netns, path: &'static str) -> Option<(u16, String)> {
    probe_at(ns, "127.0.0.1:9878", path)
}

/// [`probe`] of an agent started with `--health-addr addr`.
pub fn probe_at(ns: &Netns, addr: &str, path: &'static str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let addr: std::net::SocketAddr = addr.parse().expect("a socket address");
    ns.run(move || {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let code = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        Some((code, body))
    })
}

/// Polls `probe` until `pred` holds; panics with the last answer after `timeout`.
pub fn wait_probe(
    ns: &Netns,
    path: &'static str,
    timeout: Duration,
    pred: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    wait_probe_at(ns, "127.0.0.1:9878", path, timeout, pred)
}

/// [`wait_probe`] of an agent started with `--health-addr addr`.
pub fn wait_probe_at(
    ns: &Netns,
    addr: &str,
    path: &'static str,
    timeout: Duration,
    pred: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = probe_at(ns, addr, path);
        if let Some((code, body)) = &answer
            && pred(*code, body)
        {
            return (*code, body.clone());
        }
        assert!(Instant::now() < deadline, "{path} never reached the expected state; last answer {answer:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
