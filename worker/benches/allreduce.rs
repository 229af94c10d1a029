//! All-reduce bus bandwidth: Watt's ring over TCP next to OpenMPI's `MPI_Allreduce`, in the same
//! run, on loopback, 2 and 4 ranks, 1 MB to 256 MB of `f64`.
//!
//!     cargo bench -p watt-worker --bench allreduce [-- --ranks 2,4 --sizes-mb 1,4,16,64,256]
//!
//! OpenMPI runs twice: over TCP (`--mca btl tcp,self`, the transport the ring uses) and with its
//! defaults (shared memory between processes of one machine). Bus bandwidth follows nccl-tests:
//! `bytes / time × 2 (n − 1) / n`, what each link carries. Needs `mpicc` and `mpirun`
//! (Debian: `apt-get install openmpi-bin libopenmpi-dev`).
// A benchmark on the real clock.
#![allow(clippy::unwrap_used, clippy::disallowed_types, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use watt_worker::rendezvous::Rendezvous;

fn iterations(bytes: u64) -> u32 {
    ((512u64 << 20) / bytes).clamp(5, 100) as u32
}

fn arg(name: &str, default: &str) -> Vec<u64> {
    let args: Vec<String> = std::env::args().collect();
    let value = args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map_or(default, |v| v.as_str());
    value.split(',').map(|v| v.parse().unwrap()).collect()
}

fn main() {
    if let Ok(rank) = std::env::var("WATT_BENCH_RANK") {
        return rank_main(rank.parse().unwrap());
    }
    let ranks = arg("--ranks", "2,4");
    let sizes: Vec<u64> = arg("--sizes-mb", "1,4,16,64,256").iter().map(|mb| mb << 20).collect();
    let mpi = build_mpi_peer();
    println!(
        "| ranks | size | Watt ring (TCP) busbw | OpenMPI TCP busbw | ratio | OpenMPI shared-memory busbw | ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &n in &ranks {
        let watt = run_watt(n as usize, &sizes);
        let tcp = run_mpi(&mpi, n, &sizes, &["--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "lo"]);
        let shm = run_mpi(&mpi, n, &sizes, &[]);
        for &s in &sizes {
            let bus = |t: f64| s as f64 / t * 2.0 * (n as f64 - 1.0) / n as f64 / 1e9;
            let (w, t, m) = (bus(watt[&s]), bus(tcp[&s]), bus(shm[&s]));
            println!(
                "| {n} | {} MB | {w:.2} GB/s | {t:.2} GB/s | {:.2} | {m:.2} GB/s | {:.2} |",
                s >> 20,
                w / t,
                w / m
            );
        }
    }
}

/// One rank of the Watt ring: every size, timed as the MPI peer times it; rank 0 prints.
fn rank_main(rank: usize) {
    let world: usize = std::env::var("WATT_BENCH_WORLD").unwrap().parse().unwrap();
    let port: u16 = std::env::var("WATT_BENCH_PORT").unwrap().parse().unwrap();
    let sizes: Vec<u64> = std::env::var("WATT_BENCH_SIZES").unwrap().split(',').map(|s| s.parse().unwrap()).collect();
    let mut ring = Rendezvous {
        rank,
        world,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        run: "bench".into(),
        token: Some("bench-secret".into()),
        timeout: Duration::from_secs(30),
        collective_timeout: Duration::from_secs(120),
        stop: Arc::new(AtomicBool::new(false)),
    }
    .connect()
    .unwrap();
    for bytes in sizes {
        // Zeros: summed over and over they stay finite (a sum that is not is an error), and an
        // addition of zeros costs what any other does.
        let mut data = vec![0.0f64; (bytes / 8) as usize];
        for _ in 0..2 {
            ring.all_reduce_sum(&mut data).unwrap();
        }
        ring.all_reduce_sum(&mut [0.0]).unwrap(); // barrier
        let iters = iterations(bytes);
        let t0 = Instant::now();
        for _ in 0..iters {
            ring.all_reduce_sum(&mut data).unwrap();
        }
        let t = t0.elapsed().as_secs_f64() / f64::from(iters);
        if rank == 0 {
            println!("RESULT {bytes} {t:.9}");
        }
    }
}

fn results(stdout: &[u8]) -> BTreeMap<u64, f64> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .map(|l| {
            let (b, t) = l.split_once(' ').unwrap();
            (b.parse().unwrap(), t.parse().unwrap())
        })
        .collect()
}

fn run_watt(world: usize, sizes: &[u64]) -> BTreeMap<u64, f64> {
    let port = watt_worker::rendezvous::local_master_port();
    let sizes: Vec<String> = sizes.iter().map(u64::to_string).collect();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(std::env::current_exe().unwrap())
                .env("WATT_BENCH_RANK", rank.to_string())
                .env("WATT_BENCH_WORLD", world.to_string())
                .env("WATT_BENCH_PORT", port.to_string())
                .env("WATT_BENCH_SIZES", sizes.join(","))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    assert!(outputs.iter().all(|o| o.status.success()), "a Watt rank failed");
    results(&outputs[0].stdout)
}

fn build_mpi_peer() -> std::path::PathBuf {
    let out = std::env::temp_dir().join(format!("watt-mpi-allreduce-{}", std::process::id()));
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/mpi_allreduce.c");
    let status = Command::new("mpicc").args(["-O2", "-o"]).arg(&out).arg(source).status();
    match status {
        Ok(s) if s.success() => out,
        _ => panic!("cannot build the OpenMPI peer: install it with `apt-get install openmpi-bin libopenmpi-dev`"),
    }
}

fn run_mpi(binary: &std::path::Path, ranks: u64, sizes: &[u64], mca: &[&str]) -> BTreeMap<u64, f64> {
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", &ranks.to_string()])
        .args(mca)
        .arg(binary)
        .args(sizes.iter().map(u64::to_string))
        .env("OMPI_MCA_plm_rsh_agent", "")
        .output()
        .expect("mpirun: install it with `apt-get install openmpi-bin libopenmpi-dev`");
    assert!(out.status.success(), "mpirun failed: {}", String::from_utf8_lossy(&out.stderr));
    results(&out.stdout)
}
