//! The power engine end to end with real processes: a controller, eight agents with simulated
//! GPUs enforcing caps, jobs running; `wattctl power` cuts and restores the grid.
// Real processes on the real clock: std's Instant.
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use watt_system_tests::*;

fn power(url: &str) -> Value {
    wattctl_json(url, &["power", "status"])
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}

/// Settled: every cap order acknowledged by every reachable node.
fn settled(url: &str, what: &str) -> Value {
    wait_for(Duration::from_secs(30), what, || {
        let p = power(url);
        (p["unacknowledged_nodes"] == 0).then_some(p)
    })
}

/// The lines a child writes, on a channel (a reader that does not block the test).
fn lines_of(out: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn agent_with_failsafe(url: &str, node: &str) -> Proc {
    agent_with(url, node, 8, &["--failsafe-after", "2s"])
}

#[test]
fn a_cut_moves_every_cap_under_the_new_budget_and_regrowth_follows_the_ramp() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().join("watt.redb").display());
    let controller = ControllerProc::start(&store, 0, &["--node-lease", "3s", "--reconcile-interval", "200ms"]);
    let url = controller.url.clone();
    let mut agents: Vec<Proc> = (1..=8).map(|i| agent_with_failsafe(&url, &format!("node-{i}"))).collect();
    wait_for(Duration::from_secs(30), "8 nodes", || {
        (wattctl_json(&url, &["nodes"]).as_array().unwrap().iter().filter(|n| n["state"] == "ready").count() == 8)
            .then_some(())
    });

    // 64 H100s at most draw 44.8 kW; 50 kW less a 5% reserve holds them all at full power.
    set_grid(&url, "50kW", None);
    for (name, prio, flex) in [("alpha", 4, 0.0), ("beta", 3, 0.1), ("gamma", 2, 0.2), ("delta", 1, 0.3)] {
        let m = format!("name: {name}\npriority: {prio}\nshards: {{min: 2, max: 2}}\ngpus_per_shard: 8\ncommand: {IDLE_COMMAND}\nflex: {flex}\n");
        assert!(submit(&url, &m).status.success());
    }
    wait_for(Duration::from_secs(30), "4 jobs running", || {
        (jobs(&url).values().filter(|j| j["state"] == "running").count() == 4).then_some(())
    });
    let full = settled(&url, "full power settled");
    assert!(full["jobs"].as_array().unwrap().iter().all(|j| f(j, "cap_watts") == 700.0), "{full}");

    // A 30% cut: every cap acknowledged, counted and measured draw under the new limit.
    let cut = set_grid(&url, "35kW", None);
    assert_eq!(f(&cut, "limit_watts"), 35_000.0 * 0.95);
    let after = settled(&url, "the cut acknowledged");
    let limit = f(&after, "limit_watts");
    assert!(f(&after, "counted_watts") <= limit + 1e-6, "{after}");
    assert_eq!(after["budget_violations"], 0);
    assert_eq!(after["measured_violations"], 0);
    // Flexible jobs gave first: the most flexible runs lowest, the rigid one highest.
    let cap =
        |name: &str| f(after["jobs"].as_array().unwrap().iter().find(|j| j["name"] == name).unwrap(), "cap_watts");
    assert!(cap("delta") < cap("alpha"), "{after}");
    // What the GPUs draw, measured by the agents, follows within a few telemetry rounds.
    let measured = wait_for(Duration::from_secs(10), "measured draw under the limit", || {
        let p = power(&url);
        (f(&p, "drawn_watts") <= limit && f(&p, "drawn_watts") > 0.0).then_some(p)
    });
    // A GPU's draw falls to a new cap within the driver's period, and a telemetry message can
    // carry the new limit with a reading taken just before: every GPU under its cap within a few
    // telemetry rounds.
    let gpus = wait_for(Duration::from_secs(5), "no GPU drawing above its cap", || {
        let gpus = wattctl_json(&url, &["gpus"]);
        gpus.as_array().unwrap().iter().all(|g| f(g, "power_watts") <= f(g, "power_limit_watts") + 1e-6).then_some(gpus)
    });
    for g in gpus.as_array().unwrap() {
        let l = f(g, "power_limit_watts");
        assert!((200.0..=700.0).contains(&l), "{g}");
        assert!(f(g, "power_watts") <= l + 1e-6, "no GPU draws above its cap: {g}");
    }
    assert!(f(&measured, "drawn_watts") <= limit);

    // SIGKILL an agent, then cut again: its node counts at its old caps until its failsafe
    // deadline (its last word + 2 s), then at its failsafe caps.
    let victim_caps: f64 =
        gpus.as_array().unwrap().iter().filter(|g| g["node"] == "node-1").map(|g| f(g, "power_limit_watts")).sum();
    agents[0].kill9();
    let cut2 = set_grid(&url, "30kW", None);
    assert_eq!(cut2["failsafe_nodes"], 0, "just after the kill the node is not yet presumed at failsafe");
    assert!(f(&cut2, "counted_watts") >= victim_caps, "the unreachable node still counts at its caps: {cut2}");
    let failsafed = wait_for(Duration::from_secs(15), "the killed node counted at its failsafe caps", || {
        let p = power(&url);
        (p["failsafe_nodes"] == 1).then_some(p)
    });
    let settled2 = settled(&url, "the second cut acknowledged");
    assert!(f(&settled2, "counted_watts") <= f(&settled2, "limit_watts") + 1e-6, "{failsafed} {settled2}");

    // Restore with a 4 kW/s ramp: supply, and so every allocation, grows no faster than that.
    // `power watch` streams each status the controller publishes (the current one first), so how
    // many samples the ramp gets does not depend on how fast this machine starts processes.
    let mut watch = wattctl_command(&url, Some(&TestPki::get().admin()), &["-o", "json", "power", "watch"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let statuses = lines_of(watch.stdout.take().unwrap());
    let status = |timeout| -> Value {
        let line = statuses.recv_timeout(timeout).expect("a power status from `wattctl power watch`");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    assert_eq!(f(&status(Duration::from_secs(10)), "available_watts"), 30_000.0);
    let t0 = std::time::Instant::now();
    set_grid(&url, "50kW", Some("4kW/s"));
    let mut inside_the_ramp = 0;
    loop {
        let p = status(Duration::from_secs(10));
        let elapsed = t0.elapsed().as_secs_f64();
        let available = f(&p, "available_watts");
        assert!(available <= 30_000.0 + 4_000.0 * (elapsed + 0.1), "available {available} W after {elapsed:.2} s");
        assert!(f(&p, "allocated_watts") <= f(&p, "limit_watts") + 1e-6, "{p}");
        if available >= 50_000.0 {
            break;
        }
        inside_the_ramp += usize::from(available > 30_000.0);
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(inside_the_ramp >= 5, "{inside_the_ramp} statuses inside the ramp");
    let grown = wait_for(Duration::from_secs(20), "the ramp to finish", || {
        let p = power(&url);
        (f(&p, "available_watts") == 50_000.0 && p["unacknowledged_nodes"] == 0).then_some(p)
    });
    assert_eq!(grown["budget_violations"], 0);
    assert_eq!(grown["measured_violations"], 0, "the meter agrees: {grown}");
    let metrics = controller.metrics();
    for basis in ["counted", "measured"] {
        let line = format!("watt_budget_violations_total{{basis=\"{basis}\"}} 0");
        assert!(metrics.lines().any(|l| l == line), "{metrics}");
    }
    assert!(metrics.contains("watt_power_event_to_ack_seconds_count"));
}

#[test]
fn bad_power_input_is_refused_by_field_and_a_budget_below_the_minimum_says_what_it_pauses() {
    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProc::start(
        &format!("file:{}", dir.path().join("w.redb").display()),
        0,
        &["--reconcile-interval", "200ms"],
    );
    let url = controller.url.clone();
    let _agent = agent(&url, "only", 8);
    wait_for(Duration::from_secs(20), "the node", || {
        (wattctl_json(&url, &["nodes"]).as_array().unwrap().len() == 1).then_some(())
    });
    set_grid(&url, "10kW", None);
    let before = power(&url);
    for (args, want) in [
        (vec!["power", "set-source", "grid", "--kind", "grid", "--available=-5MW"], "source.available_watts"),
        (vec!["power", "set-source", "grid", "--kind", "grid", "--available", "999999GW"], "source.available_watts"),
        (
            vec!["power", "set-source", "grid", "--kind", "grid", "--available", "5MW", "--ramp", "0W/s"],
            "source.ramp_watts_per_second",
        ),
        (vec!["power", "set-source", "Grid Main", "--kind", "grid", "--available", "5MW"], "source.name"),
        (vec!["power", "set-reserve", "90%"], "site.reserve_ratio"),
        (vec!["power", "remove-source", "nope"], "no power source named \"nope\""),
    ] {
        let out = wattctl(&url, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: want {want:?} in {stderr}");
    }
    for args in [
        vec!["power", "set-source", "g", "--kind", "nuclear", "--available", "1MW"],
        vec!["power", "set-source", "g", "--kind", "grid", "--available", "5 horsepower"],
    ] {
        assert_eq!(wattctl(&url, &args).status.code(), Some(2), "{args:?} is a usage error");
    }
    let after = power(&url);
    assert_eq!(after["sources"], before["sources"], "refused changes changed nothing");
    assert_eq!(after["reserve_ratio"], before["reserve_ratio"]);

    // A budget below every minimum cap is allowed — and says what it does about it.
    assert!(submit(&url, &job_manifest("lone", 1, 1, 1, 8)).status.success());
    wait_for(Duration::from_secs(20), "the job running", || (jobs(&url)["lone"]["state"] == "running").then_some(()));
    let tight = set_grid(&url, "1kW", None);
    let notes = tight["notes"].as_array().unwrap();
    assert!(notes.iter().any(|n| n.as_str().unwrap().contains("paused lone")), "{tight}");
    let job = wait_for(Duration::from_secs(20), "the job paused", || {
        let j = jobs(&url)["lone"].clone();
        (j["state"] == "pending").then_some(j)
    });
    assert!(job["message"].as_str().unwrap().contains("power"), "{job}");
    // Power back: it resumes.
    set_grid(&url, "10kW", None);
    wait_for(Duration::from_secs(20), "the job resumed", || (jobs(&url)["lone"]["state"] == "running").then_some(()));
}

#[test]
fn an_elastic_job_shrunk_for_power_grows_back_when_power_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (controller, _agents) =
        local_cluster(dir.path(), 2, 8, &["--reconcile-interval", "200ms", "--regrow-after", "1s"]);
    let url = controller.url.clone();
    set_grid(&url, "20kW", None);
    let manifest =
        format!("name: elastic\nshards: {{min: 1, max: 4}}\ngpus_per_shard: 4\ncommand: {IDLE_COMMAND}\nflex: 0.2\n");
    assert!(submit(&url, &manifest).status.success());
    let shards = |url: &str| jobs(url)["elastic"]["placement"].as_array().map_or(0, Vec::len);
    wait_for(Duration::from_secs(20), "4 shards running", || {
        (jobs(&url)["elastic"]["state"] == "running" && shards(&url) == 4).then_some(())
    });

    // 16 GPUs at their 200 W minimum and none idle: 3.2 kW. A 2.28 kW limit holds one shard
    // (4 × 200 W + 12 idle GPUs × 100 W = 2 kW), not two (2.4 kW).
    set_grid(&url, "2.4kW", None);
    let shrunk = wait_for(Duration::from_secs(20), "the job shrunk to 1 shard", || {
        let j = jobs(&url)["elastic"].clone();
        (j["state"] == "running" && j["placement"].as_array().map_or(0, Vec::len) == 1).then_some(j)
    });
    assert!(shrunk["message"].as_str().unwrap().contains("shard"), "{shrunk}");
    let p = settled(&url, "the cut acknowledged");
    assert!(f(&p, "counted_watts") <= f(&p, "limit_watts") + 1e-6, "{p}");

    // Power back: it grows back to its full size in one resize, and every cap stays in budget.
    set_grid(&url, "20kW", None);
    let grown = wait_for(Duration::from_secs(30), "the job grown back to 4 shards", || {
        let j = jobs(&url)["elastic"].clone();
        (j["state"] == "running" && j["placement"].as_array().map_or(0, Vec::len) == 4).then_some(j)
    });
    assert!(grown["message"].as_str().unwrap().contains("running 4"), "{grown}");
    let events = wattctl(&url, &["events"]);
    let events = String::from_utf8_lossy(&events.stdout);
    let grew: Vec<&str> = events.lines().filter(|l| l.contains("grown")).collect();
    assert_eq!(grew.len(), 1, "one resize straight to the full size: {events}");
    assert!(grew[0].contains("from 1 to 4"), "{events}");
    let p = settled(&url, "the regrowth acknowledged");
    assert_eq!(p["budget_violations"], 0, "{p}");
    assert_eq!(p["measured_violations"], 0, "{p}");
}

/// The steepest rise of counted power within any second of `trace` ((unix ms, W) as each
/// status published it: counted power changes only at the passes that publish).
fn steepest_rise_within_a_second(trace: &[(f64, f64)]) -> f64 {
    trace
        .iter()
        .map(|&(end, at_end)| {
            let in_force_at_start = trace.iter().rev().find(|&&(t, _)| t <= end - 1_000.0).map(|&(_, w)| w);
            let lowest = trace
                .iter()
                .filter(|&&(t, _)| t > end - 1_000.0 && t <= end)
                .map(|&(_, w)| w)
                .chain(in_force_at_start)
                .fold(f64::INFINITY, f64::min);
            at_end - lowest
        })
        .fold(0.0, f64::max)
}

/// Every status `wattctl power watch` prints, from now until `done` says so.
fn watch_until(url: &str, what: &str, start: impl FnOnce(), done: impl Fn(&Value) -> bool) -> (Vec<(f64, f64)>, f64) {
    let mut watch = wattctl_command(url, Some(&TestPki::get().admin()), &["-o", "json", "power", "watch"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let statuses = lines_of(watch.stdout.take().unwrap());
    let status = || -> Value {
        let line = statuses.recv_timeout(Duration::from_secs(10)).expect("a power status from `wattctl power watch`");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    let first = status();
    let mut trace = vec![(f(&first, "unix_ms"), f(&first, "counted_watts"))];
    let t0 = Instant::now();
    start();
    loop {
        assert!(t0.elapsed() < Duration::from_secs(30), "{what} did not finish: {trace:?}");
        let p = status();
        trace.push((f(&p, "unix_ms"), f(&p, "counted_watts")));
        if done(&p) {
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    (trace, t0.elapsed().as_secs_f64())
}

#[test]
fn the_site_ramp_limits_shape_a_start_a_restore_and_a_cancel_and_never_slow_a_cut() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().join("watt.redb").display());
    let controller = ControllerProc::start(&store, 0, &["--reconcile-interval", "200ms"]);
    let url = controller.url.clone();
    let _agents: Vec<Proc> = (1..=4).map(|i| agent(&url, &format!("node-{i}"), 8)).collect();
    wait_for(Duration::from_secs(30), "4 nodes", || {
        (wattctl_json(&url, &["nodes"]).as_array().unwrap().iter().filter(|n| n["state"] == "ready").count() == 4)
            .then_some(())
    });
    // 32 H100s: 22.4 kW at full power, under a 30 kW grid less its 5% reserve.
    set_grid(&url, "30kW", None);
    let job = |i: u32| {
        format!("name: job-{i}\nshards: {{min: 1, max: 1}}\ngpus_per_shard: 8\ncommand: {IDLE_COMMAND}\nflex: 0.3\n")
    };
    for i in 1..=3 {
        assert!(submit(&url, &job(i)).status.success());
    }
    let at_full = |p: &Value, jobs: usize| {
        p["jobs"].as_array().unwrap().iter().filter(|j| f(j, "cap_watts") == 700.0).count() == jobs
            && p["unacknowledged_nodes"] == 0
    };
    wait_for(Duration::from_secs(30), "3 jobs running at full power", || at_full(&power(&url), 3).then_some(()));
    let out = wattctl(&url, &["power", "set-site", "--ramp-up", "120kW/min"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let site = power(&url);
    assert_eq!(f(&site, "ramp_up_watts_per_second"), 2_000.0, "120 kW/min is 2 kW/s: {site}");
    let bad = wattctl(&url, &["power", "set-site", "--ramp-up=-5kW/s"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("site.ramp_up_watts_per_second"));

    // A job of 8 GPUs starts: 8 × 100 W at once (idle to its minimum cap), then 4 kW of caps,
    // along the ramp.
    let before = f(&power(&url), "counted_watts");
    let (start, start_seconds) = watch_until(
        &url,
        "the start",
        || assert!(submit(&url, &job(4)).status.success()),
        |p| f(p, "counted_watts") >= before + 8.0 * (700.0 - 100.0) - 1.0,
    );
    let start_rise = steepest_rise_within_a_second(&start);
    assert!(start_rise <= 2_000.0 + 1e-6, "the start rose {start_rise} W within a second: {start:?}");
    assert!(start_seconds > 1.5, "4.8 kW at 2 kW/s: {start_seconds:.1} s");
    let full = f(&power(&url), "counted_watts");

    // A 30% cut is an emergency: not slowed by the ramp. Every cap acknowledged at once.
    let t0 = Instant::now();
    set_grid(&url, "16.5kW", None);
    let cut = wait_for(Duration::from_secs(5), "the cut acknowledged", || {
        let p = power(&url);
        (p["unacknowledged_nodes"] == 0 && f(&p, "counted_watts") <= f(&p, "limit_watts")).then_some(p)
    });
    let cut_seconds = t0.elapsed().as_secs_f64();
    let fell = full - f(&cut, "counted_watts");
    assert!(fell > 3.0 * 2_000.0, "the cut took {fell} W off, over three seconds of ramp");
    assert!(cut_seconds < 1.5, "and took {cut_seconds:.2} s: a cut is never slowed by the ramp");

    // The restore: back to full power, along the ramp.
    let (restore, restore_seconds) = watch_until(
        &url,
        "the restore",
        || {
            set_grid(&url, "30kW", None);
        },
        |p| f(p, "counted_watts") >= full - 1.0,
    );
    let restore_rise = steepest_rise_within_a_second(&restore);
    assert!(restore_rise <= 2_000.0 + 1e-6, "the restore rose {restore_rise} W within a second: {restore:?}");
    // (22.4 − 15.7) kW at 2 kW/s: at least three seconds.
    assert!(restore_seconds > 2.5, "the restore took {restore_seconds:.1} s: {restore:?}");
    eprintln!(
        "start in {start_seconds:.1} s (steepest rise within a second {start_rise:.0} W); cut of {fell:.0} W acknowledged in {cut_seconds:.2} s; restore in {restore_seconds:.1} s (steepest {restore_rise:.0} W)"
    );
    // A cancel with a ramp-down: job-4's caps come down at 2 kW/s (8 GPUs, 700 → 200 W: 2 s)
    // while it keeps its GPUs, then its shard stops.
    let out = wattctl(&url, &["power", "set-site", "--ramp-down", "2kW/s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t0 = Instant::now();
    let out = wattctl(&url, &["cancel", "job-4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut caps = Vec::new();
    let cancelled_after = loop {
        assert!(t0.elapsed() < Duration::from_secs(10), "job-4 never ended: caps {caps:?}");
        let job = &jobs(&url)["job-4"];
        if job["state"] == "cancelled" {
            break t0.elapsed().as_secs_f64();
        }
        assert_eq!(job["state"], "running", "{job}");
        assert!(job["message"].as_str().unwrap().starts_with("cancelling: its caps come down"), "{job}");
        let p = power(&url);
        if let Some(j) = p["jobs"].as_array().unwrap().iter().find(|j| j["name"] == "job-4") {
            caps.push(f(j, "cap_watts"));
        }
        idle(Duration::from_millis(100));
    };
    eprintln!("cancel: caps {caps:?}, cancelled after {cancelled_after:.2} s");
    assert!(caps.windows(2).all(|w| w[1] <= w[0]), "caps only come down: {caps:?}");
    assert!(caps.iter().any(|&c| c > 250.0 && c < 650.0), "caps went through the ramp: {caps:?}");
    assert!((1.8..6.0).contains(&cancelled_after), "stopped after the ramp: {cancelled_after:.2} s");

    // A preemption with a ramp-down: job-5 (priority 5, two 8-GPU shards) takes node-4 and one
    // running job's node. That job's caps come down at 2 kW/s while it keeps its GPUs and job-5
    // waits; then it is preempted and job-5 starts.
    let t0 = Instant::now();
    let urgent =
        format!("name: job-5\npriority: 5\nshards: {{min: 2, max: 2}}\ngpus_per_shard: 8\ncommand: {IDLE_COMMAND}\n");
    assert!(submit(&url, &urgent).status.success());
    let (mut victim, mut caps) = (None::<String>, Vec::new());
    let preempted_after = loop {
        assert!(t0.elapsed() < Duration::from_secs(15), "no preemption: {victim:?}, caps {caps:?}");
        let all = jobs(&url);
        let making_room = (1..=3).map(|i| format!("job-{i}")).find(|n| {
            all[n.as_str()]["message"].as_str().is_some_and(|m| m.starts_with("making room: its caps come down"))
        });
        if victim.is_none() {
            victim = making_room;
        }
        if let Some(v) = &victim {
            if all[v.as_str()]["state"] == "pending" {
                break t0.elapsed().as_secs_f64();
            }
            assert_eq!(all[v.as_str()]["state"], "running", "it keeps its GPUs while its caps come down");
            assert_eq!(all["job-5"]["state"], "pending", "job-5 waits for the room: {}", all["job-5"]);
            if let Some(j) = power(&url)["jobs"].as_array().unwrap().iter().find(|j| j["name"] == v.as_str()) {
                caps.push(f(j, "cap_watts"));
            }
        }
        idle(Duration::from_millis(100));
    };
    let victim = victim.unwrap();
    eprintln!("preemption of {victim}: caps {caps:?}, preempted after {preempted_after:.2} s");
    assert!(caps.windows(2).all(|w| w[1] <= w[0]), "caps only come down: {caps:?}");
    assert!(caps.iter().any(|&c| c > 250.0 && c < 650.0), "caps went through the ramp: {caps:?}");
    assert!(preempted_after > 1.5, "preempted after the ramp: {preempted_after:.2} s");
    let preempted = &jobs(&url)[victim.as_str()];
    assert!(preempted["message"].as_str().unwrap().contains("preempted by higher-priority job job-5"), "{preempted}");
    wait_for(Duration::from_secs(15), "job-5 running", || (jobs(&url)["job-5"]["state"] == "running").then_some(()));
    let done = power(&url);
    assert_eq!(done["budget_violations"], 0, "{done}");
    assert_eq!(done["measured_violations"], 0, "{done}");
    let metrics = controller.metrics();
    assert!(metrics.lines().any(|l| l == "watt_power_ramp_limit_watts_per_second 2000"), "{metrics}");
    assert!(metrics.contains("watt_power_ramp_watts_per_second{window=\"1s\"}"), "{metrics}");
}
