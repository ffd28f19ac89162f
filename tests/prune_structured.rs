//! Structured pruning (heads + FFN neurons to a FLOP budget, with least-squares
//! reconstruction) and layer dropping, on the tiny BERT fixtures in their three
//! forms (TorchScript export, dynamo export, `optimize --target ort`) and on the
//! shared MiniLM when present.

mod common;

use common::*;
use onnxopt::calibrate::CalibrationSource;
use onnxopt::ir::{Model, Node};
use onnxopt::onnx;
use onnxopt::passes::pipeline::{optimization_passes, PipelineOptions, Target};
use onnxopt::passes::{run_pipeline, DriverOptions};
use onnxopt::prune::blocks::{find_blocks, BlockError};
use onnxopt::prune::layers::drop_layers;
use onnxopt::prune::structured::prune_structured;
use onnxopt::prune::PruneError;
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
    // GPT-2 packs Q/K/V in one Gemm + Split: refused with the reason
    let error = prune_structured(&load(&fixture("gpt2.ts.onnx")), 0.7, None, false).unwrap_err();
    assert!(matches!(error, PruneError::Blocks(BlockError::Unrecognised { .. })), "{error}");
    assert!(error.to_string().contains("/h.0/attn/Softmax"), "{error}");
    let error = prune_structured(&load(&fixture("bert.ts.onnx")), 1.5, None, false).unwrap_err();
    assert!(error.to_string().contains("--keep-flops"), "{error}");
}

#[test]
fn heads_and_neurons_are_removed_in_every_form() {
    for (form, model) in bert_forms() {
        let (pruned, report) = prune_structured(&model, 0.5, None, false).unwrap_or_else(|e| panic!("{form}: {e}"));
        let blocks = find_blocks(&pruned).unwrap_or_else(|e| panic!("{form} after pruning: {e}"));
        for b in &blocks {
            // half the FLOPs: heads lose half that fraction (3 of 4), FFN
            // neurons what the rest of the budget buys: 2*24 + n = (2*32 + 64) / 2
            assert_eq!((b.heads, b.head_size), (3, 8), "{form}");
            assert_eq!(b.attention_output.weight.values.shape(), [24, 32], "{form}");
            assert_eq!(b.ffn_in.weight.values.shape(), [32, 16], "{form}");
            assert_eq!(b.ffn_out.weight.values.shape(), [16, 32], "{form}");
        }
        assert!(report.flops_after as f64 <= 0.5 * report.flops_before as f64 + 1.0, "{form}: {report:?}");
        assert!(report.parameters_after < report.parameters_before, "{form}");
        assert!(report.tract_min_cosine.is_finite() && report.tract_min_cosine > 0.0, "{form}: {report:?}");
        for attention in ops_named(&pruned, "Attention") {
            assert_eq!(attention.attr_int("num_heads"), Some(3), "{form}: num_heads follows");
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

/// With calibration data, the re-fit lowers every layer's error, and the model
/// as a whole moves less from the original than without it.
#[test]
fn reconstruction_lowers_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let source = calibration_npz(dir.path(), 48, 12);
    for (form, model) in bert_forms() {
        let (_, plain) = prune_structured(&model, 0.5, Some(&source), false).unwrap();
        let (refit, report) = prune_structured(&model, 0.5, Some(&source), true).unwrap();
        assert!(report.calibration_tokens > 400, "{form}: {}", report.calibration_tokens);
        for layer in &report.layers {
            let (before, after) = (layer.attention_error_before.unwrap(), layer.attention_error_after.unwrap());
            assert!(after <= before, "{form} layer {}: attention error {before} -> {after}", layer.layer);
            let (before, after) = (layer.ffn_error_before.unwrap(), layer.ffn_error_after.unwrap());
            assert!(after <= before, "{form} layer {}: FFN error {before} -> {after}", layer.layer);
        }
        // the cross-validated damping may keep the sliced weights of a layer, not of all
        assert!(report.layers.iter().any(|l| l.attention_error_after < l.attention_error_before), "{form}: {report:?}");
        assert!(plain.layers.iter().all(|l| l.attention_error_after.is_none()), "{form}: no re-fit, no error after");
        eprintln!("{form}: tract cosine {:.4} without re-fit, {:.4} with", plain.tract_min_cosine, report.tract_min_cosine);
        assert!(report.tract_min_cosine > 0.5, "{form}: {report:?}");
        find_blocks(&refit).unwrap();
    }
}

/// The fused form: the packed QKV weight, its bias and num_heads shrink; the
/// snapshot shows the whole pruned graph.
#[test]
fn fused_attention_snapshot() {
    let fused = ort_fused(&load(&fixture("bert.ts.onnx")));
    let (pruned, _) = prune_structured(&fused, 0.5, None, false).unwrap();
    let packed: Vec<_> = pruned.graph.initializers.iter().filter(|t| t.name.contains("qkv_weight")).map(|t| t.dims.clone()).collect();
    assert_eq!(packed, vec![vec![32, 72], vec![32, 72]]);
    insta::assert_snapshot!("ort_fused_half", format!("before:\n{fused}\nafter:\n{pruned}"));
}

#[test]
fn layer_dropping_rewires_the_residual_stream() {
    let dir = tempfile::tempdir().unwrap();
    let source = calibration_npz(dir.path(), 16, 10);
    for (form, model) in bert_forms() {
        let (dropped, report) = drop_layers(&model, 1, &source).unwrap_or_else(|e| panic!("{form}: {e}"));
        assert_eq!(report.dropped.len(), 1, "{form}");
        assert_eq!(report.input_output_cosine.len(), 2, "{form}");
        // the dropped block is the one whose output is most like its input
        let (most_alike, _) = report.input_output_cosine.iter().copied().fold((0, f64::MIN), |a, b| if b.1 > a.1 { b } else { a });
        assert_eq!(report.dropped, vec![most_alike], "{form}: {report:?}");
        assert_eq!(find_blocks(&dropped).unwrap().len(), 1, "{form}");
        assert_eq!(report.flops_after * 2, report.flops_before, "{form}");
        assert!(report.tract_min_cosine.is_finite(), "{form}");
        onnxruntime_runs(&format!("bert_{form}_dropped"), &dropped);
    }
    let error = drop_layers(&load(&fixture("bert.ts.onnx")), 2, &source).unwrap_err();
    assert!(error.to_string().contains("--drop-layers"), "{error}");
}

/// The shared MiniLM (skips without ../shared): 70% of the FLOPs with a re-fit
/// on a few calibration sentences stays close to the original on dev sentences.
#[test]
fn minilm_at_70_percent_of_the_flops() {
    let Some(path) = shared_model("model.ts.onnx") else { return };
    let shared = path.parent().unwrap().to_path_buf();
    let corpus = shared.join("../../corpus");
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib.txt");
    let text = std::fs::read_to_string(corpus.join("calib.txt")).unwrap();
    std::fs::write(&calib, text.lines().take(48).collect::<Vec<_>>().join("\n")).unwrap();
    let source = CalibrationSource::Text { file: calib, tokenizer: shared.join("tokenizer.json"), max_len: 64, batch: 16 };
    let model = load(&path);
    let (pruned, report) = prune_structured(&model, 0.7, Some(&source), true).unwrap();
    assert!((report.flops_after as f64) <= 0.7 * report.flops_before as f64, "{report:?}");
    assert!(report.layers.iter().all(|l| l.heads_kept.len() == 10), "{report:?}");
    let dev = dir.path().join("dev.txt");
    let text = std::fs::read_to_string(corpus.join("dev.txt")).unwrap();
    std::fs::write(&dev, text.lines().take(16).collect::<Vec<_>>().join("\n")).unwrap();
    let dev = CalibrationSource::Text { file: dev, tokenizer: shared.join("tokenizer.json"), max_len: 64, batch: 16 };
    let cosine = mean_pooled_cosine(&model, &pruned, &dev);
    eprintln!("MiniLM at 70% FLOPs, re-fit on 48 sentences: mean cosine of mean-pooled embeddings on 16 dev sentences {cosine:.4}");
    assert!(cosine > 0.8, "{cosine}");
}

/// Mean over sentences of the cosine between mean-pooled (real tokens) outputs.
fn mean_pooled_cosine(a: &Model, b: &Model, source: &CalibrationSource) -> f64 {
    let pooled = |m: &Model| {
        let mut sentences = Vec::new();
        onnxopt::calibrate::for_each_batch(m, &[], source, |batch| {
            let out = batch.outputs[0].to_plain_array_view::<f32>().unwrap().to_owned();
            let mask = batch.inputs.iter().find(|i| i.name == "attention_mask").unwrap().value.cast_to::<i64>().unwrap().into_owned();
            let mask = mask.to_plain_array_view::<i64>().unwrap().to_owned();
            let (n, s, d) = (out.shape()[0], out.shape()[1], out.shape()[2]);
            for i in 0..n {
                let mut v = vec![0.0f64; d];
                for t in (0..s).filter(|&t| mask[[i, t]] != 0) {
                    for k in 0..d {
                        v[k] += out[[i, t, k]] as f64;
                    }
                }
                sentences.push(v);
            }
            Ok(())
        })
        .unwrap();
        sentences
    };
    let (x, y) = (pooled(a), pooled(b));
    let cos = |u: &[f64], v: &[f64]| {
        let dot: f64 = u.iter().zip(v).map(|(p, q)| p * q).sum();
        dot / (u.iter().map(|p| p * p).sum::<f64>().sqrt() * v.iter().map(|q| q * q).sum::<f64>().sqrt())
    };
    x.iter().zip(&y).map(|(u, v)| cos(u, v)).sum::<f64>() / x.len() as f64
}
