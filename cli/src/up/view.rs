//! What `wattctl up` shows: a live frame (power, sources, jobs, events) refreshed each second,
//! one line a second when the output is not a terminal, and the summary at the end.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use watt_proto::v1 as pb;

use crate::power::show_watts;
use crate::views::job_state;

pub fn frame(t: Duration, end: Option<Duration>, status: &pb::PowerStatus, jobs: &[pb::Job], log: &[String]) -> String {
    let mut out = String::new();
    let total = end.map(|e| format!(" / {:.0}s", e.as_secs_f64())).unwrap_or_default();
    let _ = writeln!(out, "Watt — local cluster   t = {:.0}s{total}   (Ctrl-C stops)\n", t.as_secs_f64());
    let _ = writeln!(
        out,
        "Power    available {}   limit {}   allocated {}   measured {}   violations counted {} measured {}",
        show_watts(status.available_watts),
        show_watts(status.limit_watts),
        show_watts(status.allocated_watts),
        show_watts(status.measured_watts),
        status.budget_violations,
        status.measured_violations
    );
    if status.infeasible {
        let _ = writeln!(
            out,
            "         INFEASIBLE: with every job paused the cluster draws {}, above the {} limit",
            show_watts(status.floor_watts),
            show_watts(status.limit_watts)
        );
    }
    let sources: Vec<String> =
        status.sources.iter().map(|s| format!("{} {}", s.name, show_watts(s.effective_watts))).collect();
    let _ = writeln!(out, "Sources  {}", sources.join(" · "));
    if !status.domains.is_empty() {
        let domains: Vec<String> = status
            .domains
            .iter()
            .filter_map(|d| {
                let domain = d.domain.as_ref()?;
                Some(format!(
                    "{} {} counted / {} measured of {}",
                    domain.name,
                    show_watts(d.counted_watts),
                    show_watts(d.measured_watts),
                    show_watts(d.effective_limit_watts)
                ))
            })
            .collect();
        let _ = writeln!(out, "Domains  {}", domains.join(" · "));
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "{:<12} {:<10} {:>8} {:>9} {:>9} {:>9} {:>9}  SPEED AT 60/80% CAP",
        "JOB", "STATE", "SHARDS", "CAP", "STEPS/S", "STEP", "J/STEP"
    );
    let caps: BTreeMap<&str, &pb::JobPower> = status.jobs.iter().map(|j| (j.name.as_str(), j)).collect();
    for job in jobs {
        let spec = job.spec.clone().unwrap_or_default();
        let range = spec.shards.unwrap_or_default();
        let cap =
            caps.get(spec.name.as_str()).filter(|p| !p.paused).map_or("-".to_string(), |p| show_watts(p.cap_watts));
        let p = job.progress.unwrap_or_default();
        let curve = job.speed_curve.map_or("-".to_string(), |c| {
            let view = crate::views::SpeedCurveView::from(c);
            format!("{:.2}/{:.2} ({})", view.speed_at_60_percent, view.speed_at_80_percent, view.source)
        });
        let _ = writeln!(
            out,
            "{:<12} {:<10} {:>8} {:>9} {:>9.1} {:>9} {:>9.0}  {}",
            spec.name,
            job_state(job.state),
            format!("{}/{}..{}", job.shards.len(), range.min, range.max),
            cap,
            p.steps_per_second,
            p.step,
            p.energy_per_step_joules,
            curve
        );
    }
    let _ = writeln!(out, "\nEvents");
    for line in log.iter().rev().take(10).rev() {
        let _ = writeln!(out, "  {line}");
    }
    out
}

/// One line per second, for output that is not a terminal.
pub fn line(t: Duration, status: &pb::PowerStatus, jobs: &[pb::Job]) -> String {
    let jobs: Vec<String> = jobs
        .iter()
        .map(|j| {
            let name = j.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("");
            let rate = j.progress.as_ref().map_or(0.0, |p| p.steps_per_second);
            format!("{name} {} {}sh {rate:.1}/s", job_state(j.state), j.shards.len())
        })
        .collect();
    format!(
        "t={:.0}s available={} limit={} measured={} violations={}/{}{} | {}",
        t.as_secs_f64(),
        show_watts(status.available_watts),
        show_watts(status.limit_watts),
        show_watts(status.measured_watts),
        status.budget_violations,
        status.measured_violations,
        if status.infeasible { " INFEASIBLE" } else { "" },
        jobs.join(" | ")
    )
}

pub struct Sample<'a> {
    pub status: &'a pb::PowerStatus,
    pub jobs: &'a [pb::Job],
    /// Seconds since the previous sample.
    pub dt: f64,
    pub before_first_event: bool,
    /// Every cap acknowledged and the settle time passed since the last change (the start,
    /// the latest event): what the meter judges.
    pub settled: bool,
}

/// What the run did, for the summary.
#[derive(Debug, Default)]
pub struct Summary {
    pub scenario: Option<String>,
    pub events: u32,
    pub worst_ack: Duration,
    pub violations: u64,
    pub measured_violations: u64,
    pub overdraw_seconds: f64,
    /// The limit was infeasible at some point: with every job paused the cluster drew more.
    pub infeasible_seen: bool,
    pub elapsed: Duration,
    energy_joules: f64,
    priority: BTreeMap<String, i64>,
    steps: BTreeMap<String, (u64, u64)>,
    /// Steps/s at full power: the best rate seen before the first power event.
    full_rate: BTreeMap<String, f64>,
    /// Steps done and time spent running from the first power event on.
    after: BTreeMap<String, (f64, f64)>,
    /// Each job's speed curve as last learned.
    curves: BTreeMap<String, crate::views::SpeedCurveView>,
    /// Counted power's fastest rise over a second and over a minute, its fastest fall over a
    /// second, W/s; and the site's ramp limit.
    ramp_rise: (f64, f64),
    ramp_fall: f64,
    ramp_limit: Option<f64>,
    /// Each job's largest power swing seen, and the site's.
    swings: BTreeMap<String, crate::power::SwingView>,
    site_swing: Option<crate::power::SwingView>,
    /// Each power domain's highest counted and measured power, as shares of its limit then,
    /// once settled.
    domains: BTreeMap<String, (f64, f64)>,
}

impl Summary {
    pub fn new(scenario: Option<String>) -> Self {
        Summary { scenario, ..Summary::default() }
    }

    pub fn record(&mut self, s: &Sample) {
        self.energy_joules += s.status.drawn_watts * s.dt;
        // From the first event on: before it, nodes joining and jobs starting on an empty cluster
        // rise as they come (a node's idle GPUs count when it registers, Watt's doing or not).
        if !s.before_first_event {
            let (second, minute) = (s.status.ramp_1s_watts_per_second, s.status.ramp_60s_watts_per_second);
            self.ramp_rise = (self.ramp_rise.0.max(second), self.ramp_rise.1.max(minute));
            self.ramp_fall = self.ramp_fall.min(second);
        }
        self.ramp_limit = s.status.site.and_then(|site| site.ramp_up_watts_per_second);
        let larger = |seen: Option<&crate::power::SwingView>, now: pb::PowerSwing| {
            let now = crate::power::SwingView::from(now);
            seen.filter(|s| s.swing_watts >= now.swing_watts).copied().unwrap_or(now)
        };
        if let Some(swing) = s.status.swing {
            self.site_swing = Some(larger(self.site_swing.as_ref(), swing));
        }
        for j in &s.status.jobs {
            if let Some(swing) = j.swing {
                let seen = larger(self.swings.get(&j.name), swing);
                self.swings.insert(j.name.clone(), seen);
            }
        }
        self.infeasible_seen |= s.status.infeasible;
        for d in s.status.domains.iter().filter(|_| s.settled) {
            let Some(domain) = d.domain.as_ref().filter(|_| d.effective_limit_watts > 0.0) else { continue };
            let seen = self.domains.entry(domain.name.clone()).or_insert((0.0, 0.0));
            seen.0 = seen.0.max(d.counted_watts / d.effective_limit_watts);
            seen.1 = seen.1.max(d.measured_watts / d.effective_limit_watts);
        }
        for job in s.jobs {
            let Some(spec) = &job.spec else { continue };
            self.priority.insert(spec.name.clone(), spec.priority);
            if let Some(c) = job.speed_curve {
                self.curves.insert(spec.name.clone(), c.into());
            }
            let Some(p) = &job.progress else { continue };
            let entry = self.steps.entry(spec.name.clone()).or_insert((p.step, p.step));
            entry.1 = entry.1.max(p.step);
            let running = job.state == pb::JobState::Running as i32;
            if s.before_first_event {
                if running {
                    let best = self.full_rate.entry(spec.name.clone()).or_insert(0.0);
                    *best = best.max(p.steps_per_second);
                }
            } else {
                // Paused or waiting counts as time at zero speed.
                let (rate_time, time) = self.after.entry(spec.name.clone()).or_insert((0.0, 0.0));
                *rate_time += if running { p.steps_per_second * s.dt } else { 0.0 };
                *time += s.dt;
            }
        }
    }

    /// Priority-weighted throughput from the first event on, relative to full power.
    fn weighted_kept(&self) -> Option<f64> {
        let mut levels: Vec<i64> = self.priority.values().copied().collect();
        levels.sort_unstable();
        levels.dedup();
        let (mut kept, mut full) = (0.0, 0.0);
        for (name, &(rate_time, time)) in &self.after {
            let (Some(&f), Some(p)) = (self.full_rate.get(name), self.priority.get(name)) else { continue };
            if f <= 0.0 || time <= 0.0 {
                continue;
            }
            let weight = 1.0 + levels.partition_point(|l| l < p) as f64;
            kept += weight * rate_time / time;
            full += weight * f;
        }
        (full > 0.0).then(|| kept / full)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let title = self.scenario.as_deref().map(|s| format!(" — scenario {s}")).unwrap_or_default();
        let _ = writeln!(out, "\nSummary{title}");
        let _ = writeln!(out, "  ran                     {:.0} s", self.elapsed.as_secs_f64());
        let _ = writeln!(out, "  energy used             {:.3} kWh (measured draw)", self.energy_joules / 3.6e6);
        for (name, (first, last)) in &self.steps {
            let _ = writeln!(out, "  steps {name:<17} {}", last.saturating_sub(*first));
        }
        for (name, curve) in &self.curves {
            let _ = writeln!(out, "  curve {name:<17} {}", curve.sentence());
        }
        for (name, swing) in &self.swings {
            let _ = writeln!(out, "  swing {name:<17} largest {}", swing.sentence());
        }
        if let Some(swing) = &self.site_swing {
            let _ = writeln!(out, "  swing (site)            largest {}", swing.sentence());
        }
        match self.weighted_kept() {
            Some(k) if self.events > 0 => {
                let _ = writeln!(
                    out,
                    "  weighted throughput kept {:.1}% of full power, from the first event on",
                    k * 100.0
                );
            }
            _ => {
                let _ = writeln!(out, "  weighted throughput kept n/a (no power event)");
            }
        }
        let _ = writeln!(
            out,
            "  ramp (counted power)    from the first event on, rose at most {}/s over 1 s, {}/s over 60 s; fell at most {}/s over 1 s ({})",
            show_watts(self.ramp_rise.0),
            show_watts(self.ramp_rise.1),
            show_watts(-self.ramp_fall),
            self.ramp_limit.map_or("no ramp limit set".to_string(), |r| format!("limit {}/s", show_watts(r)))
        );
        for (name, (counted, measured)) in &self.domains {
            let _ = writeln!(
                out,
                "  domain {name:<16} settled, counted at most {:.0}% of its limit, measured at most {:.0}%",
                counted * 100.0,
                measured * 100.0
            );
        }
        let _ = writeln!(out, "  power events            {}", self.events);
        let _ = writeln!(out, "  worst event → every cap acknowledged  {:.0} ms", self.worst_ack.as_secs_f64() * 1e3);
        let _ = writeln!(out, "  budget violations       {}", self.violations);
        let _ = writeln!(
            out,
            "  measured violations     {}  (overdraw past settling {:.1} s)",
            self.measured_violations, self.overdraw_seconds
        );
        if self.infeasible_seen {
            let _ = writeln!(
                out,
                "  infeasible limit        yes: at times the limit was below what the cluster draws with every job paused"
            );
        }
        out
    }
}
