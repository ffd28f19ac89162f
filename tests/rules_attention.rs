//! The attention fusions beyond BERT's SDPA form (`passes/attention.rules`):
//! GPT-2's packed QKV projection, eager attention, attention without a mask
//! (ViT), and dynamo's heads flattened straight to rows. Each: a small graph in
//! the form the exporter writes, where the rule fires (snapshot, tract numbers
//! after lowering Attention), and a near miss where it must not; then the
//! committed fixtures through the whole ORT pipeline.

mod common;

use common::fixture;
use common::fusion::{count, fired, fuse};
use onnxopt::ir::{AttrValue, DataType, GraphBuilder, Model, Node};
use onnxopt::onnx;
use onnxopt::passes::check::{rewrite_and_compare, Rewritten};
use onnxopt::passes::pipeline::{optimization_passes, Target};
use onnxopt::verify::VerifyOptions;

// Batch, sequence, hidden size and heads of the hand-built graphs.
const BATCH: i64 = 2;
const SEQ: i64 = 4;
const HIDDEN: i64 = 8;
const HEADS: i64 = 2;
const HEAD: i64 = HIDDEN / HEADS;

/// Asserts `rule` fired once, the numbers agree, and snapshots the rewrite as `case`.
fn assert_fires(model: &Model, rule: &str, case: &str) -> Rewritten {
    let r = fuse(model, "ort");
    assert_eq!(fired(&r, rule), 1, "{rule} should fire once:\n{}", r.snapshot);
    assert!(r.comparison.passed(), "{rule}: {:?}", r.comparison);
    insta::assert_snapshot!(format!("fuse__{case}"), r.snapshot);
    r
}

fn assert_not_fused(model: &Model) {
    let r = fuse(model, "ort");
    assert_eq!(count(&r.model, "Attention") + count(&r.model, "MultiHeadAttention"), 0, "nothing should fuse:\n{}", r.snapshot);
}

/// `rule` does not fire on `model` (another rule may, with the same numbers).
fn assert_not_by_rule(model: &Model, rule: &str) {
    let r = fuse(model, "ort");
    assert_eq!(fired(&r, rule), 0, "{rule} should not fire:\n{}", r.snapshot);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
}

fn values(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * scale).collect()
}

fn ints(b: &mut GraphBuilder, name: &str, values: &[i64]) -> String {
    b.initializer_i64(name, &[values.len() as i64], values)
}

fn transpose(b: &mut GraphBuilder, x: &str, perm: &[i64]) -> String {
    b.node_with("Transpose", &[x], vec![("perm", AttrValue::Ints(perm.to_vec()))])
}

/// Concat(Shape(t)[0], Shape(t)[1], rest): a Reshape target read off `t`, as the
/// TorchScript exporter writes `t.view(t.size()[:-1] + rest)`.
fn leading_dims_and(b: &mut GraphBuilder, t: &str, rest: &[i64], tag: &str) -> String {
    let shape = b.node("Shape", &[t]);
    let zero = b.initializer_i64(&format!("{tag}_i0"), &[], &[0]);
    let one = b.initializer_i64(&format!("{tag}_i1"), &[], &[1]);
    let axes = ints(b, &format!("{tag}_axes"), &[0]);
    let rest = ints(b, &format!("{tag}_rest"), rest);
    let d0 = b.node_with("Gather", &[&shape, &zero], vec![("axis", AttrValue::Int(0))]);
    let d1 = b.node_with("Gather", &[&shape, &one], vec![("axis", AttrValue::Int(0))]);
    let u0 = b.node("Unsqueeze", &[&d0, &axes]);
    let u1 = b.node("Unsqueeze", &[&d1, &axes]);
    b.node_with("Concat", &[&u0, &u1, &rest], vec![("axis", AttrValue::Int(0))])
}

/// q * sqrt(scale) and K^T * sqrt(scale), as both exporters write SDPA's scale.
fn sdpa_scale(b: &mut GraphBuilder) -> String {
    b.initializer_f32("sqrt_scale", &[], &[(HEAD as f32).powf(-0.25)])
}

/// softmax(q k [+ mask]) v, heads merged back: the common tail of the graphs.
fn attend(b: &mut GraphBuilder, scores: &str, mask: Option<&str>, v: &str) -> String {
    let masked = match mask {
        Some(mask) => b.node("Add", &[scores, mask]),
        None => scores.to_string(),
    };
    let p = b.node_with("Softmax", &[&masked], vec![("axis", AttrValue::Int(-1))]);
    let context = b.node("MatMul", &[&p, v]);
    transpose(b, &context, &[0, 2, 1, 3])
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Exporter {
    TorchScript,
    Dynamo,
}

/// What to get wrong in a near miss.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Flaw {
    None,
    /// K taken from the Split's third output and V from its second.
    SwappedKv,
    /// The Shape read off q is also a graph output.
    ShapeLeaks,
}

/// GPT-2 self-attention (Conv1D c_attn): x flattened to rows, one Gemm with the
/// packed [H, 3H] weight, rows back to [B, S, 3H], Split in Q, K, V.
/// TorchScript: bias, Split sizes as an input, Reshape targets from Shape reads.
/// dynamo (opset 18): a zero bias dropped, Split by num_outputs, constant
/// targets, and the merged heads flattened straight to rows for c_proj's Gemm.
fn packed_qkv_graph(exporter: Exporter, flaw: Flaw) -> Model {
    let ts = exporter == Exporter::TorchScript;
    let mut b = GraphBuilder::new("gpt2_attention");
    let x = b.input("x", DataType::Float, &[BATCH, SEQ, HIDDEN]);
    let mask = b.input("mask", DataType::Float, &[BATCH, 1, SEQ, SEQ]);
    let w = b.initializer_f32("c_attn_weight", &[HIDDEN as usize, 3 * HIDDEN as usize], &values(192, 0.02));
    let rows_shape = ints(&mut b, "rows_shape", &[-1, HIDDEN]);
    let rows = b.node("Reshape", &[&x, &rows_shape]);
    let gemm_attrs = || vec![("alpha", AttrValue::Float(1.0)), ("beta", AttrValue::Float(1.0))];
    let projected = if ts {
        let bias = b.initializer_f32("c_attn_bias", &[3 * HIDDEN as usize], &values(24, 0.01));
        b.node_with("Gemm", &[&rows, &w, &bias], gemm_attrs())
    } else {
        b.node_with("Gemm", &[&rows, &w], gemm_attrs())
    };
    let packed_shape = ints(&mut b, "packed_shape", &[BATCH, SEQ, 3 * HIDDEN]);
    let packed = b.node("Reshape", &[&projected, &packed_shape]);
    let mut split = if ts {
        let sizes = ints(&mut b, "split_sizes", &[HIDDEN; 3]);
        Node::new("Split", &[&packed, &sizes], &["q_part", "k_part", "v_part"])
    } else {
        Node::new("Split", &[&packed], &["q_part", "k_part", "v_part"]).with_attr("num_outputs", AttrValue::Int(3))
    };
    split = split.with_name("split").with_attr("axis", AttrValue::Int(2));
    b.add(split);
    let (k_part, v_part) = if flaw == Flaw::SwappedKv { ("v_part", "k_part") } else { ("k_part", "v_part") };
    let (q_heads, kv_heads) = if ts {
        (leading_dims_and(&mut b, "q_part", &[-1, HEAD], "q"), leading_dims_and(&mut b, k_part, &[-1, HEAD], "kv"))
    } else {
        let heads = ints(&mut b, "heads_shape", &[BATCH, SEQ, -1, HEAD]);
        (heads.clone(), heads)
    };
    if flaw == Flaw::ShapeLeaks {
        let shape = b.node("Shape", &["q_part"]);
        b.output(&shape, DataType::Int64, &[3]);
    }
    let scale = sdpa_scale(&mut b);
    let q = b.node("Reshape", &["q_part", &q_heads]);
    let q = transpose(&mut b, &q, &[0, 2, 1, 3]);
    let q = b.node("Mul", &[&q, &scale]);
    let k = b.node("Reshape", &[k_part, &kv_heads]);
    let k = transpose(&mut b, &k, &[0, 2, 3, 1]);
    let k = b.node("Mul", &[&k, &scale]);
    let v = b.node("Reshape", &[v_part, &kv_heads]);
    let v = transpose(&mut b, &v, &[0, 2, 1, 3]);
    let scores = b.node("MatMul", &[&q, &k]);
    let merged = attend(&mut b, &scores, Some(&mask), &v);
    let (target, out_shape): (String, &[i64]) = if ts {
        (leading_dims_and(&mut b, &merged, &[-1], "out"), &[BATCH, SEQ, HIDDEN])
    } else {
        (ints(&mut b, "out_rows", &[-1, HIDDEN]), &[BATCH * SEQ, HIDDEN])
    };
    let y = b.node("Reshape", &[&merged, &target]);
    b.output(&y, DataType::Float, out_shape);
    b.into_model(if ts { 17 } else { 18 })
}

#[test]
fn attention_packed_qkv() {
    let r = assert_fires(&packed_qkv_graph(Exporter::TorchScript, Flaw::None), "attention-packed-qkv", "attention-packed-qkv");
    assert_eq!(count(&r.model, "Attention"), 1);
    // the Shape reads of q, k and the merged heads went with the match
    assert_eq!(count(&r.model, "Shape"), 0, "{}", r.snapshot);
    // K and V swapped: the packed weight's thirds are not Q, K, V in order
    // (multi-head-attention takes the three Split outputs as they are read)
    assert_not_by_rule(&packed_qkv_graph(Exporter::TorchScript, Flaw::SwappedKv), "attention-packed-qkv");
    // a Shape read that is needed elsewhere is not absorbed
    assert_not_by_rule(&packed_qkv_graph(Exporter::TorchScript, Flaw::ShapeLeaks), "attention-packed-qkv");
}

#[test]
fn attention_packed_qkv_dynamo() {
    let r = assert_fires(&packed_qkv_graph(Exporter::Dynamo, Flaw::None), "attention-packed-qkv", "attention-packed-qkv-dynamo");
    assert_eq!(fired(&r, "merge-heads-before-flatten"), 1);
    let attention = r.model.graph.nodes().find(|n| n.op_type == "Attention").unwrap();
    assert_eq!(attention.inputs[2], "", "no bias: Attention's bias input is left out");
    assert_not_by_rule(&packed_qkv_graph(Exporter::Dynamo, Flaw::SwappedKv), "attention-packed-qkv");
}

/// How eager attention scales Q K^T.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Scaling {
    /// `* head_size^-0.5` (transformers today)
    Mul,
    /// `/ sqrt(head_size)` (older exports)
    Div,
    /// `sqrt(head_size) / scores`: not a scale
    DivInverted,
}

/// BERT's eager self-attention as the TorchScript exporter writes it: separate
/// Q, K, V projections, K^T by one Transpose, the scale after Q K^T.
/// `mask_dims` is the additive mask's shape, broadcast against the scores
/// [batch, heads, seq, seq].
fn eager_graph(scaling: Scaling, mask_dims: &[i64]) -> Model {
    let mut b = GraphBuilder::new("eager_attention");
    let x = b.input("x", DataType::Float, &[BATCH, SEQ, HIDDEN]);
    let mask = b.input("mask", DataType::Float, mask_dims);
    let heads = ints(&mut b, "heads_shape", &[BATCH, SEQ, HEADS, HEAD]);
    let merge = ints(&mut b, "merge_shape", &[BATCH, SEQ, HIDDEN]);
    let project = |b: &mut GraphBuilder, name: &str, perm: &[i64], k: usize| {
        let w = b.initializer_f32(&format!("w_{name}"), &[HIDDEN as usize, HIDDEN as usize], &values(64, 0.02 * k as f32));
        let bias = b.initializer_f32(&format!("b_{name}"), &[HIDDEN as usize], &values(8, 0.01 * k as f32));
        let mm = b.node("MatMul", &[&x, &w]);
        let add = b.node("Add", &[&bias, &mm]);
        let r = b.node("Reshape", &[&add, &heads]);
        transpose(b, &r, perm)
    };
    let q = project(&mut b, "q", &[0, 2, 1, 3], 1);
    let k = project(&mut b, "k", &[0, 2, 3, 1], 2);
    let v = project(&mut b, "v", &[0, 2, 1, 3], 3);
    let product = b.node("MatMul", &[&q, &k]);
    let scores = match scaling {
        Scaling::Mul => {
            let s = b.initializer_f32("scale", &[], &[(HEAD as f32).powf(-0.5)]);
            b.node("Mul", &[&product, &s])
        }
        Scaling::Div | Scaling::DivInverted => {
            let d = b.initializer_f32("sqrt_head_size", &[], &[(HEAD as f32).sqrt()]);
            let operands = if scaling == Scaling::Div { [&product, &d] } else { [&d, &product] };
            b.node("Div", &[operands[0], operands[1]])
        }
    };
    let merged = attend(&mut b, &scores, Some(&mask), &v);
    let y = b.node("Reshape", &[&merged, &merge]);
    b.output(&y, DataType::Float, &[BATCH, SEQ, HIDDEN]);
    b.into_model(17)
}

#[test]
fn attention_eager() {
    let r = assert_fires(&eager_graph(Scaling::Mul, &[BATCH, 1, SEQ, SEQ]), "attention-eager", "attention-eager");
    let attention = r.model.graph.nodes().find(|n| n.op_type == "Attention").unwrap();
    assert_eq!(attention.attr_float("scale"), Some(0.5));
    // a bias per head is ORT's attention_bias [batch, heads, seq, seq] as it is
    let per_head = fuse(&eager_graph(Scaling::Mul, &[BATCH, HEADS, SEQ, SEQ]), "ort");
    assert_eq!(fired(&per_head, "attention-eager"), 1, "{}", per_head.snapshot);
    assert!(per_head.comparison.passed(), "{:?}", per_head.comparison);
    // a 3-D mask broadcasts over the batch as [1, batch, seq, seq]: not attention_bias's layout
    assert_not_fused(&eager_graph(Scaling::Mul, &[BATCH, SEQ, SEQ]));
}

#[test]
fn attention_eager_div() {
    let r = assert_fires(&eager_graph(Scaling::Div, &[BATCH, 1, SEQ, SEQ]), "attention-eager", "attention-eager-div");
    let attention = r.model.graph.nodes().find(|n| n.op_type == "Attention").unwrap();
    assert_eq!(attention.attr_float("scale"), Some(0.5));
    assert_not_fused(&eager_graph(Scaling::DivInverted, &[BATCH, 1, SEQ, SEQ]));
}

/// ViT's SDPA attention (TorchScript): BERT's form without a mask; `cross`
/// takes K and V from a second input.
fn unmasked_sdpa_graph(cross: bool) -> Model {
    let mut b = GraphBuilder::new("vit_attention");
    let x = b.input("x", DataType::Float, &[BATCH, SEQ, HIDDEN]);
    let kv_input = if cross { b.input("memory", DataType::Float, &[BATCH, SEQ, HIDDEN]) } else { x.clone() };
    let heads = ints(&mut b, "heads_shape", &[BATCH, SEQ, HEADS, HEAD]);
    let merge = ints(&mut b, "merge_shape", &[BATCH, SEQ, HIDDEN]);
    let scale = sdpa_scale(&mut b);
    let project = |b: &mut GraphBuilder, name: &str, input: &str, perm: &[i64], k: usize| {
        let w = b.initializer_f32(&format!("w_{name}"), &[HIDDEN as usize, HIDDEN as usize], &values(64, 0.02 * k as f32));
        let bias = b.initializer_f32(&format!("b_{name}"), &[HIDDEN as usize], &values(8, 0.01 * k as f32));
        let mm = b.node("MatMul", &[input, &w]);
        let add = b.node("Add", &[&bias, &mm]);
        let r = b.node("Reshape", &[&add, &heads]);
        transpose(b, &r, perm)
    };
    let q = project(&mut b, "q", &x, &[0, 2, 1, 3], 1);
    let k = project(&mut b, "k", &kv_input, &[0, 2, 3, 1], 2);
    let v = project(&mut b, "v", &kv_input, &[0, 2, 1, 3], 3);
    let q = b.node("Mul", &[&q, &scale]);
    let k = b.node("Mul", &[&k, &scale]);
    let scores = b.node("MatMul", &[&q, &k]);
    let merged = attend(&mut b, &scores, None, &v);
    let y = b.node("Reshape", &[&merged, &merge]);
    b.output(&y, DataType::Float, &[BATCH, SEQ, HIDDEN]);
    b.into_model(17)
}

#[test]
fn attention_sdpa_unmasked() {
    let r = assert_fires(&unmasked_sdpa_graph(false), "attention-sdpa", "attention-sdpa-unmasked");
    let attention = r.model.graph.nodes().find(|n| n.op_type == "Attention").unwrap();
    assert_eq!(attention.inputs.len(), 3, "no mask: no attention_bias, no empty inputs after the bias");
    // K and V from another input: not one projection of x (multi-head-attention takes it)
    assert_not_by_rule(&unmasked_sdpa_graph(true), "attention-sdpa");
}

/// Whisper's encoder attention (TorchScript, eager): the query scaled by
/// head_size^-0.5 before the head split, a key projection without bias, no
/// scale on the product. With `vector_scale` the query's scale is a [hidden]
/// vector: no longer one number for the fused op.
fn whisper_graph(vector_scale: bool) -> Model {
    let mut b = GraphBuilder::new("whisper_attention");
    let x = b.input("x", DataType::Float, &[BATCH, SEQ, HIDDEN]);
    let heads = ints(&mut b, "heads_shape", &[BATCH, SEQ, HEADS, HEAD]);
    let merge = ints(&mut b, "merge_shape", &[BATCH, SEQ, HIDDEN]);
    let project = |b: &mut GraphBuilder, name: &str, bias: bool, k: usize| {
        let w = b.initializer_f32(&format!("w_{name}"), &[HIDDEN as usize, HIDDEN as usize], &values(64, 0.02 * k as f32));
        let mm = b.node("MatMul", &[&x, &w]);
        if !bias {
            return mm;
        }
        let bias = b.initializer_f32(&format!("b_{name}"), &[HIDDEN as usize], &values(8, 0.01 * k as f32));
        b.node("Add", &[&bias, &mm])
    };
    let q = project(&mut b, "q", true, 1);
    let scaling = if vector_scale {
        b.initializer_f32("scaling", &[HIDDEN as usize], &values(8, 0.05))
    } else {
        b.initializer_f32("scaling", &[], &[(HEAD as f32).powf(-0.5)])
    };
    let q = b.node("Mul", &[&q, &scaling]);
    let k = project(&mut b, "k", false, 2);
    let v = project(&mut b, "v", true, 3);
    let split = |b: &mut GraphBuilder, t: &str, perm: &[i64]| {
        let r = b.node("Reshape", &[t, &heads]);
        transpose(b, &r, perm)
    };
    let (q, k, v) = (split(&mut b, &q, &[0, 2, 1, 3]), split(&mut b, &k, &[0, 2, 3, 1]), split(&mut b, &v, &[0, 2, 1, 3]));
    let scores = b.node("MatMul", &[&q, &k]);
    let merged = attend(&mut b, &scores, None, &v);
    let y = b.node("Reshape", &[&merged, &merge]);
    b.output(&y, DataType::Float, &[BATCH, SEQ, HIDDEN]);
    b.into_model(17)
}

#[test]
fn multi_head_attention_takes_any_projections() {
    let r = assert_fires(&whisper_graph(false), "multi-head-attention", "multi-head-attention-whisper");
    let mha = r.model.graph.nodes().find(|n| n.op_type == "MultiHeadAttention").unwrap();
    assert_eq!(mha.attr_float("scale"), Some(1.0), "the query's own scale stays on q");
    assert_eq!(count(&r.model, "Softmax"), 0);
    // cross attention: keys and values from another input
    let r = assert_fires(&unmasked_sdpa_graph(true), "multi-head-attention", "multi-head-attention-cross");
    let mha = r.model.graph.nodes().find(|n| n.op_type == "MultiHeadAttention").unwrap();
    assert_ne!(mha.inputs[0], mha.inputs[1], "q from x, k from memory");
    // a per-channel query scale is part of the tensor q; a product scaled by a
    // vector is not one number for the fused op
    let mut eager = eager_graph(Scaling::Mul, &[BATCH, 1, SEQ, SEQ]);
    let scale = eager.graph.initializers.iter_mut().find(|t| t.name == "scale").unwrap();
    *scale = onnxopt::ir::Tensor::from_f32("scale", &ndarray::ArrayD::from_elem(ndarray::IxDyn(&[SEQ as usize]), 0.5));
    assert_not_fused(&eager);
    let r = fuse(&whisper_graph(true), "ort");
    assert_eq!(fired(&r, "multi-head-attention"), 1, "{}", r.snapshot);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
}

/// Reshape(Transpose[0 2 1 3](softmax(s) v), target): attention's context with
/// its heads merged by `target`.
fn merged_heads_graph(target: &[i64]) -> Model {
    let mut b = GraphBuilder::new("merged_heads");
    let s = b.input("s", DataType::Float, &[BATCH, HEADS, SEQ, SEQ]);
    let v = b.input("v", DataType::Float, &[BATCH, HEADS, SEQ, HEAD]);
    let merged = attend(&mut b, &s, None, &v);
    let target_tensor = ints(&mut b, "target", target);
    let y = b.node("Reshape", &[&merged, &target_tensor]);
    let out: Vec<i64> = if target.len() == 2 { vec![BATCH * SEQ, HIDDEN] } else { vec![BATCH, SEQ, HIDDEN] };
    b.output(&y, DataType::Float, &out);
    b.into_model(18)
}

#[test]
fn merge_heads_before_flatten() {
    let r = assert_fires(&merged_heads_graph(&[-1, HIDDEN]), "merge-heads-before-flatten", "merge-heads-before-flatten");
    assert_eq!(count(&r.model, "Reshape"), 2);
    // merged into [batch, seq, hidden] already: nothing to do
    let r = fuse(&merged_heads_graph(&[BATCH, SEQ, HIDDEN]), "ort");
    assert_eq!(r.patches(), 0, "{}", r.snapshot);
}

/// The committed fixtures through the whole ORT pipeline: every attention block
/// fused by the expected rule, no Softmax left, and tract agrees.
#[test]
fn fixtures_fuse_every_attention_block() {
    let cases = [("gpt2.dynamo.onnx", "attention-packed-qkv"), ("bert-eager.ts.onnx", "attention-eager"), ("vit.ts.onnx", "attention-sdpa")];
    for (file, rule) in cases {
        let model = onnx::load(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let passes = optimization_passes(Target::Ort, &Default::default());
        let r = rewrite_and_compare(&model, &passes, &VerifyOptions::default());
        assert_eq!(count(&r.model, "Attention"), 2, "{file}: 2 layers");
        assert_eq!(fired(&r, rule), 2, "{file}: {rule}");
        assert_eq!(count(&r.model, "Softmax"), 0, "{file}");
        assert!(r.comparison.passed(), "{file}: {:?}", r.comparison);
    }
}

/// GPT-2's TorchScript export fills its causal mask with -inf and guards the
/// softmax against the NaN of a fully masked row (a left-padded position): the
/// fused kernel has no such guard, so that attention is left unfused.
#[test]
fn gpt2_torchscript_keeps_its_guarded_attention() {
    let model = onnx::load(&fixture("gpt2.ts.onnx")).unwrap();
    let passes = optimization_passes(Target::Ort, &Default::default());
    let r = rewrite_and_compare(&model, &passes, &VerifyOptions::default());
    assert_eq!(count(&r.model, "Attention"), 0);
    assert_eq!(count(&r.model, "Softmax"), 2);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
}

const PAST: i64 = 3;

/// One GPT-2 attention step over a KV cache, as Optimum exports it: q, k, v
/// projections [B, 1, N*H] split into heads, k and v appended to the past
/// [B, N, P, H] (the presents), softmax(q k^T * s + mask) v, heads merged.
/// With `new_first`, the new rows come before the past: not a cache.
fn cached_attention_graph(new_first: bool) -> Model {
    let (new, total) = (1, PAST + 1);
    let mut b = GraphBuilder::new("cached_mha");
    let q = b.input("q", DataType::Float, &[BATCH, new, HIDDEN]);
    let k = b.input("k", DataType::Float, &[BATCH, new, HIDDEN]);
    let v = b.input("v", DataType::Float, &[BATCH, new, HIDDEN]);
    let past_k = b.input("past_key", DataType::Float, &[BATCH, HEADS, PAST, HEAD]);
    let past_v = b.input("past_value", DataType::Float, &[BATCH, HEADS, PAST, HEAD]);
    let mask = b.input("mask", DataType::Float, &[BATCH, 1, new, total]);
    let split = ints(&mut b, "split", &[BATCH, new, HEADS, HEAD]);
    let merged = ints(&mut b, "merged", &[BATCH, new, HIDDEN]);
    let scale = b.initializer_f32("scale", &[], &[0.5]);
    let heads = |b: &mut GraphBuilder, x: &str| {
        let r = b.node("Reshape", &[x, &split]);
        transpose(b, &r, &[0, 2, 1, 3])
    };
    let (q, k, v) = (heads(&mut b, &q), heads(&mut b, &k), heads(&mut b, &v));
    let join = |b: &mut GraphBuilder, past: &str, new: &str| {
        let parts = if new_first { [new, past] } else { [past, new] };
        b.node_with("Concat", &parts, vec![("axis", AttrValue::Int(-2))])
    };
    let present_k = join(&mut b, &past_k, &k);
    let present_v = join(&mut b, &past_v, &v);
    let k_t = transpose(&mut b, &present_k, &[0, 1, 3, 2]);
    let qs = b.node("Mul", &[&q, &scale]);
    let ks = b.node("Mul", &[&k_t, &scale]);
    let scores = b.node("MatMul", &[&qs, &ks]);
    let masked = b.node("Add", &[&scores, &mask]);
    let p = b.node_with("Softmax", &[&masked], vec![("axis", AttrValue::Int(-1))]);
    let context = b.node("MatMul", &[&p, &present_v]);
    let context = transpose(&mut b, &context, &[0, 2, 1, 3]);
    let y = b.node("Reshape", &[&context, &merged]);
    b.output(&y, DataType::Float, &[BATCH, new, HIDDEN]);
    b.output(&present_k, DataType::Float, &[BATCH, HEADS, total, HEAD]);
    b.output(&present_v, DataType::Float, &[BATCH, HEADS, total, HEAD]);
    b.into_model(17)
}

/// A decode step over a KV cache becomes MultiHeadAttention with past_key and
/// past_value (its presents the outputs), checked in tract (lowered); the
/// cache joined the wrong way round is left alone.
#[test]
fn multi_head_attention_with_past() {
    let r = assert_fires(&cached_attention_graph(false), "multi-head-attention-with-past", "multi-head-attention-with-past");
    let mha = r.model.graph.nodes().find(|n| n.op_type == "MultiHeadAttention").expect("fused");
    assert_eq!((mha.attr_int("num_heads"), mha.outputs.len()), (Some(HEADS), 3));
    assert_eq!(count(&r.model, "Softmax"), 0);
    let r = fuse(&cached_attention_graph(true), "ort");
    assert_eq!(fired(&r, "multi-head-attention-with-past"), 0, "{}", r.snapshot);
}

/// Optimum's KV-cache GPT-2 through the ORT pipeline: both layers' attention
/// over the cache fused, verified over a prefill and two decode steps.
#[test]
fn gpt2_kv_cache_pipeline() {
    let model = onnx::load(&fixture("gpt2-kv.optimum.onnx")).unwrap();
    let passes = optimization_passes(Target::Ort, &Default::default());
    let r = rewrite_and_compare(&model, &passes, &VerifyOptions::default());
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    assert!(r.comparison.outputs.iter().any(|o| o.name.contains("decode 2")), "{:?}", r.comparison);
    assert_eq!((count(&r.model, "MultiHeadAttention"), count(&r.model, "Softmax")), (2, 0), "{}", r.model);
}
