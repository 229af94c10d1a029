//! The grid's schedule: limits a utility or aggregator sets on the site's import, or on one
//! power domain, over windows of time (OpenADR 3 events, read by [`crate::openadr`]). A window
//! is in force from its start to its end; its limit can only lower what the sources give, never
//! raise it. After its end the limit lifts along the grid sources' ramp, as a restored source
//! does, so an event's end is a restore and not a step.
//!
//! Stored whole as `power/grid-schedule` (JSON) with the sources ([`super::table`]). Pure: times
//! are Unix milliseconds passed in.

use serde::{Deserialize, Serialize};

pub const GRID_SCHEDULE_KEY: &str = "power/grid-schedule";
/// More windows than this is a VTN gone wrong, not a program (a day of 5-minute intervals is
/// 288 of them).
pub const MAX_WINDOWS: usize = 10_000;

/// What a window limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GridTarget {
    /// The site's import from the grid: what its grid sources may supply together.
    Site,
    /// One power domain, by name: its limit, besides its breaker's.
    Domain(String),
}

/// A window's limit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum GridLimit {
    /// At most this many watts.
    Watts(f64),
    /// This share (0–1) of what the target's supply would be without the window: a `SIMPLE`
    /// event's level, by the configured percentages.
    Share(f64),
}

impl GridLimit {
    /// The limit over a target whose supply without it is `supply`.
    pub fn watts(self, supply: f64) -> f64 {
        match self {
            GridLimit::Watts(w) => w,
            GridLimit::Share(share) => share * supply,
        }
    }
}

/// One interval of one event: a limit on a target from `start` to `end`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridWindow {
    /// The VTN's event id, and the interval's id within it.
    pub event: String,
    pub interval: i32,
    /// The program the event belongs to and its name, for operators.
    pub program: String,
    #[serde(default)]
    pub event_name: Option<String>,
    pub target: GridTarget,
    pub limit: GridLimit,
    /// In force from `start_unix_ms` (randomizeStart applied) to `end_unix_ms`.
    pub start_unix_ms: i64,
    pub end_unix_ms: i64,
}

impl GridWindow {
    pub fn in_force(&self, now_unix_ms: i64) -> bool {
        (self.start_unix_ms..self.end_unix_ms).contains(&now_unix_ms)
    }

    /// The limit it sets at `now` on a target whose supply without it is `supply`: its own in
    /// force, then, after its end, lifting at `restore_watts_per_second` (`None`: at once).
    fn limit_at(&self, now_unix_ms: i64, supply: f64, restore_watts_per_second: Option<f64>) -> Option<f64> {
        if now_unix_ms < self.start_unix_ms {
            return None;
        }
        let limit = self.limit.watts(supply);
        if now_unix_ms < self.end_unix_ms {
            return Some(limit);
        }
        let rate = restore_watts_per_second?;
        let lifted = limit + rate * (now_unix_ms - self.end_unix_ms) as f64 / 1000.0;
        (lifted < supply).then_some(lifted)
    }
}

/// Every window known, in no particular order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GridSchedule {
    pub windows: Vec<GridWindow>,
}

impl GridSchedule {
    /// What `target` may draw at `now`, its supply without the grid being `supply`: the lowest
    /// limit of the windows on it, never above `supply`.
    pub fn limit(&self, target: &GridTarget, now_unix_ms: i64, supply: f64, restore: Option<f64>) -> f64 {
        self.windows
            .iter()
            .filter(|w| &w.target == target)
            .filter_map(|w| w.limit_at(now_unix_ms, supply, restore))
            .fold(supply, f64::min)
    }

    /// The windows in force at `now`.
    pub fn in_force(&self, now_unix_ms: i64) -> impl Iterator<Item = &GridWindow> {
        self.windows.iter().filter(move |w| w.in_force(now_unix_ms))
    }

    /// The next start or end after `now`, when a pass must look at the budget again.
    pub fn next_change_after(&self, now_unix_ms: i64) -> Option<i64> {
        self.windows.iter().flat_map(|w| [w.start_unix_ms, w.end_unix_ms]).filter(|t| *t > now_unix_ms).min()
    }

    /// Whether any window is lifting after its end at `now` (time alone moves the budget).
    pub fn restoring(&self, now_unix_ms: i64, restore: Option<f64>, supply_of: impl Fn(&GridTarget) -> f64) -> bool {
        restore.is_some()
            && self.windows.iter().any(|w| {
                now_unix_ms >= w.end_unix_ms && w.limit_at(now_unix_ms, supply_of(&w.target), restore).is_some()
            })
    }

    /// Whether `next` can only lower what any target may draw: it keeps every window of this
    /// one and adds others (invariant 10: a change that may raise the budget — a window dropped,
    /// even one that ended and is still lifting — is stored before it applies).
    pub fn only_tightens_to(&self, next: &GridSchedule) -> bool {
        self.windows.iter().all(|w| next.windows.contains(w))
    }

    /// The schedule without the windows that ended before `before`.
    pub fn pruned(&self, before_unix_ms: i64) -> GridSchedule {
        GridSchedule { windows: self.windows.iter().filter(|w| w.end_unix_ms >= before_unix_ms).cloned().collect() }
    }
}

/// A window of `watts` on `target` from `start` to `end`, interval 0 of program `dr`.
#[cfg(test)]
pub fn window(event: &str, target: GridTarget, watts: f64, start: i64, end: i64) -> GridWindow {
    GridWindow {
        event: event.into(),
        interval: 0,
        program: "dr".into(),
        event_name: None,
        target,
        limit: GridLimit::Watts(watts),
        start_unix_ms: start,
        end_unix_ms: end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_lowers_its_target_in_force_and_lifts_along_the_restore_ramp_after() {
        let schedule = GridSchedule { windows: vec![window("e1", GridTarget::Site, 6_000.0, 10_000, 40_000)] };
        let site = GridTarget::Site;
        assert_eq!(schedule.limit(&site, 9_999, 8_000.0, None), 8_000.0, "not yet");
        assert_eq!(schedule.limit(&site, 10_000, 8_000.0, None), 6_000.0, "from its start");
        assert_eq!(schedule.limit(&site, 39_999, 8_000.0, None), 6_000.0);
        assert_eq!(schedule.limit(&site, 40_000, 8_000.0, None), 8_000.0, "no ramp: at once");
        assert_eq!(schedule.limit(&site, 40_000, 8_000.0, Some(1_000.0)), 6_000.0, "a ramp: from the limit");
        assert_eq!(schedule.limit(&site, 41_000, 8_000.0, Some(1_000.0)), 7_000.0);
        assert_eq!(schedule.limit(&site, 45_000, 8_000.0, Some(1_000.0)), 8_000.0, "never above the supply");
        assert_eq!(schedule.limit(&site, 20_000, 5_000.0, None), 5_000.0, "never above the supply");
        assert_eq!(schedule.limit(&GridTarget::Domain("rack-1".into()), 20_000, 8_000.0, None), 8_000.0);
        assert!(schedule.restoring(41_000, Some(1_000.0), |_| 8_000.0));
        assert!(!schedule.restoring(43_000, Some(1_000.0), |_| 8_000.0));
        assert_eq!(schedule.next_change_after(0), Some(10_000));
        assert_eq!(schedule.next_change_after(10_000), Some(40_000));
        assert_eq!(schedule.next_change_after(40_000), None);
    }

    #[test]
    fn the_lowest_window_in_force_wins_and_a_share_follows_the_supply() {
        let mut schedule = GridSchedule { windows: vec![window("e1", GridTarget::Site, 6_000.0, 0, 100)] };
        schedule
            .windows
            .push(GridWindow { limit: GridLimit::Share(0.5), ..window("e2", GridTarget::Site, 0.0, 50, 200) });
        assert_eq!(schedule.limit(&GridTarget::Site, 10, 10_000.0, None), 6_000.0);
        assert_eq!(schedule.limit(&GridTarget::Site, 60, 10_000.0, None), 5_000.0);
        assert_eq!(schedule.limit(&GridTarget::Site, 150, 4_000.0, None), 2_000.0);
    }

    #[test]
    fn only_additions_tighten() {
        let old = GridSchedule { windows: vec![window("e1", GridTarget::Site, 6_000.0, 1_000, 2_000)] };
        let mut more = old.clone();
        more.windows.push(window("e2", GridTarget::Site, 5_000.0, 3_000, 4_000));
        assert!(old.only_tightens_to(&more));
        assert!(!more.only_tightens_to(&old), "a window dropped before its end");
        let mut moved = old.clone();
        moved.windows[0].limit = GridLimit::Watts(7_000.0);
        assert!(!old.only_tightens_to(&moved), "a limit changed");
        assert!(!old.only_tightens_to(&GridSchedule::default()), "an ended window may still be lifting");
        assert_eq!(old.pruned(2_001).windows.len(), 0);
        assert_eq!(old.pruned(2_000).windows.len(), 1);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn any_window() -> impl Strategy<Value = GridWindow> {
            (0u8..3, 0u8..2, 0.0f64..12_000.0, 0.0f64..1.0, 0i64..100, 1i64..60, any::<bool>()).prop_map(
                |(event, target, watts, share, start, length, is_share)| GridWindow {
                    limit: if is_share { GridLimit::Share(share) } else { GridLimit::Watts(watts) },
                    start_unix_ms: start * 1_000,
                    end_unix_ms: (start + length) * 1_000,
                    ..window(
                        &format!("e{event}"),
                        if target == 0 { GridTarget::Site } else { GridTarget::Domain("rack-1".into()) },
                        0.0,
                        0,
                        1,
                    )
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            /// Whatever the VTN sends, a window only lowers what the sources give: never a limit
            /// above the supply, the supply itself with no window in force or lifting, each
            /// window in force binding; and a schedule that only adds windows (a tightening,
            /// applied before it is stored) lowers or keeps every limit at every moment.
            #[test]
            fn windows_never_raise_a_limit_and_additions_only_lower(
                windows in prop::collection::vec(any_window(), 0..8),
                more in prop::collection::vec(any_window(), 0..4),
                supply in 0.0f64..20_000.0,
                restore in prop::option::of(1.0f64..5_000.0),
            ) {
                let schedule = GridSchedule { windows: windows.clone() };
                let mut added = schedule.clone();
                added.windows.extend(more);
                prop_assert!(schedule.only_tightens_to(&added));
                for target in [GridTarget::Site, GridTarget::Domain("rack-1".into())] {
                    for now in (0..170).map(|s| s * 1_000 + 500) {
                        let limit = schedule.limit(&target, now, supply, restore);
                        prop_assert!(limit <= supply, "{limit} above the supply {supply}");
                        for w in schedule.in_force(now).filter(|w| w.target == target) {
                            prop_assert!(limit <= w.limit.watts(supply) + 1e-9);
                        }
                        let lifting = schedule.restoring(now, restore, |_| supply);
                        if schedule.in_force(now).all(|w| w.target != target) && !lifting {
                            prop_assert_eq!(limit, supply);
                        }
                        prop_assert!(added.limit(&target, now, supply, restore) <= limit + 1e-9);
                    }
                }
            }
        }
    }
}
