//! The `watt-worker` binary alone: progress reports, bad flags and environment, a checkpoint of
//! another model.
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixDatagram;
use std::process::Command;

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_watt-worker"))
}

#[test]
fn a_single_rank_trains_reports_progress_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("progress.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
    // Read as the agent does, while the worker runs: reports that find the socket's queue full
    // are dropped, never waited for.
    let reader = std::thread::spawn(move || {
        let mut reports = Vec::new();
        let mut buffer = [0u8; 1024];
        while let Ok(n) = socket.recv(&mut buffer) {
            reports.push(String::from_utf8(buffer[..n].to_vec()).unwrap());
        }
        reports
    });
    let out = worker()
        .args(["--steps", "50", "--checkpoint-every", "20", "--features", "16", "--step-time", "2ms"])
        .env("WATT_CHECKPOINT_DIR", dir.path().join("ckpt"))
        .env("WATT_PROGRESS_SOCKET", &socket_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reports = reader.join().unwrap();
    assert_eq!(reports.len(), 50, "one report per step: {reports:?}");
    assert!(reports[49].starts_with("{\"step\":50,\"samples\":12800,\"loss\":"), "{}", reports[49]);
    let loss = |r: &str| -> f64 {
        let rest = &r[r.find("\"loss\":").unwrap() + 7..];
        rest[..rest.find(',').unwrap()].parse().unwrap()
    };
    assert!(loss(&reports[49]) < loss(&reports[0]), "it learns: {} then {}", reports[0], reports[49]);
    let steps: Vec<u64> = watt_worker::checkpoint::list(&dir.path().join("ckpt"))
        .unwrap()
        .iter()
        .map(|p| watt_worker::checkpoint::load(p).unwrap().step)
        .collect();
    assert_eq!(steps, vec![50, 40, 20]);

    // Run again with more steps: it resumes at 50, it does not start over.
    let out = worker()
        .args(["--steps", "60", "--checkpoint-every", "20", "--features", "16"])
        .env("WATT_CHECKPOINT_DIR", dir.path().join("ckpt"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("resuming from step-000000000050.ckpt"), "{stderr}");

    // The same directory with another model is refused, by name, and nothing is written.
    let out = worker()
        .args(["--steps", "70", "--model", "mlp", "--features", "16"])
        .env("WATT_CHECKPOINT_DIR", dir.path().join("ckpt"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("holds a logreg") && stderr.contains("--model mlp"), "{stderr}");
}

#[test]
fn bad_flags_and_environment_are_named_and_exit_2() {
    for (args, env, want) in [
        (vec!["--steps", "0"], vec![], "--steps"),
        (vec!["--lr=-1"], vec![], "--lr"),
        (vec!["--model", "resnet"], vec![], "--model"),
        (vec![], vec![("WORLD_SIZE", "4"), ("RANK", "4")], "RANK"),
        (vec![], vec![("WORLD_SIZE", "lots")], "WORLD_SIZE"),
    ] {
        let out = worker().args(&args).envs(env.iter().copied()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?} {env:?}: want {want} in {stderr}");
    }
}

#[test]
fn a_rank_whose_peers_never_come_times_out_with_a_clear_error() {
    let out = worker()
        .args(["--rendezvous-timeout", "1s"])
        .env("WORLD_SIZE", "3")
        .env("RANK", "0")
        .env("MASTER_PORT", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "port 0 is refused: {stderr}");
    let port = watt_worker::rendezvous::local_master_port();
    let out = worker()
        .args(["--rendezvous-timeout", "1s"])
        .env("WORLD_SIZE", "3")
        .env("RANK", "0")
        .env("MASTER_PORT", port.to_string())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("1 of 3 ranks joined (missing: 1, 2)"), "{stderr}");
}
