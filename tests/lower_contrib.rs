//! lower-contrib-ops: every com.microsoft op the project emits, lowered to
//! standard ONNX. Per case: only default-domain ops remain, the graph validates,
//! tract runs it, and the lowered graph matches its snapshot. `ort_conformance`
//! checks each lowering against ONNX Runtime's own kernel (when onnxruntime is
//! importable). Refusals are tested at the end.

mod common;

use onnxopt::ir::{AttrValue, DataType, Extras, GraphBuilder, Model, Node, OpsetImport, Tensor};
use onnxopt::passes::lower_contrib::{lower_contrib_ops, LowerContribOps};
use onnxopt::passes::{DriverOptions, Pass, PassError};
use onnxopt::verify::{self, DimSizes, NamedInput};
use std::collections::HashSet;
use tract_onnx::prelude::{IntoTensor, Tensor as TractTensor};

const MS: &str = "com.microsoft";
const B: i64 = 2;

/// Deterministic values in [-1, 1): a weight's contents do not matter, only that
/// they are not symmetric.
fn values(count: usize, seed: u64) -> Vec<f32> {
    let mut rng = verify::SeededRng::new(seed);
    (0..count).map(|_| rng.uniform() as f32 * 2.0 - 1.0).collect()
}

fn weight(b: &mut GraphBuilder, name: &str, shape: &[usize], seed: u64) -> String {
    b.initializer_f32(name, shape, &values(shape.iter().product(), seed))
}

fn contrib(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<(&str, AttrValue)>) -> Node {
    let mut node = Node::new(op, inputs, outputs).with_domain(MS).with_name(format!("fused_{}", op.to_lowercase()));
    for (k, v) in attrs {
        node = node.with_attr(k, v);
    }
    node
}

fn with_contrib_import(b: GraphBuilder, opset: i64) -> Model {
    let mut model = b.into_model(opset);
    model.opset_imports.push(OpsetImport { domain: MS.into(), version: 1, extras: Extras::default() });
    model
}

fn int(v: i64) -> AttrValue {
    AttrValue::Int(v)
}

fn float(v: f32) -> AttrValue {
    AttrValue::Float(v)
}

struct Case {
    name: &'static str,
    model: Model,
}

fn case(name: &'static str, model: Model) -> Case {
    Case { name, model }
}

/// One elementwise activation over x [2, 3, 8].
fn activation(op: &str, with_bias: bool) -> Model {
    let mut b = GraphBuilder::new(op);
    let x = b.input("x", DataType::Float, &[B, 3, 8]);
    let mut inputs = vec![x];
    if with_bias {
        inputs.push(weight(&mut b, "bias", &[8], 1));
    }
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    b.add(contrib(op, &refs, &["y"], vec![]));
    b.output("y", DataType::Float, &[B, 3, 8]);
    with_contrib_import(b, 17)
}

/// SkipLayerNormalization or SkipSimplifiedLayerNormalization; `full`: every
/// optional input and output.
fn skip_norm(op: &str, full: bool) -> Model {
    let mut b = GraphBuilder::new(op);
    let x = b.input("x", DataType::Float, &[B, 3, 8]);
    let skip = b.input("skip", DataType::Float, &[B, 3, 8]);
    let gamma = weight(&mut b, "gamma", &[8], 2);
    let mut inputs: Vec<String> = vec![x, skip, gamma];
    if full {
        if !op.starts_with("SkipSimplified") {
            inputs.push(weight(&mut b, "beta", &[8], 3));
        }
        inputs.push(weight(&mut b, "bias", &[8], 4));
    }
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let outputs: &[&str] = if full { &["y", "mean", "inv_std_var", "sum"] } else { &["y"] };
    b.add(contrib(op, &inputs, outputs, vec![("epsilon", float(1e-5))]));
    b.output("y", DataType::Float, &[B, 3, 8]);
    if full {
        b.output("mean", DataType::Float, &[B, 3, 1]);
        b.output("inv_std_var", DataType::Float, &[B, 3, 1]);
        b.output("sum", DataType::Float, &[B, 3, 8]);
    }
    with_contrib_import(b, 17)
}

/// ORT's SimplifiedLayerNormalization lives in the default domain.
fn simplified_layer_norm(opset: i64, axis: i64) -> Model {
    let mut b = GraphBuilder::new("rms");
    let x = b.input("x", DataType::Float, &[B, 3, 8]);
    let norm_dims: &[usize] = if axis == -1 { &[8] } else { &[3, 8] };
    let scale = weight(&mut b, "scale", norm_dims, 5);
    let stat: &[i64] = if axis == -1 { &[B, 3, 1] } else { &[B, 1, 1] };
    b.add(
        Node::new("SimplifiedLayerNormalization", &[&x, &scale], &["y", "inv_std_var"])
            .with_name("fused_rms")
            .with_attr("axis", int(axis))
            .with_attr("epsilon", float(1e-6)),
    );
    b.output("y", DataType::Float, &[B, 3, 8]);
    b.output("inv_std_var", DataType::Float, stat);
    with_contrib_import(b, opset)
}

/// RMS norm of a float16 x with float16 scale: ORT computes it in float32.
fn simplified_layer_norm_f16() -> Model {
    let mut b = GraphBuilder::new("rms_f16");
    let x = b.input("x", DataType::Float16, &[B, 3, 8]);
    let raw: Vec<u8> = values(8, 5).iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
    let scale = b.initializer(Tensor::from_raw("scale", DataType::Float16, vec![8], raw.into()));
    b.add(Node::new("SimplifiedLayerNormalization", &[&x, &scale], &["y"]).with_name("fused_rms"));
    b.output("y", DataType::Float16, &[B, 3, 8]);
    with_contrib_import(b, 17)
}

/// BERT embeddings: vocabulary 30, 16 positions, 2 segments, hidden 8, S = 5.
fn embed_layer_norm(full: bool) -> Model {
    let mut b = GraphBuilder::new("embed");
    let ids = b.input("input_ids", DataType::Int32, &[B, 5]);
    let words = weight(&mut b, "word_embedding", &[30, 8], 6);
    let positions = weight(&mut b, "position_embedding", &[16, 8], 7);
    let segments = weight(&mut b, "segment_embedding", &[2, 8], 8);
    let gamma = weight(&mut b, "gamma", &[8], 9);
    let beta = weight(&mut b, "beta", &[8], 10);
    let inputs: Vec<String> = if full {
        let segment_ids = b.input("segment_ids", DataType::Int32, &[B, 5]);
        let mask = b.input("mask", DataType::Int32, &[B, 5]);
        vec![ids, segment_ids, words, positions, segments, gamma, beta, mask]
    } else {
        let position_ids = b.input("position_ids", DataType::Int32, &[B, 5]);
        vec![ids, String::new(), words, positions, String::new(), gamma, beta, String::new(), position_ids]
    };
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    b.add(contrib("EmbedLayerNormalization", &refs, &["y", "mask_index", "embedding_sum"], vec![("epsilon", float(1e-5))]));
    b.output("y", DataType::Float, &[B, 5, 8]);
    b.output("mask_index", DataType::Int32, &[B]);
    b.output("embedding_sum", DataType::Float, &[B, 5, 8]);
    with_contrib_import(b, 17)
}

/// Cross attention S = 4 over L = 6 keys, 2 heads of 4 (value heads of 3), with
/// QKV bias, a (B, L) key padding mask and a (1, N, S, L) attention bias.
fn multi_head_attention_cross() -> Model {
    let mut b = GraphBuilder::new("mha");
    let q = b.input("query", DataType::Float, &[B, 4, 8]);
    let k = b.input("key", DataType::Float, &[B, 6, 8]);
    let v = b.input("value", DataType::Float, &[B, 6, 6]);
    let bias = weight(&mut b, "qkv_bias", &[22], 11);
    let mask = b.input("key_padding_mask", DataType::Int32, &[B, 6]);
    let attention_bias = b.input("attention_bias", DataType::Float, &[1, 2, 4, 6]);
    let attrs = vec![("num_heads", int(2)), ("mask_filter_value", float(-1000.0))];
    b.add(contrib("MultiHeadAttention", &[&q, &k, &v, &bias, &mask, &attention_bias], &["y"], attrs));
    b.output("y", DataType::Float, &[B, 4, 6]);
    with_contrib_import(b, 17)
}

/// Causal self attention with symbolic batch and sequence, key lengths (B), scale.
fn multi_head_attention_causal() -> Model {
    let mut b = GraphBuilder::new("mha_causal");
    let dims = |h| vec![onnxopt::ir::Dim::Symbol("batch".into()), onnxopt::ir::Dim::Symbol("seq".into()), onnxopt::ir::Dim::Fixed(h)];
    let q = b.input_symbolic("query", DataType::Float, dims(8));
    let k = b.input_symbolic("key", DataType::Float, dims(8));
    let v = b.input_symbolic("value", DataType::Float, dims(8));
    let lengths = b.input_symbolic("key_padding_mask", DataType::Int32, vec![onnxopt::ir::Dim::Symbol("batch".into())]);
    let attrs = vec![("num_heads", int(2)), ("unidirectional", int(1)), ("scale", float(0.3))];
    b.add(contrib("MultiHeadAttention", &[&q, &k, &v, "", &lengths], &["y"], attrs));
    b.output("y", DataType::Float, &[-1, -1, 8]);
    with_contrib_import(b, 17)
}

/// BERT-style Attention: input [B, 5, 6], 2 heads; `variant` picks the mask.
fn attention(variant: &str) -> Model {
    let mut b = GraphBuilder::new("attention");
    let x = b.input("input", DataType::Float, &[B, 5, 6]);
    let (sizes, total) = if variant == "causal" { (vec![8, 8, 6], 22) } else { (vec![8, 8, 8], 24) };
    let w = weight(&mut b, "qkv_weight", &[6, total], 12);
    let bias = weight(&mut b, "qkv_bias", &[total], 13);
    let mut attrs = vec![("num_heads", int(2))];
    let inputs: Vec<String> = match variant {
        "mask2d" => vec![x, w, bias, b.input("mask_index", DataType::Int32, &[B, 5])],
        "mask3d" => vec![x, w, bias, b.input("mask_index", DataType::Int32, &[B, 5, 5])],
        "causal" => {
            attrs.push(("unidirectional", int(1)));
            attrs.push(("qkv_hidden_sizes", AttrValue::Ints(sizes.clone())));
            let mask = b.input("mask_index", DataType::Int32, &[B, 5]);
            let attention_bias = b.input("attention_bias", DataType::Float, &[B, 1, 5, 5]);
            vec![x, w, bias, mask, String::new(), attention_bias]
        }
        _ => unreachable!(),
    };
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    b.add(contrib("Attention", &refs, &["y"], attrs));
    b.output("y", DataType::Float, &[B, 5, sizes[2]]);
    with_contrib_import(b, 17)
}

/// Rotary embedding over 2 heads of 8, caches of 16 positions.
/// `layout_4d`: x is (B, N, S, H) with partial interleaved rotation and a (1)
/// position offset; otherwise (B, S, N*H), full rotation, (B, S) positions.
fn rotary(layout_4d: bool) -> Model {
    let mut b = GraphBuilder::new("rotary");
    let (x_shape, rotary_dim): (&[i64], i64) = if layout_4d { (&[B, 2, 5, 8], 4) } else { (&[B, 5, 16], 8) };
    let x = b.input("x", DataType::Float, x_shape);
    let positions = if layout_4d { b.input("position_ids", DataType::Int64, &[1]) } else { b.input("position_ids", DataType::Int64, &[B, 5]) };
    let half = (rotary_dim / 2) as usize;
    let cos = weight(&mut b, "cos_cache", &[16, half], 14);
    let sin = weight(&mut b, "sin_cache", &[16, half], 15);
    let attrs =
        if layout_4d { vec![("interleaved", int(1)), ("rotary_embedding_dim", int(rotary_dim)), ("num_heads", int(2))] } else { vec![("num_heads", int(2))] };
    b.add(contrib("RotaryEmbedding", &[&x, &positions, &cos, &sin], &["y"], attrs));
    b.output("y", DataType::Float, x_shape);
    with_contrib_import(b, 17)
}

/// GroupQueryAttention, 4 query heads over 2 KV heads of 8 (ORT 1.32 wants head
/// sizes that are multiples of 8), S = 6, no cache.
/// `packed`: QKV in one input, a local window of 2, and the present outputs.
fn group_query_attention(packed: bool) -> Model {
    let mut b = GraphBuilder::new("gqa");
    let seqlens = b.input("seqlens_k", DataType::Int32, &[B]);
    let total = b.input("total_sequence_length", DataType::Int32, &[]);
    let mut attrs = vec![("num_heads", int(4)), ("kv_num_heads", int(2))];
    let outputs: &[&str] = if packed { &["y", "present_key", "present_value"] } else { &["y"] };
    if packed {
        let qkv = b.input("qkv", DataType::Float, &[B, 6, 64]);
        attrs.push(("local_window_size", int(2)));
        b.add(contrib("GroupQueryAttention", &[&qkv, "", "", "", "", &seqlens, &total], outputs, attrs));
        b.output("present_key", DataType::Float, &[B, 2, 6, 8]);
        b.output("present_value", DataType::Float, &[B, 2, 6, 8]);
    } else {
        let q = b.input("query", DataType::Float, &[B, 6, 32]);
        let k = b.input("key", DataType::Float, &[B, 6, 16]);
        let v = b.input("value", DataType::Float, &[B, 6, 16]);
        b.add(contrib("GroupQueryAttention", &[&q, &k, &v, "", "", &seqlens, &total], outputs, attrs));
    }
    b.output("y", DataType::Float, &[B, 6, 32]);
    with_contrib_import(b, 17)
}

/// GroupQueryAttention over a KV cache (a decode step): past (B, 2, 5, 8), one
/// new token, an additive attention_bias (B, 1, 1, 6). With the test's seqlens_k
/// [5, 3], row 1 writes its token at 3 and zeros after (ORT's present layout).
fn group_query_attention_past() -> Model {
    let mut b = GraphBuilder::new("gqa_past");
    let seqlens = b.input("seqlens_k", DataType::Int32, &[B]);
    let total = b.input("total_sequence_length", DataType::Int32, &[]);
    let q = b.input("query", DataType::Float, &[B, 1, 32]);
    let k = b.input("key", DataType::Float, &[B, 1, 16]);
    let v = b.input("value", DataType::Float, &[B, 1, 16]);
    let past_k = b.input("past_key", DataType::Float, &[B, 2, 5, 8]);
    let past_v = b.input("past_value", DataType::Float, &[B, 2, 5, 8]);
    let bias = b.input("attention_bias", DataType::Float, &[B, 1, 1, 6]);
    let attrs = vec![("num_heads", int(4)), ("kv_num_heads", int(2))];
    let inputs = [q.as_str(), &k, &v, &past_k, &past_v, &seqlens, &total, "", "", "", &bias];
    b.add(contrib("GroupQueryAttention", &inputs, &["y", "present_key", "present_value"], attrs));
    b.output("y", DataType::Float, &[B, 1, 32]);
    b.output("present_key", DataType::Float, &[B, 2, 6, 8]);
    b.output("present_value", DataType::Float, &[B, 2, 6, 8]);
    with_contrib_import(b, 17)
}

/// MultiHeadAttention over a KV cache: past (B, 2, 3, 4), two new tokens, an
/// additive attention_bias (B, 1, 2, 5); the presents are outputs.
fn multi_head_attention_past() -> Model {
    let mut b = GraphBuilder::new("mha_past");
    let q = b.input("query", DataType::Float, &[B, 2, 8]);
    let k = b.input("key", DataType::Float, &[B, 2, 8]);
    let v = b.input("value", DataType::Float, &[B, 2, 8]);
    let past_k = b.input("past_key", DataType::Float, &[B, 2, 3, 4]);
    let past_v = b.input("past_value", DataType::Float, &[B, 2, 3, 4]);
    let bias = b.input("attention_bias", DataType::Float, &[B, 1, 2, 5]);
    let inputs = [q.as_str(), &k, &v, "", "", &bias, &past_k, &past_v];
    b.add(contrib("MultiHeadAttention", &inputs, &["y", "present_key", "present_value"], vec![("num_heads", int(2))]));
    b.output("y", DataType::Float, &[B, 2, 8]);
    b.output("present_key", DataType::Float, &[B, 2, 5, 4]);
    b.output("present_value", DataType::Float, &[B, 2, 5, 4]);
    with_contrib_import(b, 17)
}

/// MatMulNBits with accuracy_level 4 (int8 compute): A [2, 3, 64] against int4
/// B (K 64, N 8, blocks of 32) with per-block scales and zero points.
fn matmul_n_bits_int8_compute() -> Model {
    let mut b = GraphBuilder::new("matmul_n_bits_int8_compute");
    let a = b.input("a", DataType::Float, &[B, 3, 64]);
    let packed: Vec<u8> = (0..8 * 2 * 16).map(|i| ((i * 37 + 11) % 256) as u8).collect();
    let weights = b.initializer(Tensor::from_raw("b_int4", DataType::Uint8, vec![8, 2, 16], packed.into()));
    let scales: Vec<f32> = values(16, 3).iter().map(|v| 0.01 + v.abs() * 0.05).collect();
    let scale = b.initializer_f32("scales", &[16], &scales);
    let zero_points: Vec<u8> = (0..8).map(|i| (i * 0x35 % 256) as u8).collect();
    let zero_point = b.initializer(Tensor::from_raw("zero_points", DataType::Uint8, vec![8], zero_points.into()));
    let attrs = vec![("K", int(64)), ("N", int(8)), ("bits", int(4)), ("block_size", int(32)), ("accuracy_level", int(4))];
    b.add(contrib("MatMulNBits", &[&a, &weights, &scale, &zero_point], &["y"], attrs));
    b.output("y", DataType::Float, &[B, 3, 8]);
    with_contrib_import(b, 17)
}

/// DynamicQuantizeMatMul over A [2, 3, 8]: int8 B [8, 6] with per-column scales
/// and (nonzero, to exercise the subtraction) zero points, and a bias.
fn dynamic_quantize_matmul() -> Model {
    let mut b = GraphBuilder::new("dynamic_quantize_matmul");
    let a = b.input("a", DataType::Float, &[B, 3, 8]);
    let quantized: Vec<u8> = values(48, 7).iter().map(|v| ((v * 127.0).round() as i8) as u8).collect();
    let b_int8 = b.initializer(Tensor::from_raw("b_int8", DataType::Int8, vec![8, 6], quantized.into()));
    let scales: Vec<f32> = values(6, 8).iter().map(|v| 0.01 + v.abs() * 0.02).collect();
    let scale = b.initializer_f32("b_scale", &[6], &scales);
    let zero_points: Vec<u8> = [0i8, 1, -2, 3, 0, -1].iter().map(|z| *z as u8).collect();
    let zero_point = b.initializer(Tensor::from_raw("b_zero_point", DataType::Int8, vec![6], zero_points.into()));
    let bias = weight(&mut b, "bias", &[6], 9);
    b.add(contrib("DynamicQuantizeMatMul", &[&a, &b_int8, &scale, &zero_point, &bias], &["y"], vec![]));
    b.output("y", DataType::Float, &[B, 3, 6]);
    with_contrib_import(b, 17)
}

/// MatMulIntegerToFloat with a per-row A scale `[2, 3, 1]` and a bias: ORT adds
/// the bias before it multiplies by the row scale, and so must the lowering.
fn matmul_integer_to_float_row_scale() -> Model {
    let mut b = GraphBuilder::new("matmul_integer_to_float_row_scale");
    let x = b.input("x", DataType::Float, &[B, 3, 8]);
    let step = b.initializer_f32("step", &[], &[0.02]);
    let a_zero_point = b.initializer(Tensor::from_raw("a_zero_point", DataType::Uint8, vec![], vec![128u8].into()));
    b.add(Node::new("QuantizeLinear", &[&x, &step, &a_zero_point], &["a"]));
    let magnitude = b.node("Abs", &[&x]);
    b.add(Node::new("ReduceMax", &[&magnitude], &["row_scale"]).with_attr("axes", AttrValue::Ints(vec![-1])).with_attr("keepdims", AttrValue::Int(1)));
    let quantized: Vec<u8> = values(48, 7).iter().map(|v| ((v * 127.0).round() as i8) as u8).collect();
    let b_int8 = b.initializer(Tensor::from_raw("b_int8", DataType::Int8, vec![8, 6], quantized.into()));
    let scales: Vec<f32> = values(6, 8).iter().map(|v| 0.01 + v.abs() * 0.02).collect();
    let scale = b.initializer_f32("b_scale", &[6], &scales);
    let bias = weight(&mut b, "bias", &[6], 9);
    b.add(contrib("MatMulIntegerToFloat", &["a", &b_int8, "row_scale", &scale, &a_zero_point, "", &bias], &["y"], vec![]));
    b.output("y", DataType::Float, &[B, 3, 6]);
    with_contrib_import(b, 17)
}

fn cases() -> Vec<Case> {
    vec![
        case("gelu", activation("Gelu", false)),
        case("bias_gelu", activation("BiasGelu", true)),
        case("fast_gelu", activation("FastGelu", true)),
        case("fast_gelu_no_bias", activation("FastGelu", false)),
        case("quick_gelu", activation("QuickGelu", false)),
        case("skip_layer_norm", skip_norm("SkipLayerNormalization", true)),
        case("skip_layer_norm_minimal", skip_norm("SkipLayerNormalization", false)),
        case("simplified_layer_norm", simplified_layer_norm(17, -1)),
        case("simplified_layer_norm_opset18_axis1", simplified_layer_norm(18, 1)),
        case("simplified_layer_norm_float16", simplified_layer_norm_f16()),
        case("skip_simplified_layer_norm", skip_norm("SkipSimplifiedLayerNormalization", true)),
        // the sum is made by the lowering, untyped: the RMS norm over it must still lower
        case("skip_simplified_layer_norm_minimal", skip_norm("SkipSimplifiedLayerNormalization", false)),
        case("embed_layer_norm", embed_layer_norm(true)),
        case("embed_layer_norm_position_ids", embed_layer_norm(false)),
        case("multi_head_attention_cross", multi_head_attention_cross()),
        case("multi_head_attention_causal", multi_head_attention_causal()),
        case("multi_head_attention_past", multi_head_attention_past()),
        case("attention_mask2d", attention("mask2d")),
        case("attention_mask3d", attention("mask3d")),
        case("attention_causal", attention("causal")),
        case("rotary_embedding", rotary(false)),
        case("rotary_embedding_4d_interleaved_partial", rotary(true)),
        case("group_query_attention", group_query_attention(false)),
        case("group_query_attention_packed_window", group_query_attention(true)),
        case("group_query_attention_past", group_query_attention_past()),
        case("matmul_n_bits_int8_compute", matmul_n_bits_int8_compute()),
        case("dynamic_quantize_matmul", dynamic_quantize_matmul()),
        case("matmul_integer_to_float_row_scale", matmul_integer_to_float_row_scale()),
    ]
}

fn lower(model: &Model) -> Result<Model, String> {
    let mut lowered = model.clone();
    let options = DriverOptions { validate: true, ..DriverOptions::default() };
    let record = lower_contrib_ops(&mut lowered, &options).map_err(|e| match e {
        PassError::Failed { message, .. } => message,
        other => panic!("not a refusal: {other}"),
    })?;
    assert!(record.patches >= 1, "the pass fired");
    Ok(lowered)
}

/// Inputs for tract: the verifier's random ones, with GQA's sequence lengths set
/// (one full, one padded entry).
fn tract_inputs(model: &Model) -> Vec<NamedInput> {
    let mut inputs = verify::random_inputs(model, 0, DimSizes::default()).unwrap();
    for input in &mut inputs {
        match input.name.as_str() {
            "seqlens_k" => input.value = tract_onnx::tract_core::ndarray::arr1(&[5i32, 3]).into_dyn().into_tensor(),
            "total_sequence_length" => input.value = TractTensor::from(6i32),
            _ => {}
        }
    }
    inputs
}

#[test]
fn every_case_lowers_to_standard_ops_that_tract_runs() {
    for Case { name, model } in cases() {
        let lowered = lower(&model).unwrap_or_else(|e| panic!("{name}: {e}"));
        let foreign: Vec<String> = lowered.graph.nodes().filter(|n| !n.domain.is_empty()).map(|n| n.qualified_op()).collect();
        assert!(foreign.is_empty(), "{name}: left {foreign:?}");
        assert!(
            lowered.graph.nodes().all(|n| n.op_type != "SimplifiedLayerNormalization"),
            "{name}: ORT's default-domain SimplifiedLayerNormalization is not ONNX"
        );
        assert!(lowered.opset_imports.iter().all(|o| o.domain != MS), "{name}: the com.microsoft import stays");
        lowered.graph.validate(&HashSet::new()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(lowered.graph.inputs, model.graph.inputs, "{name}: the interface changed");
        assert_eq!(lowered.graph.outputs, model.graph.outputs, "{name}: the interface changed");
        let outputs = verify::run(&lowered, name, &tract_inputs(&lowered)).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (output, value) in &outputs {
            let as_f64 = value.cast_to::<f64>().unwrap();
            let finite = as_f64.to_plain_array_view::<f64>().unwrap().iter().all(|x| x.is_finite());
            assert!(finite, "{name}: {output} has non-finite values");
        }
        insta::assert_snapshot!(name, format!("before:\n{model}\nafter:\n{lowered}"));
    }
}

/// The lowering against ONNX Runtime's contrib kernels (max abs per case printed).
#[test]
fn ort_conformance() {
    common::onnxruntime_agrees(cases().into_iter().map(|Case { name, model }| {
        let lowered = lower(&model).unwrap_or_else(|e| panic!("{name}: {e}"));
        (name, model, lowered)
    }));
}

#[test]
fn a_model_without_contrib_ops_is_left_alone() {
    let mut b = GraphBuilder::new("plain");
    let x = b.input("x", DataType::Float, &[2, 4]);
    let y = b.node("Relu", &[&x]);
    b.output(&y, DataType::Float, &[2, 4]);
    let model = b.into_model(17);
    assert!(LowerContribOps.propose(&model).unwrap().is_empty());
}

fn refusal(model: &Model) -> String {
    match lower(model) {
        Err(message) => message,
        Ok(_) => panic!("expected a refusal"),
    }
}

#[test]
fn refuses_what_it_cannot_lower_exactly() {
    // 4-D Megatron mask: ORT's CPU kernel has no semantics for it either
    let mut b = GraphBuilder::new("attention_4d_mask");
    let x = b.input("input", DataType::Float, &[B, 5, 6]);
    let w = weight(&mut b, "qkv_weight", &[6, 24], 12);
    let mask = b.input("mask_index", DataType::Int32, &[B, 1, 5, 5]);
    b.add(contrib("Attention", &[&x, &w, "", &mask], &["y"], vec![("num_heads", int(2))]));
    b.output("y", DataType::Float, &[B, 5, 8]);
    let message = refusal(&with_contrib_import(b, 17));
    assert!(message.contains("fused_attention") && message.contains("4-D mask"), "{message}");

    // a KV cache with a key padding mask (ORT's lengths then count the past)
    let mut b = GraphBuilder::new("mha_past_padding");
    let q = b.input("query", DataType::Float, &[B, 1, 8]);
    let past = b.input("past_key", DataType::Float, &[B, 2, 3, 4]);
    let lengths = b.input("key_padding_mask", DataType::Int32, &[B]);
    b.add(contrib("MultiHeadAttention", &[&q, &q, &q, "", &lengths, "", &past, &past], &["y"], vec![("num_heads", int(2))]));
    b.output("y", DataType::Float, &[B, 1, 8]);
    assert!(refusal(&with_contrib_import(b, 17)).contains("key_padding_mask"));

    // causal cross attention: ORT's mask is not a triangle there
    let mut b = GraphBuilder::new("mha_causal_cross");
    let q = b.input("query", DataType::Float, &[B, 4, 8]);
    let k = b.input("key", DataType::Float, &[B, 6, 8]);
    b.add(contrib("MultiHeadAttention", &[&q, &k, &k], &["y"], vec![("num_heads", int(2)), ("unidirectional", int(1))]));
    b.output("y", DataType::Float, &[B, 4, 8]);
    assert!(refusal(&with_contrib_import(b, 17)).contains("unidirectional"));

    // an op with no lowering
    let mut b = GraphBuilder::new("bias_split_gelu");
    let x = b.input("x", DataType::Float, &[2, 4]);
    b.add(contrib("BiasSplitGelu", &[&x], &["y"], vec![]));
    b.output("y", DataType::Float, &[2, 4]);
    assert!(refusal(&with_contrib_import(b, 17)).contains("no lowering of BiasSplitGelu"));

    // LayerNormalization needs opset 17
    let mut model = activation("Gelu", false);
    model.opset_imports[0].version = 16;
    assert!(refusal(&model).contains("opset 16"));
}

#[test]
fn an_unused_optional_output_is_not_computed() {
    // SkipLayerNormalization whose sum output nobody reads: no Identity or extra node for it
    let mut model = skip_norm("SkipLayerNormalization", true);
    model.graph.outputs.retain(|o| o.name == "y");
    let lowered = lower(&model).unwrap();
    let ln: Vec<_> = lowered.graph.nodes().filter(|n| n.op_type == "LayerNormalization").collect();
    assert_eq!(ln.len(), 1);
    assert_eq!(ln[0].outputs, vec!["y".to_string()]);
    assert!(lowered.graph.initializers.iter().all(|t: &Tensor| !t.name.starts_with("sum")));
}
