//! The ring all-reduce over real TCP on loopback: every rank ends with the serial sum, for random
//! sizes and world sizes 1–8, including sizes not divisible by the world size, smaller than it,
//! and straddling chunk boundaries.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use watt_worker::rendezvous::Rendezvous;
use watt_worker::ring::CHUNK_BYTES;

/// Rank `r`'s input: distinct, of mixed signs and magnitudes.
fn input(rank: usize, len: usize, seed: u64) -> Vec<f64> {
    (0..len)
        .map(|i| {
            let x = ((i as u64 + 1).wrapping_mul(2_654_435_761) ^ seed.wrapping_add(rank as u64 * 7919)) % 10_007;
            (x as f64 - 5_003.0) * 10f64.powi((i % 5) as i32 - 2)
        })
        .collect()
}

/// Run one all-reduce of `len` elements on `world` ranks (threads, real sockets); return every
/// rank's result.
fn all_reduce(world: usize, len: usize, seed: u64) -> Vec<Vec<f64>> {
    let port = watt_worker::rendezvous::local_master_port();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            std::thread::spawn(move || {
                let rv = Rendezvous {
                    rank,
                    world,
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                    run: format!("test-{port}"),
                    token: Some(format!("secret-{port}")),
                    timeout: Duration::from_secs(20),
                    collective_timeout: Duration::from_secs(20),
                    stop: Arc::new(AtomicBool::new(false)),
                };
                let mut ring = rv.connect().unwrap();
                let mut data = input(rank, len, seed);
                ring.all_reduce_sum(&mut data).unwrap();
                // A second reduction on the same ring: links stay usable and in step.
                let mut again = vec![1.0; len.min(7)];
                ring.all_reduce_sum(&mut again).unwrap();
                assert!(again.iter().all(|v| *v == world as f64));
                data
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn check(world: usize, len: usize, seed: u64) {
    let inputs: Vec<Vec<f64>> = (0..world).map(|r| input(r, len, seed)).collect();
    let want: Vec<f64> = (0..len).map(|i| inputs.iter().map(|v| v[i]).sum()).collect();
    for (rank, got) in all_reduce(world, len, seed).into_iter().enumerate() {
        assert_eq!(got.len(), len);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let tolerance = 1e-12 * (1.0 + w.abs()) * world as f64;
            assert!((g - w).abs() <= tolerance, "world {world} len {len} rank {rank} element {i}: {g} vs {w}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
    #[test]
    fn equals_the_serial_sum(world in 1usize..=8, len in 0usize..3_000, seed in any::<u64>()) {
        check(world, len, seed);
    }
}

#[test]
fn chunk_boundaries_and_tiny_vectors() {
    let per_chunk = CHUNK_BYTES / 8;
    for (world, len) in
        [(3, 1), (8, 5), (2, 2 * per_chunk), (2, 2 * per_chunk + 1), (4, 4 * per_chunk - 3), (3, 3 * per_chunk + 2)]
    {
        check(world, len, 42);
    }
}

/// Reductions back to back on one ring, sizes changing every time: the next reduction's bytes are
/// often queued before this one has read its own, and must not be taken for them.
#[test]
fn back_to_back_reductions_of_changing_sizes_stay_in_step() {
    let world = 3;
    let port = watt_worker::rendezvous::local_master_port();
    let sizes = [1usize, 300_001, 7, 1_000, 131_073, 40_000, 2, 70_001, 3];
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            std::thread::spawn(move || {
                let mut ring = Rendezvous {
                    rank,
                    world,
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                    run: "back-to-back".into(),
                    token: Some("secret".into()),
                    timeout: Duration::from_secs(20),
                    collective_timeout: Duration::from_secs(20),
                    stop: Arc::new(AtomicBool::new(false)),
                }
                .connect()
                .unwrap();
                for round in 0..18 {
                    let len = sizes[round % sizes.len()];
                    let mut data: Vec<f64> = (0..len).map(|i| (rank * 1_000 + i + round) as f64).collect();
                    ring.all_reduce_sum(&mut data).unwrap();
                    for (i, v) in data.iter().enumerate() {
                        let want: usize = (0..world).map(|r| r * 1_000 + i + round).sum();
                        assert_eq!(*v, want as f64, "round {round} len {len} element {i}");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}
