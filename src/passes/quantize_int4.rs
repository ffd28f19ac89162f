//! `quantize-int4`: block-wise int4 weights for every MatMul (and Gemm) whose
//! weight is a constant float32 matrix; activations stay float (weight-only).
//!
//! What it rewrites: `MatMul(A, W)` with `W` a float32 initializer `[K, N]` (not
//! a graph input: those a caller may override) or the Transpose of one `[N, K]`
//! (a tied lm_head reading the embedding table), and `Gemm(A, W, C?)` with
//! constant `W`, `alpha = beta = 1`, `transA = 0` (`transB = 1` reads `W` as
//! `[N, K]`; `C` is added after the product). `A` must be float32. It does not
//! fire where `K` is smaller than one block (nothing to share a scale over: such
//! a layer is tiny), nor on nodes named in `exclude` (or, unnamed, whose first
//! output is).
//!
//! The math. For each output column `n` and each block `g` of `B` consecutive
//! input features (`B` = 32, 64 or 128; the last block shorter when `B` does not
//! divide `K`), one float32 scale `s[g, n]`:
//! - symmetric: `s = max|w| / 7`, `q = round(w / s)` in `[-7, 7]`, `W' = q * s`;
//! - with a zero point: over `lo = min(0, min w)`, `hi = max(0, max w)`,
//!   `s = (hi - lo) / 15`, `z = round(-lo / s)`, `q = clamp(round(w / s) + z, 0, 15)`,
//!   `W' = (q - z) * s` (16 levels, and 0 exact).
//!
//! Rounding (`crate::quantize::gptq`): to nearest, `|W' - W| <= s / 2` per
//! weight; or GPTQ, which rounds the rows of `W` in order and moves the rows not
//! yet rounded to cancel the output error on the calibration activations
//! (`X^T X` of the MatMul's input), trading a larger weight error for a smaller
//! `||X W - X W'||`. Either way the product is then `A W'` computed in float, so
//! the only error is the weights' (no activation is quantized).
//!
//! Targets:
//! - `ort`: `com.microsoft.MatMulNBits(A, B, scales, zero_points?) {K, N, bits=4,
//!   block_size}` (ORT ContribOperators.md): `B` uint8 `[N, ceil(K/B), B/2]`, the
//!   4-bit values of column `n`'s block `g` two to a byte, low nibble first,
//!   the last block padded with its zero point; `scales` float32 `[N * ceil(K/B)]`;
//!   `zero_points` uint8, each column's `ceil(K/B)` zero points packed the same
//!   way, absent when symmetric (ORT's default zero point is 8, and the pass
//!   stores `q + 8`). `accuracy_level` as asked: 0 (unset) computes in
//!   float32; 4 quantizes `A` to int8 per block as well and multiplies in
//!   int8 (`lower_contrib` writes out what that computes, so the check sees its
//!   error too).
//! - `portable` and `tensorrt`: `DequantizeLinear(int4 [K, N], scale [ceil(K/B), N],
//!   zero_point int4?) {axis=0, block_size=B}` (opset 21's blocked quantization)
//!   and a MatMul of the dequantized weight; the model must import opset 21 or
//!   later (`onnxopt quantize` raises it first). With a zero point the values are
//!   stored as `q - 8` and `z - 8` (int4's range), the same `q - z`.
//!   ONNX Runtime 1.32 fuses this pair into MatMulNBits with `accuracy_level = 4`
//!   (its session option `session.qdq_matmulnbits_accuracy_level` defaults to 4;
//!   measured: 0.023 max abs from the float product on a K = 64 case, 0 with the
//!   option set to 0), so ORT then also quantizes `A` to int8, which the tract
//!   check does not see.
//!
//! ```text
//! y = MatMul(x, w)   ->  y = com.microsoft.MatMulNBits(x, y/weight_int4, y/weight_scale[, y/weight_zero_point])
//!                            {K, N, bits=4, block_size}                     # ort
//!                    ->  y/weight_dequantized = DequantizeLinear(y/weight_int4, y/weight_scale[, y/weight_zero_point])
//!                            {axis=0, block_size}
//!                        y = MatMul(x, y/weight_dequantized)                # portable, tensorrt
//! ```
//! The float weights are left for `eliminate-dead-code`. Verification in tract
//! lowers both forms back to a MatMul of the dequantized float32 weight
//! (`lower_contrib`, `lower_standard`): dequantization is exact in float32, so
//! the check measures the rounding of the weights and nothing else.

use super::lower_contrib::CONTRIB_DOMAIN;
use super::quantize_dynamic::quantizable_weight;
use super::{Pass, PassError};
use crate::calibrate::{gram_matrices, CalibrateError, CalibrationSource};
use crate::ir::{infer_types, AttrValue, DataType, Graph, Model, Node, NodeId, Patch, Tensor};
use crate::quantize::gptq::{gptq, round_to_nearest, GptqOptions, Grid, Levels, QuantizedMatrix};
use crate::quantize::int4::pack_nibbles;
use crate::target::Target;
use bytes::Bytes;
use faer::Mat;
use std::collections::{HashMap, HashSet};

/// The opset that introduced int4 and `block_size` for DequantizeLinear.
pub const BLOCKED_DEQUANTIZE_OPSET: i64 = 21;

/// How weights are rounded.
pub enum Rounding {
    /// To the nearest level.
    Nearest,
    /// GPTQ against `X^T X` of each MatMul's activation, by activation name
    /// ([`activation_hessians`]).
    Gptq { hessians: HashMap<String, Mat<f64>>, options: GptqOptions },
}

impl Rounding {
    pub fn name(&self) -> &'static str {
        match self {
            Rounding::Nearest => "rtn",
            Rounding::Gptq { .. } => "gptq",
        }
    }
}

/// The pass. See the module documentation.
pub struct QuantizeInt4 {
    /// `Ort` emits MatMulNBits; anything else, DequantizeLinear + MatMul.
    pub target: Target,
    /// Input features per scale: a power of two, 16 or more (ORT's MatMulNBits).
    pub block_size: usize,
    /// 16 levels with a zero point per block, rather than 15 symmetric ones.
    pub zero_point: bool,
    pub rounding: Rounding,
    /// Node names (or first outputs) to keep in float.
    pub exclude: HashSet<String>,
    /// MatMulNBits' `accuracy_level` (`ort` only): 0 leaves it unset (float32
    /// compute), 4 is int8 compute.
    pub accuracy_level: i64,
}

/// One MatMul or Gemm to quantize.
struct Candidate {
    id: NodeId,
    /// The node's name or, unnamed, its first output (for messages).
    name: String,
    /// The node's own name, which the replacing MatMul(NBits) keeps.
    node_name: String,
    activation: String,
    /// The node's output, which the replacement writes.
    output: String,
    /// `W` as `[K, N]` row-major.
    weight: Vec<f32>,
    k: usize,
    n: usize,
    /// A Gemm's C, added after the product.
    addend: Option<String>,
}

impl Pass for QuantizeInt4 {
    fn name(&self) -> &'static str {
        "quantize-int4"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let fail = |message: String| PassError::Failed { pass: self.name().into(), message };
        if !self.block_size.is_power_of_two() || self.block_size < 16 {
            return Err(fail(format!("block size {}: MatMulNBits needs a power of two, 16 or more", self.block_size)));
        }
        let candidates = candidates(model, self.block_size, &self.exclude);
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let opset = model.opset("").unwrap_or(0);
        if self.target != Target::Ort && opset < BLOCKED_DEQUANTIZE_OPSET {
            return Err(fail(format!(
                "the model imports default-domain opset {opset}; int4 DequantizeLinear with block_size needs {BLOCKED_DEQUANTIZE_OPSET} or later (raise it first)"
            )));
        }
        let grid = Grid { block: Some(self.block_size), levels: if self.zero_point { Levels::Asymmetric { max: 15 } } else { Levels::Symmetric { max: 7 } } };
        let mut patches = Vec::with_capacity(candidates.len());
        for c in &candidates {
            let quantized = match &self.rounding {
                Rounding::Nearest => round_to_nearest(&c.weight, c.k, c.n, grid),
                Rounding::Gptq { hessians, options } => {
                    let hessian =
                        hessians.get(&c.activation).ok_or_else(|| fail(format!("no calibration Hessian for '{}', the input of '{}'", c.activation, c.name)))?;
                    gptq(&c.weight, c.k, c.n, hessian.as_ref(), grid, *options)
                }
            }
            .map_err(|e| fail(format!("'{}': {e}", c.name)))?;
            patches.push(self.patch(c, &quantized));
        }
        Ok(patches)
    }
}

impl QuantizeInt4 {
    fn patch(&self, c: &Candidate, q: &QuantizedMatrix) -> Patch {
        let origin = match self.target {
            Target::Ort => format!("matmul-nbits-{}", self.rounding.name()),
            _ => format!("dequantize-linear-int4-{}", self.rounding.name()),
        };
        let mut patch = Patch::new(origin);
        patch.remove_node(c.id);
        let root = &c.output;
        let product = if c.addend.is_some() { format!("{root}/product") } else { root.clone() };
        let (weight, scale, zero_point) = (format!("{root}/weight_int4"), format!("{root}/weight_scale"), format!("{root}/weight_zero_point"));
        let blocks = q.blocks();
        let mut inputs = vec![c.activation.clone(), weight.clone(), scale.clone()];
        match self.target {
            Target::Ort => {
                let (b, scales, zero_points) = matmul_n_bits_inputs(q);
                let blob = (self.block_size / 2) as i64;
                patch.add_initializer(Tensor::from_raw(&weight, DataType::Uint8, vec![c.n as i64, blocks as i64, blob], Bytes::from(b)));
                patch.add_initializer(Tensor::from_raw(&scale, DataType::Float, vec![(c.n * blocks) as i64], f32_bytes(&scales)));
                if self.zero_point {
                    let dims = vec![zero_points.len() as i64];
                    patch.add_initializer(Tensor::from_raw(&zero_point, DataType::Uint8, dims, Bytes::from(zero_points)));
                    inputs.push(zero_point);
                }
                let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                let node = Node::new("MatMulNBits", &refs, &[&product])
                    .with_domain(CONTRIB_DOMAIN)
                    .with_name(c.node_name.clone())
                    .with_attr("K", AttrValue::Int(c.k as i64))
                    .with_attr("N", AttrValue::Int(c.n as i64))
                    .with_attr("bits", AttrValue::Int(4))
                    .with_attr("block_size", AttrValue::Int(self.block_size as i64));
                let node = if self.accuracy_level > 0 { node.with_attr("accuracy_level", AttrValue::Int(self.accuracy_level)) } else { node };
                patch.add_node(node);
            }
            _ => {
                // int4 holds -8..=7: a zero-point grid's 0..=15 shifts by 8, q - z unchanged
                let shift = if self.zero_point { 8 } else { 0 };
                let values = pack_nibbles(q.values.iter().map(|v| v - shift));
                patch.add_initializer(Tensor::from_raw(&weight, DataType::Int4, vec![c.k as i64, c.n as i64], Bytes::from(values)));
                patch.add_initializer(Tensor::from_raw(&scale, DataType::Float, vec![blocks as i64, c.n as i64], f32_bytes(&q.scales)));
                if self.zero_point {
                    let zero_points = pack_nibbles(q.zero_points.iter().map(|z| z - shift));
                    patch.add_initializer(Tensor::from_raw(&zero_point, DataType::Int4, vec![blocks as i64, c.n as i64], Bytes::from(zero_points)));
                }
                let dequantized = format!("{root}/weight_dequantized");
                let mut dq_inputs = vec![weight.as_str(), scale.as_str()];
                if self.zero_point {
                    dq_inputs.push(&zero_point);
                }
                patch.add_node(
                    Node::new("DequantizeLinear", &dq_inputs, &[&dequantized])
                        .with_attr("axis", AttrValue::Int(0))
                        .with_attr("block_size", AttrValue::Int(self.block_size as i64)),
                );
                patch.add_node(Node::new("MatMul", &[&c.activation, &dequantized], &[&product]).with_name(c.node_name.clone()));
            }
        }
        if let Some(addend) = &c.addend {
            patch.add_node(Node::new("Add", &[&product, addend], &[root]));
        }
        patch
    }
}

/// MatMulNBits' `B` (`[N, blocks, block/2]` packed, unsigned: `q + 8` when
/// symmetric), `scales` (`[N * blocks]`, column-major to `q`'s) and packed
/// zero points (`[N * ceil(blocks / 2)]`; empty when symmetric).
fn matmul_n_bits_inputs(q: &QuantizedMatrix) -> (Vec<u8>, Vec<f32>, Vec<u8>) {
    let (k, n, block, blocks) = (q.k, q.n, q.block, q.blocks());
    let symmetric = q.zero_points.iter().all(|&z| z == 0);
    let shift = if symmetric { 8 } else { 0 };
    let mut b = Vec::with_capacity(n * blocks * block / 2);
    let mut scales = Vec::with_capacity(n * blocks);
    let mut zero_points = Vec::new();
    for column in 0..n {
        for g in 0..blocks {
            let zero = q.zero_points[g * n + column] + shift;
            // rows past K pad the last block with its zero point: they dequantize to 0
            b.extend(pack_nibbles((g * block..(g + 1) * block).map(|row| if row < k { q.values[row * n + column] + shift } else { zero })));
            scales.push(q.scales[g * n + column]);
        }
        if !symmetric {
            zero_points.extend(pack_nibbles((0..blocks).map(|g| q.zero_points[g * n + column])));
        }
    }
    (b, scales, zero_points)
}

fn f32_bytes(values: &[f32]) -> Bytes {
    Bytes::from(values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
}

/// Every MatMul and Gemm the pass rewrites, in graph order.
fn candidates(model: &Model, block_size: usize, exclude: &HashSet<String>) -> Vec<Candidate> {
    let types = infer_types(model);
    let graph = &model.graph;
    let graph_inputs: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
    graph
        .nodes_with_ids()
        .into_iter()
        .filter_map(|(id, node)| {
            let name = node.name_or_output().to_string();
            if exclude.contains(&name) {
                return None;
            }
            let activation = node.inputs.first()?;
            if types.elem_type(activation) != Some(DataType::Float) {
                return None;
            }
            candidate(graph, &graph_inputs, id, node, name, block_size)
        })
        .collect()
}

/// The node as a [`Candidate`], when it is a MatMul or Gemm of a constant weight
/// with at least one block of input features.
fn candidate(graph: &Graph, graph_inputs: &HashSet<&str>, id: NodeId, node: &Node, name: String, block_size: usize) -> Option<Candidate> {
    let output = node.outputs.first().filter(|o| !o.is_empty())?.clone();
    let (weight, transposed) = quantizable_weight(graph, graph_inputs, node)?;
    let [rows, cols] = weight.dims[..] else { return None };
    let (rows, cols) = (usize::try_from(rows).ok()?, usize::try_from(cols).ok()?);
    let (k, n) = if transposed { (cols, rows) } else { (rows, cols) };
    if k < block_size || n == 0 {
        return None;
    }
    let addend = if node.is_onnx("Gemm") { node.inputs.get(2).filter(|c| !c.is_empty()).cloned() } else { None };
    let values = weight.to_f32().ok()?;
    let values = values.as_slice()?;
    let weight = if transposed {
        // [N, K] -> [K, N]
        let mut w = vec![0f32; k * n];
        for (nn, column) in values.chunks_exact(k).enumerate() {
            for (kk, &v) in column.iter().enumerate() {
                w[kk * n + nn] = v;
            }
        }
        w
    } else {
        values.to_vec()
    };
    Some(Candidate { id, name, node_name: node.name.clone(), activation: node.inputs[0].clone(), output, weight, k, n, addend })
}

/// `X^T X` over the calibration data of every activation the pass would
/// quantize a weight against (the first input of each candidate MatMul/Gemm),
/// for [`Rounding::Gptq`]. Padding tokens are left out.
pub fn activation_hessians(
    model: &Model,
    source: &CalibrationSource,
    block_size: usize,
    exclude: &HashSet<String>,
) -> Result<HashMap<String, Mat<f64>>, CalibrateError> {
    let mut taps: Vec<String> = candidates(model, block_size, exclude).into_iter().map(|c| c.activation).collect();
    let mut seen = HashSet::new();
    taps.retain(|t| seen.insert(t.clone()));
    let names: Vec<&str> = taps.iter().map(String::as_str).collect();
    let grams = gram_matrices(model, &names, source)?;
    Ok(grams.into_iter().map(|g| (g.name, g.xtx)).collect())
}
