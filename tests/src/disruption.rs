//! Continuous client load for restart and upgrade tests: short TCP
//! connections and UDP requests back to back, plus long-lived TCP
//! connections that ask every 50 ms. Counts what a user would notice: failed
//! connections and requests, the longest time without a completed one,
//! long-lived connections that broke or moved to another backend.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::Netns;

const TIMEOUT: Duration = Duration::from_secs(1);

/// Counters of one kind of traffic since the last [`Load::mark`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub ok: u64,
    pub failed: u64,
    /// Longest time between two completed requests.
    pub longest_gap: Duration,
}

#[derive(Default)]
struct Tally {
    counts: Counts,
    last_ok: Option<Instant>,
    errors: Vec<String>,
}

impl Tally {
    fn record(&mut self, result: Result<(), String>) {
        let now = Instant::now();
        match result {
            Ok(()) => {
                self.counts.ok += 1;
                if let Some(last) = self.last_ok {
                    self.counts.longest_gap = self.counts.longest_gap.max(now - last);
                }
                self.last_ok = Some(now);
            }
            Err(e) => {
                self.counts.failed += 1;
                if self.errors.len() < 10 {
                    self.errors.push(e);
                }
            }
        }
    }
}

/// One phase's figures.
#[derive(Clone, Debug, Default)]
pub struct Phase {
    pub tcp: Counts,
    pub udp: Counts,
    /// First few errors, for the assertion message.
    pub errors: Vec<String>,
}

/// A long-lived connection's fate.
#[derive(Clone, Debug)]
pub struct LongLived {
    pub backend: String,
    pub requests: u64,
    /// The first error, if the connection broke.
    pub broken: Option<String>,
    /// Another backend answered at some point.
    pub moved_to: Option<String>,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    tcp: Arc<Mutex<Tally>>,
    udp: Arc<Mutex<Tally>>,
    threads: Vec<JoinHandle<()>>,
    long_lived: JoinHandle<Vec<LongLived>>,
}

fn ask(stream: &mut TcpStream, reader: &mut BufReader<TcpStream>) -> Result<String, String> {
    stream.write_all(b"hello\n").map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Err("connection closed".into()),
        Ok(_) => Ok(line.split_whitespace().next().unwrap_or_default().to_owned()),
        Err(e) => Err(format!("read: {e}")),
    }
}

fn open(target: SocketAddrV4) -> Result<(TcpStream, BufReader<TcpStream>), String> {
    let stream = TcpStream::connect_timeout(&SocketAddr::V4(target), TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    Ok((stream, reader))
}

fn udp_once(target: SocketAddrV4) -> Result<(), String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    socket.connect(target).map_err(|e| e.to_string())?;
    socket.send(b"hello\n").map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 512];
    socket.recv(&mut buf).map_err(|e| format!("recv: {e}"))?;
    Ok(())
}

impl Load {
    /// Starts the load from inside `client`: `long_lived` connections are
    /// open (and have answered once) when this returns.
    pub fn start(client: &Netns, tcp: SocketAddrV4, udp: SocketAddrV4, long_lived: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tcp_tally = Arc::new(Mutex::new(Tally::default()));
        let udp_tally = Arc::new(Mutex::new(Tally::default()));
        let mut threads = Vec::new();
        let (flag, tally) = (stop.clone(), tcp_tally.clone());
        threads.push(client.spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let result = open(tcp).and_then(|(mut s, mut r)| ask(&mut s, &mut r)).map(|_| ());
                tally.lock().unwrap().record(result.map_err(|e| format!("tcp: {e}")));
            }
        }));
        let (flag, tally) = (stop.clone(), udp_tally.clone());
        threads.push(client.spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let result = udp_once(udp);
                tally.lock().unwrap().record(result.map_err(|e| format!("udp: {e}")));
            }
        }));
        let opened = client.run(move || {
            (0..long_lived)
                .map(|_| {
                    let (mut s, mut r) = open(tcp).expect("opening a long-lived connection before the test");
                    let backend = ask(&mut s, &mut r).expect("first request of a long-lived connection");
                    (s, r, LongLived { backend, requests: 1, broken: None, moved_to: None })
                })
                .collect::<Vec<_>>()
        });
        let flag = stop.clone();
        let long_lived = std::thread::spawn(move || {
            let mut conns = opened;
            while !flag.load(Ordering::Relaxed) {
                for (stream, reader, fate) in conns.iter_mut().filter(|(_, _, f)| f.broken.is_none()) {
                    match ask(stream, reader) {
                        Ok(backend) => {
                            fate.requests += 1;
                            if backend != fate.backend && fate.moved_to.is_none() {
                                fate.moved_to = Some(backend);
                            }
                        }
                        Err(e) => fate.broken = Some(e),
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            conns.into_iter().map(|(_, _, fate)| fate).collect()
        });
        Self { stop, tcp: tcp_tally, udp: udp_tally, threads, long_lived }
    }

    /// The figures since the previous mark (or the start), and a new phase.
    pub fn mark(&self) -> Phase {
        phase_of(&self.tcp, &self.udp)
    }

    /// Stops the load; the last phase and every long-lived connection's fate.
    pub fn finish(self) -> (Phase, Vec<LongLived>) {
        let Load { stop, tcp, udp, threads, long_lived } = self;
        stop.store(true, Ordering::Relaxed);
        for thread in threads {
            let _ = thread.join();
        }
        let fates = long_lived.join().expect("long-lived connection thread");
        (phase_of(&tcp, &udp), fates)
    }
}

fn phase_of(tcp: &Mutex<Tally>, udp: &Mutex<Tally>) -> Phase {
    let take = |tally: &Mutex<Tally>| {
        let mut tally = tally.lock().unwrap();
        let counts = std::mem::take(&mut tally.counts);
        (counts, std::mem::take(&mut tally.errors))
    };
    let (tcp, mut errors) = take(tcp);
    let (udp, more) = take(udp);
    errors.extend(more);
    Phase { tcp, udp, errors }
}
