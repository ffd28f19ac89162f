//! Shape inference on real exports: all-MiniLM-L6-v2 from `../shared/models`
//! (TorchScript and dynamo exporters), and the tiny models in `fixtures/`.

use anyhow::{Context, Result};
use onnxopt::ir::{infer_types, DataType, Dim, Model, TypeMap};
use onnxopt::onnx;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const HIDDEN: i64 = 384;
const HEADS: i64 = 12;
const HEAD_SIZE: i64 = 32;

fn shared_model(file: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/minilm-l6-v2").join(file);
    if path.exists() {
        Some(path)
    } else {
        eprintln!("skipping: ../shared not present ({} not found)", path.display());
        None
    }
}

fn load(path: &Path) -> Result<Model> {
    onnx::load(path).with_context(|| format!("loading {}", path.display()))
}

/// Node outputs (`op: name`) whose element type or rank inference left unknown.
fn untyped_outputs(model: &Model, types: &TypeMap) -> (Vec<String>, Vec<String>) {
    let (mut no_type, mut no_rank) = (Vec::new(), Vec::new());
    for node in model.graph.nodes() {
        for name in node.outputs.iter().filter(|n| !n.is_empty()) {
            if types.elem_type(name).is_none() {
                no_type.push(format!("{}: {name}", node.qualified_op()));
            }
            if types.rank(name).is_none() {
                no_rank.push(format!("{}: {name}", node.qualified_op()));
            }
        }
    }
    (no_type, no_rank)
}

fn is_symbol(d: &Dim) -> bool {
    matches!(d, Dim::Symbol(_))
}

/// Every node output typed; the output is [batch, seq, 384] float32 with the
/// input's symbols; every Reshape to 4 dims splits heads: 12 heads of 32 and
/// two symbolic dims.
fn check_minilm(file: &str) -> Result<()> {
    let Some(path) = shared_model(file) else { return Ok(()) };
    let model = load(&path)?;
    let types = infer_types(&model);

    let (no_type, no_rank) = untyped_outputs(&model, &types);
    assert!(no_type.is_empty(), "{file}: outputs without element type: {no_type:?}");
    assert!(no_rank.is_empty(), "{file}: outputs without rank: {no_rank:?}");

    let ids = types.shape("input_ids").context("input_ids typed")?;
    assert!(ids.iter().all(is_symbol), "{file}: input_ids dims are symbols: {ids:?}");
    let output = &model.graph.outputs[0].name;
    let mut expected = ids.to_vec();
    expected.push(Dim::Fixed(HIDDEN));
    assert_eq!(types.shape(output), Some(&expected[..]), "{file}: {output}");
    assert_eq!(types.elem_type(output), Some(DataType::Float), "{file}: {output}");

    let mut head_splits = 0;
    for node in model.graph.nodes().filter(|n| n.is_onnx("Reshape")) {
        let out = &node.outputs[0];
        let target_len = types.shape(&node.inputs[1]).and_then(|s| s.first()).and_then(Dim::fixed);
        if types.elem_type(&node.inputs[0]) != Some(DataType::Float) || target_len != Some(4) {
            continue;
        }
        let dims = types.shape(out).with_context(|| format!("{file}: rank of {out}"))?;
        let count = |d: i64| dims.iter().filter(|x| **x == Dim::Fixed(d)).count();
        assert!(
            dims.len() == 4 && count(HEADS) == 1 && count(HEAD_SIZE) == 1 && dims.iter().filter(|d| is_symbol(d)).count() == 2,
            "{file}: Reshape {out} should split 12 heads of 32 over two symbolic dims, got {dims:?}"
        );
        head_splits += 1;
    }
    // q, k, v and one more per layer, 6 layers
    assert!(head_splits >= 18, "{file}: only {head_splits} head-splitting Reshapes");
    Ok(())
}

#[test]
fn minilm_torchscript_export_is_fully_typed() -> Result<()> {
    check_minilm("model.ts.onnx")
}

#[test]
fn minilm_dynamo_export_is_fully_typed() -> Result<()> {
    check_minilm("model.dynamo.onnx")
}

/// How inference and the exporter's value_info disagree: element type, rank, or
/// a dim both name (a number or a plain symbol; torch also writes expressions
/// such as `Min(512, s11)` as symbols, which are skipped). With `strict`, an
/// inferred unknown dim where value_info names one counts too. Returns how many
/// shapes were compared, and the disagreements.
fn value_info_disagreements(model: &Model, types: &TypeMap, strict: bool) -> (usize, Vec<String>) {
    // `unk__N` is what onnx's shape inference (run by ORT's quantization tool)
    // names a dim it could not infer: unknown, not a claim
    let plain = |d: &Dim| match d {
        Dim::Fixed(_) => true,
        Dim::Symbol(s) => s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !s.starts_with("unk__"),
        Dim::Unknown => false,
    };
    let agree = |declared: &Dim, inferred: &Dim| !plain(declared) || declared == inferred || (!strict && *inferred == Dim::Unknown);
    let (mut compared, mut disagreements) = (0, Vec::new());
    for info in &model.graph.value_info {
        let (Some(declared), Some(inferred)) = (info.tensor_type(), types.get(&info.name)) else {
            continue;
        };
        let (Some(want), Some(got)) = (&declared.shape, &inferred.shape) else {
            continue;
        };
        compared += 1;
        let same_dims = want.len() == got.len() && want.iter().zip(got).all(|(w, g)| agree(w, g));
        if declared.elem_type != inferred.elem_type || !same_dims {
            disagreements.push(format!("{}: declared {declared}, inferred {inferred}", info.name));
        }
    }
    (compared, disagreements)
}

/// The dynamo exporter writes its own inference into value_info; on MiniLM,
/// inference knows every dim it names (it never reads value_info for known ops).
#[test]
fn minilm_dynamo_agrees_with_the_exporters_value_info() -> Result<()> {
    let Some(path) = shared_model("model.dynamo.onnx") else {
        return Ok(());
    };
    let model = load(&path)?;
    let (compared, disagreements) = value_info_disagreements(&model, &infer_types(&model), true);
    assert!(compared > 300, "only {compared} value_info shapes compared");
    assert!(disagreements.is_empty(), "inference disagrees with the exporter:\n{}", disagreements.join("\n"));
    Ok(())
}

/// Every node output of the fixtures gets an element type and nothing contradicts
/// the exporter's value_info; ops leaving a rank or a dim unknown are listed (they
/// are what to cover next).
#[test]
fn fixtures_are_typed_and_agree_with_value_info() -> Result<()> {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let Ok(entries) = std::fs::read_dir(&folder) else {
        eprintln!("skipping: {} not present", folder.display());
        return Ok(());
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "onnx")).collect();
    paths.sort();
    for path in paths {
        let model = load(&path)?;
        let types = infer_types(&model);
        let (no_type, no_rank) = untyped_outputs(&model, &types);
        assert!(no_type.is_empty(), "{}: outputs without element type: {no_type:?}", path.display());
        let (_, contradictions) = value_info_disagreements(&model, &types, false);
        assert!(contradictions.is_empty(), "{}: {}", path.display(), contradictions.join("\n"));
        let unranked: BTreeSet<String> = no_rank.iter().filter_map(|s| s.split(':').next()).map(String::from).collect();
        let with_unknown_dims: BTreeSet<String> = model
            .graph
            .nodes()
            .filter(|n| n.outputs.iter().any(|o| types.shape(o).is_some_and(|s| s.contains(&Dim::Unknown))))
            .map(|n| n.qualified_op())
            .collect();
        eprintln!("{}: {} nodes; unknown rank: {unranked:?}; some dim unknown: {with_unknown_dims:?}", path.display(), model.graph.node_count());
    }
    Ok(())
}
