//! `approximate-gelu`: ORT's erf GELUs (BiasGelu, com.microsoft Gelu) become
//! its tanh FastGelu, within 4.8e-4 of the erf form in tract (snapshotted);
//! ONNX Gelu is left alone.

use onnxopt::ir::{AttrValue, DataType, GraphBuilder, Model, Node};
use onnxopt::passes::approximate_gelu::ApproximateGelu;
use onnxopt::passes::check::rewrite_and_compare;
use onnxopt::passes::Pass;
use onnxopt::verify::VerifyOptions;

const CONTRIB: &str = "com.microsoft";

/// x spread over [-6, 6] (the seeded inputs are about unit normal), then
/// BiasGelu(x, b), com.microsoft Gelu(x) and ONNX Gelu(x).
fn gelus() -> Model {
    let mut b = GraphBuilder::new("gelus");
    let x = b.input("x", DataType::Float, &[4, 64]);
    let spread = b.initializer_f32("spread", &[], &[3.0]);
    let bias: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) / 16.0).collect();
    let bias = b.initializer_f32("bias", &[64], &bias);
    let wide = b.node("Mul", &[&x, &spread]);
    b.add(Node::new("BiasGelu", &[&wide, &bias], &["bias_gelu"]).with_domain(CONTRIB).with_name("ffn_gelu"));
    b.add(Node::new("Gelu", &[&wide], &["contrib_gelu"]).with_domain(CONTRIB));
    let onnx_gelu = b.node_with("Gelu", &[&wide], vec![("approximate", AttrValue::String("none".into()))]);
    for out in ["bias_gelu", "contrib_gelu", onnx_gelu.as_str()] {
        b.output(out, DataType::Float, &[4, 64]);
    }
    b.into_model(20)
}

#[test]
fn erf_gelus_become_fast_gelu_within_the_tanh_forms_error() {
    let model = gelus();
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(ApproximateGelu)];
    let r = rewrite_and_compare(&model, &passes, &VerifyOptions { atol: 4.8e-4, rtol: 0.0, ..VerifyOptions::default() });
    assert_eq!(r.patches(), 2);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    // the forms do differ: a rewrite that changed nothing would show 0
    assert!(r.comparison.max_abs() > 1e-4, "{:?}", r.comparison);
    let fast: Vec<_> = r.model.graph.nodes().filter(|n| n.op_type == "FastGelu" && n.domain == CONTRIB).collect();
    assert_eq!(fast.len(), 2);
    let with_bias = fast.iter().find(|n| n.outputs[0] == "bias_gelu").expect("BiasGelu's replacement");
    assert_eq!((with_bias.name.as_str(), with_bias.inputs.len()), ("ffn_gelu", 2), "name and bias input kept");
    assert_eq!(r.model.graph.nodes().filter(|n| n.op_type == "Gelu" && n.domain.is_empty()).count(), 1, "ONNX Gelu stays");
    insta::assert_snapshot!("approximate_gelu", r.snapshot);
}

#[test]
fn onnx_gelu_alone_is_left_alone() {
    let mut b = GraphBuilder::new("onnx_gelu");
    let x = b.input("x", DataType::Float, &[4, 8]);
    let y = b.node("Gelu", &[&x]);
    b.output(&y, DataType::Float, &[4, 8]);
    assert!(ApproximateGelu.propose(&b.into_model(20)).unwrap().is_empty());
}
