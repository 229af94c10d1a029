//! No lost work (invariant 5, ARCHITECTURE.md): the same job run uninterrupted at world size 4, and run
//! with resizes 4 → 2 → 3 (each a SIGTERM, a checkpoint, a restart at the new size) plus a
//! `kill -9` of one rank mid-run (resumed from the last checkpoint), ends with the same weights.
// Real processes on the real clock.
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use watt_worker::checkpoint;

const STEPS: u64 = 400;

/// Start `world` ranks of one run on `dir`.
fn start(world: usize, dir: &Path, run: &str) -> Vec<Child> {
    let port = watt_worker::rendezvous::local_master_port().to_string();
    (0..world)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_watt-worker"))
                .args(["--model", "mlp", "--features", "24", "--hidden", "8", "--global-batch", "50"])
                .args(["--lr", "0.2", "--checkpoint-every", "20", "--steps", &STEPS.to_string()])
                .args(["--step-time", "4ms", "--log-every", "0"])
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("TORCHELASTIC_RUN_ID", run)
                .env("WATT_CHECKPOINT_DIR", dir)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

fn newest_step(dir: &Path) -> u64 {
    checkpoint::latest(dir).unwrap().0.map_or(0, |c| c.step)
}

fn wait_for_step(dir: &Path, step: u64) {
    let t0 = Instant::now();
    while newest_step(dir) < step {
        assert!(t0.elapsed() < Duration::from_secs(60), "no checkpoint of step {step}");
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

/// Wait for every rank; return (exit code, stderr) per rank.
fn finish(ranks: Vec<Child>) -> Vec<(Option<i32>, String)> {
    ranks
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
        })
        .collect()
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success());
}

/// SIGTERM every rank once `dir` has a checkpoint past `step`: all stop after the same step, with
/// a checkpoint of it, and exit 143.
fn stop_after(ranks: Vec<Child>, dir: &Path, step: u64) -> u64 {
    wait_for_step(dir, step);
    for r in &ranks {
        signal(r, "-TERM");
    }
    for (code, stderr) in finish(ranks) {
        assert_eq!(code, Some(143), "{stderr}");
    }
    newest_step(dir)
}

#[test]
fn resized_and_killed_runs_end_with_the_uninterrupted_weights() {
    let straight = tempfile::tempdir().unwrap();
    let resized = tempfile::tempdir().unwrap();
    let (a, b) = (straight.path(), resized.path());

    let uninterrupted = start(4, a, "straight");
    // World 4, stopped mid-run.
    let s1 = stop_after(start(4, b, "r1"), b, 60);
    assert!((60..STEPS).contains(&s1), "{s1}");
    // World 2 from there.
    let s2 = stop_after(start(2, b, "r2"), b, s1 + 60);
    assert!(s2 > s1);
    // World 3; then rank 1 is killed outright mid-step.
    let ranks = start(3, b, "r3");
    wait_for_step(b, s2 + 60);
    signal(&ranks[1], "-KILL");
    let killed_at = Instant::now();
    let outcomes = finish(ranks);
    assert!(killed_at.elapsed() < Duration::from_secs(10), "the other ranks fail fast, they do not hang");
    for rank in [0, 2] {
        let (code, stderr) = &outcomes[rank];
        assert_eq!(*code, Some(1), "rank {rank}: {stderr}");
        assert!(stderr.contains("failed or closed the connection"), "rank {rank} says why: {stderr}");
    }
    let s3 = newest_step(b);
    assert!((s2 + 1..STEPS).contains(&s3), "{s3}");
    // World 3 again, from the last checkpoint, to the end.
    for (code, stderr) in finish(start(3, b, "r4")) {
        assert_eq!(code, Some(0), "{stderr}");
    }
    for (code, stderr) in finish(uninterrupted) {
        assert_eq!(code, Some(0), "{stderr}");
    }

    let x = checkpoint::load(&a.join(checkpoint::file_name(STEPS))).unwrap();
    let y = checkpoint::load(&b.join(checkpoint::file_name(STEPS))).unwrap();
    assert_eq!((x.step, y.step), (STEPS, STEPS));
    let scale = x.params.iter().map(|v| v.abs()).fold(0.0, f64::max);
    let diff = x.params.iter().zip(&y.params).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max);
    assert!(scale > 0.1, "the model learned something: max |w| = {scale}");
    assert!(diff / scale < 1e-6, "relative difference {:e}", diff / scale);
    assert!(x.params != x.model.init(1), "weights moved");
}
