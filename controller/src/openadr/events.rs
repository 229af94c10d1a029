//! From a VTN's event to the grid's windows ([`crate::power::grid`]): which payloads limit power
//! and by how much, over which intervals, on the site or a named power domain. Pure: the VEN
//! ([`super::ven`]) reads the events, this says what they mean, or why one is ignored.
//!
//! - `IMPORT_CAPACITY_LIMIT` and `DISPATCH_SETPOINT`: at most the value (kW unless the event's
//!   payload descriptor names `W` or `MW`). Watt can hold draw under a setpoint, not raise it to
//!   one, so a setpoint is a limit too.
//! - `SIMPLE` levels 0–3: a configured share of the grid's supply for each level.
//! - Intervals follow one another from the event's `intervalPeriod` unless they carry their own;
//!   a start of `0001-01-01` means "now" (when the VEN first read the event); `randomizeStart`
//!   delays each start by the same fraction of it for this VEN and event, every time it is read.
//! - A target naming a power domain limits that domain; any other target, or none, the site.
//!
//! What cannot be read safely — no interval, no period, a value that is not a non-negative
//! number, overlapping intervals, an event entirely in the past, only payloads Watt does not act
//! on — is ignored with an [`Ignored`] reason, never guessed at.

use std::hash::{Hash, Hasher};

use chrono::{DateTime, Datelike, Utc};
use openleadr_wire::event::{EventType, EventValuesMap};
use openleadr_wire::values_map::Value;
use openleadr_wire::{Event, Unit};

use crate::power::grid::{GridLimit, GridTarget, GridWindow};

/// An interval that runs "until the event is deleted" (`P9999Y`) ends this far out.
const OPEN_ENDED_MS: i64 = 10 * 365 * 24 * 3_600_000;

/// How the VEN reads events: its name (for `randomizeStart`) and the `SIMPLE` levels' shares.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub ven_name: String,
    /// The share (0–1) of the grid's supply each `SIMPLE` level 0–3 leaves.
    pub simple_levels: [f64; 4],
}

/// Why an event sets no window. Each is logged and counted by its label.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Ignored {
    #[error("it has no intervals")]
    NoIntervals,
    #[error("interval {interval} has no start: neither it nor the event has an intervalPeriod")]
    NoPeriod { interval: i32 },
    #[error("interval {interval} has no duration, and neither has the event")]
    NoDuration { interval: i32 },
    #[error("interval {interval}: {payload} must be one non-negative number, got {got}")]
    BadValue { interval: i32, payload: String, got: String },
    #[error("interval {interval}: SIMPLE level must be 0, 1, 2 or 3, got {got}")]
    BadLevel { interval: i32, got: String },
    #[error("the payload descriptor's units {units} are not power (kW, W or MW)")]
    BadUnits { units: String },
    #[error("intervals {first} and {second} overlap")]
    OverlappingIntervals { first: i32, second: i32 },
    #[error("it was sent when it was already over")]
    Ended,
    #[error("none of its payloads limits power (it carries {types})")]
    UnsupportedPayloads { types: String },
}

impl Ignored {
    /// A bounded label for the metric of ignored events.
    pub fn label(&self) -> &'static str {
        match self {
            Ignored::NoIntervals => "no-intervals",
            Ignored::NoPeriod { .. } => "no-period",
            Ignored::NoDuration { .. } => "no-duration",
            Ignored::BadValue { .. } => "bad-value",
            Ignored::BadLevel { .. } => "bad-level",
            Ignored::BadUnits { .. } => "bad-units",
            Ignored::OverlappingIntervals { .. } => "overlapping-intervals",
            Ignored::Ended => "ended",
            Ignored::UnsupportedPayloads { .. } => "unsupported-payloads",
        }
    }
}

/// What one of an event's payloads asks of power.
enum Ask {
    Watts(f64),
    Level(usize),
}

/// The windows `event` of `program` sets, read at `now` and first read at `first_read`, with
/// `domain_exists` saying which targets name a power domain.
pub fn windows_of(
    event: &Event,
    program: &str,
    reading: &Reading,
    domain_exists: impl Fn(&str) -> bool,
    now_unix_ms: i64,
    first_read_unix_ms: i64,
) -> Result<Vec<GridWindow>, Ignored> {
    let content = &event.content;
    let intervals = content.intervals.as_deref().unwrap_or_default();
    if intervals.is_empty() {
        return Err(Ignored::NoIntervals);
    }
    let watts_per_unit = watts_per_unit(event)?;
    let domains: Vec<GridTarget> = content
        .targets
        .iter()
        .filter(|t| domain_exists(t.as_str()))
        .map(|t| GridTarget::Domain(t.as_str().to_string()))
        .collect();
    let targets = if domains.is_empty() { vec![GridTarget::Site] } else { domains };

    let mut spans = Vec::with_capacity(intervals.len());
    let mut next_start: Option<i64> = None;
    let mut asked_anything = false;
    for interval in intervals {
        let id = interval.id;
        let period = interval.interval_period.as_ref().or(content.interval_period.as_ref());
        let start = match (&interval.interval_period, next_start) {
            (Some(own), _) => at(own.start, first_read_unix_ms),
            (None, Some(after_previous)) => after_previous,
            (None, None) => at(period.ok_or(Ignored::NoPeriod { interval: id })?.start, first_read_unix_ms),
        };
        let period = period.ok_or(Ignored::NoPeriod { interval: id })?;
        let start_time = DateTime::<Utc>::from_timestamp_millis(start).unwrap_or_default();
        let length = period.duration.as_ref().ok_or(Ignored::NoDuration { interval: id })?;
        let length_ms = length.to_chrono_at_datetime(start_time).num_milliseconds().clamp(0, OPEN_ENDED_MS);
        let end = start.saturating_add(length_ms);
        next_start = Some(end);
        let delay = period
            .randomize_start
            .as_ref()
            .map(|r| {
                random_delay(
                    &reading.ven_name,
                    event.id.as_str(),
                    id,
                    r.to_chrono_at_datetime(start_time).num_milliseconds(),
                )
            })
            .unwrap_or(0);
        let Some(ask) = ask_of(&interval.payloads, id, watts_per_unit)? else { continue };
        asked_anything = true;
        let limit = match ask {
            Ask::Watts(w) => GridLimit::Watts(w),
            Ask::Level(level) => GridLimit::Share(reading.simple_levels[level]),
        };
        spans.push((id, start, start.saturating_add(delay).min(end), end, limit));
    }
    if !asked_anything {
        let types: Vec<String> = intervals.iter().flat_map(|i| &i.payloads).map(|p| type_name(&p.value_type)).collect();
        return Err(Ignored::UnsupportedPayloads { types: types.join(", ") });
    }
    // Overlap is judged on the intervals as sent, before any random delay.
    let mut by_start: Vec<&(i32, i64, i64, i64, GridLimit)> = spans.iter().collect();
    by_start.sort_by_key(|s| s.1);
    for pair in by_start.windows(2) {
        if pair[1].1 < pair[0].3 {
            return Err(Ignored::OverlappingIntervals { first: pair[0].0, second: pair[1].0 });
        }
    }
    let last_end = spans.iter().map(|s| s.3).max().unwrap_or(i64::MIN);
    if last_end <= now_unix_ms {
        // Sent (or changed) when it was already over: bad input. One that ended since it was
        // sent is only old: a VTN keeps past events.
        return if event.modification_date_time.timestamp_millis() >= last_end {
            Err(Ignored::Ended)
        } else {
            Ok(vec![])
        };
    }
    Ok(spans
        .iter()
        .filter(|(_, _, start, end, _)| start < end)
        .flat_map(|&(interval, _, start, end, limit)| {
            targets.iter().map(move |target| GridWindow {
                event: event.id.as_str().to_string(),
                interval,
                program: program.to_string(),
                event_name: content.event_name.clone(),
                target: target.clone(),
                limit,
                start_unix_ms: start,
                end_unix_ms: end,
            })
        })
        .collect())
}

/// What the payloads of interval `id` ask of power, if any payload limits it.
fn ask_of(payloads: &[EventValuesMap], id: i32, watts_per_unit: f64) -> Result<Option<Ask>, Ignored> {
    for payload in payloads {
        match payload.value_type {
            EventType::ImportCapacityLimit | EventType::DispatchSetpoint => {
                let bad = || Ignored::BadValue {
                    interval: id,
                    payload: type_name(&payload.value_type),
                    got: format!("{:?}", payload.values),
                };
                let value = match payload.values.as_slice() {
                    [Value::Number(v)] => *v,
                    [Value::Integer(v)] => *v as f64,
                    _ => return Err(bad()),
                };
                if !(value.is_finite() && value >= 0.0) {
                    return Err(bad());
                }
                return Ok(Some(Ask::Watts(value * watts_per_unit)));
            }
            EventType::Simple => {
                let level = match payload.values.as_slice() {
                    [Value::Integer(v)] if (0..=3).contains(v) => *v as usize,
                    _ => return Err(Ignored::BadLevel { interval: id, got: format!("{:?}", payload.values) }),
                };
                return Ok(Some(Ask::Level(level)));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Watts per unit of the event's power payloads: kW unless its payload descriptor says.
fn watts_per_unit(event: &Event) -> Result<f64, Ignored> {
    let descriptor = event
        .content
        .payload_descriptors
        .iter()
        .flatten()
        .find(|d| matches!(d.payload_type, EventType::ImportCapacityLimit | EventType::DispatchSetpoint));
    match descriptor.and_then(|d| d.units.as_ref()) {
        None | Some(Unit::KW) => Ok(1_000.0),
        Some(Unit::Private(units)) if units.eq_ignore_ascii_case("W") => Ok(1.0),
        Some(Unit::Private(units)) if units.eq_ignore_ascii_case("MW") => Ok(1e6),
        Some(other) => Err(Ignored::BadUnits {
            units: serde_json::to_value(other).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
        }),
    }
}

/// `start` in Unix ms; OpenADR's `0001-01-01` start means "now": when the VEN first read it.
fn at(start: DateTime<Utc>, first_read_unix_ms: i64) -> i64 {
    if start.year() <= 1 {
        first_read_unix_ms
    } else {
        start.timestamp_millis()
    }
}

/// The delay within `randomize_ms` this VEN takes for this interval: the same on every read (a
/// restarted controller, a new leader), different from VEN to VEN.
fn random_delay(ven: &str, event: &str, interval: i32, randomize_ms: i64) -> i64 {
    if randomize_ms <= 0 {
        return 0;
    }
    // FNV-1a: stable across builds, unlike the std hasher's seeds.
    let mut hasher = Fnv1a::default();
    (ven, event, interval).hash(&mut hasher);
    (hasher.finish() % (randomize_ms as u64 + 1)) as i64
}

#[derive(Debug)]
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// A payload type as the VTN spells it (`IMPORT_CAPACITY_LIMIT`, `PRICE`, a private name).
pub fn type_name(t: &EventType) -> String {
    serde_json::to_value(t).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| format!("{t:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn reading() -> Reading {
        Reading { ven_name: "watt".into(), simple_levels: [1.0, 0.75, 0.5, 0.25] }
    }

    /// An event as a VTN sends it, from JSON.
    fn event(body: serde_json::Value) -> Event {
        let mut full = serde_json::json!({
            "id": "event-1",
            "createdDateTime": "2026-11-29T00:00:00Z",
            "modificationDateTime": iso(NOW),
            "objectType": "EVENT",
            "programID": "program-1",
        });
        full.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
        serde_json::from_value(full).unwrap()
    }

    fn iso(ms: i64) -> String {
        DateTime::<Utc>::from_timestamp_millis(ms).unwrap().to_rfc3339()
    }

    fn read(e: &Event) -> Result<Vec<GridWindow>, Ignored> {
        windows_of(e, "dr", &reading(), |t| t == "rack-1", NOW, NOW)
    }

    #[test]
    fn an_import_capacity_limit_sets_a_site_window_per_interval_in_kw() {
        let e = event(serde_json::json!({
            "intervalPeriod": {"start": iso(NOW + 5_000), "duration": "PT30S"},
            "payloadDescriptors": [{"payloadType": "IMPORT_CAPACITY_LIMIT", "units": "KW"}],
            "intervals": [
                {"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [6.5]}]},
                {"id": 1, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [7]}]},
            ],
        }));
        let windows = read(&e).unwrap();
        assert_eq!(windows.len(), 2);
        assert_eq!(windows[0].target, GridTarget::Site);
        assert_eq!(windows[0].limit, GridLimit::Watts(6_500.0));
        assert_eq!((windows[0].start_unix_ms, windows[0].end_unix_ms), (NOW + 5_000, NOW + 35_000));
        assert_eq!(
            (windows[1].start_unix_ms, windows[1].end_unix_ms),
            (NOW + 35_000, NOW + 65_000),
            "one after another"
        );
        assert_eq!(windows[1].limit, GridLimit::Watts(7_000.0));
    }

    #[test]
    fn simple_levels_setpoints_domains_units_and_now() {
        let e = event(serde_json::json!({
            "targets": ["rack-1"],
            "intervalPeriod": {"start": "0001-01-01T00:00:00Z", "duration": "PT1M"},
            "intervals": [{"id": 0, "payloads": [{"type": "SIMPLE", "values": [2]}]}],
        }));
        let windows = windows_of(&e, "dr", &reading(), |t| t == "rack-1", NOW + 10_000, NOW).unwrap();
        assert_eq!(windows[0].target, GridTarget::Domain("rack-1".into()));
        assert_eq!(windows[0].limit, GridLimit::Share(0.5));
        assert_eq!(windows[0].start_unix_ms, NOW, "0001-01-01 is when it was first read");
        let e = event(serde_json::json!({
            "targets": ["some-group"],
            "payloadDescriptors": [{"payloadType": "DISPATCH_SETPOINT", "units": "W"}],
            "intervalPeriod": {"start": iso(NOW), "duration": "PT1M"},
            "intervals": [{"id": 0, "payloads": [{"type": "DISPATCH_SETPOINT", "values": [4000.0]}]}],
        }));
        let windows = read(&e).unwrap();
        assert_eq!((windows[0].target.clone(), windows[0].limit), (GridTarget::Site, GridLimit::Watts(4_000.0)));
    }

    #[test]
    fn randomize_start_delays_the_start_the_same_on_every_read_and_differently_per_ven() {
        let e = event(serde_json::json!({
            "intervalPeriod": {"start": iso(NOW), "duration": "PT10M", "randomizeStart": "PT5M"},
            "intervals": [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [5]}]}],
        }));
        let start = |ven: &str| {
            let reading = Reading { ven_name: ven.into(), ..reading() };
            windows_of(&e, "dr", &reading, |_| false, NOW, NOW).unwrap()[0].start_unix_ms
        };
        let starts: Vec<i64> = (0..20).map(|i| start(&format!("ven-{i}"))).collect();
        assert!(starts.iter().all(|s| (NOW..=NOW + 300_000).contains(s)), "{starts:?}");
        assert!(starts.iter().collect::<std::collections::BTreeSet<_>>().len() > 10, "spread: {starts:?}");
        assert_eq!(start("ven-3"), start("ven-3"), "stable");
    }

    #[test]
    fn an_event_that_ended_since_it_was_sent_is_only_old() {
        let e = event(serde_json::json!({
            "intervalPeriod": {"start": iso(NOW - 120_000), "duration": "PT1M"},
            "intervals": [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [5]}]}],
        }));
        let mut old = e.clone();
        old.modification_date_time = DateTime::<Utc>::from_timestamp_millis(NOW - 200_000).unwrap();
        assert_eq!(read(&old), Ok(vec![]), "nothing to do, nothing wrong");
        let mut late = e;
        late.modification_date_time = DateTime::<Utc>::from_timestamp_millis(NOW - 30_000).unwrap();
        assert_eq!(read(&late), Err(Ignored::Ended), "sent when over");
    }

    #[test]
    fn bad_events_are_ignored_with_their_reason() {
        let cases = [
            (serde_json::json!({"intervals": []}), "no-intervals"),
            (
                serde_json::json!({"intervals": [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [5]}]}]}),
                "no-period",
            ),
            (
                serde_json::json!({
                    "intervalPeriod": {"start": iso(NOW)},
                    "intervals": [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [5]}]}]}),
                "no-duration",
            ),
            (
                serde_json::json!({
                    "intervalPeriod": {"start": iso(NOW), "duration": "PT1M"},
                    "intervals": [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [-5.0]}]}]}),
                "bad-value",
            ),
            (
                serde_json::json!({
                    "intervalPeriod": {"start": iso(NOW), "duration": "PT1M"},
                    "intervals": [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [5.0, 6.0]}]}]}),
                "bad-value",
            ),
            (
                serde_json::json!({
                    "intervalPeriod": {"start": iso(NOW), "duration": "PT1M"},
                    "intervals": [{"id": 0, "payloads": [{"type": "SIMPLE", "values": [7]}]}]}),
                "bad-level",
            ),
            (
                serde_json::json!({
                    "payloadDescriptors": [{"payloadType": "IMPORT_CAPACITY_LIMIT", "units": "KWH"}],
                    "intervalPeriod": {"start": iso(NOW), "duration": "PT1M"},
                    "intervals": [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [5]}]}]}),
                "bad-units",
            ),
            (
                serde_json::json!({
                    "intervals": [
                        {"id": 0, "intervalPeriod": {"start": iso(NOW), "duration": "PT1M"},
                         "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [5]}]},
                        {"id": 1, "intervalPeriod": {"start": iso(NOW + 30_000), "duration": "PT1M"},
                         "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [4]}]}]}),
                "overlapping-intervals",
            ),
            (
                serde_json::json!({
                    "intervalPeriod": {"start": iso(NOW - 120_000), "duration": "PT1M"},
                    "intervals": [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [5]}]}]}),
                "ended",
            ),
            (
                serde_json::json!({
                    "intervalPeriod": {"start": iso(NOW), "duration": "PT1M"},
                    "intervals": [{"id": 0, "payloads": [{"type": "PRICE", "values": [0.3]},
                                                         {"type": "x-watt-unknown", "values": ["a"]}]}]}),
                "unsupported-payloads",
            ),
        ];
        for (body, label) in cases {
            let e = event(body.clone());
            match read(&e) {
                Err(ignored) => assert_eq!(ignored.label(), label, "{body}: {ignored}"),
                Ok(windows) => panic!("{body}: read as {windows:?}, expected {label}"),
            }
        }
    }
}
