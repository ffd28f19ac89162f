//! `residual-add-as-sum`: a residual Add feeding LayerNormalization becomes
//! Sum (the same numbers, checked in tract, and snapshotted); an Add of a
//! constant, or one that feeds anything else, is left alone.

use onnxopt::ir::{DataType, GraphBuilder, Model, Node};
use onnxopt::passes::check::rewrite_and_compare;
use onnxopt::passes::residual_sum::ResidualAddAsSum;
use onnxopt::passes::Pass;
use onnxopt::verify::VerifyOptions;

/// x + y into LayerNormalization (the residual), h + bias and x + y into Relu (not).
fn block() -> Model {
    let mut b = GraphBuilder::new("residual");
    let x = b.input("x", DataType::Float, &[2, 3, 4]);
    let y = b.input("y", DataType::Float, &[2, 3, 4]);
    let gamma = b.initializer_f32("gamma", &[4], &[1.0, 0.5, 2.0, 1.5]);
    let beta = b.initializer_f32("beta", &[4], &[0.1, -0.2, 0.0, 0.3]);
    let bias = b.initializer_f32("bias", &[4], &[0.5, 0.5, -0.5, 0.25]);
    b.add(Node::new("Add", &[&x, &y], &["residual"]).with_name("residual_add"));
    b.add(Node::new("LayerNormalization", &["residual", &gamma, &beta], &["normed"]).with_name("norm"));
    let biased = b.node("Add", &["normed", &bias]);
    let other_sum = b.node("Add", &[&x, &y]);
    let relu = b.node("Relu", &[&other_sum]);
    b.output(&biased, DataType::Float, &[2, 3, 4]);
    b.output(&relu, DataType::Float, &[2, 3, 4]);
    b.into_model(17)
}

#[test]
fn the_residual_add_before_layer_norm_becomes_sum() {
    let model = block();
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(ResidualAddAsSum)];
    let r = rewrite_and_compare(&model, &passes, &VerifyOptions { atol: 0.0, rtol: 0.0, ..VerifyOptions::default() });
    assert_eq!(r.patches(), 1);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    let sum = r.model.graph.nodes().find(|n| n.op_type == "Sum").expect("a Sum");
    assert_eq!((sum.name.as_str(), sum.outputs[0].as_str()), ("residual_add", "residual"));
    assert_eq!(r.model.graph.nodes().filter(|n| n.op_type == "Add").count(), 2, "the bias Add and the Add into Relu stay");
    insta::assert_snapshot!("residual_add_as_sum", r.snapshot);
}

#[test]
fn left_alone_below_opset_8() {
    let mut model = block();
    model.opset_imports.iter_mut().for_each(|o| o.version = 7);
    assert!(ResidualAddAsSum.propose(&model).unwrap().is_empty());
}
