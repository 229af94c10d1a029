//! Rendezvous: how the ranks of one run find each other and close the ring, through rank 0 at
//! `MASTER_ADDR:MASTER_PORT`, as torch.distributed's TCP store does.
//!
//! Every rank first opens its own ring listener on an ephemeral port. Ranks 1.. connect to rank
//! 0 and say who they are (`WATT1 HELLO <run> <rank> <world> <port>`); rank 0 checks the run and
//! the world size — a straggler of an earlier run or size is told why it is refused and the
//! others keep waiting — and once all have joined, tells each the address of its right
//! neighbour. Each rank then connects to its right neighbour and accepts its left one, which
//! introduces itself again, so a ring is never closed with a stranger.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Deadline;
use crate::ring::Ring;

#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error("rendezvous at {master} timed out after {timeout}: {what}")]
    TimedOut { master: String, timeout: String, what: String },
    #[error("rank 0 at {master} refused this rank: {reason}")]
    Refused { master: String, reason: String },
    #[error("cannot listen on {what}: {source}")]
    Listen { what: String, source: std::io::Error },
    #[error("rendezvous protocol error with {peer}: {message}")]
    Protocol { peer: String, message: String },
    #[error("stopped by a signal during rendezvous")]
    Stopped,
}

/// Who this rank is and where to meet.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    pub rank: usize,
    pub world: usize,
    /// `MASTER_ADDR` (host name or address) and `MASTER_PORT`.
    pub master_addr: String,
    pub master_port: u16,
    /// Names this run: ranks of another run, or of another generation of the same job, are
    /// refused.
    pub run: String,
    pub timeout: Duration,
    /// Read/write timeout of the ring's links: a peer that hangs this long fails the step.
    pub collective_timeout: Duration,
    /// Set by SIGTERM: give up waiting.
    pub stop: Arc<AtomicBool>,
}

impl Rendezvous {
    fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }

    /// Meet every other rank and return this rank's ring.
    pub fn connect(&self) -> Result<Ring, RendezvousError> {
        if self.world == 1 {
            return Ok(Ring::alone());
        }
        let deadline = Deadline::after(self.timeout).or_when(self.stop.clone());
        let ring_listener = TcpListener::bind(("0.0.0.0", 0))
            .map_err(|source| RendezvousError::Listen { what: "an ephemeral port for the ring".into(), source })?;
        let ring_port = ring_listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let right = if self.rank == 0 { self.gather(&deadline, ring_port)? } else { self.join(&deadline, ring_port)? };

        let right_stream = self.connect_with_retry(&right, &deadline)?;
        send_line(&right_stream, &format!("WATT1 RING {} {}", self.run, self.rank), &right)?;
        let left_rank = (self.rank + self.world - 1) % self.world;
        let left_stream = loop {
            let (stream, peer) = accept_until(&ring_listener, &deadline)
                .ok_or_else(|| self.timed_out(format!("rank {left_rank} (left neighbour) never connected")))?;
            let line = read_line(&stream, &deadline).map_err(|message| protocol(peer, message))?;
            if line == format!("WATT1 RING {} {left_rank}", self.run) {
                break stream;
            }
            // Not our left neighbour (a straggler of an earlier run): ignore it.
        };
        Ring::new(self.rank, self.world, left_stream, right_stream, self.collective_timeout)
            .map_err(|e| RendezvousError::Protocol { peer: "the ring's links".into(), message: e.to_string() })
    }

    /// Rank 0: wait for every other rank, then tell each its right neighbour. Returns rank 0's.
    fn gather(&self, deadline: &Deadline, ring_port: u16) -> Result<String, RendezvousError> {
        let listener = TcpListener::bind(("0.0.0.0", self.master_port))
            .map_err(|source| RendezvousError::Listen { what: format!("MASTER_PORT {}", self.master_port), source })?;
        let mut joined: Vec<Option<(TcpStream, String)>> = (0..self.world).map(|_| None).collect();
        while joined.iter().skip(1).any(Option::is_none) {
            let Some((stream, peer)) = accept_until(&listener, deadline) else {
                let missing: Vec<String> =
                    (1..self.world).filter(|&r| joined[r].is_none()).map(|r| r.to_string()).collect();
                let what = format!(
                    "{} of {} ranks joined (missing: {})",
                    self.world - missing.len(),
                    self.world,
                    missing.join(", ")
                );
                return Err(self.timed_out(what));
            };
            let Ok(line) = read_line(&stream, deadline) else { continue };
            match self.check_hello(&line, &joined) {
                Ok((rank, port)) => joined[rank] = Some((stream, format!("{}:{port}", peer.ip()))),
                Err(reason) => {
                    let _ = send_line(&stream, &format!("ERROR {reason}"), &peer.to_string());
                }
            }
        }
        let address = |r: usize| match &joined[r] {
            Some((_, a)) => a.clone(),
            None => format!("{}:{ring_port}", self.master_addr),
        };
        for (r, joined) in joined.iter().enumerate().skip(1) {
            if let Some((stream, peer)) = joined {
                send_line(stream, &format!("RING {}", address((r + 1) % self.world)), peer)?;
            }
        }
        Ok(address(1))
    }

    fn check_hello(&self, line: &str, joined: &[Option<(TcpStream, String)>]) -> Result<(usize, u16), String> {
        let fields: Vec<&str> = line.split(' ').collect();
        let [magic, hello, run, rank, world, port] = fields[..] else {
            return Err(format!("malformed hello {line:?}"));
        };
        if magic != "WATT1" || hello != "HELLO" {
            return Err(format!("malformed hello {line:?}"));
        }
        if run != self.run {
            return Err(format!("this is run {:?}, not {run:?}", self.run));
        }
        if world != self.world.to_string() {
            return Err(format!("WORLD_SIZE is {} here, {world} there", self.world));
        }
        let rank: usize = rank.parse().map_err(|_| format!("bad rank {rank:?}"))?;
        if rank == 0 || rank >= self.world {
            return Err(format!("RANK {rank} is outside 1..{}", self.world));
        }
        if joined[rank].is_some() {
            return Err(format!("RANK {rank} has already joined"));
        }
        let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
        Ok((rank, port))
    }

    /// Ranks 1..: say hello to rank 0 and learn the right neighbour.
    fn join(&self, deadline: &Deadline, ring_port: u16) -> Result<String, RendezvousError> {
        let master = self.master();
        let stream = self.connect_with_retry(&master, deadline)?;
        let hello = format!("WATT1 HELLO {} {} {} {ring_port}", self.run, self.rank, self.world);
        send_line(&stream, &hello, &master)?;
        let reply = read_line(&stream, deadline)
            .map_err(|message| self.timed_out(format!("rank 0 did not answer ({message})")))?;
        if let Some(reason) = reply.strip_prefix("ERROR ") {
            return Err(RendezvousError::Refused { master, reason: reason.into() });
        }
        reply
            .strip_prefix("RING ")
            .map(str::to_owned)
            .ok_or_else(|| RendezvousError::Protocol { peer: master, message: format!("unexpected reply {reply:?}") })
    }

    fn connect_with_retry(&self, address: &str, deadline: &Deadline) -> Result<TcpStream, RendezvousError> {
        let mut last = String::from("no attempt");
        while !deadline.passed() {
            let resolved: Vec<SocketAddr> = address.to_socket_addrs().map(Iterator::collect).unwrap_or_default();
            for a in &resolved {
                match TcpStream::connect_timeout(a, deadline.left().max(Duration::from_millis(1))) {
                    Ok(s) => return Ok(s),
                    Err(e) => last = e.to_string(),
                }
            }
            if resolved.is_empty() {
                last = format!("cannot resolve {address}");
            }
            std::thread::park_timeout(Duration::from_millis(20));
        }
        Err(self.timed_out(format!("cannot connect to {address}: {last}")))
    }

    fn timed_out(&self, what: String) -> RendezvousError {
        if self.stop.load(Ordering::Relaxed) {
            return RendezvousError::Stopped;
        }
        RendezvousError::TimedOut {
            master: self.master(),
            timeout: humantime::format_duration(self.timeout).to_string(),
            what,
        }
    }
}

/// A free port for a rendezvous on this machine (tests, benchmarks, local runs). It is taken
/// below Linux's ephemeral range (32768 and up), where ring listeners and outgoing connections
/// get their ports, so nothing can take it between this pick and rank 0's bind; and no two calls
/// in one process return the same port.
pub fn local_master_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(97) % 10_000;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + ((start + n) % 12_000) as u16;
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
}

fn protocol(peer: SocketAddr, message: String) -> RendezvousError {
    RendezvousError::Protocol { peer: peer.to_string(), message }
}

/// The next connection, or `None` once the deadline passes.
fn accept_until(listener: &TcpListener, deadline: &Deadline) -> Option<(TcpStream, SocketAddr)> {
    let _ = listener.set_nonblocking(true);
    while !deadline.passed() {
        match listener.accept() {
            Ok((stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                return Some((stream, peer));
            }
            Err(_) => std::thread::park_timeout(Duration::from_millis(5)),
        }
    }
    None
}

fn send_line(mut stream: &TcpStream, line: &str, peer: &str) -> Result<(), RendezvousError> {
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| RendezvousError::Protocol { peer: peer.into(), message: e.to_string() })
}

/// One handshake line (at most 512 bytes), before the deadline.
fn read_line(mut stream: &TcpStream, deadline: &Deadline) -> Result<String, String> {
    let _ = stream.set_read_timeout(Some(deadline.left().max(Duration::from_millis(1))));
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 512 {
        match stream.read(&mut byte) {
            Ok(0) => return Err("connection closed".into()),
            Ok(_) if byte[0] == b'\n' => return String::from_utf8(line).map_err(|_| "not UTF-8".into()),
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("line too long".into())
}
