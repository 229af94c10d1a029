//! Power domains end to end: 8 agents in 2 rows × 2 racks (their `--labels`), a job on each
//! node, the tree set with `wattctl power set-domain`. A rack's limit cut below what its GPUs
//! draw at full power slows that rack's jobs only, and the rack's measured draw stays under its
//! limit; the rest of the site runs on at full power.
// Real processes on the real clock.
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::time::Duration;

use serde_json::Value;
use watt_system_tests::*;

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}

fn status(url: &str) -> Value {
    wattctl_json(url, &["power", "status"])
}

fn domain<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["domains"].as_array().unwrap().iter().find(|d| d["name"] == name).unwrap_or_else(|| panic!("{name}"))
}

/// Each job's cap, by the node its shard runs on.
fn caps_by_node(url: &str) -> std::collections::BTreeMap<String, f64> {
    let power = status(url);
    let caps: std::collections::BTreeMap<String, f64> = power["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["name"].as_str().unwrap().to_string(), f(j, "cap_watts")))
        .collect();
    jobs(url)
        .values()
        .filter_map(|j| {
            let node = j["placement"].get(0)?["node"].as_str()?.to_string();
            Some((node, *caps.get(j["name"].as_str()?)?))
        })
        .collect()
}

#[test]
fn a_racks_limit_slows_only_its_own_jobs_and_its_draw_stays_under_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().join("w.redb").display());
    let controller = ControllerProc::start(&store, 0, &["--reconcile-interval", "200ms"]);
    let url = controller.url.clone();
    // dom-1a-0, dom-1a-1 in rack 1a of row 1; … dom-2b-1 in rack 2b of row 2.
    let mut nodes = Vec::new();
    for row in ["1", "2"] {
        for rack in ["a", "b"] {
            for i in 0..2 {
                nodes.push((format!("dom-{row}{rack}-{i}"), format!("row={row},rack={row}{rack}")));
            }
        }
    }
    let _agents: Vec<Proc> =
        nodes.iter().map(|(name, labels)| agent_with(&url, name, 2, &["--labels", labels])).collect();
    wait_for(Duration::from_secs(30), "8 nodes ready", || {
        let listed = wattctl_json(&url, &["nodes"]);
        (listed.as_array().unwrap().iter().filter(|n| n["state"] == "ready").count() == 8).then_some(())
    });
    set_grid(&url, "100kW", None);
    let set = |args: &[&str]| {
        let mut all = vec!["power", "set-domain"];
        all.extend_from_slice(args);
        let out = wattctl(&url, &all);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    for row in ["1", "2"] {
        set(&[&format!("row-{row}"), "--limit", "40kW", "--select", &format!("row={row}")]);
        for rack in ["a", "b"] {
            let parent = format!("row-{row}");
            set(&[
                &format!("rack-{row}{rack}"),
                "--limit",
                "10kW",
                "--select",
                &format!("rack={row}{rack}"),
                "--parent",
                &parent,
            ]);
        }
    }
    // Bad input names the field and changes nothing.
    let orphan = wattctl(&url, &["power", "set-domain", "x", "--limit", "1kW", "--select", "a=b", "--parent", "nope"]);
    assert!(!orphan.status.success() && String::from_utf8_lossy(&orphan.stderr).contains("domain.parent"));
    let busy = wattctl(&url, &["power", "remove-domain", "row-1"]);
    assert!(String::from_utf8_lossy(&busy.stderr).contains("has domains under it"), "{busy:?}");
    // Each node knows its place in the tree.
    let listed = wattctl_json(&url, &["nodes"]);
    let node = listed.as_array().unwrap().iter().find(|n| n["name"] == "dom-2b-1").unwrap();
    assert_eq!(node["domains"], serde_json::json!(["row-2", "rack-2b"]), "{node}");

    for i in 0..8 {
        let manifest = format!(
            "name: job-{i}\nshards: {{min: 1, max: 1}}\ngpus_per_shard: 2\nflex: 0.3\ncommand: {IDLE_COMMAND}\n"
        );
        assert!(submit(&url, &manifest).status.success());
    }
    wait_for(Duration::from_secs(30), "8 jobs at full power", || {
        let caps = caps_by_node(&url);
        (caps.len() == 8 && caps.values().all(|&c| c == 700.0)).then_some(())
    });

    // Rack 1a's breaker derated to 2 kW: its 4 GPUs at 500 W at most.
    set(&["rack-1a", "--limit", "2kW", "--select", "rack=1a", "--parent", "row-1"]);
    let caps = wait_for(Duration::from_secs(10), "rack 1a's caps acknowledged", || {
        let s = status(&url);
        let caps = caps_by_node(&url);
        let rack = domain(&s, "rack-1a");
        (f(rack, "counted_watts") <= 2_000.0 + 1e-6 && s["unacknowledged_nodes"] == 0).then_some(caps)
    });
    for (node, cap) in &caps {
        if node.starts_with("dom-1a") {
            assert!(*cap <= 500.0 + 1e-6, "{node} in rack 1a: {cap} W");
        } else {
            assert_eq!(*cap, 700.0, "{node} elsewhere runs on at full power");
        }
    }
    // The meter judges: after the settle time the rack's measured draw is under its limit.
    idle(Duration::from_secs(3));
    let s = status(&url);
    let rack = domain(&s, "rack-1a");
    eprintln!("rack-1a: {rack}");
    // Its 4 GPUs train under their caps: near the limit, not over it.
    assert!((1_000.0..=2_000.0).contains(&f(rack, "measured_watts")), "{rack}");
    let metrics = controller.metrics();
    assert!(
        metrics.lines().any(
            |l| l == "watt_power_domain_watts{domain=\"rack-1a\",level=\"2\",parent=\"row-1\",what=\"limit\"} 2000"
        ),
        "{metrics}"
    );
    assert_eq!((rack["nodes"].as_u64(), rack["gpus"].as_u64()), (Some(2), Some(4)));
    assert_eq!(s["budget_violations"], 0, "{s}");
    let tree = String::from_utf8(wattctl(&url, &["power", "domains"]).stdout).unwrap();
    assert!(tree.contains("    rack-1a") && tree.contains("  row-1"), "{tree}");

    // Restored: its jobs rise again.
    set(&["rack-1a", "--limit", "10kW", "--select", "rack=1a", "--parent", "row-1"]);
    wait_for(Duration::from_secs(10), "full power again", || {
        caps_by_node(&url).values().all(|&c| c == 700.0).then_some(())
    });
    // A generator feeding row 2 alone: row 2 draws no more than it gives (less the reserve),
    // 2.85 kW for its 8 GPUs; row 1 runs on at full power.
    let out = wattctl(
        &url,
        &["power", "set-source", "gen-2", "--kind", "generator", "--available", "3kW", "--domain", "row-2"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let caps = wait_for(Duration::from_secs(10), "row 2 under its generator", || {
        let s = status(&url);
        let row = domain(&s, "row-2");
        (f(row, "effective_limit_watts") == 2_850.0
            && f(row, "counted_watts") <= 2_850.0 + 1e-6
            && s["unacknowledged_nodes"] == 0)
            .then(|| caps_by_node(&url))
    });
    for (node, cap) in &caps {
        // Within a watt of the row's limit (the allocator's slack), a GPU's share of it.
        let want = if node.starts_with("dom-2") { 2_850.0 / 8.0 } else { 700.0 };
        assert!((cap - want).abs() < 0.2, "{node}: {cap} W, want {want} W");
    }
    let tree = String::from_utf8(wattctl(&url, &["power", "domains"]).stdout).unwrap();
    assert!(tree.contains("(fed 2.9 kW)"), "{tree}");
    assert!(wattctl(&url, &["power", "remove-source", "gen-2"]).status.success());
    wait_for(Duration::from_secs(10), "full power again", || {
        caps_by_node(&url).values().all(|&c| c == 700.0).then_some(())
    });
    // The tree is durable: a controller restarted on the same store has it.
    drop(controller);
    let controller = ControllerProc::start(&store, 0, &["--reconcile-interval", "200ms"]);
    wait_for(Duration::from_secs(10), "the tree loaded from the store", || {
        (status(&controller.url)["domains"].as_array().unwrap().len() == 6).then_some(())
    });
}
