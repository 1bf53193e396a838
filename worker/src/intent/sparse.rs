//! The sparse first layer: an embedding bag (sparse TF-IDF × dense table) and its
//! row-wise lazy Adam update, in plain Rust with rayon.
//!
//! burn has no sparse gradients: a dense gradient of a 100k × 256 table per step
//! would cost more than the rest of the model. Here the forward is a weighted sum
//! of the rows an utterance touches, and the update visits only those rows
//! (lazy Adam: the moments of a row decay only when the row is touched; bias
//! correction uses the global step, as TensorFlow's LazyAdam). Every sum runs in
//! a fixed order, so results do not depend on the number of threads.

use rand::{rngs::StdRng, Rng};
use rayon::prelude::*;

use super::features::Csr;

/// Adam hyper-parameters of the sparse table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamParams {
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Numerical floor.
    pub eps: f32,
}

impl Default for AdamParams {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// A `rows × dim` table with its Adam moments.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingBag {
    /// Number of rows (features).
    pub rows: usize,
    /// Row width (hidden size).
    pub dim: usize,
    /// The table, row-major.
    pub weight: Vec<f32>,
    /// First moments.
    pub m: Vec<f32>,
    /// Second moments.
    pub v: Vec<f32>,
    /// Update steps taken.
    pub step: u64,
}

impl EmbeddingBag {
    /// A table initialised uniformly in ±`scale`, zero moments.
    pub fn new(rows: usize, dim: usize, scale: f32, rng: &mut StdRng) -> Self {
        let weight = (0..rows * dim).map(|_| rng.random_range(-scale..scale)).collect();
        Self { rows, dim, weight, m: vec![0.0; rows * dim], v: vec![0.0; rows * dim], step: 0 }
    }

    /// A table with given weights (inference: no moments).
    pub fn from_weights(rows: usize, dim: usize, weight: Vec<f32>) -> Self {
        assert_eq!(weight.len(), rows * dim, "embedding weights have the wrong size");
        Self { rows, dim, weight, m: Vec::new(), v: Vec::new(), step: 0 }
    }

    /// `out[k] = Σ_j x[rows[k], j] · W[j]` for each row of `x` listed in `batch`; `len(batch) × dim`, row-major.
    pub fn forward(&self, x: &Csr, batch: &[usize]) -> Vec<f32> {
        let dim = self.dim;
        let mut out = vec![0.0f32; batch.len() * dim];
        out.par_chunks_mut(dim).zip(batch.par_iter()).for_each(|(o, &r)| {
            let (idx, val) = x.row(r);
            for (&j, &w) in idx.iter().zip(val) {
                let row = &self.weight[j as usize * dim..(j as usize + 1) * dim];
                o.iter_mut().zip(row).for_each(|(a, b)| *a += w * b);
            }
        });
        out
    }

    /// One lazy-Adam step on the rows the batch touched, given `grad_out`
    /// (`len(batch) × dim`, the loss gradient w.r.t. [`forward`](Self::forward)'s output).
    pub fn update(&mut self, x: &Csr, batch: &[usize], grad_out: &[f32], lr: f32, adam: AdamParams) {
        let dim = self.dim;
        assert_eq!(grad_out.len(), batch.len() * dim, "gradient has the wrong size");
        // (feature, position in batch, weight), grouped by feature in a fixed order.
        let mut entries: Vec<(u32, u32, f32)> = Vec::new();
        for (k, &r) in batch.iter().enumerate() {
            let (idx, val) = x.row(r);
            entries.extend(idx.iter().zip(val).map(|(&j, &w)| (j, k as u32, w)));
        }
        entries.sort_unstable_by_key(|e| (e.0, e.1));
        let mut starts: Vec<usize> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if i == 0 || entries[i - 1].0 != e.0 {
                starts.push(i);
            }
        }
        starts.push(entries.len());
        let n = starts.len() - 1;
        // Row gradients, one slot per touched row.
        let mut grads = vec![0.0f32; n * dim];
        grads.par_chunks_mut(dim).enumerate().for_each(|(s, g)| {
            for &(_, k, w) in &entries[starts[s]..starts[s + 1]] {
                let go = &grad_out[k as usize * dim..(k as usize + 1) * dim];
                g.iter_mut().zip(go).for_each(|(a, b)| *a += w * b);
            }
        });
        let mut slot = vec![u32::MAX; self.rows];
        for s in 0..n {
            slot[entries[starts[s]].0 as usize] = s as u32;
        }
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (adam.beta1, adam.beta2);
        let step_size = lr * (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t));
        let eps = adam.eps;
        self.weight.par_chunks_mut(dim).zip(self.m.par_chunks_mut(dim)).zip(self.v.par_chunks_mut(dim)).zip(slot.par_iter()).for_each(
            |(((w, m), v), &s)| {
                if s == u32::MAX {
                    return;
                }
                let g = &grads[s as usize * dim..(s as usize + 1) * dim];
                for i in 0..dim {
                    m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                    v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                    w[i] -= step_size * m[i] / (v[i].sqrt() + eps);
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn x() -> Csr {
        Csr { indptr: vec![0, 2, 3], indices: vec![0, 2, 1], values: vec![0.6, 0.8, 1.0] }
    }

    #[test]
    fn forward_is_a_weighted_sum_of_rows() {
        let e = EmbeddingBag::from_weights(3, 2, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let out = e.forward(&x(), &[1, 0]);
        assert_eq!(out, vec![3.0, 4.0, 0.6 * 1.0 + 0.8 * 5.0, 0.6 * 2.0 + 0.8 * 6.0]);
    }

    #[test]
    fn update_touches_only_batch_rows_and_descends() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut e = EmbeddingBag::new(3, 2, 0.1, &mut rng);
        let before = e.weight.clone();
        // Loss = sum of outputs of row 0 → gradient 1 everywhere.
        e.update(&x(), &[0], &[1.0, 1.0], 0.01, AdamParams::default());
        assert_eq!(e.weight[2..4], before[2..4], "row 1 was not in the batch");
        assert!(e.weight[0] < before[0] && e.weight[4] < before[4]);
        assert!((before[0] - e.weight[0] - 0.01).abs() < 1e-4, "first Adam step moves by lr");
        assert_eq!(e.step, 1);
    }
}
