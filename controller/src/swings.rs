//! Power swings, per job and for the site: the shell around [`crate::power::swing`].
//!
//! Agents send their node's GPU power at every sampling round (10 Hz by default), summed over
//! the node and per job (`PowerTrace`, once a second). Once a second the controller lays every
//! node's rounds on one grid — 10 s at 10 Hz, ending two seconds ago so every node's trace has
//! arrived — holding each node's last round at each point, sums them for the site and per job,
//! and analyzes each sum: the swing (p95 − p5) and the share of its variation at 0.1–1 Hz and at
//! 1–5 Hz. A node whose rounds do not cover the window (it joined, left or fell silent) is left
//! out of that window rather than counted as a swing; one silent for 15 s is forgotten.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use watt_proto::v1 as pb;

use crate::power::swing::{Analyzer, Swing};
use crate::NameMap;

/// The window analyzed, the grid's step, and how far behind now it ends.
pub const WINDOW_MS: i64 = 10_000;
pub const STEP_MS: i64 = 100;
pub const DELAY_MS: i64 = 2_000;
/// A node's rounds must come this close to both ends of the window.
const COVER_MS: i64 = 600;
/// Rounds kept per node.
const KEEP_MS: i64 = WINDOW_MS + DELAY_MS + 3_000;

/// A node's recent rounds, as columns: a round's time, the node's watts, and per job seen on
/// it the job's watts (0 in rounds it was not there). Columns, not a list of rounds: the
/// once-a-second walk over 25,000 nodes reads them in order.
#[derive(Debug, Default)]
struct NodeTrace {
    times: VecDeque<i64>,
    node_watts: VecDeque<f32>,
    jobs: Vec<(String, VecDeque<f32>)>,
}

impl NodeTrace {
    fn push(&mut self, unix_ms: i64, node_watts: f32, watts_of: impl Fn(&str) -> Option<f32>, new_jobs: &[&str]) {
        for &job in new_jobs {
            if !self.jobs.iter().any(|(j, _)| j == job) {
                self.jobs.push((job.to_owned(), std::iter::repeat_n(0.0, self.times.len()).collect()));
            }
        }
        self.times.push_back(unix_ms);
        self.node_watts.push_back(node_watts);
        for (job, column) in &mut self.jobs {
            column.push_back(watts_of(job).unwrap_or(0.0));
        }
    }

    fn pop_front(&mut self) {
        self.times.pop_front();
        self.node_watts.pop_front();
        for (_, column) in &mut self.jobs {
            column.pop_front();
        }
    }
}

/// The swings of one window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SwingReport {
    pub site: Option<Swing>,
    pub jobs: BTreeMap<String, Swing>,
}

/// Every node's recent rounds.
#[derive(Debug, Default)]
pub struct Swings {
    nodes: Mutex<NameMap<String, NodeTrace>>,
}

impl Swings {
    fn lock(&self) -> std::sync::MutexGuard<'_, NameMap<String, NodeTrace>> {
        self.nodes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Take a node's trace (already validated: see `session::validate_trace`).
    pub fn record(&self, node: &str, trace: &pb::PowerTrace) {
        let mut nodes = self.lock();
        let rounds = match nodes.get_mut(node) {
            Some(rounds) => rounds,
            None => nodes.entry(node.to_owned()).or_default(),
        };
        let new_jobs: Vec<&str> = trace.jobs.iter().map(|j| j.job.as_str()).collect();
        for (i, (&offset, &watts)) in trace.offsets_ms.iter().zip(&trace.node_watts).enumerate() {
            let unix_ms = trace.start_unix_ms + i64::from(offset);
            if rounds.times.back().is_some_and(|&t| t >= unix_ms) {
                continue;
            }
            let watts_of = |job: &str| trace.jobs.iter().find(|j| j.job == job).and_then(|j| j.watts.get(i).copied());
            rounds.push(unix_ms, watts, watts_of, &new_jobs);
        }
        let newest = rounds.times.back().copied().unwrap_or(i64::MIN);
        while rounds.times.front().is_some_and(|&t| newest - t > KEEP_MS) {
            rounds.pop_front();
        }
        // A job gone from the node for all its kept rounds leaves it.
        rounds.jobs.retain(|(_, column)| column.iter().any(|&w| w > 0.0));
    }

    /// The swings of the window ending [`DELAY_MS`] before `now_unix_ms`.
    pub fn analyze(&self, now_unix_ms: i64) -> SwingReport {
        let end = now_unix_ms - DELAY_MS;
        let start = end - WINDOW_MS;
        let points = (WINDOW_MS / STEP_MS) as usize;
        let mut site = vec![0.0; points];
        let mut index: NameMap<String, usize> = NameMap::default();
        let mut series: Vec<Vec<f64>> = Vec::new();
        let mut any = false;
        // Which round is in force at each point of the grid, per node (reused).
        let mut at_point = vec![0usize; points];
        let mut nodes = self.lock();
        nodes.retain(|_, rounds| rounds.times.back().is_some_and(|&t| now_unix_ms - t <= KEEP_MS));
        for rounds in nodes.values() {
            let covers = rounds.times.front().is_some_and(|&t| t <= start + COVER_MS)
                && rounds.times.back().is_some_and(|&t| t >= end - COVER_MS);
            if !covers {
                continue;
            }
            any = true;
            // Walk the grid and the rounds together: the last round at or before each point.
            let mut at = 0usize;
            for (i, slot) in at_point.iter_mut().enumerate() {
                let t = start + i as i64 * STEP_MS + STEP_MS / 2;
                while at + 1 < rounds.times.len() && rounds.times[at + 1] <= t {
                    at += 1;
                }
                *slot = at;
                site[i] += f64::from(rounds.node_watts[at]);
            }
            for (job, column) in &rounds.jobs {
                let next = series.len();
                let k = match index.get(job.as_str()) {
                    Some(&k) => k,
                    None => {
                        index.insert(job.clone(), next);
                        series.push(vec![0.0; points]);
                        next
                    }
                };
                for (point, &at) in series[k].iter_mut().zip(&at_point) {
                    *point += f64::from(column[at]);
                }
            }
        }
        drop(nodes);
        let hz = 1_000.0 / STEP_MS as f64;
        let analyzer = Analyzer::new(points);
        SwingReport {
            site: if any { analyzer.analyze(&site, hz) } else { None },
            jobs: index.into_iter().filter_map(|(job, k)| Some((job, analyzer.analyze(&series[k], hz)?))).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `seconds` of a node's rounds every `every_ms` from `from_ms`: `watts(t)` for the node, all
    /// of it job `job`'s.
    fn trace(from_ms: i64, seconds: i64, every_ms: i64, job: &str, watts: impl Fn(i64) -> f64) -> pb::PowerTrace {
        let times: Vec<i64> = (0..seconds * 1_000 / every_ms).map(|i| from_ms + i * every_ms).collect();
        pb::PowerTrace {
            start_unix_ms: from_ms,
            offsets_ms: times.iter().map(|t| (t - from_ms) as u32).collect(),
            node_watts: times.iter().map(|&t| watts(t) as f32).collect(),
            jobs: vec![pb::JobTrace { job: job.into(), watts: times.iter().map(|&t| watts(t) as f32).collect() }],
        }
    }

    /// Training at 1 Hz: compute for 700 ms of each second (8 × 700 W), the all-reduce at 250 W.
    fn one_hertz(t: i64) -> f64 {
        if t.rem_euclid(1_000) < 700 {
            5_600.0
        } else {
            2_000.0
        }
    }

    #[test]
    fn a_one_hertz_job_on_two_nodes_swings_in_the_one_to_five_hertz_band_and_the_site_with_it() {
        let swings = Swings::default();
        // Two nodes of the same job, in step; sampled at 10 Hz, a few ms apart.
        swings.record("a", &trace(0, 20, 100, "train", one_hertz));
        swings.record("b", &trace(7, 20, 100, "train", one_hertz));
        // A third node, idle and flat, and a fourth that joined late: left out.
        swings.record("c", &trace(3, 20, 100, "other", |_| 560.0));
        swings.record("d", &trace(15_000, 5, 100, "late", one_hertz));
        let report = swings.analyze(20_000);
        let job = report.jobs["train"];
        assert!((job.swing_watts - 2.0 * 3_600.0).abs() < 1e-6, "{job:?}");
        assert!(job.band_shares[1] > 0.99 && job.band_shares[0] < 0.01, "{job:?}");
        assert_eq!(report.jobs["other"].swing_watts, 0.0);
        assert!(!report.jobs.contains_key("late"), "a node that does not cover the window is left out");
        let site = report.site.unwrap();
        assert!((site.mean_watts - report.jobs["train"].mean_watts - 560.0).abs() < 1e-6, "{site:?}");
        assert!(site.band_shares[1] > 0.99, "{site:?}");
    }

    #[test]
    fn five_hertz_sampling_and_silence_are_handled() {
        let swings = Swings::default();
        // Sampled at 5 Hz: each round held over two grid points; a slow 0.2 Hz load.
        swings.record("a", &trace(0, 20, 200, "ckpt", |t| if t.rem_euclid(5_000) < 4_000 { 5_600.0 } else { 1_000.0 }));
        let report = swings.analyze(20_000);
        assert!(report.jobs["ckpt"].band_shares[0] > 0.8, "{report:?}");
        // Long silent: nothing to say, and the node is forgotten.
        assert_eq!(swings.analyze(60_000), SwingReport::default());
        assert!(swings.lock().is_empty());
    }
}
