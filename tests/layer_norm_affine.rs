//! `layer-norm-affine-into-weights`: a widening MatMul of a
//! LayerNormalization's output reads the normalized rows, with the norm's
//! scale in the weight and its shift in the bias (the same numbers in tract,
//! snapshotted); a projection that does not widen, a norm without an affine
//! part and one whose Mean output is read are left alone.

use onnxopt::ir::{AttrValue, DataType, GraphBuilder, Model, Node};
use onnxopt::passes::check::rewrite_and_compare;
use onnxopt::passes::layer_norm_affine::LayerNormAffineIntoWeights;
use onnxopt::passes::Pass;
use onnxopt::verify::VerifyOptions;

fn values(count: usize, seed: usize) -> Vec<f32> {
    (0..count).map(|i| (((i * 7 + seed * 13) % 23) as f32 - 11.0) / 8.0).collect()
}

/// y = LayerNormalization(x, g, b) read by the residual Add and by
/// `MatMul(y, W [4, n])`, whose output `ffn` is the one reader of: an Add of
/// a bias (`FfnBias::Add`), a com.microsoft BiasGelu (`BiasGelu`), or nothing
/// (`None`, the product is an output).
#[derive(Clone, Copy)]
enum FfnBias {
    Add,
    BiasGelu,
    None,
}

fn block(n: usize, bias: FfnBias) -> Model {
    let mut b = GraphBuilder::new("ffn_input");
    let x = b.input("x", DataType::Float, &[2, 3, 4]);
    let gamma = b.initializer_f32("gamma", &[4], &[1.5, 0.5, 2.0, 0.75]);
    let beta = b.initializer_f32("beta", &[4], &[0.25, -1.0, 0.5, 2.0]);
    let w = b.initializer_f32("w", &[4, n], &values(4 * n, 1));
    let c = b.initializer_f32("c", &[n], &values(n, 2));
    b.add(Node::new("LayerNormalization", &[&x, &gamma, &beta], &["y"]).with_name("norm").with_attr("epsilon", AttrValue::Float(1e-5)));
    b.add(Node::new("Add", &[&x, "y"], &["residual"]));
    b.add(Node::new("MatMul", &["y", &w], &["ffn"]).with_name("ffn1"));
    let out = match bias {
        FfnBias::Add => b.node("Add", &["ffn", &c]),
        FfnBias::BiasGelu => {
            b.add(Node::new("BiasGelu", &["ffn", &c], &["gelu"]).with_domain("com.microsoft"));
            "gelu".to_string()
        }
        FfnBias::None => "ffn".to_string(),
    };
    b.output("residual", DataType::Float, &[2, 3, 4]);
    b.output(&out, DataType::Float, &[2, 3, n as i64]);
    b.into_model(17)
}

fn exact() -> VerifyOptions {
    VerifyOptions { atol: 1e-5, rtol: 1e-5, ..VerifyOptions::default() }
}

#[test]
fn the_widening_projection_reads_the_normalized_rows() {
    for (bias, case) in [(FfnBias::Add, "add"), (FfnBias::BiasGelu, "bias_gelu"), (FfnBias::None, "none")] {
        let model = block(8, bias);
        let passes: Vec<Box<dyn Pass>> = vec![Box::new(LayerNormAffineIntoWeights)];
        let r = rewrite_and_compare(&model, &passes, &exact());
        assert_eq!(r.patches(), 1, "{case}");
        assert!(r.comparison.passed(), "{case}: {:?}", r.comparison);
        let norms: Vec<_> = r.model.graph.nodes().filter(|n| n.op_type == "LayerNormalization").collect();
        assert_eq!(norms.len(), 2, "{case}: the residual keeps the original norm");
        let matmul = r.model.graph.nodes().find(|n| n.op_type == "MatMul").unwrap();
        assert_eq!(matmul.name, "ffn1", "{case}");
        assert_eq!(matmul.inputs[0], "ffn/normalized", "{case}");
        let adds = r.model.graph.nodes().filter(|n| n.op_type == "Add").count();
        // the shift joins the reader's bias; without one it takes an Add of its own
        assert_eq!(adds, if matches!(bias, FfnBias::BiasGelu) { 1 } else { 2 }, "{case}");
        insta::assert_snapshot!(format!("layer_norm_affine_{case}"), r.snapshot);
    }
}

#[test]
fn left_alone_when_it_does_not_widen_or_has_nothing_to_fold() {
    assert!(LayerNormAffineIntoWeights.propose(&block(4, FfnBias::Add)).unwrap().is_empty(), "N = K");

    let mut plain = block(8, FfnBias::Add);
    for (name, value) in [("gamma", 1.0f32), ("beta", 0.0)] {
        let t = plain.graph.initializers.iter_mut().find(|t| t.name == name).unwrap();
        *t = onnxopt::ir::Tensor::from_f32(name, &ndarray::ArrayD::from_elem(vec![4], value));
    }
    assert!(LayerNormAffineIntoWeights.propose(&plain).unwrap().is_empty(), "no affine part");

    let mut mean_read = block(8, FfnBias::Add);
    let norm_id = mean_read.graph.nodes_with_ids().into_iter().find(|(_, n)| n.name == "norm").map(|(id, _)| id).unwrap();
    mean_read.graph.update_node(norm_id, |n| n.outputs.push("mean".into()));
    mean_read.graph.add_node(Node::new("Neg", &["mean"], &["negated_mean"]));
    mean_read.graph.outputs.push(mean_read.graph.outputs[0].clone());
    mean_read.graph.outputs[2].name = "negated_mean".into();
    assert!(LayerNormAffineIntoWeights.propose(&mean_read).unwrap().is_empty(), "Mean read");
}
