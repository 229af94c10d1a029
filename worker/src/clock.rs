//! Wall-clock deadlines and step timing. The worker is a plain threaded program with no async
//! runtime, so it uses std's monotonic clock — here only, the one place the workspace ban on
//! `std::time::Instant` (kept for the daemons' pausable tokio clock) is lifted.
#![allow(clippy::disallowed_types)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A point in time that operations must finish by, or sooner when an abort flag is raised.
#[derive(Debug, Clone)]
pub struct Deadline {
    at: Instant,
    abort: Option<Arc<AtomicBool>>,
}

impl Deadline {
    pub fn after(d: Duration) -> Self {
        Deadline { at: Instant::now() + d, abort: None }
    }

    /// The same deadline, also passed once `abort` is set (a signal asked the process to stop).
    pub fn or_when(mut self, abort: Arc<AtomicBool>) -> Self {
        self.abort = Some(abort);
        self
    }

    pub fn passed(&self) -> bool {
        Instant::now() >= self.at || self.abort.as_ref().is_some_and(|a| a.load(Ordering::Relaxed))
    }

    pub fn left(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }
}

/// Time since it was started.
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch(Instant);

impl Stopwatch {
    pub fn start() -> Self {
        Stopwatch(Instant::now())
    }

    pub fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }

    /// Wait until `total` has passed since the start (no-op if it has).
    pub fn pad_to(&self, total: Duration) {
        let deadline = self.0 + total;
        while Instant::now() < deadline {
            std::thread::park_timeout(deadline.saturating_duration_since(Instant::now()));
        }
    }
}
