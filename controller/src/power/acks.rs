//! Acknowledgements between passes. A power event sends a cap order to every node; answering each
//! acknowledgement with a whole reconcile pass would, at 25,000 nodes, spend the controller on
//! passes that decide nothing new and hold the registry while the next acknowledgements wait.
//!
//! Instead a pass leaves, in the registry, how many reachable nodes still owe an acknowledgement
//! and whether it left caps unordered (increases waiting their turn): [`OwedAcks`], which lives
//! inside the registry's lock, so the pass and the session handlers cannot count differently.
//! Each node's last outstanding acknowledgement counts down ([`crate::registry::Registry::acknowledge`]);
//! the one that reaches zero times the event here, if nothing is left to order, and wakes the
//! loop, which sends what waited on those decreases.

use std::sync::Mutex;

use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::registry::OwedAcks;

#[derive(Debug, Default)]
pub struct AckTracker {
    /// When the power event being carried out happened.
    event_at: Mutex<Option<Instant>>,
    /// When the last power event happened, carried out or not: the meter's settle time runs
    /// from it.
    last_event: Mutex<Option<Instant>>,
}

impl AckTracker {
    /// A source or the site changed: start the clock, unless an event is already running.
    pub fn power_event(&self) {
        self.power_event_at(Instant::now());
    }

    /// A power event that happened at `at` (a grid window's start, seen a moment later): the
    /// clock runs from then.
    pub fn power_event_at(&self, at: Instant) {
        self.lock().get_or_insert(at);
        *self.last_event.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(at);
    }

    /// When the last power event happened (`None`: none since the controller started).
    pub fn last_power_event(&self) -> Option<Instant> {
        *self.last_event.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// After a pass sent its orders and left `owed` in the registry. Every power event is
    /// followed by a pass, so `watt_power_event_open` shows an event from its first pass on.
    pub fn after_pass(&self, owed: OwedAcks, metrics: &Metrics) {
        if owed.nodes == 0 && !owed.more_to_order {
            self.settled(metrics);
        }
        metrics.power_event_open.set(i64::from(self.lock().is_some()));
    }

    /// The last node owing an acknowledgement settled: the event is carried out unless increases
    /// still wait their turn.
    pub fn last_owed_settled(&self, more_to_order: bool, metrics: &Metrics) {
        if !more_to_order {
            self.settled(metrics);
        }
    }

    fn settled(&self, metrics: &Metrics) {
        if let Some(at) = self.lock().take() {
            metrics.power_event_ack.observe(at.elapsed().as_secs_f64());
        }
        metrics.power_event_open.set(0);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.event_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event open through its waves of increases: neither the gauge nor the latency says it
    /// is over until nothing is left to order or acknowledge.
    #[tokio::test(start_paused = true)]
    async fn an_event_stays_open_until_its_last_wave_is_acknowledged() {
        let (acks, metrics) = (AckTracker::default(), Metrics::new().unwrap());
        acks.power_event();
        acks.after_pass(OwedAcks { nodes: 3, more_to_order: true }, &metrics);
        assert_eq!(metrics.power_event_open.get(), 1);
        tokio::time::advance(std::time::Duration::from_millis(400)).await;
        // The wave's last acknowledgement, with more waiting: still open.
        acks.last_owed_settled(true, &metrics);
        acks.after_pass(OwedAcks { nodes: 2, more_to_order: false }, &metrics);
        assert_eq!(metrics.power_event_open.get(), 1);
        assert_eq!(metrics.power_event_ack.get_sample_count(), 0);
        tokio::time::advance(std::time::Duration::from_millis(100)).await;
        acks.last_owed_settled(false, &metrics);
        assert_eq!(metrics.power_event_open.get(), 0);
        assert_eq!(metrics.power_event_ack.get_sample_count(), 1);
        assert!((metrics.power_event_ack.get_sample_sum() - 0.5).abs() < 1e-9);
        // A pass with nothing owed leaves it closed.
        acks.after_pass(OwedAcks { nodes: 0, more_to_order: false }, &metrics);
        assert_eq!(metrics.power_event_open.get(), 0);
    }
}
