//! Lossless round trip: a model read and written back without rewrites is the
//! same model, field for field (and here byte for byte).

mod common;

use bytes::Bytes;
use common::*;
use onnxopt::ir::{DataType, GraphBuilder, Tensor, TensorData};
use onnxopt::onnx::{self, ExternalData, SaveOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

fn committed_fixtures() -> Vec<PathBuf> {
    let mut models: Vec<PathBuf> = std::fs::read_dir(fixture(""))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "onnx")).collect())
        .unwrap_or_default();
    models.sort();
    models
}

/// Every committed fixture and both shared exports re-encode to identical bytes.
#[test]
fn fixtures_and_shared_models_are_byte_identical() {
    let mut models = committed_fixtures();
    models.extend(["model.ts.onnx", "model.dynamo.onnx"].iter().filter_map(|f| shared_model(f)));
    for path in &models {
        let original = std::fs::read(path).unwrap();
        let model = onnx::load(path).unwrap_or_else(|e| panic!("{e}"));
        assert!(onnx::to_bytes(&model) == original, "{} changed in the round trip", path.display());
    }
    eprintln!("{} models round-tripped byte for byte", models.len());
}

#[test]
fn external_data_out_and_back_in() {
    let dir = tempfile::tempdir().unwrap();
    let original = small_mlp_with_large_weight();
    let external = dir.path().join("ext.onnx");
    let summary = onnx::save(&original, &external, &SaveOptions { external_data: ExternalData::Always }).unwrap();
    let (data_path, data_len) = summary.external_file.expect("a data file");
    assert!(data_len >= 64 * 1024);
    let loaded = onnx::load(&external).unwrap();
    let w = loaded.graph.initializer("w").unwrap();
    assert!(w.stored_externally);
    assert_eq!(w.data, original.graph.initializer("w").unwrap().data);
    // small tensors stay inline
    assert!(!loaded.graph.initializer("b").unwrap().stored_externally);

    // as-input keeps it external; --inline brings it back
    let again = dir.path().join("again.onnx");
    onnx::save(&loaded, &again, &SaveOptions::default()).unwrap();
    assert!(onnx::external_data_path(&again).exists());
    let inline = dir.path().join("inline.onnx");
    let summary = onnx::save(&loaded, &inline, &SaveOptions { external_data: ExternalData::Never }).unwrap();
    assert!(summary.external_file.is_none());
    let reloaded = onnx::load(&inline).unwrap();
    assert_eq!(reloaded.graph.initializer("w").unwrap().data, original.graph.initializer("w").unwrap().data);
    assert!(data_path.exists());
}

fn small_mlp_with_large_weight() -> onnxopt::ir::Model {
    let values: Vec<f32> = (0..128 * 128).map(|i| (i % 97) as f32 * 0.01).collect();
    let array = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[128, 128]), values).unwrap();
    let mut b = GraphBuilder::new("g");
    let x = b.input("x", DataType::Float, &[-1, 128]);
    let w = b.initializer(Tensor::from_f32("w", &array));
    let bias = b.initializer_f32("b", &[128], &[0.5; 128]);
    let h = b.node("MatMul", &[&x, &w]);
    let y = b.node("Add", &[&h, &bias]);
    b.output(&y, DataType::Float, &[-1, 128]);
    b.into_model(17)
}

fn python_with_onnx() -> Option<&'static str> {
    let ok = Command::new("python3").args(["-c", "import onnx"]).output().is_ok_and(|o| o.status.success());
    if ok {
        return Some("python3");
    }
    // CI installs onnx (.ci/run): there a missing package is a failure, not a skip.
    assert!(std::env::var("CI").is_err(), "CI must have python3 with onnx==1.23.2 installed");
    eprintln!("skipping: python3 with the onnx package is not available");
    None
}

/// All 1,884 ONNX backend node test models, plus the fixtures and shared exports:
/// `onnx.load(original) == onnx.load(converted)`.
#[test]
fn onnx_backend_node_tests_round_trip() {
    let Some(python) = python_with_onnx() else { return };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/backend_roundtrip.py");
    let mut extra: Vec<PathBuf> = committed_fixtures();
    extra.extend(["model.ts.onnx", "model.dynamo.onnx"].iter().filter_map(|f| shared_model(f)));
    let out = Command::new(python).arg(script).arg(env!("CARGO_BIN_EXE_onnxopt")).args(&extra).output().expect("python runs");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(out.status.success(), "round trip failures:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("backend node test models: 1884"), "{text}");
}

/// A model past protobuf's 2 GiB limit goes to external data on its own, reads
/// back equal, and refuses `--inline`.
#[test]
fn model_over_2_gib_uses_external_data() {
    const ELEMENTS: usize = 600 * 1024 * 1024; // 2.4 GB of float32
    let dir = tempfile::tempdir().unwrap();
    let mut raw = vec![0u8; ELEMENTS * 4];
    for (i, chunk) in raw.chunks_mut(1 << 20).enumerate() {
        chunk[0] = i as u8; // a mark per MiB, so a misplaced chunk shows
    }
    let mut b = GraphBuilder::new("big");
    let x = b.input("x", DataType::Float, &[ELEMENTS as i64]);
    let w = b.initializer(Tensor::from_raw("w", DataType::Float, vec![ELEMENTS as i64], Bytes::from(raw)));
    let y = b.node("Add", &[&x, &w]);
    b.output(&y, DataType::Float, &[ELEMENTS as i64]);
    let model = b.into_model(17);

    let first = dir.path().join("big.onnx");
    let summary = onnx::save(&model, &first, &SaveOptions::default()).unwrap();
    assert!(summary.external_file.is_some(), "past 2 GiB the data must go external");
    assert!(summary.model_bytes < 1 << 20);
    drop(model);

    // convert through the CLI, as a user would
    let second = dir.path().join("copy.onnx");
    let o = run(&["--quiet", "convert", first.to_str().unwrap(), "-o", second.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = onnx::load(&first).unwrap();
    let b = onnx::load(&second).unwrap();
    assert_eq!(a, b);
    let TensorData::Raw(bytes) = &b.graph.initializer("w").unwrap().data else { panic!("raw data") };
    assert_eq!(bytes.len(), ELEMENTS * 4);
    assert_eq!(bytes[5 << 20], 5);

    let inline = dir.path().join("inline.onnx");
    let o = run(&["--quiet", "convert", first.to_str().unwrap(), "-o", inline.to_str().unwrap(), "--inline"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("2 GiB"), "{}", stderr(&o));
    assert!(!inline.exists());
}
