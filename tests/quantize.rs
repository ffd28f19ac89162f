//! `quantize-dynamic` and `onnxopt quantize`: int8 weights where a MatMul's or
//! Gemm's weight is constant, the tract check against the float model, the
//! portable (standard ops) and ort (DynamicQuantizeMatMul) targets, exclusions,
//! and ONNX Runtime running the result.

mod common;

use common::*;
use onnxopt::ir::{DataType, GraphBuilder, Model, Node};
use onnxopt::passes::dead_code::EliminateDeadCode;
use onnxopt::passes::pipeline::Target;
use onnxopt::passes::quantize_dynamic::{ActivationScale, QuantizeDynamic};
use onnxopt::passes::{run_pipeline, verify_rewrite, DriverOptions, Pass, PassRecord};
use onnxopt::{onnx, verify};
use std::path::Path;

fn quantize(model: &Model, target: Target, exclude: &[&str]) -> (Model, PassRecord) {
    quantize_with(model, target, exclude, ActivationScale::PerTensor)
}

fn quantize_with(model: &Model, target: Target, exclude: &[&str], activations: ActivationScale) -> (Model, PassRecord) {
    quantize_gelu_one_sided(model, target, exclude, activations, &[])
}

/// `gelu_zero_points`: the one-sided grids' zero points, by activation.
fn quantize_gelu_one_sided(
    model: &Model,
    target: Target,
    exclude: &[&str],
    activations: ActivationScale,
    gelu_zero_points: &[(&str, u8)],
) -> (Model, PassRecord) {
    let exclude = exclude.iter().map(|s| s.to_string()).collect();
    let gelu_zero_points = std::sync::Arc::new(gelu_zero_points.iter().map(|(a, z)| (a.to_string(), *z)).collect());
    let quantize = QuantizeDynamic { target, exclude, activations, per_tensor_layers: Default::default(), rounded: Default::default(), gelu_zero_points };
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(quantize), Box::new(EliminateDeadCode)];
    let mut quantized = model.clone();
    let options = DriverOptions { validate: true, ..DriverOptions::default() };
    let records = run_pipeline(&mut quantized, &passes, &options).unwrap();
    (quantized, records[0].clone())
}

fn min_cosine(original: &Model, quantized: &Model) -> f64 {
    let options = verify::VerifyOptions { atol: 1.0, rtol: 0.0, ..Default::default() };
    let comparison = verify_rewrite(original, quantized, &options).unwrap();
    comparison.outputs.iter().map(|o| o.cosine).fold(1.0, f64::min)
}

fn ops(model: &Model) -> Vec<String> {
    model.graph.nodes().map(|n| n.qualified_op()).collect()
}

#[test]
fn small_mlp_gets_int8_weights_for_both_targets() {
    let model = small_mlp();
    for (target, case) in [(Target::Ort, "small_mlp_ort"), (Target::Portable, "small_mlp_portable")] {
        let (quantized, record) = quantize(&model, target, &[]);
        assert_eq!(record.patches, 1, "{case}");
        assert!(quantized.graph.initializers.iter().any(|t| t.dtype == DataType::Int8 && t.dims == [4, 8]), "{case}");
        assert!(quantized.graph.initializer("w").is_none(), "{case}: the float weight stays");
        assert!(!ops(&quantized).contains(&"MatMul".to_string()), "{case}: {:?}", ops(&quantized));
        let cosine = min_cosine(&model, &quantized);
        assert!(cosine > 0.999, "{case}: cosine {cosine}");
        insta::assert_snapshot!(format!("quantize_dynamic__{case}"), format!("before:\n{model}\nafter:\n{quantized}"));
    }
}

/// y = MatMul(x, w) (+ b) over x [2, seq, 4], at `opset`; the verifier's random
/// rows have very different ranges, which a per-tensor scale would flatten.
fn per_token_layer(opset: i64, with_bias: bool) -> Model {
    let mut b = GraphBuilder::new("per_token");
    let x = b.input("x", DataType::Float, &[2, -1, 4]);
    let w: Vec<f32> = (0..32).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0).collect();
    let w = b.initializer_f32("w", &[4, 8], &w);
    let bias = with_bias.then(|| b.initializer_f32("b", &[8], &[0.1; 8]));
    let mut y = b.node("MatMul", &[&x, &w]);
    if let Some(bias) = bias {
        y = b.node("Add", &[&y, &bias]);
    }
    b.output(&y, DataType::Float, &[2, -1, 8]);
    b.into_model(opset)
}

/// Per token: one scale per row, quantized once per activation; tract agrees
/// closely, and ONNX Runtime runs both targets' ops (MatMulIntegerToFloat and a
/// QuantizeLinear with a computed scale) as their tract lowerings compute them.
#[test]
fn per_token_activations_for_both_targets() {
    let model = per_token_layer(17, true);
    let mut lowered_cases = Vec::new();
    for (target, case) in [(Target::Ort, "per_token_ort"), (Target::Portable, "per_token_portable")] {
        let (quantized, record) = quantize_with(&model, target, &[], ActivationScale::PerToken);
        assert_eq!(record.patches, 1, "{case}");
        let ops = ops(&quantized);
        assert_eq!(ops.iter().filter(|op| *op == "QuantizeLinear").count(), 1, "{case}: {ops:?}");
        assert!(!ops.contains(&"DynamicQuantizeLinear".to_string()), "{case}");
        let zero_point = quantized.graph.initializer("x/zero_point").expect("the row zero point");
        assert_eq!((zero_point.dtype, zero_point.to_i64().unwrap().iter().copied().collect::<Vec<_>>()), (DataType::Uint8, vec![128]));
        let cosine = min_cosine(&model, &quantized);
        assert!(cosine > 0.9995, "{case}: cosine {cosine}");
        insta::assert_snapshot!(format!("quantize_dynamic__{case}"), format!("before:\n{model}\nafter:\n{quantized}"));
        let lowered = onnxopt::passes::lowered_for_tract(&quantized).unwrap();
        assert!(lowered.graph.nodes().all(|n| n.op_type != "QuantizeLinear" && n.domain.is_empty()), "{case}: lowered for tract");
        lowered_cases.push((case, quantized, lowered));
    }
    onnxruntime_agrees(lowered_cases);
}

/// From opset 21 the rows are quantized by one blocked QuantizeLinear (one
/// block of K per row), without Reshapes; tract (lowered) and ONNX Runtime
/// agree, and the result is as close as the per-axis form's.
#[test]
fn per_token_at_opset_21_quantizes_in_blocks() {
    let model = per_token_layer(21, false);
    let mut lowered_cases = Vec::new();
    for (target, case) in [(Target::Ort, "blocked_ort"), (Target::Portable, "blocked_portable")] {
        let (quantized, _) = quantize_with(&model, target, &[], ActivationScale::PerToken);
        let quantize = quantized.graph.nodes().find(|n| n.op_type == "QuantizeLinear").expect("a QuantizeLinear");
        assert_eq!((quantize.attr_int("block_size"), quantize.attr_int("axis")), (Some(4), Some(-1)), "{case}");
        assert!(!ops(&quantized).contains(&"Reshape".to_string()), "{case}: {:?}", ops(&quantized));
        let cosine = min_cosine(&model, &quantized);
        assert!(cosine > 0.9995, "{case}: cosine {cosine}");
        let lowered = onnxopt::passes::lowered_for_tract(&quantized).unwrap();
        assert!(lowered.graph.nodes().all(|n| n.op_type != "QuantizeLinear"), "{case}: lowered for tract");
        lowered_cases.push((case, quantized, lowered));
    }
    onnxruntime_agrees(lowered_cases);
}

/// Every int8 weight keeps aligned row pairs within |q0| + |q1| <= 128, so that
/// ORT's AVX2 u8 x s8 kernel (int16 pair sums, saturating) stays exact with
/// activations up to 255; a column of equal weights gets 64s, not 127s.
#[test]
fn int8_weights_keep_row_pairs_within_the_saturation_bound() {
    let mut b = GraphBuilder::new("pairs");
    let x = b.input("x", DataType::Float, &[-1, 5]);
    // column 0: all equal (pairs at the bound); column 1: its largest pair is
    // |0.1| + |-2| = 2.1, so the step is 2.1 / 127 and -2 becomes -121
    let w = b.initializer_f32("w", &[5, 2], &[1.0, 2.0, 1.0, 0.0, 1.0, 0.1, 1.0, -2.0, 1.0, 0.5]);
    let y = b.node("MatMul", &[&x, &w]);
    b.output(&y, DataType::Float, &[-1, 2]);
    let model = b.into_model(17);
    for activations in [ActivationScale::PerTensor, ActivationScale::PerToken] {
        let (quantized, _) = quantize_with(&model, Target::Portable, &[], activations);
        let q = quantized.graph.initializers.iter().find(|t| t.dtype == DataType::Int8 && t.dims == [5, 2]).unwrap();
        let q: Vec<i64> = q.to_i64().unwrap().iter().copied().collect();
        assert_eq!(q, [64, 121, 64, 0, 64, 6, 64, -121, 64, 30], "{activations:?}");
    }
}

/// ort: the bias Add folds into DynamicQuantizeMatMul; portable: it stays an Add.
#[test]
fn the_bias_add_folds_only_into_the_ort_op() {
    let (ort, _) = quantize(&small_mlp(), Target::Ort, &[]);
    assert_eq!(ops(&ort), ["com.microsoft.DynamicQuantizeMatMul", "Relu"]);
    let (portable, _) = quantize(&small_mlp(), Target::Portable, &[]);
    assert!(ops(&portable).contains(&"Add".to_string()));
    assert!(ops(&portable).iter().all(|op| !op.contains("com.microsoft")));
}

/// Q, K and V read one activation: it is quantized once.
#[test]
fn a_shared_activation_is_quantized_once() {
    let mut b = GraphBuilder::new("qkv");
    let x = b.input("x", DataType::Float, &[-1, 4]);
    let mut outputs = Vec::new();
    for name in ["q", "k", "v"] {
        let w: Vec<f32> = (0..16).map(|i| ((i * 7 + name.len() * 3) % 11) as f32 / 5.0 - 1.0).collect();
        let w = b.initializer_f32(&format!("{name}_weight"), &[4, 4], &w);
        let out = b.node("MatMul", &[&x, &w]);
        b.output(&out, DataType::Float, &[-1, 4]);
        outputs.push(out);
    }
    let model = b.into_model(17);
    let mut lowered_cases = Vec::new();
    for (target, product, case) in [(Target::Portable, "MatMulInteger", "shared_portable"), (Target::Ort, "com.microsoft.MatMulIntegerToFloat", "shared_ort")] {
        let (quantized, _) = quantize(&model, target, &[]);
        let ops = ops(&quantized);
        assert_eq!(ops.iter().filter(|op| *op == "DynamicQuantizeLinear").count(), 1, "{case}: {ops:?}");
        assert_eq!(ops.iter().filter(|op| *op == product).count(), 3, "{case}: {ops:?}");
        assert!(!ops.iter().any(|op| op.ends_with("DynamicQuantizeMatMul")), "{case}: {ops:?}");
        assert!(min_cosine(&model, &quantized) > 0.999, "{case}");
        let lowered = onnxopt::passes::lowered_for_tract(&quantized).unwrap();
        lowered_cases.push((case, quantized, lowered));
    }
    onnxruntime_agrees(lowered_cases);
}

/// y = MatMul(BiasGelu(MatMul(x, w1), b1), w2) over 64 tokens; the first
/// MatMul's output is named "hidden", the GELU's "gelu".
fn gelu_ffn() -> Model {
    let mut b = GraphBuilder::new("ffn");
    let x = b.input("x", DataType::Float, &[4, 16, 8]);
    let w1: Vec<f32> = (0..128).map(|i| ((i * 7 % 17) as f32 - 8.0) / 6.0).collect();
    let w1 = b.initializer_f32("w1", &[8, 16], &w1);
    let b1: Vec<f32> = (0..16).map(|i| (i % 5) as f32 * 0.3 - 0.6).collect();
    let b1 = b.initializer_f32("b1", &[16], &b1);
    let w2: Vec<f32> = (0..64).map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0).collect();
    let w2 = b.initializer_f32("w2", &[16, 4], &w2);
    b.add(Node::new("MatMul", &[&x, &w1], &["hidden"]));
    b.add(Node::new("BiasGelu", &["hidden", &b1], &["gelu"]).with_domain("com.microsoft"));
    let y = b.node("MatMul", &["gelu", &w2]);
    b.output(&y, DataType::Float, &[4, 16, 4]);
    let mut model = b.into_model(17);
    model.opset_imports.push(onnxopt::ir::OpsetImport { domain: "com.microsoft".into(), version: 1, extras: Default::default() });
    model
}

/// Per token, a GELU's output given a zero point takes the one-sided grid:
/// that zero point, its row maximum without Abs, nothing clipped (GELU >=
/// -0.1701); a zero point named for a tensor that is not a GELU's output is
/// ignored. With the first MatMul kept in float, so that only the GELU's
/// quantization differs, it is closer to the float model than the symmetric
/// grid; ONNX Runtime agrees with the lowering.
#[test]
fn per_token_gelu_inputs_take_the_one_sided_grid() {
    let model = gelu_ffn();
    let options = verify::VerifyOptions { atol: 1.0, rtol: 0.0, ..Default::default() };
    let error = |m: &Model| 1.0 - verify_rewrite(&model, m, &options).unwrap().outputs[0].cosine;
    let mut lowered_cases = Vec::new();
    for (target, case) in [(Target::Ort, "gelu_ort"), (Target::Portable, "gelu_portable")] {
        let zero_points = [("gelu", 20), ("x", 20)];
        let one_sided = quantize_gelu_one_sided(&model, target, &[], ActivationScale::PerToken, &zero_points).0;
        let zero_point = |x: &str| one_sided.graph.initializer(&format!("{x}/zero_point")).map(|t| t.to_i64().unwrap().iter().copied().collect::<Vec<_>>());
        assert_eq!(zero_point("gelu"), Some(vec![20]), "{case}");
        assert_eq!(zero_point("x"), Some(vec![128]), "{case}: x is no GELU's output");
        let abs_inputs: Vec<&str> = one_sided.graph.nodes().filter(|n| n.op_type == "Abs").map(|n| n.inputs[0].as_str()).collect();
        assert_eq!(abs_inputs, ["x"], "{case}");

        let second_only = quantize_gelu_one_sided(&model, target, &["hidden"], ActivationScale::PerToken, &zero_points).0;
        let symmetric = quantize_with(&model, target, &["hidden"], ActivationScale::PerToken).0;
        let (one_sided_error, symmetric_error) = (error(&second_only), error(&symmetric));
        assert!(one_sided_error < 0.7 * symmetric_error, "{case}: 1 - cosine one-sided {one_sided_error:.3e}, symmetric {symmetric_error:.3e}");
        let lowered = onnxopt::passes::lowered_for_tract(&one_sided).unwrap();
        lowered_cases.push((case, one_sided, lowered));
    }
    onnxruntime_agrees(lowered_cases);
}

/// The zero point minimises the mean squared step over the rows' maxima, and
/// rows too small for the one-sided grid to pay keep the symmetric one.
#[test]
fn one_sided_zero_point_follows_the_row_maxima() {
    use onnxopt::passes::quantize_dynamic::one_sided_zero_point;
    // R = 2.5 everywhere: the steps meet where 2.5 / (255 - z) = 0.1701 / z, z = 16.2
    assert!(matches!(one_sided_zero_point(&[2.5; 10]), Some(15..=17)), "{:?}", one_sided_zero_point(&[2.5; 10]));
    assert!(matches!(one_sided_zero_point(&[10.0; 10]), Some(3..=5)), "{:?}", one_sided_zero_point(&[10.0; 10]));
    assert_eq!(one_sided_zero_point(&[0.15; 10]), None, "below the GELU's own minimum: symmetric");
    assert_eq!(one_sided_zero_point(&[]), None);
}

/// A Gemm with transB and a [N] C: quantized, C becomes the bias.
#[test]
fn gemm_with_transposed_weight() {
    let mut b = GraphBuilder::new("gemm");
    let x = b.input("x", DataType::Float, &[3, 4]);
    let w: Vec<f32> = (0..24).map(|i| (i as f32 - 11.0) / 7.0).collect();
    let w = b.initializer_f32("w", &[6, 4], &w);
    let c = b.initializer_f32("c", &[6], &[0.5, -0.5, 0.25, 0.0, 1.0, -1.0]);
    b.add(Node::new("Gemm", &[&x, &w, &c], &["y"]).with_attr("transB", onnxopt::ir::AttrValue::Int(1)));
    b.output("y", DataType::Float, &[3, 6]);
    let model = b.into_model(17);
    for target in [Target::Ort, Target::Portable] {
        let (quantized, record) = quantize(&model, target, &[]);
        assert_eq!(record.patches, 1);
        assert!(quantized.graph.initializers.iter().any(|t| t.dtype == DataType::Int8 && t.dims == [4, 6]));
        assert!(min_cosine(&model, &quantized) > 0.999);
    }
}

#[test]
fn a_model_without_constant_weights_is_left_alone() {
    let mut b = GraphBuilder::new("activations_only");
    let x = b.input("x", DataType::Float, &[2, 4]);
    let y = b.input("y", DataType::Float, &[4, 3]);
    let z = b.node("MatMul", &[&x, &y]);
    b.output(&z, DataType::Float, &[2, 3]);
    let model = b.into_model(17);
    for target in [Target::Ort, Target::Portable] {
        let (quantized, record) = quantize(&model, target, &[]);
        assert_eq!(record.patches, 0);
        assert_eq!(quantized, model);
    }
}

#[test]
fn excluded_nodes_stay_in_float() {
    let mut b = GraphBuilder::new("two_layers");
    let x = b.input("x", DataType::Float, &[-1, 4]);
    let w1 = b.initializer_f32("w1", &[4, 4], &(0..16).map(|i| i as f32 / 8.0 - 1.0).collect::<Vec<_>>());
    let w2 = b.initializer_f32("w2", &[4, 2], &(0..8).map(|i| 1.0 - i as f32 / 4.0).collect::<Vec<_>>());
    b.add(Node::new("MatMul", &[&x, &w1], &["h"]).with_name("first"));
    b.add(Node::new("MatMul", &["h", &w2], &["y"]).with_name("classifier"));
    b.output("y", DataType::Float, &[-1, 2]);
    let model = b.into_model(17);
    let (quantized, record) = quantize(&model, Target::Ort, &["classifier"]);
    assert_eq!(record.patches, 1);
    let kept: Vec<&Node> = quantized.graph.nodes().filter(|n| n.op_type == "MatMul").collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].name, "classifier");
    assert!(quantized.graph.initializer("w2").is_some());
}

fn quantize_cli(input: &Path, output: &Path, extra: &[&str]) -> std::process::Output {
    run_command("quantize", input, output, &[&["--mode", "int8-dynamic"], extra].concat())
}

/// Every weight MatMul of the tiny BERT is quantized (2 layers x Q, K, V,
/// output, 2 feed-forward = 12; the 4 attention products stay): Q, K and V
/// share one DynamicQuantizeLinear for a MatMulIntegerToFloat each, the others
/// become DynamicQuantizeMatMul; ONNX Runtime runs it close to the float model.
#[test]
fn bert_ort_target_runs_in_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bert.int8.onnx");
    let report = dir.path().join("report.json");
    let o = quantize_cli(&fixture("bert.ts.onnx"), &out, &["--target", "ort", "--report", report.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let model = onnx::load(&out).unwrap();
    let ops = ops(&model);
    let count = |op: &str| ops.iter().filter(|o| *o == op).count();
    assert_eq!(count("com.microsoft.DynamicQuantizeMatMul"), 6, "{ops:?}");
    assert_eq!((count("DynamicQuantizeLinear"), count("com.microsoft.MatMulIntegerToFloat")), (2, 6), "{ops:?}");
    let graph = &model.graph;
    let weight_matmuls = graph.nodes().filter(|n| n.op_type == "MatMul" && graph.initializer(&n.inputs[1]).is_some()).count();
    assert_eq!(weight_matmuls, 0);
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["verification"]["outputs"][0]["within_tolerance"], true);
    assert!(report["verification"]["outputs"][0]["cosine"].as_f64().unwrap() >= 0.99);

    if let Some(cosine) = onnxruntime_cosine(&fixture("bert.ts.onnx"), &out) {
        assert!(cosine >= 0.99, "cosine {cosine}");
    }
}

/// Per token on the tiny BERT, both targets: ORT runs it close to float.
#[test]
fn bert_per_token_runs_in_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    for target in ["ort", "portable"] {
        let out = dir.path().join(format!("bert.{target}.onnx"));
        let o = quantize_cli(&fixture("bert.dynamo.onnx"), &out, &["--target", target, "--activations", "per-token", "--min-cosine", "0.999"]);
        assert!(o.status.success(), "{target}: {}", stderr(&o));
        let model = onnx::load(&out).unwrap();
        assert!(model.graph.nodes().filter(|n| n.is_onnx("QuantizeLinear")).count() >= 4, "{target}");
        if let Some(cosine) = onnxruntime_cosine(&fixture("bert.dynamo.onnx"), &out) {
            assert!(cosine >= 0.999, "{target}: cosine {cosine}");
        }
    }
}

#[test]
fn a_result_beyond_tolerance_is_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let o = quantize_cli(&fixture("bert.ts.onnx"), &out, &["--atol", "0"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(files_in(dir.path()).is_empty());
    // the default bound is on direction: cosine 0.98; asking for 1.0 exactly fails
    let o = quantize_cli(&fixture("bert.ts.onnx"), &out, &["--min-cosine", "1.0000001"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--min-cosine"), "{}", stderr(&o));
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn tensorrt_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let o = quantize_cli(&fixture("bert.ts.onnx"), &dir.path().join("out.onnx"), &["--target", "tensorrt"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn an_unknown_exclusion_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = quantize_cli(&fixture("bert.ts.onnx"), &dir.path().join("out.onnx"), &["--exclude", "no_such_node"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no_such_node"), "{}", stderr(&o));
}

/// Token batches for the tiny BERT fixture (vocabulary 1000): 16 sentences of 8
/// tokens, the last 3 of every other one padding.
fn write_token_npz(path: &Path) {
    let ids = ndarray::Array2::from_shape_fn((16, 8), |(r, c)| ((r * 31 + c * 17) % 97 + 1) as i64);
    let mask = ndarray::Array2::from_shape_fn((16, 8), |(r, c)| i64::from(r % 2 == 0 || c < 5));
    let mut npz = ndarray_npy::NpzWriter::new(std::fs::File::create(path).unwrap());
    npz.add_array("input_ids", &ids).unwrap();
    npz.add_array("attention_mask", &mask).unwrap();
    npz.add_array("token_type_ids", &ndarray::Array2::<i64>::zeros((16, 8))).unwrap();
    npz.finish().unwrap();
}

fn report_of(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// `onnxopt quantize MODEL` with `mode_args`, calibrated on `calib`, searched to
/// `--max-error budget` on 2 batches: its report, and the output's path.
fn quantize_with_budget(model: &Path, calib: &Path, mode_args: &[&str], budget: f64, dir: &Path, case: &str) -> (serde_json::Value, std::path::PathBuf) {
    let out = dir.join(format!("{case}.onnx"));
    let report = dir.join(format!("{case}.json"));
    let budget = budget.to_string();
    let search = ["--calib", calib.to_str().unwrap(), "--max-error", &budget, "--max-error-batches", "2", "--report", report.to_str().unwrap()];
    let o = run_command("quantize", model, &out, &[mode_args, &search].concat());
    assert!(o.status.success(), "{case}: {}", stderr(&o));
    (report_of(&report), out)
}

/// --max-error keeps the costliest layers in float until the budget holds: a
/// budget of 0 keeps all 12, a loose one none, one in between some, and the
/// measured error is within it every time.
#[test]
fn max_error_keeps_the_costliest_layers_in_float() {
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib.npz");
    write_token_npz(&calib);
    let model = fixture("bert.dynamo.onnx");
    let quantize_within = |budget: f64, case: &str| -> (serde_json::Value, usize) {
        let (report, out) = quantize_with_budget(&model, &calib, &["--mode", "int8-dynamic", "--target", "portable"], budget, dir.path(), case);
        let sensitivity = report["sensitivity"]["float"].clone();
        let kept = sensitivity["spared"].as_array().unwrap().len();
        let error = sensitivity["error"].as_f64().unwrap();
        assert!(error <= sensitivity["budget"].as_f64().unwrap(), "{case}: error {error} over budget");
        let quantized_layers = onnx::load(&out).unwrap().graph.nodes().filter(|n| n.op_type == "MatMulInteger").count();
        assert_eq!(quantized_layers + kept, 12, "{case}");
        (sensitivity, kept)
    };
    // loose: everything quantized, nothing measured per layer
    let (all, kept) = quantize_within(1.0, "loose");
    assert_eq!((kept, all["layers"].as_array().unwrap().len()), (0, 0));
    let error_all_quantized = all["error_none_spared"].as_f64().unwrap();
    assert!(error_all_quantized > 0.0);
    // zero: every layer back in float
    let (none, kept) = quantize_within(0.0, "zero");
    assert!(kept == 12 && none["error"].as_f64().unwrap().abs() < 1e-9, "{none}");
    // half the all-quantized error: every layer measured, some kept, costliest first
    let (half, kept) = quantize_within(error_all_quantized / 2.0, "half");
    let layers = half["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 12, "every layer measured");
    assert!((1..12).contains(&kept), "{kept} kept");
    assert_eq!(half["spared"][0], layers[0]["layer"], "the costliest first");
    assert!(layers.windows(2).all(|w| w[0]["error"].as_f64() >= w[1]["error"].as_f64()));

    // without calibration data the budget cannot be measured
    let o = quantize_cli(&fixture("bert.dynamo.onnx"), &dir.path().join("x.onnx"), &["--max-error", "0.01"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("calibration data"), "{}", stderr(&o));
}

/// `--mode int8` for ORT: the fused attention's Q/K/V projection is split out
/// and quantized too; with a budget between the all-per-tensor and the
/// all-per-token errors, the search gives per-token scales to some layers and
/// per-tensor ones (DynamicQuantizeMatMul) to the rest, keeps none in float,
/// and lands within budget; ONNX Runtime runs the mix.
#[test]
fn int8_mode_chooses_activation_scales_per_layer() {
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib.npz");
    write_token_npz(&calib);
    let model = fixture("bert.ts.onnx");
    let quantize_within = |budget: f64, case: &str| -> (serde_json::Value, Model, std::path::PathBuf) {
        let (report, out) = quantize_with_budget(&model, &calib, &["--mode", "int8", "--target", "ort"], budget, dir.path(), case);
        (report["sensitivity"].clone(), onnx::load(&out).unwrap(), out)
    };
    let count = |m: &Model, op: &str| m.graph.nodes().filter(|n| n.op_type == op).count();

    // loose: per tensor everywhere, Q/K/V included (three MatMuls sharing one
    // DynamicQuantizeLinear per layer, the other three a DynamicQuantizeMatMul each)
    // (the fused Attention's mask is an attention_bias: the model is raised to
    // opset 23 and takes ONNX Attention, whose projections' biases fold into them)
    let (loose, quantized, _) = quantize_within(1.0, "loose");
    let com_microsoft_attention = quantized.graph.nodes().filter(|n| n.op_type == "Attention" && !n.domain.is_empty()).count();
    assert_eq!(com_microsoft_attention, 0, "the fused Attention was split");
    assert_eq!((quantized.opset(""), count(&quantized, "Attention")), (Some(23), 2));
    let q_k_v: Vec<_> = quantized.graph.nodes().filter(|n| n.op_type == "MatMulIntegerToFloat").collect();
    assert!(q_k_v.len() == 6 && q_k_v.iter().all(|n| n.inputs.get(6).is_some_and(|b| !b.is_empty())), "Q/K/V biases folded in");
    assert_eq!(count(&quantized, "DynamicQuantizeLinear"), 2);
    assert_eq!((count(&quantized, "DynamicQuantizeMatMul"), count(&quantized, "MatMulIntegerToFloat")), (6, 6));
    assert_eq!(count(&quantized, "MatMul"), 0, "every projection quantized");
    assert_eq!((count(&quantized, "FastGelu"), count(&quantized, "BiasGelu")), (2, 0), "approximate-gelu ran");
    assert!(loose["float"].is_null(), "{loose}");
    let per_tensor_error = loose["activation_scales"]["error_none_spared"].as_f64().unwrap();

    // zero: per token everywhere is measured, and is still over, so float decides
    let (zero, _, _) = quantize_within(0.0, "zero");
    let per_token_error = zero["activation_scales"]["error_all_spared"].as_f64().unwrap();
    assert!(per_token_error < per_tensor_error, "per token {per_token_error} vs per tensor {per_tensor_error}");
    assert_eq!(zero["float"]["spared"].as_array().unwrap().len(), 12, "{zero}");

    // in between: a mix, within budget, nothing in float
    let budget = (per_tensor_error + per_token_error) / 2.0;
    let (mixed, quantized, out) = quantize_within(budget, "mixed");
    let scales = &mixed["activation_scales"];
    assert!(scales["error"].as_f64().unwrap() <= budget, "{mixed}");
    assert!(mixed["float"].is_null(), "{mixed}");
    // the search's units are activations: Q, K and V's shared one, the
    // attention output's, FFN1's and FFN2's, per layer
    assert_eq!(mixed["activations"], 8, "{mixed}");
    let per_token = scales["spared"].as_array().unwrap().len();
    assert!((1..8).contains(&per_token), "{mixed}");
    // each layer one integer product: per token a MatMulIntegerToFloat, per
    // tensor a DynamicQuantizeMatMul unless it shares its input (Q, K, V)
    assert_eq!(count(&quantized, "MatMulIntegerToFloat") + count(&quantized, "DynamicQuantizeMatMul"), 12);
    assert!(count(&quantized, "DynamicQuantizeMatMul") <= 12 - per_token);
    assert!(count(&quantized, "MatMulIntegerToFloat") >= per_token);
    if let Some(cosine) = onnxruntime_cosine(&model, &out) {
        assert!(cosine > 0.98, "ONNX Runtime: cosine {cosine}");
    }
}

/// `--max-opset` below 23: `--mode int8` leaves the opset as it is and the
/// attention as com.microsoft.MultiHeadAttention (for ORT before 1.23), still
/// with every projection quantized; below the input's own opset it is refused,
/// naming the file, and nothing is written.
#[test]
fn int8_mode_keeps_multi_head_attention_below_max_opset_23() {
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib.npz");
    write_token_npz(&calib);
    let model = fixture("bert.ts.onnx");
    let input_opset = onnx::load(&model).unwrap().opset("").unwrap();
    assert!(input_opset < 23, "the fixture must be below opset 23 for this test");
    let max_opset = input_opset.to_string();
    let (_, out) = quantize_with_budget(&model, &calib, &["--mode", "int8", "--target", "ort", "--max-opset", &max_opset], 1.0, dir.path(), "mha");
    let quantized = onnx::load(&out).unwrap();
    let count = |op: &str| quantized.graph.nodes().filter(|n| n.op_type == op).count();
    assert_eq!(quantized.opset(""), Some(input_opset));
    assert_eq!((count("MultiHeadAttention"), count("Attention")), (2, 0));
    assert_eq!(count("MatMul"), 0, "every projection quantized");
    if let Some(cosine) = onnxruntime_cosine(&model, &out) {
        assert!(cosine > 0.98, "ONNX Runtime: cosine {cosine}");
    }

    let refused = dir.path().join("refused.onnx");
    let below = (input_opset - 1).to_string();
    let o = run_command("quantize", &model, &refused, &["--mode", "int8", "--max-opset", &below]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--max-opset") && stderr(&o).contains("bert.ts.onnx"), "{}", stderr(&o));
    assert!(!refused.exists());
}
