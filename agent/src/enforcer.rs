//! The power-cap enforcer: applies the controller's cap orders to the GPUs, reads the limit in
//! force back, and falls back to the failsafe caps — low, never high — whenever the controller
//! cannot be heard.
//!
//! - On start, before it learns any budget, every GPU goes to its failsafe cap (when the agent
//!   has a controller to learn it from; a telemetry-only agent changes no limit).
//! - A cap order is checked whole before anything is set: a cap outside a GPU's [min, max]
//!   rejects the order with an error naming the GPU and its range (nothing is clamped), and an
//!   order older than the newest applied is ignored. Orders apply in epoch order under one lock,
//!   delayed increases included, so a newer decrease always wins. If the driver refuses one set
//!   call, the others of the order stay applied — undoing them could raise a GPU — and the
//!   acknowledgement (`Failed`) says what is in force on each.
//! - If nothing is heard from the controller for `failsafe_after`, every GPU goes to its failsafe
//!   cap (`--failsafe-cap`, by default each GPU's minimum). Nothing here ever raises a GPU
//!   because a controller went away.
//! - `--enforce dry-run` logs and exports what it would set and changes no GPU setting;
//!   `--enforce off` ignores cap orders. Both answer every order as
//!   [`pb::CapOutcome::NotEnforced`] with the limits read back: a state, not a failure, so the
//!   controller counts the node at what it really runs under and does not resend.
//!
//! Time comes in as arguments (tokio's clock), so the failsafe is tested with a paused clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use watt_proto::v1 as pb;

use crate::gpu::{GpuBackend, GpuError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnforceMode {
    /// Set power limits through the GPU backend.
    On,
    /// Log and export what would be set; change no GPU setting.
    DryRun,
    /// Ignore cap orders and the failsafe.
    Off,
}

impl EnforceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            EnforceMode::On => "on",
            EnforceMode::DryRun => "dry-run",
            EnforceMode::Off => "off",
        }
    }

    pub fn to_proto(self) -> pb::EnforceMode {
        match self {
            EnforceMode::On => pb::EnforceMode::On,
            EnforceMode::DryRun => pb::EnforceMode::DryRun,
            EnforceMode::Off => pb::EnforceMode::Off,
        }
    }
}

#[derive(Debug)]
struct State {
    last_heard: Instant,
    in_failsafe: bool,
    /// Newest order epoch applied.
    epoch: u64,
    /// The cap last ordered (or set by the failsafe) per GPU; `None` before the first.
    ordered: Vec<Option<f64>>,
}

#[derive(Debug)]
pub struct Enforcer {
    backend: Arc<dyn GpuBackend>,
    mode: EnforceMode,
    failsafe_after: Duration,
    failsafe: Vec<f64>,
    state: Mutex<State>,
    /// Set after limits change, so the sampler re-reads them on its next round.
    limits_changed: Arc<AtomicBool>,
}

/// Why the enforcer cannot start.
#[derive(Debug, thiserror::Error)]
#[error("invalid --failsafe-cap (config key failsafe_cap): {0}")]
pub struct FailsafeCapError(String);

impl Enforcer {
    /// `failsafe_cap`: one cap for every GPU, or `None` for each GPU's minimum. It must lie in
    /// every GPU's range.
    pub fn new(
        backend: Arc<dyn GpuBackend>,
        mode: EnforceMode,
        failsafe_after: Duration,
        failsafe_cap: Option<f64>,
        limits_changed: Arc<AtomicBool>,
        now: Instant,
    ) -> Result<Self, FailsafeCapError> {
        let mut failsafe = Vec::with_capacity(backend.gpus().len());
        for gpu in backend.gpus() {
            let range = gpu.power_limit;
            let cap = failsafe_cap.unwrap_or(range.min_watts);
            if !range.contains(cap) {
                return Err(FailsafeCapError(format!(
                    "{cap} W is outside GPU {}'s range [{}, {}] W",
                    gpu.index, range.min_watts, range.max_watts
                )));
            }
            failsafe.push(cap);
        }
        let ordered = vec![None; failsafe.len()];
        Ok(Enforcer {
            backend,
            mode,
            failsafe_after,
            failsafe,
            state: Mutex::new(State { last_heard: now, in_failsafe: false, epoch: 0, ordered }),
            limits_changed,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn mode(&self) -> EnforceMode {
        self.mode
    }

    pub fn failsafe_after(&self) -> Duration {
        self.failsafe_after
    }

    pub fn failsafe_caps(&self) -> &[f64] {
        &self.failsafe
    }

    /// Whether the GPUs are at their failsafe caps (at start, or after losing the controller).
    pub fn in_failsafe(&self) -> bool {
        self.lock().in_failsafe
    }

    /// The cap last ordered per GPU (`None` before the first order or failsafe).
    pub fn ordered(&self) -> Vec<Option<f64>> {
        self.lock().ordered.clone()
    }

    /// The limit in force per GPU, read from the GPUs (NaN where a read fails). Blocking.
    pub fn in_force(&self) -> Vec<f64> {
        self.backend.gpus().iter().map(|g| self.backend.power_limit(g.index).unwrap_or(f64::NAN)).collect()
    }

    /// Set every GPU to its failsafe cap. Blocking. Called at start, before any budget is known.
    pub fn engage_failsafe(&self, why: &str) {
        let caps: Vec<(u32, f64)> =
            self.backend.gpus().iter().map(|g| g.index).zip(self.failsafe.iter().copied()).collect();
        // Under the same lock as orders, so none interleaves with the failsafe.
        let mut state = self.lock();
        match self.mode {
            EnforceMode::On => {
                tracing::warn!(caps = ?self.failsafe, "{why}: setting every GPU to its failsafe cap.");
                self.set_all(&caps);
            }
            EnforceMode::DryRun => {
                tracing::warn!(caps = ?self.failsafe, "{why}: dry run, would set every GPU to its failsafe cap.");
            }
            EnforceMode::Off => {}
        }
        state.in_failsafe = true;
        state.ordered = self.failsafe.iter().map(|&c| Some(c)).collect();
    }

    /// The controller was heard from at `now`.
    pub fn heard(&self, now: Instant) {
        self.lock().last_heard = now;
    }

    /// Engage the failsafe if the controller has been silent for `failsafe_after`. Blocking.
    /// Returns whether it engaged now.
    pub fn check(&self, now: Instant) -> bool {
        let due = {
            let state = self.lock();
            !state.in_failsafe && now.saturating_duration_since(state.last_heard) >= self.failsafe_after
        };
        if due {
            self.engage_failsafe(&format!(
                "Nothing heard from the controller for {}",
                watt_common::duration::show(self.failsafe_after)
            ));
        }
        due
    }

    /// Apply a cap order and say what is in force. Blocking.
    pub fn apply(&self, order: &pb::CapOrder, now: Instant) -> pb::CapAck {
        self.heard(now);
        let caps: Vec<(u32, f64)> = order.caps.iter().map(|c| (c.index, c.watts)).collect();
        let ack = |outcome: pb::CapOutcome, error: String| pb::CapAck {
            epoch: order.epoch,
            applied: caps
                .iter()
                .map(|&(index, _)| pb::GpuCap { index, watts: self.backend.power_limit(index).unwrap_or(f64::NAN) })
                .collect(),
            error,
            outcome: outcome as i32,
            enforce_mode: self.mode.to_proto() as i32,
        };
        // One lock from the staleness check to the last set call: orders apply in epoch order,
        // so an increase that waited out its spread can never land after a newer decrease.
        let mut state = self.lock();
        if order.epoch < state.epoch {
            return ack(pb::CapOutcome::Stale, format!("epoch {} is older than the newest order applied", order.epoch));
        }
        // All or nothing: check every cap before setting any.
        for &(index, watts) in &caps {
            let Some(gpu) = self.backend.gpus().iter().find(|g| g.index == index) else {
                return ack(pb::CapOutcome::Rejected, format!("caps[gpu {index}]: no such GPU on this node"));
            };
            if let Err(e) = gpu.power_limit.check(index, watts) {
                tracing::error!(error = %e, "Rejected a cap order.");
                return ack(pb::CapOutcome::Rejected, format!("caps[gpu {index}]: {e}"));
            }
        }
        let errors = match self.mode {
            EnforceMode::On => self.set_all(&caps),
            EnforceMode::DryRun => {
                tracing::info!(epoch = order.epoch, caps = ?caps, "Dry run: would set these power limits.");
                Vec::new()
            }
            EnforceMode::Off => {
                tracing::debug!(epoch = order.epoch, "Enforcement is off: cap order answered, nothing set.");
                return ack(pb::CapOutcome::NotEnforced, String::new());
            }
        };
        state.epoch = order.epoch;
        state.in_failsafe = false;
        for &(index, watts) in &caps {
            if let Some(slot) = state.ordered.get_mut(index as usize) {
                *slot = Some(watts);
            }
        }
        drop(state);
        let outcome = match (self.mode, errors.is_empty()) {
            (EnforceMode::On, true) => pb::CapOutcome::Applied,
            (EnforceMode::On, false) => pb::CapOutcome::Failed,
            _ => pb::CapOutcome::NotEnforced,
        };
        ack(outcome, errors.join("; "))
    }

    /// Set caps; returns the failures (also logged).
    fn set_all(&self, caps: &[(u32, f64)]) -> Vec<String> {
        let mut errors = Vec::new();
        if self.mode != EnforceMode::On {
            return errors;
        }
        for &(index, watts) in caps {
            match self.backend.set_power_limit(index, watts) {
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(gpu = index, watts, error = %e, "Cannot set a power limit.");
                    errors.push(match e {
                        GpuError::Refused { .. } | GpuError::LimitOutOfRange { .. } => e.to_string(),
                        other => format!("GPU {index}: {other}"),
                    });
                }
            }
        }
        self.limits_changed.store(true, Ordering::Relaxed);
        errors
    }
}

/// Check the failsafe deadline until `stop`.
pub async fn watch_failsafe(enforcer: Arc<Enforcer>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let period = (enforcer.failsafe_after / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let e = enforcer.clone();
        let now = Instant::now();
        let _ = tokio::task::spawn_blocking(move || e.check(now)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::sim::{SimBackend, SimModel};

    fn order(epoch: u64, caps: &[(u32, f64)]) -> pb::CapOrder {
        pb::CapOrder {
            epoch,
            phase: pb::TransitionPhase::Decrease as i32,
            caps: caps.iter().map(|&(index, watts)| pb::GpuCap { index, watts }).collect(),
            spread_ms: 0,
            term: 1,
        }
    }

    fn setup(mode: EnforceMode, failsafe_cap: Option<f64>) -> (Arc<SimBackend>, Enforcer) {
        let backend = Arc::new(SimBackend::new(SimModel::H100, 2, 1));
        let e =
            Enforcer::new(backend.clone(), mode, Duration::from_secs(10), failsafe_cap, Arc::default(), Instant::now())
                .unwrap();
        (backend, e)
    }

    #[tokio::test(start_paused = true)]
    async fn failsafe_engages_after_the_deadline_and_not_before_and_goes_low() {
        let (backend, e) = setup(EnforceMode::On, None);
        e.engage_failsafe("Starting");
        assert_eq!(e.in_force(), vec![200.0, 200.0], "at start, failsafe before any budget");
        let ack = e.apply(&order(1, &[(0, 650.0), (1, 650.0)]), Instant::now());
        assert_eq!((ack.outcome(), ack.error.as_str()), (pb::CapOutcome::Applied, ""));
        assert_eq!(ack.applied.iter().map(|c| c.watts).collect::<Vec<_>>(), vec![650.0, 650.0]);
        assert!(!e.in_failsafe());

        tokio::time::advance(Duration::from_millis(9_900)).await;
        assert!(!e.check(Instant::now()), "not before failsafe_after");
        assert_eq!(backend.power_limit(0).unwrap(), 650.0);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(e.check(Instant::now()), "after failsafe_after");
        assert_eq!(e.in_force(), vec![200.0, 200.0], "to the minimum, never the maximum");
        assert!(e.in_failsafe());

        // Back in touch: ordered caps return.
        let ack = e.apply(&order(2, &[(0, 500.0), (1, 500.0)]), Instant::now());
        assert_eq!(ack.applied.iter().map(|c| c.watts).collect::<Vec<_>>(), vec![500.0, 500.0]);
        assert!(!e.in_failsafe());
        tokio::time::advance(Duration::from_secs(5)).await;
        e.heard(Instant::now());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!e.check(Instant::now()), "hearing from the controller restarts the deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn orders_are_all_or_nothing_never_clamped_and_never_stale() {
        let (backend, e) = setup(EnforceMode::On, Some(250.0));
        e.engage_failsafe("Starting");
        assert_eq!(e.in_force(), vec![250.0, 250.0]);
        let ack = e.apply(&order(5, &[(0, 400.0), (1, 800.0)]), Instant::now());
        assert!(ack.error.contains("caps[gpu 1]") && ack.error.contains("[200, 700]"), "{}", ack.error);
        assert_eq!(ack.outcome(), pb::CapOutcome::Rejected);
        assert_eq!(e.in_force(), vec![250.0, 250.0], "nothing of a rejected order is applied");
        e.apply(&order(5, &[(0, 400.0), (1, 400.0)]), Instant::now());
        let stale = e.apply(&order(4, &[(0, 700.0), (1, 700.0)]), Instant::now());
        assert_eq!(stale.outcome(), pb::CapOutcome::Stale);
        assert_eq!(e.in_force(), vec![400.0, 400.0]);
        backend.faults(1).refuse_set.store(true, Ordering::Relaxed);
        let refused = e.apply(&order(6, &[(0, 300.0), (1, 300.0)]), Instant::now());
        assert!(refused.error.contains("refused"), "{}", refused.error);
        assert_eq!(refused.outcome(), pb::CapOutcome::Failed);
        assert_eq!(
            refused.applied.iter().map(|c| c.watts).collect::<Vec<_>>(),
            vec![300.0, 400.0],
            "the ack says what is really in force"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dry_run_changes_no_gpu_setting_and_says_so() {
        let (backend, e) = setup(EnforceMode::DryRun, None);
        e.engage_failsafe("Starting");
        let ack = e.apply(&order(1, &[(0, 300.0)]), Instant::now());
        assert_eq!((ack.outcome(), ack.enforce_mode()), (pb::CapOutcome::NotEnforced, pb::EnforceMode::DryRun));
        assert_eq!(ack.error, "", "not enforcing is a state, not an error");
        assert_eq!(ack.applied[0].watts, 700.0, "the GPU keeps its limit");
        assert_eq!(backend.calls().set_power_limit.load(Ordering::Relaxed), 0, "no set call at all");
        assert_eq!(e.ordered()[0], Some(300.0), "what it would set is still exported");
    }

    #[tokio::test(start_paused = true)]
    async fn off_answers_every_order_with_the_limits_in_force_and_sets_nothing() {
        let (backend, e) = setup(EnforceMode::Off, None);
        e.engage_failsafe("Starting");
        let ack = e.apply(&order(1, &[(0, 300.0), (1, 250.0)]), Instant::now());
        assert_eq!((ack.outcome(), ack.enforce_mode()), (pb::CapOutcome::NotEnforced, pb::EnforceMode::Off));
        assert_eq!(ack.error, "");
        assert_eq!(ack.applied.iter().map(|c| c.watts).collect::<Vec<_>>(), vec![700.0, 700.0]);
        assert_eq!(backend.calls().set_power_limit.load(Ordering::Relaxed), 0);
    }

    /// A delayed increase and a newer decrease racing on other threads: whichever runs first,
    /// the decrease is what stays in force.
    #[test]
    fn a_newer_decrease_always_wins_over_an_older_increase_that_lands_late() {
        let backend = Arc::new(SimBackend::new(SimModel::H100, 8, 1));
        let e = Arc::new(
            Enforcer::new(
                backend.clone(),
                EnforceMode::On,
                Duration::from_secs(10),
                None,
                Arc::default(),
                Instant::now(),
            )
            .unwrap(),
        );
        let all = |watts: f64| -> Vec<(u32, f64)> { (0..8).map(|i| (i, watts)).collect() };
        for round in 0..50u64 {
            let (older, newer) = (2 * round + 1, 2 * round + 2);
            let increase = order(older, &all(700.0));
            let decrease = order(newer, &all(250.0 + round as f64));
            let (a, b) = (e.clone(), e.clone());
            let up = std::thread::spawn(move || a.apply(&increase, Instant::now()));
            let down = std::thread::spawn(move || b.apply(&decrease, Instant::now()));
            let (up, down) = (up.join().unwrap(), down.join().unwrap());
            assert_eq!(down.outcome(), pb::CapOutcome::Applied);
            assert!(matches!(up.outcome(), pb::CapOutcome::Applied | pb::CapOutcome::Stale));
            assert_eq!(e.in_force(), vec![250.0 + round as f64; 8], "round {round}: the decrease stays");
        }
    }

    #[test]
    fn a_failsafe_cap_outside_a_gpus_range_is_refused() {
        let backend = Arc::new(SimBackend::new(SimModel::A100, 1, 1));
        let err = Enforcer::new(
            backend,
            EnforceMode::On,
            Duration::from_secs(10),
            Some(50.0),
            Arc::default(),
            Instant::now(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("--failsafe-cap") && err.to_string().contains("[100, 400]"), "{err}");
    }
}
