//! `onnxopt optimize` end to end: fusion counts on real exports, the tract
//! check, refusal to write a result beyond tolerance, reports, bisecting, and
//! targets that must emit standard ONNX only.

mod common;

use common::*;
use onnxopt::onnx;
use std::path::Path;

fn optimize(input: &Path, output: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["--quiet", "optimize", input.to_str().unwrap(), "-o", output.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args)
}

fn op_counts(path: &Path) -> std::collections::BTreeMap<String, usize> {
    let model = onnx::load(path).unwrap();
    let mut counts = std::collections::BTreeMap::new();
    for n in model.graph.nodes() {
        *counts.entry(n.qualified_op()).or_default() += 1;
    }
    counts
}

/// The acceptance counts on both MiniLM exports: every attention block fused
/// (6 layers), no Softmax left, SkipLayerNormalization = 2 x layers.
#[test]
fn minilm_exports_fuse_completely() {
    for file in ["model.ts.onnx", "model.dynamo.onnx"] {
        let Some(input) = shared_model(file) else { return };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("fused.onnx");
        let report = dir.path().join("report.json");
        let o = optimize(&input, &out, &["--target", "ort", "--report", report.to_str().unwrap()]);
        assert!(o.status.success(), "{file}: {}", stderr(&o));
        let counts = op_counts(&out);
        assert_eq!(counts.get("com.microsoft.Attention"), Some(&6), "{file}: {counts:?}");
        assert_eq!(counts.get("com.microsoft.SkipLayerNormalization"), Some(&12), "{file}: {counts:?}");
        assert_eq!(counts.get("com.microsoft.BiasGelu"), Some(&6), "{file}: {counts:?}");
        assert_eq!(counts.get("com.microsoft.EmbedLayerNormalization"), Some(&1), "{file}: {counts:?}");
        assert_eq!(counts.get("Softmax"), None, "{file}: {counts:?}");
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        assert_eq!(report["verification"]["outputs"][0]["within_tolerance"], true);
        assert!(report["verification"]["outputs"][0]["max_abs"].as_f64().unwrap() < 1e-4);
        let fuse = report["passes"].as_array().unwrap().iter().find(|p| p["pass"] == "fuse").unwrap();
        assert_eq!(fuse["by_origin"]["attention-sdpa"], 6);
        assert!(report["nodes_after"].as_u64().unwrap() < report["nodes_before"].as_u64().unwrap());
    }
}

/// A result beyond tolerance is not written; the error names the last pass.
#[test]
fn refuses_a_result_beyond_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let o = optimize(&fixture("bert.ts.onnx"), &out, &["--atol", "0", "--rtol", "0"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("the first pass whose result does: fuse (pass 8 of 13)"), "{}", stderr(&o));
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn stop_after_bisects() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let report = dir.path().join("report.json");
    let o = optimize(&fixture("bert.ts.onnx"), &out, &["--stop-after", "3", "--report", report.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let applied: u64 = report["passes"].as_array().unwrap().iter().map(|p| p["patches"].as_u64().unwrap()).sum();
    assert_eq!(applied, 3);
}

/// The portable and TensorRT targets emit standard ONNX only, and still check out in tract.
#[test]
fn standard_targets_emit_no_contrib_ops() {
    for target in ["portable", "tensorrt"] {
        for file in ["bert.ts.onnx", "bert.dynamo.onnx", "gpt2.dynamo.onnx", "vit.dynamo.onnx"] {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("out.onnx");
            let o = optimize(&fixture(file), &out, &["--target", target]);
            assert!(o.status.success(), "{target} {file}: {}", stderr(&o));
            let model = onnx::load(&out).unwrap();
            assert!(model.graph.nodes().all(|n| n.domain.is_empty()), "{target} {file}");
            assert!(model.opset_imports.iter().all(|o| o.domain.is_empty() || o.domain == "ai.onnx"));
            assert_eq!(model.opset(""), onnx::load(&fixture(file)).unwrap().opset(""), "the opset stays");
        }
    }
}

/// Optimizing an optimized model changes nothing more.
#[test]
fn optimize_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let once = dir.path().join("once.onnx");
    let twice = dir.path().join("twice.onnx");
    assert!(optimize(&fixture("bert.dynamo.onnx"), &once, &[]).status.success());
    let report = dir.path().join("report.json");
    let o = optimize(&once, &twice, &["--report", report.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let applied: u64 = report["passes"].as_array().unwrap().iter().map(|p| p["patches"].as_u64().unwrap()).sum();
    assert_eq!(applied, 0, "{report}");
}

#[test]
fn unknown_pass_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = optimize(&fixture("bert.ts.onnx"), &dir.path().join("o.onnx"), &["--skip", "fusee"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown pass 'fusee'"), "{}", stderr(&o));
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn unknown_target_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = optimize(&fixture("bert.ts.onnx"), &dir.path().join("o.onnx"), &["--target", "tpu"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown target 'tpu'"), "{}", stderr(&o));
}
