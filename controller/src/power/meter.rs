//! The meter as judge (invariant 1's last clause): measured draw — every GPU's reported power
//! plus every node's non-GPU draw — must be under the limit once the cluster has had time to
//! settle after a power event. Watt's own accounting can be right and the site still over its
//! limit (a node that ignores its caps, a model that is wrong); this is what would show it.
//!
//! Readings are judged only when every one of them was taken at least `settle` after the last
//! power event: a sum of readings that are a second or two old must not be held against a limit
//! that changed since. While judged measured draw is above the limit, the overdraw accumulates
//! (seconds, worst watts); on a feasible budget each such episode is one violation. On an
//! infeasible one (the limit is below the least the cluster can draw) the overdraw still counts,
//! but it is reported as infeasible, not as Watt failing.
//!
//! Pure: readings and times in, verdicts out. The controller runs it on a short period.

use std::time::Duration;

use tokio::time::Instant;

/// One look at the cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub now: Instant,
    /// Measured GPU and non-GPU draw, less what nodes that do not enforce draw above their orders.
    pub measured_watts: f64,
    pub limit_watts: f64,
    /// When the oldest reading in `measured_watts` was taken.
    pub taken_at: Instant,
    /// The last power event (a source, the site, a GPU turning foreign); `None`: none yet.
    pub last_event: Option<Instant>,
    /// Whether the limit can be met at all.
    pub feasible: bool,
}

/// What the meter has seen so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Meter {
    settle: Duration,
    pub violations: u64,
    pub overdraw_seconds: f64,
    pub worst_overdraw_watts: f64,
    /// In a violation episode now.
    pub violating: bool,
    last_look: Option<Instant>,
}

/// What one look found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Under the limit, or not yet judged.
    Fine,
    /// Over the limit after settling, and the limit is infeasible.
    OverInfeasible,
    /// Over the limit after settling on a feasible budget (a new episode counts once).
    Violation { new: bool },
}

impl Meter {
    pub fn new(settle: Duration) -> Self {
        Meter { settle, ..Meter::default() }
    }

    pub fn look(&mut self, r: Reading) -> Verdict {
        let since_last = self.last_look.map_or(Duration::ZERO, |t| r.now.saturating_duration_since(t));
        self.last_look = Some(r.now);
        let judged = r.last_event.is_none_or(|event| r.taken_at >= event + self.settle);
        let over = r.measured_watts > r.limit_watts;
        if !(judged && over) {
            self.violating = false;
            return Verdict::Fine;
        }
        self.overdraw_seconds += since_last.as_secs_f64();
        self.worst_overdraw_watts = self.worst_overdraw_watts.max(r.measured_watts - r.limit_watts);
        if !r.feasible {
            self.violating = false;
            return Verdict::OverInfeasible;
        }
        let new = !self.violating;
        if new {
            self.violations += 1;
        }
        self.violating = true;
        Verdict::Violation { new }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(now: Instant, measured: f64, taken_at: Instant, event: Instant, feasible: bool) -> Reading {
        Reading { now, measured_watts: measured, limit_watts: 1_000.0, taken_at, last_event: Some(event), feasible }
    }

    #[tokio::test(start_paused = true)]
    async fn overdraw_within_the_settle_time_after_an_event_is_not_a_violation() {
        let mut m = Meter::new(Duration::from_secs(2));
        let event = Instant::now();
        for _ in 0..7 {
            tokio::time::advance(Duration::from_millis(250)).await;
            let now = Instant::now();
            // Readings a second old, still over: the cluster is settling.
            assert_eq!(m.look(reading(now, 1_200.0, now - Duration::from_secs(1), event, true)), Verdict::Fine);
        }
        // 2.75 s after the event the readings (1 s old) are still within the settle time.
        assert_eq!((m.violations, m.overdraw_seconds), (0, 0.0));
        tokio::time::advance(Duration::from_millis(1_500)).await;
        let now = Instant::now();
        assert_eq!(m.look(reading(now, 900.0, now - Duration::from_secs(1), event, true)), Verdict::Fine);
        assert_eq!(m.violations, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn overdraw_past_the_settle_time_is_one_violation_per_episode_and_its_seconds_and_worst_count() {
        let mut m = Meter::new(Duration::from_secs(2));
        let event = Instant::now();
        tokio::time::advance(Duration::from_secs(5)).await;
        let mut verdicts = Vec::new();
        for measured in [1_100.0, 1_300.0, 1_050.0, 900.0, 1_010.0] {
            tokio::time::advance(Duration::from_millis(500)).await;
            let now = Instant::now();
            verdicts.push(m.look(reading(now, measured, now, event, true)));
        }
        assert_eq!(
            verdicts,
            vec![
                Verdict::Violation { new: true },
                Verdict::Violation { new: false },
                Verdict::Violation { new: false },
                Verdict::Fine,
                Verdict::Violation { new: true },
            ]
        );
        assert_eq!(m.violations, 2);
        assert_eq!(m.worst_overdraw_watts, 300.0);
        // Seconds between looks that found it over: the first look has no look before it.
        assert!((m.overdraw_seconds - 1.5).abs() < 1e-9, "{}", m.overdraw_seconds);
    }

    #[tokio::test(start_paused = true)]
    async fn an_infeasible_limit_counts_its_overdraw_but_no_violation() {
        let mut m = Meter::new(Duration::from_secs(2));
        let event = Instant::now();
        tokio::time::advance(Duration::from_secs(3)).await;
        m.look(reading(Instant::now(), 1_500.0, Instant::now(), event, false));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(m.look(reading(Instant::now(), 1_500.0, Instant::now(), event, false)), Verdict::OverInfeasible);
        assert_eq!((m.violations, m.overdraw_seconds, m.worst_overdraw_watts), (0, 1.0, 500.0));
    }
}
