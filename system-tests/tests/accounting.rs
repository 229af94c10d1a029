//! Power accounting that matches the meter, end to end with real processes: nodes that do not
//! enforce are answered, not flooded; every GPU counts, idle or busy with someone else's process;
//! a deep cut pauses jobs until the measured draw fits, and a limit below the cluster's floor is
//! said out loud; an ended job stays explainable.
// Real processes on the real clock: std's Instant.
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::Value;
use watt_system_tests::*;

fn power(url: &str) -> Value {
    wattctl_json(url, &["power", "status"])
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}

fn notes(v: &Value) -> String {
    v["notes"].as_array().map(|n| n.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("\n")).unwrap_or_default()
}

/// A value from a Prometheus text body: the first sample whose name and labels start with `name`.
fn sample(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{body}"))
}

fn http_metrics(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}

/// CPU seconds a process has used (utime + stime from /proc).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ
}

/// Let real time pass (the workspace bans `std::thread::sleep` for the daemons' pausable clock).
fn pause(d: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        std::thread::park_timeout(d.saturating_sub(t0.elapsed()));
    }
}

fn ready(url: &str, n: usize) {
    wait_for(Duration::from_secs(30), &format!("{n} nodes ready"), || {
        (wattctl_json(url, &["nodes"]).as_array().unwrap().iter().filter(|n| n["state"] == "ready").count() == n)
            .then_some(())
    });
}

#[test]
fn nodes_that_do_not_enforce_are_answered_once_per_target_shown_as_such_and_cost_no_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProc::start(&format!("file:{}", dir.path().join("w.redb").display()), 0, &[]);
    let url = controller.url.clone();
    let (dry_port, off_port) = (free_port(), free_port());
    let dry = agent_with(&url, "dry", 8, &["--enforce", "dry-run", "--metrics-addr", &format!("127.0.0.1:{dry_port}")]);
    let off = agent_with(&url, "off", 8, &["--enforce", "off", "--metrics-addr", &format!("127.0.0.1:{off_port}")]);
    ready(&url, 2);
    assert!(submit(&url, &job_manifest("work", 1, 1, 1, 8)).status.success());
    wait_for(Duration::from_secs(20), "the job running", || (jobs(&url)["work"]["state"] == "running").then_some(()));

    // A limit the 16 GPUs at 700 W do not fit: every node is ordered lower caps.
    set_grid(&url, "6kW", None);
    pause(Duration::from_secs(2));
    let orders = |port| sample(&http_metrics(port), "watt_agent_cap_orders_total");
    let before = (orders(dry_port), orders(off_port));
    let cpu_before = (cpu_seconds(controller.proc.pid()), cpu_seconds(dry.pid()), cpu_seconds(off.pid()));
    pause(Duration::from_secs(10));
    let after = (orders(dry_port), orders(off_port));
    let cpu_after = (cpu_seconds(controller.proc.pid()), cpu_seconds(dry.pid()), cpu_seconds(off.pid()));
    assert!(after.0 - before.0 <= 2.0 && after.1 - before.1 <= 2.0, "orders in 10 s: {before:?} → {after:?}");
    for (who, used) in [
        ("controller", cpu_after.0 - cpu_before.0),
        ("dry-run agent", cpu_after.1 - cpu_before.1),
        ("off agent", cpu_after.2 - cpu_before.2),
    ] {
        assert!(used < 1.5, "{who} used {used:.2} CPU seconds in 10 s");
    }
    // One target change: at most a couple of orders more, then quiet again.
    set_grid(&url, "5kW", None);
    pause(Duration::from_secs(3));
    let changed = (orders(dry_port), orders(off_port));
    assert!(changed.0 - after.0 <= 2.0 && changed.1 - after.1 <= 2.0, "{after:?} → {changed:?}");
    assert!(
        changed.0 + changed.1 > after.0 + after.1,
        "the job's node is told its new target: {after:?} → {changed:?}"
    );

    let nodes = wattctl_json(&url, &["nodes"]);
    let mode = |name: &str| nodes.as_array().unwrap().iter().find(|n| n["name"] == name).unwrap()["enforce"].clone();
    assert_eq!((mode("dry"), mode("off")), (Value::from("dry-run"), Value::from("off")), "{nodes}");
    let table = String::from_utf8(wattctl(&url, &["nodes"]).stdout).unwrap();
    assert!(table.contains("ENFORCE") && table.contains("dry-run"), "{table}");
    let p = power(&url);
    assert_eq!(p["unenforced_nodes"], 2, "{p}");
    assert_eq!(p["unacknowledged_nodes"], 0, "answered, not awaiting an acknowledgement: {p}");
    assert!(notes(&p).contains("unenforced: 2 node(s)"), "{p}");
    // Their draw above their orders is theirs: not Watt's violation.
    assert_eq!(p["budget_violations"], 0, "{p}");
    assert_eq!(p["measured_violations"], 0, "{p}");
    let metrics = controller.metrics();
    assert_eq!(sample(&metrics, "watt_controller_nodes_by_enforce_mode{mode=\"dry-run\"}"), 1.0);
    assert_eq!(sample(&metrics, "watt_power_unenforced_nodes"), 2.0);
    // The dry-run agent exports what it would set; the GPUs keep their limits.
    let agent_metrics = http_metrics(dry_port);
    assert!(agent_metrics.contains("watt_gpu_power_limit_ordered_watts"), "{agent_metrics}");
    assert_eq!(sample(&agent_metrics, "watt_agent_controller_connected"), 1.0);
    let text = String::from_utf8(wattctl(&url, &["power", "status"]).stdout).unwrap();
    assert!(text.contains("Unenforced:  2 node(s)"), "{text}");

    // Power back: the job's target is the 700 W limit the nodes read back anyway. They are told
    // so once, and their draw is judged against that order, not against the lower one before.
    set_grid(&url, "100kW", None);
    // (The meter's figure is from its last look, a moment behind the status: both are waited on.)
    wait_for(Duration::from_secs(20), "draw judged against the order in force, the meter seeing it", || {
        let p = power(&url);
        (f(&p, "unenforced_excess_watts") < 100.0 && f(&p, "measured_watts") > 0.9 * f(&p, "drawn_watts")).then_some(())
    });
}

#[test]
fn a_deep_cut_pauses_until_the_meter_agrees_and_a_limit_below_the_floor_is_said_out_loud() {
    let dir = tempfile::tempdir().unwrap();
    let controller =
        ControllerProc::start(&format!("file:{}", dir.path().join("w.redb").display()), 0, &["--settle-time", "2s"]);
    let url = controller.url.clone();
    // 2 nodes × 8 H100s; each node draws 150 W besides its GPUs (configured overhead).
    let _agents: Vec<Proc> =
        (1..=2).map(|i| agent_with(&url, &format!("n{i}"), 8, &["--node-overhead", "150"])).collect();
    ready(&url, 2);
    set_grid(&url, "20kW", None);
    assert!(submit(&url, &job_manifest("high", 2, 1, 1, 8)).status.success());
    assert!(submit(&url, &job_manifest("low", 1, 1, 1, 8)).status.success());
    wait_for(Duration::from_secs(30), "both jobs running", || {
        let j = jobs(&url);
        (j["high"]["state"] == "running" && j["low"]["state"] == "running").then_some(())
    });
    // The nodes' reported overhead is budgeted (from their telemetry, at the next pass).
    wait_for(Duration::from_secs(10), "the nodes' reported overhead budgeted", || {
        (f(&power(&url), "non_gpu_watts") == 300.0).then_some(())
    });

    // Limit 3.0 kW: below every job at its minimum cap (300 + 16 × 200 = 3.5 kW), above the floor
    // (300 + 16 GPUs idle at 100 W = 1.9 kW). The low-priority job pauses; the meter agrees.
    set_grid(&url, &format!("{}", 3_000.0 / 0.95), None);
    wait_for(Duration::from_secs(20), "the low job paused", || (jobs(&url)["low"]["state"] == "pending").then_some(()));
    assert_eq!(jobs(&url)["high"]["state"], "running");
    let fits = wait_for(Duration::from_secs(20), "measured draw under the limit", || {
        let p = power(&url);
        (f(&p, "measured_watts") > 0.0 && f(&p, "measured_watts") <= f(&p, "limit_watts")).then_some(p)
    });
    assert_eq!(fits["infeasible"], false, "{fits}");
    // Long past the settle time: the meter found no violation, and neither did the accounting.
    pause(Duration::from_secs(4));
    let p = power(&url);
    assert!(f(&p, "measured_watts") <= f(&p, "limit_watts"), "{p}");
    assert_eq!(
        (p["measured_violations"].clone(), p["budget_violations"].clone()),
        (Value::from(0), Value::from(0)),
        "{p}"
    );
    assert_eq!(f(&p, "overdraw_seconds"), 0.0, "{p}");

    // Limit 1.0 kW: below the floor, and below what the idle GPUs and nodes really draw.
    set_grid(&url, &format!("{}", 1_000.0 / 0.95), None);
    let p = wait_for(Duration::from_secs(20), "every job paused and infeasible said", || {
        let p = power(&url);
        let j = jobs(&url);
        (p["infeasible"] == true && j["high"]["state"] == "pending" && j["low"]["state"] == "pending").then_some(p)
    });
    assert!((f(&p, "floor_watts") - 1_900.0).abs() < 1.0, "{p}");
    let said = notes(&p);
    assert!(
        said.contains("infeasible: with every job paused this cluster draws at least 1.9 kW, above the 1.0 kW limit"),
        "{said}"
    );
    assert!(said.contains("power nodes off or raise the limit"), "{said}");
    let overdraw = wait_for(Duration::from_secs(15), "the measured overdraw counted", || {
        let p = power(&url);
        (f(&p, "overdraw_seconds") > 1.0).then_some(p)
    });
    assert!(f(&overdraw, "worst_overdraw_watts") > 100.0, "{overdraw}");
    assert_eq!(overdraw["measured_violations"], 0, "an infeasible limit is not Watt failing: {overdraw}");
    let events = String::from_utf8(wattctl(&url, &["events"]).stdout).unwrap();
    assert!(events.contains("infeasible"), "{events}");
    let text = String::from_utf8(wattctl(&url, &["power", "status"]).stdout).unwrap();
    assert!(text.contains("INFEASIBLE"), "{text}");
    let metrics = controller.metrics();
    assert_eq!(sample(&metrics, "watt_power_infeasible"), 1.0);
    assert!((sample(&metrics, "watt_power_watts{what=\"floor\"}") - 1_900.0).abs() < 1.0);
    assert!(sample(&metrics, "watt_power_overdraw_seconds_total") > 1.0);
    assert_eq!(sample(&metrics, "watt_budget_violations_total{basis=\"measured\"}"), 0.0);

    // Power back: feasible again, the jobs resume.
    set_grid(&url, "20kW", None);
    wait_for(Duration::from_secs(30), "both jobs running again", || {
        let j = jobs(&url);
        (power(&url)["infeasible"] == false && j["high"]["state"] == "running" && j["low"]["state"] == "running")
            .then_some(())
    });
}

#[test]
fn a_gpu_busy_with_a_process_watt_did_not_start_is_counted_at_its_cap_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProc::start(&format!("file:{}", dir.path().join("w.redb").display()), 0, &[]);
    let url = controller.url.clone();
    let _agent = agent_with(&url, "shared", 8, &["--sim-foreign-gpus", "2,5"]);
    ready(&url, 1);
    set_grid(&url, "10kW", None);
    let p = wait_for(Duration::from_secs(20), "two foreign GPUs", || {
        let p = power(&url);
        (p["foreign_gpus"] == 2 && p["unacknowledged_nodes"] == 0).then_some(p)
    });
    assert!(notes(&p).contains("2 GPU(s) run processes Watt did not start"), "{p}");
    let gpus = wattctl_json(&url, &["gpus"]);
    for g in gpus.as_array().unwrap() {
        let index = g["gpu"].as_u64().unwrap();
        if index == 2 || index == 5 {
            assert_eq!(g["work"], "foreign", "{g}");
            assert!(f(g, "power_watts") > 150.0, "it draws: {g}");
            assert!(f(g, "counted_watts") >= f(g, "power_limit_watts") - 1e-6, "counted at its cap: {g}");
        } else {
            assert_eq!(g["work"], "idle", "{g}");
            assert!(f(g, "power_watts") < 100.0, "an idle simulated H100 idles near 70 W: {g}");
            assert_eq!(f(g, "counted_watts"), 100.0, "at the idle allowance, above its draw: {g}");
        }
    }
    let events = String::from_utf8(wattctl(&url, &["events"]).stdout).unwrap();
    assert!(events.contains("foreign-gpu") && events.contains("GPU 2"), "{events}");
    assert_eq!(sample(&controller.metrics(), "watt_power_foreign_gpus"), 2.0);
    // Counted: 6 idle at 100 W, 2 foreign at their 200 W parked caps, no overhead.
    assert!((f(&p, "counted_watts") - 1_000.0).abs() < 1.0, "{p}");
}

#[test]
fn a_cancelled_job_says_how_its_shards_ended_once_they_have() {
    let dir = tempfile::tempdir().unwrap();
    let (controller, _agents) = local_cluster(dir.path(), 1, 8, &[]);
    let url = controller.url.clone();
    let manifest = "name: sleeper\nshards: {min: 1, max: 1}\ngpus_per_shard: 1\ncommand: [sleep, \"600\"]\n";
    assert!(submit(&url, manifest).status.success());
    wait_for(Duration::from_secs(30), "the job running", || {
        (jobs(&url)["sleeper"]["state"] == "running").then_some(())
    });
    assert!(wattctl(&url, &["cancel", "sleeper"]).status.success());
    // Recorded as it came off its GPUs, while its shard was still being stopped; SIGTERM then
    // ends the process, and the record says so.
    let job = wait_for(Duration::from_secs(20), "the shard's end recorded", || {
        let job = wattctl_json(&url, &["describe", "job", "sleeper"]);
        (job["last_run"][0]["state"] == "stopped").then_some(job)
    });
    assert_eq!(
        (job["state"].clone(), job["last_run"][0]["signal"].clone()),
        (Value::from("cancelled"), Value::from(15)),
        "{job}"
    );
    let text = String::from_utf8(wattctl(&url, &["describe", "job", "sleeper"]).stdout).unwrap();
    assert!(text.contains("shard 0 on node-1 was killed by signal 15"), "{text}");
}

#[test]
fn a_failed_job_says_where_and_how_each_shard_ended_and_its_logs_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let (controller, _agents) = local_cluster(dir.path(), 1, 8, &[]);
    let url = controller.url.clone();
    let manifest = "name: crashy\nshards: {min: 1, max: 1}\ngpus_per_shard: 2\nmax_restarts: 1\ncommand: [sh, -c, 'echo loading data; echo out of memory on purpose >&2; exit 3']\n";
    assert!(submit(&url, manifest).status.success());
    let started = Instant::now();
    wait_for(Duration::from_secs(30), "the job failed", || (jobs(&url)["crashy"]["state"] == "failed").then_some(()));
    assert!(started.elapsed() < Duration::from_secs(30));
    let job = wattctl_json(&url, &["describe", "job", "crashy"]);
    let last = &job["last_run"][0];
    assert_eq!(
        (last["node"].clone(), last["exit_code"].clone(), last["restarts"].clone()),
        (Value::from("node-1"), Value::from(3), Value::from(1)),
        "{job}"
    );
    assert_eq!(last["state"], "failed", "{job}");
    assert!(job["message"].as_str().unwrap().contains("shard 0 on node-1 exited 3 after 1 restart"), "{job}");
    assert!(job["failed_log_tails"][0]["tail"].as_str().unwrap().contains("out of memory on purpose"), "{job}");
    let text = String::from_utf8(wattctl(&url, &["describe", "job", "crashy"]).stdout).unwrap();
    assert!(
        text.contains("shard 0 on node-1 exited 3 after 1 restart") && text.contains("| out of memory on purpose"),
        "{text}"
    );
    // The log outlives the run.
    let logs = wattctl(&url, &["logs", "crashy"]);
    assert!(logs.status.success(), "{}", String::from_utf8_lossy(&logs.stderr));
    let logs = String::from_utf8(logs.stdout).unwrap();
    assert!(logs.contains("loading data") && logs.contains("out of memory on purpose"), "{logs}");
    let missing = wattctl(&url, &["logs", "crashy", "--shard", "4"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("last ran shards 0..0"), "{missing:?}");
}
