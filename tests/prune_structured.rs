//! Structured pruning (heads + FFN neurons to a FLOP budget, with least-squares
//! reconstruction) and layer dropping, on the tiny BERT fixtures in their three
//! forms (TorchScript export, dynamo export, `optimize --target ort`) and on the
//! shared MiniLM when present.

mod common;

use common::*;
use onnxopt::calibrate::CalibrationSource;
use onnxopt::ir::{Model, Node};
use onnxopt::passes::pipeline::{optimization_passes, PipelineOptions, Target};
use onnxopt::passes::{run_pipeline, DriverOptions};
use onnxopt::prune::blocks::{find_blocks, BlockError};
use onnxopt::prune::layers::drop_layers;
use onnxopt::prune::structured::prune_structured;
use onnxopt::prune::PruneError;
use onnxopt::onnx;
use std::path::Path;

fn load(path: &Path) -> Model {
    onnx::load(path).unwrap()
}

fn ort_fused(model: &Model) -> Model {
    let mut fused = model.clone();
    run_pipeline(&mut fused, &optimization_passes(Target::Ort, &PipelineOptions::default()), &DriverOptions::default()).unwrap();
    fused
}

/// The three forms of the tiny BERT (hidden 32, 2 layers, 4 heads of 8, FFN 64).
fn bert_forms() -> Vec<(&'static str, Model)> {
    let ts = load(&fixture("bert.ts.onnx"));
    let fused = ort_fused(&ts);
    vec![("ts", ts), ("dynamo", load(&fixture("bert.dynamo.onnx"))), ("ort", fused)]
}

/// Token ids below the fixture's vocabulary of 1000, the last positions of
/// every other row padded.
fn calibration_npz(dir: &Path, rows: usize, seq: usize) -> CalibrationSource {
    let path = dir.join("calib.npz");
    let mut npz = ndarray_npy::NpzWriter::new(std::fs::File::create(&path).unwrap());
    let ids = ndarray::Array2::from_shape_fn((rows, seq), |(r, c)| ((r * 131 + c * 17 + 7) % 997) as i64);
    let mask = ndarray::Array2::from_shape_fn((rows, seq), |(r, c)| i64::from(r % 2 == 0 || c < seq - 3));
    let types = ndarray::Array2::<i64>::zeros((rows, seq));
    npz.add_array("input_ids", &ids).unwrap();
    npz.add_array("attention_mask", &mask).unwrap();
    npz.add_array("token_type_ids", &types).unwrap();
    npz.finish().unwrap();
    CalibrationSource::Npz { path, batch: 8 }
}

fn ops_named(model: &Model, op: &str) -> Vec<Node> {
    model.graph.nodes().filter(|n| n.op_type == op).cloned().collect()
}

#[test]
fn blocks_are_found_in_every_form() {
    for (form, model) in bert_forms() {
        let blocks = find_blocks(&model).unwrap_or_else(|e| panic!("{form}: {e}"));
        assert_eq!(blocks.len(), 2, "{form}");
        for b in &blocks {
            assert_eq!((b.hidden, b.heads, b.head_size, b.neurons), (32, 4, 8, 64), "{form} block {}", b.index);
            assert!(b.attention_output.bias.is_some() && b.ffn_in.bias.is_some() && b.ffn_out.bias.is_some(), "{form}: biases found");
        }
        assert_eq!(blocks[0].output, blocks[1].input, "{form}: the residual stream runs from block to block");
    }
}

#[test]
fn a_graph_without_transformer_blocks_is_refused() {
    let error = prune_structured(&small_mlp(), 0.7, None, false).unwrap_err();
    assert!(matches!(error, PruneError::Blocks(BlockError::NoBlocks)), "{error}");
    assert!(error.to_string().contains("no transformer block found"), "{error}");
    // GPT-2 is pre-LN: recognised as attention, refused with the reason
    let error = prune_structured(&load(&fixture("gpt2.ts.onnx")), 0.7, None, false).unwrap_err();
    assert!(error.to_string().contains("pre-LN"), "{error}");
    let error = prune_structured(&load(&fixture("bert.ts.onnx")), 1.5, None, false).unwrap_err();
    assert!(error.to_string().contains("--keep-flops"), "{error}");
}

#[test]
fn heads_and_neurons_are_removed_in_every_form() {
    for (form, model) in bert_forms() {
        let (pruned, report) = prune_structured(&model, 0.5, None, false).unwrap_or_else(|e| panic!("{form}: {e}"));
        let blocks = find_blocks(&pruned).unwrap_or_else(|e| panic!("{form} after pruning: {e}"));
        for b in &blocks {
            // half the FLOPs: 2 of 4 heads, the FFN's share from the rest of the budget
            assert_eq!((b.heads, b.head_size), (2, 8), "{form}");
            assert_eq!(b.attention_output.weight.values.shape(), [16, 32], "{form}");
            assert_eq!(b.ffn_in.weight.values.shape(), [32, 32], "{form}");
            assert_eq!(b.ffn_out.weight.values.shape(), [32, 32], "{form}");
        }
        assert!(report.flops_after as f64 <= 0.5 * report.flops_before as f64 + 1.0, "{form}: {report:?}");
        assert!(report.parameters_after < report.parameters_before, "{form}");
        assert!(report.tract_min_cosine.is_finite() && report.tract_min_cosine > 0.0, "{form}: {report:?}");
        for attention in ops_named(&pruned, "Attention") {
            assert_eq!(attention.attr_int("num_heads"), Some(2), "{form}: num_heads follows");
        }
        // ONNX Runtime runs it (skips without onnxruntime)
        onnxruntime_runs(&format!("bert_{form}"), &pruned);
    }
}

/// Saves the model and has ONNX Runtime run it on a padded batch.
fn onnxruntime_runs(name: &str, model: &Model) {
    let probe = std::process::Command::new("python3").args(["-c", "import onnxruntime"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipping ONNX Runtime: python3 cannot import onnxruntime");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.onnx"));
    onnx::save(model, &path, &Default::default()).unwrap();
    let script = "import sys, numpy as np, onnxruntime as ort\n\
        s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n\
        ids = np.arange(14, dtype=np.int64).reshape(2, 7) % 997\n\
        mask = np.ones((2, 7), np.int64); mask[0, 5:] = 0\n\
        feed = {i.name: (ids if i.name == 'input_ids' else mask if i.name == 'attention_mask' else np.zeros((2, 7), np.int64)) for i in s.get_inputs()}\n\
        y = s.run(None, feed)[0]\n\
        assert y.shape[:2] == (2, 7) and np.isfinite(y).all(), y.shape\n\
        print(y.shape)";
    let run = std::process::Command::new("python3").args(["-c", script, path.to_str().unwrap()]).output().unwrap();
    assert!(run.status.success(), "{name}: ONNX Runtime failed: {}", String::from_utf8_lossy(&run.stderr));
}
