//! Worker restart cost: what a resize costs the job itself. Each row stops a running job of
//! `from` ranks with SIGTERM (every rank finishes its step, rank 0 writes a checkpoint, all exit)
//! and starts it again at `to` ranks (processes start, meet at rank 0, rank 0 reads the
//! checkpoint and broadcasts it, the first step completes).
//!
//!     cargo bench -p watt-worker --bench restart
//!
//! Times: SIGTERM → every rank exited ("stop"), spawn → first step reported at the new size
//! ("start"). The control plane's share (power event → orders at the agents) is not in these.
// A benchmark on the real clock.
#![allow(clippy::unwrap_used, clippy::disallowed_types, clippy::print_stdout)]

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn start(world: usize, model: &[&str], ckpt: &Path, socket: &Path, run: &str) -> Vec<Child> {
    let port = watt_worker::rendezvous::local_master_port().to_string();
    (0..world)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_watt-worker"))
                .args(model)
                .args(["--steps", "100000000", "--checkpoint-every", "1000000", "--log-every", "0"])
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("TORCHELASTIC_RUN_ID", run)
                .env("WATT_CHECKPOINT_DIR", ckpt)
                .env("WATT_PROGRESS_SOCKET", if rank == 0 { socket.as_os_str() } else { "".as_ref() })
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Wait for rank 0's next progress report.
fn next_report(socket: &UnixDatagram) -> String {
    let mut buffer = [0u8; 512];
    let n = socket.recv(&mut buffer).expect("no progress report within 60 s");
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}

fn main() {
    println!("| model | parameters | checkpoint | resize | stop (SIGTERM → all exited) | start (spawn → first step) | total |");
    println!("|---|---|---|---|---|---|---|");
    for (label, model, params) in [
        ("mlp", &["--model", "mlp", "--features", "256", "--hidden", "32"][..], 256 * 32 + 32 + 32 + 1),
        (
            "logreg, 16M features",
            &["--model", "logreg", "--features", "16777216", "--global-batch", "4"][..],
            (1 << 24) + 1,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (ckpt, socket_path) = (dir.path().join("ckpt"), dir.path().join("progress.sock"));
        let socket = UnixDatagram::bind(&socket_path).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut ranks = start(4, model, &ckpt, &socket_path, "r0");
        next_report(&socket);
        for (i, (from, to)) in [(4, 2), (2, 3), (3, 4), (4, 4)].into_iter().enumerate() {
            // Let it run a little, then drain what it reported so far.
            std::thread::park_timeout(Duration::from_millis(300));
            socket.set_nonblocking(true).unwrap();
            while socket.recv(&mut [0u8; 512]).is_ok() {}
            socket.set_nonblocking(false).unwrap();

            let t0 = Instant::now();
            for r in &ranks {
                Command::new("kill").args(["-TERM", &r.id().to_string()]).status().unwrap();
            }
            for mut r in ranks {
                assert_eq!(r.wait().unwrap().code(), Some(143));
            }
            let stop = t0.elapsed();
            socket.set_nonblocking(true).unwrap();
            while socket.recv(&mut [0u8; 512]).is_ok() {}
            socket.set_nonblocking(false).unwrap();
            let t1 = Instant::now();
            ranks = start(to, model, &ckpt, &socket_path, &format!("r{}", i + 1));
            let first = next_report(&socket);
            let start = t1.elapsed();
            assert!(first.contains(&format!("\"world_size\":{to}")), "{first}");
            let bytes = std::fs::metadata(checkpoint_path(&ckpt)).map(|m| m.len()).unwrap_or(0);
            println!(
                "| {label} | {params} | {:.1} MB | {from} → {to} | {:.0} ms | {:.0} ms | {:.0} ms |",
                bytes as f64 / 1e6,
                stop.as_secs_f64() * 1e3,
                start.as_secs_f64() * 1e3,
                (stop + start).as_secs_f64() * 1e3
            );
        }
        for r in &ranks {
            Command::new("kill").args(["-KILL", &r.id().to_string()]).status().unwrap();
        }
        for mut r in ranks {
            let _ = r.wait();
        }
    }
}

fn checkpoint_path(dir: &Path) -> std::path::PathBuf {
    watt_worker::checkpoint::list(dir).unwrap().into_iter().next().unwrap()
}
