//! One job's speed curve, fitted from what it was measured to do: its steps per second at the
//! caps it ran under. Pure: observations in, a [`Curve`] out.
//!
//! The model is the allocator's, `speed(c) = (c / max)^α`, so a job's steps/s at cap `c` is
//! `v × (c / max)^α`, and in logs `ln steps/s = ln v + α ln c + const`: a straight line. The
//! intercept `ln v` depends on everything but the cap — the placement, the world size, the
//! batch — so each placement (epoch) has its own, with a flat prior, and only differences
//! between caps *within* a placement speak about α. That makes the rule "never leave the prior
//! without evidence" exact: observations at one cap carry no information about α, and the fit
//! stays where the prior put it, however many there are.
//!
//! α has a Gaussian prior — the shared curve's exponent, or one read from the job's GPU
//! activity (compute-bound jobs slow with the SM clock, memory-bound ones barely notice the cap)
//! — and the posterior is the conjugate one of a linear regression: precision adds up,
//! `1/sd² = 1/sd₀² + Σ (x − x̄)² / σ²`, so its standard deviation says how much the distinct
//! caps seen allow it to know. The noise σ of one observation is estimated from the residuals,
//! starting from [`NOISE_SD`] as a few pseudo-observations, so a noisy job learns more slowly
//! than a steady one. The mean is kept within [`MIN_EXPONENT`, `MAX_EXPONENT`]: the curve stays rising and
//! concave whatever the noise.

use std::collections::BTreeMap;

use super::curve::Curve;

/// The lowest exponent a fit may reach: the flattest curve (speed 0.98 at 40% of the maximum).
pub const MIN_EXPONENT: f64 = 0.02;
/// The highest: nearly in proportion to the cap. Strictly below 1, so the curve stays strictly
/// concave and the allocator's inverse of its slope stays defined.
pub const MAX_EXPONENT: f64 = 0.95;
/// The noise assumed of one observation's ln steps/s before the residuals say otherwise.
pub const NOISE_SD: f64 = 0.05;
/// How many observations' worth that assumption weighs against the residuals.
const NOISE_PSEUDO_OBSERVATIONS: f64 = 4.0;
/// How many standard deviations steeper than its mean a job's flex is kept on (see
/// [`SpeedFit::curves`]).
pub const FLEX_MARGIN_SD: f64 = 2.0;
/// Caps closer than this (relative) count as one when telling how many distinct caps were seen.
pub const DISTINCT_CAP: f64 = 0.02;

/// Exponents a compute-bound and a memory-bound step tend to (see [`Prior::from_activity`]).
const COMPUTE_BOUND_EXPONENT: f64 = 0.6;
const MEMORY_BOUND_EXPONENT: f64 = 0.05;

/// A job's curves as the allocator takes them (see [`SpeedFit::curves`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FittedCurves {
    pub curve: Curve,
    pub flex_curve: Curve,
    /// The curve is uncertain and nothing has moved the job's cap for a while: where power is
    /// short, the allocator may lower its cap within its flex to measure it (see
    /// [`crate::speed_curves`]).
    pub probe: bool,
}

impl Default for FittedCurves {
    /// The shared curve, for both.
    fn default() -> Self {
        FittedCurves { curve: Curve::default(), flex_curve: Curve::default(), probe: false }
    }
}

/// Where a prior comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriorSource {
    /// The curve assumed for every job.
    Shared,
    /// The job's GPU activity.
    Activity,
}

/// What the fit believes of α before any measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prior {
    pub exponent: f64,
    pub sd: f64,
    pub source: PriorSource,
}

impl Prior {
    /// The shared curve (speed 0.9 at 70% of the maximum cap), loosely held.
    pub fn shared() -> Self {
        Prior { exponent: Curve::default().exponent, sd: 0.15, source: PriorSource::Shared }
    }

    /// From a job's GPU activity: how much of the busy time was math (the busiest of the tensor
    /// and FP pipes) against memory traffic. All math: compute-bound, speed goes with the SM
    /// clock; all memory: the cap barely matters. In between, in proportion. None when the GPUs
    /// were too idle to tell (both under 5%).
    pub fn from_activity(math: f64, memory: f64) -> Option<Self> {
        let (math, memory) = (math.clamp(0.0, 1.0), memory.clamp(0.0, 1.0));
        if !(math.is_finite() && memory.is_finite()) || math.max(memory) < 0.05 {
            return None;
        }
        let bound = math / (math + memory);
        Some(Prior {
            exponent: MEMORY_BOUND_EXPONENT + (COMPUTE_BOUND_EXPONENT - MEMORY_BOUND_EXPONENT) * bound,
            sd: 0.12,
            source: PriorSource::Activity,
        })
    }
}

/// One placement's observations, as sums: x = ln cap, y = ln steps/s, both taken from the
/// placement's first observation (so that observations at one cap sum to exactly nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Sums {
    origin: (f64, f64),
    n: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
    yy: f64,
}

impl Sums {
    /// (Σ(x − x̄)², Σ(x − x̄)(y − ȳ), Σ(y − ȳ)²).
    fn centered(&self) -> (f64, f64, f64) {
        if self.n < 2.0 {
            return (0.0, 0.0, 0.0);
        }
        let xx = (self.xx - self.x * self.x / self.n).max(0.0);
        let xy = self.xy - self.x * self.y / self.n;
        let yy = (self.yy - self.y * self.y / self.n).max(0.0);
        (xx, xy, yy)
    }
}

/// The fit of one job.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeedFit {
    prior: Prior,
    placements: BTreeMap<u64, Sums>,
    observations: u32,
    /// The distinct caps seen, in W.
    caps: Vec<f64>,
}

/// Keep only the most recent placements: a job resized a thousand times keeps a bounded fit.
const PLACEMENTS_KEPT: usize = 16;

impl SpeedFit {
    pub fn new(prior: Prior) -> Self {
        SpeedFit { prior, placements: BTreeMap::new(), observations: 0, caps: Vec::new() }
    }

    pub fn prior(&self) -> Prior {
        self.prior
    }

    /// A better prior (the job's activity became known); the evidence stays.
    pub fn set_prior(&mut self, prior: Prior) {
        self.prior = prior;
    }

    /// The job ran `steps_per_second` under `cap_watts` in `placement`. Non-positive or
    /// non-finite figures carry nothing and are dropped.
    pub fn observe(&mut self, placement: u64, cap_watts: f64, steps_per_second: f64) {
        if !(cap_watts.is_finite() && cap_watts > 0.0 && steps_per_second.is_finite() && steps_per_second > 0.0) {
            return;
        }
        let (x, y) = (cap_watts.ln(), steps_per_second.ln());
        let s = self.placements.entry(placement).or_insert(Sums { origin: (x, y), ..Sums::default() });
        let (x, y) = (x - s.origin.0, y - s.origin.1);
        s.n += 1.0;
        s.x += x;
        s.y += y;
        s.xx += x * x;
        s.xy += x * y;
        s.yy += y * y;
        while self.placements.len() > PLACEMENTS_KEPT {
            self.placements.pop_first();
        }
        self.observations = self.observations.saturating_add(1);
        if !self.caps.iter().any(|&c| (c - cap_watts).abs() <= DISTINCT_CAP * c.max(cap_watts)) && self.caps.len() < 64
        {
            self.caps.push(cap_watts);
        }
    }

    pub fn observations(&self) -> u32 {
        self.observations
    }

    pub fn distinct_caps(&self) -> u32 {
        self.caps.len() as u32
    }

    /// Whether measurements, not only the prior, speak about α.
    pub fn measured(&self) -> bool {
        self.placements.values().any(|s| s.centered().0 > 1e-9)
    }

    /// α's posterior mean (within [`MIN_EXPONENT`, `MAX_EXPONENT`]) and standard deviation.
    pub fn exponent(&self) -> (f64, f64) {
        let (mut xx, mut xy, mut yy, mut dof) = (0.0, 0.0, 0.0, 0.0);
        for s in self.placements.values() {
            let (a, b, c) = s.centered();
            xx += a;
            xy += b;
            yy += c;
            dof += (s.n - 1.0).max(0.0);
        }
        let prior_precision = 1.0 / (self.prior.sd * self.prior.sd);
        // Noise from the residuals of the fit at the prior's noise; two passes settle it.
        let mut noise = NOISE_SD * NOISE_SD;
        let mut mean = self.prior.exponent;
        let mut precision = prior_precision;
        for _ in 0..2 {
            precision = prior_precision + xx / noise;
            mean = (prior_precision * self.prior.exponent + xy / noise) / precision;
            let residuals = (yy - 2.0 * mean * xy + mean * mean * xx).max(0.0);
            noise = (residuals + NOISE_PSEUDO_OBSERVATIONS * NOISE_SD * NOISE_SD) / (dof + NOISE_PSEUDO_OBSERVATIONS);
        }
        (mean.clamp(MIN_EXPONENT, MAX_EXPONENT), precision.sqrt().recip())
    }

    /// The curve the allocator uses: the posterior mean.
    pub fn curve(&self) -> Curve {
        Curve { exponent: self.exponent().0 }
    }

    /// What the allocator uses: power is shared by the posterior mean, and a job's flex is
    /// kept on a curve [`FLEX_MARGIN_SD`] standard deviations steeper, so that a job promised
    /// "no more than 10% slower" is not slowed by more because its curve is not yet known well.
    /// A job nothing is known of yet runs on the shared curve, flex included, as every job did
    /// before curves were learned.
    pub fn curves(&self) -> FittedCurves {
        if self.prior.source == PriorSource::Shared && !self.measured() {
            return FittedCurves::default();
        }
        let (mean, sd) = self.exponent();
        FittedCurves {
            curve: Curve { exponent: mean },
            flex_curve: Curve { exponent: (mean + FLEX_MARGIN_SD * sd).clamp(MIN_EXPONENT, MAX_EXPONENT) },
            probe: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic noise in [-1, 1].
    fn noise(seed: u64, i: u64) -> f64 {
        let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    #[test]
    fn observations_at_one_cap_leave_the_prior_exactly() {
        let prior = Prior::shared();
        let mut fit = SpeedFit::new(prior);
        for i in 0..200 {
            fit.observe(1, 700.0, 3.0 * (1.0 + 0.1 * noise(1, i)));
            fit.observe(2, 450.0, 2.0 * (1.0 + 0.1 * noise(2, i)));
        }
        assert_eq!(fit.exponent(), (prior.exponent, prior.sd), "one cap per placement says nothing of α");
        assert!(!fit.measured());
        assert_eq!((fit.observations(), fit.distinct_caps()), (400, 2));
    }

    #[test]
    fn the_activity_prior_tells_compute_from_memory_bound() {
        // An H200 under a bf16 matmul: tensor 94%, DRAM 16%.
        let matmul = Prior::from_activity(0.94, 0.16).unwrap();
        let streaming = Prior::from_activity(0.15, 0.8).unwrap();
        assert!(matmul.exponent > 0.45 && streaming.exponent < 0.15, "{matmul:?} {streaming:?}");
        assert_eq!(Prior::from_activity(0.01, 0.02), None, "an idle GPU tells nothing");
        assert_eq!(Prior::from_activity(f64::NAN, 0.5), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// From noisy steps/s at a handful of caps, the fit converges to the job's true
        /// exponent, whatever the prior; and what it gives is always a rising, concave curve.
        #[test]
        fn converges_to_the_true_curve_from_noisy_observations(
            truth in 0.03f64..0.95,
            prior_exponent in 0.05f64..0.8,
            noise_share in 0.0f64..0.05,
            seed in any::<u64>(),
            placements in 1u64..4,
        ) {
            let mut fit = SpeedFit::new(Prior { exponent: prior_exponent, sd: 0.12, source: PriorSource::Activity });
            let caps = [700.0, 620.0, 540.0, 470.0, 400.0];
            let mut i = 0;
            let mut last_sd = f64::INFINITY;
            for round in 0..200 {
                for placement in 0..placements {
                    let cap = caps[(round + placement as usize) % caps.len()];
                    let base = 2.0 + placement as f64;
                    let speed = base * (cap / 700.0f64).powf(truth) * (1.0 + noise_share * noise(seed, i));
                    fit.observe(placement, cap, speed);
                    i += 1;
                }
                let (mean, sd) = fit.exponent();
                prop_assert!((MIN_EXPONENT..=MAX_EXPONENT).contains(&mean));
                prop_assert!(sd <= last_sd + 1e-12 || round == 0 || noise_share > 0.0, "more evidence, no less sure");
                last_sd = sd;
                let c = fit.curve();
                // Rising and concave on the cap range.
                let s: Vec<f64> = (2..=7).map(|k| c.speed(100.0 * k as f64, 700.0)).collect();
                prop_assert!(s.windows(2).all(|w| w[1] >= w[0]));
                prop_assert!(s.windows(3).all(|w| w[1] - w[0] >= w[2] - w[1] - 1e-12));
            }
            let (mean, sd) = fit.exponent();
            prop_assert!(fit.measured());
            prop_assert!((mean - truth).abs() < 0.03 + 3.0 * sd, "learned {mean} ± {sd}, true {truth}");
            prop_assert!((mean - truth).abs() < 0.06, "learned {mean}, true {truth}");
            prop_assert_eq!(fit.distinct_caps(), 5);
        }

        /// Whatever comes in — any caps, any rates, garbage included — the exponent stays in
        /// range and finite.
        #[test]
        fn any_input_keeps_the_curve_rising_and_concave(
            obs in proptest::collection::vec((0u64..3, -10.0f64..2_000.0, -1.0f64..100.0), 0..60),
        ) {
            let mut fit = SpeedFit::new(Prior::shared());
            for (placement, cap, rate) in obs {
                fit.observe(placement, cap, rate);
                let (mean, sd) = fit.exponent();
                prop_assert!(mean.is_finite() && sd.is_finite() && sd > 0.0);
                prop_assert!((MIN_EXPONENT..=MAX_EXPONENT).contains(&mean));
            }
        }
    }
}
