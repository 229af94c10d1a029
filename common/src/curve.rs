//! Throughput as a function of the power cap, per GPU model: what the controller's allocator
//! optimizes, and what the agent's simulated GPUs pace workers by.
//!
//! A training step's speed is concave in the cap: the last 30% of power buys roughly the last
//! 10% of speed, the shape reported by power-capping studies of A100/H100 training and LLM
//! serving, where memory- and communication-bound phases barely slow while compute-bound ones
//! slow with the SM clock. We model it as a power law
//! `speed(c) = (c / max)^α` with `speed(0.7 × max) = 0.9`, i.e. α = ln 0.9 / ln 0.7 ≈ 0.295, and
//! allow a different α per model.

use serde::{Deserialize, Serialize};

/// `speed(c) = (c / max)^exponent`, relative to the speed at the maximum cap.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    pub exponent: f64,
}

impl Default for Curve {
    fn default() -> Self {
        // speed(0.7) = 0.9
        Curve { exponent: 0.9f64.ln() / 0.7f64.ln() }
    }
}

impl Curve {
    /// Relative speed at cap `c` of a GPU whose maximum is `max`.
    pub fn speed(&self, c: f64, max: f64) -> f64 {
        (c / max).clamp(0.0, 1.0).powf(self.exponent)
    }

    /// The lowest cap at which the speed is still `speed`.
    pub fn cap_for_speed(&self, speed: f64, max: f64) -> f64 {
        max * speed.clamp(0.0, 1.0).powf(1.0 / self.exponent)
    }

    /// d speed / d cap at `c`.
    pub fn slope(&self, c: f64, max: f64) -> f64 {
        self.exponent * (c / max).max(1e-9).powf(self.exponent - 1.0) / max
    }

    /// The cap at which the slope is `slope` (the inverse of [`Curve::slope`]).
    pub fn cap_for_slope(&self, slope: f64, max: f64) -> f64 {
        max * (slope * max / self.exponent).powf(1.0 / (self.exponent - 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_30_percent_of_power_buys_the_last_10_percent_of_speed() {
        let c = Curve::default();
        assert!((c.speed(490.0, 700.0) - 0.9).abs() < 1e-9);
        assert_eq!(c.speed(700.0, 700.0), 1.0);
        assert!((c.cap_for_speed(0.9, 700.0) - 490.0).abs() < 1e-6);
        let s = c.slope(350.0, 700.0);
        assert!((c.cap_for_slope(s, 700.0) - 350.0).abs() < 1e-6);
        assert!(c.slope(300.0, 700.0) > c.slope(600.0, 700.0), "concave: each watt buys less at higher caps");
    }
}
