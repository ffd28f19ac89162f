//! `quantize-int4` and `onnxopt quantize --mode int4-weight`: the rewrite for
//! both targets (snapshot), where it must not fire, the tract error bound of
//! round-to-nearest, ONNX Runtime's own MatMulNBits and DequantizeLinear kernels
//! against the lowerings tract runs, GPTQ against RTN on the real MiniLM, and
//! the CLI; `quantize-gather-int4` for embedding tables.

mod common;

use common::*;
use onnxopt::calibrate::CalibrationSource;
use onnxopt::ir::{AttrValue, DataType, GraphBuilder, Model, Node};
use onnxopt::passes::check::rewrite_and_compare;
use onnxopt::passes::dead_code::EliminateDeadCode;
use onnxopt::passes::lower_contrib::lower_contrib_ops;
use onnxopt::passes::lower_standard::lower_standard_ops;
use onnxopt::passes::pipeline::{cleanup_passes, Target};
use onnxopt::passes::quantize_gather_int4::QuantizeGatherInt4;
use onnxopt::passes::quantize_int4::{activation_hessians, QuantizeInt4, Rounding};
use onnxopt::passes::{run_pipeline, verify_rewrite, DriverOptions, Pass};
use onnxopt::{onnx, verify};
use std::collections::HashSet;
use std::path::Path;

fn int4(target: Target, block_size: usize, zero_point: bool, rounding: Rounding) -> Vec<Box<dyn Pass>> {
    let pass = QuantizeInt4 { target, block_size, zero_point, rounding, exclude: HashSet::new(), accuracy_level: 0 };
    vec![Box::new(pass), Box::new(EliminateDeadCode)]
}

fn rewrite(model: &Model, passes: &[Box<dyn Pass>]) -> Model {
    let mut rewritten = model.clone();
    let options = DriverOptions { validate: true, ..DriverOptions::default() };
    run_pipeline(&mut rewritten, passes, &options).unwrap();
    rewritten
}

fn ops(model: &Model) -> Vec<String> {
    model.graph.nodes().map(|n| n.qualified_op()).collect()
}

/// Deterministic weights in [-1, 1), not symmetric.
fn values(count: usize, seed: u64) -> Vec<f32> {
    let mut rng = verify::SeededRng::new(seed);
    (0..count).map(|_| rng.uniform() as f32 * 2.0 - 1.0).collect()
}

/// y = x @ w + b, x: float32[batch, K], w: [K, N].
fn linear(k: usize, n: usize, opset: i64) -> Model {
    let mut b = GraphBuilder::new("linear");
    let x = b.input("x", DataType::Float, &[-1, k as i64]);
    let w = b.initializer_f32("w", &[k, n], &values(k * n, 1));
    let bias = b.initializer_f32("b", &[n], &values(n, 2));
    let h = b.node("MatMul", &[&x, &w]);
    let y = b.node("Add", &[&h, &bias]);
    b.output(&y, DataType::Float, &[-1, n as i64]);
    b.into_model(opset)
}

/// y = Gemm(x, w^T, c) with transB: w is [N, K].
fn gemm_transposed(k: usize, n: usize) -> Model {
    let mut b = GraphBuilder::new("gemm");
    let x = b.input("x", DataType::Float, &[2, k as i64]);
    let w = b.initializer_f32("w", &[n, k], &values(k * n, 3));
    let c = b.initializer_f32("c", &[n], &values(n, 4));
    b.add(Node::new("Gemm", &[&x, &w, &c], &["y"]).with_attr("transB", AttrValue::Int(1)));
    b.output("y", DataType::Float, &[2, n as i64]);
    b.into_model(21)
}

#[test]
fn small_linear_becomes_matmul_nbits_or_blocked_dequantize_linear() {
    let model = linear(64, 8, 21);
    for (target, case) in [(Target::Ort, "linear_ort"), (Target::Portable, "linear_portable")] {
        let options = verify::VerifyOptions { atol: 1.0, rtol: 0.0, ..Default::default() };
        let rewritten = rewrite_and_compare(&model, &int4(target, 32, false, Rounding::Nearest), &options);
        assert_eq!(rewritten.records[0].patches, 1, "{case}");
        assert!(rewritten.model.graph.initializer("w").is_none(), "{case}: the float weight stays");
        assert!(rewritten.comparison.min_cosine() > 0.99, "{case}: cosine {}", rewritten.comparison.min_cosine());
        insta::assert_snapshot!(case, rewritten.snapshot);
    }
}

/// Round-to-nearest moves each weight by at most half its block's step, so
/// `|y - y'|[n] <= sum_k |x_k| * s[k / B, n] / 2`; the verifier's inputs are
/// N(0, 1) draws, |x| < 5 on these few values.
#[test]
fn round_to_nearest_error_stays_within_half_a_step_per_weight() {
    let (k, n, block) = (96, 6, 32);
    let model = linear(k, n, 21);
    let w = values(k * n, 1);
    for zero_point in [false, true] {
        // the largest step each column has, over its blocks, from the rules in quantize_int4.rs
        let bound: f64 = (0..n)
            .map(|col| {
                (0..k / block)
                    .map(|g| {
                        let column: Vec<f32> = (g * block..(g + 1) * block).map(|row| w[row * n + col]).collect();
                        let (lo, hi) = column.iter().fold((0f32, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
                        let step = if zero_point { (hi - lo) / 15.0 } else { lo.abs().max(hi) / 7.0 };
                        block as f64 * 5.0 * step as f64 / 2.0
                    })
                    .sum::<f64>()
            })
            .fold(0.0, f64::max);
        for target in [Target::Ort, Target::Portable] {
            let options = verify::VerifyOptions { atol: bound as f32, rtol: 0.0, ..Default::default() };
            let rewritten = rewrite_and_compare(&model, &int4(target, block, zero_point, Rounding::Nearest), &options);
            assert!(rewritten.comparison.passed(), "{target} zero point {zero_point}: max abs {} > bound {bound}", rewritten.comparison.max_abs());
            assert!(rewritten.comparison.max_abs() > 0.0, "nothing was rounded?");
        }
    }
}

#[test]
fn gemm_with_transposed_weight_and_bias() {
    let model = gemm_transposed(64, 5);
    for target in [Target::Ort, Target::Portable] {
        let options = verify::VerifyOptions { atol: 1.0, rtol: 0.0, ..Default::default() };
        let rewritten = rewrite_and_compare(&model, &int4(target, 32, true, Rounding::Nearest), &options);
        assert_eq!(rewritten.records[0].patches, 1);
        assert!(ops(&rewritten.model).contains(&"Add".to_string()), "C is added after the product");
        assert!(rewritten.comparison.min_cosine() > 0.99);
    }
}

#[test]
fn does_not_fire_on_a_weight_that_is_not_constant_or_narrower_than_a_block() {
    // the weight is a graph input
    let mut b = GraphBuilder::new("activations_only");
    let x = b.input("x", DataType::Float, &[2, 64]);
    let w = b.input("w", DataType::Float, &[64, 8]);
    let y = b.node("MatMul", &[&x, &w]);
    b.output(&y, DataType::Float, &[2, 8]);
    let not_constant = b.into_model(21);
    // K = 16 is less than one block of 32
    let too_narrow = linear(16, 8, 21);
    for model in [not_constant, too_narrow] {
        for target in [Target::Ort, Target::Portable] {
            let rewritten = rewrite(&model, &int4(target, 32, false, Rounding::Nearest));
            assert_eq!(rewritten, model);
        }
    }
}

#[test]
fn portable_below_opset_21_is_refused_with_a_reason() {
    let mut rewritten = linear(64, 8, 17);
    let error = run_pipeline(&mut rewritten, &int4(Target::Portable, 32, false, Rounding::Nearest), &DriverOptions::default()).unwrap_err();
    assert!(error.to_string().contains("opset 17") && error.to_string().contains("21"), "{error}");
}

/// ORT 1.32 runs MatMulNBits (and blocked int4 DequantizeLinear) with its own
/// kernels; the lowerings tract runs must agree to float rounding
/// (`tests/scripts/check_lowerings.py`, atol 1e-5). K = 80 is not a multiple of
/// the block: the last block is padded.
#[test]
fn onnxruntime_kernels_agree_with_the_lowerings() {
    let model = linear(80, 12, 21);
    let mut cases = Vec::new();
    for (target, zero_point, name) in [
        (Target::Ort, false, "matmul_nbits_symmetric"),
        (Target::Ort, true, "matmul_nbits_zero_point"),
        (Target::Portable, false, "dequantize_int4_symmetric"),
        (Target::Portable, true, "dequantize_int4_zero_point"),
    ] {
        let quantized = rewrite(&model, &int4(target, 32, zero_point, Rounding::Nearest));
        let mut lowered = quantized.clone();
        let options = DriverOptions { validate: true, ..DriverOptions::default() };
        lower_contrib_ops(&mut lowered, &options).unwrap();
        lower_standard_ops(&mut lowered, &options).unwrap();
        assert!(ops(&lowered).iter().all(|op| op == "MatMul" || op == "Add"), "{name}: {:?}", ops(&lowered));
        cases.push((name, quantized, lowered));
    }
    onnxruntime_agrees(cases);
}

/// GPTQ on the real MiniLM, calibrated on 64 sentences of calib.txt, against
/// round-to-nearest on the same grid, both measured in tract on 16 sentences of
/// dev.txt (padding masked).
#[test]
fn minilm_gptq_beats_round_to_nearest() {
    let Some(path) = shared_model("model.ts.onnx") else { return };
    let Some(tokenizer) = shared_model("tokenizer.json") else { return };
    let corpus = path.parent().unwrap().join("../../corpus");
    let dir = tempfile::tempdir().unwrap();
    let lines = |file: &str, count: usize| {
        let text = std::fs::read_to_string(corpus.join(file)).unwrap();
        let path = dir.path().join(file);
        std::fs::write(&path, text.lines().take(count).collect::<Vec<_>>().join("\n")).unwrap();
        path
    };
    let calibration = CalibrationSource::Text { file: lines("calib.txt", 64), tokenizer: tokenizer.clone(), max_len: 128, batch: 16 };
    let dev = CalibrationSource::Text { file: lines("dev.txt", 16), tokenizer, max_len: 128, batch: 16 };

    let original = onnx::load(&path).unwrap();
    let mut cleaned = original.clone();
    let cleanup = cleanup_passes(Target::Ort);
    run_pipeline(&mut cleaned, &cleanup, &DriverOptions::default()).unwrap();
    let hessians = activation_hessians(&cleaned, &calibration, 32, &HashSet::new()).unwrap();
    assert_eq!(hessians.len(), 6 * 4, "per layer: attention input (Q, K, V share it), context, FFN in, FFN out");

    let inputs = dev.batches(&original).unwrap().next().unwrap().unwrap();
    let options = verify::VerifyOptions { atol: f32::INFINITY, rtol: 0.0, inputs: Some(inputs), ..Default::default() };
    let cosine = |rounding: Rounding| {
        let quantized = rewrite(&cleaned, &int4(Target::Ort, 32, false, rounding));
        assert_eq!(ops(&quantized).iter().filter(|op| *op == "com.microsoft.MatMulNBits").count(), 36);
        verify_rewrite(&original, &quantized, &options).unwrap().min_cosine()
    };
    let rtn = cosine(Rounding::Nearest);
    let gptq = cosine(Rounding::Gptq { hessians, options: Default::default() });
    eprintln!("last_hidden_state cosine on 16 dev sentences: RTN {rtn:.5}, GPTQ {gptq:.5}");
    assert!(gptq > rtn, "GPTQ {gptq} is not better than RTN {rtn}");
    assert!(gptq > 0.95, "GPTQ cosine {gptq}");
}

fn quantize_cli(input: &Path, output: &Path, extra: &[&str]) -> std::process::Output {
    run_command("quantize", input, output, &[&["--mode", "int4-weight"], extra].concat())
}

/// The tiny BERT for both targets: every weight MatMul (K = 32 or 64) becomes
/// int4, the portable output is raised to opset 21, ONNX Runtime runs both.
#[test]
fn cli_quantizes_the_tiny_bert_for_both_targets_and_onnxruntime_runs_them() {
    let dir = tempfile::tempdir().unwrap();
    for (target, op) in [("ort", "com.microsoft.MatMulNBits"), ("portable", "DequantizeLinear")] {
        let out = dir.path().join(format!("bert.{target}.onnx"));
        let report = dir.path().join(format!("{target}.json"));
        let o =
            quantize_cli(&fixture("bert.ts.onnx"), &out, &["--target", target, "--zero-point", "--quantize-embeddings", "--report", report.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let model = onnx::load(&out).unwrap();
        // the word, position and token-type tables: GatherBlockQuantized, or a DequantizeLinear each
        let tables = if target == "ort" { ops(&model).iter().filter(|o| *o == "com.microsoft.GatherBlockQuantized").count() } else { 3 };
        assert_eq!(tables, 3, "{:?}", ops(&model));
        let weights = ops(&model).iter().filter(|o| *o == op).count() - if target == "ort" { 0 } else { tables };
        assert_eq!(weights, 12, "{:?}", ops(&model));
        assert!(model.graph.initializers.iter().all(|t| t.dtype != DataType::Float || t.element_count() < 20_000), "a float table stays");
        if target == "portable" {
            assert_eq!(model.opset(""), Some(21));
        }
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let ratio = report["int4_weight_bytes"].as_f64().unwrap() / report["replaced_float_weight_bytes"].as_f64().unwrap();
        assert!(ratio < 0.2, "{target}: weight bytes ratio {ratio}");
        // `onnxopt verify` reproduces the check, within the tolerance the report states
        let atol = report["verify_tolerance"]["atol"].as_f64().unwrap() * 1.001 + 1e-6;
        let v = run(&["verify", fixture("bert.ts.onnx").to_str().unwrap(), out.to_str().unwrap(), "--atol", &atol.to_string(), "--rtol", "0"]);
        assert!(v.status.success(), "{}{}", String::from_utf8_lossy(&v.stdout), stderr(&v));

        if let Some(cosine) = onnxruntime_cosine(&fixture("bert.ts.onnx"), &out) {
            assert!(cosine >= 0.98, "{target}: cosine {cosine}");
        }
    }
}

#[test]
fn cli_refuses_bad_block_sizes_and_gptq_without_data() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let o = quantize_cli(&fixture("bert.ts.onnx"), &out, &["--block-size", "48"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--block-size 48"), "{}", stderr(&o));
    let o = quantize_cli(&fixture("bert.ts.onnx"), &out, &["--rounding", "gptq"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("calibration data"), "{}", stderr(&o));
    // the portable form needs opset 21, which --max-opset 20 forbids
    let o = quantize_cli(&fixture("bert.ts.onnx"), &out, &["--target", "portable", "--max-opset", "20"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--max-opset 20") && stderr(&o).contains("opset 21"), "{}", stderr(&o));
    // accuracy_level is MatMulNBits': not for the portable form, nor another mode
    let o = quantize_cli(&fixture("bert.ts.onnx"), &out, &["--target", "portable", "--accuracy-level", "4"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--accuracy-level"), "{}", stderr(&o));
    let o = run_command("quantize", &fixture("bert.ts.onnx"), &out, &["--mode", "int8-dynamic", "--accuracy-level", "4"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--accuracy-level is for --mode int4-weight"), "{}", stderr(&o));
    assert!(files_in(dir.path()).is_empty());
}

/// An embedding lookup: y = Gather(table [128, 64], ids [2, 3]) (128 rows:
/// the ONNX Runtime check feeds token ids below 100).
fn embedding(axis: i64, table_is_input: bool) -> Model {
    let mut b = GraphBuilder::new("embedding");
    let ids = b.input("input_ids", DataType::Int64, &[2, 3]);
    let table = if table_is_input { b.input("table", DataType::Float, &[128, 64]) } else { b.initializer_f32("table", &[128, 64], &values(128 * 64, 3)) };
    b.add(Node::new("Gather", &[&table, &ids], &["y"]).with_name("embed").with_attr("axis", AttrValue::Int(axis)));
    let shape: &[i64] = if axis == 0 { &[2, 3, 64] } else { &[128, 2, 3] };
    b.output("y", DataType::Float, shape);
    b.into_model(21)
}

fn gather_int4(target: Target, zero_point: bool) -> Vec<Box<dyn Pass>> {
    let pass = QuantizeGatherInt4 { target, block_size: 32, zero_point, exclude: HashSet::new() };
    vec![Box::new(pass), Box::new(EliminateDeadCode)]
}

/// `--quantize-embeddings`: the table becomes int4 per row and block, as
/// GatherBlockQuantized (ort) or DequantizeLinear + Gather (portable); each
/// looked-up value moves by at most half a step (`max|block| / 7 / 2`, the
/// table's values being in [-1, 1)), and ONNX Runtime's kernel agrees with the
/// lowering tract runs.
#[test]
fn embedding_tables_become_int4_rows() {
    let model = embedding(0, false);
    let mut cases = Vec::new();
    for (target, zero_point, name, op) in [
        (Target::Ort, false, "gather_block_quantized_symmetric", "com.microsoft.GatherBlockQuantized"),
        (Target::Ort, true, "gather_block_quantized_zero_point", "com.microsoft.GatherBlockQuantized"),
        (Target::Portable, false, "dequantize_gather_symmetric", "DequantizeLinear"),
    ] {
        let quantized = rewrite(&model, &gather_int4(target, zero_point));
        assert!(ops(&quantized).contains(&op.to_string()), "{name}: {:?}", ops(&quantized));
        assert!(quantized.graph.initializer("table").is_none(), "{name}: the float table stays");
        let int4 = quantized.graph.initializers.iter().find(|t| t.dtype == DataType::Int4).unwrap();
        assert_eq!(int4.dims, [128, 64], "{name}");
        let options = verify::VerifyOptions { atol: 1.0 / 14.0 + 1e-6, rtol: 0.0, ..Default::default() };
        let comparison = verify_rewrite(&model, &quantized, &options).unwrap();
        assert!(comparison.passed(), "{name}: {comparison:?}");
        if name == "gather_block_quantized_symmetric" {
            insta::assert_snapshot!("quantize_gather_int4__ort_symmetric", format!("before:\n{model}\nafter:\n{quantized}"));
        }
        let mut lowered = quantized.clone();
        let driver = DriverOptions { validate: true, ..DriverOptions::default() };
        lower_contrib_ops(&mut lowered, &driver).unwrap();
        lower_standard_ops(&mut lowered, &driver).unwrap();
        assert_eq!(ops(&lowered), ["Gather"], "{name}");
        cases.push((name, quantized, lowered));
    }
    onnxruntime_agrees(cases);
}

#[test]
fn embedding_quantization_leaves_other_gathers_alone() {
    for (model, case) in [(embedding(1, false), "axis 1"), (embedding(0, true), "table is a graph input")] {
        let quantized = rewrite(&model, &gather_int4(Target::Ort, false));
        assert_eq!(ops(&quantized), ["Gather"], "{case}");
    }
    // rows narrower than a block
    let quantized =
        rewrite(&embedding(0, false), &[Box::new(QuantizeGatherInt4 { target: Target::Ort, block_size: 128, zero_point: false, exclude: HashSet::new() })]);
    assert_eq!(ops(&quantized), ["Gather"]);
}
