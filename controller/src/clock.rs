//! The controller's one clock for decisions: tokio's monotonic clock (paused and advanced in
//! tests), read as milliseconds since the controller started. Deadlines — an unreachable node's
//! failsafe, an unacknowledged order's resend — are on it, so a wall clock stepped backwards or
//! forwards moves none of them. Wall time (`unix_ms`) is only for what people read and what must
//! mean the same after a restart: event times, when a source's ramp started, when a job was last
//! resized.

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn new(start: Instant) -> Self {
        Clock { start }
    }

    /// `at` as milliseconds since the start (0 for anything before it).
    pub fn ms(&self, at: Instant) -> i64 {
        at.saturating_duration_since(self.start).as_millis() as i64
    }

    pub fn now_ms(&self) -> i64 {
        self.ms(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn it_follows_tokios_clock_not_the_wall() {
        let clock = Clock::new(Instant::now());
        assert_eq!(clock.now_ms(), 0);
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(clock.now_ms(), 1_500);
        let earlier = Instant::now() - Duration::from_secs(10);
        assert_eq!(clock.ms(earlier), 0, "before the start is 0, never negative");
    }
}
