//! Scenario files for `wattctl up --scenario`: the power sources at the start, then a timeline of
//! source changes. Times and ramps are real-world; `--speed N` plays the timeline N times faster
//! (times ÷ N, ramps × N). Every error names its field.

use std::time::Duration;

use serde::Deserialize;

use crate::power::{parse_kind, parse_ramp, parse_watts};

#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub name: String,
    pub kind: watt_proto::v1::SourceKind,
    pub available_watts: f64,
    pub ramp_watts_per_second: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub at: Duration,
    pub source: String,
    pub available_watts: f64,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub name: String,
    /// The site's ramp limit on counted power, W/s.
    pub ramp_up_watts_per_second: Option<f64>,
    pub sources: Vec<Source>,
    pub events: Vec<Event>,
    pub duration: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: String,
    ramp_up: Option<String>,
    sources: Vec<FileSource>,
    #[serde(default)]
    events: Vec<FileEvent>,
    duration: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSource {
    name: String,
    kind: String,
    available: String,
    ramp: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEvent {
    at: String,
    source: String,
    available: String,
    #[serde(default)]
    note: String,
}

fn duration(field: &str, text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{field}: {text:?} is not a duration ({e})"))
}

impl Scenario {
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let file: File = serde_yaml::from_str(text).map_err(|e| format!("scenario: {e}"))?;
        let mut sources = Vec::new();
        for (i, s) in file.sources.iter().enumerate() {
            let field = |f: &str| format!("sources[{i}].{f}");
            sources.push(Source {
                name: s.name.clone(),
                kind: parse_kind(&s.kind).map_err(|e| format!("{}: {e}", field("kind")))?,
                available_watts: parse_watts(&s.available).map_err(|e| format!("{}: {e}", field("available")))?,
                ramp_watts_per_second: s
                    .ramp
                    .as_deref()
                    .map(parse_ramp)
                    .transpose()
                    .map_err(|e| format!("{}: {e}", field("ramp")))?,
            });
        }
        if sources.is_empty() {
            return Err("sources: at least one power source is needed".into());
        }
        let mut events = Vec::new();
        for (i, e) in file.events.iter().enumerate() {
            let field = |f: &str| format!("events[{i}].{f}");
            if !sources.iter().any(|s| s.name == e.source) {
                return Err(format!("{}: no source named {:?} in sources", field("source"), e.source));
            }
            events.push(Event {
                at: duration(&field("at"), &e.at)?,
                source: e.source.clone(),
                available_watts: parse_watts(&e.available).map_err(|x| format!("{}: {x}", field("available")))?,
                note: e.note.clone(),
            });
        }
        if events.windows(2).any(|w| w[1].at < w[0].at) {
            return Err("events: must be in time order".into());
        }
        let duration = duration("duration", &file.duration)?;
        if events.last().is_some_and(|e| e.at > duration) {
            return Err("duration: ends before the last event".into());
        }
        let ramp_up_watts_per_second =
            file.ramp_up.as_deref().map(parse_ramp).transpose().map_err(|e| format!("ramp_up: {e}"))?;
        Ok(Scenario { name: file.name, ramp_up_watts_per_second, sources, events, duration })
    }

    /// The same timeline played `speed` times faster.
    pub fn faster(mut self, speed: f64) -> Scenario {
        for e in &mut self.events {
            e.at = e.at.div_f64(speed);
        }
        for s in &mut self.sources {
            s.ramp_watts_per_second = s.ramp_watts_per_second.map(|r| r * speed);
        }
        self.ramp_up_watts_per_second = self.ramp_up_watts_per_second.map(|r| r * speed);
        self.duration = self.duration.div_f64(speed);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_scenario_parses_and_plays_faster() {
        let text = include_str!("../../../examples/scenarios/generator-trip.yaml");
        let s = Scenario::parse(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.sources.len(), 3);
        assert_eq!(s.events[0].source, "gen-a");
        let fast = s.clone().faster(10.0);
        assert_eq!(fast.events[0].at, s.events[0].at / 10);
        assert_eq!(fast.sources[1].ramp_watts_per_second, Some(10_000.0));
    }

    #[test]
    fn errors_name_the_field() {
        for (text, want) in [
            ("name: x\nsources: []\nduration: 1s\n", "sources"),
            ("name: x\nsources: [{name: g, kind: nuclear, available: 1kW}]\nduration: 1s\n", "sources[0].kind"),
            ("name: x\nsources: [{name: g, kind: grid, available: lots}]\nduration: 1s\n", "sources[0].available"),
            (
                "name: x\nsources: [{name: g, kind: grid, available: 1kW}]\nevents: [{at: 1s, source: h, available: 1kW}]\nduration: 2s\n",
                "events[0].source",
            ),
            (
                "name: x\nsources: [{name: g, kind: grid, available: 1kW}]\nevents: [{at: soon, source: g, available: 1kW}]\nduration: 2s\n",
                "events[0].at",
            ),
            ("name: x\nsources: [{name: g, kind: grid, available: 1kW}]\nduration: 2s\ncolour: red\n", "colour"),
        ] {
            let e = Scenario::parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: want {want:?} in {e}");
        }
    }
}
