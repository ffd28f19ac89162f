//! Pruning masks: which weights of a linear layer become zero.
//!
//! Every weight is seen as `W[K, N]`, `K` the reduction axis (a MatMul's `B`
//! as stored; a Gemm's `B` with `transB = 1` is stored `[N, K]` and read
//! transposed). A mask is chosen per output `n`, over the `K` weights that
//! produce it, as Wanda does ("per output" comparison groups; Sun et al. 2023,
//! table 7: better than per layer for LLMs):
//!
//! - importance `S[k, n] = |W[k, n]| * ||X_k||`, where `||X_k||^2` is the
//!   diagonal of the Gram matrix `X^T X` of the layer's input over calibration
//!   tokens (Wanda), `|W[k, n]| / sqrt([(X^T X)^-1]_kk)` (OBS; with the
//!   re-fit, in [`rounds`]: each later round ranks the re-fitted weights,
//!   `reconstruct::refined_mask`), or `|W[k, n]|` alone (magnitude);
//! - unstructured at sparsity `s`: the `floor(s K)` least important weights of
//!   each output are zeroed (every output then has the same sparsity);
//! - `N:M` (`2:4`): in every group of `M` consecutive `k` of one output, the
//!   `M - N` least important are zeroed. Groups run along the reduction axis,
//!   as NVIDIA's sparse tensor cores (and TensorRT's sparse kernels) need: each
//!   4 inputs of a dot product hold at most 2 nonzeros. `K` must be a multiple
//!   of `M`.
//!
//! Ties keep the lower `k`, so masks are deterministic.

use std::fmt;
use std::str::FromStr;

/// `kept` nonzeros in every group of `group` consecutive weights along K.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NofM {
    pub kept: usize,
    pub group: usize,
}

impl NofM {
    /// The fraction of weights this pattern zeroes.
    pub fn sparsity(self) -> f64 {
        (self.group - self.kept) as f64 / self.group as f64
    }
}

impl fmt::Display for NofM {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kept, self.group)
    }
}

impl FromStr for NofM {
    type Err = String;

    /// `N:M` with `1 <= N < M`: `2:4`, `1:4`, `4:8`.
    fn from_str(s: &str) -> Result<NofM, String> {
        let (kept, group) = s.split_once(':').ok_or_else(|| format!("'{s}' is not N:M (such as 2:4)"))?;
        let number = |part: &str| part.trim().parse::<usize>().map_err(|_| format!("'{s}': '{part}' is not a whole number"));
        let (kept, group) = (number(kept)?, number(group)?);
        if kept == 0 || kept >= group {
            return Err(format!("'{s}': N must be at least 1 and below M (N nonzeros kept in every M weights)"));
        }
        Ok(NofM { kept, group })
    }
}

/// How the zeroed weights are laid out.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum SparsityPattern {
    /// This fraction of each output's weights, anywhere along K.
    Unstructured(f64),
    NofM(NofM),
}

/// A linear layer's weight as `[K, N]`, row-major, whatever its stored layout.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearWeight {
    pub values: Vec<f32>,
    /// Reduction (input feature) count.
    pub k: usize,
    /// Output count.
    pub n: usize,
}

impl LinearWeight {
    /// A stored 2-D weight `[rows, cols]`; `transposed` when it is stored
    /// `[N, K]` (Gemm with `transB = 1`).
    pub fn from_stored(values: &[f32], rows: usize, cols: usize, transposed: bool) -> LinearWeight {
        if !transposed {
            return LinearWeight { values: values.to_vec(), k: rows, n: cols };
        }
        let (k, n) = (cols, rows);
        let mut out = vec![0f32; k * n];
        for (nn, row) in values.chunks_exact(cols).enumerate() {
            for (kk, &v) in row.iter().enumerate() {
                out[kk * n + nn] = v;
            }
        }
        LinearWeight { values: out, k, n }
    }

    /// The values in the stored layout (`[N, K]` when `transposed`).
    pub fn to_stored(&self, transposed: bool) -> Vec<f32> {
        if !transposed {
            return self.values.clone();
        }
        let mut out = vec![0f32; self.k * self.n];
        for (kk, row) in self.values.chunks_exact(self.n).enumerate() {
            for (nn, &v) in row.iter().enumerate() {
                out[nn * self.k + kk] = v;
            }
        }
        out
    }

    pub fn at(&self, k: usize, n: usize) -> f32 {
        self.values[k * self.n + n]
    }

    /// Nonzero weights.
    pub fn nonzeros(&self) -> usize {
        self.values.iter().filter(|v| **v != 0.0).count()
    }

    /// The weight with the masked-out entries (`mask[k * N + n] == false`) zeroed.
    pub fn masked(&self, mask: &[bool]) -> LinearWeight {
        let values = self.values.iter().zip(mask).map(|(&v, &keep)| if keep { v } else { 0.0 }).collect();
        LinearWeight { values, k: self.k, n: self.n }
    }
}

/// Which weights survive: `true` at `[k * N + n]` keeps `W[k, n]`.
/// `input_norms` holds a factor per input feature: `||X_k||` for Wanda,
/// `1 / sqrt([(X^T X)^-1]_kk)` for OBS (`reconstruct::obs_factors`); `None`
/// for magnitude.
pub fn mask(weight: &LinearWeight, input_norms: Option<&[f64]>, pattern: SparsityPattern) -> Vec<bool> {
    let (k, n) = (weight.k, weight.n);
    let importance = |kk: usize, nn: usize| weight.at(kk, nn).abs() as f64 * input_norms.map_or(1.0, |norms| norms[kk]);
    let mut keep = vec![true; k * n];
    // the k indices of `rows`, least important first (ties: higher k first, so the lower k is kept)
    let ranked = |nn: usize, rows: std::ops::Range<usize>| {
        let mut order: Vec<usize> = rows.collect();
        order.sort_by(|&a, &b| importance(a, nn).total_cmp(&importance(b, nn)).then(b.cmp(&a)));
        order
    };
    for nn in 0..n {
        match pattern {
            SparsityPattern::Unstructured(sparsity) => {
                let zeroed = (sparsity * k as f64).floor() as usize;
                for kk in ranked(nn, 0..k).into_iter().take(zeroed) {
                    keep[kk * n + nn] = false;
                }
            }
            SparsityPattern::NofM(NofM { kept, group }) => {
                for start in (0..k).step_by(group) {
                    for kk in ranked(nn, start..(start + group).min(k)).into_iter().take(group - kept) {
                        keep[kk * n + nn] = false;
                    }
                }
            }
        }
    }
    keep
}

/// The patterns of `count` rounds that reach `pattern` by equal steps: round
/// `r` has `floor(r / count)` of the removals (per output for unstructured,
/// per group of M for N:M). Rounds that would remove nothing more are left
/// out (2:4 has two removals per group, so at most two rounds); the last is
/// `pattern`.
pub fn rounds(pattern: SparsityPattern, count: usize) -> Vec<SparsityPattern> {
    let count = count.max(1);
    let mut out: Vec<SparsityPattern> = match pattern {
        SparsityPattern::Unstructured(sparsity) => (1..=count).map(|r| SparsityPattern::Unstructured(sparsity * r as f64 / count as f64)).collect(),
        SparsityPattern::NofM(NofM { kept, group }) => (1..=count)
            .map(|r| (group - kept) * r / count)
            .filter(|&removed| removed > 0)
            .map(|removed| SparsityPattern::NofM(NofM { kept: group - removed, group }))
            .collect(),
    };
    out.dedup();
    out
}

/// What a later round removes from one output whose kept `k` are `kept` (of
/// `k_total`) to reach `pattern`: `(candidates, count)` groups, the whole
/// kept set for unstructured, each group of M along K for N:M.
pub fn removals_to(pattern: SparsityPattern, k_total: usize, kept: &[usize]) -> Vec<(Vec<usize>, usize)> {
    match pattern {
        SparsityPattern::Unstructured(sparsity) => {
            let survivors = k_total - (sparsity * k_total as f64).floor() as usize;
            vec![(kept.to_vec(), kept.len().saturating_sub(survivors))]
        }
        SparsityPattern::NofM(NofM { kept: n, group }) => (0..k_total)
            .step_by(group)
            .map(|start| {
                let members: Vec<usize> = kept.iter().copied().filter(|k| (start..start + group).contains(k)).collect();
                let count = members.len().saturating_sub(n);
                (members, count)
            })
            .collect(),
    }
}

/// Whether every group of `pattern.group` consecutive weights along K, in
/// every output, holds at most `pattern.kept` nonzeros (and K divides into
/// groups).
pub fn satisfies_nm(weight: &LinearWeight, pattern: NofM) -> bool {
    if !weight.k.is_multiple_of(pattern.group) {
        return false;
    }
    (0..weight.n).all(|nn| {
        (0..weight.k).step_by(pattern.group).all(|start| (start..start + pattern.group).filter(|&kk| weight.at(kk, nn) != 0.0).count() <= pattern.kept)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_storage_round_trips() {
        let stored: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let w = LinearWeight::from_stored(&stored, 2, 3, true);
        assert_eq!((w.k, w.n), (3, 2));
        assert_eq!(w.at(2, 1), 5.0);
        assert_eq!(w.to_stored(true), stored);
    }

    #[test]
    fn two_of_four_keeps_the_two_largest_of_each_group() {
        let w = LinearWeight { values: vec![0.1, -3.0, 2.0, 0.5, 1.0, 1.0, -1.0, 4.0], k: 8, n: 1 };
        let keep = mask(&w, None, SparsityPattern::NofM(NofM { kept: 2, group: 4 }));
        assert_eq!(keep, [false, true, true, false, true, false, false, true]);
        assert!(satisfies_nm(&w.masked(&keep), NofM { kept: 2, group: 4 }));
        assert!(!satisfies_nm(&w, NofM { kept: 2, group: 4 }));
    }

    #[test]
    fn rounds_split_the_removals() {
        let u = SparsityPattern::Unstructured;
        assert_eq!(rounds(u(0.5), 2), vec![u(0.25), u(0.5)]);
        assert_eq!(rounds(u(0.5), 1), vec![u(0.5)]);
        let nm = |kept| SparsityPattern::NofM(NofM { kept, group: 4 });
        assert_eq!(rounds(nm(2), 2), vec![nm(3), nm(2)]);
        assert_eq!(rounds(nm(2), 4), vec![nm(3), nm(2)]);
        assert_eq!(rounds(nm(3), 2), vec![nm(3)]);
        // unstructured 50% of K = 8 keeps 4: from 6 kept, 2 more go
        assert_eq!(removals_to(u(0.5), 8, &[0, 1, 2, 4, 5, 7]), vec![(vec![0, 1, 2, 4, 5, 7], 2)]);
        // 2:4 of K = 8: each group of 4 down to 2
        assert_eq!(removals_to(nm(2), 8, &[0, 1, 3, 4, 6]), vec![(vec![0, 1, 3], 1), (vec![4, 6], 0)]);
    }

    #[test]
    fn nm_parsing() {
        assert_eq!("2:4".parse::<NofM>(), Ok(NofM { kept: 2, group: 4 }));
        assert!("3:2".parse::<NofM>().unwrap_err().contains("below M"));
        assert!("4".parse::<NofM>().is_err());
    }
}
