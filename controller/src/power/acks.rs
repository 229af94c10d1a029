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
        let now = Instant::now();
        self.lock().get_or_insert(now);
        *self.last_event.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(now);
    }

    /// When the last power event happened (`None`: none since the controller started).
    pub fn last_power_event(&self) -> Option<Instant> {
        *self.last_event.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// After a pass sent its orders and left `owed` in the registry.
    pub fn after_pass(&self, owed: OwedAcks, metrics: &Metrics) {
        if owed.nodes == 0 && !owed.more_to_order {
            self.settled(metrics);
        }
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
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.event_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
