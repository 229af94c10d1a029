//! The rendezvous admits only the run's own ranks: a rank without the run's secret is refused
//! (and the real ranks still meet), and idle connections to rank 0 do not hold it up.
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use watt_worker::rendezvous::{local_master_port, Rendezvous, RendezvousError, HANDSHAKE};

fn rank(rank: usize, world: usize, port: u16, token: Option<&str>) -> Rendezvous {
    Rendezvous {
        rank,
        world,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        run: "job-7".into(),
        token: token.map(str::to_owned),
        timeout: Duration::from_secs(20),
        collective_timeout: Duration::from_secs(20),
        stop: Arc::new(AtomicBool::new(false)),
    }
}

#[test]
fn a_rank_without_the_runs_secret_is_refused_and_the_real_ranks_still_meet() {
    let port = local_master_port();
    let master = std::thread::spawn(move || {
        let mut ring = rank(0, 2, port, Some("the-secret")).connect().unwrap();
        let mut theirs = vec![10.0, 20.0];
        ring.all_reduce_sum(&mut theirs).unwrap();
        theirs
    });
    // A forger who knows the run, the rank and the world size but not the secret — with no
    // secret, or a guessed one.
    for guess in [None, Some("guess")] {
        let mut forger = rank(1, 2, port, guess);
        forger.timeout = Duration::from_secs(5);
        match forger.connect() {
            Err(RendezvousError::Refused { reason, .. }) => assert!(reason.contains("no proof"), "{reason}"),
            other => panic!("a forged rank 1 was not refused: {:?}", other.map(|_| "a ring")),
        }
    }
    // A hand-written hello with a made-up proof is refused the same way.
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut lines = BufReader::new(stream.try_clone().unwrap()).lines();
    let challenge = lines.next().unwrap().unwrap();
    assert!(challenge.starts_with("WATT2 CHALLENGE "), "{challenge}");
    (&stream).write_all(format!("WATT2 HELLO job-7 1 2 4000 00 {}\n", "ab".repeat(32)).as_bytes()).unwrap();
    assert!(lines.next().unwrap().unwrap().starts_with("ERROR no proof"));

    let mut real = rank(1, 2, port, Some("the-secret")).connect().unwrap();
    let mut mine = vec![1.0, 2.0];
    real.all_reduce_sum(&mut mine).unwrap();
    let theirs = master.join().unwrap();
    assert_eq!((mine, theirs), (vec![11.0, 22.0], vec![11.0, 22.0]));
}

#[test]
fn idle_connections_do_not_hold_rank_0_up() {
    let port = local_master_port();
    let master = std::thread::spawn(move || rank(0, 3, port, Some("s")).connect());
    // Five connections that never say a word, opened before any rank joins.
    let idle: Vec<TcpStream> = (0..5)
        .map(|_| loop {
            if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                break s;
            }
            std::thread::park_timeout(Duration::from_millis(10));
        })
        .collect();
    let t0 = Instant::now();
    let others: Vec<_> =
        (1..3).map(|r| std::thread::spawn(move || rank(r, 3, port, Some("s")).connect().unwrap())).collect();
    for o in others {
        o.join().unwrap();
    }
    master.join().unwrap().unwrap();
    // Heard one after another, the idle ones would have cost a handshake's time each.
    assert!(t0.elapsed() < HANDSHAKE, "the ring took {:?} with idle connections open", t0.elapsed());
    drop(idle);
}
