//! `pack-sibling-matmuls`: MatMuls of one activation by constant weights
//! become one MatMul of the packed weights and a Split (the same numbers in
//! tract, snapshotted); a lone MatMul, and weights a caller may override (graph
//! inputs), are left alone.

use onnxopt::ir::{DataType, GraphBuilder, Model};
use onnxopt::passes::check::rewrite_and_compare;
use onnxopt::passes::pack_sibling_matmuls::PackSiblingMatMuls;
use onnxopt::passes::Pass;
use onnxopt::verify::VerifyOptions;

fn weight(b: &mut GraphBuilder, name: &str, k: usize, n: usize, seed: usize) -> String {
    let values: Vec<f32> = (0..k * n).map(|i| (((i + seed) * 37 % 23) as f32 - 11.0) / 16.0).collect();
    b.initializer_f32(name, &[k, n], &values)
}

/// A decoder layer's projections of the normed x [2, 3, 8]: q [8, 8], k and
/// v [8, 4] (grouped heads), each read by a Relu; with `weights_as_input`, k's
/// weight is also a graph input (overridable).
fn projections(count: usize, weights_as_input: bool) -> Model {
    let mut b = GraphBuilder::new("projections");
    let x = b.input("x", DataType::Float, &[2, 3, 8]);
    for (i, n) in [8, 4, 4].into_iter().take(count).enumerate() {
        let w = weight(&mut b, &format!("w{i}"), 8, n, i);
        let y = b.node("MatMul", &[&x, &w]);
        let y = b.node("Relu", &[&y]);
        b.output(&y, DataType::Float, &[2, 3, n as i64]);
    }
    let mut model = b.into_model(17);
    if weights_as_input {
        for w in ["w1", "w2"] {
            let info = onnxopt::ir::ValueInfo::tensor(w, DataType::Float, vec![onnxopt::ir::Dim::Fixed(8), onnxopt::ir::Dim::Fixed(4)]);
            model.graph.inputs.push(info);
        }
    }
    model
}

#[test]
fn sibling_projections_become_one_matmul() {
    let model = projections(3, false);
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(PackSiblingMatMuls)];
    let r = rewrite_and_compare(&model, &passes, &VerifyOptions { atol: 1e-6, rtol: 1e-6, ..VerifyOptions::default() });
    assert_eq!(r.patches(), 1);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    let matmuls: Vec<_> = r.model.graph.nodes().filter(|n| n.op_type == "MatMul").collect();
    assert_eq!(matmuls.len(), 1);
    let packed = r.model.graph.initializer(&matmuls[0].inputs[1]).expect("a packed weight");
    assert_eq!(packed.dims, vec![8, 16]);
    let split = r.model.graph.nodes().find(|n| n.op_type == "Split").expect("a Split");
    assert_eq!(split.outputs.len(), 3);
    insta::assert_snapshot!("pack_sibling_matmuls", r.snapshot);
}

#[test]
fn a_lone_matmul_or_an_overridable_weight_stays() {
    assert!(PackSiblingMatMuls.propose(&projections(1, false)).unwrap().is_empty());
    // w1 and w2 are graph inputs: only w0 is a constant, alone
    assert!(PackSiblingMatMuls.propose(&projections(3, true)).unwrap().is_empty());
}
