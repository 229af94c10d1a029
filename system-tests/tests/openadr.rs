//! Grid events end to end, against the real OpenADR 3 reference VTN (`openleadr-vtn`) on
//! Debian's PostgreSQL: the controller is the VEN of a program; the utility (the test, with the
//! OpenADR client crate as business logic) sends an event cutting the site's import capacity by
//! 25% starting in a few seconds for 30 s. Every cap is acknowledged within a second of the
//! event's start, restored after its end along the grid's ramp, and the usage report is at the
//! VTN. Bad events are ignored and counted; a VTN that cannot be reached leaves the known
//! schedule in force until it ends.
// Real processes on the real clock.
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::time::{Duration, Instant};

use chrono::Utc;
use openleadr_client::{BusinessLogic, Client, ClientCredentials, ProgramClient};
use openleadr_wire::event::{EventInterval, EventPayloadDescriptor, EventType, EventValuesMap};
use openleadr_wire::interval::IntervalPeriod;
use openleadr_wire::values_map::Value;
use serde_json::Value as Json;
use watt_system_tests::vtn::{Vtn, BL_CLIENT, VEN_CLIENT, VEN_MQTT};
use watt_system_tests::*;

fn f(v: &Json, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}

fn status(url: &str) -> Json {
    wattctl_json(url, &["power", "status"])
}

fn caps(status: &Json) -> Vec<f64> {
    status["jobs"].as_array().unwrap().iter().map(|j| f(j, "cap_watts")).collect()
}

fn metric(controller: &ControllerProc, name: &str) -> f64 {
    samples(&controller.metrics(), name).iter().map(|(_, v)| v).sum()
}

fn duration(iso: &str) -> openleadr_wire::Duration {
    serde_json::from_value(serde_json::json!(iso)).unwrap()
}

/// An event of `program` with one payload per interval, the intervals one after another from
/// `start`, each `each` long.
fn event(
    program: &ProgramClient<BusinessLogic>,
    name: &str,
    start: chrono::DateTime<Utc>,
    each: &str,
    payloads: Vec<(EventType, Value)>,
) -> openleadr_wire::event::EventRequest {
    let intervals = payloads
        .into_iter()
        .enumerate()
        .map(|(i, (kind, value))| EventInterval {
            id: i as i32,
            interval_period: None,
            payloads: vec![EventValuesMap { value_type: kind, values: vec![value] }],
        })
        .collect();
    let mut request = program.new_event(intervals);
    request.event_name = Some(name.into());
    request.interval_period = Some(IntervalPeriod { start, duration: Some(duration(each)), randomize_start: None });
    request.payload_descriptors = Some(vec![EventPayloadDescriptor {
        units: Some(openleadr_wire::Unit::KW),
        ..EventPayloadDescriptor::new(EventType::ImportCapacityLimit)
    }]);
    request
}

/// The VEN's report on `event` at the VTN that mentions `needle`, read as the utility.
fn watts_report(
    rt: &tokio::runtime::Runtime,
    utility: &Client<BusinessLogic>,
    event: &openleadr_wire::event::EventId,
    needle: &str,
) -> Option<Json> {
    let event = rt.block_on(utility.get_event_by_id(event)).ok()?;
    let reports = rt.block_on(event.get_report_list(Some("watt"))).ok()?;
    reports.into_iter().map(|r| serde_json::to_value(r.content()).unwrap()).find(|r| r.to_string().contains(needle))
}

fn events_text(url: &str) -> String {
    String::from_utf8(wattctl(url, &["events"]).stdout).unwrap()
}

/// The utility's side: the VTN, its business-logic client and one program.
struct Utility {
    rt: tokio::runtime::Runtime,
    vtn: Vtn,
    client: Client<BusinessLogic>,
    program: ProgramClient<BusinessLogic>,
}

impl Utility {
    fn start(program: &str) -> Utility {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let vtn = Vtn::start();
        let client = Client::<BusinessLogic>::with_url(
            vtn.url.parse().unwrap(),
            Some(ClientCredentials::new(BL_CLIENT.0.into(), BL_CLIENT.1.into())),
        );
        let request = openleadr_wire::program::ProgramRequest::new(program);
        let program = rt.block_on(client.create_program(request)).unwrap();
        Utility { rt, vtn, client, program }
    }
}

/// A site enrolled in `program`: a controller as its VEN (`extra` flags after the VTN's), `nodes`
/// agents of 2 GPUs, each running one job of 2 GPUs at full power under `grid` from the grid
/// (taken up again at 1 kW/s).
fn site(
    utility: &Utility,
    dir: &std::path::Path,
    program: &str,
    extra: &[&str],
    nodes: usize,
    grid: &str,
) -> (ControllerProc, Vec<Proc>) {
    let secret = dir.join("ven-secret");
    std::fs::write(&secret, format!("{}\n", VEN_CLIENT.1)).unwrap();
    let store = format!("file:{}", dir.join("w.redb").display());
    let vtn_flags = [
        "--openadr-vtn",
        &utility.vtn.url,
        "--openadr-client-id",
        VEN_CLIENT.0,
        "--openadr-secret-file",
        secret.to_str().unwrap(),
        "--openadr-programs",
        program,
    ];
    let controller = ControllerProc::start(&store, 0, &[&vtn_flags[..], extra].concat());
    let url = controller.url.clone();
    let agents: Vec<Proc> =
        (0..nodes).map(|i| agent_with(&url, &format!("adr-{i}"), 2, &["--labels", &format!("rack=r{i}")])).collect();
    wait_for(Duration::from_secs(30), "the nodes ready", || {
        let listed = wattctl_json(&url, &["nodes"]);
        (listed.as_array().unwrap().iter().filter(|n| n["state"] == "ready").count() == nodes).then_some(())
    });
    set_grid(&url, grid, Some("1kW/s"));
    for i in 0..nodes {
        let manifest = format!(
            "name: job-{i}\nshards: {{min: 1, max: 1}}\ngpus_per_shard: 2\nflex: 0.5\ncommand: {IDLE_COMMAND}\n"
        );
        assert!(submit(&url, &manifest).status.success());
    }
    wait_for(Duration::from_secs(30), "every job at full power, the grid ramped up", || {
        let s = status(&url);
        let caps = caps(&s);
        (caps.len() == nodes && caps.iter().all(|&c| c == 700.0) && f(&s, "available_watts") == parse_watts(grid))
            .then_some(())
    });
    // The controller registered itself as a VEN.
    wait_for(Duration::from_secs(10), "the VEN known to the VTN", || {
        utility.rt.block_on(utility.client.get_ven_by_name("watt")).ok()
    });
    (controller, agents)
}

fn parse_watts(text: &str) -> f64 {
    text.strip_suffix("kW").unwrap().parse::<f64>().unwrap() * 1_000.0
}

#[test]
fn a_grid_event_cuts_the_import_within_a_second_restores_along_the_ramp_and_is_reported() {
    let utility = Utility::start("watt-dr");
    let dir = tempfile::tempdir().unwrap();
    // 6 kW from the grid; 8 GPUs at 700 W fit in it.
    let (controller, _agents) =
        site(&utility, dir.path(), "watt-dr", &["--reconcile-interval", "1s", "--openadr-poll", "1s"], 4, "6kW");
    let url = controller.url.clone();
    let Utility { rt, mut vtn, client: utility, program } = utility;

    // Bad events first: each ignored with its reason, counted once, never a limit.
    let now = Utc::now();
    let price = event(&program, "price", now, "PT1H", vec![(EventType::Price, Value::Number(0.31))]);
    let mut overlapping = event(
        &program,
        "overlap",
        now + chrono::Duration::seconds(60),
        "PT1M",
        vec![(EventType::ImportCapacityLimit, Value::Number(1.0))],
    );
    let second = EventInterval {
        id: 1,
        interval_period: Some(IntervalPeriod {
            start: now + chrono::Duration::seconds(90),
            duration: Some(duration("PT1M")),
            randomize_start: None,
        }),
        payloads: vec![EventValuesMap { value_type: EventType::ImportCapacityLimit, values: vec![Value::Number(0.5)] }],
    };
    overlapping.intervals.as_mut().unwrap().push(second);
    let past = event(
        &program,
        "past",
        now - chrono::Duration::hours(2),
        "PT1H",
        vec![(EventType::ImportCapacityLimit, Value::Number(0.1))],
    );
    for bad in [price, overlapping, past] {
        rt.block_on(program.create_event(bad)).unwrap();
    }
    wait_for(Duration::from_secs(10), "the bad events counted", || {
        let text = controller.metrics();
        let ignored = samples(&text, "watt_openadr_ignored_events_total");
        let count = |reason: &str| ignored.iter().filter(|(l, _)| l.contains(reason)).map(|(_, v)| v).sum::<f64>();
        (count("unsupported-payloads") == 1.0 && count("overlapping-intervals") == 1.0 && count("\"ended\"") == 1.0)
            .then_some(())
    });
    let s = status(&url);
    assert_eq!(f(&s, "available_watts"), 6_000.0, "no bad event sets a limit: {s}");
    assert!(events_text(&url).contains("grid-event-ignored"));

    // The event: import capacity 25% lower, 4.5 kW, from 4 s from now for 30 s.
    let before =
        samples(&controller.metrics(), "watt_power_event_to_ack_seconds_count").iter().map(|(_, v)| v).sum::<f64>();
    let start = Utc::now() + chrono::Duration::seconds(4);
    let cut = event(&program, "peak", start, "PT30S", vec![(EventType::ImportCapacityLimit, Value::Number(4.5))]);
    let created = rt.block_on(program.create_event(cut)).unwrap();
    wait_for(Duration::from_secs(4), "the event scheduled before its start", || {
        events_text(&url).contains("grid-event-scheduled").then_some(())
    });
    assert!(Utc::now() < start, "scheduled only after its start");
    assert_eq!(caps(&status(&url)), vec![700.0; 4], "nothing moves before the start");
    // Every cap lowered and acknowledged within a second of the start.
    let start_instant = Instant::now() + (start - Utc::now()).to_std().unwrap();
    let limit = 4_500.0 * 0.95;
    let (seen, s) = wait_for(Duration::from_secs(10), "the cut's caps acknowledged", || {
        let s = status(&url);
        let done = f(&s, "available_watts") == 4_500.0
            && f(&s, "counted_watts") <= limit + 1e-6
            && s["unacknowledged_nodes"] == 0
            && caps(&s).iter().all(|&c| c < 700.0);
        done.then(|| (Instant::now(), s))
    });
    let after_start = seen.saturating_duration_since(start_instant);
    eprintln!("caps {:?} acknowledged; seen {:.3} s after the start", caps(&s), after_start.as_secs_f64());
    // Seen by polling wattctl, which itself takes a moment: the controller's own timing is exact.
    assert!(after_start < Duration::from_millis(1_500), "{after_start:?}");
    idle(Duration::from_secs(1));
    let text = controller.metrics();
    let count = samples(&text, "watt_power_event_to_ack_seconds_count").iter().map(|(_, v)| v).sum::<f64>();
    let within_1s = samples(&text, "watt_power_event_to_ack_seconds_bucket")
        .iter()
        .filter(|(labels, _)| labels.contains("le=\"1\""))
        .map(|(_, v)| *v)
        .sum::<f64>();
    let sum = metric(&controller, "watt_power_event_to_ack_seconds_sum");
    eprintln!("power events acknowledged: {count} (before the cut {before}), within 1 s: {within_1s}, sum {sum:.3} s");
    assert!(count > before, "the event's start was a power event");
    assert_eq!(within_1s, count, "every power event acknowledged within 1 s");
    assert_eq!(metric(&controller, "watt_grid_windows_in_force"), 1.0);
    let shown = String::from_utf8(wattctl(&url, &["power", "status"]).stdout).unwrap();
    eprintln!("{shown}");
    assert!(shown.contains("as VEN watt: reachable") && shown.contains("peak#0"), "{shown}");
    assert!(shown.contains("site import") && shown.contains("4.5 kW") && shown.contains("IN FORCE"), "{shown}");
    assert!(text.contains("watt_grid_limit_watts{target=\"site\"} 4500"), "{text}");

    // The meter judges: measured draw under the limit once settled.
    idle(Duration::from_secs(3));
    let s = status(&url);
    assert!(f(&s, "measured_watts") <= limit, "{s}");
    assert_eq!(s["budget_violations"], 0);
    assert_eq!(s["measured_violations"], 0);

    // The end: the import lifts along the grid's ramp (1 kW/s), not in one step.
    let end_instant = start_instant + Duration::from_secs(30);
    idle(end_instant.saturating_duration_since(Instant::now()));
    let mut lifting = Vec::new();
    let restored = wait_for(Duration::from_secs(15), "full power again", || {
        let s = status(&url);
        let available = f(&s, "available_watts");
        if available > 4_500.0 && available < 6_000.0 {
            lifting.push(available);
        }
        (available == 6_000.0 && caps(&s).iter().all(|&c| c == 700.0) && s["unacknowledged_nodes"] == 0)
            .then_some(available)
    });
    eprintln!("import while lifting: {lifting:?}; restored at {restored} W");
    assert!(!lifting.is_empty(), "the import stepped back at once");
    assert_eq!(restored, 6_000.0);

    // The report of the interval at the VTN: what the site drew, and that it was curtailed.
    let report = wait_for(Duration::from_secs(10), "the interval's report at the VTN", || {
        watts_report(&rt, &utility, created.id(), "USAGE")
    });
    eprintln!("report: {report}");
    let payloads = report["resources"][0]["intervals"][0]["payloads"].as_array().unwrap().clone();
    let value = |kind: &str| payloads.iter().find(|p| p["type"] == kind).map(|p| p["values"][0].clone());
    let kwh = value("USAGE").and_then(|v| v.as_f64()).unwrap();
    let kw = value("DEMAND").and_then(|v| v.as_f64()).unwrap();
    assert!(kwh > 0.0 && kw > 0.0 && kw <= limit / 1000.0, "usage {kwh} kWh, demand {kw} kW");
    assert_eq!(value("OPERATING_STATE"), Some(Json::String("RUNNING_CURTAILED".into())));

    // A VTN out of reach: the event in force holds until its end, then the sources' limit again.
    let start = Utc::now() + chrono::Duration::seconds(3);
    let cut = event(&program, "peak-2", start, "PT10S", vec![(EventType::ImportCapacityLimit, Value::Number(5.0))]);
    rt.block_on(program.create_event(cut)).unwrap();
    wait_for(Duration::from_secs(8), "the second event in force", || {
        (f(&status(&url), "available_watts") == 5_000.0).then_some(())
    });
    vtn.stop();
    wait_for(Duration::from_secs(15), "the VTN seen unreachable", || {
        let up = samples(&controller.metrics(), "watt_openadr_vtn_up");
        (up.len() == 1 && up[0].1 == 0.0 && up[0].0.contains(&vtn.url)).then_some(())
    });
    let shown = String::from_utf8(wattctl(&url, &["power", "status"]).stdout).unwrap();
    assert!(shown.contains("UNREACHABLE") && shown.contains("the known schedule holds"), "{shown}");
    let end = start + chrono::Duration::seconds(10);
    if Utc::now() < end - chrono::Duration::milliseconds(500) {
        assert_eq!(f(&status(&url), "available_watts"), 5_000.0, "the known schedule holds");
    }
    wait_for(Duration::from_secs(15), "the sources' limit again after its end", || {
        (f(&status(&url), "available_watts") == 6_000.0).then_some(())
    });
    assert!(events_text(&url).contains("vtn-unreachable"));
    vtn.restart();
    wait_for(Duration::from_secs(15), "the VTN read again", || {
        (metric(&controller, "watt_openadr_vtn_up") == 1.0).then_some(())
    });

    // An event the cluster cannot meet (0.5 kW, below its 0.8 kW floor): Watt opts out at once,
    // saying why, and still does what it can.
    let start = Utc::now() + chrono::Duration::seconds(2);
    let impossible =
        event(&program, "blackout", start, "PT6S", vec![(EventType::ImportCapacityLimit, Value::Number(0.5))]);
    let created = rt.block_on(program.create_event(impossible)).unwrap();
    let opt_out = wait_for(Duration::from_secs(20), "the opt-out at the VTN", || {
        watts_report(&rt, &utility, created.id(), "RUNNING_OPTED_OUT")
    });
    eprintln!("opt-out: {opt_out}");
    assert!(opt_out.to_string().contains("below the least the cluster can draw"), "{opt_out}");
    assert!(events_text(&url).contains("grid-event-opted-out"));
}

#[test]
fn notifications_bring_an_event_of_now_at_once_a_racks_unmeetable_event_is_opted_out_and_polling_outlives_the_broker() {
    let utility = Utility::start("watt-now");
    let dir = tempfile::tempdir().unwrap();
    // A poll once a minute: an event seen within seconds was seen through a notification.
    let password_file = utility.vtn.ven_mqtt_password_file.to_str().unwrap().to_string();
    let login = ["--openadr-mqtt-username", VEN_MQTT.0, "--openadr-mqtt-password-file", &password_file];
    let (controller, _agents) =
        site(&utility, dir.path(), "watt-now", &[&["--openadr-poll", "60s"][..], &login].concat(), 2, "3kW");
    let url = controller.url.clone();
    let Utility { rt, mut vtn, client: utility, program } = utility;
    let s = wait_for(Duration::from_secs(30), "subscribed to the VTN's notifications", || {
        let s = status(&url);
        (s["grid_link"]["notifier"] == "subscribed").then_some(s)
    });
    assert_eq!(s["grid_link"]["notifier_url"], vtn.mqtt_url, "the broker the VTN names: {s}");
    assert_eq!(metric(&controller, "watt_openadr_notifier_up"), 1.0);

    // An event of "now": 2 kW of import for 30 s, sent a moment after it started.
    let sent = Instant::now();
    let cut = event(&program, "now", Utc::now(), "PT30S", vec![(EventType::ImportCapacityLimit, Value::Number(2.0))]);
    rt.block_on(program.create_event(cut)).unwrap();
    let seen = wait_for(Duration::from_secs(20), "the cut's caps acknowledged", || {
        let s = status(&url);
        let done = f(&s, "available_watts") == 2_000.0
            && f(&s, "counted_watts") <= 2_000.0 * 0.95 + 1e-6
            && s["unacknowledged_nodes"] == 0
            && caps(&s).iter().all(|&c| c < 700.0);
        done.then(|| sent.elapsed())
    });
    println!("an event of now: every cap acknowledged {:.3} s after it was sent (poll: 60 s)", seen.as_secs_f64());
    assert!(seen < Duration::from_secs(5), "through a notification, not the minute's poll: {seen:?}");
    assert!(metric(&controller, "watt_openadr_notifications_total") >= 1.0);
    let text = String::from_utf8(wattctl(&url, &["power", "status"]).stdout).unwrap();
    assert!(text.contains(&format!("notified at once over MQTT {}", vtn.mqtt_url)), "{text}");

    // An event for one power domain: the utility gives the VEN the domain's name as a target
    // (the VTN shows a targeted event only to VENs with that target). 50 W for a rack whose two
    // idle GPUs alone count 200 W cannot be met: its job pauses, the other runs on, and Watt
    // opts out, saying why.
    let mut ven = rt.block_on(utility.get_ven_by_name("watt")).unwrap();
    ven.content_mut().targets = vec!["rack-0".parse().unwrap()];
    rt.block_on(ven.update()).unwrap();
    let set = wattctl(&url, &["power", "set-domain", "rack-0", "--limit", "2kW", "--select", "rack=r0"]);
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    let mut rack =
        event(&program, "rack", Utc::now(), "PT30S", vec![(EventType::ImportCapacityLimit, Value::Number(0.05))]);
    rack.targets = vec!["rack-0".parse().unwrap()];
    let rack = rt.block_on(program.create_event(rack)).unwrap();
    let opt_out = wait_for(Duration::from_secs(20), "the rack's opt-out at the VTN", || {
        watts_report(&rt, &utility, rack.id(), "power domain rack-0")
    });
    assert!(opt_out.to_string().contains("RUNNING_OPTED_OUT"), "{opt_out}");
    let s = status(&url);
    let windows = s["grid_windows"].as_array().unwrap();
    assert!(windows.iter().any(|w| w["domain"] == "rack-0"), "a window on the rack alone: {s}");
    let states: Vec<Json> = ["job-0", "job-1"].iter().map(|j| jobs(&url)[*j]["state"].clone()).collect();
    assert!(states.contains(&Json::from("running")), "the job outside the rack runs on: {states:?}");

    // The broker gone: the status says notifications fail, and the VTN is still read.
    vtn.stop_broker();
    let s = wait_for(Duration::from_secs(30), "the notifier failing", || {
        let s = status(&url);
        (s["grid_link"]["notifier"] == "failed").then_some(s)
    });
    assert_eq!(s["grid_link"]["reachable"], true, "{s}");
    assert_eq!(metric(&controller, "watt_openadr_notifier_up"), 0.0);
    let text = String::from_utf8(wattctl(&url, &["power", "status"]).stdout).unwrap();
    assert!(text.contains("notifications FAILING") && text.contains("read every poll"), "{text}");
}
