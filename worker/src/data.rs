//! The synthetic data set: deterministic, the same on every rank, and addressable by index, so
//! that any rank can produce any sample without storing or shipping data.
//!
//! Sample `i` has features drawn uniformly from [−1, 1] by a counter-based generator (SplitMix64
//! of the seed, the index and the feature), and a label from a hidden linear teacher, flipped for
//! 5% of samples so the problem is not separable. Step `s` of training uses samples
//! `s × global_batch ..` (modulo the data set size), whatever the world size: that is what makes a
//! run resumed at another size follow the same trajectory.

#[derive(Debug, Clone)]
pub struct Dataset {
    pub seed: u64,
    pub features: usize,
    pub size: u64,
    teacher: Vec<f64>,
}

impl Dataset {
    pub fn new(seed: u64, features: usize, size: u64) -> Self {
        let teacher = (0..features).map(|j| uniform(mix(seed ^ 0x7EAC_4E55, u64::MAX, j as u64))).collect();
        Dataset { seed, features, size, teacher }
    }

    /// Features of sample `index` into `x` (length `features`); returns its label, 0 or 1.
    pub fn sample(&self, index: u64, x: &mut [f64]) -> f64 {
        let i = index % self.size;
        let mut score = 0.0;
        for (j, (xj, tj)) in x.iter_mut().zip(&self.teacher).enumerate() {
            *xj = uniform(mix(self.seed, i, j as u64));
            score += *xj * tj;
        }
        let flipped = mix(self.seed ^ 0xF11B, i, 0) % 100 < 5;
        f64::from(u8::from((score > 0.0) != flipped))
    }

    /// The global sample indices of step `step`, and this rank's contiguous share of them.
    pub fn shard(step: u64, global_batch: u64, rank: usize, world: usize) -> std::ops::Range<u64> {
        let (w, r) = (world as u64, rank as u64);
        let (base, extra) = (global_batch / w, global_batch % w);
        let start = r * base + r.min(extra);
        let len = base + u64::from(r < extra);
        let first = step * global_batch;
        first + start..first + start + len
    }
}

/// SplitMix64 over three words.
fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ c.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A 53-bit uniform in [−1, 1).
fn uniform(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_global_batch_at_every_world_size() {
        for world in 1..9 {
            let mut covered = Vec::new();
            for rank in 0..world {
                covered.extend(Dataset::shard(3, 10, rank, world));
            }
            assert_eq!(covered, (30..40).collect::<Vec<u64>>(), "world {world}");
        }
    }

    #[test]
    fn samples_are_deterministic_and_labels_are_mixed() {
        let d = Dataset::new(7, 16, 1000);
        let (mut a, mut b) = (vec![0.0; 16], vec![0.0; 16]);
        assert_eq!(d.sample(42, &mut a), d.sample(1042, &mut b));
        assert_eq!(a, b);
        let ones: f64 = (0..1000).map(|i| d.sample(i, &mut a)).sum();
        assert!((300.0..700.0).contains(&ones), "{ones}");
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
    }
}
