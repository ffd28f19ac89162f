//! Teacher-guided reconstruction: re-fit a pruned layer's surviving weights so
//! that, on calibration data, its output matches the original model's.
//!
//! The math. A linear layer `Y = X W`, `W[K, N]`, pruned to the mask `M`. The
//! teacher (the original model) computes `X_t w_n` for output `n`; the student
//! (the model pruned so far, earlier layers already re-fitted) feeds this layer
//! `X_s`. For each `n`, with `S_n` the kept `k` of column `n`:
//!
//! ```text
//! min over w (zero outside S_n) of ||X_s w - X_t w_n||^2
//!   <=>  (A[S, S] + lambda I) w_S = (B w_n)[S],   A = X_s^T X_s,  B = X_s^T X_t
//! ```
//!
//! (the normal equations). They are damped towards the original weights,
//! `min ||X_s w - X_t w_n||^2 + lambda ||w - w_n[S]||^2`, i.e.
//! `(A[S, S] + lambda I) w_S = (B w_n)[S] + lambda w_n[S]`, with
//! `lambda = damping * mean(diag A)`: where the calibration data says little
//! (collinear or rarely active features) the re-fit keeps the teacher's
//! weight instead of shrinking it to zero, as SparseGPT's damped OBS update
//! does. [`refit_cross_validated`] chooses the damping per layer by two-fold
//! cross-validation (even against odd calibration batches), from
//! [`CROSS_VALIDATED_DAMPINGS`], or keeps the masked original weights when no
//! re-fit does better on held-out batches. Solved per output with a faer
//! Cholesky factorisation, outputs in parallel. This is the exact least-squares
//! solution under the mask (the mask-tuning step of Kwon et al., NeurIPS 2022,
//! with the student/teacher inputs of their layer-wise reconstruction);
//! SparseGPT's OBS sweep approximates the same problem to save the per-output
//! factorisations, which at MiniLM's sizes (K at most 1536) cost seconds, not
//! hours, so the exact solve is used. The mask itself is chosen before the
//! re-fit (magnitude, Wanda or OBS on the student's input; OBS in rounds,
//! [`refined_mask`]).
//!
//! A layer with a bias also re-fits it: the same least squares over `[X_s 1]`
//! (a ones column appended), whose last coefficient shifts the bias.
//!
//! Only `K x K` sums (and column sums) are kept, never activations: `A`, `B`
//! and `C = X_t^T X_t` summed over real-token rows of every batch. The layer
//! error reported is relative, `sum_n ||X_s w'_n - X_t w_n||^2 / sum_n
//! ||X_t w_n||^2`, expanded through the same sums:
//! `w'^T A w' - 2 w'^T B w + w^T C w` (plus the bias shift's terms).

use super::sparse::LinearWeight;
use crate::calibrate::CalibrateError;
use faer::linalg::solvers::{DenseSolveCore, Solve};
use faer::{Accum, Mat, MatRef, Par, Side};
use rayon::prelude::*;
use tract_onnx::prelude::Tensor;

/// The three `K x K` sums of one activation that feeds pruned layers, the
/// student's and the teacher's values of it taken on the same rows.
#[derive(Clone, Debug)]
pub struct PairedGram {
    pub name: String,
    /// `X_s^T X_s`.
    pub student: Mat<f64>,
    /// `X_s^T X_t`.
    pub cross: Mat<f64>,
    /// `X_t^T X_t`.
    pub teacher: Mat<f64>,
    /// `X_s^T 1` and `X_t^T 1`: column sums, for re-fitting a bias.
    pub student_sum: Vec<f64>,
    pub teacher_sum: Vec<f64>,
    pub rows: u64,
}

impl PairedGram {
    pub fn new(name: &str) -> PairedGram {
        let empty = || Mat::zeros(0, 0);
        PairedGram { name: name.into(), student: empty(), cross: empty(), teacher: empty(), student_sum: Vec::new(), teacher_sum: Vec::new(), rows: 0 }
    }

    /// Folds in the rows of one batch whose `keep` entry is true (`None`: all).
    pub fn observe(&mut self, student: &Tensor, teacher: &Tensor, keep: Option<&[bool]>) -> Result<(), CalibrateError> {
        let fail = |why: String| CalibrateError::Observe { tensor: self.name.clone(), why };
        if student.shape() != teacher.shape() {
            return Err(fail(format!("student shape {:?}, teacher shape {:?}", student.shape(), teacher.shape())));
        }
        let k = student.shape().last().copied().unwrap_or(1);
        let values = |t: &Tensor| -> Result<Vec<f32>, CalibrateError> {
            let cast = t.cast_to::<f32>().map_err(|e| fail(format!("not numeric: {e}")))?;
            let view = cast.to_plain_array_view::<f32>().map_err(|e| fail(e.to_string()))?;
            Ok(view.iter().copied().collect())
        };
        let (xs, xt) = (values(student)?, values(teacher)?);
        let rows = xs.len().checked_div(k).unwrap_or(0);
        if self.rows == 0 && self.student.nrows() == 0 {
            (self.student, self.cross, self.teacher) = (Mat::zeros(k, k), Mat::zeros(k, k), Mat::zeros(k, k));
            (self.student_sum, self.teacher_sum) = (vec![0.0; k], vec![0.0; k]);
        } else if self.student.nrows() != k {
            return Err(fail(format!("last axis has {k} features, earlier batches had {}", self.student.nrows())));
        }
        if keep.is_some_and(|m| m.len() != rows) {
            return Err(fail(format!("{rows} rows but a mask of {}", keep.map_or(0, <[bool]>::len))));
        }
        let kept: Vec<usize> = (0..rows).filter(|&r| keep.is_none_or(|m| m[r])).collect();
        if kept.is_empty() {
            return Ok(());
        }
        let matrix = |x: &[f32]| Mat::<f64>::from_fn(kept.len(), k, |i, j| x[kept[i] * k + j] as f64);
        let (xs, xt) = (matrix(&xs), matrix(&xt));
        let par = Par::rayon(0);
        faer::linalg::matmul::matmul(self.student.as_mut(), Accum::Add, xs.transpose(), xs.as_ref(), 1.0, par);
        faer::linalg::matmul::matmul(self.cross.as_mut(), Accum::Add, xs.transpose(), xt.as_ref(), 1.0, par);
        faer::linalg::matmul::matmul(self.teacher.as_mut(), Accum::Add, xt.transpose(), xt.as_ref(), 1.0, par);
        for (sum, x) in [(&mut self.student_sum, &xs), (&mut self.teacher_sum, &xt)] {
            for (j, total) in sum.iter_mut().enumerate() {
                *total += (0..x.nrows()).map(|i| x[(i, j)]).sum::<f64>();
            }
        }
        self.rows += kept.len() as u64;
        Ok(())
    }

    /// The sums over the rows of `self` and of `other`.
    pub fn plus(&self, other: &PairedGram) -> PairedGram {
        if other.rows == 0 {
            return self.clone();
        }
        if self.rows == 0 {
            return other.clone();
        }
        PairedGram {
            name: self.name.clone(),
            student: &self.student + &other.student,
            cross: &self.cross + &other.cross,
            teacher: &self.teacher + &other.teacher,
            student_sum: self.student_sum.iter().zip(&other.student_sum).map(|(a, b)| a + b).collect(),
            teacher_sum: self.teacher_sum.iter().zip(&other.teacher_sum).map(|(a, b)| a + b).collect(),
            rows: self.rows + other.rows,
        }
    }

    /// `||X_s,k||` for each feature: Wanda's input norms, on the student's input.
    pub fn student_norms(&self) -> Vec<f64> {
        (0..self.student.nrows()).map(|k| self.student[(k, k)].max(0.0).sqrt()).collect()
    }

    /// The sums as `(A, B, C)`, with the column sums.
    pub fn sums(&self) -> Sums<'_> {
        let ones = (self.student_sum.len() == self.student.nrows()).then(|| ColumnSums {
            student: &self.student_sum,
            teacher: &self.teacher_sum,
            rows: self.rows as f64,
        });
        Sums { student: self.student.as_ref(), cross: self.cross.as_ref(), teacher: self.teacher.as_ref(), ones }
    }
}

/// Optimal Brain Surgeon's per-feature factor for `Importance::Obs`:
/// `1 / sqrt([(A + lambda I)^-1]_kk)`, `lambda = damping * mean(diag A)`.
/// Removing the single weight `w_kn` and re-fitting the others of output `n`
/// optimally raises `||X w_n||^2` by `w_kn^2 / [A^-1]_kk` (Hassibi and Stork
/// 1993; SparseGPT's criterion), so ranking `|w_kn|` times this factor ranks
/// weights by what they cost once the re-fit has compensated, where Wanda's
/// `||X_k||` ranks by what they cost without it. `None` when `A` holds no
/// data or is not positive definite with the damping.
pub fn obs_factors(a: MatRef<f64>, damping: f64) -> Option<Vec<f64>> {
    let k = a.nrows();
    let mean_diagonal = (0..k).map(|i| a[(i, i)]).sum::<f64>() / k.max(1) as f64;
    if mean_diagonal <= 0.0 {
        return None;
    }
    let lambda = damping.max(1e-6) * mean_diagonal;
    let damped = Mat::<f64>::from_fn(k, k, |i, j| a[(i, j)] + if i == j { lambda } else { 0.0 });
    let inverse = damped.llt(Side::Lower).ok()?.inverse();
    Some((0..k).map(|i| 1.0 / inverse[(i, i)].max(f64::MIN_POSITIVE).sqrt()).collect())
}

/// A later round of an OBS mask in rounds. Earlier rounds zeroed part of
/// each output's weights (`earlier`; the first by [`obs_factors`] on the
/// original weights); here each output `n` is re-fitted on its kept features
/// `S` (`G = A[S, S] + lambda I`, `w_S = G^-1 ((B w_n)[S] + lambda w_n[S])`,
/// as [`refit`] does) and its weights ranked again by `w_k^2 / [G^-1]_kk`,
/// the exact rise of the damped cost when `k` too is removed and the rest
/// re-fitted. Re-ranking after compensation is what SparseGPT's column sweep
/// and OBC's greedy removal do weight by weight; a few rounds take most of
/// that at two factorisations per output and round.
/// `removals(kept)` says which of the kept `k` of an output may go and how
/// many: `(candidates, count)` groups (`sparse::removals_to`).
pub fn refined_mask(
    weight: &LinearWeight,
    earlier: &[bool],
    sums: Sums,
    damping: f64,
    removals: impl Fn(&[usize]) -> Vec<(Vec<usize>, usize)> + Sync,
) -> Result<Vec<bool>, ReconstructError> {
    let (k, n) = (weight.k, weight.n);
    if sums.student.nrows() != k {
        return Err(ReconstructError::Shape { k, features: sums.student.nrows() });
    }
    let mean_diagonal = trace(sums.student) / k.max(1) as f64;
    if mean_diagonal <= 0.0 {
        return Err(ReconstructError::NoData);
    }
    let lambda = damping.max(1e-6) * mean_diagonal;
    let w = as_mat(weight);
    let targets = product(sums.cross, w.as_ref());
    let dropped: Vec<Vec<usize>> = (0..n)
        .into_par_iter()
        .map(|nn| {
            let kept: Vec<usize> = (0..k).filter(|&kk| earlier[kk * n + nn]).collect();
            let system = KeptSystem { a: sums.student, kept: &kept, ones: None, lambda };
            let llt = system.matrix().llt(Side::Lower).map_err(|_| ReconstructError::NotPositiveDefinite { output: nn, damping: lambda })?;
            let rhs = Mat::<f64>::from_fn(kept.len(), 1, |i, _| targets[(kept[i], nn)] + lambda * w[(kept[i], nn)]);
            let fitted = llt.solve(&rhs);
            let inverse = llt.inverse();
            let saliency: std::collections::HashMap<usize, f64> =
                (0..kept.len()).map(|i| (kept[i], fitted[(i, 0)].powi(2) / inverse[(i, i)].max(f64::MIN_POSITIVE))).collect();
            let mut out = Vec::new();
            for (mut candidates, count) in removals(&kept) {
                // least salient first; ties drop the higher k
                candidates.sort_by(|a, b| saliency[a].total_cmp(&saliency[b]).then(b.cmp(a)));
                out.extend(candidates.into_iter().take(count));
            }
            Ok(out)
        })
        .collect::<Result<_, ReconstructError>>()?;
    let mut keep = earlier.to_vec();
    for (nn, gone) in dropped.iter().enumerate() {
        for &kk in gone {
            keep[kk * n + nn] = false;
        }
    }
    Ok(keep)
}

/// `A = X_s^T X_s`, `B = X_s^T X_t`, `C = X_t^T X_t`. Without reconstruction the
/// student's input is the teacher's, and all three are one Gram matrix.
#[derive(Clone, Copy)]
pub struct Sums<'a> {
    pub student: MatRef<'a, f64>,
    pub cross: MatRef<'a, f64>,
    pub teacher: MatRef<'a, f64>,
    /// The column sums, where kept: what re-fitting a bias needs.
    pub ones: Option<ColumnSums<'a>>,
}

/// `X_s^T 1`, `X_t^T 1` and `1^T 1`: the sums the ones column of `[X 1]` adds.
#[derive(Clone, Copy)]
pub struct ColumnSums<'a> {
    pub student: &'a [f64],
    pub teacher: &'a [f64],
    pub rows: f64,
}

impl<'a> Sums<'a> {
    /// The student's input is the teacher's: `A = B = C = X^T X`.
    pub fn same(gram: MatRef<'a, f64>) -> Sums<'a> {
        Sums { student: gram, cross: gram, teacher: gram, ones: None }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconstructError {
    #[error("weight has K = {k}, the calibration sums have {features} features")]
    Shape { k: usize, features: usize },
    #[error("no calibration rows reached this layer (all padding?)")]
    NoData,
    #[error("output {output}: the kept inputs' Gram matrix is not positive definite even with damping {damping:.3e}")]
    NotPositiveDefinite { output: usize, damping: f64 },
}

/// A re-fitted weight and the layer's relative output error before (the mask
/// applied to the original weight) and after the re-fit.
pub struct Refit {
    pub weight: LinearWeight,
    /// What to add to the layer's bias (one value per output), when the bias
    /// was re-fitted with the weights.
    pub bias_shift: Option<Vec<f64>>,
    pub error_before: f64,
    pub error_after: f64,
    /// The damping the weight was fitted with; `None` when cross-validation
    /// kept the masked original weights.
    pub damping: Option<f64>,
}

/// Damping fractions (of the mean diagonal of `A`) tried by cross-validation.
pub const CROSS_VALIDATED_DAMPINGS: [f64; 6] = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0];

/// [`refit`] with the damping of [`CROSS_VALIDATED_DAMPINGS`] whose re-fit on
/// one fold best predicts the other (summed both ways), then re-fitted on
/// `total`; the masked original weights (`damping: None`) when they predict
/// the held-out folds better than every re-fit. Folds without rows fall back
/// to `fallback_damping`.
pub fn refit_cross_validated(
    weight: &LinearWeight,
    keep: &[bool],
    with_bias: bool,
    total: Sums,
    folds: [Sums; 2],
    fallback_damping: f64,
) -> Result<Refit, ReconstructError> {
    if folds.iter().any(|f| f.student.nrows() != weight.k || trace(f.teacher) <= 0.0) {
        return refit(weight, keep, with_bias, total, fallback_damping);
    }
    // the held-out squared error, un-normalised so the two folds add up
    let energies = folds.map(|fold| output_energy(weight, fold));
    let held_out = |fitted: [&Refit; 2]| {
        (0..2)
            .map(|f| {
                let other = fitted[1 - f];
                relative_error(&other.weight, other.bias_shift.as_deref(), weight, folds[f]) * energies[f]
            })
            .sum::<f64>()
    };
    let masked = Refit { weight: weight.masked(keep), bias_shift: None, error_before: 0.0, error_after: 0.0, damping: None };
    let mut best = (held_out([&masked, &masked]), None);
    for damping in CROSS_VALIDATED_DAMPINGS {
        let on_first = refit(weight, keep, with_bias, folds[0], damping)?;
        let on_second = refit(weight, keep, with_bias, folds[1], damping)?;
        let error = held_out([&on_first, &on_second]);
        if error < best.0 {
            best = (error, Some(damping));
        }
    }
    match best.1 {
        Some(damping) => refit(weight, keep, with_bias, total, damping),
        None => {
            let error = relative_error(&masked.weight, None, weight, total);
            Ok(Refit { error_before: error, error_after: error, ..masked })
        }
    }
}

fn trace(m: MatRef<f64>) -> f64 {
    (0..m.nrows()).map(|i| m[(i, i)]).sum()
}

/// `sum_n ||X_t w_n||^2`, the teacher's output energy.
fn output_energy(weight: &LinearWeight, sums: Sums) -> f64 {
    let w = as_mat(weight);
    let cw = product(sums.teacher, w.as_ref());
    (0..w.nrows()).flat_map(|i| (0..w.ncols()).map(move |j| (i, j))).map(|(i, j)| w[(i, j)] * cw[(i, j)]).sum()
}

/// Re-fits the kept weights of `weight` under `keep` (see the module
/// documentation), damped towards `weight` by `damping` times the mean
/// diagonal of `A`. `with_bias` (and column sums in `sums`) also fits a shift
/// of each output's bias: the least squares over `[X_s 1]`, the shift damped
/// towards zero like the weights towards theirs.
pub fn refit(weight: &LinearWeight, keep: &[bool], with_bias: bool, sums: Sums, damping: f64) -> Result<Refit, ReconstructError> {
    let (k, n) = (weight.k, weight.n);
    if sums.student.nrows() != k {
        return Err(ReconstructError::Shape { k, features: sums.student.nrows() });
    }
    let mean_diagonal = (0..k).map(|i| sums.student[(i, i)]).sum::<f64>() / k.max(1) as f64;
    if mean_diagonal <= 0.0 {
        return Err(ReconstructError::NoData);
    }
    let ones = sums.ones.filter(|_| with_bias);
    let w = as_mat(weight);
    // B w_n for every n at once: the right-hand sides
    let targets = product(sums.cross, w.as_ref());
    // (X_t^T 1)^T w_n: the ones column's right-hand side
    let target_sums: Vec<f64> = match ones {
        Some(ones) => (0..n).map(|nn| (0..k).map(|kk| ones.teacher[kk] * w[(kk, nn)]).sum()).collect(),
        None => Vec::new(),
    };
    let lambda = damping * mean_diagonal;
    let columns: Vec<(Vec<f64>, f64)> = (0..n)
        .into_par_iter()
        .map(|nn| {
            let kept: Vec<usize> = (0..k).filter(|&kk| keep[kk * n + nn]).collect();
            let system = KeptSystem { a: sums.student, kept: &kept, ones, lambda };
            let rhs = |i: usize| if i < kept.len() { targets[(kept[i], nn)] + lambda * w[(kept[i], nn)] } else { target_sums[nn] };
            system.solve(rhs).ok_or(ReconstructError::NotPositiveDefinite { output: nn, damping: lambda }).map(|solution| {
                let mut column = vec![0.0; k];
                for (&kk, v) in kept.iter().zip(&solution) {
                    column[kk] = *v;
                }
                (column, solution.get(kept.len()).copied().unwrap_or(0.0))
            })
        })
        .collect::<Result<_, _>>()?;
    let mut values = vec![0f32; k * n];
    for (nn, (column, _)) in columns.iter().enumerate() {
        for (kk, v) in column.iter().enumerate() {
            values[kk * n + nn] = *v as f32;
        }
    }
    let refitted = LinearWeight { values, k, n };
    let bias_shift = ones.map(|_| columns.iter().map(|(_, shift)| *shift).collect::<Vec<f64>>());
    let error_before = relative_error(&weight.masked(keep), None, weight, sums);
    let error_after = relative_error(&refitted, bias_shift.as_deref(), weight, sums);
    Ok(Refit { weight: refitted, bias_shift, error_before, error_after, damping: Some(damping) })
}

/// The damped normal equations of one output over its kept features `S`,
/// and the ones column last when a bias is fitted:
/// `([A[S, S], s; s^T, rows] + lambda I) x = rhs`, `s = (X_s^T 1)[S]`.
struct KeptSystem<'a> {
    a: MatRef<'a, f64>,
    kept: &'a [usize],
    ones: Option<ColumnSums<'a>>,
    lambda: f64,
}

impl KeptSystem<'_> {
    /// Solves by Cholesky; `None` when the matrix is not positive definite.
    fn solve(&self, rhs: impl Fn(usize) -> f64) -> Option<Vec<f64>> {
        let g = self.matrix();
        let size = g.nrows();
        if size == 0 {
            return Some(Vec::new());
        }
        let b = Mat::<f64>::from_fn(size, 1, |i, _| rhs(i));
        let llt = g.llt(Side::Lower).ok()?;
        let x = llt.solve(&b);
        Some((0..size).map(|i| x[(i, 0)]).collect())
    }

    /// The damped matrix.
    fn matrix(&self) -> Mat<f64> {
        let m = self.kept.len();
        let size = m + usize::from(self.ones.is_some());
        let entry = |i: usize, j: usize| -> f64 {
            let value = match (i < m, j < m, self.ones) {
                (true, true, _) => self.a[(self.kept[i], self.kept[j])],
                (true, false, Some(ones)) => ones.student[self.kept[i]],
                (false, true, Some(ones)) => ones.student[self.kept[j]],
                (false, false, Some(ones)) => ones.rows,
                (_, _, None) => unreachable!("the ones column exists only with column sums"),
            };
            value + if i == j { self.lambda } else { 0.0 }
        };
        Mat::<f64>::from_fn(size, size, entry)
    }
}

/// `sum_n ||X_s w'_n + shift_n - X_t w_n||^2 / sum_n ||X_t w_n||^2`, from the
/// sums (a `bias_shift` needs their column sums, and is ignored without).
pub fn relative_error(student: &LinearWeight, bias_shift: Option<&[f64]>, teacher: &LinearWeight, sums: Sums) -> f64 {
    let (ws, wt) = (as_mat(student), as_mat(teacher));
    let trace_of = |m: MatRef<f64>, left: &Mat<f64>, right: &Mat<f64>| {
        let mr = product(m, right.as_ref());
        (0..left.nrows()).flat_map(|i| (0..left.ncols()).map(move |j| (i, j))).map(|(i, j)| left[(i, j)] * mr[(i, j)]).sum::<f64>()
    };
    let reference = trace_of(sums.teacher, &wt, &wt);
    if reference <= 0.0 {
        return 0.0;
    }
    let mut squared = trace_of(sums.student, &ws, &ws) - 2.0 * trace_of(sums.cross, &ws, &wt) + reference;
    if let (Some(shift), Some(ones)) = (bias_shift, sums.ones) {
        // + 2 d_n (s^T w'_n - t^T w_n) + rows d_n^2
        for (nn, d) in shift.iter().enumerate() {
            let dot = |sum: &[f64], w: &Mat<f64>| (0..w.nrows()).map(|kk| sum[kk] * w[(kk, nn)]).sum::<f64>();
            squared += 2.0 * d * (dot(ones.student, &ws) - dot(ones.teacher, &wt)) + ones.rows * d * d;
        }
    }
    squared.max(0.0) / reference
}

fn as_mat(weight: &LinearWeight) -> Mat<f64> {
    Mat::from_fn(weight.k, weight.n, |i, j| weight.at(i, j) as f64)
}

fn product(a: MatRef<f64>, b: MatRef<f64>) -> Mat<f64> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    faer::linalg::matmul::matmul(out.as_mut(), Accum::Replace, a, b, 1.0, Par::rayon(0));
    out
}
