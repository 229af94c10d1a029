//! The real `watt-agent` binary on loopback, checked by Prometheus' own tools: `promtool` lints
//! its output, and a real Prometheus server scrapes it and answers a query over it.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, require_tool, Agent, Exposition};

/// Every per-GPU metric the agent must export for every GPU, with the `node`, `gpu`, `uuid` and
/// `model` labels.
const GPU_METRICS: &[&str] = &[
    "watt_gpu_up",
    "watt_gpu_power_watts",
    "watt_gpu_power_average_watts",
    "watt_gpu_energy_joules_total",
    "watt_gpu_power_limit_watts",
    "watt_gpu_enforced_power_limit_watts",
    "watt_gpu_power_limit_min_watts",
    "watt_gpu_power_limit_max_watts",
    "watt_gpu_utilization_ratio",
    "watt_gpu_memory_utilization_ratio",
    "watt_gpu_memory_used_bytes",
    "watt_gpu_memory_total_bytes",
    "watt_gpu_temperature_celsius",
    "watt_gpu_memory_temperature_celsius",
    "watt_gpu_sm_clock_hertz",
    "watt_gpu_memory_clock_hertz",
    "watt_gpu_throttle_reasons",
    "watt_gpu_throttle_reason_active",
    "watt_gpu_pcie_tx_bytes_per_second",
    "watt_gpu_pcie_rx_bytes_per_second",
    "watt_gpu_ecc_errors_total",
    "watt_gpu_xid_errors_total",
    "watt_gpu_read_errors_total",
    "watt_gpu_compute_processes",
    "watt_gpu_info",
];

/// dcgm-exporter's names the issue asks for, plus the ones NVIDIA's Grafana dashboard 12239
/// queries (GPU_TEMP, POWER_USAGE, SM_CLOCK, GPU_UTIL, FB_USED).
const DCGM_METRICS: &[&str] = &[
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_MEMORY_TEMP",
    "DCGM_FI_DEV_SM_CLOCK",
    "DCGM_FI_DEV_MEM_CLOCK",
    "DCGM_FI_DEV_POWER_MGMT_LIMIT",
    "DCGM_FI_DEV_XID_ERRORS",
];

fn gpus_with(exposition: &Exposition, name: &str, gpu_label: &str) -> BTreeSet<String> {
    exposition.named(name).filter_map(|s| s.labels.get(gpu_label).cloned()).collect()
}

fn all_eight() -> BTreeSet<String> {
    (0..8).map(|i| i.to_string()).collect()
}

/// Run `promtool check metrics` on `text`; (success, combined output).
fn promtool_check(text: &str) -> (bool, String) {
    let promtool = require_tool("promtool", "prometheus");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn every_metric_is_exported_for_all_eight_gpus_and_passes_promtool() {
    let agent = Agent::start(&["--backend", "sim", "--sim-gpus", "8", "--sample-interval", "100ms"]);
    let m = agent.scrape();
    for name in GPU_METRICS {
        assert_eq!(gpus_with(&m, name, "gpu"), all_eight(), "{name} for every GPU");
        for s in m.named(name) {
            for label in ["node", "gpu", "uuid", "model"] {
                assert!(s.labels.contains_key(label), "{name} lacks label {label}: {s:?}");
            }
            assert_eq!(s.labels["node"], "test-node");
        }
    }
    for s in m.named("watt_gpu_power_watts") {
        assert!((0.0..=700.0).contains(&s.value), "an H100 draws 0..=700 W under its cap: {s:?}");
    }
    for s in m.named("watt_gpu_utilization_ratio") {
        assert!((0.0..=1.0).contains(&s.value), "a ratio: {s:?}");
    }
    let uuids: BTreeSet<_> = m.named("watt_gpu_info").map(|s| s.labels["uuid"].clone()).collect();
    assert_eq!(uuids.len(), 8, "distinct UUIDs");
    for host in ["watt_host_cpu_utilization_ratio", "watt_host_memory_total_bytes", "watt_host_load_average"] {
        assert!(m.named(host).next().is_some(), "{host}");
    }
    assert!(m.named("process_resident_memory_bytes").next().is_some());
    // The enforcer's state: its mode, and whether the GPUs are held at their failsafe caps.
    let mode: Vec<_> =
        m.named("watt_agent_enforce_mode").filter(|s| s.value == 1.0).map(|s| s.labels["mode"].clone()).collect();
    assert_eq!(mode, ["on"], "the enforcement mode in force");
    assert_eq!(
        m.named("watt_agent_failsafe").map(|s| s.value).collect::<Vec<_>>(),
        [0.0],
        "no controller, no failsafe"
    );
    let (ok, report) = promtool_check(&m.text);
    assert!(ok && report.trim().is_empty(), "promtool check metrics: {report}");
}

#[test]
fn the_energy_counter_increases_between_two_scrapes() {
    let agent = Agent::start(&["--backend", "sim", "--sim-gpus", "8", "--sample-interval", "100ms"]);
    let first = agent.scrape();
    std::thread::park_timeout(Duration::from_millis(1_200));
    let second = agent.scrape();
    for gpu in 0..8 {
        let before = first.gpu_value("watt_gpu_energy_joules_total", "gpu", gpu).unwrap();
        let after = second.gpu_value("watt_gpu_energy_joules_total", "gpu", gpu).unwrap();
        // At least the idle draw (~70 W) for the ~1 s between scrapes.
        assert!(after > before + 30.0, "GPU {gpu}: {before} J -> {after} J");
    }
}

#[test]
fn dcgm_compat_adds_dcgm_exporter_names_and_labels_for_every_gpu() {
    let agent = Agent::start(&["--backend", "sim", "--sim-gpus", "8", "--sample-interval", "100ms", "--dcgm-compat"]);
    let m = agent.scrape();
    for name in DCGM_METRICS {
        assert_eq!(gpus_with(&m, name, "gpu"), all_eight(), "{name} for every GPU");
        for s in m.named(name) {
            for label in ["gpu", "UUID", "device", "modelName", "Hostname"] {
                assert!(s.labels.contains_key(label), "{name} lacks dcgm label {label}: {s:?}");
            }
            assert_eq!(s.labels["Hostname"], "test-node");
        }
    }
    // Same reading, dcgm's units.
    for gpu in 0..8 {
        let limit_w = m.gpu_value("watt_gpu_power_limit_watts", "gpu", gpu).unwrap();
        assert_eq!(m.gpu_value("DCGM_FI_DEV_POWER_MGMT_LIMIT", "gpu", gpu), Some(limit_w));
        let sm_hz = m.gpu_value("watt_gpu_sm_clock_hertz", "gpu", gpu).unwrap();
        assert_eq!(m.gpu_value("DCGM_FI_DEV_SM_CLOCK", "gpu", gpu), Some(sm_hz / 1e6));
    }
    assert!(m.named("watt_gpu_power_watts").count() == 8, "Watt's own names stay");
    // dcgm-exporter's names break Prometheus naming conventions (camelCase labels, counters
    // without _total); promtool may say exactly that about them, and nothing else.
    let (_, report) = promtool_check(&m.text);
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        let naming = line.contains("label names should be written in 'snake_case'")
            || line.contains("counter metrics should have \"_total\" suffix");
        assert!(line.starts_with("DCGM_FI_") && naming, "unexpected promtool finding: {line}");
    }
}

#[test]
fn healthz_answers_and_sigterm_stops_the_agent_cleanly() {
    let mut agent = Agent::start(&["--backend", "sim", "--sim-gpus", "2", "--sample-interval", "100ms"]);
    let (status, body) = agent.get("/healthz");
    assert_eq!(status, 200);
    assert!(body.contains("2 of 2 GPUs"), "{body}");
    assert_eq!(agent.terminate(), Some(0));
    let logs: Vec<String> = agent.logs.try_iter().collect();
    assert!(logs.iter().any(|l| l.contains("Shutting down.")), "{logs:?}");
}

#[test]
fn a_real_prometheus_scrapes_the_agent_and_sums_its_power() {
    let prometheus = require_tool("prometheus", "prometheus");
    // A long interval holds the snapshot still, so the value Prometheus stored is the value we
    // read: the test compares numbers, not timing.
    let agent =
        Agent::start(&["--backend", "sim", "--sim-gpus", "8", "--sample-interval", "5m", "--detail-interval", "5m"]);
    let expected: f64 = agent.scrape().named("watt_gpu_power_watts").map(|s| s.value).sum();
    assert!(expected > 8.0 * 50.0, "eight GPUs draw at least idle power: {expected}");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: watt-agent\n    static_configs:\n      - targets: ['{}']\n",
            agent.addr
        ),
    )
    .unwrap();
    let port = free_port();
    let mut server = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let _guard = KillOnDrop(&mut server);

    let url = format!("http://127.0.0.1:{port}/api/v1/query?query=sum(watt_gpu_power_watts)");
    let http = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .new_agent();
    let mut last = String::new();
    for _ in 0..120 {
        if let Ok(mut response) = http.get(&url).call() {
            last = response.body_mut().read_to_string().unwrap_or_default();
            let json: serde_json::Value = serde_json::from_str(&last).unwrap_or_default();
            if let Some(value) = json["data"]["result"][0]["value"][1].as_str() {
                let got: f64 = value.parse().unwrap();
                assert!((got - expected).abs() <= 1e-6 * expected, "Prometheus says {got} W, the agent {expected} W");
                let up = http
                    .get(&format!("http://127.0.0.1:{port}/api/v1/query?query=up"))
                    .call()
                    .unwrap()
                    .body_mut()
                    .read_to_string()
                    .unwrap();
                assert!(up.contains(r#""value":["#) && up.contains(r#","1"]"#), "scrape target up: {up}");
                return;
            }
        }
        std::thread::park_timeout(Duration::from_millis(250));
    }
    panic!("Prometheus never returned sum(watt_gpu_power_watts); last answer: {last}");
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
