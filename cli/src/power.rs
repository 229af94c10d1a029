//! `wattctl power …`: sources, reserve, status, watch. Power is written with units (W, kW, MW,
//! GW; ramps per second: `2MW/s`) and shown with them.

use std::fmt::Write as _;

use serde::Serialize;
use watt_proto::v1 as pb;

use crate::views::table;

/// Parse "40MW", "500 kW", "1200W", "1.5GW" (a bare number is watts).
pub fn parse_watts(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = (t[..split].trim(), t[split..].trim());
    let scale = match unit {
        "" | "W" | "w" => 1.0,
        "kW" | "kw" | "KW" => 1e3,
        "MW" | "mw" => 1e6,
        "GW" | "gw" => 1e9,
        other => return Err(format!("unknown unit {other:?} in {text:?}: use W, kW, MW or GW")),
    };
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a power: write e.g. 40MW, 500kW or 1200W"))?;
    Ok(value * scale)
}

/// Parse "2MW/s" or "5MW/min" into W/s (the "/s" may be left out).
pub fn parse_ramp(text: &str) -> Result<f64, String> {
    let t = text.trim();
    match t.strip_suffix("/min") {
        Some(per_minute) => parse_watts(per_minute).map(|w| w / 60.0),
        None => parse_watts(t.trim_end_matches("/s")),
    }
}

/// Parse "10%" or "0.1".
pub fn parse_ratio(text: &str) -> Result<f64, String> {
    let t = text.trim();
    match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("{text:?} is not a ratio: write e.g. 10% or 0.1"))
}

pub fn parse_kind(text: &str) -> Result<pb::SourceKind, String> {
    match text {
        "grid" => Ok(pb::SourceKind::Grid),
        "generator" => Ok(pb::SourceKind::Generator),
        "battery" => Ok(pb::SourceKind::Battery),
        "manual" => Ok(pb::SourceKind::Manual),
        other => Err(format!("{other:?} is not a source kind: grid, generator, battery or manual")),
    }
}

/// "40.0 MW", "512 kW", "700 W".
pub fn show_watts(w: f64) -> String {
    let a = w.abs();
    if a >= 1e9 {
        format!("{:.2} GW", w / 1e9)
    } else if a >= 1e6 {
        format!("{:.2} MW", w / 1e6)
    } else if a >= 1e3 {
        format!("{:.1} kW", w / 1e3)
    } else {
        format!("{w:.0} W")
    }
}

fn kind_name(kind: i32) -> String {
    pb::SourceKind::try_from(kind).unwrap_or_default().as_str_name().trim_start_matches("SOURCE_KIND_").to_lowercase()
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceView {
    pub name: String,
    pub kind: String,
    pub available_watts: f64,
    pub effective_watts: f64,
    pub ramp_watts_per_second: Option<f64>,
    /// The domain it feeds; empty: the site.
    pub domain: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobPowerView {
    pub name: String,
    pub cap_watts: f64,
    pub shards: u32,
    pub gpus: u32,
    pub paused: bool,
    pub swing: Option<SwingView>,
}

/// How a load's power swung over the last 10 s analyzed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SwingView {
    /// p95 − p5 of its power sampled at 10 Hz.
    pub swing_watts: f64,
    pub mean_watts: f64,
    /// Share of its variation at 0.1–1 Hz and at 1–5 Hz, 0–1.
    pub share_0_1_to_1_hz: f64,
    pub share_1_to_5_hz: f64,
}

impl From<pb::PowerSwing> for SwingView {
    fn from(s: pb::PowerSwing) -> Self {
        SwingView {
            swing_watts: s.swing_watts,
            mean_watts: s.mean_watts,
            share_0_1_to_1_hz: s.share_0_1_to_1_hz,
            share_1_to_5_hz: s.share_1_to_5_hz,
        }
    }
}

impl SwingView {
    /// "3.6 kW (p95 − p5 over 10 s), 97% of its variation at 1–5 Hz, 2% at 0.1–1 Hz".
    pub fn sentence(&self) -> String {
        format!(
            "{} (p95 − p5 over 10 s, mean {}), {:.0}% of its variation at 1–5 Hz, {:.0}% at 0.1–1 Hz",
            show_watts(self.swing_watts),
            show_watts(self.mean_watts),
            self.share_1_to_5_hz * 100.0,
            self.share_0_1_to_1_hz * 100.0
        )
    }
}

/// A power domain now: `wattctl power domains`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DomainView {
    pub name: String,
    /// Empty: directly under the site.
    pub parent: String,
    pub limit_watts: f64,
    /// The limit in force: `limit_watts`, or less when the sources feeding it supply less.
    pub effective_limit_watts: f64,
    pub selector: std::collections::BTreeMap<String, String>,
    pub counted_watts: f64,
    pub measured_watts: f64,
    pub nodes: u32,
    pub gpus: u32,
    /// How many levels below the site (1: directly under it).
    pub depth: u32,
}

impl DomainView {
    /// Every domain of `status`, parents before children, each with its depth.
    fn all(domains: Vec<pb::DomainStatus>) -> Vec<DomainView> {
        let parents: Vec<i32> = domains.iter().map(|d| d.parent_index).collect();
        let depth = |mut i: i32| {
            let mut depth = 0;
            while i >= 0 && depth < 64 {
                depth += 1;
                i = parents.get(i as usize).copied().unwrap_or(-1);
            }
            depth
        };
        domains
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                let domain = d.domain.unwrap_or_default();
                DomainView {
                    name: domain.name,
                    parent: domain.parent,
                    limit_watts: domain.limit_watts,
                    effective_limit_watts: d.effective_limit_watts,
                    selector: domain.selector.into_iter().collect(),
                    counted_watts: d.counted_watts,
                    measured_watts: d.measured_watts,
                    nodes: d.nodes,
                    gpus: d.gpus,
                    depth: depth(i as i32),
                }
            })
            .collect()
    }

    /// The tree as a table: each domain under its parent, indented by its depth.
    pub fn tree(domains: &[DomainView]) -> String {
        // Depth-first from the site: parents come before children in `domains`.
        let mut order = Vec::with_capacity(domains.len());
        fn visit(domains: &[DomainView], parent: &str, order: &mut Vec<usize>) {
            for (i, d) in domains.iter().enumerate().filter(|(_, d)| d.parent == parent) {
                order.push(i);
                visit(domains, &d.name, order);
            }
        }
        visit(domains, "", &mut order);
        let rows: Vec<Vec<String>> = order
            .iter()
            .map(|&i| {
                let d = &domains[i];
                let limit = d.effective_limit_watts;
                let share = if limit > 0.0 { d.counted_watts / limit * 100.0 } else { 0.0 };
                let limit_text = if limit < d.limit_watts - 0.5 {
                    format!("{} (fed {})", show_watts(d.limit_watts), show_watts(limit))
                } else {
                    show_watts(d.limit_watts)
                };
                vec![
                    format!("{}{}", "  ".repeat(d.depth as usize), d.name),
                    limit_text,
                    format!("{} ({share:.0}%)", show_watts(d.counted_watts)),
                    show_watts(d.measured_watts),
                    d.nodes.to_string(),
                    d.gpus.to_string(),
                    d.selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
                ]
            })
            .collect();
        let mut out = String::from("site\n");
        out.push_str(&table(&["DOMAIN", "LIMIT", "COUNTED", "MEASURED", "NODES", "GPUS", "SELECTOR"], &rows));
        out
    }
}

/// One window of a grid event (OpenADR): a limit on the site's import or on a domain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GridWindowView {
    pub event: String,
    pub interval: i32,
    pub program: String,
    pub event_name: String,
    /// Empty: the site's import from the grid.
    pub domain: String,
    /// At most this many watts, or (`share` above 0) that share of the grid's supply.
    pub limit_watts: f64,
    pub share: f64,
    pub start_unix_ms: i64,
    pub end_unix_ms: i64,
    pub in_force: bool,
}

/// How the controller's VEN stands with its VTN.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GridLinkView {
    pub vtn: String,
    pub ven_name: String,
    pub reachable: bool,
    pub last_read_unix_ms: i64,
    pub error: String,
    /// The VTN's notifications: `off`, `not-offered`, `connecting`, `subscribed` or `failed`.
    pub notifier: &'static str,
    pub notifier_url: String,
    pub notifier_error: String,
}

impl GridLinkView {
    /// "notified over MQTT mqtt://…", or why it is polled only.
    fn notifier_text(&self) -> String {
        match self.notifier {
            "subscribed" => format!("notified at once over MQTT {}", self.notifier_url),
            "connecting" => format!("subscribing at MQTT {}", self.notifier_url),
            "failed" => format!("notifications FAILING ({}); read every poll", self.notifier_error),
            "not-offered" => "the VTN names no MQTT broker; read every poll".into(),
            "off" => "read every poll (notifications off)".into(),
            _ => "read every poll".into(),
        }
    }
}

fn notifier_name(state: pb::NotifierState) -> &'static str {
    match state {
        pb::NotifierState::Unspecified => "unknown",
        pb::NotifierState::Off => "off",
        pb::NotifierState::NotOffered => "not-offered",
        pb::NotifierState::Connecting => "connecting",
        pb::NotifierState::Subscribed => "subscribed",
        pb::NotifierState::Failed => "failed",
    }
}

impl GridWindowView {
    fn limit_text(&self) -> String {
        if self.share > 0.0 {
            format!("{:.0}% of grid", self.share * 100.0)
        } else {
            show_watts(self.limit_watts)
        }
    }
}

/// "in 5 s", "12 s ago": `at` as seen at `now`.
fn relative(at_ms: i64, now_ms: i64) -> String {
    let seconds = (at_ms - now_ms) as f64 / 1000.0;
    let text = |s: f64| if s >= 120.0 { format!("{:.0} min", s / 60.0) } else { format!("{s:.0} s") };
    if seconds >= 0.0 {
        format!("in {}", text(seconds))
    } else {
        format!("{} ago", text(-seconds))
    }
}

/// `wattctl power status -o json`: stable field names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PowerView {
    pub available_watts: f64,
    pub reserve_ratio: f64,
    pub pue: f64,
    pub limit_watts: f64,
    pub budget_watts: f64,
    pub allocated_watts: f64,
    pub counted_watts: f64,
    pub drawn_watts: f64,
    pub non_gpu_watts: f64,
    pub failsafe_nodes: u32,
    pub unacknowledged_nodes: u32,
    pub budget_violations: u64,
    pub measured_watts: f64,
    /// The change just made is in force but not in the controller's store yet.
    pub change_unstored: bool,
    /// Nonzero: the answering controller caretakes this term (etcd out of reach; cuts only).
    pub caretaker_term: u64,
    pub measured_violations: u64,
    pub overdraw_seconds: f64,
    pub worst_overdraw_watts: f64,
    pub floor_watts: f64,
    pub infeasible: bool,
    pub unenforced_nodes: u32,
    pub unenforced_excess_watts: f64,
    pub foreign_gpus: u32,
    pub foreign_watts: f64,
    /// The site's ramp limit on counted power, W/s (none: not limited), and how fast a cancel's
    /// caps come down (none: at once).
    pub ramp_up_watts_per_second: Option<f64>,
    pub ramp_down_watts_per_second: Option<f64>,
    /// How fast counted power moved over the last second and minute, W/s.
    pub ramp_1s_watts_per_second: f64,
    pub ramp_60s_watts_per_second: f64,
    /// The site's GPU power swing over the last 10 s analyzed.
    pub swing: Option<SwingView>,
    pub sources: Vec<SourceView>,
    pub jobs: Vec<JobPowerView>,
    /// The power domains, parents before children.
    pub domains: Vec<DomainView>,
    /// The grid's schedule (OpenADR events), and the VTN it comes from, if any.
    pub grid_windows: Vec<GridWindowView>,
    pub grid_link: Option<GridLinkView>,
    pub notes: Vec<String>,
    pub unix_ms: i64,
}

impl From<pb::PowerStatus> for PowerView {
    fn from(s: pb::PowerStatus) -> Self {
        let site = s.site.unwrap_or_default();
        PowerView {
            available_watts: s.available_watts,
            reserve_ratio: site.reserve_ratio,
            pue: site.pue,
            limit_watts: s.limit_watts,
            budget_watts: s.budget_watts,
            allocated_watts: s.allocated_watts,
            counted_watts: s.counted_watts,
            drawn_watts: s.drawn_watts,
            non_gpu_watts: s.non_gpu_watts,
            failsafe_nodes: s.failsafe_nodes,
            unacknowledged_nodes: s.unacknowledged_nodes,
            budget_violations: s.budget_violations,
            measured_watts: s.measured_watts,
            change_unstored: s.change_unstored,
            caretaker_term: s.caretaker_term,
            measured_violations: s.measured_violations,
            overdraw_seconds: s.overdraw_seconds,
            worst_overdraw_watts: s.worst_overdraw_watts,
            floor_watts: s.floor_watts,
            infeasible: s.infeasible,
            unenforced_nodes: s.unenforced_nodes,
            unenforced_excess_watts: s.unenforced_excess_watts,
            foreign_gpus: s.foreign_gpus,
            foreign_watts: s.foreign_watts,
            ramp_up_watts_per_second: site.ramp_up_watts_per_second,
            ramp_down_watts_per_second: site.ramp_down_watts_per_second,
            ramp_1s_watts_per_second: s.ramp_1s_watts_per_second,
            ramp_60s_watts_per_second: s.ramp_60s_watts_per_second,
            swing: s.swing.map(SwingView::from),
            sources: s
                .sources
                .into_iter()
                .map(|x| SourceView {
                    kind: kind_name(x.kind),
                    name: x.name,
                    available_watts: x.available_watts,
                    effective_watts: x.effective_watts,
                    ramp_watts_per_second: x.ramp_watts_per_second,
                    domain: x.domain,
                })
                .collect(),
            jobs: s
                .jobs
                .into_iter()
                .map(|j| JobPowerView {
                    name: j.name,
                    cap_watts: j.cap_watts,
                    shards: j.shards,
                    gpus: j.gpus,
                    paused: j.paused,
                    swing: j.swing.map(SwingView::from),
                })
                .collect(),
            domains: DomainView::all(s.domains),
            grid_windows: s
                .grid_windows
                .into_iter()
                .map(|w| GridWindowView {
                    event: w.event,
                    interval: w.interval,
                    program: w.program,
                    event_name: w.event_name,
                    domain: w.domain,
                    limit_watts: w.limit_watts,
                    share: w.share,
                    start_unix_ms: w.start_unix_ms,
                    end_unix_ms: w.end_unix_ms,
                    in_force: w.in_force,
                })
                .collect(),
            grid_link: s.grid_link.map(|l| GridLinkView {
                notifier: notifier_name(l.notifier()),
                vtn: l.vtn,
                ven_name: l.ven_name,
                reachable: l.reachable,
                last_read_unix_ms: l.last_read_unix_ms,
                error: l.error,
                notifier_url: l.notifier_url,
                notifier_error: l.notifier_error,
            }),
            notes: s.notes,
            unix_ms: s.unix_ms,
        }
    }
}

impl PowerView {
    pub fn human(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "Available:   {}", show_watts(self.available_watts));
        let _ = writeln!(out, "Reserve:     {:.1}%   PUE: {}", self.reserve_ratio * 100.0, self.pue);
        let _ = writeln!(out, "Limit:       {}", show_watts(self.limit_watts));
        let _ = writeln!(out, "Non-GPU:     {}", show_watts(self.non_gpu_watts));
        let _ = writeln!(out, "GPU budget:  {}", show_watts(self.budget_watts));
        let _ = writeln!(out, "Allocated:   {}", show_watts(self.allocated_watts));
        let _ = writeln!(
            out,
            "Counted:     {}  (acknowledged caps, or higher ones in flight)",
            show_watts(self.counted_watts)
        );
        let _ = writeln!(out, "Drawn:       {}  (measured, GPUs)", show_watts(self.drawn_watts));
        if let Some(swing) = &self.swing {
            let _ = writeln!(out, "Swing:       {}", swing.sentence());
        }
        let mut limit = self.ramp_up_watts_per_second.map_or("no ramp limit".to_string(), |r| {
            format!("rises held under {}/s, {}/min", show_watts(r), show_watts(r * 60.0))
        });
        if let Some(r) = self.ramp_down_watts_per_second {
            limit.push_str(&format!("; cancels ramp down at {}/s", show_watts(r)));
        }
        let _ = writeln!(
            out,
            "Ramp:        {}/s over the last second, {}/s over the last minute ({limit})",
            show_watts(self.ramp_1s_watts_per_second),
            show_watts(self.ramp_60s_watts_per_second)
        );
        let _ = writeln!(
            out,
            "Measured:    {}  (GPUs and non-GPU: what the meter judges)",
            show_watts(self.measured_watts)
        );
        let _ = writeln!(
            out,
            "Floor:       {}  (every job paused){}",
            show_watts(self.floor_watts),
            if self.infeasible { "  INFEASIBLE: above the limit" } else { "" }
        );
        let _ = writeln!(
            out,
            "Nodes:       {} awaiting acknowledgement, {} at failsafe",
            self.unacknowledged_nodes, self.failsafe_nodes
        );
        if self.caretaker_term > 0 {
            let _ = writeln!(
                out,
                "Controller:  CARETAKER of term {} — etcd is out of its reach: it applies cuts, and raises or moves nothing until a leader leads",
                self.caretaker_term
            );
        }
        if self.change_unstored {
            let _ = writeln!(
                out,
                "Stored:      NOT YET — the change is in force and its caps ordered; the controller keeps trying its store"
            );
        }
        if self.unenforced_nodes > 0 {
            let _ = writeln!(
                out,
                "Unenforced:  {} node(s), {} above their orders (dry-run or off: not Watt's violation)",
                self.unenforced_nodes,
                show_watts(self.unenforced_excess_watts)
            );
        }
        if self.foreign_gpus > 0 {
            let _ = writeln!(
                out,
                "Foreign:     {} GPU(s) with processes Watt did not start, counted at {}",
                self.foreign_gpus,
                show_watts(self.foreign_watts)
            );
        }
        let _ = writeln!(
            out,
            "Violations:  counted {}, measured {}; overdraw {:.1} s past settling, worst {}",
            self.budget_violations,
            self.measured_violations,
            self.overdraw_seconds,
            show_watts(self.worst_overdraw_watts)
        );
        if !self.sources.is_empty() {
            out.push_str("\nSources:\n");
            let rows: Vec<Vec<String>> = self
                .sources
                .iter()
                .map(|s| {
                    vec![
                        format!("  {}", s.name),
                        s.kind.clone(),
                        show_watts(s.effective_watts),
                        show_watts(s.available_watts),
                        s.ramp_watts_per_second.map(|r| format!("{}/s", show_watts(r))).unwrap_or_else(|| "-".into()),
                        if s.domain.is_empty() { "site".into() } else { s.domain.clone() },
                    ]
                })
                .collect();
            out.push_str(&table(&["  NAME", "KIND", "NOW", "AVAILABLE", "RAMP", "FEEDS"], &rows));
        }
        if !self.jobs.is_empty() {
            out.push_str("\nJobs:\n");
            let rows: Vec<Vec<String>> = self
                .jobs
                .iter()
                .map(|j| {
                    vec![
                        format!("  {}", j.name),
                        if j.paused { "paused".into() } else { show_watts(j.cap_watts) },
                        j.shards.to_string(),
                        j.gpus.to_string(),
                        j.swing.map_or("-".into(), |s| {
                            format!("{} ({:.0}% at 1–5 Hz)", show_watts(s.swing_watts), s.share_1_to_5_hz * 100.0)
                        }),
                    ]
                })
                .collect();
            out.push_str(&table(&["  JOB", "CAP/GPU", "SHARDS", "GPUS", "SWING"], &rows));
        }
        if !self.domains.is_empty() {
            out.push_str("\nDomains:\n");
            out.push_str(&DomainView::tree(&self.domains));
        }
        out.push_str(&self.grid_text());
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }

    /// The grid's schedule and its VTN, when there is either.
    fn grid_text(&self) -> String {
        let mut out = String::new();
        if let Some(link) = &self.grid_link {
            let state = if link.reachable {
                format!("reachable, read {}", relative(link.last_read_unix_ms.min(self.unix_ms), self.unix_ms))
            } else {
                format!("UNREACHABLE ({}); the known schedule holds until it ends", link.error)
            };
            let _ = writeln!(
                out,
                "\nGrid events: VTN {} as VEN {}: {state}; {}",
                link.vtn,
                link.ven_name,
                link.notifier_text()
            );
        } else if !self.grid_windows.is_empty() {
            out.push_str("\nGrid events:\n");
        }
        if self.grid_windows.is_empty() {
            if self.grid_link.is_some() {
                out.push_str("  none scheduled\n");
            }
            return out;
        }
        let rows: Vec<Vec<String>> = self
            .grid_windows
            .iter()
            .map(|w| {
                let name = if w.event_name.is_empty() { w.event.clone() } else { w.event_name.clone() };
                let state = if w.in_force {
                    "IN FORCE"
                } else if w.start_unix_ms > self.unix_ms {
                    "scheduled"
                } else {
                    "ended"
                };
                vec![
                    format!("  {name}#{}", w.interval),
                    w.program.clone(),
                    if w.domain.is_empty() { "site import".into() } else { w.domain.clone() },
                    w.limit_text(),
                    relative(w.start_unix_ms, self.unix_ms),
                    relative(w.end_unix_ms, self.unix_ms),
                    state.into(),
                ]
            })
            .collect();
        out.push_str(&table(&["  EVENT", "PROGRAM", "TARGET", "LIMIT", "STARTS", "ENDS", "STATE"], &rows));
        out
    }

    pub fn line(&self) -> String {
        format!(
            "available {}  limit {}  budget {}  allocated {}  counted {}  measured {}  unacked {}  failsafe {}{}\n",
            show_watts(self.available_watts),
            show_watts(self.limit_watts),
            show_watts(self.budget_watts),
            show_watts(self.allocated_watts),
            show_watts(self.counted_watts),
            show_watts(self.measured_watts),
            self.unacknowledged_nodes,
            self.failsafe_nodes,
            if self.infeasible { "  INFEASIBLE" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_parse_and_show() {
        assert_eq!(parse_watts("40MW"), Ok(40e6));
        assert_eq!(parse_watts("500 kW"), Ok(500e3));
        assert_eq!(parse_watts("1200"), Ok(1200.0));
        assert_eq!(parse_ramp("2MW/s"), Ok(2e6));
        assert_eq!(parse_ratio("10%"), Ok(0.1));
        assert!(parse_watts("40 horsepower").unwrap_err().contains("unknown unit"));
        assert!(parse_watts("lots").is_err());
        assert_eq!(show_watts(40e6), "40.00 MW");
        assert_eq!(show_watts(700.0), "700 W");
    }
}
