//! Every fusion rule: a small graph in the form an exporter writes, where the
//! rule must fire (snapshot of before/after, numbers checked in tract after
//! lowering contrib ops), and a near miss where it must not.

mod common;

use common::fusion::{assert_silent, fired, fuse};
use onnxopt::ir::{AttrValue, DataType, Dim, GraphBuilder, Model};
use onnxopt::passes::check::Rewritten;

/// Asserts the rule fired once, the numbers agree, and snapshots the rewrite.
fn assert_fires(model: &Model, target: &str, rule: &str) -> Rewritten {
    let r = fuse(model, target);
    assert_eq!(fired(&r, rule), 1, "{rule} should fire once:\n{}", r.snapshot);
    assert!(r.comparison.passed(), "{rule}: {:?}", r.comparison);
    insta::assert_snapshot!(format!("fuse__{rule}"), r.snapshot);
    r
}

fn scalar(b: &mut GraphBuilder, name: &str, v: f32) -> String {
    b.initializer_f32(name, &[], &[v])
}

fn values(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * scale).collect()
}

/// x * (1 + erf(x / sqrt2)) * 0.5, or with `inner_half` x * (0.5 * (1 + erf(x / sqrt2))).
fn gelu_graph(inner_half: bool, half: f32, bias: bool) -> Model {
    let mut b = GraphBuilder::new("gelu");
    let input = b.input("x", DataType::Float, &[2, 3, 8]);
    let x = if bias {
        let bias = b.initializer_f32("bias", &[8], &values(8, 0.1));
        b.node("Add", &[&input, &bias])
    } else {
        input
    };
    let sqrt2 = scalar(&mut b, "sqrt2", std::f32::consts::SQRT_2);
    let one = scalar(&mut b, "one", 1.0);
    let half = scalar(&mut b, "half", half);
    let d = b.node("Div", &[&x, &sqrt2]);
    let e = b.node("Erf", &[&d]);
    let a = b.node("Add", &[&e, &one]);
    let y = if inner_half {
        let h = b.node("Mul", &[&half, &a]);
        b.node("Mul", &[&x, &h])
    } else {
        let m = b.node("Mul", &[&x, &a]);
        b.node("Mul", &[&m, &half])
    };
    b.output(&y, DataType::Float, &[2, 3, 8]);
    b.into_model(17)
}

#[test]
fn gelu_erf() {
    assert_fires(&gelu_graph(false, 0.5, false), "ort", "gelu-erf");
    assert_silent(&gelu_graph(false, 0.6, false), "ort");
}

#[test]
fn gelu_erf_inner_half() {
    assert_fires(&gelu_graph(true, 0.5, false), "ort", "gelu-erf-inner-half");
    assert_silent(&gelu_graph(true, 0.4, false), "ort");
}

/// y = x * Sigmoid(alpha * x) (CLIP's quick_gelu), or x * Sigmoid(x) (SiLU)
/// when `alpha` is None; `other` feeds the Sigmoid another tensor.
fn quick_gelu_graph(alpha: Option<f32>, other: bool) -> Model {
    let mut b = GraphBuilder::new("quick_gelu");
    let x = b.input("x", DataType::Float, &[2, 3, 8]);
    let z = if other { b.input("z", DataType::Float, &[2, 3, 8]) } else { x.clone() };
    let gate = match alpha {
        Some(a) => {
            let a = scalar(&mut b, "alpha", a);
            b.node("Mul", &[&z, &a])
        }
        None => z,
    };
    let s = b.node("Sigmoid", &[&gate]);
    let y = b.node("Mul", &[&s, &x]);
    b.output(&y, DataType::Float, &[2, 3, 8]);
    b.into_model(17)
}

#[test]
fn quick_gelu() {
    let r = assert_fires(&quick_gelu_graph(Some(1.702), false), "ort", "quick-gelu");
    let node = r.model.graph.nodes().find(|n| n.op_type == "QuickGelu").unwrap();
    assert_eq!(node.attr_float("alpha"), Some(1.702));
    let silu = fuse(&quick_gelu_graph(None, false), "ort");
    assert_eq!(fired(&silu, "quick-gelu"), 1, "SiLU: alpha 1\n{}", silu.snapshot);
    assert!(silu.comparison.passed(), "{:?}", silu.comparison);
    // the gate reads another tensor: x * sigmoid(z) is not QuickGelu
    assert_silent(&quick_gelu_graph(Some(1.702), true), "ort");
    // no standard op for it
    assert_silent(&quick_gelu_graph(Some(1.702), false), "portable");
}

#[test]
fn bias_gelu() {
    let r = assert_fires(&gelu_graph(true, 0.5, true), "ort", "bias-gelu");
    assert!(r.model.graph.nodes().any(|n| n.op_type == "BiasGelu"));
    // a 2-D bias is not ORT's BiasGelu: the Gelu fuses, the bias stays
    let mut m = gelu_graph(true, 0.5, true);
    let t = m.graph.initializers.iter_mut().find(|t| t.name == "bias").unwrap();
    t.dims = vec![1, 8];
    let r = fuse(&m, "ort");
    assert_eq!(fired(&r, "bias-gelu"), 0);
    assert_eq!(fired(&r, "gelu-erf-inner-half"), 1);
}

/// 1 + tanh(sqrt(2/pi) * (x + c * cube)): the tanh GELU's factor, shared by its forms.
fn tanh_gelu_factor(b: &mut GraphBuilder, x: &str, cube: &str, c: f32) -> String {
    let (c, k, one) = (scalar(b, "c", c), scalar(b, "k", 0.797_884_6), scalar(b, "one", 1.0));
    let cc = b.node("Mul", &[&c, cube]);
    let inner = b.node("Add", &[x, &cc]);
    let scaled = b.node("Mul", &[&k, &inner]);
    let t = b.node("Tanh", &[&scaled]);
    b.node("Add", &[&one, &t])
}

/// x^3 as Pow(x, `exponent`).
fn power(b: &mut GraphBuilder, x: &str, exponent: f32) -> String {
    let e = scalar(b, "three", exponent);
    b.node("Pow", &[x, &e])
}

/// 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), as GPT-2 exports NewGELU.
fn fast_gelu_graph(coefficient: f32, bias: bool) -> Model {
    let mut b = GraphBuilder::new("fast_gelu");
    let input = b.input("x", DataType::Float, &[2, 3, 8]);
    let x = if bias {
        let bias = b.initializer_f32("bias", &[8], &values(8, 0.1));
        b.node("Add", &[&input, &bias])
    } else {
        input
    };
    let half = scalar(&mut b, "half", 0.5);
    let hx = b.node("Mul", &[&half, &x]);
    let cube = power(&mut b, &x, 3.0);
    let a = tanh_gelu_factor(&mut b, &x, &cube, coefficient);
    let y = b.node("Mul", &[&hx, &a]);
    b.output(&y, DataType::Float, &[2, 3, 8]);
    b.into_model(17)
}

#[test]
fn fast_gelu_tanh() {
    assert_fires(&fast_gelu_graph(0.044715, false), "ort", "fast-gelu-tanh");
    assert_silent(&fast_gelu_graph(0.05, false), "ort");
}

/// GELUTanh as TorchScript traces it (Gemma): x^3 as x * (x * x), the half last.
fn fast_gelu_products_graph(half: f32) -> Model {
    let mut b = GraphBuilder::new("fast_gelu_products");
    let x = b.input("x", DataType::Float, &[2, 3, 8]);
    let half = scalar(&mut b, "half", half);
    let square = b.node("Mul", &[&x, &x]);
    let cube = b.node("Mul", &[&x, &square]);
    let a = tanh_gelu_factor(&mut b, &x, &cube, 0.044715);
    let xa = b.node("Mul", &[&x, &a]);
    let y = b.node("Mul", &[&half, &xa]);
    b.output(&y, DataType::Float, &[2, 3, 8]);
    b.into_model(17)
}

#[test]
fn fast_gelu_tanh_products() {
    assert_fires(&fast_gelu_products_graph(0.5), "ort", "fast-gelu-tanh-products");
    // not GELU's half
    assert_silent(&fast_gelu_products_graph(0.6), "ort");
}

/// GELUTanh as the dynamo exporter decomposes it (Gemma): x * (0.5 * (1 + tanh(..))).
fn fast_gelu_inner_half_graph(exponent: f32) -> Model {
    let mut b = GraphBuilder::new("fast_gelu_inner_half");
    let x = b.input("x", DataType::Float, &[2, 3, 8]);
    let half = scalar(&mut b, "half", 0.5);
    let cube = power(&mut b, &x, exponent);
    let a = tanh_gelu_factor(&mut b, &x, &cube, 0.044715);
    let ha = b.node("Mul", &[&half, &a]);
    let y = b.node("Mul", &[&x, &ha]);
    b.output(&y, DataType::Float, &[2, 3, 8]);
    b.into_model(17)
}

#[test]
fn fast_gelu_tanh_inner_half() {
    assert_fires(&fast_gelu_inner_half_graph(3.0), "ort", "fast-gelu-tanh-inner-half");
    // a square is not GELU's cube
    assert_silent(&fast_gelu_inner_half_graph(2.0), "ort");
}

#[test]
fn fast_gelu_bias() {
    assert_fires(&fast_gelu_graph(0.044715, true), "ort", "fast-gelu-bias");
}

/// LayerNorm(x (+ bias) + skip) as encoders write their residual connections.
fn skip_layer_norm_graph(bias: bool, skip_rank: usize) -> Model {
    residual_norm_graph(bias, skip_rank, false)
}

/// The same block; with `pre_norm`, as a pre-norm block writes it: the sum is
/// normalized for the next sublayer and also read by the next residual Add.
fn residual_norm_graph(bias: bool, skip_rank: usize, pre_norm: bool) -> Model {
    let mut b = GraphBuilder::new(if pre_norm { "pre_norm" } else { "skip_ln" });
    let x = b.input("x", DataType::Float, &[2, 3, 8]);
    let skip_shape: &[i64] = if skip_rank == 3 { &[2, 3, 8] } else { &[3, 8] };
    let skip = b.input("skip", DataType::Float, skip_shape);
    let w = b.initializer_f32("w", &[8, 8], &values(64, 0.05));
    let h = b.node("MatMul", &[&x, &w]);
    let h = if bias {
        let bias = b.initializer_f32("bias", &[8], &values(8, 0.1));
        b.node("Add", &[&bias, &h])
    } else {
        h
    };
    let sum = b.node("Add", &[&h, &skip]);
    let gamma = b.initializer_f32("gamma", &[8], &values(8, 0.2));
    let beta = b.initializer_f32("beta", &[8], &values(8, 0.03));
    let epsilon = if pre_norm { 1e-5 } else { 1e-12 };
    let normed = b.node_with("LayerNormalization", &[&sum, &gamma, &beta], vec![("epsilon", AttrValue::Float(epsilon))]);
    let y = if pre_norm {
        let w2 = b.initializer_f32("w2", &[8, 8], &values(64, 0.04));
        let f = b.node("MatMul", &[&normed, &w2]);
        b.node("Add", &[&f, &sum])
    } else {
        normed
    };
    b.output(&y, DataType::Float, &[2, 3, 8]);
    b.into_model(17)
}

#[test]
fn skip_layer_norm_bias() {
    assert_fires(&skip_layer_norm_graph(true, 3), "ort", "skip-layer-norm-bias");
    assert_silent(&skip_layer_norm_graph(true, 2), "ort");
}

#[test]
fn skip_layer_norm() {
    assert_fires(&skip_layer_norm_graph(false, 3), "ort", "skip-layer-norm");
    // the portable target keeps LayerNormalization as it is
    assert_silent(&skip_layer_norm_graph(false, 3), "portable");
}

#[test]
fn skip_layer_norm_sum_for_pre_norm_blocks() {
    let r = assert_fires(&residual_norm_graph(true, 3, true), "ort", "skip-layer-norm-bias-sum");
    let skip_ln = r.model.graph.nodes().find(|n| n.op_type == "SkipLayerNormalization").unwrap();
    assert_eq!(skip_ln.outputs.len(), 4, "output 3 writes the residual sum: {skip_ln:?}");
    let r = assert_fires(&residual_norm_graph(false, 3, true), "ort", "skip-layer-norm-sum");
    assert_eq!(fired(&r, "skip-layer-norm"), 0);
    // a sum only the norm reads: the rules without output 3 take it
    let r = fuse(&skip_layer_norm_graph(true, 3), "ort");
    assert_eq!((fired(&r, "skip-layer-norm-bias"), fired(&r, "skip-layer-norm-bias-sum")), (1, 0), "{}", r.snapshot);
    // portable keeps LayerNormalization
    assert_silent(&residual_norm_graph(true, 3, true), "portable");
}

#[test]
fn skip_layer_norm_leaves_embeddings() {
    let mut b = GraphBuilder::new("embeddings");
    let ids = b.input("input_ids", DataType::Int64, &[2, 3]);
    let table = b.initializer_f32("table", &[10, 8], &values(80, 0.1));
    let positions = b.input("positions", DataType::Float, &[2, 3, 8]);
    let e = b.node("Gather", &[&table, &ids]);
    let sum = b.node("Add", &[&e, &positions]);
    let gamma = b.initializer_f32("gamma", &[8], &values(8, 0.2));
    let beta = b.initializer_f32("beta", &[8], &values(8, 0.03));
    let y = b.node("LayerNormalization", &[&sum, &gamma, &beta]);
    b.output(&y, DataType::Float, &[2, 3, 8]);
    assert_silent(&b.into_model(17), "ort");
}

/// Where(IsNaN(p), zero, p) around p = Softmax(scores + Where(keep, 0, fill)); `keep`
/// is a key-padding mask, or with `causal` also a comparison of two position ranges.
fn nan_guard_graph(zero: f32, fill: f32, causal: bool) -> Model {
    let mut b = GraphBuilder::new("guard");
    let scores = b.input("scores", DataType::Float, &[2, 2, 4, 4]);
    let padding = b.input("keep", DataType::Bool, &[2, 1, 1, 4]);
    let keep = if causal {
        let start = b.initializer_i64("start", &[], &[0]);
        let end = b.initializer_i64("end", &[], &[4]);
        let step = b.initializer_i64("step", &[], &[1]);
        let rows_shape = b.initializer_i64("rows_shape", &[2], &[4, 1]);
        let range = b.node("Range", &[&start, &end, &step]);
        let rows = b.node("Reshape", &[&range, &rows_shape]);
        let triangle = b.node("LessOrEqual", &[&range, &rows]);
        b.node("And", &[&padding, &triangle])
    } else {
        padding
    };
    let zero_bias = scalar(&mut b, "zero_bias", 0.0);
    let fill = scalar(&mut b, "fill", fill);
    let mask = b.node("Where", &[&keep, &zero_bias, &fill]);
    let s = b.node("Add", &[&scores, &mask]);
    let zero = scalar(&mut b, "zero", zero);
    let p = b.node_with("Softmax", &[&s], vec![("axis", AttrValue::Int(-1))]);
    let nan = b.node("IsNaN", &[&p]);
    let y = b.node("Where", &[&nan, &zero, &p]);
    b.output(&y, DataType::Float, &[2, 2, 4, 4]);
    b.into_model(17)
}

#[test]
fn softmax_nan_guard() {
    // a finite fill: softmax is never NaN, the guard does nothing
    assert_fires(&nan_guard_graph(0.0, f32::MIN, true), "ort", "softmax-nan-guard");
    // -inf padding-only mask: a row is empty only for an all-padding sequence
    assert_eq!(fired(&fuse(&nan_guard_graph(0.0, f32::NEG_INFINITY, false), "ort"), "softmax-nan-guard"), 1);
    // -inf causal mask: left padding leaves rows fully masked, the guard stays
    assert_silent(&nan_guard_graph(0.0, f32::NEG_INFINITY, true), "ort");
    assert_silent(&nan_guard_graph(1.0, f32::MIN, true), "ort");
    // exact under its condition for every target
    assert_eq!(fired(&fuse(&nan_guard_graph(0.0, f32::MIN, true), "tensorrt"), "softmax-nan-guard"), 1);
}

/// K^T as the dynamo exporter writes it: [B,N,S,D] -> [B*N,S,D] -> [B*N,D,S] -> [B,N,D,S].
fn merged_transpose_graph(split_back: [i64; 4]) -> Model {
    let mut b = GraphBuilder::new("k_transpose");
    let y = b.input("y", DataType::Float, &[2, 3, 4, 5]);
    let merged_shape = b.initializer_i64("merged_shape", &[3], &[-1, 4, 5]);
    let out_shape = b.initializer_i64("out_shape", &[4], &split_back);
    let m = b.node("Reshape", &[&y, &merged_shape]);
    let t = b.node_with("Transpose", &[&m], vec![("perm", AttrValue::Ints(vec![0, 2, 1]))]);
    let out = b.node("Reshape", &[&t, &out_shape]);
    b.output(&out, DataType::Float, &split_back);
    b.into_model(17)
}

#[test]
fn transpose_through_merged_axes() {
    assert_fires(&merged_transpose_graph([2, 3, 5, 4]), "tensorrt", "transpose-through-merged-axes");
    // split back differently ([3, 2, ...]): not a transpose
    assert_silent(&merged_transpose_graph([3, 2, 5, 4]), "tensorrt");
}

/// The same with the leading dim unknown (Swin's batch of windows, dynamo):
/// [?, 3, 4, 5] -> [-1, 4, 5] -> [-1, 5, 4] -> `split_back`.
fn merged_transpose_graph_of_windows(split_back: [i64; 4]) -> Model {
    let mut b = GraphBuilder::new("k_transpose_windows");
    let y = b.input_symbolic("y", DataType::Float, vec![Dim::Unknown, Dim::Fixed(3), Dim::Fixed(4), Dim::Fixed(5)]);
    let merged_shape = b.initializer_i64("merged_shape", &[3], &[-1, 4, 5]);
    let out_shape = b.initializer_i64("out_shape", &[4], &split_back);
    let m = b.node("Reshape", &[&y, &merged_shape]);
    let t = b.node_with("Transpose", &[&m], vec![("perm", AttrValue::Ints(vec![0, 2, 1]))]);
    let out = b.node("Reshape", &[&t, &out_shape]);
    b.output(&out, DataType::Float, &split_back);
    b.into_model(17)
}

#[test]
fn transpose_through_merged_axes_of_unknown_leading_dim() {
    // the element count forces the leading dims to agree
    let r = fuse(&merged_transpose_graph_of_windows([-1, 3, 5, 4]), "tensorrt");
    assert_eq!(fired(&r, "transpose-through-merged-axes"), 1, "{}", r.snapshot);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    // heads and sequence split back the other way: not a transpose
    assert_silent(&merged_transpose_graph_of_windows([-1, 5, 3, 4]), "tensorrt");
}

fn double_transpose_graph(inner_used_elsewhere: bool) -> Model {
    let mut b = GraphBuilder::new("transposes");
    let x = b.input("x", DataType::Float, &[2, 3, 4, 5]);
    let t1 = b.node_with("Transpose", &[&x], vec![("perm", AttrValue::Ints(vec![0, 2, 1, 3]))]);
    let t2 = b.node_with("Transpose", &[&t1], vec![("perm", AttrValue::Ints(vec![0, 1, 3, 2]))]);
    b.output(&t2, DataType::Float, &[2, 4, 5, 3]);
    if inner_used_elsewhere {
        b.output(&t1, DataType::Float, &[2, 4, 3, 5]);
    }
    b.into_model(17)
}

#[test]
fn transpose_of_transpose() {
    let r = assert_fires(&double_transpose_graph(false), "portable", "transpose-of-transpose");
    let perm = r.model.graph.nodes().next().unwrap().attr_ints("perm").unwrap().to_vec();
    assert_eq!(perm, vec![0, 2, 3, 1]);
    assert_silent(&double_transpose_graph(true), "portable");
}

/// BERT self-attention as the TorchScript exporter writes SDPA: hidden 8,
/// 2 heads of 4, batch 2, sequence 4, additive mask [2, 1, 4, 4].
fn attention_graph(mask_heads: i64, cross: bool) -> Model {
    let (batch, seq, hidden, heads) = (2i64, 4i64, 8i64, 2i64);
    let head = hidden / heads;
    let mut b = GraphBuilder::new("attention");
    let x = b.input("x", DataType::Float, &[batch, seq, hidden]);
    let kv_input = if cross { b.input("memory", DataType::Float, &[batch, seq, hidden]) } else { x.clone() };
    let mask = b.input("mask", DataType::Float, &[batch, mask_heads, seq, seq]);
    let split = b.initializer_i64("split_shape", &[4], &[batch, seq, heads, head]);
    let merge = b.initializer_i64("merge_shape", &[3], &[batch, seq, hidden]);
    let scale = (head as f32).powf(-0.25);
    let s = scalar(&mut b, "scale", scale);
    let project = |b: &mut GraphBuilder, name: &str, input: &str, perm: Vec<i64>, k: usize| {
        let w = b.initializer_f32(&format!("w_{name}"), &[hidden as usize, hidden as usize], &values(64, 0.02 * k as f32));
        let bias = b.initializer_f32(&format!("b_{name}"), &[hidden as usize], &values(8, 0.01 * k as f32));
        let mm = b.node("MatMul", &[input, &w]);
        let add = b.node("Add", &[&bias, &mm]);
        let r = b.node("Reshape", &[&add, &split]);
        b.node_with("Transpose", &[&r], vec![("perm", AttrValue::Ints(perm))])
    };
    let q = project(&mut b, "q", &x, vec![0, 2, 1, 3], 1);
    let k = project(&mut b, "k", &kv_input, vec![0, 2, 3, 1], 2);
    let v = project(&mut b, "v", &kv_input, vec![0, 2, 1, 3], 3);
    let qs = b.node("Mul", &[&q, &s]);
    let ks = b.node("Mul", &[&k, &s]);
    let scores = b.node("MatMul", &[&qs, &ks]);
    let masked = b.node("Add", &[&scores, &mask]);
    let p = b.node_with("Softmax", &[&masked], vec![("axis", AttrValue::Int(-1))]);
    let ctx = b.node("MatMul", &[&p, &v]);
    let t = b.node_with("Transpose", &[&ctx], vec![("perm", AttrValue::Ints(vec![0, 2, 1, 3]))]);
    let y = b.node("Reshape", &[&t, &merge]);
    b.output(&y, DataType::Float, &[batch, seq, hidden]);
    b.into_model(17)
}

#[test]
fn attention_sdpa() {
    let r = assert_fires(&attention_graph(1, false), "ort", "attention-sdpa");
    let attention = r.model.graph.nodes().find(|n| n.op_type == "Attention").unwrap();
    assert_eq!(attention.attr_int("num_heads"), Some(2));
    assert!(r.model.opset_imports.iter().any(|o| o.domain == "com.microsoft"));
    // a bias per head (T5's relative positions) is an attention_bias too,
    // [batch, heads, seq, seq], which ONNX Runtime's kernel takes as it is
    let per_head = fuse(&attention_graph(2, false), "ort");
    assert_eq!(fired(&per_head, "attention-sdpa"), 1, "{}", per_head.snapshot);
    assert!(per_head.comparison.passed(), "{:?}", per_head.comparison);
    let dir = tempfile::tempdir().unwrap();
    let (original, fused) = (dir.path().join("original.onnx"), dir.path().join("fused.onnx"));
    onnxopt::onnx::save(&attention_graph(2, false), &original, &Default::default()).unwrap();
    onnxopt::onnx::save(&per_head.model, &fused, &Default::default()).unwrap();
    if let Some(cosine) = common::onnxruntime_cosine(&original, &fused) {
        assert!(cosine > 0.99999, "ONNX Runtime: cosine {cosine}");
    }
    // cross-attention: K and V come from another input, not one packed
    // projection of x: MultiHeadAttention (tests/rules_attention.rs) takes it
    let cross = fuse(&attention_graph(1, true), "ort");
    assert_eq!((fired(&cross, "attention-sdpa"), fired(&cross, "multi-head-attention")), (0, 1), "{}", cross.snapshot);
    assert!(cross.comparison.passed(), "{:?}", cross.comparison);
}

#[test]
fn rules_list_their_math() {
    let o = common::run(&["rules"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("attention-sdpa (passes/attention.rules:"), "{text}");
    assert!(text.contains("# x * (1 + erf(x / sqrt2)) * 0.5 -> Gelu(x)"), "{text}");
}

/// LayerNorm as exported below opset 17: (x - mean) / sqrt(var + eps) * gamma + beta,
/// the means over `axis` (the attribute form of ReduceMean's axes).
fn decomposed_layer_norm_graph(axis: i64) -> Model {
    let mut b = GraphBuilder::new("layer_norm");
    let x = b.input("x", DataType::Float, &[2, 3, 8]);
    let axes = || vec![("axes", AttrValue::Ints(vec![axis]))];
    let two = scalar(&mut b, "two", 2.0);
    let eps = scalar(&mut b, "eps", 1e-5);
    let gamma = b.initializer_f32("gamma", &[8], &values(8, 0.2));
    let beta = b.initializer_f32("beta", &[8], &values(8, 0.03));
    let mean = b.node_with("ReduceMean", &[&x], axes());
    let centered = b.node("Sub", &[&x, &mean]);
    let squared = b.node("Pow", &[&centered, &two]);
    let variance = b.node_with("ReduceMean", &[&squared], axes());
    let shifted = b.node("Add", &[&variance, &eps]);
    let std = b.node("Sqrt", &[&shifted]);
    let normalized = b.node("Div", &[&centered, &std]);
    let scaled = b.node("Mul", &[&normalized, &gamma]);
    let y = b.node("Add", &[&scaled, &beta]);
    b.output(&y, DataType::Float, &[2, 3, 8]);
    b.into_model(16)
}

#[test]
fn layer_norm_decomposed() {
    let r = assert_fires(&decomposed_layer_norm_graph(-1), "ort", "layer-norm-decomposed");
    assert!(r.model.graph.nodes().all(|n| n.op_type == "LayerNormalization"));
    // normalising over the middle axis is not LayerNormalization's last-axis form
    assert_silent(&decomposed_layer_norm_graph(1), "ort");
    // standard LayerNormalization exists from opset 17 only
    assert_silent(&decomposed_layer_norm_graph(-1), "portable");
}
