//! `expand-attention-bias`: a fused Attention's key-padding mask `[B, 1, 1, T]`
//! is expanded to the query rows (the same numbers in tract, snapshotted; ONNX
//! Runtime, which refused the unexpanded bias, runs the result and agrees with
//! the lowered original); a bias with its rows, and a one-row query, are left alone.

mod common;

use common::*;
use onnxopt::ir::{AttrValue, DataType, Dim, Extras, GraphBuilder, Model, Node, OpsetImport};
use onnxopt::passes::check::rewrite_and_compare;
use onnxopt::passes::expand_attention_bias::ExpandAttentionBias;
use onnxopt::passes::lower_contrib::lower_contrib_ops;
use onnxopt::passes::{DriverOptions, Pass};
use onnxopt::verify::VerifyOptions;

const HIDDEN: i64 = 8;

/// y = com.microsoft.Attention(x [2, S, 8], w, b, _, _, mask [2, 1, rows, S]),
/// two heads; S symbolic, `rows` 1 or S.
fn attention(rows: Dim, query_rows: Dim) -> Model {
    let mut b = GraphBuilder::new("attention_with_bias");
    let seq = Dim::Symbol("sequence".into());
    let x = b.input_symbolic("x", DataType::Float, vec![Dim::Fixed(2), query_rows.clone(), Dim::Fixed(HIDDEN)]);
    let mask = b.input_symbolic("mask", DataType::Float, vec![Dim::Fixed(2), Dim::Fixed(1), rows, seq.clone()]);
    let w: Vec<f32> = (0..HIDDEN * 3 * HIDDEN).map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0).collect();
    let h = HIDDEN as usize;
    let w = b.initializer_f32("w", &[h, 3 * h], &w);
    let bias = b.initializer_f32("b", &[3 * h], &vec![0.05; 3 * h]);
    b.add(
        Node::new("Attention", &[&x, &w, &bias, "", "", &mask], &["y"])
            .with_domain("com.microsoft")
            .with_name("attention")
            .with_attr("num_heads", AttrValue::Int(2)),
    );
    b.output("y", DataType::Float, &[2, if query_rows == Dim::Fixed(1) { 1 } else { -1 }, HIDDEN]);
    let mut model = b.into_model(17);
    model.opset_imports.push(OpsetImport { domain: "com.microsoft".into(), version: 1, extras: Extras::default() });
    model
}

#[test]
fn a_key_padding_mask_is_expanded_to_the_query_rows() {
    let sequence = Dim::Symbol("sequence".into());
    let model = attention(Dim::Fixed(1), sequence);
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(ExpandAttentionBias)];
    let r = rewrite_and_compare(&model, &passes, &VerifyOptions { atol: 0.0, rtol: 0.0, ..VerifyOptions::default() });
    assert_eq!(r.patches(), 1);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    let fused = r.model.graph.nodes().find(|n| n.op_type == "Attention").unwrap();
    let expand = r.model.graph.nodes().find(|n| n.op_type == "Expand").expect("an Expand");
    assert_eq!((fused.inputs[5].as_str(), expand.inputs[0].as_str()), (expand.outputs[0].as_str(), "mask"));
    insta::assert_snapshot!("expand_attention_bias", r.snapshot);

    // ONNX Runtime runs the expanded form (the unexpanded one it refuses) and
    // agrees with the original lowered to standard ops
    let dir = tempfile::tempdir().unwrap();
    let mut lowered = model.clone();
    lower_contrib_ops(&mut lowered, &DriverOptions::default()).unwrap();
    let (reference, candidate) = (dir.path().join("lowered.onnx"), dir.path().join("expanded.onnx"));
    onnxopt::onnx::save(&lowered, &reference, &Default::default()).unwrap();
    onnxopt::onnx::save(&r.model, &candidate, &Default::default()).unwrap();
    if let Some(cosine) = onnxruntime_cosine(&reference, &candidate) {
        assert!(cosine > 0.999999, "ONNX Runtime: cosine {cosine}");
    }
}

#[test]
fn a_bias_with_its_rows_or_a_one_row_query_stays() {
    let sequence = Dim::Symbol("sequence".into());
    assert!(ExpandAttentionBias.propose(&attention(sequence.clone(), sequence)).unwrap().is_empty(), "[B, 1, S, T]");
    assert!(ExpandAttentionBias.propose(&attention(Dim::Fixed(1), Dim::Fixed(1))).unwrap().is_empty(), "one query row");
}
