//! Backend servers and the load generator: TCP connect/request/response/close
//! (netperf's TCP_CRR), request/response on a kept-alive connection (TCP_RR)
//! and UDP request/response (UDP_RR), from one or several client namespaces.
//!
//! Every reply names the pod address that answered, so a run also proves
//! which backends were reached and that replies came back from the address
//! the client dialled (connected sockets drop anything else).

use std::{
    collections::BTreeSet,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use mcs_tests::netns::Netns;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

const REQUEST: &[u8] = b"ping\n";
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// Enough accept threads for every kept-alive client connection plus churn.
const TCP_WORKERS: usize = 16;

/// The backends' servers in one namespace: a TCP listener on every address
/// (accepted sockets know which pod address was dialled) and a UDP socket per
/// pod address (so replies leave from the address the request reached).
pub struct Servers {
    stop: Arc<AtomicBool>,
    listener: Arc<Socket>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(ns: &Netns, pods: &[Ipv4Addr], tcp_port: u16, udp_port: u16) -> io::Result<Self> {
        let listener = ns.run(move || -> io::Result<Socket> {
            // Dual-stack: IPv4 pods' addresses arrive as v4-mapped ones.
            let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
            socket.set_only_v6(false)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, tcp_port)).into())?;
            // Bursts of new connections from several clients must not overflow the
            // accept queue: a dropped SYN costs a 1 s retransmit and ruins the rate.
            socket.listen(4096)?;
            Ok(socket)
        })?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for _ in 0..TCP_WORKERS {
            let (listener, stop) = (listener.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((socket, _)) = listener.accept() {
                        serve_tcp(socket.into(), &stop);
                    }
                }
            }));
        }
        for &pod in pods {
            let socket = ns.run(move || UdpSocket::bind(SocketAddrV4::new(pod, udp_port)))?;
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            let stop = stop.clone();
            let reply = format!("{pod}\n");
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(reply.as_bytes(), peer);
                    }
                }
            }));
        }
        Ok(Self { stop, listener, threads })
    }
}

fn serve_tcp(mut stream: TcpStream, stop: &AtomicBool) {
    let reply = match stream.local_addr() {
        Ok(SocketAddr::V4(local)) => format!("{}\n", local.ip()),
        Ok(SocketAddr::V6(local)) => match local.ip().to_ipv4_mapped() {
            Some(v4) => format!("{v4}\n"),
            None => format!("{}\n", local.ip()),
        },
        Err(_) => return,
    };
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {
                if stream.write_all(reply.as_bytes()).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Shutting a listening socket down wakes every thread blocked in accept().
        let _ = self.listener.shutdown(std::net::Shutdown::Both);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// New TCP connection, one request and response, close.
    TcpCrr,
    /// Request/response on a kept-alive TCP connection.
    TcpRr,
    /// UDP request/response on one socket per client.
    UdpRr,
}

impl Workload {
    pub const ALL: [Workload; 3] = [Workload::TcpCrr, Workload::TcpRr, Workload::UdpRr];

    pub fn label(self) -> &'static str {
        match self {
            Workload::TcpCrr => "TCP new connections/s (connect, request, response, close)",
            Workload::TcpRr => "TCP request/response on a kept-alive connection",
            Workload::UdpRr => "UDP request/response",
        }
    }
}

/// One timed run of one workload.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Run {
    pub transactions: u64,
    pub errors: u64,
    pub seconds: f64,
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Distinct pod addresses that answered.
    pub backends: usize,
}

#[derive(Default)]
struct WorkerResult {
    ok: u64,
    errors: u64,
    latencies_ns: Vec<u64>,
    answered: BTreeSet<IpAddr>,
}

/// Runs `workload` against `target` from every client namespace at once for
/// `duration`, one worker thread per client.
pub fn run(workload: Workload, clients: &[&Netns], target: SocketAddr, duration: Duration) -> Run {
    run_spread(workload, clients, &[target], duration)
}

/// As [`run`], spread over `targets` as a VIP spreads over its backends:
/// client `k` starts at `targets[k]`; a new connection per transaction
/// goes to the next one, a kept-alive connection or a UDP socket keeps its
/// first. (One server thread answering four clients batches work that four
/// would not: a baseline of one pod address is not the VIP's equal.)
pub fn run_spread(workload: Workload, clients: &[&Netns], targets: &[SocketAddr], duration: Duration) -> Run {
    let barrier = Arc::new(Barrier::new(clients.len()));
    let handles: Vec<JoinHandle<WorkerResult>> = clients
        .iter()
        .enumerate()
        .map(|(k, ns)| {
            let barrier = barrier.clone();
            let mut own: Vec<SocketAddr> = targets.to_vec();
            own.rotate_left(k % targets.len().max(1));
            ns.spawn(move || {
                barrier.wait();
                let deadline = Instant::now() + duration;
                match workload {
                    Workload::TcpCrr => crr(&own, deadline),
                    Workload::TcpRr => rr(own[0], deadline),
                    Workload::UdpRr => udp(own[0], deadline),
                }
            })
        })
        .collect();
    let started = Instant::now();
    let mut total = WorkerResult::default();
    for handle in handles {
        let result = handle.join().unwrap_or_default();
        total.ok += result.ok;
        total.errors += result.errors;
        total.latencies_ns.extend(result.latencies_ns);
        total.answered.extend(result.answered);
    }
    let seconds = started.elapsed().as_secs_f64().max(duration.as_secs_f64());
    total.latencies_ns.sort_unstable();
    let pct = |p: usize| {
        let v = &total.latencies_ns;
        if v.is_empty() { 0.0 } else { v[(v.len() * p / 100).min(v.len() - 1)] as f64 / 1000.0 }
    };
    Run {
        transactions: total.ok,
        errors: total.errors,
        seconds,
        rate: total.ok as f64 / duration.as_secs_f64(),
        p50_us: pct(50),
        p99_us: pct(99),
        backends: total.answered.len(),
    }
}

fn parse_reply(buf: &[u8]) -> Option<IpAddr> {
    std::str::from_utf8(buf).ok()?.trim_end().parse().ok()
}

/// Reads one newline-terminated reply.
fn read_reply(stream: &mut TcpStream, buf: &mut [u8; 64]) -> io::Result<IpAddr> {
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        len += n;
        if buf[..len].ends_with(b"\n") {
            return parse_reply(&buf[..len]).ok_or_else(|| io::ErrorKind::InvalidData.into());
        }
        if len == buf.len() {
            return Err(io::ErrorKind::InvalidData.into());
        }
    }
}

fn connect(target: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn crr(targets: &[SocketAddr], deadline: Instant) -> WorkerResult {
    let mut result = WorkerResult::default();
    let mut buf = [0u8; 64];
    let mut next = targets.iter().cycle();
    while Instant::now() < deadline {
        let target = *next.next().expect("at least one target");
        let started = Instant::now();
        let answered = connect(target).and_then(|mut stream| {
            stream.write_all(REQUEST)?;
            read_reply(&mut stream, &mut buf)
        });
        match answered {
            Ok(pod) => {
                result.ok += 1;
                result.latencies_ns.push(started.elapsed().as_nanos() as u64);
                result.answered.insert(pod);
            }
            Err(_) => result.errors += 1,
        }
    }
    result
}

fn rr(target: SocketAddr, deadline: Instant) -> WorkerResult {
    let mut result = WorkerResult::default();
    let mut buf = [0u8; 64];
    let mut stream = None;
    while Instant::now() < deadline {
        if stream.is_none() {
            match connect(target) {
                Ok(s) => stream = Some(s),
                Err(_) => {
                    result.errors += 1;
                    continue;
                }
            }
        }
        let s = stream.as_mut().expect("connected above");
        let started = Instant::now();
        match s.write_all(REQUEST).and_then(|()| read_reply(s, &mut buf)) {
            Ok(pod) => {
                result.ok += 1;
                result.latencies_ns.push(started.elapsed().as_nanos() as u64);
                result.answered.insert(pod);
            }
            Err(_) => {
                result.errors += 1;
                stream = None;
            }
        }
    }
    result
}

fn udp(target: SocketAddr, deadline: Instant) -> WorkerResult {
    let mut result = WorkerResult::default();
    let any: IpAddr =
        if target.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { std::net::Ipv6Addr::UNSPECIFIED.into() };
    let socket = match UdpSocket::bind((any, 0))
        .and_then(|s| s.connect(target).map(|()| s))
        .and_then(|s| s.set_read_timeout(Some(Duration::from_millis(200))).map(|()| s))
    {
        Ok(socket) => socket,
        Err(_) => {
            result.errors += 1;
            return result;
        }
    };
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        let started = Instant::now();
        // A connected socket only accepts datagrams from `target`: a reply that
        // was not reverse-translated to the ClusterSetIP counts as lost.
        match socket.send(REQUEST).and_then(|_| socket.recv(&mut buf)) {
            Ok(n) => match parse_reply(&buf[..n]) {
                Some(pod) => {
                    result.ok += 1;
                    result.latencies_ns.push(started.elapsed().as_nanos() as u64);
                    result.answered.insert(pod);
                }
                None => result.errors += 1,
            },
            Err(_) => result.errors += 1,
        }
    }
    result
}
