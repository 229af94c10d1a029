//! How much a load's power swings, and at which frequencies (pure): what grid operators now
//! limit — a large load's power variation in bands between 0.1 and 20 Hz — and what training
//! produces (a step's compute near the cap, its all-reduce well below, at 0.2–3 Hz).
//!
//! In: power sampled at a fixed rate over a window (10 s at the driver's 10 Hz: 100 samples).
//! Out: the swing, p95 − p5 of the samples; and how the variation (the power less its mean) is
//! shared between frequency bands, from its spectrum: each band's share of the variance, 0–1.
//! With 10 s at 10 Hz the bins are 0.1 Hz apart up to 5 Hz, so the bands are 0.1–1 Hz (bins
//! 0.1 … 0.9 Hz) and 1–5 Hz (1.0 … 5.0 Hz). No window is applied: a periodic load whose period
//! divides the window (a 1 s step in 10 s) lands in its bins exactly, and a taper would smear a
//! 1.0 Hz line into the 0.9 Hz bin of the other band.

use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};

/// A band of frequencies, Hz: `[low, high)`, the last band closed at Nyquist.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Band {
    pub name: &'static str,
    pub low_hz: f64,
    pub high_hz: f64,
}

/// The bands reported: sub-second-step oscillations and slower ones.
pub const BANDS: [Band; 2] =
    [Band { name: "0.1-1Hz", low_hz: 0.1, high_hz: 1.0 }, Band { name: "1-5Hz", low_hz: 1.0, high_hz: 5.0 }];

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Swing {
    pub mean_watts: f64,
    /// p95 − p5 of the samples.
    pub swing_watts: f64,
    /// Each of [`BANDS`]' share of the variance, 0–1 (0 for a flat load).
    pub band_shares: [f64; 2],
}

/// Analyzes series of one length: the FFT is planned once (planning costs more than a 100-point
/// transform).
pub struct Analyzer {
    fft: Arc<dyn Fft<f64>>,
    len: usize,
}

impl std::fmt::Debug for Analyzer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analyzer").field("len", &self.len).finish_non_exhaustive()
    }
}

impl Analyzer {
    pub fn new(len: usize) -> Self {
        Analyzer { fft: FftPlanner::new().plan_fft_forward(len), len }
    }

    /// The swing of `samples` taken at `sample_hz`; none with fewer than 8 samples, a length
    /// other than the planned one, or any sample that is not finite.
    pub fn analyze(&self, samples: &[f64], sample_hz: f64) -> Option<Swing> {
        if samples.len() != self.len {
            return None;
        }
        swing_of(samples, sample_hz, self.fft.as_ref())
    }
}

/// The swing of `samples` taken at `sample_hz` (planning its FFT: see [`Analyzer`] for many).
pub fn analyze(samples: &[f64], sample_hz: f64) -> Option<Swing> {
    if samples.is_empty() {
        return None;
    }
    swing_of(samples, sample_hz, FftPlanner::new().plan_fft_forward(samples.len()).as_ref())
}

fn swing_of(samples: &[f64], sample_hz: f64, fft: &dyn Fft<f64>) -> Option<Swing> {
    let n = samples.len();
    if n < 8 || !sample_hz.is_finite() || sample_hz <= 0.0 || samples.iter().any(|w| !w.is_finite()) {
        return None;
    }
    let mean_watts = samples.iter().sum::<f64>() / n as f64;
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| sorted[((q * (n - 1) as f64).round() as usize).min(n - 1)];
    let swing_watts = at(0.95) - at(0.05);

    let mut buffer: Vec<Complex<f64>> = samples.iter().map(|&w| Complex { re: w - mean_watts, im: 0.0 }).collect();
    fft.process(&mut buffer);
    // One-sided power per bin (bins 1..=n/2; the mean is bin 0, removed above).
    let resolution = sample_hz / n as f64;
    let bins: Vec<(f64, f64)> = (1..=n / 2).map(|k| (k as f64 * resolution, buffer[k].norm_sqr())).collect();
    let total: f64 = bins.iter().map(|&(_, p)| p).sum();
    let mut band_shares = [0.0; 2];
    if total > 1e-9 * n as f64 * n as f64 * mean_watts.abs().max(1.0) {
        let nyquist = sample_hz / 2.0;
        for (share, band) in band_shares.iter_mut().zip(BANDS) {
            // Half a bin's tolerance on each edge: bins sit on multiples of the resolution.
            let eps = resolution / 2.0;
            let inside = |f: f64| {
                f >= band.low_hz - eps && (f < band.high_hz - eps || (band.high_hz >= nyquist && f <= nyquist + eps))
            };
            *share = bins.iter().filter(|&&(f, _)| inside(f)).map(|&(_, p)| p).sum::<f64>() / total;
        }
    }
    Some(Swing { mean_watts, swing_watts, band_shares })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A training-like square wave: `high` W for `duty` of each period, `low` W the rest.
    fn square(period_s: f64, duty: f64, high: f64, low: f64, seconds: f64, hz: f64) -> Vec<f64> {
        let period = (period_s * hz).round() as usize;
        let on = (duty * period as f64).round() as usize;
        (0..(seconds * hz) as usize).map(|i| if i % period < on { high } else { low }).collect()
    }

    #[test]
    fn a_one_hertz_step_load_is_all_in_the_one_to_five_hertz_band() {
        // 8 GPUs: 700 W in compute for 0.7 s of each 1 s step, 250 W in the all-reduce.
        let s = analyze(&square(1.0, 0.7, 5_600.0, 2_000.0, 10.0, 10.0), 10.0).unwrap();
        assert!((s.swing_watts - 3_600.0).abs() < 1e-9, "{s:?}");
        assert!(s.band_shares[1] > 0.999 && s.band_shares[0] < 1e-9, "{s:?}");
        assert!((s.mean_watts - 0.7 * 5_600.0 - 0.3 * 2_000.0).abs() < 1e-6);
    }

    #[test]
    fn a_checkpoint_every_five_seconds_is_in_the_slow_band() {
        // 0.2 Hz: compute for 4 s, a 1 s checkpoint at idle-like draw.
        let s = analyze(&square(5.0, 0.8, 5_600.0, 1_000.0, 10.0, 10.0), 10.0).unwrap();
        assert!(s.band_shares[0] > 0.85, "{s:?}");
        assert!(s.band_shares[0] + s.band_shares[1] <= 1.0 + 1e-9);
    }

    #[test]
    fn a_flat_load_swings_nothing_and_garbage_gives_nothing() {
        let s = analyze(&[3_000.0; 100], 10.0).unwrap();
        assert_eq!((s.swing_watts, s.band_shares), (0.0, [0.0, 0.0]));
        assert_eq!(analyze(&[1.0; 4], 10.0), None);
        assert_eq!(analyze(&[f64::NAN; 100], 10.0), None);
        assert_eq!(analyze(&[1.0; 100], 0.0), None);
    }
}
