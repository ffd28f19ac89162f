//! smooth-quant: an exact rewrite that moves activation outlier channels into
//! the weights; checked in tract, snapshotted, and left alone where a reader
//! of the activation is not a weight product.

mod common;

use onnxopt::ir::{DataType, GraphBuilder, Model, Node};
use onnxopt::passes::check::rewrite_and_compare;
use onnxopt::passes::smooth_quant::SmoothQuant;
use onnxopt::passes::Pass;
use onnxopt::verify::VerifyOptions;
use std::collections::HashMap;

/// x feeds two products (a MatMul and a Gemm with transB), as Q and K read one
/// LayerNorm output.
fn two_readers() -> Model {
    let mut b = GraphBuilder::new("two_readers");
    let x = b.input("x", DataType::Float, &[-1, 3]);
    let w1 = b.initializer_f32("w1", &[3, 2], &[0.5, -1.0, 2.0, 0.25, -0.75, 1.5]);
    let w2 = b.initializer_f32("w2", &[2, 3], &[1.0, 0.1, -0.2, 0.3, -4.0, 0.6]);
    let c = b.initializer_f32("c", &[2], &[0.1, -0.1]);
    let y1 = b.node("MatMul", &[&x, &w1]);
    b.add(Node::new("Gemm", &[&x, &w2, &c], &["y2"]).with_attr("transB", onnxopt::ir::AttrValue::Int(1)));
    b.output(&y1, DataType::Float, &[-1, 2]);
    b.output("y2", DataType::Float, &[-1, 2]);
    b.into_model(17)
}

fn smoothing(alpha: f32, channel_max: &[f32]) -> Vec<Box<dyn Pass>> {
    let channel_max = HashMap::from([("x".to_string(), channel_max.to_vec())]);
    vec![Box::new(SmoothQuant { alpha, channel_max })]
}

#[test]
fn smoothing_is_exact_and_scales_weight_rows() {
    let model = two_readers();
    // channel 1 is the outlier: 40 where the others reach 1
    let tight = VerifyOptions { atol: 1e-5, rtol: 1e-5, ..Default::default() };
    let rewritten = rewrite_and_compare(&model, &smoothing(0.5, &[1.0, 40.0, 0.5]), &tight);
    assert_eq!(rewritten.patches(), 1);
    assert!(rewritten.comparison.passed(), "{:?}", rewritten.comparison);
    insta::assert_snapshot!("smooth_quant__two_readers", rewritten.snapshot);

    // s_k = sqrt(max|x_k|) / sqrt(max_n |w_kn|) over both readers' weights
    let expected = [(1.0f32 / 1.0f32).sqrt(), (40.0f32 / 4.0f32).sqrt(), (0.5f32 / 1.5f32).sqrt()];
    let inverse = rewritten.model.graph.initializer("x/inverse_smoothing").unwrap().to_f32().unwrap();
    for (got, s) in inverse.iter().zip(expected) {
        assert!((got - 1.0 / s).abs() < 1e-6, "{got} vs 1/{s}");
    }
    let w1 = rewritten.model.graph.initializer("matmul_1/smoothed_weight").unwrap().to_f32().unwrap();
    assert!((w1[[1, 0]] - 2.0 * expected[1]).abs() < 1e-5, "row 1 of w1 scaled by s_1");
    let w2 = rewritten.model.graph.initializer("y2/smoothed_weight").unwrap().to_f32().unwrap();
    assert!((w2[[1, 1]] - -4.0 * expected[1]).abs() < 1e-5, "column 1 of the transposed w2 scaled by s_1");
}

#[test]
fn alpha_zero_changes_only_by_rounding_and_unseen_channels_keep_scale_one() {
    let model = two_readers();
    let tight = VerifyOptions { atol: 1e-5, rtol: 1e-5, ..Default::default() };
    // alpha 0: s_k = 1 / max|w_k|; a channel never seen nonzero keeps 1
    let rewritten = rewrite_and_compare(&model, &smoothing(0.0, &[1.0, 0.0, 2.0]), &tight);
    assert!(rewritten.comparison.passed());
    let inverse = rewritten.model.graph.initializer("x/inverse_smoothing").unwrap().to_f32().unwrap();
    assert_eq!(inverse[1], 1.0);
    // row 2's weights: w1 [-0.75, 1.5], w2's column 2 [-0.2, 0.6]: s_2 = 1 / 1.5
    assert!((inverse[2] - 1.5).abs() < 1e-6, "{}", inverse[2]);
}

#[test]
fn an_activation_with_another_reader_is_left_alone() {
    let mut model = two_readers();
    // a Relu reading x would see the scaled values: no rewrite
    let relu = Node::new("Relu", &["x"], &["r"]);
    model.graph.add_node(relu);
    model.graph.outputs.push(onnxopt::ir::ValueInfo::tensor("r", DataType::Float, vec![]));
    let rewritten = rewrite_and_compare(&model, &smoothing(0.5, &[1.0, 40.0, 0.5]), &VerifyOptions::default());
    assert_eq!(rewritten.patches(), 0);
    // and no statistics for the activation: no rewrite either
    let rewritten = rewrite_and_compare(&two_readers(), &smoothing(0.5, &[]), &VerifyOptions::default());
    assert_eq!(rewritten.patches(), 0);
}
