//! The site's ramp limit: how fast the power Watt counts may rise, as grid operators now limit a
//! large load's ramp (MW per second, MW per minute). Pure: the counted power over the last
//! minute in, how high it may go now out.
//!
//! Counted power is a step function of time (it changes when caps are ordered and acknowledged,
//! shards start and stop, GPUs turn foreign). The limit holds over two windows, a second and a
//! minute: for every window of either length, what is counted at its end exceeds what was
//! counted at any moment in it by no more than the ramp × its length. So the ceiling on what may
//! be counted now is the lowest value of the last second plus one second of ramp, or the lowest
//! of the last minute plus a minute of ramp, whichever is lower — and because the new value then
//! stands until the next change, every window that will end with it in force is kept too. Each
//! lookback is [`GUARD_MS`] longer than its window, so clocks a little apart agree.
//!
//! Only rises are limited here: a decrease Watt is made to take (a source cut) is an emergency
//! and is never slowed.

use std::collections::VecDeque;

/// The windows the ramp is held over, in ms.
pub const WINDOWS_MS: [i64; 2] = [1_000, 60_000];
/// How much further back the ceiling looks than each window: a rise that lands just as a window
/// closes on the one before it would, on a clock a few milliseconds off (the status' wall clock
/// against the pass's monotonic one, a meter reading taken a little late), show as two in one
/// window. Costs at most 5% of the ramp.
pub const GUARD_MS: i64 = 50;

/// Counted power over the last minute.
#[derive(Debug, Clone, Default)]
pub struct CountedHistory {
    /// (ms, watts counted from then on), oldest first; the first may be older than a minute: it
    /// is what was in force when the window opened.
    samples: VecDeque<(i64, f64)>,
}

impl CountedHistory {
    /// `watts` are counted from `now_ms` on. Times that go back are taken as now.
    pub fn record(&mut self, now_ms: i64, watts: f64) {
        if !watts.is_finite() {
            return;
        }
        let now_ms = self.samples.back().map_or(now_ms, |&(t, _)| now_ms.max(t));
        match self.samples.back_mut() {
            Some(last) if last.0 == now_ms => last.1 = watts,
            Some(last) if last.1 == watts => {}
            _ => self.samples.push_back((now_ms, watts)),
        }
        let oldest = now_ms - WINDOWS_MS[1];
        // Keep one sample at or before the oldest window's start: the value in force there.
        while self.samples.len() > 1 && self.samples[1].0 <= oldest {
            self.samples.pop_front();
        }
    }

    /// What is counted now (the last record).
    pub fn latest(&self) -> Option<f64> {
        self.samples.back().map(|&(_, w)| w)
    }

    /// The lowest value counted in the window `[now - window, now]`; none before any record.
    pub fn lowest(&self, now_ms: i64, window_ms: i64) -> Option<f64> {
        let from = now_ms - window_ms;
        let in_force_at_start = self.samples.iter().rev().find(|&&(t, _)| t <= from).map(|&(_, w)| w);
        self.samples
            .iter()
            .filter(|&&(t, _)| t > from && t <= now_ms)
            .map(|&(_, w)| w)
            .chain(in_force_at_start)
            .reduce(f64::min)
    }

    /// What may be counted at `now_ms` under a ramp of `watts_per_second`: infinite before any
    /// record.
    pub fn ceiling(&self, now_ms: i64, watts_per_second: f64) -> f64 {
        WINDOWS_MS
            .iter()
            .filter_map(|&w| Some(self.lowest(now_ms, w + GUARD_MS)? + watts_per_second * w as f64 / 1_000.0))
            .fold(f64::INFINITY, f64::min)
    }

    /// How fast counted power moved over the window ending now, W/s: what is counted now less
    /// what was counted at the window's start (the oldest record if the history is shorter),
    /// over its length. Negative when it fell.
    pub fn rate(&self, now_ms: i64, window_ms: i64) -> f64 {
        let Some(&(_, now)) = self.samples.iter().rev().find(|&&(t, _)| t <= now_ms) else { return 0.0 };
        let from = now_ms - window_ms;
        let then =
            self.samples.iter().rev().find(|&&(t, _)| t <= from).or(self.samples.front()).map_or(now, |&(_, w)| w);
        (now - then) / (window_ms as f64 / 1_000.0)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_ceiling_is_the_lowest_of_the_last_second_plus_a_second_of_ramp_or_of_the_minute_plus_a_minute() {
        let mut h = CountedHistory::default();
        assert_eq!(h.ceiling(0, 1_000.0), f64::INFINITY);
        h.record(0, 10_000.0);
        // 1 kW/s: a second after, 11 kW.
        assert_eq!(h.ceiling(1_000, 1_000.0), 11_000.0);
        h.record(1_000, 11_000.0);
        // Half a second later: the second's lowest (10 kW at its start) + 1 kW.
        assert_eq!(h.ceiling(1_500, 1_000.0), 11_000.0);
        // A dip counts: after falling to 5 kW, the next second may reach only 6 kW.
        h.record(2_000, 5_000.0);
        assert_eq!(h.ceiling(2_500, 1_000.0), 6_000.0);
        // The minute: at 200 W/s a minute holds 12 kW more than its lowest, a second 200 W.
        assert_eq!(h.ceiling(2_500, 200.0), 5_200.0);
        assert!((h.rate(2_000, 1_000) + 6_000.0).abs() < 1e-9, "fell 6 kW in a second");
        // Older than a minute is forgotten, but the value in force at the window's start is kept.
        h.record(70_000, 5_000.0);
        assert_eq!(h.lowest(70_000, 60_000), Some(5_000.0));
        assert!((h.rate(70_000, 60_000)).abs() < 1e-9);
    }

    proptest! {
        /// Raising counted power to the ceiling every time, at any moments, never rises faster
        /// than the ramp over any window of either length.
        #[test]
        fn rising_to_the_ceiling_keeps_every_window(
            steps in proptest::collection::vec((1i64..3_000, -5_000.0f64..5_000.0, any::<bool>()), 1..200),
            ramp in 10.0f64..5_000.0,
        ) {
            let mut h = CountedHistory::default();
            let mut now = 0;
            let mut watts = 50_000.0;
            let mut trace = vec![(0i64, watts)];
            h.record(now, watts);
            for (dt, change, greedy) in steps {
                now += dt;
                // Falls come whenever (a cut is never slowed); rises only up to the ceiling.
                watts = if greedy || change > 0.0 { (watts + change.abs() * 10.0).min(h.ceiling(now, ramp)) } else { (watts + change).max(0.0) };
                h.record(now, watts);
                trace.push((now, watts));
            }
            // Every window's end against every value in force within it.
            for &(end, at_end) in &trace {
                for window in WINDOWS_MS {
                    let lowest = trace
                        .iter()
                        .filter(|&&(t, _)| t > end - window && t <= end)
                        .map(|&(_, w)| w)
                        .chain(trace.iter().rev().find(|&&(t, _)| t <= end - window).map(|&(_, w)| w))
                        .fold(f64::INFINITY, f64::min);
                    prop_assert!(at_end - lowest <= ramp * window as f64 / 1_000.0 + 1e-6,
                        "window {window} ms ending at {end}: {at_end} from {lowest}");
                }
            }
        }
    }
}
