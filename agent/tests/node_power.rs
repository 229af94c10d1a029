//! The real `watt-agent` binary: the node's non-GPU power read from a powercap (RAPL) tree plus
//! its configured overhead, and an agent that never reached its controller saying so.
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, Agent};

fn zone(root: &std::path::Path, dir: &str, name: &str) {
    let d = root.join(dir);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
    std::fs::write(d.join("energy_uj"), "1000000\n").unwrap();
    std::fs::write(d.join("max_energy_range_uj"), "262143328850\n").unwrap();
}

#[test]
fn cpu_power_from_the_powercap_counters_and_the_configured_overhead_are_exported() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    zone(&root, "intel-rapl:0", "package-0");
    zone(&root, "intel-rapl:0:0", "core");
    // The package counter rises at 150 W (150 J/s), the core subzone (inside it) at 90 W.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (root, stop) = (root.clone(), stop.clone());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let t = t0.elapsed().as_secs_f64();
                let write = |dir: &str, watts: f64| {
                    let path = root.join(dir).join("energy_uj");
                    let tmp = root.join(dir).join("energy_uj.tmp");
                    std::fs::write(&tmp, format!("{}\n", 1_000_000 + (watts * t * 1e6) as u64)).unwrap();
                    std::fs::rename(tmp, path).unwrap();
                };
                write("intel-rapl:0", 150.0);
                write("intel-rapl:0:0", 90.0);
                std::thread::park_timeout(Duration::from_millis(20));
            }
        })
    };
    let root_arg = root.to_str().unwrap().to_string();
    let agent = Agent::start(&[
        "--backend",
        "sim",
        "--sim-gpus",
        "1",
        "--sample-interval",
        "200ms",
        "--powercap-root",
        &root_arg,
        "--node-overhead",
        "120",
    ]);
    let t0 = Instant::now();
    let rapl = loop {
        let e = agent.scrape();
        let rapl =
            e.named("watt_node_power_watts").find(|s| s.labels.get("source").map(String::as_str) == Some("rapl"));
        if let Some(s) = rapl {
            let overhead = e.named("watt_node_power_watts").find(|s| s.labels["source"] == "overhead").unwrap();
            assert_eq!(overhead.value, 120.0);
            assert_eq!(s.labels["node"], "test-node");
            break s.value;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no rapl reading in\n{}", e.text);
        std::thread::park_timeout(Duration::from_millis(200));
    };
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    // The package alone (the core subzone lies inside it): 150 W, within the writer's timing.
    assert!((120.0..=180.0).contains(&rapl), "rapl {rapl} W");
}

#[test]
fn an_agent_that_never_reached_its_controller_says_so_and_dry_run_is_exported() {
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "watt_0123\n").unwrap();
    let token = token.to_str().unwrap();
    let agent = Agent::start(&[
        "--backend",
        "sim",
        "--sim-gpus",
        "2",
        "--controller",
        &nowhere,
        "--token-file",
        token,
        "--enforce",
        "dry-run",
    ]);
    std::thread::park_timeout(Duration::from_millis(500));
    let e = agent.scrape();
    let value = |name: &str| e.named(name).next().unwrap_or_else(|| panic!("no {name} in\n{}", e.text)).value;
    assert_eq!(value("watt_agent_controller_registrations_total"), 0.0);
    assert_eq!(value("watt_agent_controller_connected"), 0.0);
    assert_eq!(value("watt_agent_cap_orders_total"), 0.0);
    let mode = e.named("watt_agent_enforce_mode").next().unwrap();
    assert_eq!((mode.labels["mode"].as_str(), mode.value), ("dry-run", 1.0));
    // A telemetry-only agent has no controller to reach: no such metric, no false alert.
    let metrics_without_controller = Agent::start(&["--backend", "sim", "--sim-gpus", "1"]).scrape();
    assert_eq!(metrics_without_controller.named("watt_agent_controller_registrations_total").count(), 0);
}
