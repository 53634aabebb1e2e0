//! Backend servers that say who they are and whom they saw, and clients.
//!
//! Every reply is one line: `<identity> <peer ip:port as the server saw it>`,
//! so a test asserts on exactly what a user would observe.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::Netns;

pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// A TCP or UDP server bound to one pod IP; stops on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    pub addr: SocketAddr,
    pub identity: String,
}

impl Server {
    pub fn tcp(ns: &Netns, ip: impl Into<IpAddr>, port: u16, identity: &str) -> Self {
        let addr = SocketAddr::new(ip.into(), port);
        let listener = ns.run(move || TcpListener::bind(addr)).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, id) = (stop.clone(), identity.to_owned());
        let handle = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let (flag, id) = (flag.clone(), id.clone());
                        std::thread::spawn(move || serve_tcp(stream, peer, &id, &flag));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self { stop, handle: Some(handle), addr, identity: identity.to_owned() }
    }

    pub fn udp(ns: &Netns, ip: impl Into<IpAddr>, port: u16, identity: &str) -> Self {
        let addr = SocketAddr::new(ip.into(), port);
        let socket = ns.run(move || UdpSocket::bind(addr)).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
        socket.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, id) = (stop.clone(), identity.to_owned());
        let handle = std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(format!("{id} {peer}\n").as_bytes(), peer);
                }
            }
        });
        Self { stop, handle: Some(handle), addr, identity: identity.to_owned() }
    }
}

fn serve_tcp(stream: TcpStream, peer: SocketAddr, id: &str, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer.write_all(format!("{id} {peer}\n").as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// What a client observed for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Who answered.
    pub identity: String,
    /// The client address as the server saw it.
    pub peer_seen: SocketAddr,
    /// The address the reply came from, as the client saw it (getpeername / recvfrom).
    pub reply_from: SocketAddr,
    /// The client's own address.
    pub local: SocketAddr,
}

fn parse_reply(line: &str, reply_from: SocketAddr, local: SocketAddr) -> io::Result<Reply> {
    let mut parts = line.split_whitespace();
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("unexpected reply {line:?}"));
    let identity = parts.next().ok_or_else(bad)?.to_owned();
    let peer_seen = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    Ok(Reply { identity, peer_seen, reply_from, local })
}

/// A kept-alive TCP connection opened from inside a namespace.
pub struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Connection {
    pub fn open(ns: &Netns, target: impl Into<SocketAddr>) -> io::Result<Self> {
        let target = target.into();
        Self::from_stream(ns.run(move || TcpStream::connect_timeout(&target, IO_TIMEOUT))?)
    }

    fn from_stream(stream: TcpStream) -> io::Result<Self> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self { writer: stream.try_clone()?, reader: BufReader::new(stream) })
    }

    pub fn request(&mut self) -> io::Result<Reply> {
        self.writer.write_all(b"hello\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        let stream = self.reader.get_ref();
        parse_reply(&line, stream.peer_addr()?, stream.local_addr()?)
    }
}

/// One TCP connection, one request: connect, ask, read, close.
pub fn tcp_request(ns: &Netns, target: impl Into<SocketAddr>) -> io::Result<Reply> {
    Connection::open(ns, target)?.request()
}

/// One UDP datagram and its answer.
pub fn udp_request(ns: &Netns, target: impl Into<SocketAddr>) -> io::Result<Reply> {
    let target = target.into();
    let any: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
    let socket = ns.run(move || UdpSocket::bind(any))?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.send_to(b"hello\n", target)?;
    let mut buf = [0u8; 1500];
    let (n, from) = socket.recv_from(&mut buf)?;
    parse_reply(&String::from_utf8_lossy(&buf[..n]), from, socket.local_addr()?)
}

/// Requests from this thread's namespace, one socket at a time:
/// `tcp` (a connection), `udp` (unconnected: sendto/recvfrom) or
/// `udp-connected` (connect, send, recv; the peer is getpeername's).
/// The socket is made at the first request, so a refused connect is that
/// request's error.
pub struct Client {
    mode: ClientMode,
    target: SocketAddr,
    tcp: Option<Connection>,
    udp: Option<UdpSocket>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientMode {
    Tcp,
    Udp,
    UdpConnected,
}

impl Client {
    pub fn new(mode: &str, target: SocketAddr) -> io::Result<Self> {
        let mode = match mode {
            "tcp" => ClientMode::Tcp,
            "udp" => ClientMode::Udp,
            "udp-connected" => ClientMode::UdpConnected,
            other => return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("unknown mode {other}"))),
        };
        Ok(Self { mode, target, tcp: None, udp: None })
    }

    pub fn request(&mut self) -> io::Result<Reply> {
        let target = self.target;
        if self.mode == ClientMode::Tcp {
            if self.tcp.is_none() {
                self.tcp = Some(Connection::from_stream(TcpStream::connect_timeout(&target, IO_TIMEOUT)?)?);
            }
            return self.tcp.as_mut().expect("just set").request();
        }
        if self.udp.is_none() {
            let any: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
            let socket = UdpSocket::bind(any)?;
            socket.set_read_timeout(Some(IO_TIMEOUT))?;
            if self.mode == ClientMode::UdpConnected {
                socket.connect(target)?;
            }
            self.udp = Some(socket);
        }
        let socket = self.udp.as_ref().expect("just set");
        let mut buf = [0u8; 1500];
        let (n, from) = if self.mode == ClientMode::UdpConnected {
            socket.send(b"hello\n")?;
            let n = socket.recv(&mut buf)?;
            (n, socket.peer_addr()?)
        } else {
            socket.send_to(b"hello\n", target)?;
            socket.recv_from(&mut buf)?
        };
        parse_reply(&String::from_utf8_lossy(&buf[..n]), from, socket.local_addr()?)
    }
}
