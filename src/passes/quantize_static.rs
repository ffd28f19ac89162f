//! `quantize-static`: calibrated int8 QDQ. Activations get a
//! QuantizeLinear/DequantizeLinear pair with a scale fixed ahead of time from
//! calibration; constant weights become int8 initializers read through a
//! per-output-channel DequantizeLinear. The float ops stay: the runtime fuses
//! each `DQ -> MatMul` group into an integer kernel (ORT) or builds an int8
//! engine from the Q/DQ it finds (TensorRT's explicit quantization).
//!
//! What it rewrites: every `MatMul(A, W)` and `Gemm(A, W, C?)` whose `W` is a
//! float32 2-D initializer (not a graph input: a caller may override those)
//! and whose `A` is float32. With the `tensorrt` target, also the residual
//! `Add(r, y)` where `y` comes from such a MatMul/Gemm (directly or through a
//! constant bias Add) and `r` does not: `r` gets the pair. Nodes named in
//! `exclude` (or, unnamed, whose first output is) stay in float. Each
//! activation tensor gets one pair, shared by every reader that is quantized
//! (Q, K and V read one); readers that are not (LayerNorm) keep the float tensor.
//!
//! The math. Activations, per tensor, from a calibrated range `[lo, hi]`
//! (min/max, a central percentile, or the entropy threshold: see
//! [`CalibrationMethod`]):
//! - `ort`: uint8, asymmetric: `lo' = min(lo, 0)`, `hi' = max(hi, 0)`,
//!   `s = (hi' - lo') / 255`, `z = round(-lo' / s)`; `Aq = saturate(round(A / s) + z)`.
//! - `tensorrt`: int8, symmetric, zero point 0: `s = max(|lo|, |hi|) / 127`.
//!
//! Weights, both targets: symmetric per output channel `n`:
//! `s_n = max_k |W[k, n]| / 127` (1 for an all-zero channel), `Wq = round(W / s_n)`
//! in `[-127, 127]`, stored as int8 with zero point 0 or, for ORT on CPUs
//! without VNNI, as uint8 with zero point 128 (the same levels; [`WeightType`]). The output channel is axis 1 of a MatMul's `[K, N]` and of
//! a Gemm's `W` (axis 0 with `transB = 1`: `[N, K]`). Then `DQ(Q(A)) @ DQ(Wq) =
//! s (Aq - z) @ (s_n Wq)`, which the runtime computes exactly in int32 and
//! scales once. Error: inside the range, `|A - DQ(Q(A))| <= s / 2`; outside,
//! values saturate at the range's ends (what percentile and entropy trade for
//! a finer `s`); weights are off by at most `s_n / 2`; see
//! `quantize_dynamic.rs` for how that bounds the product.
//!
//! Why these placements (evidence):
//! - `ort` (ONNX Runtime 1.32, CPU): `MatMulNodeGroupSelector` in
//!   `onnxruntime/core/optimizer/qdq_transformer/selectors_actions/qdq_selectors.cc`
//!   fuses `DQ(A), DQ(B) -> MatMul` with no Q after it into
//!   `MatMulIntegerToFloat` (and into `QLinearMatMul` with one); int8
//!   activations need int8 weights and `int8_allowed`, uint8 activations with
//!   int8 weights always qualify (MLAS's u8s8 kernel). Elementwise ops (Add,
//!   Mul) fuse only as full `DQ -> op -> Q` groups (`BinaryNodeGroupSelector`
//!   requires the Q), so a DQ in front of a float Add, LayerNorm or Softmax
//!   would only cost time: they stay float and unquantized, and no output is
//!   quantized (the float result goes straight on).
//! - `tensorrt`: the TensorRT developer guide, "Explicit Quantization", "Q/DQ
//!   layer-placement recommendations": quantize all inputs of weighted
//!   operations (Convolution, GEMM); by default do not quantize their outputs;
//!   quantize the residual input of a skip connection's elementwise Add (so the
//!   Add fuses into the GEMM before it). TensorRT quantization is symmetric,
//!   signed int8 (zero point 0), per tensor for activations and per channel on
//!   the output-channel axis for weights. The attention products
//!   (activation x activation MatMuls) stay float, as in NVIDIA ModelOpt's
//!   int8 ONNX quantizer (`modelopt/onnx/quantization/int8.py`,
//!   `_find_nodes_to_quantize`: MHA patterns are non-quantizable partitions,
//!   and its default calibration is entropy, per-channel weights).
//!   `onnxopt check --target tensorrt` lints a model against these rules.
//!
//! ```text
//! y = MatMul(x, w)      ->  x/quantized   = QuantizeLinear(x, x/scale, x/zero_point)
//!                           x/dequantized = DequantizeLinear(x/quantized, x/scale, x/zero_point)
//!                           y/weight      = DequantizeLinear(y/weight_quantized, y/weight_scale, y/weight_zero_point) {axis=1}
//!                           y             = MatMul(x/dequantized, y/weight)
//! ```
//! The float weights are left for `eliminate-dead-code`. Needs default-domain
//! opset 13 (per-axis DequantizeLinear).

use super::{Pass, PassError};
use crate::calibrate::{entropy_threshold, Stats};
use crate::ir::{infer_types, AttrValue, DataType, Graph, Model, Node, NodeId, Patch, Tensor, TypeMap};
use crate::target::Target;
use bytes::Bytes;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

/// The pass. See the module documentation.
pub struct QuantizeStatic {
    /// `Ort`: uint8 asymmetric activations; `TensorRt`: int8 symmetric, and
    /// the residual Adds. (`Portable` is treated as `TensorRt` without the Adds.)
    pub target: Target,
    /// The calibrated range of every tensor [`activations_to_calibrate`] lists.
    pub ranges: BTreeMap<String, ActivationRange>,
    /// Node names (or first outputs) to keep in float.
    pub exclude: HashSet<String>,
    /// How weights are stored: see [`WeightType`].
    pub weight_type: WeightType,
}

/// The integer type of the weights. Both are symmetric per channel, values in
/// `[-127, 127]` around the zero point; only the encoding differs.
///
/// `Uint8` (zero point 128) is for ONNX Runtime on x86 CPUs without VNNI
/// (AVX2, AVX-512 without VNNI): there MLAS multiplies uint8 activations by
/// int8 weights with `vpmaddubsw`, which adds two products into int16 and
/// saturates past 32767 (`2 * 255 * 127 = 64770`); uint8 x uint8 widens to
/// 16 bits first and cannot (ORT's quantization guide suggests U8U8 or
/// `reduce_range` when the u8s8 saturation costs accuracy). Measured on this
/// project's AVX2 machine, all-MiniLM-L6-v2, `ort` target: mean sentence
/// cosine 0.973 with int8 weights, 0.984 with uint8 (equal to the model run
/// unfused, i.e. exact), 0.952 with 7-bit int8 weights (`reduce_range`). ORT
/// fuses both into MatMulIntegerToFloat. TensorRT takes int8 only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightType {
    Int8,
    Uint8,
}

/// The range an activation is quantized over; values outside saturate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ActivationRange {
    pub min: f32,
    pub max: f32,
}

/// How a calibrated range is chosen from a tensor's [`Stats`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CalibrationMethod {
    /// Every value seen: nothing saturates, the step is the coarsest.
    MinMax,
    /// The central `p` percent (99.99: 0.005% saturate on each side).
    Percentile(f64),
    /// TensorRT's entropy threshold on `|x|` ([`entropy_threshold`]),
    /// clamped to the values seen.
    Entropy,
}

impl CalibrationMethod {
    /// The range for one tensor, `None` when calibration saw no finite value.
    pub fn range(&self, stats: &Stats) -> Option<ActivationRange> {
        if stats.count == 0 || stats.min > stats.max {
            return None;
        }
        let (min, max) = match self {
            CalibrationMethod::MinMax => (stats.min, stats.max),
            CalibrationMethod::Percentile(p) => stats.percentile_range(*p)?,
            CalibrationMethod::Entropy => {
                let threshold = entropy_threshold(stats.histogram.as_ref()?)? as f32;
                (stats.min.max(-threshold), stats.max.min(threshold))
            }
        };
        Some(ActivationRange { min, max })
    }
}

/// The ranges of every tensor in `stats`, by `method`; an error names a tensor
/// calibration saw no finite value of.
pub fn activation_ranges(stats: &[Stats], method: CalibrationMethod) -> Result<BTreeMap<String, ActivationRange>, PassError> {
    stats
        .iter()
        .map(|s| match method.range(s) {
            Some(range) => Ok((s.name.clone(), range)),
            None => Err(PassError::Failed {
                pass: "quantize-static".into(),
                message: format!("calibration saw no finite value of '{}' ({} non-finite)", s.name, s.non_finite),
            }),
        })
        .collect()
}

/// The activation tensors the pass would quantize in `model`: calibrate these.
pub fn activations_to_calibrate(model: &Model, target: Target, exclude: &HashSet<String>) -> Vec<String> {
    placement(model, target, exclude).into_keys().collect()
}

/// A node that reads the quantized copy of an activation.
struct QuantizedReader {
    id: NodeId,
    /// The input that reads the activation.
    slot: usize,
    /// For a MatMul/Gemm: input 1 is a constant weight, quantized on this axis.
    weight_axis: Option<usize>,
}

/// Where the pairs go: each activation tensor and the readers of its quantized copy.
fn placement(model: &Model, target: Target, exclude: &HashSet<String>) -> BTreeMap<String, Vec<QuantizedReader>> {
    let graph = &model.graph;
    let types = infer_types(model);
    let graph_inputs: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
    let excluded = |node: &Node| {
        let name = node.name_or_output();
        exclude.contains(name)
    };
    let mut readers: BTreeMap<String, Vec<QuantizedReader>> = BTreeMap::new();
    for (id, node) in graph.nodes_with_ids() {
        if excluded(node) {
            continue;
        }
        if let Some(axis) = weighted_op_axis(graph, &graph_inputs, node) {
            let activation = &node.inputs[0];
            if is_float_activation(graph, &types, activation) {
                readers.entry(activation.clone()).or_default().push(QuantizedReader { id, slot: 0, weight_axis: Some(axis) });
            }
        } else if target == Target::TensorRt {
            if let Some(slot) = residual_slot(graph, &graph_inputs, &types, node) {
                readers.entry(node.inputs[slot].clone()).or_default().push(QuantizedReader { id, slot, weight_axis: None });
            }
        }
    }
    readers
}

/// For a MatMul or Gemm of a constant float32 2-D weight, its output-channel axis.
fn weighted_op_axis(graph: &Graph, graph_inputs: &HashSet<&str>, node: &Node) -> Option<usize> {
    let gemm = node.is_onnx("Gemm");
    if !(node.is_onnx("MatMul") || gemm) || node.outputs.first().is_none_or(|o| o.is_empty()) {
        return None;
    }
    let weight = node.inputs.get(1)?;
    let tensor = graph.initializer(weight)?;
    if tensor.dtype != DataType::Float || tensor.dims.len() != 2 || graph_inputs.contains(weight.as_str()) {
        return None;
    }
    Some(if gemm && node.attr_int("transB").unwrap_or(0) != 0 { 0 } else { 1 })
}

/// A float32 tensor computed at run time (or a graph input), not already dequantized.
fn is_float_activation(graph: &Graph, types: &TypeMap, name: &str) -> bool {
    types.elem_type(name) == Some(DataType::Float)
        && graph.initializer(name).is_none()
        && !graph.producer(name).and_then(|(id, _)| graph.node(id)).is_some_and(|p| p.is_onnx("DequantizeLinear"))
}

/// For a residual `Add(r, y)` (either order), the input slot of `r`: `y` comes
/// from a weighted op (directly, or through an Add of a constant bias), `r`
/// does not, and both are float activations.
fn residual_slot(graph: &Graph, graph_inputs: &HashSet<&str>, types: &TypeMap, node: &Node) -> Option<usize> {
    if !node.is_onnx("Add") || node.inputs.len() != 2 || !node.inputs.iter().all(|i| is_float_activation(graph, types, i)) {
        return None;
    }
    let from_weighted_op = |tensor: &str| -> bool {
        let Some(producer) = graph.producer(tensor).and_then(|(id, _)| graph.node(id)) else { return false };
        if weighted_op_axis(graph, graph_inputs, producer).is_some() {
            return true;
        }
        // y = Add(MatMul(..), bias) with a constant bias
        producer.is_onnx("Add")
            && producer.inputs.iter().any(|i| graph.initializer(i).is_some())
            && producer
                .inputs
                .iter()
                .any(|i| graph.producer(i).and_then(|(id, _)| graph.node(id)).is_some_and(|p| weighted_op_axis(graph, graph_inputs, p).is_some()))
    };
    match (from_weighted_op(&node.inputs[0]), from_weighted_op(&node.inputs[1])) {
        (true, false) => Some(1),
        (false, true) => Some(0),
        _ => None,
    }
}

impl Pass for QuantizeStatic {
    fn name(&self) -> &'static str {
        "quantize-static"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let readers = placement(model, self.target, &self.exclude);
        if readers.is_empty() {
            return Ok(Vec::new());
        }
        if self.target == Target::TensorRt && self.weight_type != WeightType::Int8 {
            return Err(self.failed("TensorRT takes int8 weights only".into()));
        }
        let opset = model.opset("").unwrap_or(0);
        if opset < 13 {
            return Err(self.failed(format!("the model imports default-domain opset {opset}; per-channel DequantizeLinear needs 13 or later")));
        }
        readers.iter().map(|(activation, readers)| self.patch(&model.graph, activation, readers)).collect()
    }
}

impl QuantizeStatic {
    fn failed(&self, message: String) -> PassError {
        PassError::Failed { pass: self.name().into(), message }
    }

    /// One patch per activation: its pair, and every reader rewired to the
    /// dequantized copy (a MatMul/Gemm also to its dequantized int8 weight).
    fn patch(&self, graph: &Graph, activation: &str, readers: &[QuantizedReader]) -> Result<Patch, PassError> {
        let range = self.ranges.get(activation).ok_or_else(|| self.failed(format!("no calibration range for activation '{activation}'")))?;
        let (scale, zero_point) = activation_parameters(*range, self.target);
        let mut patch = Patch::new(if self.target == Target::Ort { "qdq-uint8" } else { "qdq-int8" });
        let dequantized = add_pair(&mut patch, activation, scale, zero_point);
        for reader in readers {
            let Some(node) = graph.node(reader.id) else { continue };
            let mut rewritten = node.clone();
            rewritten.inputs[reader.slot] = dequantized.clone();
            if let Some(axis) = reader.weight_axis {
                rewritten.inputs[1] = self.add_weight(&mut patch, graph, node, axis)?;
            }
            patch.remove_node(reader.id).add_node(rewritten);
        }
        Ok(patch)
    }

    /// The int8 weight of `node` behind its DequantizeLinear; returns the DQ's output.
    fn add_weight(&self, patch: &mut Patch, graph: &Graph, node: &Node, axis: usize) -> Result<String, PassError> {
        let root = &node.outputs[0];
        let weight = graph.initializer(&node.inputs[1]).ok_or_else(|| self.failed(format!("'{}' lost its weight", node.name)))?;
        let values = weight.to_f32().map_err(|e| self.failed(e.to_string()))?;
        let values = values.as_slice().ok_or_else(|| self.failed(format!("weight '{}' is not contiguous", weight.name)))?;
        let [rows, cols] = weight.dims[..] else {
            return Err(self.failed(format!("weight '{}' is not 2-D", weight.name)));
        };
        let (quantized, scales) = quantize_weight(values, cols as usize, axis);
        let names = [format!("{root}/weight_quantized"), format!("{root}/weight_scale"), format!("{root}/weight_zero_point")];
        let channels = scales.len() as i64;
        // uint8 with zero point 128: the same levels, shifted
        let (dtype, offset) = match self.weight_type {
            WeightType::Int8 => (DataType::Int8, 0u8),
            WeightType::Uint8 => (DataType::Uint8, 128u8),
        };
        let bytes: Vec<u8> = quantized.iter().map(|&v| (v as u8).wrapping_add(offset)).collect();
        patch.add_initializer(Tensor::from_raw(&names[0], dtype, vec![rows, cols], Bytes::from(bytes)));
        let scale_bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        patch.add_initializer(Tensor::from_raw(&names[1], DataType::Float, vec![channels], Bytes::from(scale_bytes)));
        patch.add_initializer(Tensor::from_raw(&names[2], dtype, vec![channels], Bytes::from(vec![offset; scales.len()])));
        let output = format!("{root}/weight");
        let inputs: Vec<&str> = names.iter().map(String::as_str).collect();
        patch.add_node(
            Node::new("DequantizeLinear", &inputs, &[&output])
                .with_name(format!("{root}/weight/DequantizeLinear"))
                .with_attr("axis", AttrValue::Int(axis as i64)),
        );
        Ok(output)
    }
}

/// An activation's scale and zero point (uint8 for `ort`, int8 otherwise).
#[derive(Clone, Copy, Debug, PartialEq)]
enum ZeroPoint {
    Uint8(u8),
    Int8(i8),
}

fn activation_parameters(range: ActivationRange, target: Target) -> (f32, ZeroPoint) {
    if target == Target::Ort {
        let (lo, hi) = (range.min.min(0.0), range.max.max(0.0));
        if hi - lo <= 0.0 {
            return (1.0, ZeroPoint::Uint8(0));
        }
        let scale = (hi - lo) / 255.0;
        (scale, ZeroPoint::Uint8((-lo / scale).round().clamp(0.0, 255.0) as u8))
    } else {
        let amax = range.min.abs().max(range.max.abs());
        (if amax > 0.0 { amax / 127.0 } else { 1.0 }, ZeroPoint::Int8(0))
    }
}

/// Adds `activation`'s Q/DQ pair; returns the dequantized tensor's name.
fn add_pair(patch: &mut Patch, activation: &str, scale: f32, zero_point: ZeroPoint) -> String {
    let [quantized, dequantized, scale_name, zero_name] = ["quantized", "dequantized", "scale", "zero_point"].map(|what| format!("{activation}/{what}"));
    patch.add_initializer(Tensor::from_raw(&scale_name, DataType::Float, vec![], Bytes::from(scale.to_le_bytes().to_vec())));
    let zero = match zero_point {
        ZeroPoint::Uint8(z) => Tensor::from_raw(&zero_name, DataType::Uint8, vec![], Bytes::from(vec![z])),
        ZeroPoint::Int8(z) => Tensor::from_raw(&zero_name, DataType::Int8, vec![], Bytes::from(vec![z as u8])),
    };
    patch.add_initializer(zero);
    patch.add_node(Node::new("QuantizeLinear", &[activation, &scale_name, &zero_name], &[&quantized]).with_name(format!("{activation}/QuantizeLinear")));
    patch.add_node(Node::new("DequantizeLinear", &[&quantized, &scale_name, &zero_name], &[&dequantized]).with_name(format!("{activation}/DequantizeLinear")));
    dequantized
}

/// `w` (row-major, `cols` per row) as int8, symmetric per channel along `axis`
/// (0: per row, 1: per column), layout unchanged; returns values and scales.
fn quantize_weight(w: &[f32], cols: usize, axis: usize) -> (Vec<i8>, Vec<f32>) {
    let rows = w.len() / cols.max(1);
    let channel = |r: usize, c: usize| if axis == 0 { r } else { c };
    let mut max_abs = vec![0f32; if axis == 0 { rows } else { cols }];
    for (r, row) in w.chunks_exact(cols).enumerate() {
        for (c, v) in row.iter().enumerate() {
            let m = &mut max_abs[channel(r, c)];
            *m = m.max(v.abs());
        }
    }
    let scales: Vec<f32> = max_abs.into_iter().map(|m| if m > 0.0 { m / 127.0 } else { 1.0 }).collect();
    let mut values = Vec::with_capacity(w.len());
    for (r, row) in w.chunks_exact(cols).enumerate() {
        values.extend(row.iter().enumerate().map(|(c, v)| (v / scales[channel(r, c)]).round().clamp(-127.0, 127.0) as i8));
    }
    (values, scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_quantize_per_output_channel_in_place() {
        // [2, 3]: per column (axis 1) the scales are column maxima / 127
        let w = [1.0, -2.0, 0.0, -0.5, 1.0, 0.0];
        let (q, s) = quantize_weight(&w, 3, 1);
        assert_eq!(s, vec![1.0 / 127.0, 2.0 / 127.0, 1.0]);
        assert_eq!(q, vec![127, -127, 0, -64, 64, 0]);
        let (q, s) = quantize_weight(&w, 3, 0);
        assert_eq!(s, vec![2.0 / 127.0, 1.0 / 127.0]);
        assert_eq!(q, vec![64, -127, 0, -64, 127, 0]);
    }

    #[test]
    fn activation_parameters_follow_each_target() {
        let range = ActivationRange { min: -1.0, max: 3.0 };
        let (s, z) = activation_parameters(range, Target::Ort);
        assert!((s - 4.0 / 255.0).abs() < 1e-7);
        assert_eq!(z, ZeroPoint::Uint8(64));
        let (s, z) = activation_parameters(range, Target::TensorRt);
        assert!((s - 3.0 / 127.0).abs() < 1e-7);
        assert_eq!(z, ZeroPoint::Int8(0));
        // a range that excludes 0 is widened to include it (0 stays exact)
        let (s, z) = activation_parameters(ActivationRange { min: 2.0, max: 4.0 }, Target::Ort);
        assert!((s - 4.0 / 255.0).abs() < 1e-7);
        assert_eq!(z, ZeroPoint::Uint8(0));
    }
}
