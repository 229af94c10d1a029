//! The models: logistic regression and a two-layer MLP (tanh hidden layer), both binary
//! classifiers trained on the logistic loss. Parameters are one flat `f64` vector — what the
//! all-reduce moves and the checkpoint stores. `f64` keeps a run resumed at another world size
//! (another summation order) within 1e-12 of an uninterrupted one.

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelKind {
    Logreg,
    Mlp,
}

impl ModelKind {
    pub fn tag(self) -> u32 {
        match self {
            ModelKind::Logreg => 1,
            ModelKind::Mlp => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Logreg => "logreg",
            ModelKind::Mlp => "mlp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Model {
    pub kind: ModelKind,
    pub features: usize,
    pub hidden: usize,
}

impl Model {
    pub fn param_count(&self) -> usize {
        let (d, h) = (self.features, self.hidden);
        match self.kind {
            ModelKind::Logreg => d + 1,
            ModelKind::Mlp => h * d + h + h + 1,
        }
    }

    /// Initial parameters: zeros for logistic regression; small deterministic values for the
    /// MLP's weights (zero would leave every hidden unit the same).
    pub fn init(&self, seed: u64) -> Vec<f64> {
        let mut p = vec![0.0; self.param_count()];
        if self.kind == ModelKind::Mlp {
            let (d, h) = (self.features, self.hidden);
            let mut state = seed ^ 0x1417;
            let mut next = |scale: f64| {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                ((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
            };
            for v in &mut p[..h * d] {
                *v = next(1.0 / (d as f64).sqrt());
            }
            for v in &mut p[h * d + h..h * d + 2 * h] {
                *v = next(1.0 / (h as f64).sqrt());
            }
        }
        p
    }

    /// Add the gradient of one sample's loss to `grad` and return the loss. `hidden` is scratch
    /// of length `hidden`.
    pub fn accumulate(&self, params: &[f64], x: &[f64], y: f64, grad: &mut [f64], hidden: &mut [f64]) -> f64 {
        let d = self.features;
        match self.kind {
            ModelKind::Logreg => {
                let z = dot(&params[..d], x) + params[d];
                let dz = sigmoid(z) - y;
                axpy(dz, x, &mut grad[..d]);
                grad[d] += dz;
                logistic_loss(z, y)
            }
            ModelKind::Mlp => {
                let h = self.hidden;
                let (w1, rest) = params.split_at(h * d);
                let (b1, rest) = rest.split_at(h);
                let (w2, b2) = rest.split_at(h);
                for (k, a) in hidden.iter_mut().enumerate() {
                    *a = (dot(&w1[k * d..(k + 1) * d], x) + b1[k]).tanh();
                }
                let z = dot(w2, hidden) + b2[0];
                let dz = sigmoid(z) - y;
                let (gw1, rest) = grad.split_at_mut(h * d);
                let (gb1, rest) = rest.split_at_mut(h);
                let (gw2, gb2) = rest.split_at_mut(h);
                for k in 0..h {
                    let dh = dz * w2[k] * (1.0 - hidden[k] * hidden[k]);
                    gw2[k] += dz * hidden[k];
                    gb1[k] += dh;
                    axpy(dh, x, &mut gw1[k * d..(k + 1) * d]);
                }
                gb2[0] += dz;
                logistic_loss(z, y)
            }
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(a: f64, x: &[f64], y: &mut [f64]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// −[y ln σ(z) + (1 − y) ln(1 − σ(z))], computed without overflow.
fn logistic_loss(z: f64, y: f64) -> f64 {
    z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The analytic gradient matches a central finite difference of the loss.
    #[test]
    fn gradients_match_finite_differences() {
        for kind in [ModelKind::Logreg, ModelKind::Mlp] {
            let m = Model { kind, features: 5, hidden: 3 };
            let mut p = m.init(3);
            for (i, v) in p.iter_mut().enumerate() {
                *v += 0.1 * (i as f64).sin();
            }
            let x = [0.3, -0.7, 0.1, 0.9, -0.2];
            let mut hidden = vec![0.0; 3];
            let mut grad = vec![0.0; m.param_count()];
            m.accumulate(&p, &x, 1.0, &mut grad, &mut hidden);
            for i in 0..p.len() {
                let eps = 1e-6;
                let mut sink = vec![0.0; p.len()];
                let mut q = p.clone();
                q[i] += eps;
                let up = m.accumulate(&q, &x, 1.0, &mut sink, &mut hidden);
                q[i] -= 2.0 * eps;
                let down = m.accumulate(&q, &x, 1.0, &mut sink, &mut hidden);
                let numeric = (up - down) / (2.0 * eps);
                assert!((numeric - grad[i]).abs() < 1e-6, "{kind:?} param {i}: {numeric} vs {}", grad[i]);
            }
        }
    }
}
