//! The rules of `passes/llama.rules`: per rule, a small graph in the form the
//! exporters write, where it must fire (snapshot of before/after, numbers
//! checked in tract after lowering contrib ops), and a near miss where it must
//! not; then the whole pipeline on both Llama fixtures.

mod common;

use common::fusion::{assert_silent, count, fired, fuse};
use onnxopt::ir::{AttrValue, DataType, GraphBuilder, Model, Tensor};
use onnxopt::passes::check::{rewrite_and_compare, Rewritten};
use onnxopt::passes::pipeline::{optimization_passes, Target};
use onnxopt::verify::VerifyOptions;

const BATCH: i64 = 2;
const SEQ: i64 = 5;
const HEADS: i64 = 4;
const KV_HEADS: i64 = 2;
const HEAD: i64 = 8;
const HIDDEN: i64 = HEADS * HEAD;

/// Asserts the rule fired once, the numbers agree, and snapshots the rewrite.
fn assert_fires(model: &Model, target: &str, rule: &str) -> Rewritten {
    let r = fuse(model, target);
    assert_eq!(fired(&r, rule), 1, "{rule} should fire once:\n{}", r.snapshot);
    assert!(r.comparison.passed(), "{rule}: {:?}", r.comparison);
    insta::assert_snapshot!(format!("fuse__{rule}"), r.snapshot);
    r
}

fn values(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * scale).collect()
}

fn ints(b: &mut GraphBuilder, name: &str, v: &[i64]) -> String {
    b.initializer_i64(name, &[v.len() as i64], v)
}

fn perm(p: &[i64]) -> Vec<(&'static str, AttrValue)> {
    vec![("perm", AttrValue::Ints(p.to_vec()))]
}

/// How an exporter writes RMSNorm.
#[derive(Clone, Copy)]
enum Export {
    /// TorchScript, opset 17: ReduceMean's axes an attribute, rsqrt as Div(1, Sqrt).
    TorchScript,
    /// dynamo, opset 18: ReduceMean's axes an input, rsqrt as Reciprocal(Sqrt).
    Dynamo,
}

/// gamma * (x * rsqrt(mean(x^2, axis) + 1e-6)) on `x`.
fn rms_norm(b: &mut GraphBuilder, x: &str, export: Export, axis: i64) -> String {
    let two = b.initializer_f32("two", &[], &[2.0]);
    let eps = b.initializer_f32("eps", &[], &[1e-6]);
    let gamma = b.initializer_f32("gamma", &[HIDDEN as usize], &values(HIDDEN as usize, 0.1));
    let square = b.node("Pow", &[x, &two]);
    let mean = match export {
        Export::TorchScript => b.node_with("ReduceMean", &[&square], vec![("axes", AttrValue::Ints(vec![axis]))]),
        Export::Dynamo => {
            let axes = ints(b, "axes", &[axis]);
            b.node("ReduceMean", &[&square, &axes])
        }
    };
    let shifted = b.node("Add", &[&mean, &eps]);
    let rms = b.node("Sqrt", &[&shifted]);
    let inverse = match export {
        Export::TorchScript => {
            let one = b.initializer_f32("one", &[], &[1.0]);
            b.node("Div", &[&one, &rms])
        }
        Export::Dynamo => b.node("Reciprocal", &[&rms]),
    };
    let normalized = b.node("Mul", &[x, &inverse]);
    b.node("Mul", &[&gamma, &normalized])
}

fn rms_norm_graph(export: Export, opset: i64, axis: i64) -> Model {
    let mut b = GraphBuilder::new("rms_norm");
    let x = b.input("x", DataType::Float, &[BATCH, SEQ, HIDDEN]);
    let y = rms_norm(&mut b, &x, export, axis);
    b.output(&y, DataType::Float, &[BATCH, SEQ, HIDDEN]);
    b.into_model(opset)
}

#[test]
fn rsqrt_as_reciprocal() {
    let r = assert_fires(&rms_norm_graph(Export::TorchScript, 17, -1), "ort", "rsqrt-as-reciprocal");
    assert_eq!(fired(&r, "rms-norm"), 1, "the RMSNorm it prepares fuses next");
    // 2 / sqrt(v) is not a reciprocal square root
    let mut m = rms_norm_graph(Export::TorchScript, 17, -1);
    let one = m.graph.initializers.iter_mut().find(|t| t.name == "one").unwrap();
    *one = Tensor::from_f32("one", &ndarray::arr0(2.0f32).into_dyn());
    assert_silent(&m, "ort");
}

#[test]
fn rms_norm_fuses() {
    let r = assert_fires(&rms_norm_graph(Export::Dynamo, 18, -1), "ort", "rms-norm");
    let norm = r.model.graph.nodes().next().unwrap();
    assert_eq!((norm.op_type.as_str(), norm.domain.as_str()), ("SimplifiedLayerNormalization", ""), "ORT knows it in the default domain only");
    assert_eq!(norm.attr_float("epsilon"), Some(1e-6));
    // the mean over the sequence axis is not a norm over the hidden axis
    assert_silent(&rms_norm_graph(Export::Dynamo, 18, 1), "ort");
    // below opset 23 the portable target has no RMS norm op
    assert_silent(&rms_norm_graph(Export::Dynamo, 18, -1), "portable");
}

#[test]
fn rms_norm_portable_opset_23() {
    let r = fuse(&rms_norm_graph(Export::Dynamo, 23, -1), "portable");
    assert_eq!(fired(&r, "rms-norm"), 1, "{}", r.snapshot);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    assert_eq!(count(&r.model, "RMSNormalization"), 1);
}

/// RMSNorm(h + residual), the sum also read by the next residual Add, as
/// decoder blocks write it; `skip_shape` may broadcast.
fn skip_rms_norm_graph(skip_shape: &[i64]) -> Model {
    let mut b = GraphBuilder::new("skip_rms_norm");
    let x = b.input("x", DataType::Float, &[BATCH, SEQ, HIDDEN]);
    let residual = b.input("residual", DataType::Float, skip_shape);
    let w = b.initializer_f32("w", &[HIDDEN as usize, HIDDEN as usize], &values((HIDDEN * HIDDEN) as usize, 0.01));
    let h = b.node("MatMul", &[&x, &w]);
    let sum = b.node("Add", &[&residual, &h]);
    let y = rms_norm(&mut b, &sum, Export::Dynamo, -1);
    let next = b.node("Add", &[&sum, &y]);
    b.output(&next, DataType::Float, &[BATCH, SEQ, HIDDEN]);
    b.into_model(18)
}

#[test]
fn skip_rms_norm() {
    let r = assert_fires(&skip_rms_norm_graph(&[BATCH, SEQ, HIDDEN]), "ort", "skip-rms-norm");
    let skip = r.model.graph.nodes().find(|n| n.op_type == "SkipSimplifiedLayerNormalization").unwrap();
    assert_eq!(skip.outputs[1..3], ["", ""], "mean and inv_std_var are left out");
    assert!(r.model.graph.nodes().any(|n| n.op_type == "Add" && n.inputs.contains(&skip.outputs[3])), "output 3 feeds the next Add");
    // a residual broadcast over the batch: the RMS norm fuses, the Add stays
    let r = fuse(&skip_rms_norm_graph(&[1, SEQ, HIDDEN]), "ort");
    assert_eq!((fired(&r, "rms-norm"), fired(&r, "skip-rms-norm")), (1, 0), "{}", r.snapshot);
}

#[test]
fn output_of_a_match_needs_a_label_in_the_pattern() {
    use onnxopt::rewrite::{rule::parse_rules, Registry};
    let registry = Registry::standard();
    let text = "# c\n(rule a (Relu (Add@sum ?x ?y)) :ort (Relu ?x :output1 @other))";
    let err = parse_rules("t.rules", text, &registry).unwrap_err();
    assert!(err.to_string().contains("@other is written by the template but the pattern never labels it"), "{err}");
    let text = "# c\n(rule a (Relu (Add@sum ?x ?y)) :ort (Relu ?x :output1 @sum) :portable (Relu ?x))";
    let err = parse_rules("t.rules", text, &registry).unwrap_err();
    assert!(err.to_string().contains("must write the same @labels"), "{err}");
}

/// Llama's rotary embedding of q = heads(x), as both exporters write it:
/// cos, sin = Cos, Sin(Concat(f, f)) of f = positions * inv_freq, then q * cos +
/// rotate_half(q) * sin. With `equal_halves` false the table's second half is
/// Concat(f, 2f)'s: not a rotary table. `rows` of position ids: 1 (the tables
/// broadcast over the batch) or BATCH (a decoder's per-sequence positions).
fn rotary_graph(equal_halves: bool, rows: i64) -> Model {
    let mut b = GraphBuilder::new("rotary");
    let x = b.input("x", DataType::Float, &[BATCH, SEQ, HIDDEN]);
    let positions = b.input("position_ids", DataType::Int64, &[rows, SEQ]);
    let half = HEAD / 2;
    let inv_freq: Vec<f32> = (0..half).map(|i| 10000f32.powf(-2.0 * i as f32 / HEAD as f32)).collect();
    let inv_freq = b.initializer_f32("inv_freq", &[half as usize], &inv_freq);
    let axis_2 = ints(&mut b, "axis_2", &[2]);
    let axis_1 = ints(&mut b, "axis_1", &[1]);
    let p = b.node("Unsqueeze", &[&positions, &axis_2]);
    let p = b.node_with("Cast", &[&p], vec![("to", AttrValue::Int(1))]);
    let freqs = b.node("Mul", &[&p, &inv_freq]);
    let second = if equal_halves {
        freqs.clone()
    } else {
        let two = b.initializer_f32("two", &[], &[2.0]);
        b.node("Mul", &[&freqs, &two])
    };
    let emb = b.node_with("Concat", &[&freqs, &second], vec![("axis", AttrValue::Int(-1))]);
    let attention_scaling = b.initializer_f32("attention_scaling", &[], &[1.0]);
    let cos = b.node("Cos", &[&emb]);
    let cos = b.node("Mul", &[&cos, &attention_scaling]);
    let cos = b.node("Unsqueeze", &[&cos, &axis_1]);
    let sin = b.node("Sin", &[&emb]);
    let sin = b.node("Mul", &[&sin, &attention_scaling]);
    let sin = b.node("Unsqueeze", &[&sin, &axis_1]);
    let split = ints(&mut b, "split", &[BATCH, SEQ, HEADS, HEAD]);
    let q = b.node("Reshape", &[&x, &split]);
    let q = b.node_with("Transpose", &[&q], perm(&[0, 2, 1, 3]));
    let (zero, middle, end, last, one) =
        (ints(&mut b, "zero", &[0]), ints(&mut b, "middle", &[half]), ints(&mut b, "end", &[i64::MAX]), ints(&mut b, "last", &[3]), ints(&mut b, "one", &[1]));
    let q_cos = b.node("Mul", &[&q, &cos]);
    let q1 = b.node("Slice", &[&q, &zero, &middle, &last, &one]);
    let q2 = b.node("Slice", &[&q, &middle, &end, &last, &one]);
    let minus_q2 = b.node("Neg", &[&q2]);
    let rotated = b.node_with("Concat", &[&minus_q2, &q1], vec![("axis", AttrValue::Int(-1))]);
    let rotated_sin = b.node("Mul", &[&rotated, &sin]);
    let y = b.node("Add", &[&q_cos, &rotated_sin]);
    b.output(&y, DataType::Float, &[BATCH, HEADS, SEQ, HEAD]);
    b.into_model(17)
}

#[test]
fn rotary_embedding() {
    let r = assert_fires(&rotary_graph(true, 1), "ort", "rotary-embedding");
    let rotary = r.model.graph.nodes().find(|n| n.op_type == "RotaryEmbedding").unwrap();
    assert_eq!((rotary.domain.as_str(), rotary.attr_int("num_heads")), ("com.microsoft", Some(HEADS)));
    assert_silent(&rotary_graph(false, 1), "ort");
}

/// Tables of one row per sequence (position_ids [B, S]) become a cache of B*S
/// rows that each token reads at its own index.
#[test]
fn rotary_embedding_per_row() {
    let r = assert_fires(&rotary_graph(true, BATCH), "ort", "rotary-embedding-per-row");
    assert_eq!(fired(&r, "rotary-embedding"), 0);
    assert_eq!(count(&r.model, "RotaryEmbedding"), 1);
    assert_silent(&rotary_graph(false, BATCH), "ort");
}

/// Llama SDPA attention with K/V heads repeated for GQA (TorchScript form,
/// static shapes): q [B,S,N*H], k, v [B,S,KV*H], additive mask [B,1,S,S].
/// `group_axis` is where K/V get their repeat axis (2: torch's repeat_kv).
fn attention_graph(group_axis: i64) -> Model {
    let group = HEADS / KV_HEADS;
    let mut b = GraphBuilder::new("attention");
    let q = b.input("q", DataType::Float, &[BATCH, SEQ, HIDDEN]);
    let k = b.input("k", DataType::Float, &[BATCH, SEQ, KV_HEADS * HEAD]);
    let v = b.input("v", DataType::Float, &[BATCH, SEQ, KV_HEADS * HEAD]);
    let mask = b.input("mask", DataType::Float, &[BATCH, 1, SEQ, SEQ]);
    let q_split = ints(&mut b, "q_split", &[BATCH, SEQ, HEADS, HEAD]);
    let kv_split = ints(&mut b, "kv_split", &[BATCH, SEQ, KV_HEADS, HEAD]);
    let axis = ints(&mut b, "group_axis", &[group_axis]);
    let expanded: Vec<i64> = if group_axis == 2 { vec![BATCH, KV_HEADS, group, SEQ, HEAD] } else { vec![BATCH, KV_HEADS, SEQ, group, HEAD] };
    let expanded = ints(&mut b, "expanded", &expanded);
    let repeated = ints(&mut b, "repeated", &[BATCH, HEADS, SEQ, HEAD]);
    let merged = ints(&mut b, "merged", &[BATCH, SEQ, HIDDEN]);
    let scale = b.initializer_f32("scale", &[], &[(HEAD as f32).powf(-0.25)]);
    let heads = |b: &mut GraphBuilder, x: &str, split: &str| {
        let r = b.node("Reshape", &[x, split]);
        b.node_with("Transpose", &[&r], perm(&[0, 2, 1, 3]))
    };
    let repeat = |b: &mut GraphBuilder, x: &str| {
        let u = b.node("Unsqueeze", &[x, &axis]);
        let e = b.node("Expand", &[&u, &expanded]);
        b.node("Reshape", &[&e, &repeated])
    };
    let q = heads(&mut b, &q, &q_split);
    let k = heads(&mut b, &k, &kv_split);
    let v = heads(&mut b, &v, &kv_split);
    let k = repeat(&mut b, &k);
    let v = repeat(&mut b, &v);
    let k_t = b.node_with("Transpose", &[&k], perm(&[0, 1, 3, 2]));
    let qs = b.node("Mul", &[&q, &scale]);
    let ks = b.node("Mul", &[&k_t, &scale]);
    let scores = b.node("MatMul", &[&qs, &ks]);
    let masked = b.node("Add", &[&scores, &mask]);
    let p = b.node_with("Softmax", &[&masked], vec![("axis", AttrValue::Int(-1))]);
    let context = b.node("MatMul", &[&p, &v]);
    let context = b.node_with("Transpose", &[&context], perm(&[0, 2, 1, 3]));
    let y = b.node("Reshape", &[&context, &merged]);
    b.output(&y, DataType::Float, &[BATCH, SEQ, HIDDEN]);
    b.into_model(17)
}

#[test]
fn repeated_kv_attention() {
    let r = assert_fires(&attention_graph(2), "ort", "repeated-kv-attention");
    let attention = r.model.graph.nodes().find(|n| n.op_type == "MultiHeadAttention").unwrap();
    assert_eq!(attention.attr_int("num_heads"), Some(HEADS));
    // an axis inserted after the sequence axis interleaves positions, not heads
    assert_silent(&attention_graph(3), "ort");
}

/// The whole ORT pipeline on a Llama fixture: every block fused, and the result
/// agrees with the original in tract.
/// `attentions`: the TorchScript export fills its causal mask with -inf and
/// guards softmax against a fully masked (left-padded) row; the fused kernel has
/// no guard, so that attention stays unfused (see `softmax-nan-guard`).
fn assert_llama_fuses(file: &str, attentions: usize) {
    let model = onnxopt::onnx::load(&common::fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let passes = optimization_passes(Target::Ort, &Default::default());
    let r = rewrite_and_compare(&model, &passes, &VerifyOptions::default());
    assert!(r.comparison.passed(), "{file}: {:?}", r.comparison);
    let counts: Vec<(&str, usize)> = ["SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding", "MultiHeadAttention"]
        .into_iter()
        .map(|op| (op, count(&r.model, op)))
        .collect();
    // 2 layers: input norm of layer 0; the post-attention norms, layer 1's input
    // norm and the final norm follow a residual Add; q and k rotated per layer
    assert_eq!(
        counts,
        [("SimplifiedLayerNormalization", 1), ("SkipSimplifiedLayerNormalization", 4), ("RotaryEmbedding", 4), ("MultiHeadAttention", attentions)],
        "{file}"
    );
    for op in ["Pow", "ReduceMean", "Neg"] {
        assert_eq!(count(&r.model, op), 0, "{file}: a {op} is left");
    }
    assert_eq!(count(&r.model, "Softmax"), 2 - attentions, "{file}");
}

#[test]
fn llama_torchscript_pipeline() {
    assert_llama_fuses("llama.ts.onnx", 0);
}

#[test]
fn llama_dynamo_pipeline() {
    assert_llama_fuses("llama.dynamo.onnx", 2);
}

const PAST: i64 = 4;

/// One attention step of a Llama decoder with a KV cache, as Optimum exports it:
/// the new K/V heads appended to the past ones (the present outputs), repeated
/// for GQA, softmax(q k^T * scale + mask) v. q [B, N, S, H] and k [B, KV, S, H]
/// are rotated heads, v the projection [B, S, KV*H]; the mask [B, 1, S, P+S] is
/// additive. With `past_first` false the cache is joined the wrong way round
/// (new rows before the past): not a cache GroupQueryAttention writes.
fn cached_attention_graph(new: i64, past_first: bool) -> Model {
    cached_attention_graph_with(new, past_first, false)
}

/// With `guarded`, the mask is Where(keep, 0, -inf) of a bool input `keep`
/// and softmax sits in a NaN guard (how SDPA exports write it).
fn cached_attention_graph_with(new: i64, past_first: bool, guarded: bool) -> Model {
    let (group, total) = (HEADS / KV_HEADS, PAST + new);
    let mut b = GraphBuilder::new("cached_attention");
    let q = b.input("q", DataType::Float, &[BATCH, HEADS, new, HEAD]);
    let k = b.input("k", DataType::Float, &[BATCH, KV_HEADS, new, HEAD]);
    let v = b.input("v", DataType::Float, &[BATCH, new, KV_HEADS * HEAD]);
    let past_k = b.input("past_key", DataType::Float, &[BATCH, KV_HEADS, PAST, HEAD]);
    let past_v = b.input("past_value", DataType::Float, &[BATCH, KV_HEADS, PAST, HEAD]);
    let mask = if guarded {
        let keep = b.input("keep", DataType::Bool, &[BATCH, 1, new, total]);
        let zero = b.initializer_f32("zero", &[], &[0.0]);
        let minus_inf = b.initializer_f32("minus_inf", &[], &[f32::NEG_INFINITY]);
        b.node("Where", &[&keep, &zero, &minus_inf])
    } else {
        b.input("mask", DataType::Float, &[BATCH, 1, new, total])
    };
    let kv_split = ints(&mut b, "kv_split", &[BATCH, new, KV_HEADS, HEAD]);
    let axis = ints(&mut b, "group_axis", &[2]);
    let expanded = ints(&mut b, "expanded", &[BATCH, KV_HEADS, group, total, HEAD]);
    let repeated = ints(&mut b, "repeated", &[BATCH, HEADS, total, HEAD]);
    let merged = ints(&mut b, "merged", &[BATCH, new, HIDDEN]);
    let scale = b.initializer_f32("scale", &[], &[(HEAD as f32).powf(-0.25)]);
    let v = b.node("Reshape", &[&v, &kv_split]);
    let v = b.node_with("Transpose", &[&v], perm(&[0, 2, 1, 3]));
    let join = |b: &mut GraphBuilder, past: &str, new: &str| {
        let parts = if past_first { [past, new] } else { [new, past] };
        b.node_with("Concat", &parts, vec![("axis", AttrValue::Int(-2))])
    };
    let present_k = join(&mut b, &past_k, &k);
    let present_v = join(&mut b, &past_v, &v);
    let repeat = |b: &mut GraphBuilder, x: &str| {
        let u = b.node("Unsqueeze", &[x, &axis]);
        let e = b.node("Expand", &[&u, &expanded]);
        b.node("Reshape", &[&e, &repeated])
    };
    let k_all = repeat(&mut b, &present_k);
    let v_all = repeat(&mut b, &present_v);
    let k_t = b.node_with("Transpose", &[&k_all], perm(&[0, 1, 3, 2]));
    let qs = b.node("Mul", &[&q, &scale]);
    let ks = b.node("Mul", &[&k_t, &scale]);
    let scores = b.node("MatMul", &[&qs, &ks]);
    let masked = b.node("Add", &[&scores, &mask]);
    let mut p = b.node_with("Softmax", &[&masked], vec![("axis", AttrValue::Int(-1))]);
    if guarded {
        let nan = b.node("IsNaN", &[&p]);
        let zero = b.initializer_f32("prob_zero", &[], &[0.0]);
        p = b.node("Where", &[&nan, &zero, &p]);
    }
    let context = b.node("MatMul", &[&p, &v_all]);
    let context = b.node_with("Transpose", &[&context], perm(&[0, 2, 1, 3]));
    let y = b.node("Reshape", &[&context, &merged]);
    b.output(&y, DataType::Float, &[BATCH, new, HIDDEN]);
    b.output(&present_k, DataType::Float, &[BATCH, KV_HEADS, total, HEAD]);
    b.output(&present_v, DataType::Float, &[BATCH, KV_HEADS, total, HEAD]);
    b.into_model(17)
}

/// Inputs of one decoder step of `new` tokens after PAST: the mask is causal
/// (query i at position PAST + i sees keys up to it) and left-pads the second
/// row by 2, whose query rows all see a key (`new` = 1: the decode step).
fn cached_attention_inputs(new: i64) -> Vec<onnxopt::verify::NamedInput> {
    use onnxopt::verify::NamedInput;
    let total = PAST + new;
    let random = |name: &str, shape: &[i64], seed: usize| {
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|i| (((i + seed) * 7919 % 1009) as f32 / 1009.0 - 0.5) * 2.0).collect();
        NamedInput { name: name.into(), value: ndarray::ArrayD::from_shape_vec(shape, values).unwrap().into() }
    };
    let mut mask = Vec::new();
    for row in 0..BATCH {
        let pad = if row == 1 { 2 } else { 0 };
        for i in 0..new {
            mask.extend((0..total).map(|j| if j <= PAST + i && j >= pad { 0.0 } else { f32::MIN }));
        }
    }
    let mask = ndarray::ArrayD::from_shape_vec(vec![BATCH as usize, 1, new as usize, total as usize], mask).unwrap();
    vec![
        random("q", &[BATCH, HEADS, new, HEAD], 1),
        random("k", &[BATCH, KV_HEADS, new, HEAD], 2),
        random("v", &[BATCH, new, KV_HEADS * HEAD], 3),
        random("past_key", &[BATCH, KV_HEADS, PAST, HEAD], 4),
        random("past_value", &[BATCH, KV_HEADS, PAST, HEAD], 5),
        NamedInput { name: "mask".into(), value: mask.into() },
    ]
}

/// A decode step over a KV cache becomes GroupQueryAttention, checked in tract
/// (lowered) and, where ONNX Runtime is installed, by ORT's own kernel; the cache
/// joined the wrong way round is left alone.
#[test]
fn grouped_query_attention_with_past() {
    use onnxopt::verify::Engine;
    let model = cached_attention_graph(1, true);
    let passes: Vec<Box<dyn onnxopt::passes::Pass>> = vec![Box::new(onnxopt::passes::fuse::Fuse::new("ort", None))];
    let options = VerifyOptions { atol: 1e-5, rtol: 1e-4, inputs: Some(cached_attention_inputs(1)), ..Default::default() };
    let r = rewrite_and_compare(&model, &passes, &options);
    assert_eq!(fired(&r, "grouped-query-attention-with-past"), 1, "{}", r.snapshot);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    let gqa = r.model.graph.nodes().find(|n| n.op_type == "GroupQueryAttention").expect("fused");
    assert_eq!((gqa.attr_int("num_heads"), gqa.attr_int("kv_num_heads")), (Some(HEADS), Some(KV_HEADS)));
    assert_eq!(count(&r.model, "Softmax"), 0);
    insta::assert_snapshot!("fuse__grouped-query-attention-with-past", r.snapshot);
    match onnxopt::verify::onnx_runtime::available() {
        Ok(()) => {
            let ort = VerifyOptions { engine: Engine::Ort, ..options };
            let c = onnxopt::passes::verify_rewrite(&model, &r.model, &ort).unwrap();
            assert_eq!(c.engine, Engine::Ort);
            assert!(c.passed(), "ORT's GroupQueryAttention: {c:?}");
        }
        Err(why) => eprintln!("skipping the ONNX Runtime check: {why}"),
    }
    assert_silent(&cached_attention_graph(1, false), "ort");
}

/// The whole ORT pipeline on Optimum's KV-cache Llama export: attention over
/// the cache becomes GroupQueryAttention in both layers, rotary (tables per
/// token, from position_ids) RotaryEmbedding, and the result agrees with the
/// export over a prefill and two decode steps (left padding included) in tract.
#[test]
fn llama_kv_cache_pipeline() {
    let model = onnxopt::onnx::load(&common::fixture("llama-kv.optimum.onnx")).unwrap();
    let passes = optimization_passes(Target::Ort, &Default::default());
    let r = rewrite_and_compare(&model, &passes, &VerifyOptions::default());
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    assert!(r.comparison.outputs.iter().any(|o| o.name.contains("decode 2")), "{:?}", r.comparison);
    let counts: Vec<(&str, usize)> =
        ["GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization", "Softmax"].into_iter().map(|op| (op, count(&r.model, op))).collect();
    assert_eq!(counts, [("GroupQueryAttention", 2), ("RotaryEmbedding", 4), ("SkipSimplifiedLayerNormalization", 4), ("Softmax", 0)], "{}", r.model);
    // the K/V head repeat is gone: nothing reads the presents but the outputs
    for present in ["present.0.key", "present.0.value", "present.1.key", "present.1.value"] {
        assert!(r.model.graph.uses(present).is_empty(), "{present} is still read");
    }
    // a drop-in file: the export's inputs and outputs, names and order
    let names =
        |m: &Model| (m.graph.inputs.iter().map(|i| i.name.clone()).collect::<Vec<_>>(), m.graph.outputs.iter().map(|o| o.name.clone()).collect::<Vec<_>>());
    assert_eq!(names(&r.model), names(&model));
}

/// SDPA's form: a -inf mask and a NaN guard around softmax. Over a cache the
/// fill becomes the lowest finite float (rows that see a key are unchanged)
/// and the guard goes, so that GroupQueryAttention fuses; the padded row's
/// queries all see a key here, so the outputs agree everywhere.
#[test]
fn finite_mask_over_cache() {
    use onnxopt::verify::NamedInput;
    let model = cached_attention_graph_with(1, true, true);
    let mut inputs: Vec<NamedInput> = cached_attention_inputs(1).into_iter().filter(|i| i.name != "mask").collect();
    let keep: Vec<bool> = (0..BATCH).flat_map(|row| (0..PAST + 1).map(move |j| row == 0 || j >= 2)).collect();
    let keep = ndarray::ArrayD::from_shape_vec(vec![BATCH as usize, 1, 1, (PAST + 1) as usize], keep).unwrap();
    inputs.push(NamedInput { name: "keep".into(), value: keep.into() });
    let passes: Vec<Box<dyn onnxopt::passes::Pass>> = vec![Box::new(onnxopt::passes::fuse::Fuse::new("ort", None))];
    let options = VerifyOptions { atol: 1e-5, rtol: 1e-4, inputs: Some(inputs), ..Default::default() };
    let r = rewrite_and_compare(&model, &passes, &options);
    assert_eq!((fired(&r, "finite-mask-over-cache"), fired(&r, "grouped-query-attention-with-past")), (1, 1), "{}", r.snapshot);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    assert_eq!(count(&r.model, "IsNaN"), 0);
    insta::assert_snapshot!("fuse__finite-mask-over-cache", r.snapshot);
    // not over a cache (the keys are the new ones only): the guard stays
    let mut b = GraphBuilder::new("guarded_softmax");
    let scores = b.input("scores", DataType::Float, &[BATCH, HEADS, SEQ, SEQ]);
    let keep = b.input("keep", DataType::Bool, &[BATCH, 1, SEQ, SEQ]);
    let zero = b.initializer_f32("zero", &[], &[0.0]);
    let minus_inf = b.initializer_f32("minus_inf", &[], &[f32::NEG_INFINITY]);
    let mask = b.node("Where", &[&keep, &zero, &minus_inf]);
    let masked = b.node("Add", &[&scores, &mask]);
    let p = b.node_with("Softmax", &[&masked], vec![("axis", AttrValue::Int(-1))]);
    let nan = b.node("IsNaN", &[&p]);
    let y = b.node("Where", &[&nan, &zero, &p]);
    b.output(&y, DataType::Float, &[BATCH, HEADS, SEQ, SEQ]);
    let r = fuse(&b.into_model(17), "ort");
    assert_eq!(fired(&r, "finite-mask-over-cache"), 0, "{}", r.snapshot);
}

/// Qwen2 (biases on Q, K, V) and Phi-3 (one packed QKV projection) exports
/// with a KV cache: attention over the cache fuses in both layers, verified over
/// a prefill and decode steps.
#[test]
fn qwen2_and_phi3_kv_cache_pipelines() {
    for file in ["qwen2-kv.optimum.onnx", "phi3-kv.optimum.onnx"] {
        let model = onnxopt::onnx::load(&common::fixture(file)).unwrap();
        let passes = optimization_passes(Target::Ort, &Default::default());
        let r = rewrite_and_compare(&model, &passes, &VerifyOptions::default());
        assert!(r.comparison.passed(), "{file}: {:?}", r.comparison);
        assert_eq!((count(&r.model, "GroupQueryAttention"), count(&r.model, "Softmax")), (2, 0), "{file}");
        assert_eq!(count(&r.model, "SkipSimplifiedLayerNormalization"), 4, "{file}");
        // Phi-3 writes its full rotary as a partial one with an empty pass-through half
        assert_eq!(count(&r.model, "RotaryEmbedding"), 4, "{file}");
    }
}
