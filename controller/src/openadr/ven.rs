//! The VEN: the leader reads its VTN every `--openadr-poll` with the OpenADR 3 client crate
//! (`openleadr-client`), and at once when the VTN notifies it ([`super::notify`]), and
//!
//! - registers itself by name, once a term, if the VTN does not know it yet;
//! - turns the events of the enrolled programs into the grid's schedule and puts it in the power
//!   table whenever it changes (a window added is a tightening, in force at once; one dropped is
//!   stored first: invariant 10). A window's start and end need no read: the reconcile loop wakes
//!   at them ([`crate::power::grid`]), so a start is carried out like a source cut;
//! - reports, when an interval ends, what the site (or the domain) drew over it — `USAGE` in kWh,
//!   `DEMAND` in kW, `OPERATING_STATE` — and opts out of an interval it cannot meet (the limit is
//!   below what the cluster can draw at least), saying why, as soon as it knows;
//! - when the VTN cannot be reached, keeps the schedule it knows: each window still ends when
//!   it ends, and then the sources' own limits apply again. `watt_openadr_vtn_up` goes to 0 and
//!   the `WattVtnUnreachable` alert fires.
//!
//! An event ignored ([`super::events::Ignored`]) is logged, counted and shown once per version of
//! it; it never stops the others.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openleadr_client::{Client, ClientCredentials, Filter, VirtualEndNode};
use openleadr_wire::event::EventId;
use openleadr_wire::interval::{Interval, IntervalPeriod};
use openleadr_wire::report::{ReportPayloadDescriptor, ReportRequest, ReportResource, ReportType, ResourceName};
use openleadr_wire::values_map::{Value, ValueType, ValuesMap};
use openleadr_wire::ven::VenVenRequest;
use openleadr_wire::{OperatingState, Unit};

use super::events::{windows_of, Reading};
use crate::config::OpenAdrConfig;
use crate::power::grid::{GridLimit, GridSchedule, GridTarget, GridWindow};
use crate::power::table::PowerChange;
use crate::reconcile::{unix_ms, Controller};

/// Windows that ended are kept this long: their limits lift along the restore ramp, and their
/// reports may still be owed.
const KEEP_ENDED_MS: i64 = 10 * 60_000;
/// How often draw is sampled for the reports, and owed reports are sent.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// One read of the VTN that takes longer than this has failed.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the VEN keeps between reads, for one term.
#[derive(Debug, Default)]
struct VenState {
    registered: bool,
    /// When each event was first read: a start of "now" (0001-01-01) means then.
    first_read: HashMap<String, i64>,
    /// Events already counted as ignored, by id and modification time.
    ignored: BTreeSet<(String, i64)>,
    /// Programs named in `--openadr-programs` that the VTN does not have (warned once).
    missing_programs: BTreeSet<String>,
    reachable: Option<bool>,
    /// Per window (event, interval, target): draw over it so far, and what was reported.
    books: BTreeMap<(String, i32, String), Books>,
}

#[derive(Debug, Default, Clone)]
struct Books {
    joules: f64,
    seconds: f64,
    last_sample_ms: Option<i64>,
    opted_out: Option<String>,
    opt_out_sent: bool,
    reported: bool,
}

/// Run the VEN for this term until `stop`.
pub async fn run(controller: Arc<Controller>, config: OpenAdrConfig, stop: impl Future<Output = ()>) {
    let (client, http) = match connect(&config) {
        Ok(connected) => connected,
        Err(e) => {
            tracing::error!(error = %e, vtn = %config.vtn, "Cannot set up the OpenADR client; grid events will not be read.");
            return;
        }
    };
    let reading = Reading { ven_name: config.ven_name.clone(), simple_levels: config.simple_levels };
    let mut state = VenState::default();
    let mut poll = tokio::time::interval(config.poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sample = tokio::time::interval(SAMPLE_EVERY);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Notifications make a read happen at once; the poll is the fallback.
    let (notify, mut notified) = tokio::sync::mpsc::channel(1);
    let notifier = tokio::spawn(super::notify::run(controller.clone(), config.clone(), client.clone(), http, notify));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = poll.tick() => read(&controller, &client, &config, &reading, &mut state).await,
            Some(()) = notified.recv() => read(&controller, &client, &config, &reading, &mut state).await,
            _ = sample.tick() => account(&controller, &client, &config, &mut state).await,
            () = &mut stop => break,
        }
    }
    // Another controller leads now: its VEN speaks for the site.
    notifier.abort();
    controller.metrics.grid.notifier_up.set(0);
    let _ = controller.metrics.grid.vtn_up.remove_label_values(&[config.vtn.as_str()]);
    *controller.grid_link.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
}

fn connect(config: &OpenAdrConfig) -> Result<(Client<VirtualEndNode>, reqwest::Client), String> {
    let secret = std::fs::read_to_string(&config.secret_file)
        .map_err(|e| format!("cannot read --openadr-secret-file {}: {e}", config.secret_file.display()))?;
    let credentials = ClientCredentials::new(config.client_id.clone(), secret.trim().to_string());
    let mut http = reqwest::Client::builder().timeout(READ_TIMEOUT);
    if let Some(ca) = &config.ca {
        let pem = std::fs::read(ca).map_err(|e| format!("cannot read --openadr-ca {}: {e}", ca.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| format!("--openadr-ca {}: {e}", ca.display()))?;
        http = http.add_root_certificate(cert);
    }
    let http = http.build().map_err(|e| e.to_string())?;
    Ok((Client::with_details(config.vtn.clone(), config.token_url.clone(), http.clone(), Some(credentials)), http))
}

/// One read of the VTN: the programs, their events, the schedule they make.
async fn read(
    controller: &Controller,
    client: &Client<VirtualEndNode>,
    config: &OpenAdrConfig,
    reading: &Reading,
    state: &mut VenState,
) {
    let now = unix_ms();
    let events = match tokio::time::timeout(READ_TIMEOUT, fetch(client, config, state)).await {
        Ok(Ok(events)) => events,
        Ok(Err(e)) => return unreachable(controller, config, state, &e),
        Err(_) => return unreachable(controller, config, state, "no answer within 10 s"),
    };
    controller.metrics.grid.reads.with_label_values(&["ok"]).inc();
    controller.metrics.grid.vtn_up.with_label_values(&[config.vtn.as_str()]).set(1);
    if state.reachable == Some(false) {
        controller.emit("grid", &config.ven_name, "vtn-reachable", format!("the VTN {} answers again", config.vtn));
    }
    state.reachable = Some(true);
    link(controller, config, now, None);

    let (old, domains) = {
        let power = controller.power.lock().await;
        let domains: BTreeSet<String> = power.table.domains().map(|d| d.name.clone()).collect();
        (power.table.grid().clone(), domains)
    };
    let mut windows: Vec<GridWindow> = Vec::new();
    let mut listed = BTreeSet::new();
    for (program, event) in &events {
        let id = event.id.as_str().to_string();
        listed.insert(id.clone());
        // An event of "now" scheduled by an earlier term keeps the start it was given then.
        let scheduled = old.windows.iter().filter(|w| w.event == id).map(|w| w.start_unix_ms).min();
        let first_read = *state.first_read.entry(id.clone()).or_insert(scheduled.unwrap_or(now));
        match windows_of(event, program, reading, |d| domains.contains(d), now, first_read) {
            Ok(mut of_event) => windows.append(&mut of_event),
            Err(why) => {
                let version = (id.clone(), event.modification_date_time.timestamp_millis());
                if state.ignored.insert(version) {
                    controller.metrics.grid.ignored.with_label_values(&[why.label()]).inc();
                    let name = event.content.event_name.as_deref().unwrap_or("");
                    tracing::warn!(event = %id, name, program, reason = why.label(), "Ignoring an OpenADR event: {why}.");
                    controller.emit("grid", &id, "grid-event-ignored", format!("program {program}: {why}"));
                }
            }
        }
    }
    state.first_read.retain(|id, _| listed.contains(id));
    state.ignored.retain(|(id, _)| listed.contains(id));
    // Windows that ended lately stay (their limits lift along the ramp, their reports may be owed),
    // whether or not the VTN still lists their event.
    for w in &old.windows {
        let recent = w.end_unix_ms <= now && now - w.end_unix_ms < KEEP_ENDED_MS;
        if recent && !windows.iter().any(|n| same_window(n, w)) {
            windows.push(w.clone());
        }
    }
    windows.sort_by(|a, b| (a.start_unix_ms, &a.event, a.interval).cmp(&(b.start_unix_ms, &b.event, b.interval)));
    let next = GridSchedule { windows };
    let mut old_sorted = old.clone();
    old_sorted
        .windows
        .sort_by(|a, b| (a.start_unix_ms, &a.event, a.interval).cmp(&(b.start_unix_ms, &b.event, b.interval)));
    if next == old_sorted {
        return;
    }
    announce(controller, &old, &next, now);
    match controller.change_power(&PowerChange::SetGridSchedule(next)).await {
        Ok(_) => controller.reconcile_after_change().await,
        Err(e) => tracing::warn!(error = %e, "Cannot put the grid's schedule in force; trying again at the next read."),
    }
}

fn same_window(a: &GridWindow, b: &GridWindow) -> bool {
    a.event == b.event && a.interval == b.interval && a.target == b.target
}

/// Say what changed in the schedule: events new to it, and events gone from it before their end.
fn announce(controller: &Controller, old: &GridSchedule, next: &GridSchedule, now: i64) {
    let old_events: BTreeSet<&str> = old.windows.iter().map(|w| w.event.as_str()).collect();
    let next_events: BTreeSet<&str> = next.windows.iter().map(|w| w.event.as_str()).collect();
    for event in next_events.difference(&old_events) {
        let of_event: Vec<&GridWindow> = next.windows.iter().filter(|w| w.event == *event).collect();
        let text = describe(&of_event, now);
        controller.emit("grid", event, "grid-event-scheduled", text);
    }
    for event in old_events.difference(&next_events) {
        let ongoing = old.windows.iter().any(|w| w.event == *event && w.end_unix_ms > now);
        if ongoing {
            controller.emit(
                "grid",
                event,
                "grid-event-cancelled",
                "the VTN no longer lists it: its limits are lifted".into(),
            );
        }
    }
}

/// "program dr: the site at most 6.0 kW in 5 s for 30 s (2 intervals)".
fn describe(windows: &[&GridWindow], now: i64) -> String {
    let Some(first) = windows.iter().min_by_key(|w| w.start_unix_ms) else { return String::new() };
    let end = windows.iter().map(|w| w.end_unix_ms).max().unwrap_or(first.end_unix_ms);
    let target = match &first.target {
        GridTarget::Site => "the site's import".to_string(),
        GridTarget::Domain(d) => format!("domain {d}"),
    };
    let limit = match first.limit {
        GridLimit::Watts(w) => format!("at most {:.1} kW", w / 1000.0),
        GridLimit::Share(s) => format!("at most {:.0}% of the grid's supply", s * 100.0),
    };
    let starts = if first.start_unix_ms <= now {
        "now".to_string()
    } else {
        format!("in {:.0} s", (first.start_unix_ms - now) as f64 / 1000.0)
    };
    format!(
        "program {}: {target} {limit}, starting {starts}, for {:.0} s ({} interval(s))",
        first.program,
        (end - first.start_unix_ms) as f64 / 1000.0,
        windows.len()
    )
}

/// The VTN could not be read: keep the schedule, say so once, count it.
fn unreachable(controller: &Controller, config: &OpenAdrConfig, state: &mut VenState, error: &str) {
    controller.metrics.grid.reads.with_label_values(&["unreachable"]).inc();
    controller.metrics.grid.vtn_up.with_label_values(&[config.vtn.as_str()]).set(0);
    if state.reachable != Some(false) {
        tracing::warn!(vtn = %config.vtn, error, "Cannot read the OpenADR VTN; keeping the grid's schedule as known until it ends.");
        controller.emit(
            "grid",
            &config.ven_name,
            "vtn-unreachable",
            format!("cannot read the VTN {}: {error}; the known schedule holds until it ends", config.vtn),
        );
    }
    state.reachable = Some(false);
    link(controller, config, 0, Some(error));
}

/// A domain's window is judged once this long in force: by then its decreases are acknowledged.
const DOMAIN_SETTLE_MS: i64 = 5_000;

/// Why window `w`, in force, cannot be met, if it cannot: the site's limit below the least the
/// cluster can draw; a domain's below what its nodes still count once everything that can be
/// paused in it has been (the allocator keeps each domain within its limit while it can).
fn unmeetable(w: &GridWindow, status: &watt_proto::v1::PowerStatus, now: i64) -> Option<String> {
    match &w.target {
        GridTarget::Site => status.infeasible.then(|| {
            format!(
                "the limit is below the least the cluster can draw ({:.1} kW with every pausable job paused and every GPU at its floor)",
                status.floor_watts / 1000.0
            )
        }),
        GridTarget::Domain(name) => {
            let domain = status.domains.iter().find(|d| d.domain.as_ref().is_some_and(|x| &x.name == name))?;
            let over = domain.counted_watts > domain.effective_limit_watts + 1.0;
            (over && now - w.start_unix_ms >= DOMAIN_SETTLE_MS).then(|| {
                format!(
                    "power domain {name} still counts {:.2} kW with every job in it that can be paused paused, above its {:.2} kW limit",
                    domain.counted_watts / 1000.0,
                    domain.effective_limit_watts / 1000.0
                )
            })
        }
    }
}

/// What the power status shows of the VTN: reachable (read at `now`), or not and why.
fn link(controller: &Controller, config: &OpenAdrConfig, now: i64, error: Option<&str>) {
    let mut link = controller.grid_link.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let last_read_unix_ms = if error.is_none() { now } else { link.as_ref().map_or(0, |l| l.last_read_unix_ms) };
    // The notifier's fields are its own (see `super::notify`).
    let kept = link.take().unwrap_or_default();
    *link = Some(watt_proto::v1::GridLink {
        vtn: config.vtn.to_string(),
        ven_name: config.ven_name.clone(),
        reachable: error.is_none(),
        last_read_unix_ms,
        error: error.unwrap_or_default().to_string(),
        ..kept
    });
}

/// The enrolled programs' events, each with its program's name; registers the VEN if need be.
async fn fetch(
    client: &Client<VirtualEndNode>,
    config: &OpenAdrConfig,
    state: &mut VenState,
) -> Result<Vec<(String, openleadr_wire::Event)>, String> {
    if !state.registered {
        match client.get_ven_by_name(&config.ven_name).await {
            Ok(_) => {}
            Err(openleadr_client::Error::ObjectNotFound) => {
                let request = VenVenRequest { ven_name: config.ven_name.clone(), attributes: None };
                client.create_ven(request).await.map_err(|e| format!("registering VEN {}: {e}", config.ven_name))?;
                tracing::info!(ven = %config.ven_name, vtn = %config.vtn, "Registered with the OpenADR VTN.");
            }
            Err(e) => return Err(format!("looking up VEN {}: {e}", config.ven_name)),
        }
        state.registered = true;
    }
    let programs = client.get_program_list(Filter::none()).await.map_err(|e| format!("programs: {e}"))?;
    let mut events = Vec::new();
    for name in &config.programs {
        let Some(program) = programs.iter().find(|p| &p.content().program_name == name) else {
            if state.missing_programs.insert(name.clone()) {
                tracing::warn!(program = %name, "The VTN has no program of this name (--openadr-programs); its events cannot be read.");
            }
            continue;
        };
        state.missing_programs.remove(name);
        for event in program.get_event_list(Filter::none()).await.map_err(|e| format!("events of {name}: {e}"))? {
            events.push((name.clone(), event_of(&event)));
        }
    }
    Ok(events)
}

/// The event an [`openleadr_client::EventClient`] holds.
fn event_of(client: &openleadr_client::EventClient<VirtualEndNode>) -> openleadr_wire::Event {
    openleadr_wire::Event {
        id: client.id().clone(),
        created_date_time: client.created_date_time(),
        modification_date_time: client.modification_date_time(),
        content: client.content().clone(),
    }
}

/// Every second: draw over the windows in force into their books; opt out of what cannot be
/// met; report the intervals that ended.
async fn account(
    controller: &Controller,
    client: &Client<VirtualEndNode>,
    config: &OpenAdrConfig,
    state: &mut VenState,
) {
    let now = unix_ms();
    let schedule = controller.power.lock().await.table.grid().clone();
    show(controller, &schedule, now);
    if schedule.windows.is_empty() {
        state.books.clear();
        return;
    }
    let status = controller.power_status_now();
    for w in &schedule.windows {
        let key = (w.event.clone(), w.interval, target_name(&w.target));
        let books = state.books.entry(key).or_default();
        if w.in_force(now) {
            let drawn = match &w.target {
                GridTarget::Site => status.measured_watts,
                GridTarget::Domain(name) => status
                    .domains
                    .iter()
                    .find(|d| d.domain.as_ref().is_some_and(|x| &x.name == name))
                    .map_or(0.0, |d| d.measured_watts),
            };
            if let Some(last) = books.last_sample_ms {
                let seconds = (now - last).max(0) as f64 / 1000.0;
                books.joules += drawn * seconds;
                books.seconds += seconds;
            }
            books.last_sample_ms = Some(now);
            if books.opted_out.is_none() {
                books.opted_out = unmeetable(w, &status, now);
            }
        }
        if books.opted_out.is_some() && !books.opt_out_sent {
            let sent = send(client, config, w, books, Sent::OptOut).await;
            controller.metrics.grid.reports.with_label_values(&["opt-out", outcome(&sent)]).inc();
            if sent.is_ok() {
                books.opt_out_sent = true;
                let why = books.opted_out.clone().unwrap_or_default();
                controller.emit("grid", &w.event, "grid-event-opted-out", format!("interval {}: {why}", w.interval));
            }
        }
        if now >= w.end_unix_ms && !books.reported && books.seconds > 0.0 {
            let sent = send(client, config, w, books, Sent::Interval).await;
            controller.metrics.grid.reports.with_label_values(&["interval", outcome(&sent)]).inc();
            match sent {
                Ok(()) => books.reported = true,
                Err(e) => {
                    tracing::warn!(event = %w.event, interval = w.interval, error = %e, "Cannot send an interval's report; trying again.")
                }
            }
        }
    }
    let live: BTreeSet<(String, i32, String)> =
        schedule.windows.iter().map(|w| (w.event.clone(), w.interval, target_name(&w.target))).collect();
    state.books.retain(|k, _| live.contains(k));
}

/// The grid's metrics as of `now`.
fn show(controller: &Controller, schedule: &GridSchedule, now: i64) {
    let metrics = &controller.metrics.grid;
    metrics.windows_in_force.set(schedule.in_force(now).count() as i64);
    metrics.limit_watts.reset();
    let mut lowest: BTreeMap<String, f64> = BTreeMap::new();
    for w in schedule.in_force(now) {
        if let GridLimit::Watts(watts) = w.limit {
            let entry = lowest.entry(target_name(&w.target)).or_insert(f64::INFINITY);
            *entry = entry.min(watts);
        }
    }
    for (target, watts) in lowest {
        metrics.limit_watts.with_label_values(&[target.as_str()]).set(watts);
    }
}

fn target_name(target: &GridTarget) -> String {
    match target {
        GridTarget::Site => "site".into(),
        GridTarget::Domain(d) => d.clone(),
    }
}

fn outcome<T, E>(r: &Result<T, E>) -> &'static str {
    if r.is_ok() {
        "ok"
    } else {
        "failed"
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sent {
    /// What was drawn over an interval that ended.
    Interval,
    /// That the site cannot meet the interval, and why.
    OptOut,
}

/// Send one report on window `w` to the VTN.
async fn send(
    client: &Client<VirtualEndNode>,
    config: &OpenAdrConfig,
    w: &GridWindow,
    books: &Books,
    what: Sent,
) -> Result<(), String> {
    let event_id: EventId = w.event.parse().map_err(|e| format!("event id {:?}: {e:?}", w.event))?;
    let event = client.get_event_by_id(&event_id).await.map_err(|e| e.to_string())?;
    // Once opted out, every report on the window says so.
    let state =
        if books.opted_out.is_some() { OperatingState::RunningOptedOut } else { OperatingState::RunningCurtailed };
    let state = serde_json::to_value(&state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    let mut payloads =
        vec![ValuesMap { value_type: ValueType("OPERATING_STATE".into()), values: vec![Value::String(state)] }];
    let mut descriptors = vec![ReportPayloadDescriptor::new(ReportType::OperatingState)];
    if what == Sent::Interval {
        let kwh = books.joules / 3.6e6;
        let kw = if books.seconds > 0.0 { books.joules / books.seconds / 1000.0 } else { 0.0 };
        payloads.push(ValuesMap { value_type: ValueType("USAGE".into()), values: vec![Value::Number(kwh)] });
        payloads.push(ValuesMap { value_type: ValueType("DEMAND".into()), values: vec![Value::Number(kw)] });
        descriptors.push(ReportPayloadDescriptor {
            units: Some(Unit::KWH),
            ..ReportPayloadDescriptor::new(ReportType::Usage)
        });
        descriptors.push(ReportPayloadDescriptor {
            units: Some(Unit::KW),
            ..ReportPayloadDescriptor::new(ReportType::Demand)
        });
    }
    if let Some(why) = &books.opted_out {
        payloads.push(ValuesMap {
            value_type: ValueType("X_WATT_OPT_OUT_REASON".into()),
            values: vec![Value::String(why.clone())],
        });
    }
    let period = IntervalPeriod {
        start: chrono::DateTime::from_timestamp_millis(w.start_unix_ms).unwrap_or_default(),
        duration: serde_json::from_value(serde_json::json!(format!(
            "PT{}S",
            ((w.end_unix_ms - w.start_unix_ms).max(0) as f64 / 1000.0).round()
        )))
        .ok(),
        randomize_start: None,
    };
    let kind = if what == Sent::Interval { "usage" } else { "opt-out" };
    let report = ReportRequest {
        event_id: event_id.clone(),
        client_name: config.ven_name.clone(),
        report_name: Some(format!("watt-{kind}-{}-{}", w.event, w.interval)),
        payload_descriptors: Some(descriptors),
        resources: vec![ReportResource {
            resource_name: match &w.target {
                GridTarget::Site => ResourceName::AggregatedReport,
                GridTarget::Domain(d) => ResourceName::Private(d.clone()),
            },
            interval_period: None,
            intervals: vec![Interval { id: w.interval, interval_period: Some(period), payloads }],
        }],
    };
    event.create_report(report).await.map(|_| ()).map_err(|e| e.to_string())
}
