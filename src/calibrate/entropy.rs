//! Entropy (KL-divergence) calibration: the clipping threshold TensorRT's
//! legacy entropy calibrator picks for a symmetric int8 tensor, computed from a
//! [`Histogram`].
//!
//! The algorithm (Migacz, "8-bit Inference with TensorRT", GTC 2017; the same
//! loop as NVIDIA pytorch-quantization's `_compute_amax_entropy` and ModelOpt's
//! default `calibration_method="entropy"` for int8 ONNX):
//! 1. fold the histogram to one of `|x|` over `[0, amax]` (`H` bins);
//! 2. for every candidate threshold of `i` bins, `LEVELS <= i <= H`:
//!    `P` = the first `i` bins, with everything beyond (the outliers that
//!    would saturate) added to bin `i - 1`; `Q` = those `i` bins merged into
//!    `LEVELS` equal groups (what int8 keeps) and expanded back, each group's
//!    count spread evenly over its non-empty bins;
//! 3. the threshold is the right edge of the `i` with the smallest
//!    `KL(P || Q) = sum_j P_j ln(P_j / Q_j)` (both normalised).
//!
//! `Q` is empty where the bins were, but `P` is not at `i - 1` when outliers
//! sit beyond an empty stretch: without care every threshold short of the
//! maximum would score infinite. As ONNX Runtime's entropy calibrator
//! (`onnxruntime/python/tools/quantization/calibrate.py`, `smooth_distribution`,
//! after MXNet's), empty bins of `Q` get a count of `1e-4`, taken evenly from
//! the others.
//!
//! A distribution with a long thin tail gets a threshold well inside its
//! maximum (the tail saturates, the bulk keeps finer steps); a flat one keeps
//! (nearly) its maximum.

use super::Histogram;

/// Quantized magnitudes of a symmetric int8 tensor: 0..=127.
pub const LEVELS: usize = 128;

/// The threshold on `|x|` with the least KL divergence, or `None` for an empty
/// histogram. With fewer than [`LEVELS`] non-empty magnitude bins nothing is
/// lost by quantizing, and the maximum is returned.
pub fn entropy_threshold(histogram: &Histogram) -> Option<f64> {
    let magnitudes = fold_to_magnitudes(histogram)?;
    let width = histogram.bin_width;
    let last_used = magnitudes.iter().rposition(|&c| c > 0)?;
    let bins = &magnitudes[..=last_used];
    if bins.len() <= LEVELS {
        return Some(bins.len() as f64 * width);
    }
    let mut best = (f64::INFINITY, bins.len());
    let mut outliers: u64 = bins[LEVELS..].iter().sum();
    for i in LEVELS..=bins.len() {
        let divergence = kl_divergence(&bins[..i], outliers);
        if divergence < best.0 {
            best = (divergence, i);
        }
        if i < bins.len() {
            outliers -= bins[i];
        }
    }
    Some(best.1 as f64 * width)
}

/// The histogram of `|x|`: bin `k` covers `[k w, (k + 1) w)` with the input's
/// width `w`; a bin goes where its centre's magnitude falls (a bin straddling 0
/// lands in bin 0: half a bin of error, at the resolution the histogram has).
fn fold_to_magnitudes(histogram: &Histogram) -> Option<Vec<u64>> {
    if histogram.total() == 0 || histogram.bin_width <= 0.0 {
        return None;
    }
    let width = histogram.bin_width;
    let amax = histogram.low.abs().max(histogram.high().abs());
    let mut folded = vec![0u64; (amax / width).ceil() as usize + 1];
    for (i, &count) in histogram.counts.iter().enumerate() {
        if count == 0 {
            continue;
        }
        let centre = histogram.low + width * (i as f64 + 0.5);
        let bin = ((centre.abs() / width) as usize).min(folded.len() - 1);
        folded[bin] += count;
    }
    Some(folded)
}

/// `KL(P || Q)` for the threshold at the end of `bins` (see the module doc);
/// infinite only when `Q` cannot be smoothed.
fn kl_divergence(bins: &[u64], outliers: u64) -> f64 {
    let i = bins.len();
    let mut p: Vec<f64> = bins.iter().map(|&c| c as f64).collect();
    p[i - 1] += outliers as f64;

    // group g holds bins [start(g), start(g + 1)): i bins over LEVELS groups
    let start = |g: usize| g * i / LEVELS;
    let mut q = vec![0f64; i];
    for g in 0..LEVELS {
        let group = &bins[start(g)..start(g + 1)];
        let total: u64 = group.iter().sum();
        let non_empty = group.iter().filter(|&&c| c > 0).count();
        if non_empty == 0 {
            continue;
        }
        let share = total as f64 / non_empty as f64;
        for (j, &c) in group.iter().enumerate() {
            if c > 0 {
                q[start(g) + j] = share;
            }
        }
    }
    smooth(&mut q);
    let (p_sum, q_sum): (f64, f64) = (p.iter().sum(), q.iter().sum());
    if p_sum == 0.0 || q_sum == 0.0 {
        return f64::INFINITY;
    }
    let mut divergence = 0.0;
    for (&pj, &qj) in p.iter().zip(&q) {
        if pj == 0.0 {
            continue;
        }
        if qj == 0.0 {
            return f64::INFINITY;
        }
        let (pj, qj) = (pj / p_sum, qj / q_sum);
        divergence += pj * (pj / qj).ln();
    }
    divergence
}

/// Gives every empty bin a count of `EPSILON`, taken evenly from the others
/// (left as is when that would empty one of them).
fn smooth(counts: &mut [f64]) {
    const EPSILON: f64 = 1e-4;
    let zeros = counts.iter().filter(|&&c| c == 0.0).count();
    let non_zeros = counts.len() - zeros;
    if zeros == 0 || non_zeros == 0 {
        return;
    }
    let taken = EPSILON * zeros as f64 / non_zeros as f64;
    if counts.iter().any(|&c| c > 0.0 && c <= taken) {
        return;
    }
    for c in counts.iter_mut() {
        *c = if *c == 0.0 { EPSILON } else { *c - taken };
    }
}
