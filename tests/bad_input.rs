//! Bad input: each case gets a clear error naming the file, exit code 2, no
//! panic, and nothing written.

mod common;

use bytes::Bytes;
use common::*;
use onnxopt::ir::{DataType, GraphBuilder, Tensor};
use onnxopt::onnx::{self, ExternalData, SaveOptions};
use std::path::Path;

/// Runs `convert` on `input` into `dir`, asserting the failure contract; returns stderr.
fn convert_fails(input: &Path, dir: &Path) -> String {
    let before = files_in(dir);
    let out = dir.join("out.onnx");
    let o = run(&["--quiet", "convert", input.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "expected exit 2, got {:?}: {err}", o.status.code());
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(input.file_name().unwrap().to_str().unwrap()), "error must name the file: {err}");
    assert_eq!(files_in(dir), before, "nothing may be written");
    // The library refuses it the same way.
    assert!(onnx::load(input).is_err());
    err
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn truncated_file_says_where() {
    let dir = tempfile::tempdir().unwrap();
    let full = onnx::to_bytes(&small_mlp());
    let path = write(dir.path(), "truncated.onnx", &full[..full.len() / 2]);
    let err = convert_fails(&path, dir.path());
    assert!(err.contains("truncated protobuf at byte"), "{err}");
}

#[test]
fn random_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = onnxopt::verify::SeededRng::new(7);
    let noise: Vec<u8> = (0..4096).map(|_| rng.next_u64() as u8).collect();
    let path = write(dir.path(), "noise.onnx", &noise);
    let err = convert_fails(&path, dir.path());
    assert!(err.contains("protobuf"), "{err}");
}

#[test]
fn empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "empty.onnx", b"");
    let err = convert_fails(&path, dir.path());
    assert!(err.contains("empty file"), "{err}");
}

#[test]
fn valid_protobuf_that_is_not_a_model() {
    let dir = tempfile::tempdir().unwrap();
    // ir_version = 7, producer_name = "abc", and no graph
    let path = write(dir.path(), "notmodel.onnx", &[0x08, 0x07, 0x12, 0x03, b'a', b'b', b'c']);
    let err = convert_fails(&path, dir.path());
    assert!(err.contains("not an ONNX model") && err.contains("no graph"), "{err}");
}

#[test]
fn node_reading_a_tensor_nothing_produces() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = GraphBuilder::new("g");
    let x = b.input("x", DataType::Float, &[2]);
    let y = b.node("Add", &[&x, "ghost"]);
    b.output(&y, DataType::Float, &[2]);
    let path = dir.path().join("dangling.onnx");
    std::fs::write(&path, onnx::to_bytes(&b.into_model(17))).unwrap();
    let err = convert_fails(&path, dir.path());
    assert!(err.contains("reads 'ghost'"), "{err}");
}

fn model_with_initializer(t: Tensor) -> onnxopt::ir::Model {
    let mut b = GraphBuilder::new("g");
    let x = b.input("x", DataType::Float, &[4]);
    let w = b.initializer(t);
    let y = b.node("Add", &[&x, &w]);
    b.output(&y, DataType::Float, &[4]);
    b.into_model(17)
}

#[test]
fn raw_data_length_disagrees_with_dims() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::from_raw("w", DataType::Float, vec![4], Bytes::from(vec![0u8; 8]));
    let path = write(dir.path(), "short.onnx", &onnx::to_bytes(&model_with_initializer(t)));
    let err = convert_fails(&path, dir.path());
    assert!(err.contains("tensor 'w'") && err.contains("8 bytes") && err.contains("needs 16"), "{err}");
}

#[test]
fn dims_whose_product_overflows() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::from_raw("w", DataType::Float, vec![1 << 40, 1 << 40], Bytes::new());
    let path = write(dir.path(), "huge.onnx", &onnx::to_bytes(&model_with_initializer(t)));
    let err = convert_fails(&path, dir.path());
    assert!(err.contains("multiply past"), "{err}");
}

#[test]
fn negative_dims() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::from_raw("w", DataType::Float, vec![-4], Bytes::new());
    let path = write(dir.path(), "negative.onnx", &onnx::to_bytes(&model_with_initializer(t)));
    let err = convert_fails(&path, dir.path());
    assert!(err.contains("negative"), "{err}");
}

/// A model `m.onnx` whose 4 KiB weight lives in `m.onnx.data`, in its own folder.
fn external_model(dir: &Path) -> std::path::PathBuf {
    let values: Vec<f32> = (0..1024).map(|i| i as f32).collect();
    let array = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[1024]), values).unwrap();
    let mut b = GraphBuilder::new("g");
    let x = b.input("x", DataType::Float, &[1024]);
    let w = b.initializer(Tensor::from_f32("w", &array));
    let y = b.node("Add", &[&x, &w]);
    b.output(&y, DataType::Float, &[1024]);
    let path = dir.join("m.onnx");
    onnx::save(&b.into_model(17), &path, &SaveOptions { external_data: ExternalData::Always }).unwrap();
    assert!(dir.join("m.onnx.data").exists());
    onnx::load(&path).expect("the untouched model loads");
    path
}

/// Rewrites the external location in place (same length keeps the protobuf valid).
fn relocate(model: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let mut patched = std::fs::read(model).unwrap();
    let at = patched.windows(from.len()).position(|w| w == from.as_bytes()).expect("location present");
    patched[at..at + to.len()].copy_from_slice(to.as_bytes());
    std::fs::write(model, patched).unwrap();
}

#[test]
fn external_data_outside_the_model_folder() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    let model = external_model(&dir);
    std::fs::copy(dir.join("m.onnx.data"), root.path().join("x.o.data")).unwrap();
    relocate(&model, "m.onnx.data", "../x.o.data");
    let err = convert_fails(&model, &dir);
    assert!(err.contains("external data of tensor 'w'") && err.contains("'..'"), "{err}");

    relocate(&model, "../x.o.data", "/etc/passwd");
    let err = convert_fails(&model, &dir);
    assert!(err.contains("absolute") || err.contains("plain relative path"), "{err}");
}

#[test]
fn external_data_through_a_symlink_out() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    let model = external_model(&dir);
    std::fs::rename(dir.join("m.onnx.data"), root.path().join("real.data")).unwrap();
    std::os::unix::fs::symlink(root.path().join("real.data"), dir.join("m.onnx.data")).unwrap();
    let err = convert_fails(&model, &dir);
    assert!(err.contains("outside the model's folder"), "{err}");
}

#[test]
fn external_data_past_the_end_of_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = external_model(dir.path());
    let data = dir.path().join("m.onnx.data");
    let len = std::fs::metadata(&data).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&data).unwrap().set_len(len - 100).unwrap();
    let err = convert_fails(&model, dir.path());
    assert!(err.contains("past the end"), "{err}");
}

#[test]
fn missing_external_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = external_model(dir.path());
    std::fs::remove_file(dir.path().join("m.onnx.data")).unwrap();
    let err = convert_fails(&model, dir.path());
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn missing_input_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = convert_fails(&dir.path().join("absent.onnx"), dir.path());
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn refuses_to_overwrite_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.onnx", &onnx::to_bytes(&small_mlp()));
    let before = std::fs::read(&path).unwrap();
    let o = run(&["--quiet", "convert", path.to_str().unwrap(), "-o", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("refusing to overwrite"));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(files_in(dir.path()), vec!["m.onnx"]);
}

#[test]
fn bad_usage_exits_2() {
    let o = run(&["convert"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
}

/// Each cause is said once: the library's message already quotes its source.
#[test]
fn a_missing_file_is_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.onnx");
    let o = run(&["--quiet", "convert", missing.to_str().unwrap(), "-o", dir.path().join("out.onnx").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("missing.onnx: cannot read"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
