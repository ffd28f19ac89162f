//! GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training
//! Quantization for Generative Pre-trained Transformers") and round-to-nearest,
//! for one weight matrix on a [`Grid`] of scales: per output column (int8
//! weights) or per block of consecutive input features in each column (int4).
//!
//! The weight is `W: [K, N]` row-major, as a MatMul's constant input: `K` input
//! features (the reduction axis), `N` outputs. Row `k` of `W` is column `k` of
//! the paper's `W` (which is `[N, K]`); everything below is written in this
//! crate's orientation.
//!
//! The math. A linear layer's output error on calibration rows `X: [R, K]` is
//! `||X W - X Q||^2 = sum_n (w_n - q_n)^T H (w_n - q_n)` with `H = X^T X`
//! ([`crate::calibrate::gram_matrices`]), the same `H` for every column `n`.
//! GPTQ rounds the rows of `W` in order `k = 0 .. K-1`; after rounding row `k`
//! it moves the rows not yet rounded to absorb the error (Optimal Brain
//! Surgeon's update), which for a fixed order reads, with `U` the upper
//! Cholesky factor of `H^-1` (`H^-1 = U^T U`):
//!
//! ```text
//! e      = (W[k, :] - Q[k, :]) / U[k, k]
//! W[j, :] -= U[k, j] * e          for every j > k
//! ```
//!
//! Rows are processed in lazy batches of 128: the update inside a batch is done
//! row by row, the rest of `W` gets the batch's errors in one matrix product
//! (`W[b2.., :] -= U[b1..b2, b2..]^T E`), which is the same arithmetic regrouped.
//!
//! Conditions, as the reference implementation (github.com/IST-DASLab/gptq,
//! `gptq.py`): an input feature that never fires (`H[k, k] = 0`) has its row of
//! `W` set to zero and `H[k, k]` to 1; `H` is damped by `damping * mean(diag H)`
//! on the diagonal (0.01 there) so that its Cholesky factorisation exists.
//! Unlike the reference, a block's scale is chosen from the weights as GPTQ has
//! updated them when it reaches the block's first row (the reference reads the
//! rows of the block from before the current lazy batch's updates); lazy batches
//! are a multiple of the block so that every row of the block is up to date.
//!
//! With `H` diagonal, `U` is diagonal, nothing is moved, and GPTQ is exactly
//! round-to-nearest on the same grid ([`round_to_nearest`]; a unit test checks
//! it bit for bit).

use faer::linalg::solvers::DenseSolveCore;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};

/// The integers a scale maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Levels {
    /// `q` in `[-max, max]`, zero point 0, `scale = max|w| / max` (int8 weights:
    /// `max = 127`; int4: 7, leaving -8 unused so that the grid is symmetric).
    Symmetric { max: i32 },
    /// `q` in `[0, max]` with a zero point: over `lo = min(0, min w)` and
    /// `hi = max(0, max w)`, `scale = (hi - lo) / max` and `zero = round(-lo / scale)`
    /// (uint4: `max = 15`). The range holds 0, so zero is exact.
    Asymmetric { max: i32 },
    /// Symmetric, zero point 0, and each aligned pair of rows `k = 2i, 2i + 1`
    /// of a column within `pair_sum`: `|q[2i]| + |q[2i + 1]| <= pair_sum`, with
    /// `scale = max_i (|w[2i]| + |w[2i + 1]|) / max` (int8 weights for ORT's
    /// AVX2 u8 x s8 kernel, which adds each pair's products into int16 with
    /// saturation: `max = 127`, `pair_sum = 128`; see `passes::quantize_dynamic`).
    /// Rounding to nearest keeps the bound by itself (`127 + 2 * 0.5`); GPTQ's
    /// updates can grow a weight past its scale's range, so the second row of a
    /// pair is clamped to what the first left.
    SymmetricPairs { max: i32, pair_sum: i32 },
}

/// Which weights share a scale (and zero point), and the integers it maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    /// Consecutive rows `k` sharing one scale in each column `n` (32, 64, 128
    /// for int4); `None`: one scale per column over all of `K`.
    pub block: Option<usize>,
    pub levels: Levels,
}

/// One quantized `[K, N]` weight. `dequantized[k, n] = (values[k, n] -
/// zero_points[g, n]) * scales[g, n]` with `g = k / block`, computed in f32
/// exactly as a dequantizing kernel does.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedMatrix {
    pub k: usize,
    pub n: usize,
    /// Rows per scale (`K` for a per-column grid).
    pub block: usize,
    /// `[K, N]` row-major.
    pub values: Vec<i32>,
    /// `[ceil(K / block), N]` row-major.
    pub scales: Vec<f32>,
    /// `[ceil(K / block), N]` row-major; 0 on a symmetric grid.
    pub zero_points: Vec<i32>,
    /// `[K, N]` row-major.
    pub dequantized: Vec<f32>,
}

impl QuantizedMatrix {
    /// Number of scale rows: `ceil(K / block)`.
    pub fn blocks(&self) -> usize {
        self.scales.len() / self.n.max(1)
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GptqError {
    #[error("the weight has {found} values, not K x N = {k} x {n}")]
    WeightShape { found: usize, k: usize, n: usize },
    #[error("the Hessian is {rows} x {cols}; the weight has K = {k} input features")]
    HessianShape { rows: usize, cols: usize, k: usize },
    #[error("grid: {0}")]
    Grid(String),
    #[error("the damped Hessian is not positive definite (Cholesky pivot {index}); raise the damping")]
    NotPositiveDefinite { index: usize },
    #[error("the Hessian holds a value that is not finite")]
    NotFinite,
}

/// GPTQ's knobs.
#[derive(Clone, Copy, Debug)]
pub struct GptqOptions {
    /// Added to `H`'s diagonal, as a fraction of its mean (the reference's `percdamp`).
    pub damping: f64,
    /// Rows per lazy batch (rounded up to a multiple of the grid's block).
    pub lazy_batch: usize,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions { damping: 0.01, lazy_batch: 128 }
    }
}

/// Rounds every weight to the nearest level of its block's scale, the scale
/// chosen from the weights themselves.
pub fn round_to_nearest(w: &[f32], k: usize, n: usize, grid: Grid) -> Result<QuantizedMatrix, GptqError> {
    check_weight(w, k, n)?;
    let w: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let mut out = Rounder::new(k, n, grid)?;
    let mut rounded = vec![0f64; n];
    for kk in 0..k {
        if kk % out.block == 0 {
            out.choose_scales(kk, &w[kk * n..(kk + out.block).min(k) * n]);
        }
        out.round_row(kk, &w[kk * n..(kk + 1) * n], &mut rounded);
    }
    Ok(out.into_matrix())
}

/// GPTQ-rounds `w: [K, N]` against `hessian = X^T X: [K, K]` of the layer's input.
pub fn gptq(w: &[f32], k: usize, n: usize, hessian: MatRef<'_, f64>, grid: Grid, options: GptqOptions) -> Result<QuantizedMatrix, GptqError> {
    check_weight(w, k, n)?;
    if hessian.nrows() != k || hessian.ncols() != k {
        return Err(GptqError::HessianShape { rows: hessian.nrows(), cols: hessian.ncols(), k });
    }
    let mut w: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let mut h = hessian.to_owned();
    if (0..k).any(|i| (0..k).any(|j| !h[(i, j)].is_finite())) {
        return Err(GptqError::NotFinite);
    }
    // dead inputs: nothing to preserve, the weight row goes
    for kk in 0..k {
        if h[(kk, kk)] == 0.0 {
            h[(kk, kk)] = 1.0;
            w[kk * n..(kk + 1) * n].fill(0.0);
        }
    }
    let mean_diagonal = (0..k).map(|i| h[(i, i)]).sum::<f64>() / k.max(1) as f64;
    for kk in 0..k {
        h[(kk, kk)] += options.damping * mean_diagonal;
    }
    let upper = inverse_upper_cholesky(&h)?;

    let mut out = Rounder::new(k, n, grid)?;
    let batch = match grid.block {
        Some(block) => options.lazy_batch.max(1).div_ceil(block) * block,
        None => options.lazy_batch.max(1),
    };
    if grid.block.is_none() {
        // the reference chooses per-column scales once, from the (dead-zeroed) weights
        out.choose_scales(0, &w);
    }
    let mut rounded = vec![0f64; n];
    for b1 in (0..k).step_by(batch) {
        let b2 = (b1 + batch).min(k);
        let mut errors = vec![0f64; (b2 - b1) * n];
        for kk in b1..b2 {
            if grid.block.is_some() && kk % out.block == 0 {
                out.choose_scales(kk, &w[kk * n..(kk + out.block).min(k) * n]);
            }
            out.round_row(kk, &w[kk * n..(kk + 1) * n], &mut rounded);
            let d = upper[(kk, kk)];
            let error = &mut errors[(kk - b1) * n..(kk - b1 + 1) * n];
            for ((e, &v), &q) in error.iter_mut().zip(&w[kk * n..(kk + 1) * n]).zip(&rounded) {
                *e = (v - q) / d;
            }
            for (j, row) in w[(kk + 1) * n..b2 * n].chunks_exact_mut(n).enumerate() {
                let coefficient = upper[(kk, kk + 1 + j)];
                if coefficient != 0.0 {
                    for (x, &e) in row.iter_mut().zip(error.iter()) {
                        *x -= coefficient * e;
                    }
                }
            }
        }
        if b2 < k {
            // W[b2.., :] -= U[b1..b2, b2..]^T E
            let trailing = MatMut::from_row_major_slice_mut(&mut w[b2 * n..], k - b2, n);
            let coefficients = upper.as_ref().submatrix(b1, b2, b2 - b1, k - b2).transpose();
            let errors = MatRef::from_row_major_slice(&errors, b2 - b1, n);
            faer::linalg::matmul::matmul(trailing, Accum::Add, coefficients, errors, -1.0, Par::rayon(0));
        }
    }
    Ok(out.into_matrix())
}

/// `U`, upper triangular, with `U^T U = H^-1` (`H` symmetric positive definite).
fn inverse_upper_cholesky(h: &Mat<f64>) -> Result<Mat<f64>, GptqError> {
    let failed = |e: faer::linalg::cholesky::llt::factor::LltError| match e {
        faer::linalg::cholesky::llt::factor::LltError::NonPositivePivot { index } => GptqError::NotPositiveDefinite { index },
    };
    let inverse = h.llt(Side::Lower).map_err(failed)?.inverse();
    // H^-1 = L L^T, so U = L^T
    let lower = inverse.llt(Side::Lower).map_err(failed)?;
    Ok(lower.L().transpose().to_owned())
}

fn check_weight(w: &[f32], k: usize, n: usize) -> Result<(), GptqError> {
    if k.checked_mul(n) != Some(w.len()) {
        return Err(GptqError::WeightShape { found: w.len(), k, n });
    }
    Ok(())
}

/// The output being filled: the current scale and zero point of every column,
/// and the rounded rows.
struct Rounder {
    k: usize,
    n: usize,
    block: usize,
    levels: Levels,
    values: Vec<i32>,
    scales: Vec<f32>,
    zero_points: Vec<i32>,
    dequantized: Vec<f32>,
}

impl Rounder {
    fn new(k: usize, n: usize, grid: Grid) -> Result<Rounder, GptqError> {
        let block = match grid.block {
            Some(0) => return Err(GptqError::Grid("block size 0".into())),
            Some(b) => b,
            None => k.max(1),
        };
        let max = match grid.levels {
            Levels::Symmetric { max } | Levels::Asymmetric { max } => max,
            Levels::SymmetricPairs { max, pair_sum } => {
                if pair_sum < max || block % 2 != 0 && block != k {
                    return Err(GptqError::Grid(format!("pairs of rows within {pair_sum} need pair_sum >= {max} and an even block")));
                }
                max
            }
        };
        if max < 1 {
            return Err(GptqError::Grid(format!("the largest level must be positive, not {max}")));
        }
        let blocks = k.div_ceil(block);
        Ok(Rounder {
            k,
            n,
            block,
            levels: grid.levels,
            values: vec![0; k * n],
            scales: vec![1.0; blocks * n],
            zero_points: vec![0; blocks * n],
            dequantized: vec![0.0; k * n],
        })
    }

    /// Scales (and zero points) of the block starting at row `first` from `rows`,
    /// the block's rows as they stand (`[rows, N]` row-major).
    fn choose_scales(&mut self, first: usize, rows: &[f64]) {
        let n = self.n;
        let group = first / self.block;
        let mut lo = vec![0f64; n];
        let mut hi = vec![0f64; n];
        if let Levels::SymmetricPairs { .. } = self.levels {
            // hi holds the largest |w[2i]| + |w[2i + 1]| of each column
            for pair in rows.chunks(2 * n) {
                for j in 0..n {
                    let sum: f64 = pair.chunks_exact(n).map(|row| row[j].abs()).sum();
                    hi[j] = hi[j].max(sum);
                }
            }
        } else {
            for row in rows.chunks_exact(n) {
                for ((l, h), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(row) {
                    *l = l.min(v);
                    *h = h.max(v);
                }
            }
        }
        let scales = &mut self.scales[group * n..(group + 1) * n];
        let zeros = &mut self.zero_points[group * n..(group + 1) * n];
        for j in 0..n {
            let (scale, zero) = match self.levels {
                Levels::SymmetricPairs { max, .. } => (if hi[j] > 0.0 { hi[j] as f32 / max as f32 } else { 1.0 }, 0),
                Levels::Symmetric { max } => {
                    let absmax = lo[j].abs().max(hi[j]) as f32;
                    (if absmax > 0.0 { absmax / max as f32 } else { 1.0 }, 0)
                }
                Levels::Asymmetric { max } => {
                    let range = (hi[j] - lo[j]) as f32;
                    let scale = if range > 0.0 { range / max as f32 } else { 1.0 };
                    let zero = (-lo[j] / scale as f64).round().clamp(0.0, max as f64) as i32;
                    (scale, zero)
                }
            };
            scales[j] = scale;
            zeros[j] = zero;
        }
    }

    /// Rounds row `k` of the weight (`row`, `[N]`) on its block's scales; writes
    /// the dequantized values to `rounded`.
    fn round_row(&mut self, k: usize, row: &[f64], rounded: &mut [f64]) {
        let n = self.n;
        let group = k / self.block;
        let (lo, hi, pair_sum) = match self.levels {
            Levels::Symmetric { max } => (-max, max, None),
            Levels::Asymmetric { max } => (0, max, None),
            // the second row of an aligned pair (rows are counted from the block's first)
            Levels::SymmetricPairs { max, pair_sum } => (-max, max, ((k % self.block) % 2 == 1).then_some(pair_sum)),
        };
        let scales = &self.scales[group * n..(group + 1) * n];
        let zeros = &self.zero_points[group * n..(group + 1) * n];
        let (before, rest) = self.values.split_at_mut(k * n);
        let partner = pair_sum.map(|_| &before[(k - 1) * n..]);
        let values = &mut rest[..n];
        let dequantized = &mut self.dequantized[k * n..(k + 1) * n];
        for j in 0..n {
            let (scale, zero) = (scales[j], zeros[j]);
            let (lo, hi) = match (pair_sum, partner) {
                (Some(sum), Some(first)) => {
                    let left = hi.min(sum - first[j].abs());
                    (-left, left)
                }
                _ => (lo, hi),
            };
            let q = ((row[j] / scale as f64).round() as i64 + zero as i64).clamp(lo as i64, hi as i64) as i32;
            let value = (q - zero) as f32 * scale;
            values[j] = q;
            dequantized[j] = value;
            rounded[j] = value as f64;
        }
    }

    fn into_matrix(self) -> QuantizedMatrix {
        debug_assert_eq!(self.values.len(), self.k * self.n);
        QuantizedMatrix {
            k: self.k,
            n: self.n,
            block: self.block,
            values: self.values,
            scales: self.scales,
            zero_points: self.zero_points,
            dequantized: self.dequantized,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::SeededRng;

    fn normal(rng: &mut SeededRng) -> f64 {
        // Box-Muller
        let (u, v) = (rng.uniform().max(1e-12), rng.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// Correlated inputs `X: [rows, K]` (each feature mixes its neighbours, and
    /// features differ in scale): GPTQ has something to exploit.
    fn inputs(rows: usize, k: usize, seed: u64) -> Vec<f64> {
        let mut rng = SeededRng::new(seed);
        let mut x = vec![0f64; rows * k];
        for r in 0..rows {
            let z: Vec<f64> = (0..k).map(|_| normal(&mut rng)).collect();
            for j in 0..k {
                let scale = 1.0 + (j % 5) as f64;
                x[r * k + j] = scale * (z[j] + 0.8 * z[(j + 1) % k] + 0.5 * z[(j + 3) % k]);
            }
        }
        x
    }

    fn gram(x: &[f64], rows: usize, k: usize) -> Mat<f64> {
        Mat::from_fn(k, k, |i, j| (0..rows).map(|r| x[r * k + i] * x[r * k + j]).sum())
    }

    fn weights(k: usize, n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SeededRng::new(seed);
        (0..k * n).map(|_| normal(&mut rng) as f32 * 0.1).collect()
    }

    /// `||X W - X Q||^2`.
    fn output_error(x: &[f64], rows: usize, k: usize, n: usize, w: &[f32], q: &[f32]) -> f64 {
        let mut total = 0.0;
        for r in 0..rows {
            for j in 0..n {
                let d: f64 = (0..k).map(|i| x[r * k + i] * (w[i * n + j] - q[i * n + j]) as f64).sum();
                total += d * d;
            }
        }
        total
    }

    const INT4_BLOCKED: Grid = Grid { block: Some(16), levels: Levels::Asymmetric { max: 15 } };
    const INT4_SYMMETRIC: Grid = Grid { block: Some(32), levels: Levels::Symmetric { max: 7 } };
    const INT8_COLUMNS: Grid = Grid { block: None, levels: Levels::Symmetric { max: 127 } };
    const INT8_PAIRS: Grid = Grid { block: None, levels: Levels::SymmetricPairs { max: 127, pair_sum: 128 } };

    #[test]
    fn gptq_beats_round_to_nearest_on_correlated_inputs() {
        let (rows, k, n) = (256, 64, 24);
        let x = inputs(rows, k, 1);
        let h = gram(&x, rows, k);
        let w = weights(k, n, 2);
        for grid in [INT4_BLOCKED, INT4_SYMMETRIC, INT8_COLUMNS, INT8_PAIRS] {
            let rtn = round_to_nearest(&w, k, n, grid).unwrap();
            let ours = gptq(&w, k, n, h.as_ref(), grid, GptqOptions { lazy_batch: 24, ..GptqOptions::default() }).unwrap();
            let (e_rtn, e_gptq) = (output_error(&x, rows, k, n, &w, &rtn.dequantized), output_error(&x, rows, k, n, &w, &ours.dequantized));
            assert!(e_gptq < 0.8 * e_rtn, "{grid:?}: GPTQ {e_gptq:.4e}, RTN {e_rtn:.4e}");
        }
    }

    /// The int8 grid for ORT's AVX2 kernel: GPTQ's updates, which move weights
    /// past the range their scale was chosen for, never push an aligned pair
    /// past 128.
    #[test]
    fn pair_bounded_int8_keeps_every_pair_within_128() {
        let (rows, k, n) = (256, 64, 24);
        let x = inputs(rows, k, 8);
        let h = gram(&x, rows, k);
        let w = weights(k, n, 9);
        let rtn = round_to_nearest(&w, k, n, INT8_PAIRS).unwrap();
        let ours = gptq(&w, k, n, h.as_ref(), INT8_PAIRS, GptqOptions::default()).unwrap();
        for q in [&rtn, &ours] {
            for pair in q.values.chunks(2 * n) {
                for j in 0..n {
                    let sum: i32 = pair.chunks_exact(n).map(|row| row[j].abs()).sum();
                    assert!(sum <= 128, "pair sum {sum}");
                }
            }
            assert!(q.values.iter().all(|v| v.abs() <= 127));
        }
        // the scale is the largest pair's |w| sum over 127
        let column_0_pair_max = w.chunks(2 * n).map(|p| p.chunks_exact(n).map(|r| r[0].abs()).sum::<f32>()).fold(0f32, f32::max);
        assert_eq!(rtn.scales[0], column_0_pair_max / 127.0);
    }

    #[test]
    fn with_an_identity_hessian_gptq_is_round_to_nearest() {
        let (k, n) = (96, 10);
        let w = weights(k, n, 3);
        let identity = Mat::<f64>::identity(k, k);
        for grid in [INT4_BLOCKED, INT4_SYMMETRIC, INT8_COLUMNS, INT8_PAIRS] {
            let rtn = round_to_nearest(&w, k, n, grid).unwrap();
            let ours = gptq(&w, k, n, identity.as_ref(), grid, GptqOptions::default()).unwrap();
            assert_eq!(ours, rtn, "{grid:?}");
        }
    }

    /// Lazy batches regroup the same arithmetic: the result hardly depends on their size.
    #[test]
    fn lazy_batch_size_does_not_change_the_result() {
        let (rows, k, n) = (128, 48, 8);
        let x = inputs(rows, k, 4);
        let h = gram(&x, rows, k);
        let w = weights(k, n, 5);
        let one = gptq(&w, k, n, h.as_ref(), INT4_BLOCKED, GptqOptions { lazy_batch: 1, ..GptqOptions::default() }).unwrap();
        let all = gptq(&w, k, n, h.as_ref(), INT4_BLOCKED, GptqOptions { lazy_batch: k, ..GptqOptions::default() }).unwrap();
        let differing = one.values.iter().zip(&all.values).filter(|(a, b)| a != b).count();
        // float regrouping may flip a value sitting on a rounding boundary, rarely
        assert!(differing <= 2, "{differing} of {} values differ", k * n);
    }

    #[test]
    fn dead_inputs_get_zero_weights_and_grid_bounds_hold() {
        let (rows, k, n) = (64, 32, 6);
        let mut x = inputs(rows, k, 6);
        for r in 0..rows {
            x[r * k + 5] = 0.0; // feature 5 never fires
        }
        let h = gram(&x, rows, k);
        let w = weights(k, n, 7);
        let q = gptq(&w, k, n, h.as_ref(), INT4_BLOCKED, GptqOptions::default()).unwrap();
        assert!(q.dequantized[5 * n..6 * n].iter().all(|&v| v == 0.0));
        assert!(q.values.iter().all(|v| (0..=15).contains(v)));
        assert!(q.zero_points.iter().all(|v| (0..=15).contains(v)));
        assert_eq!((q.blocks(), q.block), (2, 16));
        for (i, (&v, &d)) in q.values.iter().zip(&q.dequantized).enumerate() {
            let g = (i / n) / q.block * n + i % n;
            assert_eq!(d, (v - q.zero_points[g]) as f32 * q.scales[g]);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let w = vec![0.0f32; 12];
        assert_eq!(round_to_nearest(&w, 5, 3, INT4_BLOCKED), Err(GptqError::WeightShape { found: 12, k: 5, n: 3 }));
        let h = Mat::<f64>::identity(3, 3);
        assert!(matches!(gptq(&w, 4, 3, h.as_ref(), INT4_BLOCKED, GptqOptions::default()), Err(GptqError::HessianShape { .. })));
        let zero_block = Grid { block: Some(0), ..INT4_BLOCKED };
        assert!(matches!(round_to_nearest(&w, 4, 3, zero_block), Err(GptqError::Grid(_))));
    }
}
