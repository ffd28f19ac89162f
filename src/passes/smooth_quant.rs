//! `smooth-quant`: moves the range of an activation's outlier channels into
//! the weights that read it (SmoothQuant, Xiao et al. 2023), so that the
//! activation quantizes with less error. An exact rewrite: run before
//! quantization and checked in tract like any other.
//!
//! What it rewrites: every float32 activation `X` (last axis `K` channels) read
//! by at least one MatMul or Gemm with a constant weight (the products
//! `quantize-dynamic` quantizes), when calibration gave `X`'s per-channel
//! maximum `|X_k|` and every reader of `X` is such a product (a reader that
//! is not would see the scaled values).
//!
//! The math: for `Y = X W`, with `s_k > 0`,
//! `X W = (X diag(1/s)) (diag(s) W)`, exactly in real arithmetic. SmoothQuant
//! picks `s_k = max|X_k|^alpha / max_n |W_kn|^(1 - alpha)` (the weight maximum
//! over every reader's columns), which equalises the two ranges at
//! `alpha = 0.5`: a channel whose activations are 50x the others no longer
//! sets the per-token scale alone. `s_k` is clamped into `[1e-5, 1e5]`, and is 1
//! for a channel calibration never saw nonzero or whose weights are all zero.
//! In float32 the rewrite moves results by rounding only (one extra multiply
//! per element on each side).
//!
//! ```text
//! y1 = MatMul(x, w1)        ->  x/smoothed = Mul(x, x/inverse_smoothing)      (1/s, [K])
//! y2 = Gemm(x, w2, c)           y1 = MatMul(x/smoothed, y1/smoothed_weight)   (diag(s) w1)
//!                               y2 = Gemm(x/smoothed, y2/smoothed_weight, c)
//! ```
//! The Mul costs one pass over `X`; when `X` is a LayerNormalization's output
//! read by nothing else it could be folded into the norm's scale and bias,
//! which transformer graphs do not allow (the norm's output is also the
//! residual stream), so it is not done.

use super::quantize_dynamic::quantizable_weight;
use super::{Pass, PassError};
use crate::calibrate::Stats;
use crate::ir::{infer_types, DataType, Model, Node, Patch, Tensor};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet};

/// The pass. See the module documentation.
pub struct SmoothQuant {
    /// Migration strength: 0 leaves activations alone, 1 moves all their range
    /// into the weights.
    pub alpha: f32,
    /// Per activation, each channel's largest `|x|` on calibration data.
    pub channel_max: HashMap<String, Vec<f32>>,
}

impl SmoothQuant {
    /// From calibration statistics of the activations (their `channels`).
    pub fn from_stats(stats: &[Stats], alpha: f32) -> SmoothQuant {
        let channel_max = stats
            .iter()
            .map(|s| {
                let c = &s.channels;
                (s.name.clone(), c.min.iter().zip(&c.max).map(|(lo, hi)| lo.abs().max(hi.abs())).collect())
            })
            .collect();
        SmoothQuant { alpha, channel_max }
    }
}

const SMALLEST_SMOOTHING: f32 = 1e-5;
const LARGEST_SMOOTHING: f32 = 1e5;

impl Pass for SmoothQuant {
    fn name(&self) -> &'static str {
        "smooth-quant"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let graph = &model.graph;
        let types = infer_types(model);
        let graph_inputs: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
        let mut readers: BTreeMap<&str, Vec<_>> = BTreeMap::new();
        for (id, node) in graph.nodes_with_ids() {
            let Some(x) = node.inputs.first() else { continue };
            // smoothed already: this pass's own output
            if x.ends_with("/smoothed") || types.elem_type(x) != Some(DataType::Float) {
                continue;
            }
            if let Some((weight, transposed)) = quantizable_weight(graph, &graph_inputs, node) {
                readers.entry(x.as_str()).or_default().push((id, node, weight, transposed));
            }
        }
        let mut patches = Vec::new();
        for (x, group) in readers {
            let Some(channel_max) = self.channel_max.get(x) else { continue };
            let k = channel_max.len();
            // every reader must be a product we rescale, and of this width
            if graph.uses(x).len() != group.len() || graph.is_graph_output(x) {
                continue;
            }
            let rows = |w: &Tensor, transposed: bool| w.dims[if transposed { 1 } else { 0 }] as usize;
            if group.iter().any(|(_, _, w, t)| rows(w, *t) != k) {
                continue;
            }
            let mut weights = Vec::with_capacity(group.len());
            for (_, _, w, _) in &group {
                let Ok(values) = w.to_f32() else { continue };
                weights.push(values.iter().copied().collect::<Vec<f32>>());
            }
            if weights.len() != group.len() {
                continue;
            }
            let mut weight_max = vec![0f32; k];
            for ((_, _, w, transposed), values) in group.iter().zip(&weights) {
                let cols = w.dims[1] as usize;
                for (i, v) in values.iter().enumerate() {
                    let row = if *transposed { i % cols } else { i / cols };
                    weight_max[row] = weight_max[row].max(v.abs());
                }
            }
            let smoothing: Vec<f32> = channel_max
                .iter()
                .zip(&weight_max)
                .map(|(&a, &w)| {
                    if a > 0.0 && w > 0.0 && a.is_finite() {
                        (a.powf(self.alpha) / w.powf(1.0 - self.alpha)).clamp(SMALLEST_SMOOTHING, LARGEST_SMOOTHING)
                    } else {
                        1.0
                    }
                })
                .collect();

            let mut patch = Patch::new("smooth-quant");
            let smoothed = format!("{x}/smoothed");
            let inverse = format!("{x}/inverse_smoothing");
            patch.add_initializer(f32_tensor(&inverse, vec![k as i64], smoothing.iter().map(|s| 1.0 / s)));
            patch.add_node(Node::new("Mul", &[x, &inverse], &[&smoothed]));
            for ((id, node, w, transposed), values) in group.into_iter().zip(weights) {
                let cols = w.dims[1] as usize;
                let scaled = values.iter().enumerate().map(|(i, v)| v * smoothing[if transposed { i % cols } else { i / cols }]);
                let root = node.outputs.first().cloned().unwrap_or_else(|| node.name.clone());
                let weight_name = format!("{root}/smoothed_weight");
                patch.add_initializer(f32_tensor(&weight_name, w.dims.clone(), scaled));
                let mut rewired = node.clone();
                rewired.inputs[0] = smoothed.clone();
                rewired.inputs[1] = weight_name;
                patch.remove_node(id).add_node(rewired);
            }
            patches.push(patch);
        }
        Ok(patches)
    }
}

fn f32_tensor(name: &str, dims: Vec<i64>, values: impl Iterator<Item = f32>) -> Tensor {
    let raw: Vec<u8> = values.flat_map(f32::to_le_bytes).collect();
    Tensor::from_raw(name, DataType::Float, dims, Bytes::from(raw))
}
