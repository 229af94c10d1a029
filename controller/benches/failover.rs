//! Failover, with the real binaries: a real etcd, two controllers that elect a leader, agents on
//! simulated GPUs given both controllers' URLs, a job running and a power source set. Each trial
//! kills the leader with SIGKILL and times until the other controller leads and until every
//! agent holds its session with it (its orders follow on the next pass), then starts the killed
//! one again as a follower for the next trial.
//!
//! `cargo bench -p watt-controller --bench failover -- [--trials 10] [--agents 8] [--lease 3]`
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::disallowed_types, clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use watt_system_tests::*;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn main() {
    let trials = arg("--trials", 10) as usize;
    let agents = arg("--agents", 8) as usize;
    let lease = format!("{}s", arg("--lease", 3));
    let etcd = Etcd::start();
    let store = format!("etcd://{}", etcd.endpoint());
    let args = ["--leader-lease", lease.as_str(), "--reconcile-interval", "200ms"];
    let mut controllers = [ControllerProc::start(&store, 0, &args), ControllerProc::start(&store, 0, &args)];
    let urls = format!("{},{}", controllers[0].url, controllers[1].url);
    let nodes: Vec<Proc> = (0..agents).map(|i| agent(&urls, &format!("n{i}"), 4)).collect();
    wait_for(Duration::from_secs(60), "every node ready", || {
        let listed = wattctl_json(&urls, &["nodes"]);
        (listed.as_array().unwrap().iter().filter(|n| n["state"] == "ready").count() == agents).then_some(())
    });
    set_grid(&urls, &format!("{}W", agents * 4 * 600), None);
    assert!(submit(&urls, &job_manifest("steady", 1, 1, agents as u32, 4)).status.success());

    let (mut leading, mut registered) = (Vec::new(), Vec::new());
    for trial in 0..trials {
        let leader = controllers.iter().position(|c| c.leading).expect("one controller leads");
        let follower = 1 - leader;
        let killed = Instant::now();
        controllers[leader].proc.kill9();
        controllers[follower].wait_leading(Duration::from_secs(60));
        let led = killed.elapsed();
        let new_url = controllers[follower].url.clone();
        for node in &nodes {
            node.wait_line(&format!("controller={new_url}"), Duration::from_secs(60));
        }
        let all = killed.elapsed();
        println!(
            "trial {trial}: led after {:.2} s, every agent's session after {:.2} s",
            led.as_secs_f64(),
            all.as_secs_f64()
        );
        leading.push(led.as_secs_f64());
        registered.push(all.as_secs_f64());
        let port = controllers[leader].port;
        controllers[leader] = ControllerProc::start(&store, port, &args);
        assert!(!controllers[leader].leading, "a restarted controller took over from a live leader");
    }
    leading.sort_by(f64::total_cmp);
    registered.sort_by(f64::total_cmp);
    println!("| trials | agents | lease | leader killed → other leads (p50 / p99) | → every agent's session with it (p50 / p99) |");
    println!("|---|---|---|---|---|");
    println!(
        "| {trials} | {agents} | {lease} | {:.2} s / {:.2} s | {:.2} s / {:.2} s |",
        percentile(&leading, 50.0),
        percentile(&leading, 99.0),
        percentile(&registered, 50.0),
        percentile(&registered, 99.0)
    );
}
