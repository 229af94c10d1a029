//! The Grafana dashboards in `dashboards/`: well-formed (current schema, timeseries panels, a
//! datasource variable that every panel uses), and, against a real Prometheus (Debian's package)
//! scraping a running `wattctl up` cluster with a power event in progress, every panel's query —
//! template variables filled — returns data, and every metric they name is one the binaries export.
// Real processes on the real clock.
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use watt_deploy_tests::*;

fn dashboards() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(root().join("dashboards"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every (dashboard, panel title, expr), annotations included.
fn queries() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (file, d) in dashboards() {
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((
                    file.clone(),
                    p["title"].as_str().unwrap().to_string(),
                    t["expr"].as_str().unwrap().to_string(),
                ));
            }
        }
        for a in d["annotations"]["list"].as_array().unwrap().iter().filter(|a| a["expr"].is_string()) {
            out.push((file.clone(), format!("annotation {}", a["name"]), a["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

#[test]
fn the_dashboards_are_well_formed() {
    let all = dashboards();
    let names: Vec<&str> = all.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(names, ["cluster-power.json", "gpu-nodes.json", "jobs.json"]);
    for (file, d) in &all {
        assert!(d["schemaVersion"].as_i64().unwrap() >= 39, "{file}");
        let vars = d["templating"]["list"].as_array().unwrap();
        assert!(
            vars.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"),
            "{file}"
        );
        for p in d["panels"].as_array().unwrap() {
            let title = p["title"].as_str().unwrap();
            if p["type"] == "row" {
                // A row repeated per value of a template variable (the domains' levels).
                let repeat = p["repeat"].as_str().unwrap_or_default();
                assert!(vars.iter().any(|v| v["name"] == repeat), "{file} {title}: repeats over {repeat:?}");
                continue;
            }
            assert!(["timeseries", "stat"].contains(&p["type"].as_str().unwrap()), "{file} {title}");
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{file} {title}: every panel has the datasource");
            assert!(!p["targets"].as_array().unwrap().is_empty(), "{file} {title}");
            for t in p["targets"].as_array().unwrap() {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{file} {title}");
            }
        }
    }
}

fn get(url: &str) -> Option<Value> {
    let mut response = ureq::get(url).call().ok()?;
    serde_json::from_slice(&response.body_mut().read_to_vec().ok()?).ok()
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn query(prometheus: &str, expr: &str) -> Vec<Value> {
    get(&format!("http://{prometheus}/api/v1/query?query={}", encode(expr)))
        .and_then(|v| v["data"]["result"].as_array().cloned())
        .unwrap_or_default()
}

#[test]
fn every_panel_query_returns_data_from_a_real_prometheus_during_a_power_event() {
    let wattctl = root().join("target/debug/wattctl");
    assert!(wattctl.exists(), "build the binaries first: cargo build --workspace --bins");
    tool("prometheus");
    let dir = std::env::temp_dir().join(format!("watt-dashboards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // 16 H100s draw 11.2 kW at full power; the trip at 15 s (Prometheus has scraped by then)
    // leaves a 9.5 kW limit.
    let scenario = dir.join("trip.yaml");
    std::fs::write(
        &scenario,
        "name: trip\nsources:\n  - {name: grid, kind: grid, available: 6kW}\n  - {name: gen-a, kind: generator, available: 4kW}\n  \
         - {name: gen-b, kind: generator, available: 4kW}\ndomains:\n  - {name: rack-1, limit: 10kW, select: rack=r1}\n\
         events:\n  - {at: 15s, source: gen-a, available: 0W, note: trip}\nduration: 10m\n",
    )
    .unwrap();
    let port = watt_system_tests::free_port();
    let prometheus = format!("127.0.0.1:{port}");
    let mut up = Command::new(&wattctl)
        .args(["up", "--nodes", "2", "--prometheus", "--prometheus-addr", &prometheus, "--scenario"])
        .arg(&scenario)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Every query answers within a minute or so: scrapes every 2 s, rates over their window.
    let filled = |expr: &str| {
        expr.replace("$__rate_interval", "1m")
            .replace("$node", "node-1")
            .replace("$gpu", "0")
            .replace("$job", ".*")
            .replace("$level", "1")
    };
    let t0 = Instant::now();
    // A VTN's link, and a grid event's annotation, have data only with an OpenADR VTN (and an
    // event in force), which `wattctl up` does not have: those are checked below for valid
    // queries, and their metrics in the OpenADR system test (system-tests/tests/openadr.rs).
    let needs_vtn = |expr: &str| expr.contains("watt_grid_windows_in_force > 0") || expr.contains("watt_openadr_");
    let (mut missing, needs_grid_event): (Vec<(String, String, String)>, Vec<_>) =
        queries().into_iter().partition(|(_, _, expr)| !needs_vtn(expr));
    assert_eq!(needs_grid_event.len(), 2, "the grid events' annotation and the VTN's link: {needs_grid_event:?}");
    while !missing.is_empty() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::park_timeout(Duration::from_secs(2));
        missing.retain(|(_, _, expr)| query(&prometheus, &filled(expr)).is_empty());
    }
    // The template variables' own queries have values, and the ones used above are among them.
    let nodes = get(&format!("http://{prometheus}/api/v1/label/node/values")).unwrap();
    let levels = get(&format!("http://{prometheus}/api/v1/label/level/values")).unwrap();
    let jobs = query(&prometheus, "watt_job_shards");
    let names = get(&format!("http://{prometheus}/api/v1/label/__name__/values")).unwrap();
    let event = query(&prometheus, "watt_power_event_to_ack_seconds_count > 0");
    let valid: Vec<bool> = needs_grid_event
        .iter()
        .map(|(_, _, expr)| {
            get(&format!("http://{prometheus}/api/v1/query?query={}", encode(expr)))
                .is_some_and(|v| v["status"] == "success")
        })
        .collect();
    let _ = Command::new("kill").args(["-TERM", &up.id().to_string()]).status();
    let exited = up.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    assert!(missing.is_empty(), "panels without data: {missing:#?}");
    assert!(valid.iter().all(|v| *v), "queries Prometheus refuses: {needs_grid_event:?}");
    assert!(exited.success(), "wattctl up: {exited}");
    assert!(nodes["data"].as_array().unwrap().iter().any(|n| n == "node-1"), "{nodes}");
    assert!(levels["data"].as_array().unwrap().iter().any(|l| l == "1"), "the domains' levels: {levels}");
    assert_eq!(jobs.len(), 3, "the three demo jobs: {jobs:?}");
    assert!(!event.is_empty(), "a power event happened and was acknowledged");
    // Every metric a dashboard names is one the binaries export.
    let exported: BTreeSet<&str> = names["data"].as_array().unwrap().iter().filter_map(|n| n.as_str()).collect();
    for (file, title, expr) in queries().into_iter().filter(|(_, _, expr)| !needs_vtn(expr)) {
        for name in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("watt_")) {
            assert!(exported.contains(name), "{file} {title}: {name} is not exported");
        }
    }
}
