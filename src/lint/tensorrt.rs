//! `onnxopt check --target tensorrt`: does a QDQ model follow TensorRT's
//! explicit-quantization rules? TensorRT cannot be installed where onnxopt is
//! tested, so conformance is structural: the rules below are NVIDIA's
//! documented ones, each cited where it is checked.
//!
//! | rule | what it checks |
//! |---|---|
//! | `int8-only` | QuantizeLinear outputs and DequantizeLinear inputs are int8 (a Q without a zero point outputs uint8) |
//! | `zero-point-zero` | every zero point is a constant 0 |
//! | `scale-shape` | scales are constant and positive; per tensor for activations; for a weight, one per output channel (or one) |
//! | `weight-axis` | a per-channel weight DQ quantizes the consumer's output-channel axis (MatMul `[K, N]`: 1; Gemm: 0 with `transB`, else 1; Conv: 0) |
//! | `opset-per-channel` | per-channel scales need default-domain opset 13 (`axis` of Q/DQ) |
//! | `qdq-pair` | a Q is read by DQs only, with its scale and zero point; a DQ of a computed tensor reads a Q |
//! | `weighted-op-inputs` | a MatMul/Gemm/Conv with one input dequantized has both data inputs dequantized |
//! | `no-output-qdq` | no graph output is a Q's or DQ's |

use super::Violation;
use crate::ir::{infer_types, DataType, Graph, Model, Node, TypeMap};

const TYPES: &str = "TensorRT developer guide, \"Working with Quantized Types\": symmetric quantization; INT8 is signed, zero point 0";
const PLACEMENT: &str = "TensorRT developer guide, \"Explicit Quantization\", Q/DQ layer-placement recommendations: quantize all inputs of weighted operations";
const PER_CHANNEL: &str =
    "TensorRT developer guide, \"Explicit Quantization\": activations per tensor; weights per tensor or per channel along the output-channel axis";
const PAIRS: &str = "TensorRT developer guide, \"Explicit Quantization\": Q/DQ propagation and fusion act on Q -> DQ pairs of one scale";
const OUTPUTS: &str = "TensorRT developer guide, Q/DQ layer-placement recommendations: by default do not quantize the outputs of weighted operations";
const OPSET: &str = "ONNX QuantizeLinear/DequantizeLinear-13: the `axis` attribute (per-axis scales) appears in opset 13";

/// Every violation in `model`, in graph order.
pub fn check(model: &Model) -> Vec<Violation> {
    let graph = &model.graph;
    let types = infer_types(model);
    let opset = model.opset("").unwrap_or(0);
    let mut found = Vec::new();
    let order = graph.node_ids().unwrap_or_else(|_| graph.nodes_with_ids().into_iter().map(|(id, _)| id).collect());
    for id in order {
        let Some(node) = graph.node(id) else { continue };
        let mut report = |rule: &'static str, citation: &'static str, message: String| {
            found.push(Violation { node: display_name(node), rule, message, citation });
        };
        let (quantize, dequantize) = (node.is_onnx("QuantizeLinear"), node.is_onnx("DequantizeLinear"));
        if quantize || dequantize {
            check_types(graph, &types, node, quantize, &mut report);
            check_scale(graph, node, dequantize, opset, &mut report);
            if quantize {
                check_pair(graph, node, &mut report);
            } else if let Some(input) = node.inputs.first() {
                let from_q = producer(graph, input).is_some_and(|p| p.is_onnx("QuantizeLinear"));
                if graph.initializer(input).is_none() && !from_q {
                    report("qdq-pair", PAIRS, format!("dequantizes '{input}', which no QuantizeLinear produces"));
                }
            }
            for output in node.outputs.iter().filter(|o| graph.is_graph_output(o)) {
                report("no-output-qdq", OUTPUTS, format!("graph output '{output}' is quantized"));
            }
        }
        if node.is_onnx("MatMul") || node.is_onnx("Gemm") || node.is_onnx("Conv") {
            let dequantized: Vec<bool> = node.inputs.iter().take(2).map(|i| producer(graph, i).is_some_and(|p| p.is_onnx("DequantizeLinear"))).collect();
            if dequantized.iter().any(|&d| d) && !dequantized.iter().all(|&d| d) {
                let float: Vec<&str> = node.inputs.iter().zip(&dequantized).filter(|(_, d)| !**d).map(|(i, _)| i.as_str()).collect();
                report("weighted-op-inputs", PLACEMENT, format!("input '{}' is float while the other is quantized", float.join("', '")));
            }
        }
    }
    found
}

fn display_name(node: &Node) -> String {
    if node.name.is_empty() {
        node.outputs.first().cloned().unwrap_or_default()
    } else {
        node.name.clone()
    }
}

fn producer<'g>(graph: &'g Graph, tensor: &str) -> Option<&'g Node> {
    graph.producer(tensor).and_then(|(id, _)| graph.node(id))
}

/// `int8-only` and `zero-point-zero`.
fn check_types(graph: &Graph, types: &TypeMap, node: &Node, quantize: bool, report: &mut impl FnMut(&'static str, &'static str, String)) {
    let zero_point = node.inputs.get(2).filter(|z| !z.is_empty());
    // the integer side: a Q's output, a DQ's input
    let integer = if quantize { node.outputs.first() } else { node.inputs.first() };
    let integer_type = integer.and_then(|t| graph.initializer(t).map(|i| i.dtype).or_else(|| types.elem_type(t)));
    let integer_type = integer_type.or_else(|| zero_point.and_then(|z| graph.initializer(z)).map(|z| z.dtype));
    let integer_type = integer_type.or(if quantize && zero_point.is_none() { Some(DataType::Uint8) } else { None });
    match integer_type {
        Some(DataType::Int8) => {}
        Some(other) => report("int8-only", TYPES, format!("quantized type is {other}, not int8")),
        None => report("int8-only", TYPES, "the quantized type is unknown".into()),
    }
    if let Some(z) = zero_point {
        match graph.initializer(z).map(|t| t.to_i64()) {
            Some(Ok(values)) if values.iter().all(|&v| v == 0) => {}
            Some(Ok(values)) => {
                let first = values.iter().find(|&&v| v != 0).copied().unwrap_or(0);
                report("zero-point-zero", TYPES, format!("zero point '{z}' holds {first}, not 0"));
            }
            _ => report("zero-point-zero", TYPES, format!("zero point '{z}' is not a constant integer tensor")),
        }
    }
}

/// `scale-shape`, `weight-axis`, `opset-per-channel`.
fn check_scale(graph: &Graph, node: &Node, dequantize: bool, opset: i64, report: &mut impl FnMut(&'static str, &'static str, String)) {
    let Some(scale_name) = node.inputs.get(1) else {
        report("scale-shape", PER_CHANNEL, "no scale input".into());
        return;
    };
    let Some(scale) = graph.initializer(scale_name).and_then(|t| t.to_f32().ok()) else {
        report("scale-shape", PER_CHANNEL, format!("scale '{scale_name}' is not a constant float tensor"));
        return;
    };
    if scale.iter().any(|&s| !(s > 0.0 && s.is_finite())) {
        report("scale-shape", PER_CHANNEL, format!("scale '{scale_name}' holds a value that is not positive and finite"));
    }
    if scale.len() <= 1 {
        return;
    }
    if opset < 13 {
        report("opset-per-channel", OPSET, format!("per-channel scale '{scale_name}' under opset {opset}"));
    }
    let weight = node.inputs.first().and_then(|w| graph.initializer(w)).filter(|_| dequantize);
    let Some(weight) = weight else {
        report("scale-shape", PER_CHANNEL, format!("activation quantized per channel ({} scales); TensorRT takes one per tensor", scale.len()));
        return;
    };
    let rank = weight.dims.len() as i64;
    let axis = node.attr_int("axis").unwrap_or(1);
    let axis = if axis < 0 { axis + rank } else { axis };
    if weight.dims.get(axis as usize).is_none_or(|&d| d != scale.len() as i64) {
        report("scale-shape", PER_CHANNEL, format!("{} scales for axis {axis} of weight '{}' {:?}", scale.len(), weight.name, weight.dims));
    }
    let Some(output) = node.outputs.first() else { return };
    for reader in graph.uses(output) {
        let Some(consumer) = graph.node(reader.node) else { continue };
        if consumer.inputs.get(1) != Some(output) {
            continue;
        }
        let expected = if consumer.is_onnx("MatMul") {
            rank - 1
        } else if consumer.is_onnx("Gemm") {
            if consumer.attr_int("transB").unwrap_or(0) != 0 {
                0
            } else {
                1
            }
        } else if consumer.is_onnx("Conv") {
            0
        } else {
            continue;
        };
        if axis != expected {
            report(
                "weight-axis",
                PER_CHANNEL,
                format!("weight quantized along axis {axis}; the output channels of {} '{}' are axis {expected}", consumer.op_type, display_name(consumer)),
            );
        }
    }
}

/// `qdq-pair` for a QuantizeLinear: read by DequantizeLinears of the same scale and zero point.
fn check_pair(graph: &Graph, node: &Node, report: &mut impl FnMut(&'static str, &'static str, String)) {
    let Some(output) = node.outputs.first() else { return };
    let constant = |name: Option<&String>| name.filter(|n| !n.is_empty()).and_then(|n| graph.initializer(n)).and_then(|t| t.to_f32().ok());
    for reader in graph.uses(output) {
        let Some(consumer) = graph.node(reader.node) else { continue };
        if !consumer.is_onnx("DequantizeLinear") {
            report("qdq-pair", PAIRS, format!("its output is read by {} '{}', not a DequantizeLinear", consumer.op_type, display_name(consumer)));
            continue;
        }
        for (i, what) in [(1, "scale"), (2, "zero point")] {
            let same_name = node.inputs.get(i) == consumer.inputs.get(i);
            if !same_name && constant(node.inputs.get(i)) != constant(consumer.inputs.get(i)) {
                report("qdq-pair", PAIRS, format!("DequantizeLinear '{}' uses another {what}", display_name(consumer)));
            }
        }
    }
}
