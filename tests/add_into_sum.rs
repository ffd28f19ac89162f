//! `add-into-sum`: an Add read only by a Sum becomes two of its operands
//! (the same numbers in tract, snapshotted); an Add with another reader, one
//! that is a graph output, and models below opset 8 are left alone.

use onnxopt::ir::{DataType, GraphBuilder, Model, Node};
use onnxopt::passes::add_into_sum::AddIntoSum;
use onnxopt::passes::check::rewrite_and_compare;
use onnxopt::passes::Pass;
use onnxopt::verify::VerifyOptions;

/// A per-token product's bias Add feeding the residual Sum, as
/// `quantize --mode int8` leaves it: `Sum(x, Add(bias, x W))`, then
/// LayerNormalization.
fn residual_with_bias_add() -> Model {
    let mut b = GraphBuilder::new("bias_into_residual");
    let x = b.input("x", DataType::Float, &[2, 3, 4]);
    let w: Vec<f32> = (0..16).map(|i| ((i * 7 % 11) as f32 - 5.0) / 8.0).collect();
    let w = b.initializer_f32("w", &[4, 4], &w);
    let bias = b.initializer_f32("bias", &[4], &[0.5, -0.25, 0.0, 1.0]);
    let gamma = b.initializer_f32("gamma", &[4], &[1.0, 0.5, 2.0, 1.5]);
    let beta = b.initializer_f32("beta", &[4], &[0.1, -0.2, 0.0, 0.3]);
    let product = b.node("MatMul", &[&x, &w]);
    b.add(Node::new("Add", &[&bias, &product], &["biased"]).with_name("bias_add"));
    b.add(Node::new("Sum", &[&x, "biased"], &["residual"]).with_name("residual_sum"));
    b.add(Node::new("LayerNormalization", &["residual", &gamma, &beta], &["normed"]));
    b.output("normed", DataType::Float, &[2, 3, 4]);
    b.into_model(17)
}

#[test]
fn a_bias_add_read_by_a_sum_joins_it() {
    let model = residual_with_bias_add();
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(AddIntoSum)];
    let r = rewrite_and_compare(&model, &passes, &VerifyOptions { atol: 1e-6, rtol: 0.0, ..VerifyOptions::default() });
    assert_eq!(r.patches(), 1);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    assert_eq!(r.model.graph.nodes().filter(|n| n.op_type == "Add").count(), 0);
    let sum = r.model.graph.nodes().find(|n| n.op_type == "Sum").expect("the Sum");
    assert_eq!(sum.name, "residual_sum");
    assert_eq!(sum.inputs.len(), 3);
    assert_eq!((sum.inputs[0].as_str(), sum.inputs[1].as_str()), ("x", "bias"), "the Add's operands take its place");
    insta::assert_snapshot!("add_into_sum", r.snapshot);
}

#[test]
fn an_add_with_another_reader_or_an_output_stays() {
    let mut shared = residual_with_bias_add();
    let relu = Node::new("Relu", &["biased"], &["also_read"]);
    shared.graph.add_node(relu);
    shared.graph.outputs.push(shared.graph.outputs[0].clone());
    shared.graph.outputs[1].name = "also_read".into();
    assert!(AddIntoSum.propose(&shared).unwrap().is_empty(), "read by Relu too");

    let mut as_output = residual_with_bias_add();
    as_output.graph.outputs.push(as_output.graph.outputs[0].clone());
    as_output.graph.outputs[1].name = "biased".into();
    assert!(AddIntoSum.propose(&as_output).unwrap().is_empty(), "a graph output");

    let mut old = residual_with_bias_add();
    old.opset_imports.iter_mut().for_each(|o| o.version = 7);
    assert!(AddIntoSum.propose(&old).unwrap().is_empty(), "opset 7");
}
