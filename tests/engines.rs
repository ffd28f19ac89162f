//! The verification engines: ONNX Runtime (`--engine ort`, loaded at run time
//! from ORT_DYLIB_PATH or the onnxruntime wheel), tract's fallback to it for a
//! model tract cannot load, and the error when neither engine runs a model.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// Whether this machine has ONNX Runtime for the `ort` crate; prints why the
/// caller skips when not (`.ci/run` installs the onnxruntime wheel).
fn ort_available() -> bool {
    match onnxopt::verify::onnx_runtime::available() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("skipping: ONNX Runtime is not available here ({why})");
            false
        }
    }
}

/// y = Det(x): a standard op tract 0.23 does not implement, ONNX Runtime does.
fn determinant_model(dir: &Path) -> PathBuf {
    use onnxopt::ir::{DataType, GraphBuilder};
    let mut b = GraphBuilder::new("det");
    let x = b.input("x", DataType::Float, &[2, 3, 3]);
    let y = b.node("Det", &[&x]);
    b.output(&y, DataType::Float, &[2]);
    let path = dir.join("det.onnx");
    onnxopt::onnx::save(&b.into_model(17), &path, &Default::default()).unwrap();
    path
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// ORT runs the fused com.microsoft ops of a `--target ort` output itself:
/// no lowering, and its kernels agree with the export.
#[test]
fn ort_checks_fused_outputs_with_its_own_kernels() {
    if !ort_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fused.onnx");
    let json = dir.path().join("report.json");
    let o = run_command("optimize", &fixture("bert.ts.onnx"), &out, &["--target", "ort", "--engine", "ort", "--report", json.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = report(&json);
    assert_eq!(report["verification"]["engine"], "onnxruntime");
    assert!(report["verification"].get("fallback").is_none());
    assert!(report["verification"]["outputs"][0]["max_abs"].as_f64().unwrap() < 1e-4, "{report}");
    let ops: Vec<String> = onnxopt::onnx::load(&out).unwrap().graph.nodes().map(|n| n.qualified_op()).collect();
    assert!(ops.iter().any(|op| op == "com.microsoft.Attention"), "{ops:?}");

    let o = run(&["--quiet", "verify", "--engine", "ort", fixture("bert.ts.onnx").to_str().unwrap(), out.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["engine"], "onnxruntime");
}

/// The default engine falls back to ORT where tract cannot load the reference,
/// says so, and writes the verified result.
#[test]
fn tract_falls_back_to_ort() {
    if !ort_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = determinant_model(dir.path());
    let out = dir.path().join("out.onnx");
    let json = dir.path().join("report.json");
    let o = run(&["optimize", input.to_str().unwrap(), "-o", out.to_str().unwrap(), "--report", json.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("note: tract could not run the models"), "{}", stderr(&o));
    assert!(stderr(&o).contains("Det"), "{}", stderr(&o));
    let report = report(&json);
    assert_eq!(report["verification"]["engine"], "onnxruntime");
    assert!(report["verification"]["fallback"].as_str().unwrap().contains("ONNX Runtime ran them"));
    assert!(out.exists());

    // --engine tract asks for tract alone: no fallback
    let o = run_command("optimize", &input, &dir.path().join("tract.onnx"), &["--engine", "tract"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(!dir.path().join("tract.onnx").exists());
}

/// When neither engine can run a model, nothing is written and the message
/// gives both reasons and the way out; the exit code is 1 (not verified),
/// not 2 (bad input): the model is fine.
#[test]
fn no_engine_means_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let input = determinant_model(dir.path());
    let out = dir.path().join("out.onnx");
    let o = onnxopt()
        .env("ORT_DYLIB_PATH", dir.path().join("missing/libonnxruntime.so"))
        .args(["--quiet", "optimize", input.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let message = stderr(&o);
    assert!(message.contains("could not verify: no engine could run the models"), "{message}");
    assert!(message.contains("Unimplemented(Det)"), "{message}");
    assert!(message.contains("missing/libonnxruntime.so"), "{message}");
    assert!(message.contains("--no-verify"), "{message}");
    assert_eq!(files_in(dir.path()), vec!["det.onnx"]);

    // --no-verify writes it
    let o = run_command("optimize", &input, &out, &["--no-verify"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.exists());
}
