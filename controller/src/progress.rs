//! Job progress from the workers' reports: steps, samples and loss as rank 0 reports them, and
//! over the last 30 s the rates — steps/s, samples/s — and the **energy per step**: the power
//! drawn by every shard's GPUs (each shard's energy-counter increase over its own window, summed)
//! divided by the step rate.
//!
//! Rates are kept per placement (epoch): a resize starts a new window, since the GPUs and the
//! world size changed. The book is in memory: after a controller restart it fills again from
//! the next reports.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use watt_proto::v1 as pb;

/// Rates are measured over this much of the latest reports.
const WINDOW_MS: i64 = 30_000;

#[derive(Debug, Default)]
struct JobBook {
    epoch: u64,
    latest: Option<pb::ShardProgress>,
    /// Rank 0's reports: (ms, step, samples).
    steps: VecDeque<(i64, u64, u64)>,
    /// Each shard's energy readings: (ms, joules).
    energy: HashMap<u32, VecDeque<(i64, f64)>>,
}

fn trim<T>(window: &mut VecDeque<(i64, T)>, now: i64)
where
    (i64, T): Clone,
{
    while window.len() > 2 && window.front().is_some_and(|(t, _)| now - t > WINDOW_MS) {
        window.pop_front();
    }
}

#[derive(Debug, Default)]
pub struct ProgressBook {
    jobs: Mutex<HashMap<String, JobBook>>,
}

impl ProgressBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, JobBook>> {
        self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Take a shard's report (already validated).
    pub fn record(&self, p: pb::ShardProgress) {
        let mut jobs = self.lock();
        let book = jobs.entry(p.job.clone()).or_default();
        if p.epoch < book.epoch {
            return;
        }
        if p.epoch > book.epoch {
            *book = JobBook { epoch: p.epoch, latest: book.latest.take(), ..JobBook::default() };
        }
        let energy = book.energy.entry(p.shard).or_default();
        if energy.back().is_none_or(|(t, _)| p.unix_ms > *t) {
            energy.push_back((p.unix_ms, p.energy_joules));
            trim(energy, p.unix_ms);
        }
        if p.shard == 0 {
            if book.steps.back().is_none_or(|(t, _, _)| p.unix_ms > *t) {
                book.steps.push_back((p.unix_ms, p.step, p.samples));
                while book.steps.len() > 2 && book.steps.front().is_some_and(|(t, _, _)| p.unix_ms - t > WINDOW_MS) {
                    book.steps.pop_front();
                }
            }
            book.latest = Some(p);
        }
    }

    /// A job's progress, if its rank 0 has reported.
    pub fn job(&self, name: &str) -> Option<pb::JobProgress> {
        let jobs = self.lock();
        let book = jobs.get(name)?;
        let latest = book.latest.as_ref()?;
        let mut out = pb::JobProgress {
            step: latest.step,
            samples: latest.samples,
            loss: latest.loss,
            updated_unix_ms: latest.unix_ms,
            ..Default::default()
        };
        if let (Some(first), Some(last)) = (book.steps.front(), book.steps.back()) {
            let seconds = (last.0 - first.0) as f64 / 1000.0;
            if seconds > 0.0 {
                out.steps_per_second = last.1.saturating_sub(first.1) as f64 / seconds;
                out.samples_per_second = last.2.saturating_sub(first.2) as f64 / seconds;
            }
        }
        let watts: f64 = book
            .energy
            .values()
            .filter_map(|w| {
                let (first, last) = (w.front()?, w.back()?);
                let seconds = (last.0 - first.0) as f64 / 1000.0;
                (seconds > 0.0).then(|| (last.1 - first.1).max(0.0) / seconds)
            })
            .sum();
        if out.steps_per_second > 0.0 {
            out.energy_per_step_joules = watts / out.steps_per_second;
        }
        Some(out)
    }

    /// Forget jobs that no longer run.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|name, _| keep(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(shard: u32, epoch: u64, ms: i64, step: u64, joules: f64) -> pb::ShardProgress {
        pb::ShardProgress {
            job: "j".into(),
            shard,
            epoch,
            step,
            samples: step * 256,
            loss: Some(0.5),
            energy_joules: joules,
            unix_ms: ms,
            ..Default::default()
        }
    }

    #[test]
    fn rates_and_energy_per_step_over_the_window() {
        let book = ProgressBook::default();
        assert!(book.job("j").is_none());
        // Two shards, each drawing 1,400 W (2 GPUs × 700 W); rank 0 does 10 steps a second.
        for s in 0..=10 {
            let ms = 1_000 * s;
            book.record(report(1, 3, ms, 0, 1_400.0 * s as f64));
            book.record(report(0, 3, ms, 10 * s as u64, 1_400.0 * s as f64));
        }
        let p = book.job("j").unwrap();
        assert_eq!((p.step, p.samples), (100, 25_600));
        assert!((p.steps_per_second - 10.0).abs() < 1e-9, "{p:?}");
        assert!((p.samples_per_second - 2_560.0).abs() < 1e-6);
        assert!((p.energy_per_step_joules - 280.0).abs() < 1e-6, "2,800 W / 10 steps/s: {p:?}");

        // A new placement starts new rates; an old epoch's late report is ignored.
        book.record(report(0, 4, 20_000, 100, 0.0));
        book.record(report(0, 3, 21_000, 999, 0.0));
        let p = book.job("j").unwrap();
        assert_eq!((p.step, p.steps_per_second), (100, 0.0));
        book.retain(|_| false);
        assert!(book.job("j").is_none());
    }
}
