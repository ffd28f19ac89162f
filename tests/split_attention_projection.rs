//! `split-attention-projection`: ORT's fused Attention becomes three MatMuls
//! (the columns of the packed Q/K/V weight) and MultiHeadAttention. The rewrite is
//! checked in tract against the fused op (both lowered), snapshotted, and left
//! alone where the weight is not a constant or the mask is of a rank
//! MultiHeadAttention reads otherwise.

mod common;

use onnxopt::ir::{AttrValue, DataType, Extras, GraphBuilder, Model, Node, OpsetImport};
use onnxopt::passes::attention_opset::RaiseOpsetForAttention;
use onnxopt::passes::split_attention_projection::SplitAttentionProjection;
use onnxopt::passes::{run_pipeline, verify_rewrite, DriverOptions, Pass};
use onnxopt::verify;

const MS: &str = "com.microsoft";

fn values(count: usize, seed: u64) -> Vec<f32> {
    let mut rng = verify::SeededRng::new(seed);
    (0..count).map(|_| rng.uniform() as f32 * 2.0 - 1.0).collect()
}

/// How the fused Attention is masked: a `mask_index` of 2 or 3 dims, or an
/// additive `attention_bias` [2, 1, 5, 5] (as the fused MiniLM has it).
#[derive(Clone, Copy)]
enum Mask {
    Index2d,
    Index3d,
    AttentionBias,
}

/// Attention over x [2, 5, 6], 2 heads of 4, at opset 17; `constant_weight`
/// false makes the weight a graph input.
fn fused_attention(constant_weight: bool, mask: Mask) -> Model {
    let mut b = GraphBuilder::new("attention");
    let x = b.input("x", DataType::Float, &[2, 5, 6]);
    let w = if constant_weight { b.initializer_f32("qkv_weight", &[6, 24], &values(144, 1)) } else { b.input("qkv_weight", DataType::Float, &[6, 24]) };
    let bias = b.initializer_f32("qkv_bias", &[24], &values(24, 2));
    let inputs = match mask {
        Mask::Index2d => vec![x, w, bias, b.input("mask_index", DataType::Int32, &[2, 5])],
        Mask::Index3d => vec![x, w, bias, b.input("mask_index", DataType::Int32, &[2, 5, 5])],
        Mask::AttentionBias => vec![x, w, bias, String::new(), String::new(), b.input("attention_bias", DataType::Float, &[2, 1, 5, 5])],
    };
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    b.add(
        Node::new("Attention", &inputs, &["y"])
            .with_domain(MS)
            .with_name("fused_attention")
            .with_attr("num_heads", AttrValue::Int(2))
            .with_attr("scale", AttrValue::Float(0.4)),
    );
    b.output("y", DataType::Float, &[2, 5, 8]);
    let mut model = b.into_model(17);
    model.opset_imports.push(OpsetImport { domain: MS.into(), version: 1, extras: Extras::default() });
    model
}

/// ONNX Runtime gives `model` and `rewritten` the same outputs (cosine above
/// 0.999999), where python3 can import onnxruntime.
fn assert_onnxruntime_agrees(model: &Model, rewritten: &Model) {
    let dir = tempfile::tempdir().unwrap();
    let (before, after) = (dir.path().join("before.onnx"), dir.path().join("after.onnx"));
    onnxopt::onnx::save(model, &before, &Default::default()).unwrap();
    onnxopt::onnx::save(rewritten, &after, &Default::default()).unwrap();
    if let Some(cosine) = common::onnxruntime_cosine(&before, &after) {
        assert!(cosine > 0.999_999, "ONNX Runtime: cosine {cosine}");
    }
}

fn split(model: &Model) -> (Model, usize) {
    let mut rewritten = model.clone();
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(SplitAttentionProjection)];
    let records = run_pipeline(&mut rewritten, &passes, &DriverOptions { validate: true, ..DriverOptions::default() }).unwrap();
    (rewritten, records[0].patches)
}

#[test]
fn attention_becomes_projection_split_and_multi_head_attention() {
    let model = fused_attention(true, Mask::Index2d);
    let (rewritten, patches) = split(&model);
    assert_eq!(patches, 1);
    let ops: Vec<String> = rewritten.graph.nodes().map(|n| n.qualified_op()).collect();
    assert_eq!(ops, ["MatMul", "MatMul", "MatMul", "com.microsoft.MultiHeadAttention"]);
    let attention = rewritten.graph.nodes().find(|n| n.op_type == "MultiHeadAttention").unwrap();
    assert_eq!((attention.attr_int("num_heads"), attention.attr_float("scale")), (Some(2), Some(0.4)));
    let projections: Vec<&str> = rewritten.graph.nodes().filter(|n| n.op_type == "MatMul").map(|n| n.name.as_str()).collect();
    assert_eq!(projections, ["fused_attention/q_projection", "fused_attention/k_projection", "fused_attention/v_projection"], "named, for --exclude");
    // the packed weight's columns, 8 each: Q's first row is W[0, 0..8], V's last W[5, 16..24]
    let packed = model.graph.initializer("qkv_weight").unwrap().to_f32().unwrap().into_raw_vec_and_offset().0;
    let block = |part: &str| rewritten.graph.initializer(&format!("y/{part}/weight")).unwrap().to_f32().unwrap();
    assert_eq!(block("q").shape(), [6, 8]);
    let (q, v) = (block("q").into_raw_vec_and_offset().0, block("v").into_raw_vec_and_offset().0);
    assert_eq!(q[..8], packed[..8]);
    assert_eq!(v[40..], packed[5 * 24 + 16..]);

    // the same computation: both lowered and run in tract on seeded inputs (masks included)
    let options = verify::VerifyOptions { atol: 1e-5, rtol: 1e-4, ..Default::default() };
    let comparison = verify_rewrite(&model, &rewritten, &options).unwrap();
    assert!(comparison.passed(), "{comparison:?}");
    assert!(comparison.outputs[0].cosine > 0.999_999, "{comparison:?}");
    insta::assert_snapshot!("split_attention_projection__mask2d", format!("before:\n{model}\nafter:\n{rewritten}"));

    // and in ONNX Runtime, whose kernels these are (the mask pads one sequence)
    assert_onnxruntime_agrees(&model, &rewritten);
}

#[test]
fn left_alone_without_a_constant_weight_or_with_a_3d_mask() {
    for (model, case) in [(fused_attention(false, Mask::Index2d), "weight is a graph input"), (fused_attention(true, Mask::Index3d), "3-D mask")] {
        let (rewritten, patches) = split(&model);
        assert_eq!(patches, 0, "{case}");
        assert_eq!(rewritten.graph.nodes().filter(|n| n.op_type == "Attention").count(), 1, "{case}");
    }
}

/// With an attention_bias (no mask_index), the model is raised to opset 23 and
/// the attention becomes ONNX Attention: three projections, each with its bias
/// block as an Add, the bias as attn_mask, the heads and scale carried over;
/// the same numbers in tract and in ONNX Runtime. With a mask_index, neither
/// pass fires towards ONNX Attention: the opset stays 17, MultiHeadAttention.
#[test]
fn with_an_attention_bias_the_model_takes_onnx_attention_at_opset_23() {
    let model = fused_attention(true, Mask::AttentionBias);
    let mut rewritten = model.clone();
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(RaiseOpsetForAttention), Box::new(SplitAttentionProjection)];
    let records = run_pipeline(&mut rewritten, &passes, &DriverOptions { validate: true, ..DriverOptions::default() }).unwrap();
    assert_eq!(records[1].patches, 1);
    assert_eq!(rewritten.opset(""), Some(23));
    let ops: Vec<String> = rewritten.graph.nodes().map(|n| n.qualified_op()).collect();
    assert_eq!(ops, ["MatMul", "Add", "MatMul", "Add", "MatMul", "Add", "Attention"]);
    let attention = rewritten.graph.nodes().find(|n| n.op_type == "Attention").unwrap();
    assert_eq!((attention.attr_int("q_num_heads"), attention.attr_int("kv_num_heads"), attention.attr_float("scale")), (Some(2), Some(2), Some(0.4)));
    assert_eq!(attention.inputs[3], "attention_bias");
    let v_bias = rewritten.graph.initializer("y/v/bias").unwrap().to_f32().unwrap().into_raw_vec_and_offset().0;
    assert_eq!(v_bias, values(24, 2)[16..]);

    let options = verify::VerifyOptions { atol: 1e-5, rtol: 1e-4, ..Default::default() };
    let comparison = verify_rewrite(&model, &rewritten, &options).unwrap();
    assert!(comparison.passed() && comparison.outputs[0].cosine > 0.999_999, "{comparison:?}");
    insta::assert_snapshot!("split_attention_projection__onnx_attention", format!("before:\n{model}\nafter:\n{rewritten}"));
    assert_onnxruntime_agrees(&model, &rewritten);

    let with_mask_index = fused_attention(true, Mask::Index2d);
    let mut kept = with_mask_index.clone();
    run_pipeline(&mut kept, &passes, &DriverOptions { validate: true, ..DriverOptions::default() }).unwrap();
    assert_eq!(kept.opset(""), Some(17));
    assert!(kept.graph.nodes().any(|n| n.op_type == "MultiHeadAttention"));
}
