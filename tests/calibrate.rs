//! Calibration: exact statistics of a tiny model on known inputs, histogram
//! percentiles across a growing range, npz and text sources, and MiniLM's
//! attention outputs tapped over real sentences.

mod common;

use common::*;
use ndarray::{arr2, Array1, ArrayD, IxDyn};
use onnxopt::calibrate::{self, CalibrateError, CalibrationSource, Stats};
use onnxopt::ir::{DataType, GraphBuilder, Model};
use onnxopt::onnx;
use onnxopt::verify::NamedInput;
use std::path::Path;
use tract_onnx::prelude::IntoTensor;

/// h = x @ w, y = Relu(h), with x: float32[batch, 3] and w = [[1, -1], [0, 0], [0, 0]]:
/// h = [x0, -x0], so a row [a, _, _] gives h = [a, -a].
fn tiny_model() -> Model {
    let mut b = GraphBuilder::new("tiny");
    let x = b.input("x", DataType::Float, &[-1, 3]);
    let w = b.initializer_f32("w", &[3, 2], &[1.0, -1.0, 0.0, 0.0, 0.0, 0.0]);
    let h = b.node("MatMul", &[&x, &w]);
    assert_eq!(h, "matmul_1", "the tests below tap h by this name");
    let y = b.node("Relu", &[&h]);
    b.output(&y, DataType::Float, &[-1, 2]);
    b.into_model(17)
}

fn values<T: tract_onnx::prelude::Datum + Copy>(t: &tract_onnx::prelude::Tensor) -> Vec<T> {
    t.to_plain_array_view::<T>().unwrap().iter().copied().collect()
}

fn write_npz(path: &Path, x: ndarray::Array2<f32>) {
    let mut npz = ndarray_npy::NpzWriter::new(std::fs::File::create(path).unwrap());
    npz.add_array("x", &x).unwrap();
    npz.finish().unwrap();
}

#[test]
fn tiny_model_statistics_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("x.npz");
    // first column 1, 4, -2, 3, 0.5: h's channel 0 takes these, channel 1 their negation
    write_npz(&npz, arr2(&[[1.0, 9.0, 9.0], [4.0, 9.0, 9.0], [-2.0, 9.0, 9.0], [3.0, 9.0, 9.0], [0.5, 9.0, 9.0]]));
    let source = CalibrationSource::Npz { path: npz, batch: 2 };
    let stats = calibrate::calibrate(&tiny_model(), &["matmul_1", "x"], &source).unwrap();
    let h = &stats[0];
    assert_eq!(h.name, "matmul_1");
    assert_eq!((h.min, h.max, h.count, h.non_finite), (-4.0, 4.0, 10, 0));
    assert_eq!(h.channels.min, vec![-2.0, -4.0]);
    assert_eq!(h.channels.max, vec![4.0, 2.0]);
    assert_eq!(h.channels.mean_abs, vec![2.1, 2.1]);
    assert_eq!(h.percentile(100.0), Some(4.0));
    assert_eq!(h.percentile(0.0), Some(-4.0));
    // a graph input can be tapped too
    assert_eq!((stats[1].min, stats[1].max, stats[1].channels.min.len()), (-2.0, 9.0, 3));
    let json = serde_json::to_value(h).unwrap();
    assert_eq!(json["channels"]["max"][0], 4.0);
    assert_eq!(json["histogram"]["counts"].as_array().unwrap().len(), calibrate::HISTOGRAM_BINS);
}

#[test]
fn percentiles_survive_a_growing_range() {
    // 0..=1000 in three batches: the middle one sets the range, the others widen it both ways.
    let mut stats = Stats::new("ramp");
    for (low, high) in [(400, 600), (601, 1000), (0, 399)] {
        // one channel (the last axis), so per-channel and per-tensor agree
        let column = ndarray::Array2::from_shape_fn((high - low + 1, 1), |(r, _)| (low + r) as f32);
        stats.observe(&column.into_tensor()).unwrap();
    }
    assert_eq!((stats.min, stats.max, stats.count), (0.0, 1000.0, 1001));
    let width = stats.histogram.as_ref().unwrap().bin_width as f32;
    assert!(width < 1.0, "range grew to {width} per bin");
    let median = stats.percentile(50.0).unwrap();
    assert!((median - 500.0).abs() <= 2.0 * width.max(1.0), "median {median}");
    let (low, high) = stats.percentile_range(90.0).unwrap();
    assert!((low - 50.0).abs() <= 2.0 && (high - 950.0).abs() <= 2.0, "{low}..{high}");
    assert_eq!(stats.histogram.as_ref().unwrap().total(), 1001);
    assert_eq!((stats.channels.min[0], stats.channels.max[0], stats.channels.mean_abs[0]), (0.0, 1000.0, 500.0));
}

#[test]
fn non_finite_values_are_counted_apart() {
    let mut stats = Stats::new("t");
    stats.observe(&Array1::from(vec![1.0f32, f32::NAN, -3.0, f32::INFINITY]).into_tensor()).unwrap();
    assert_eq!((stats.min, stats.max, stats.count, stats.non_finite), (-3.0, 1.0, 2, 2));
    let other_width = ArrayD::<f32>::zeros(IxDyn(&[2, 5])).into_tensor();
    assert!(matches!(stats.observe(&other_width), Err(CalibrateError::Observe { .. })));
}

#[test]
fn gram_matrix_is_x_transpose_x_over_all_batches() {
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("x.npz");
    // h = [a, -a] for each row's first value a: X^T X = sum a^2 * [[1, -1], [-1, 1]]
    write_npz(&npz, arr2(&[[1.0, 9.0, 9.0], [4.0, 9.0, 9.0], [-2.0, 9.0, 9.0]]));
    let source = CalibrationSource::Npz { path: npz, batch: 2 };
    let grams = calibrate::gram_matrices(&tiny_model(), &["matmul_1", "x"], &source).unwrap();
    let h = &grams[0];
    assert_eq!((h.features(), h.rows), (2, 3));
    let entries = [h.xtx[(0, 0)], h.xtx[(0, 1)], h.xtx[(1, 0)], h.xtx[(1, 1)]];
    assert_eq!(entries, [21.0, -21.0, -21.0, 21.0]);
    assert_eq!(grams[1].squared_norms(), vec![21.0, 243.0, 243.0]);
    assert_eq!(grams[1].xtx[(0, 1)], 9.0 * (1.0 + 4.0 - 2.0));
}

#[test]
fn npz_source_cuts_batches_along_the_first_axis() {
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("x.npz");
    write_npz(&npz, ndarray::Array2::from_shape_fn((5, 3), |(r, c)| (r * 3 + c) as f32));
    let model = tiny_model();
    let batches: Vec<Vec<NamedInput>> = CalibrationSource::Npz { path: npz.clone(), batch: 2 }.batches(&model).unwrap().map(Result::unwrap).collect();
    let rows: Vec<Vec<usize>> = batches.iter().map(|b| b[0].value.shape().to_vec()).collect();
    assert_eq!(rows, vec![vec![2, 3], vec![2, 3], vec![1, 3]]);
    assert_eq!(values::<f32>(&batches[2][0].value), vec![12.0, 13.0, 14.0]);

    // an input the file lacks is named in the error
    let mut two_inputs = model.clone();
    two_inputs.graph.inputs.push(onnxopt::ir::ValueInfo::tensor("mask", DataType::Int64, vec![]));
    let e = CalibrationSource::Npz { path: npz, batch: 2 }.batches(&two_inputs).err().unwrap();
    assert!(matches!(&e, CalibrateError::UnfillableInput { input, .. } if input == "mask"), "{e}");
}

#[test]
fn taps_must_name_activations() {
    let model = tiny_model();
    let tapped = calibrate::with_taps(&model, &["matmul_1", "relu_2"]).unwrap();
    let outputs: Vec<&str> = tapped.graph.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(outputs.len(), 2, "{outputs:?}: the output is not added twice");
    for bad in ["w", "nowhere"] {
        let e = calibrate::with_taps(&model, &[bad]).err().unwrap();
        assert!(matches!(&e, CalibrateError::Tap { tensor, .. } if tensor == bad), "{e}");
    }
}

#[test]
fn a_text_source_cannot_fill_float_inputs() {
    let Some(tokenizer) = shared_model("tokenizer.json") else { return };
    let source = CalibrationSource::Text { file: "unused.txt".into(), tokenizer, max_len: 16, batch: 2 };
    let e = source.batches(&tiny_model()).err().unwrap();
    assert!(matches!(&e, CalibrateError::UnfillableInput { input, .. } if input == "x"), "{e}");
}

fn calib_text() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus/calib.txt")
}

/// The first three lines of calib.txt as Python's `tokenizers` 0.23.3 encodes
/// them with MiniLM's tokenizer.json (`Tokenizer.from_file(...).encode(line).ids`,
/// padding dropped).
const PYTHON_IDS: [&[i64]; 3] = [
    &[101, 1996, 2709, 3643, 2442, 2022, 1037, 5164, 4874, 1012, 102],
    &[101, 3602, 2008, 1996, 8651, 2013, 3853, 4874, 2000, 6013, 4118, 4874, 6433, 2169, 2051, 1996, 17961, 2003, 5140, 2013, 1996, 6013, 1012, 102],
    &[
        101, 7161, 2000, 23325, 2019, 10047, 28120, 3085, 5537, 2008, 3397, 4895, 14949, 25459, 2571, 5300, 2097, 2765, 1999, 1000, 2828, 2121, 29165, 1000,
        1012, 102,
    ],
];

#[test]
fn text_source_matches_python_tokenizers() {
    let (Some(tokenizer), Some(model)) = (shared_model("tokenizer.json"), shared_model("model.ts.onnx")) else { return };
    let model = onnx::load(&model).unwrap();
    let source = CalibrationSource::Text { file: calib_text(), tokenizer, max_len: 128, batch: 3 };
    let mut batches = source.batches(&model).unwrap();
    let first = batches.next().unwrap().unwrap();
    let get = |name: &str| first.iter().find(|i| i.name == name).unwrap().value.clone();
    let (ids, mask, types) = (get("input_ids"), get("attention_mask"), get("token_type_ids"));
    assert_eq!(ids.shape(), &[3, 26], "padded to the longest sentence");
    assert_eq!((mask.shape(), types.shape()), (&[3usize, 26][..], &[3usize, 26][..]));
    let ids = values::<i64>(&ids);
    let mask = values::<i64>(&mask);
    for (row, want) in PYTHON_IDS.iter().enumerate() {
        let got = &ids[row * 26..(row + 1) * 26];
        assert_eq!(&got[..want.len()], *want, "sentence {row}");
        assert!(got[want.len()..].iter().all(|&id| id == 0), "padding of sentence {row}");
        let ones = mask[row * 26..(row + 1) * 26].iter().take_while(|&&m| m == 1).count();
        assert_eq!(ones, want.len());
        assert_eq!(mask[row * 26..(row + 1) * 26].iter().sum::<i64>(), want.len() as i64);
    }
    assert!(values::<i64>(&types).iter().all(|&t| t == 0));
    // 500 lines in batches of 3; max_len caps every batch
    assert_eq!(batches.count(), 166);
    let capped = CalibrationSource::Text { file: calib_text(), tokenizer: shared_model("tokenizer.json").unwrap(), max_len: 8, batch: 4 };
    for batch in capped.batches(&model).unwrap().take(10) {
        let batch = batch.unwrap();
        assert_eq!(batch[0].value.shape()[0], 4);
        assert!(batch[0].value.shape()[1] <= 8);
    }
}

#[test]
fn minilm_attention_outputs_have_sane_statistics() {
    let (Some(tokenizer), Some(path)) = (shared_model("tokenizer.json"), shared_model("model.ts.onnx")) else { return };
    let model = onnx::load(&path).unwrap();
    // the input of each layer's attention output projection: the attention result
    let taps: Vec<String> =
        model.graph.nodes().filter(|n| n.op_type == "MatMul" && n.name.ends_with("attention/output/dense/MatMul")).map(|n| n.inputs[0].clone()).collect();
    assert_eq!(taps.len(), 6, "{taps:?}");
    let taps: Vec<&str> = taps.iter().map(String::as_str).collect();
    // 16 sentences in 2 batches keep the test quick
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("calib16.txt");
    let text = std::fs::read_to_string(calib_text()).unwrap();
    std::fs::write(&file, text.lines().take(16).collect::<Vec<_>>().join("\n")).unwrap();
    let source = CalibrationSource::Text { file, tokenizer, max_len: 64, batch: 8 };
    let stats = calibrate::calibrate(&model, &taps, &source).unwrap();
    assert_eq!(stats.len(), 6);
    for s in &stats {
        assert_eq!(s.non_finite, 0, "{}", s.name);
        assert_eq!(s.channels.min.len(), 384, "{}", s.name);
        assert!(s.min < 0.0 && s.max > 0.0 && s.max - s.min < 100.0, "{}: {}..{}", s.name, s.min, s.max);
        let (low, high) = s.percentile_range(99.9).unwrap();
        eprintln!("{}: {}..{}, 99.9% in {low}..{high}", s.name, s.min, s.max);
        assert!(s.min <= low && low < high && high <= s.max, "{}: {low}..{high}", s.name);
        assert!(s.channels.mean_abs.iter().all(|&m| m > 0.0 && m < s.max.max(-s.min)), "{}", s.name);
        assert_eq!(s.histogram.as_ref().unwrap().total(), s.count);
    }
}

/// `onnxopt calibrate`: by default the activation of every MatMul with a constant
/// weight; JSON statistics; no data is a usage error.
#[test]
fn calibrate_command() {
    use ndarray_npy::NpzWriter;
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("mlp.onnx");
    std::fs::write(&model_path, onnxopt::onnx::to_bytes(&common::small_mlp())).unwrap();
    let npz = dir.path().join("x.npz");
    let mut w = NpzWriter::new(std::fs::File::create(&npz).unwrap());
    let x = ndarray::Array2::<f32>::from_shape_fn((5, 4), |(i, j)| i as f32 - j as f32);
    w.add_array("x", &x).unwrap();
    w.finish().unwrap();
    let o = common::run(&["--quiet", "calibrate", model_path.to_str().unwrap(), "--calib", npz.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stats.as_array().unwrap().len(), 1);
    assert_eq!(stats[0]["name"], "x");
    assert_eq!(stats[0]["min"], -3.0);
    assert_eq!(stats[0]["max"], 4.0);
    let o = common::run(&["calibrate", model_path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(common::stderr(&o).contains("calibration data needed"), "{}", common::stderr(&o));
}
