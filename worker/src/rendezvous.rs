//! Rendezvous: how the ranks of one run find each other and close the ring, through rank 0 at
//! `MASTER_ADDR:MASTER_PORT`, as torch.distributed's TCP store does — but only the run's own
//! ranks can join.
//!
//! Every listener (rank 0's, each rank's ring listener) opens each connection with a challenge
//! (`WATT2 CHALLENGE <nonce>`), and the connecting rank answers with an HMAC-SHA256 over what it
//! says and the nonce, keyed by the run's secret (`WATT_RUN_TOKEN`, a fresh one for each job
//! epoch from the controller): the secret itself never crosses the wire, and a rank that does not
//! hold it is refused. Ranks 1.. say who they are to rank 0 (`WATT2 HELLO <run> <rank> <world>
//! <port> <nonce> <mac>`); rank 0 checks the proof, the run and the world size — a straggler of
//! an earlier run or size is told why it is refused and the others keep waiting — and once all
//! have joined, tells each the address of its right neighbour, with a proof of its own over the
//! joiner's nonce (so no impostor steers a rank to a ring of its making). Each rank then
//! connects to its right neighbour and accepts its left one, which proves itself again, so a ring
//! is never closed with a stranger.
//!
//! Each connection has [`HANDSHAKE`] to say its piece, and rank 0 hears every joiner on a thread
//! of its own: an idle or slow connection never holds up the others. Rank 0 listens on the
//! `MASTER_ADDR` interface (every interface only where that address is not this machine's), and
//! each rank's ring listener on the interface it reaches rank 0 through.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use watt_common::hex::{decode, encode};

use crate::clock::Deadline;
use crate::ring::Ring;

/// How long a connection has to say its piece.
pub const HANDSHAKE: Duration = Duration::from_secs(3);

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
    /// The run's secret (`WATT_RUN_TOKEN`): every rank proves it holds it. `None` only outside
    /// Watt (a run by hand); such a rank is refused by any rank that has a secret.
    pub token: Option<String>,
    pub timeout: Duration,
    /// Read/write timeout of the ring's links: a peer that hangs this long fails the step.
    pub collective_timeout: Duration,
    /// Set by SIGTERM: give up waiting.
    pub stop: Arc<AtomicBool>,
}

/// A joiner as rank 0 heard it: its connection, address and hello line.
type Heard = (TcpStream, SocketAddr, Result<String, String>, String);

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
        let (right, ring_listener) = if self.rank == 0 { self.gather(&deadline)? } else { self.join(&deadline)? };

        // Each rank connects right while it accepts from the left: the right link's handshake
        // waits for the neighbour's challenge, which it sends only once it accepts.
        let right_link = {
            let (this, right, deadline) = (self.clone(), right.clone(), deadline.clone());
            std::thread::spawn(move || this.link_right(&right, &deadline))
        };
        let left_rank = (self.rank + self.world - 1) % self.world;
        let left_stream = loop {
            let (stream, peer) = accept_until(&ring_listener, &deadline)
                .ok_or_else(|| self.timed_out(format!("rank {left_rank} (left neighbour) never connected")))?;
            let nonce = new_nonce();
            let _ = send_line(&stream, &format!("WATT2 CHALLENGE {nonce}"), &peer.to_string());
            let Ok(line) = read_line(&stream, &handshake(&deadline)) else { continue };
            let fields: Vec<&str> = line.split(' ').collect();
            if let ["WATT2", "RING", run, rank, proof] = fields[..] {
                if run == self.run
                    && rank == left_rank.to_string()
                    && self.verify(&format!("link {run} {rank} {nonce}"), proof)
                {
                    break stream;
                }
            }
            // Not our left neighbour (a straggler of an earlier run, a stranger): ignore it.
        };
        let right_stream =
            right_link.join().map_err(|_| protocol_at(&right, "the right link's handshake panicked".into()))??;
        Ring::new(self.rank, self.world, left_stream, right_stream, self.collective_timeout)
            .map_err(|e| RendezvousError::Protocol { peer: "the ring's links".into(), message: e.to_string() })
    }

    /// Connect to the right neighbour and prove this rank to it.
    fn link_right(&self, right: &str, deadline: &Deadline) -> Result<TcpStream, RendezvousError> {
        let stream = self.connect_with_retry(right, deadline)?;
        let nonce = read_line(&stream, &handshake(deadline))
            .ok()
            .and_then(|l| l.strip_prefix("WATT2 CHALLENGE ").map(str::to_owned))
            .ok_or_else(|| protocol_at(right, "no challenge from the right neighbour".into()))?;
        let proof = self.mac(&format!("link {} {} {nonce}", self.run, self.rank));
        send_line(&stream, &format!("WATT2 RING {} {} {proof}", self.run, self.rank), right)?;
        Ok(stream)
    }

    /// Rank 0: wait for every other rank, then tell each its right neighbour. Returns rank 0's
    /// right neighbour and its own ring listener.
    fn gather(&self, deadline: &Deadline) -> Result<(String, TcpListener), RendezvousError> {
        let listener = bind_master(&self.master_addr, self.master_port)
            .map_err(|source| RendezvousError::Listen { what: format!("MASTER_PORT {}", self.master_port), source })?;
        let local = listener.local_addr().map(|a| a.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let ring_listener = TcpListener::bind((local, 0))
            .map_err(|source| RendezvousError::Listen { what: "an ephemeral port for the ring".into(), source })?;
        let ring_port = ring_listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let _ = listener.set_nonblocking(true);
        // Each connection is heard on a thread of its own, for at most HANDSHAKE.
        let (heard_tx, heard) = mpsc::channel::<Heard>();
        let mut joined: Vec<Option<(TcpStream, String, String)>> = (0..self.world).map(|_| None).collect();
        while joined.iter().skip(1).any(Option::is_none) {
            if deadline.passed() {
                let missing: Vec<String> =
                    (1..self.world).filter(|&r| joined[r].is_none()).map(|r| r.to_string()).collect();
                let what = format!(
                    "{} of {} ranks joined (missing: {})",
                    self.world - missing.len(),
                    self.world,
                    missing.join(", ")
                );
                return Err(self.timed_out(what));
            }
            if let Ok((stream, peer)) = listener.accept() {
                let _ = stream.set_nonblocking(false);
                let (tx, limit) = (heard_tx.clone(), handshake(deadline));
                std::thread::spawn(move || {
                    let nonce = new_nonce();
                    let line = send_line(&stream, &format!("WATT2 CHALLENGE {nonce}"), &peer.to_string())
                        .map_err(|e| e.to_string())
                        .and_then(|()| read_line(&stream, &limit));
                    let _ = tx.send((stream, peer, line, nonce));
                });
                continue;
            }
            match heard.recv_timeout(Duration::from_millis(5)) {
                Ok((stream, peer, Ok(line), nonce)) => match self.check_hello(&line, &nonce, &joined) {
                    Ok((rank, port, their_nonce)) => {
                        joined[rank] = Some((stream, format!("{}:{port}", peer.ip()), their_nonce))
                    }
                    Err(reason) => {
                        let _ = send_line(&stream, &format!("ERROR {reason}"), &peer.to_string());
                    }
                },
                // Silent, slow or gone: dropped, and the others were heard meanwhile.
                Ok((_, _, Err(_), _)) | Err(_) => {}
            }
        }
        let address = |r: usize| match &joined[r] {
            Some((_, a, _)) => a.clone(),
            None => SocketAddr::new(local, ring_port).to_string(),
        };
        for (r, joined) in joined.iter().enumerate().skip(1) {
            if let Some((stream, peer, their_nonce)) = joined {
                let right = address((r + 1) % self.world);
                let proof = self.mac(&format!("ring {right} {their_nonce}"));
                send_line(stream, &format!("RING {right} {proof}"), peer)?;
            }
        }
        Ok((address(1), ring_listener))
    }

    /// A joiner's hello, checked: its rank, ring port and nonce, or why it is refused.
    fn check_hello(
        &self,
        line: &str,
        nonce: &str,
        joined: &[Option<(TcpStream, String, String)>],
    ) -> Result<(usize, u16, String), String> {
        let fields: Vec<&str> = line.split(' ').collect();
        let ["WATT2", "HELLO", run, rank, world, port, their_nonce, proof] = fields[..] else {
            return Err(format!("malformed hello {line:?}"));
        };
        if !self.verify(&format!("hello {run} {rank} {world} {port} {nonce} {their_nonce}"), proof) {
            return Err("no proof of this run's secret (WATT_RUN_TOKEN)".into());
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
        Ok((rank, port, their_nonce.to_string()))
    }

    /// Ranks 1..: say hello to rank 0 and learn the right neighbour. Returns it and this rank's
    /// ring listener, on the interface rank 0 is reached through.
    fn join(&self, deadline: &Deadline) -> Result<(String, TcpListener), RendezvousError> {
        let master = self.master();
        let stream = self.connect_with_retry(&master, deadline)?;
        let local = stream.local_addr().map(|a| a.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let ring_listener = TcpListener::bind((local, 0))
            .map_err(|source| RendezvousError::Listen { what: "an ephemeral port for the ring".into(), source })?;
        let ring_port = ring_listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let challenge = read_line(&stream, &handshake(deadline))
            .map_err(|message| self.timed_out(format!("rank 0 did not send its challenge ({message})")))?;
        let Some(nonce) = challenge.strip_prefix("WATT2 CHALLENGE ") else {
            return Err(protocol_at(&master, format!("unexpected greeting {challenge:?}")));
        };
        let mine = new_nonce();
        let said = format!("{} {} {} {ring_port}", self.run, self.rank, self.world);
        let proof = self.mac(&format!("hello {said} {nonce} {mine}"));
        send_line(&stream, &format!("WATT2 HELLO {said} {mine} {proof}"), &master)?;
        let reply = read_line(&stream, deadline)
            .map_err(|message| self.timed_out(format!("rank 0 did not answer ({message})")))?;
        if let Some(reason) = reply.strip_prefix("ERROR ") {
            return Err(RendezvousError::Refused { master, reason: reason.into() });
        }
        let (right, proof) = reply
            .strip_prefix("RING ")
            .and_then(|rest| rest.split_once(' '))
            .ok_or_else(|| protocol_at(&master, format!("unexpected reply {reply:?}")))?;
        if !self.verify(&format!("ring {right} {mine}"), proof) {
            return Err(protocol_at(&master, "rank 0 gave no proof of this run's secret".into()));
        }
        Ok((right.to_string(), ring_listener))
    }

    /// The proof of `message` under the run's secret; `-` without one.
    fn mac(&self, message: &str) -> String {
        let Some(token) = &self.token else { return "-".into() };
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(token.as_bytes()).expect("HMAC takes keys of any length");
        mac.update(message.as_bytes());
        encode(&mac.finalize().into_bytes())
    }

    /// Whether `proof` is the proof of `message` (compared in constant time). Without a secret
    /// only `-` is, and a rank with a secret accepts no `-`.
    fn verify(&self, message: &str, proof: &str) -> bool {
        let Some(token) = &self.token else { return proof == "-" };
        let Some(bytes) = decode(proof) else { return false };
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(token.as_bytes()).expect("HMAC takes keys of any length");
        mac.update(message.as_bytes());
        mac.verify_slice(&bytes).is_ok()
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

/// Rank 0's listener on the `MASTER_ADDR` interface; on every interface only when that address
/// is not one of this machine's (behind a NAT, a load balancer): the proofs still keep strangers
/// out.
fn bind_master(master_addr: &str, port: u16) -> std::io::Result<TcpListener> {
    let addresses: Vec<SocketAddr> = (master_addr, port).to_socket_addrs().map(Iterator::collect).unwrap_or_default();
    for address in &addresses {
        match TcpListener::bind(address) {
            Ok(listener) => return Ok(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => continue,
            Err(e) => return Err(e),
        }
    }
    eprintln!("watt-worker: MASTER_ADDR {master_addr} is not an address of this machine; listening on every interface");
    TcpListener::bind(("0.0.0.0", port))
}

/// What is left of `deadline`, at most [`HANDSHAKE`].
fn handshake(deadline: &Deadline) -> Deadline {
    Deadline::after(deadline.left().min(HANDSHAKE))
}

fn new_nonce() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    encode(&bytes)
}

fn protocol_at(peer: &str, message: String) -> RendezvousError {
    RendezvousError::Protocol { peer: peer.to_string(), message }
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
