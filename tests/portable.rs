//! `optimize --target portable --opset N`: raise-opset converts real exports
//! from 17/18 to 20 and 23 (checked in tract and in ONNX Runtime), refuses what
//! its table does not know, and its table matches the ONNX schemas; the Gelu
//! rules emit standard Gelu only from opset 20.

mod common;

use common::*;
use onnxopt::ir::{AttrValue, DataType, GraphBuilder, Model, Node};
use onnxopt::onnx::{self, SaveOptions};
use onnxopt::passes::check::rewrite_and_compare;
use onnxopt::passes::raise_opset::{Change, RaiseOpset, MAX_OPSET, MIN_SOURCE_OPSET, OP_HISTORY};
use onnxopt::passes::{run_pipeline, verify_rewrite, DriverOptions, Pass, PassError};
use onnxopt::verify::VerifyOptions;
use std::path::{Path, PathBuf};
use std::process::Command;

fn raise(model: &Model, to: i64) -> Result<Model, String> {
    let mut raised = model.clone();
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(RaiseOpset { to })];
    let driver = DriverOptions { validate: true, ..DriverOptions::default() };
    run_pipeline(&mut raised, &passes, &driver).map_err(|e| match e {
        PassError::Failed { message, .. } => message,
        other => panic!("not a refusal: {other}"),
    })?;
    Ok(raised)
}

fn op_count(model: &Model, op: &str) -> usize {
    model.graph.nodes().filter(|n| n.qualified_op() == op).count()
}

/// Runs `python3 script args..` when python3 can import `module`; `None` (and a
/// message) when it cannot.
fn python(module: &str, script: &str, args: &[PathBuf]) -> Option<std::process::Output> {
    let probe = Command::new("python3").args(["-c", &format!("import {module}")]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipping: python3 cannot import {module}");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts").join(script);
    Some(Command::new("python3").arg(script).args(args).output().unwrap())
}

/// x [2, 3, 8] through every form raise-opset converts or keeps at opset 17:
/// ReduceMean with axes, ReduceMax without, Split without sizes (equal halves)
/// and with them, ReduceSum (axes an input since 13); with `empty_axes`, a
/// ReduceL2 whose axes attribute is empty (every axis: see below).
fn reductions_and_splits(empty_axes: bool) -> Model {
    let mut b = GraphBuilder::new("reductions");
    let x = b.input("x", DataType::Float, &[2, 3, 8]);
    let mean = b.node_with("ReduceMean", &[&x], vec![("axes", AttrValue::Ints(vec![-1])), ("keepdims", AttrValue::Int(1))]);
    let centred = b.node("Sub", &[&x, &mean]);
    let max = b.node_with("ReduceMax", &[&centred], vec![("keepdims", AttrValue::Int(0))]);
    b.add(Node::new("Split", &[&centred], &["half_a", "half_b"]).with_name("split_equal").with_attr("axis", AttrValue::Int(2)));
    let sizes = b.initializer_i64("sizes", &[2], &[1, 2]);
    b.add(Node::new("Split", &[&centred, &sizes], &["row_a", "row_b"]).with_name("split_sized").with_attr("axis", AttrValue::Int(1)));
    let axes = b.initializer_i64("sum_axes", &[1], &[1]);
    let sum = b.node_with("ReduceSum", &["half_b", &axes], vec![("keepdims", AttrValue::Int(0))]);
    b.output(&max, DataType::Float, &[]);
    if empty_axes {
        let norm = b.node_with("ReduceL2", &[&centred], vec![("axes", AttrValue::Ints(vec![])), ("keepdims", AttrValue::Int(0))]);
        b.output(&norm, DataType::Float, &[]);
    }
    b.output("half_a", DataType::Float, &[2, 3, 4]);
    b.output("row_b", DataType::Float, &[2, 2, 8]);
    b.output(&sum, DataType::Float, &[2, 4]);
    b.into_model(17)
}

#[test]
fn raise_opset_converts_reductions_and_splits() {
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(RaiseOpset { to: 23 })];
    let r = rewrite_and_compare(&reductions_and_splits(false), &passes, &VerifyOptions { atol: 0.0, rtol: 0.0, ..Default::default() });
    assert_eq!(r.patches(), 1, "one patch for the whole raise:\n{}", r.snapshot);
    assert_eq!(r.model.opset(""), Some(23));
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    insta::assert_snapshot!("raise_opset__reductions_and_splits", r.snapshot);
}

/// The acceptance check: BERT (fixture) and MiniLM (both exports, when
/// ../shared is present), raised to 20 and 23, agree with the originals in
/// tract and in ONNX Runtime (which also runs onnx.checker on the raised model);
/// the other fixtures in tract and ORT too, at 23. An empty Reduce* axes
/// attribute is checked in ORT only: tract 0.23.9 reads it as "no axes" (the
/// input unchanged), where ONNX's reference, its shape inference and ORT 1.32
/// reduce over every axis, as the raised form without axes does.
#[test]
fn raised_models_check_out_in_tract_and_onnx_runtime() {
    let mut sources: Vec<(String, PathBuf, &[i64])> = vec![("bert.ts".into(), fixture("bert.ts.onnx"), &[20, 23])];
    for file in ["model.ts.onnx", "model.dynamo.onnx"] {
        if let Some(path) = shared_model(file) {
            sources.push((format!("minilm.{}", file.trim_start_matches("model.").trim_end_matches(".onnx")), path, &[20, 23]));
        }
    }
    for file in ["bert.dynamo", "bert-eager.ts", "gpt2.ts", "gpt2.dynamo", "llama.ts", "llama.dynamo", "t5.ts", "t5.dynamo", "vit.ts", "vit.dynamo"] {
        sources.push((file.into(), fixture(&format!("{file}.onnx")), &[23]));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut pairs = Vec::new();
    for (name, path, targets) in &sources {
        let model = onnx::load(path).unwrap();
        for &to in *targets {
            let raised = raise(&model, to).unwrap_or_else(|e| panic!("{name} -> {to}: {e}"));
            assert_eq!(raised.opset(""), Some(to), "{name}");
            let comparison = verify_rewrite(&model, &raised, &VerifyOptions::default()).unwrap_or_else(|e| panic!("{name} -> {to}: {e}"));
            assert!(comparison.passed(), "{name} -> {to}: {comparison:?}");
            let case = dir.path().join(format!("{name}-opset{to}"));
            std::fs::create_dir(&case).unwrap();
            for (file, m) in [("original.onnx", &model), ("raised.onnx", &raised)] {
                onnx::save(m, &case.join(file), &SaveOptions::default()).unwrap();
                pairs.push(case.join(file));
            }
        }
    }
    let empty_axes = reductions_and_splits(true);
    let case = dir.path().join("reduce-empty-axes-opset23");
    std::fs::create_dir(&case).unwrap();
    for (file, m) in [("original.onnx", &empty_axes), ("raised.onnx", &raise(&empty_axes, 23).unwrap())] {
        onnx::save(m, &case.join(file), &SaveOptions::default()).unwrap();
        pairs.push(case.join(file));
    }
    let Some(run) = python("onnxruntime", "check_lowerings.py", &pairs) else { return };
    let report = String::from_utf8_lossy(&run.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "ONNX Runtime disagrees with a raised model:\n{report}");
}

#[test]
fn the_opset_table_matches_the_onnx_schemas() {
    let kind = |c: &Change| match c {
        Change::Types => "Types",
        Change::Extended(_) => "Extended",
        Change::AxesToInput => "AxesToInput",
        Change::SplitNumOutputs => "SplitNumOutputs",
        Change::Introduced => "Introduced",
    };
    let ops: serde_json::Map<String, serde_json::Value> =
        OP_HISTORY.iter().map(|(op, changes)| (op.to_string(), changes.iter().map(|(v, c)| serde_json::json!([v, kind(c)])).collect())).collect();
    let table = serde_json::json!({ "from": MIN_SOURCE_OPSET, "to": MAX_OPSET, "ops": ops });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table.json");
    std::fs::write(&path, table.to_string()).unwrap();
    let Some(run) = python("onnx", "check_opset_table.py", &[path]) else { return };
    let report = String::from_utf8_lossy(&run.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "raise-opset's table disagrees with onnx.defs:\n{report}");
}

fn optimize(input: &Path, output: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["--quiet", "optimize", input.to_str().unwrap(), "-o", output.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args)
}

/// Gelu-20 is emitted from opset 20 on, and not below.
#[test]
fn portable_gelu_needs_opset_20() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    for (file, opset, gelus) in [
        ("bert.dynamo.onnx", Some("20"), 2),
        ("bert.ts.onnx", Some("23"), 2),
        ("bert.ts.onnx", Some("17"), 0),
        ("bert.ts.onnx", None, 0),
        ("bert.dynamo.onnx", None, 0),
    ] {
        let mut args = vec!["--target", "portable"];
        args.extend(opset.iter().flat_map(|o| ["--opset", o]));
        let o = optimize(&fixture(file), &out, &args);
        assert!(o.status.success(), "{file} {opset:?}: {}", stderr(&o));
        let model = onnx::load(&out).unwrap();
        assert_eq!(op_count(&model, "Gelu"), gelus, "{file} {opset:?}");
        assert!(model.graph.nodes().all(|n| n.domain.is_empty()), "{file} {opset:?}: standard ops only");
        assert!(model.opset_imports.iter().all(|o| o.domain.is_empty()), "{file} {opset:?}");
        let expected = opset.map(|o| o.parse().unwrap()).or(onnx::load(&fixture(file)).unwrap().opset(""));
        assert_eq!(model.opset(""), expected, "{file} {opset:?}");
    }
}

/// At opset 23 the portable target fuses self-attention into ONNX's own
/// Attention (3-D Q, K, V; the exporter's mask as attn_mask); below, it cannot.
#[test]
fn portable_attention_needs_opset_23() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    for (file, opset, attentions) in [("bert.ts.onnx", "23", 2), ("bert.dynamo.onnx", "23", 2), ("vit.dynamo.onnx", "23", 2), ("bert.dynamo.onnx", "20", 0)] {
        let o = optimize(&fixture(file), &out, &["--target", "portable", "--opset", opset]);
        assert!(o.status.success(), "{file} {opset}: {}", stderr(&o));
        let model = onnx::load(&out).unwrap();
        assert_eq!(op_count(&model, "Attention"), attentions, "{file} {opset}");
        assert!(model.graph.nodes().all(|n| n.domain.is_empty()), "{file} {opset}: standard ops only");
    }
}

/// Decoders with a KV cache at opset 23: attention over the cache becomes ONNX
/// Attention with past_key/past_value (grouped heads for Llama, Qwen2, Phi-3;
/// plain for GPT-2), verified by the CLI (tract, prefill and decode steps),
/// standard ops only, and the export's interface kept.
#[test]
fn portable_attention_with_past_at_opset_23() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    for file in ["llama-kv.optimum.onnx", "qwen2-kv.optimum.onnx", "phi3-kv.optimum.onnx", "gpt2-kv.optimum.onnx"] {
        let o = optimize(&fixture(file), &out, &["--target", "portable", "--opset", "23"]);
        assert!(o.status.success(), "{file}: {}", stderr(&o));
        let model = onnx::load(&out).unwrap();
        assert_eq!((op_count(&model, "Attention"), op_count(&model, "Softmax")), (2, 0), "{file}");
        assert!(model.graph.nodes().all(|n| n.domain.is_empty()), "{file}: standard ops only");
        let input = onnx::load(&fixture(file)).unwrap();
        assert_eq!(model.graph.outputs.iter().map(|o| &o.name).collect::<Vec<_>>(), input.graph.outputs.iter().map(|o| &o.name).collect::<Vec<_>>(), "{file}");
    }
}

/// --opset serves the other targets too: ORT's fused ops at opset 23.
#[test]
fn ort_target_at_opset_23() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let o = optimize(&fixture("bert.ts.onnx"), &out, &["--target", "ort", "--opset", "23"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let model = onnx::load(&out).unwrap();
    assert_eq!(model.opset(""), Some(23));
    assert_eq!(op_count(&model, "com.microsoft.Attention"), 2);
}

/// A model with an op the table does not know is refused, naming the op, the
/// node and the versions; nothing is written.
#[test]
fn refuses_an_op_outside_the_table() {
    let mut b = GraphBuilder::new("resize");
    let x = b.input("x", DataType::Float, &[1, 1, 4, 4]);
    let scales = b.initializer_f32("scales", &[4], &[1.0, 1.0, 2.0, 2.0]);
    let y = b.node("Resize", &[&x, "", &scales]);
    b.output(&y, DataType::Float, &[1, 1, 8, 8]);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("resize.onnx");
    onnx::save(&b.into_model(17), &input, &SaveOptions::default()).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let o = optimize(&input, &out_dir.path().join("out.onnx"), &["--target", "portable", "--opset", "20"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let message = stderr(&o);
    assert!(message.contains("cannot raise opset 17 to 20: Resize (node 'n1') is not in raise-opset's table"), "{message}");
    assert!(files_in(out_dir.path()).is_empty());
    // the same model at its own opset needs no table
    let o = optimize(&input, &out_dir.path().join("out.onnx"), &["--target", "portable", "--opset", "17"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn refuses_what_it_cannot_raise() {
    let model = reductions_and_splits(false);
    assert!(raise(&model, 24).unwrap_err().contains("opset 24 is beyond what raise-opset converts to (at most 23)"));
    let mut newer = model.clone();
    newer.opset_imports[0].version = 18;
    assert!(raise(&newer, 17).unwrap_err().contains("the model imports opset 18, above 17: raise-opset never lowers an opset"));
    let mut older = model.clone();
    older.opset_imports[0].version = 16;
    assert!(raise(&older, 20).unwrap_err().contains("converts from opset 17 or later"));
    // an opset-17 model's default-domain Gelu is not ONNX's Gelu-20
    let mut b = GraphBuilder::new("early_gelu");
    let x = b.input("x", DataType::Float, &[2, 4]);
    let y = b.node("Gelu", &[&x]);
    b.output(&y, DataType::Float, &[2, 4]);
    let message = raise(&b.into_model(17), 20).unwrap_err();
    assert!(message.contains("Gelu (node 'n1') is not an ONNX op at opset 17 (ONNX's Gelu exists from opset 20)"), "{message}");
    // axes as an attribute and an input: no ReduceMean-13; and one line per op
    let mut b = GraphBuilder::new("invalid");
    let x = b.input("x", DataType::Float, &[2, 4]);
    let axes = b.initializer_i64("axes", &[1], &[1]);
    let mean = b.node_with("ReduceMean", &[&x, &axes], vec![("axes", AttrValue::Ints(vec![1]))]);
    let first = b.node("Hardmax", &[&x]);
    let second = b.node("Hardmax", &[&first]);
    b.output(&mean, DataType::Float, &[2, 1]);
    b.output(&second, DataType::Float, &[2, 4]);
    let message = raise(&b.into_model(17), 23).unwrap_err();
    assert_eq!(
        message,
        "cannot raise opset 17 to 23: Hardmax (node 'n2' and 1 more) is not in raise-opset's table of ops whose meaning is known \
         from opset 17 to 23; ReduceMean (node 'n1') has an axes attribute and 2 inputs, where ReduceMean-13 has one input"
    );
}

/// A bisect that stops before the conversion patch keeps the old import, which
/// the unconverted graph still matches.
#[test]
fn stop_after_zero_keeps_the_opset_the_graph_is_in() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    // llama's RMSNorm has a ReduceMean to convert
    let o = optimize(&fixture("llama.ts.onnx"), &out, &["--target", "portable", "--opset", "23", "--stop-after", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(onnx::load(&out).unwrap().opset(""), Some(17));
    // bert has nothing to convert: the import alone changes
    let o = optimize(&fixture("bert.ts.onnx"), &out, &["--target", "portable", "--opset", "23", "--stop-after", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(onnx::load(&out).unwrap().opset(""), Some(23));
}
