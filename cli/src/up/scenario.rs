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
    /// The domain (a feed) it supplies.
    pub domain: Option<String>,
}

/// A power domain the scenario sets at the start (`wattctl up`'s nodes carry `rack=r1` for
/// node-1 and node-2, `rack=r2` for node-3 and node-4, and so on).
#[derive(Debug, Clone, PartialEq)]
pub struct Domain {
    pub name: String,
    pub parent: Option<String>,
    pub limit_watts: f64,
    pub selector: Vec<(String, String)>,
}

/// What an event changes.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A source: what it supplies.
    Source(String),
    /// A domain: its limit.
    Domain(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub at: Duration,
    pub target: Target,
    /// The source's power available, or the domain's limit.
    pub watts: f64,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub name: String,
    /// The site's ramp limit on counted power, W/s.
    pub ramp_up_watts_per_second: Option<f64>,
    pub sources: Vec<Source>,
    pub domains: Vec<Domain>,
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
    domains: Vec<FileDomain>,
    #[serde(default)]
    events: Vec<FileEvent>,
    duration: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDomain {
    name: String,
    limit: String,
    /// `rack=r1` (several: comma-separated, all required).
    select: String,
    parent: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSource {
    name: String,
    kind: String,
    available: String,
    ramp: Option<String>,
    domain: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEvent {
    at: String,
    /// A source's change: `source` and `available`; a domain's: `domain` and `limit`.
    source: Option<String>,
    available: Option<String>,
    domain: Option<String>,
    limit: Option<String>,
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
                domain: s.domain.clone(),
            });
        }
        if sources.is_empty() {
            return Err("sources: at least one power source is needed".into());
        }
        let mut domains: Vec<Domain> = Vec::new();
        for (i, d) in file.domains.iter().enumerate() {
            let field = |f: &str| format!("domains[{i}].{f}");
            let mut selector = Vec::new();
            for pair in d.select.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (k, v) =
                    pair.split_once('=').ok_or_else(|| format!("{}: {pair:?} is not KEY=VALUE", field("select")))?;
                selector.push((k.trim().to_string(), v.trim().to_string()));
            }
            if selector.is_empty() {
                return Err(format!("{}: name at least one node label, e.g. rack=r1", field("select")));
            }
            if let Some(parent) = d.parent.as_ref().filter(|p| !domains.iter().any(|x| &x.name == *p)) {
                return Err(format!("{}: no domain named {parent:?} before it", field("parent")));
            }
            domains.push(Domain {
                name: d.name.clone(),
                parent: d.parent.clone(),
                limit_watts: parse_watts(&d.limit).map_err(|e| format!("{}: {e}", field("limit")))?,
                selector,
            });
        }
        for (i, s) in sources.iter().enumerate() {
            if let Some(d) = s.domain.as_ref().filter(|d| !domains.iter().any(|x| &x.name == *d)) {
                return Err(format!("sources[{i}].domain: no domain named {d:?} in domains"));
            }
        }
        let mut events = Vec::new();
        for (i, e) in file.events.iter().enumerate() {
            let field = |f: &str| format!("events[{i}].{f}");
            let (target, watts) = match (&e.source, &e.available, &e.domain, &e.limit) {
                (Some(source), Some(available), None, None) => {
                    if !sources.iter().any(|s| &s.name == source) {
                        return Err(format!("{}: no source named {source:?} in sources", field("source")));
                    }
                    let watts = parse_watts(available).map_err(|x| format!("{}: {x}", field("available")))?;
                    (Target::Source(source.clone()), watts)
                }
                (None, None, Some(domain), Some(limit)) => {
                    if !domains.iter().any(|d| &d.name == domain) {
                        return Err(format!("{}: no domain named {domain:?} in domains", field("domain")));
                    }
                    let watts = parse_watts(limit).map_err(|x| format!("{}: {x}", field("limit")))?;
                    (Target::Domain(domain.clone()), watts)
                }
                _ => return Err(format!("{}: give either source and available, or domain and limit", field("source"))),
            };
            events.push(Event { at: duration(&field("at"), &e.at)?, target, watts, note: e.note.clone() });
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
        Ok(Scenario { name: file.name, ramp_up_watts_per_second, sources, domains, events, duration })
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
        assert_eq!(s.events[0].target, Target::Source("gen-a".into()));
        let fast = s.clone().faster(10.0);
        assert_eq!(fast.events[0].at, s.events[0].at / 10);
        assert_eq!(fast.sources[1].ramp_watts_per_second, Some(10_000.0));
    }

    #[test]
    fn the_rack_breaker_scenario_sets_racks_and_derates_one() {
        let text = include_str!("../../../examples/scenarios/rack-breaker.yaml");
        let s = Scenario::parse(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.domains.len(), 2);
        assert_eq!(s.domains[0].selector, vec![("rack".to_string(), "r1".to_string())]);
        assert!(s.events.iter().any(|e| e.target == Target::Domain("rack-1".into())));
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
            (
                "name: x\nsources: [{name: g, kind: grid, available: 1kW}]\ndomains: [{name: r, limit: 1kW, select: rack}]\nduration: 2s\n",
                "domains[0].select",
            ),
            (
                "name: x\nsources: [{name: g, kind: grid, available: 1kW}]\ndomains: [{name: r, limit: 1kW, select: rack=r1}]\nevents: [{at: 1s, domain: q, limit: 1kW}]\nduration: 2s\n",
                "events[0].domain",
            ),
            (
                "name: x\nsources: [{name: g, kind: grid, available: 1kW}]\nevents: [{at: 1s, source: g, limit: 1kW}]\nduration: 2s\n",
                "events[0].source",
            ),
        ] {
            let e = Scenario::parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: want {want:?} in {e}");
        }
    }
}
