//! The agent's control socket, `<state-dir>/agent.sock`: `mcs-agent inspect`
//! asks the running agent, which answers from its loop between passes, so
//! the kernel's tables and the names behind them are of one generation (as
//! Cilium's CLI asks its agent). One request line, one JSON answer, then the
//! connection closes. Only root can connect (mode 0600).

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixListener,
    sync::{mpsc::UnboundedSender, oneshot},
};
use tracing::warn;

use super::error::{AgentError, Context as _};

/// The socket's file name in `--state-dir`.
pub const SOCKET: &str = "agent.sock";

/// A question for the loop, and where its answer goes.
pub struct Request {
    /// `services` or `inventory`.
    pub what: String,
    pub reply: oneshot::Sender<String>,
}

/// The bound socket: removed when dropped, unless another agent has bound
/// the path since (an upgrade's new agent takes it over while the old one
/// still runs). The listener lives as long as the agent, so its inode is
/// not reused meanwhile.
pub struct ControlSocket {
    path: PathBuf,
    id: (u64, u64),
}

impl ControlSocket {
    /// The path is still this agent's socket (no newer agent has bound it).
    pub fn is_ours(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if self.is_ours() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds `<state_dir>/agent.sock` (replacing a stale one) and serves it on a
/// task, one connection at a time: each request goes to the loop on `tx`,
/// so at most one answer is being computed or waiting for the loop.
pub fn serve(state_dir: &Path, tx: UnboundedSender<Request>) -> Result<ControlSocket, AgentError> {
    let path = state_dir.join(SOCKET);
    let what = || format!("--state-dir {}: the control socket {}", state_dir.display(), path.display());
    std::fs::create_dir_all(state_dir).with_context(what)?;
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(what),
    }
    let listener = UnixListener::bind(&path).with_context(what)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).with_context(what)?;
    let meta = std::fs::metadata(&path).with_context(what)?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => answer(stream, &tx).await,
                // Out of descriptors, most likely: try again in a moment.
                Err(e) => {
                    warn!(error = %e, "the control socket could not accept a connection");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    Ok(ControlSocket { path, id: (meta.dev(), meta.ino()) })
}

/// One connection: a request line (5 s to send it), the loop's answer, and
/// 30 s to take it; a client too slow for either is dropped.
async fn answer(stream: tokio::net::UnixStream, tx: &UnboundedSender<Request>) {
    use tokio::io::AsyncReadExt as _;
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(256));
    let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line));
    if !matches!(read.await, Ok(Ok(_))) {
        return;
    }
    let (reply, answer) = oneshot::channel();
    if tx.send(Request { what: line.trim().to_owned(), reply }).is_err() {
        return;
    }
    if let Ok(answer) = answer.await {
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            write.write_all(answer.as_bytes()).await?;
            write.shutdown().await
        })
        .await;
    }
}

/// Asks the agent whose `--state-dir` is `state_dir`; `None` when no agent
/// answers there (stopped, or one without a control socket).
pub fn ask(state_dir: &Path, what: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(state_dir.join(SOCKET)).ok()?;
    // The loop answers between passes: a cold start at 100k services takes seconds.
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    stream.write_all(format!("{what}\n").as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    (!answer.is_empty()).then_some(answer)
}
