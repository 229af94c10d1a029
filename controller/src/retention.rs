//! How many jobs the controller keeps, so no client can fill the store's disk: limits on
//! submissions (jobs not yet ended per principal, jobs stored in all), and the retention of ended
//! jobs (by default kept 7 days, and at most the newest 10,000), removed by a sweep once a minute
//! (more often when jobs are kept less than four minutes).
//! The choice of what to remove is pure ([`expired`]); the sweep is the shell around it.

use std::sync::Arc;
use std::time::Duration;

use crate::jobs::JobRecord;
use crate::reconcile::Controller;

/// How long ended jobs are kept, and how many at most.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    pub keep_for: Duration,
    pub keep_count: usize,
}

/// What one client may have stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobLimits {
    /// Jobs not ended yet, per principal.
    pub per_principal: usize,
    /// Jobs stored in all, ended ones included.
    pub total: usize,
}

/// The ended jobs to remove at `now_ms`: those that ended longer ago than `keep_for`, and all but
/// the newest `keep_count` of the rest. Jobs that have not ended are never chosen.
pub fn expired<'a>(jobs: impl Iterator<Item = &'a JobRecord>, now_ms: i64, retention: Retention) -> Vec<String> {
    let mut ended: Vec<(i64, &str)> =
        jobs.filter(|j| j.state.is_terminal()).map(|j| (j.ended_unix_ms(), j.spec.name.as_str())).collect();
    // Newest first (name breaks ties, so the choice does not depend on map order).
    ended.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let oldest_kept = now_ms.saturating_sub(retention.keep_for.as_millis() as i64);
    ended
        .iter()
        .enumerate()
        .filter(|(i, (at, _))| *i >= retention.keep_count || *at < oldest_kept)
        .map(|(_, (_, name))| name.to_string())
        .collect()
}

/// Remove expired jobs until `stop` resolves: once a minute, or four times per `keep_for` when
/// that is shorter (at least a second apart).
pub async fn sweep(controller: Arc<Controller>, stop: impl std::future::Future<Output = ()>) {
    let every = (controller.settings.retention.keep_for / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut every_minute = tokio::time::interval(every);
    every_minute.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = every_minute.tick() => {}
            () = &mut stop => return,
        }
        controller.remove_expired_jobs().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::JobState;

    fn job(name: &str, state: JobState, submitted_ms: i64) -> JobRecord {
        let spec = crate::spec::JobSpec::from_manifest(&format!(
            "name: {name}\nshards: {{min: 1, max: 1}}\ngpus_per_shard: 1\ncommand: [x]\n"
        ))
        .unwrap();
        let mut record = JobRecord::new_for_tests(spec);
        record.state = state;
        record.submitted_unix_ms = submitted_ms;
        record
    }

    #[test]
    fn old_ended_jobs_and_those_past_the_count_go_and_live_ones_stay() {
        let day = 86_400_000;
        let now = 30 * day;
        let jobs = [
            job("running-old", JobState::Running, 0),
            job("pending-old", JobState::Pending, 0),
            job("done-old", JobState::Succeeded, 20 * day),
            job("failed-new", JobState::Failed, 29 * day),
            job("cancelled-new", JobState::Cancelled, 29 * day + 1),
            job("done-newest", JobState::Succeeded, 29 * day + 2),
        ];
        let week = Retention { keep_for: Duration::from_secs(7 * 86_400), keep_count: 10 };
        assert_eq!(expired(jobs.iter(), now, week), ["done-old"]);
        let two = Retention { keep_for: Duration::from_secs(7 * 86_400), keep_count: 2 };
        assert_eq!(expired(jobs.iter(), now, two), ["failed-new", "done-old"]);
        let none = Retention { keep_for: Duration::ZERO, keep_count: 0 };
        let mut all = expired(jobs.iter(), now, none);
        all.sort();
        assert_eq!(all, ["cancelled-new", "done-newest", "done-old", "failed-new"], "never a live job");
    }
}
