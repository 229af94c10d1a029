//! Acknowledgements between passes. A power event sends a cap order to every node; answering each
//! acknowledgement with a whole reconcile pass would, at 25,000 nodes, spend the controller on
//! passes that decide nothing new and hold the registry while the next acknowledgements wait.
//!
//! Instead a pass leaves here how many reachable nodes still owe an acknowledgement and whether
//! it left caps unordered (increases waiting their turn). Each node's last outstanding
//! acknowledgement counts down; the one that reaches zero times the event, if nothing is left to
//! order, and wakes the loop, which sends what waited on those decreases. Both counts are written
//! under the registry lock, by the pass and by the session handlers, so they agree.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::time::Instant;

use crate::metrics::Metrics;

#[derive(Debug, Default)]
pub struct AckTracker {
    /// Reachable nodes with an order not yet acknowledged.
    owing: AtomicUsize,
    /// The last pass left target caps unordered (increases waiting for headroom or their turn).
    more_to_order: AtomicBool,
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

    /// After a pass sent its orders (under the registry lock).
    pub fn after_pass(&self, owing: usize, more_to_order: bool, metrics: &Metrics) {
        self.owing.store(owing, Ordering::Relaxed);
        self.more_to_order.store(more_to_order, Ordering::Relaxed);
        if owing == 0 && !more_to_order {
            self.settled(metrics);
        }
    }

    /// A node acknowledged its last outstanding order (under the registry lock). Returns whether
    /// it was the last node owing one: the loop should run to send what waited on it.
    pub fn node_settled(&self, metrics: &Metrics) -> bool {
        let before = self.owing.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
        let last = before == Ok(1);
        if last && !self.more_to_order.load(Ordering::Relaxed) {
            self.settled(metrics);
        }
        last
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
