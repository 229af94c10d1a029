//! Each running job's speed curve, learned from its workers' progress: the shell around
//! [`crate::power::speed_fit`].
//!
//! An observation is a window of at least [`WINDOW_MS`] over which the job ran under one cap:
//! rank 0's steps over the window's length, at the lowest cap any of the job's shards last
//! reported (a synchronous step runs at the pace of its slowest GPU). The agents send the cap in
//! force with each report, read back from the GPUs, so a node that does not enforce (dry-run,
//! enforcement off) teaches the cap it really ran under, not the one it was ordered. A window
//! restarts whenever that cap moves, the placement changes (each placement has its own
//! intercept in the fit), or the job made no step (a checkpoint, a stall: not the cap's doing).
//!
//! The prior comes from the job's GPU activity (the mean of its shards' tensor, FP and DRAM
//! shares, smoothed over reports); without it (GPUs without GPM) the shared curve.
//!
//! A curve is learned from caps that differ. When a job's curve is still uncertain and its cap
//! has not moved for [`PROBE_AFTER_STEADY_MS`] (nothing else teaches it), the book asks for a
//! probe: for [`PROBE_MS`] the allocator may lower the job's cap within its flex, where power is
//! short (see [`crate::power::allocator::PROBE_STEP`]); a window at the lower cap then says how
//! much speed the watts bought. At most one probe per job every [`PROBE_EVERY_MS`], and none
//! starts while the last allocation had power to spare.
//!
//! The book is in memory, like [`crate::progress`]: a new leader learns again from the next
//! reports, starting from the activity prior.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use watt_proto::v1 as pb;

use crate::power::curve::Curve;
use crate::power::speed_fit::{FittedCurves, Prior, PriorSource, SpeedFit};
use crate::NameMap;

/// The shortest window an observation is taken over.
pub const WINDOW_MS: i64 = 10_000;
/// How far a curve's exponent must move before power is shared again by it.
const REALLOCATE_AFTER: f64 = 0.02;
/// Weight of each new report in the smoothed activity.
const ACTIVITY_SMOOTHING: f64 = 0.05;
/// Caps closer than this (relative) are the same cap for a window.
const SAME_CAP: f64 = 0.005;
/// A curve less sure than this (the standard deviation of its exponent) is worth a probe...
const PROBE_WHILE_SD: f64 = 0.05;
/// ...once its cap has not moved for this long.
pub const PROBE_AFTER_STEADY_MS: i64 = 60_000;
/// How long a probe lowers the cap: a window once the new cap is in force, with room to spare.
pub const PROBE_MS: i64 = 3 * WINDOW_MS;
/// The least time between two probes of one job.
pub const PROBE_EVERY_MS: i64 = 600_000;

/// Which curves the allocator shares power by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CurvePolicy {
    /// Each job's learned curve.
    #[default]
    Learned,
    /// One curve for every job (Watt before it learned curves; for comparison).
    Shared,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    cap_watts: f64,
    from_ms: i64,
    from_step: u64,
}

#[derive(Debug)]
struct JobCurve {
    fit: SpeedFit,
    epoch: u64,
    /// Each shard's cap at its latest report in this placement.
    shard_caps: BTreeMap<u32, f64>,
    window: Option<Window>,
    /// Smoothed (math, memory) shares of the job's GPUs.
    activity: Option<(f64, f64)>,
    /// The curves power was last shared by.
    announced: FittedCurves,
    /// Since when the cap has not moved, in this placement.
    steady_since_ms: Option<i64>,
    /// Observations in this placement.
    observed: u32,
    /// A probe runs until then.
    probe_until_ms: Option<i64>,
    last_probe_ms: Option<i64>,
}

impl JobCurve {
    fn new() -> Self {
        JobCurve {
            fit: SpeedFit::new(Prior::shared()),
            epoch: 0,
            shard_caps: BTreeMap::new(),
            window: None,
            activity: None,
            announced: FittedCurves::default(),
            steady_since_ms: None,
            observed: 0,
            probe_until_ms: None,
            last_probe_ms: None,
        }
    }

    /// What a tick at `now_ms` changes of its probe: `Some(true)` starts one, `Some(false)`
    /// ends one.
    fn probe_change(&self, now_ms: i64) -> Option<bool> {
        match self.probe_until_ms {
            Some(until) => (now_ms >= until).then_some(false),
            None => {
                let wanted = self.observed > 0
                    && self.fit.exponent().1 >= PROBE_WHILE_SD
                    && self.steady_since_ms.is_some_and(|since| now_ms - since >= PROBE_AFTER_STEADY_MS)
                    && self.last_probe_ms.is_none_or(|last| now_ms - last >= PROBE_EVERY_MS);
                wanted.then_some(true)
            }
        }
    }

    fn take_activity(&mut self, a: &pb::GpuActivity) {
        let math = a.tensor_active.max(a.fp16_active).max(a.fp32_active).max(a.fp64_active);
        let memory = a.dram_active;
        if !(math.is_finite() && memory.is_finite()) {
            return;
        }
        let smoothed = match self.activity {
            None => (math, memory),
            Some((m, d)) => (m + ACTIVITY_SMOOTHING * (math - m), d + ACTIVITY_SMOOTHING * (memory - d)),
        };
        self.activity = Some(smoothed);
        if let Some(prior) = Prior::from_activity(smoothed.0, smoothed.1) {
            self.fit.set_prior(prior);
        }
    }

    /// Rank 0 reported `step` at `ms`: close a window if one ran long enough at one cap.
    fn take_step(&mut self, ms: i64, step: u64) {
        let Some(cap) = self.shard_caps.values().copied().reduce(f64::min) else {
            self.window = None;
            return;
        };
        let restart = Window { cap_watts: cap, from_ms: ms, from_step: step };
        if self.window.is_none_or(|w| (w.cap_watts - cap).abs() > SAME_CAP * cap) {
            self.steady_since_ms = Some(ms);
        }
        match self.window {
            Some(w) if (w.cap_watts - cap).abs() <= SAME_CAP * cap && step >= w.from_step && ms >= w.from_ms => {
                if ms - w.from_ms < WINDOW_MS {
                    return;
                }
                let steps = step - w.from_step;
                if steps > 0 {
                    self.fit.observe(self.epoch, cap, steps as f64 * 1_000.0 / (ms - w.from_ms) as f64);
                    self.observed += 1;
                }
                self.window = Some(restart);
            }
            _ => self.window = Some(restart),
        }
    }
}

/// Every running job's curve.
#[derive(Debug, Default)]
pub struct SpeedCurves {
    jobs: Mutex<NameMap<String, JobCurve>>,
    /// Grows whenever a curve moved enough to share power differently.
    generation: AtomicU64,
    /// Whether the last allocation found power short: probes start only then.
    power_short: AtomicBool,
}

impl SpeedCurves {
    fn lock(&self) -> std::sync::MutexGuard<'_, NameMap<String, JobCurve>> {
        self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Take a shard's report (already validated). Returns whether the job's curve moved enough
    /// that power should be shared again.
    pub fn record(&self, p: &pb::ShardProgress) -> bool {
        let mut jobs = self.lock();
        let job = jobs.entry(p.job.clone()).or_insert_with(JobCurve::new);
        if p.epoch < job.epoch {
            return false;
        }
        if p.epoch > job.epoch {
            job.epoch = p.epoch;
            job.shard_caps.clear();
            job.window = None;
            job.steady_since_ms = None;
            job.observed = 0;
        }
        if let Some(a) = &p.activity {
            job.take_activity(a);
        }
        match p.cap_watts {
            Some(cap) if cap.is_finite() && cap > 0.0 => {
                job.shard_caps.insert(p.shard, cap);
            }
            _ => {
                job.shard_caps.remove(&p.shard);
            }
        }
        if p.shard == 0 {
            job.take_step(p.unix_ms, p.step);
        }
        let now = job.fit.curves();
        let moved = |a: Curve, b: Curve| (a.exponent - b.exponent).abs() >= REALLOCATE_AFTER;
        if !moved(now.curve, job.announced.curve) && !moved(now.flex_curve, job.announced.flex_curve) {
            return false;
        }
        job.announced = now;
        self.generation.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Changes whenever [`SpeedCurves::record`] returned true.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Every job's curves as last announced, for the allocator, with the probes under way.
    pub fn curves(&self) -> NameMap<String, FittedCurves> {
        let probe = |job: &JobCurve| FittedCurves { probe: job.probe_until_ms.is_some(), ..job.announced };
        self.lock().iter().map(|(name, job)| (name.clone(), probe(job))).collect()
    }

    /// What the last allocation found: whether power is short.
    pub fn set_power_short(&self, short: bool) {
        self.power_short.store(short, Ordering::Relaxed);
    }

    /// What a tick at `now_ms` changes of `job`'s probe: none starts while power is to spare
    /// (the allocator would not lower a cap, and the curve does not matter then).
    fn probe_change(&self, job: &JobCurve, now_ms: i64) -> Option<bool> {
        job.probe_change(now_ms).filter(|&start| !start || self.power_short.load(Ordering::Relaxed))
    }

    /// Whether a [`SpeedCurves::tick`] at `now_ms` would start or end a probe.
    pub fn probe_due(&self, now_ms: i64) -> bool {
        self.lock().values().any(|job| self.probe_change(job, now_ms).is_some())
    }

    /// Start the probes due at `now_ms` and end those over; power is shared again (the
    /// generation moves) when any did. Returns whether any did.
    pub fn tick(&self, now_ms: i64) -> bool {
        let mut changed = false;
        for job in self.lock().values_mut() {
            match self.probe_change(job, now_ms) {
                Some(true) => {
                    job.probe_until_ms = Some(now_ms + PROBE_MS);
                    job.last_probe_ms = Some(now_ms);
                }
                Some(false) => job.probe_until_ms = None,
                None => continue,
            }
            changed = true;
        }
        if changed {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        changed
    }

    /// A job's curve as `wattctl describe job` shows it.
    pub fn describe(&self, job: &str, in_use: bool) -> Option<pb::SpeedCurve> {
        let jobs = self.lock();
        let job = jobs.get(job)?;
        let (exponent, sd) = job.fit.exponent();
        let curve = Curve { exponent };
        let source = if job.fit.measured() {
            pb::SpeedCurveSource::Measured
        } else if job.fit.prior().source == PriorSource::Activity {
            pb::SpeedCurveSource::Activity
        } else {
            pb::SpeedCurveSource::Shared
        };
        Some(pb::SpeedCurve {
            exponent,
            exponent_sd: sd,
            observations: job.fit.observations(),
            distinct_caps: job.fit.distinct_caps(),
            source: source as i32,
            speed_at_60_percent: curve.speed(0.6, 1.0),
            speed_at_80_percent: curve.speed(0.8, 1.0),
            in_use,
            probing: job.probe_until_ms.is_some(),
        })
    }

    /// Forget jobs that no longer run.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|name, _| keep(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(shard: u32, epoch: u64, ms: i64, step: u64, cap: f64, activity: Option<(f64, f64)>) -> pb::ShardProgress {
        pb::ShardProgress {
            job: "j".into(),
            shard,
            epoch,
            step,
            unix_ms: ms,
            cap_watts: Some(cap),
            activity: activity.map(|(tensor, dram)| pb::GpuActivity {
                tensor_active: tensor,
                dram_active: dram,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Two shards report every second for `seconds`; the job runs `exponent`'s curve at `cap`.
    fn run(book: &SpeedCurves, epoch: u64, from_s: i64, seconds: i64, cap: f64, exponent: f64, step: &mut f64) -> bool {
        let mut moved = false;
        for s in from_s..from_s + seconds {
            *step += 4.0 * (cap / 700.0f64).powf(exponent);
            moved |= book.record(&report(1, epoch, s * 1_000, 0, cap, None));
            moved |= book.record(&report(0, epoch, s * 1_000, *step as u64, cap, None));
        }
        moved
    }

    #[test]
    fn a_job_measured_at_several_caps_learns_its_curve_and_says_so() {
        let book = SpeedCurves::default();
        let mut step = 0.0;
        assert!(!run(&book, 1, 0, 60, 700.0, 0.6, &mut step), "one cap: nothing to learn");
        let before = book.describe("j", true).unwrap();
        assert_eq!(before.source(), pb::SpeedCurveSource::Shared);
        assert_eq!(before.distinct_caps, 1);
        assert!(before.observations >= 5, "{before:?}");
        let generation = book.generation();
        let moved = run(&book, 1, 60, 60, 500.0, 0.6, &mut step) | run(&book, 1, 120, 60, 600.0, 0.6, &mut step);
        assert!(moved && book.generation() > generation, "a steep curve moves far from the shared one");
        let after = book.describe("j", true).unwrap();
        assert_eq!(after.source(), pb::SpeedCurveSource::Measured);
        assert!((after.exponent - 0.6).abs() < 0.05, "{after:?}");
        assert!(after.exponent_sd < before.exponent_sd, "{after:?}");
        assert!((after.speed_at_80_percent - 0.8f64.powf(after.exponent)).abs() < 1e-9);
        let announced = book.curves()["j"].curve.exponent;
        assert!((announced - after.exponent).abs() < REALLOCATE_AFTER, "{announced}");
    }

    #[test]
    fn a_cap_change_on_one_shard_and_a_new_placement_restart_the_window() {
        let book = SpeedCurves::default();
        // Shard 1 under a lower cap: the job runs at its pace, and that is the cap learnt.
        for s in 0..25 {
            book.record(&report(1, 1, s * 1_000, 0, 400.0, None));
            book.record(&report(0, 1, s * 1_000, (s * 2) as u64, 700.0, None));
        }
        let jobs = book.lock();
        let job = &jobs["j"];
        assert_eq!(job.window.map(|w| w.cap_watts), Some(400.0));
        assert_eq!(job.fit.observations(), 2, "windows of 10 s from the second report");
        drop(jobs);
        // An older placement's report is ignored; a newer one starts afresh.
        book.record(&report(0, 0, 30_000, 999, 200.0, None));
        assert_eq!(book.lock()["j"].window.map(|w| w.cap_watts), Some(400.0));
        book.record(&report(0, 2, 31_000, 60, 700.0, None));
        let jobs = book.lock();
        assert_eq!(jobs["j"].shard_caps.len(), 1);
        assert_eq!(jobs["j"].window.map(|w| (w.cap_watts, w.from_step)), Some((700.0, 60)));
    }

    #[test]
    fn an_uncertain_curve_at_a_steady_cap_is_probed_then_not_again_for_a_while() {
        let book = SpeedCurves::default();
        let mut step = 0.0;
        run(&book, 1, 0, 60, 700.0, 0.5, &mut step);
        // The cap has not moved since the first report, at 0 s.
        assert!(!book.probe_due(PROBE_AFTER_STEADY_MS), "not while power is to spare");
        book.set_power_short(true);
        assert!(!book.probe_due(PROBE_AFTER_STEADY_MS - 1), "not before a steady minute");
        let generation = book.generation();
        assert!(book.tick(PROBE_AFTER_STEADY_MS) && book.generation() > generation);
        assert!(book.curves()["j"].probe && book.describe("j", true).unwrap().probing);
        assert!(!book.tick(PROBE_AFTER_STEADY_MS + PROBE_MS - 1), "it runs its span");
        assert!(book.tick(PROBE_AFTER_STEADY_MS + PROBE_MS), "then ends");
        assert!(!book.curves()["j"].probe);
        // Power was not short: the cap never moved, the curve is as unsure; not again so soon.
        let next = PROBE_AFTER_STEADY_MS + PROBE_EVERY_MS;
        assert!(!book.probe_due(next - 1) && book.probe_due(next));

        // Where the probe lowered the cap, the curve is learned, and no further probe is due.
        let book = SpeedCurves::default();
        book.set_power_short(true);
        let mut step = 0.0;
        run(&book, 1, 0, 60, 700.0, 0.5, &mut step);
        book.tick(60_000);
        run(&book, 1, 60, 30, 595.0, 0.5, &mut step);
        book.tick(90_000);
        run(&book, 1, 90, 700, 700.0, 0.5, &mut step);
        let learned = book.describe("j", true).unwrap();
        assert!(learned.exponent_sd < PROBE_WHILE_SD && (learned.exponent - 0.5).abs() < 0.05, "{learned:?}");
        assert!(!book.probe_due(90_000 + PROBE_EVERY_MS + 1), "a curve known well is not probed");
    }

    #[test]
    fn the_activity_prior_comes_before_any_measurement() {
        let book = SpeedCurves::default();
        let memory = book.record(&report(0, 1, 0, 0, 700.0, Some((0.15, 0.8))));
        assert!(memory, "a memory-bound job's prior is far from the shared curve");
        let d = book.describe("j", true).unwrap();
        assert_eq!(d.source(), pb::SpeedCurveSource::Activity);
        assert!(d.exponent < 0.15 && d.speed_at_60_percent > 0.93, "{d:?}");
        book.retain(|_| false);
        assert!(book.describe("j", true).is_none());
    }
}
