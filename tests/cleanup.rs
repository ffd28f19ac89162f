//! The cleanup passes: for each, a small model where it fires (snapshot of the IR
//! before and after, tract comparison, patch and node counts) and one where it
//! must not; then all five in pipeline order on the fixtures and the real models.

mod common;

use common::*;
use onnxopt::ir::{AttrValue, DataType, Dim, GraphBuilder, Model, Node, Tensor, ValueInfo};
use onnxopt::onnx;
use onnxopt::passes::check::{rewrite_and_compare, Rewritten};
use onnxopt::passes::common_subexpression::MergeCommonSubexpressions;
use onnxopt::passes::constant_folding::FoldConstants;
use onnxopt::passes::dead_code::EliminateDeadCode;
use onnxopt::passes::no_op::RemoveNoOps;
use onnxopt::passes::shape_folding::FoldShapes;
use onnxopt::passes::Pass;
use onnxopt::verify::VerifyOptions;
use std::path::Path;

fn rewrite(model: &Model, passes: Vec<Box<dyn Pass>>) -> Rewritten {
    rewrite_and_compare(model, &passes, &VerifyOptions::default())
}

fn proposed(pass: &dyn Pass, model: &Model) -> usize {
    pass.propose(model).unwrap().len()
}

fn ints(values: &[i64]) -> AttrValue {
    AttrValue::Ints(values.to_vec())
}

fn values(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 - n as f32 / 2.0) * scale).collect()
}

// ---------------------------------------------------------------------------
// EliminateDeadCode
// ---------------------------------------------------------------------------

#[test]
fn dead_code_removes_an_unused_branch() {
    let mut b = GraphBuilder::new("g");
    let x = b.input("x", DataType::Float, &[2, 4]);
    let w = b.initializer_f32("w", &[4, 4], &values(16, 0.1));
    b.initializer_f32("orphan", &[3], &[1.0, 2.0, 3.0]);
    let y = b.node("Relu", &[&x]);
    let t = b.node("MatMul", &[&x, &w]);
    b.node("Neg", &[&t]);
    b.output(&y, DataType::Float, &[2, 4]);
    let mut model = b.into_model(17);
    model.graph.value_info.push(ValueInfo::tensor(&t, DataType::Float, vec![Dim::Fixed(2), Dim::Fixed(4)]));

    let r = rewrite(&model, vec![Box::new(EliminateDeadCode)]);
    insta::assert_snapshot!("dead_code__unused_branch", r.snapshot);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    // two nodes, two initializers, one value_info entry
    assert_eq!(r.patches(), 5);
    assert_eq!(r.model.graph.node_count(), 1);
    assert!(r.model.graph.initializers.is_empty());
    assert!(r.model.graph.value_info.is_empty());
}

#[test]
fn dead_code_keeps_what_subgraphs_capture_and_the_interface() {
    let mut then_branch = GraphBuilder::new("then");
    let t = then_branch.node("Identity", &["h"]);
    then_branch.output(&t, DataType::Float, &[2]);
    let mut else_branch = GraphBuilder::new("else");
    let e = else_branch.node("Identity", &["x"]);
    else_branch.output(&e, DataType::Float, &[2]);

    let mut b = GraphBuilder::new("g");
    let x = b.input("x", DataType::Float, &[2]);
    let c = b.input("c", DataType::Bool, &[]);
    // an unused input, and an initializer that is an input's default: the interface
    b.input("unused", DataType::Float, &[2]);
    b.input("scale", DataType::Float, &[2]);
    b.initializer_f32("scale", &[2], &[1.0, 1.0]);
    // read only from inside the If's then-branch
    b.add(Node::new("Neg", &[&x], &["h"]));
    b.add(
        Node::new("If", &[&c], &["y"])
            .with_attr("then_branch", AttrValue::Graph(Box::new(then_branch.into_graph())))
            .with_attr("else_branch", AttrValue::Graph(Box::new(else_branch.into_graph()))),
    );
    b.output("y", DataType::Float, &[2]);
    let model = b.into_model(17);
    assert_eq!(proposed(&EliminateDeadCode, &model), 0);
}

// ---------------------------------------------------------------------------
// RemoveNoOps
// ---------------------------------------------------------------------------

#[test]
fn no_ops_are_bypassed() {
    let mut b = GraphBuilder::new("g");
    let x = b.input("x", DataType::Float, &[2, 3, 4]);
    let shape = b.initializer_i64("shape", &[3], &[2, 3, 4]);
    let expand_to = b.initializer_i64("expand_to", &[2], &[3, 1]);
    let starts = b.initializer_i64("starts", &[1], &[0]);
    let ends = b.initializer_i64("ends", &[1], &[i64::MAX]);
    let axes = b.initializer_i64("axes", &[1], &[1]);
    let i = b.node("Identity", &[&x]);
    b.add(Node::new("Dropout", &[&i], &["dropped", "mask"]).with_name("dropout"));
    let c = b.node_with("Cast", &["dropped"], vec![("to", AttrValue::Int(DataType::Float.code() as i64))]);
    let r = b.node("Reshape", &[&c, &shape]);
    let t = b.node_with("Transpose", &[&r], vec![("perm", ints(&[0, 1, 2]))]);
    let e = b.node("Expand", &[&t, &expand_to]);
    let s = b.node("Slice", &[&e, &starts, &ends, &axes]);
    let k = b.node_with("Concat", &[&s], vec![("axis", AttrValue::Int(0))]);
    let y = b.node("Relu", &[&k]);
    b.output(&y, DataType::Float, &[2, 3, 4]);
    let model = b.into_model(17);

    let r = rewrite(&model, vec![Box::new(RemoveNoOps)]);
    insta::assert_snapshot!("no_op__chain_of_no_ops", r.snapshot);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    assert_eq!(r.patches(), 8);
    assert_eq!(r.model.graph.node_count(), 1);
    assert_eq!(r.records[0].by_origin.len(), 8, "one patch per rule: {:?}", r.records[0].by_origin);
}

#[test]
fn no_ops_that_are_not() {
    let mut b = GraphBuilder::new("g");
    let x = b.input("x", DataType::Float, &[2, 3, 4]);
    let symbolic = b.input_symbolic("s", DataType::Float, vec![Dim::Symbol("batch".into()), Dim::Fixed(4)]);
    let flat = b.initializer_i64("flat", &[2], &[6, 4]);
    let grow = b.initializer_i64("grow", &[4], &[2, 2, 3, 4]);
    let zero = b.initializer_i64("zero", &[1], &[0]);
    let two = b.initializer_i64("two", &[1], &[2]);
    let one = b.initializer_i64("one", &[1], &[1]);
    let last = b.initializer_i64("last", &[1], &[-1]);
    let before_first = b.initializer_i64("before_first", &[1], &[i64::MIN]);
    let minus_one = b.initializer_i64("minus_one", &[1], &[-1]);
    let training = b.initializer(Tensor::from_raw("training", DataType::Bool, vec![], vec![1u8].into()));
    // a graph output keeps its producer
    b.add(Node::new("Identity", &[&x], &["x_out"]));
    b.output("x_out", DataType::Float, &[2, 3, 4]);
    b.node_with("Cast", &[&x], vec![("to", AttrValue::Int(DataType::Int64.code() as i64))]);
    b.node("Reshape", &[&x, &flat]);
    b.node("Expand", &[&x, &grow]);
    b.node_with("Transpose", &[&x], vec![("perm", ints(&[1, 0, 2]))]);
    // part of axis 1, and all of it reversed
    b.node("Slice", &[&x, &zero, &two, &one]);
    b.node("Slice", &[&x, &last, &before_first, &one, &minus_one]);
    b.node_with("Concat", &[&x, &x], vec![("axis", AttrValue::Int(0))]);
    // Dropout training, and Dropout whose mask is read
    b.add(Node::new("Dropout", &[&x, "", &training], &["trained", "trained_mask"]));
    b.add(Node::new("Dropout", &[&x], &["dropped", "mask"]));
    b.output("mask", DataType::Bool, &[2, 3, 4]);
    // the same rank but an unknown dim proves nothing
    let unknown = b.input_symbolic("u", DataType::Float, vec![Dim::Unknown, Dim::Fixed(4)]);
    let unknown_shape = b.node("Shape", &[&unknown]);
    let other = b.node("Reshape", &[&unknown, &unknown_shape]);
    let _ = (other, symbolic);
    let model = b.into_model(17);
    assert_eq!(proposed(&RemoveNoOps, &model), 0);
}

/// Concat(x, Slice(x, [4:])) along x's last axis of 4: the slice is empty, the
/// Concat is x (how Phi-3 writes a rotary covering the whole head); a slice that
/// is not provably empty keeps it.
#[test]
fn concat_of_an_empty_slice() {
    let graph = |start: i64| {
        let mut b = GraphBuilder::new("g");
        let x = b.input("x", DataType::Float, &[2, 3, 4]);
        let (starts, ends, axes) =
            (b.initializer_i64("starts", &[1], &[start]), b.initializer_i64("ends", &[1], &[i64::MAX]), b.initializer_i64("axes", &[1], &[-1]));
        let rest = b.node("Slice", &[&x, &starts, &ends, &axes]);
        let relu = b.node("Relu", &[&x]);
        let joined = b.node_with("Concat", &[&relu, &rest], vec![("axis", AttrValue::Int(-1))]);
        let y = b.node("Neg", &[&joined]);
        b.output(&y, DataType::Float, &[2, 3, 4 + 4 - start]);
        b.into_model(17)
    };
    let r = rewrite(&graph(4), vec![Box::new(RemoveNoOps)]);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    assert_eq!(r.records[0].by_origin.get("concat-of-empty"), Some(&1), "{}", r.snapshot);
    insta::assert_snapshot!("no_op__concat_of_empty", r.snapshot);
    assert_eq!(proposed(&RemoveNoOps, &graph(3)), 0);
}

/// Reshape(s, Shape(s)) with s: [batch, 4] keeps the shape symbolically: a no-op.
#[test]
fn reshape_to_its_own_symbolic_shape() {
    let mut b = GraphBuilder::new("g");
    let s = b.input_symbolic("s", DataType::Float, vec![Dim::Symbol("batch".into()), Dim::Fixed(4)]);
    let shape = b.node("Shape", &[&s]);
    let r = b.node("Reshape", &[&s, &shape]);
    let y = b.node("Relu", &[&r]);
    b.output(&y, DataType::Float, &[-1, 4]);
    assert_eq!(proposed(&RemoveNoOps, &b.into_model(17)), 1);
}

/// Reshape(x: [?, 2, 3], [-1, 2, 3]) leaves x's shape whatever its first dim
/// (dynamo writes it after a batched product): a no-op. [-1, 3, 2] moves
/// elements, and [0, 2, 3] with allowzero=1 would ask for a dim of 0.
#[test]
fn reshape_to_minus_one_and_its_own_trailing_dims() {
    let graph = |target: &[i64], allowzero: i64| {
        let mut b = GraphBuilder::new("g");
        let x = b.input_symbolic("x", DataType::Float, vec![Dim::Unknown, Dim::Fixed(2), Dim::Fixed(3)]);
        let shape = b.initializer_i64("shape", &[3], target);
        let r = b.node_with("Reshape", &[&x, &shape], vec![("allowzero", AttrValue::Int(allowzero))]);
        let y = b.node("Relu", &[&r]);
        b.output(&y, DataType::Float, &[-1, target[1], target[2]]);
        b.into_model(17)
    };
    let r = rewrite(&graph(&[-1, 2, 3], 1), vec![Box::new(RemoveNoOps)]);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    assert_eq!(r.records[0].by_origin.get("reshape-to-same-shape"), Some(&1), "{}", r.snapshot);
    assert_eq!(proposed(&RemoveNoOps, &graph(&[0, 2, 3], 0)), 1);
    assert_eq!(proposed(&RemoveNoOps, &graph(&[-1, 3, 2], 0)), 0);
    assert_eq!(proposed(&RemoveNoOps, &graph(&[0, 2, 3], 1)), 0);
}

// ---------------------------------------------------------------------------
// FoldConstants
// ---------------------------------------------------------------------------

#[test]
fn constants_fold_into_initializers() {
    let mut b = GraphBuilder::new("g");
    let x = b.input("x", DataType::Float, &[2, 4]);
    let big = b.initializer_f32("big", &[16, 4], &values(64, 0.01));
    let bias = b.initializer_f32("bias", &[16], &values(16, 0.1));
    let t = b.node_with("Transpose", &[&big], vec![("perm", ints(&[1, 0]))]);
    let h = b.node("MatMul", &[&x, &t]);
    let k_value = Tensor::from_f32("", &ndarray::ArrayD::from_shape_vec(vec![16], values(16, 0.5)).unwrap());
    let k = b.node_with("Constant", &[], vec![("value", AttrValue::Tensor(k_value))]);
    let kb = b.node("Mul", &[&k, &bias]);
    let h2 = b.node("Add", &[&h, &kb]);
    let dims = b.node_with("Constant", &[], vec![("value_ints", ints(&[2, 16]))]);
    let one = Tensor::from_f32("", &ndarray::ArrayD::from_elem(vec![1], 1.0));
    // 128 bytes of ones from a 16-byte shape: folding it would grow the file
    let ones = b.node_with("ConstantOfShape", &[&dims], vec![("value", AttrValue::Tensor(one))]);
    let y = b.node("Add", &[&h2, &ones]);
    b.output(&y, DataType::Float, &[2, 16]);
    let model = b.into_model(17);

    let r = rewrite(&model, vec![Box::new(FoldConstants::default())]);
    insta::assert_snapshot!("constant_folding__transpose_mul_and_constants", r.snapshot);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    // Transpose and Mul folded, both Constant nodes turned into initializers
    assert_eq!(r.patches(), 4);
    assert_eq!(r.model.graph.node_count(), 4);
    let names: Vec<&str> = r.model.graph.initializers.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, [t.as_str(), kb.as_str(), dims.as_str()]);
}

#[test]
fn constants_that_must_not_fold() {
    let mut b = GraphBuilder::new("g");
    let x = b.input("x", DataType::Float, &[2, 4]);
    let w = b.initializer_f32("w", &[4, 4], &values(16, 0.1));
    let v = b.initializer_f32("v", &[4, 4], &values(16, 0.2));
    let square = b.initializer_i64("square", &[2], &[64, 64]);
    let stacked = b.initializer_i64("stacked", &[3], &[8, 4, 4]);
    let three = b.initializer_i64("three", &[1], &[3]);
    // each read by a node that does not fold: a fold there would be kept
    fn read(b: &mut GraphBuilder, out: String) {
        b.node("Identity", &[&out]);
    }
    // an input is not constant
    let product = b.node("MatMul", &[&x, &w]);
    read(&mut b, product);
    // random
    let random = b.node("RandomUniformLike", &[&w]);
    read(&mut b, random);
    let dropped = b.node("Dropout", &[&w]);
    read(&mut b, dropped);
    // bigger than what they free: 16 KiB from 16 bytes, 512 bytes from 24
    let filled = b.node("ConstantOfShape", &[&square]);
    read(&mut b, filled);
    let expanded = b.node("Expand", &[&w, &stacked]);
    read(&mut b, expanded);
    // tract cannot evaluate it (16 elements into 3): left, not an error
    let reshaped = b.node("Reshape", &[&v, &three]);
    read(&mut b, reshaped);
    // a graph output stays a node output
    b.add(Node::new("Add", &[&w, &v], &["sum"]));
    b.output("sum", DataType::Float, &[4, 4]);
    let model = b.into_model(17);
    assert_eq!(proposed(&FoldConstants::default(), &model), 0);

    // over the size cap: a 256-byte transpose with a 128-byte cap
    let mut b = GraphBuilder::new("g");
    let big = b.initializer_f32("big", &[16, 4], &values(64, 0.01));
    let t = b.node_with("Transpose", &[&big], vec![("perm", ints(&[1, 0]))]);
    b.node("Relu", &[&t]);
    let mut model = b.into_model(17);
    assert_eq!(proposed(&FoldConstants { max_bytes: 128 }, &model), 0);
    assert_eq!(proposed(&FoldConstants::default(), &model), 1);
    // before IR 4, initializers must be graph inputs: none is added
    model.ir_version = 3;
    assert_eq!(proposed(&FoldConstants::default(), &model), 0);
}

// ---------------------------------------------------------------------------
// FoldShapes
// ---------------------------------------------------------------------------

/// y = Reshape(x, Concat(Unsqueeze(Shape(x)[axis]), [-1]))
fn reshape_by_own_dim(x_shape: Vec<Dim>, axis: i64) -> Model {
    let mut b = GraphBuilder::new("g");
    let x = b.input_symbolic("x", DataType::Float, x_shape);
    let index = b.initializer_i64("index", &[], &[axis]);
    let zero = b.initializer_i64("zero", &[1], &[0]);
    let rest = b.initializer_i64("rest", &[1], &[-1]);
    let s = b.node("Shape", &[&x]);
    let d = b.node_with("Gather", &[&s, &index], vec![("axis", AttrValue::Int(0))]);
    let u = b.node("Unsqueeze", &[&d, &zero]);
    let c = b.node_with("Concat", &[&u, &rest], vec![("axis", AttrValue::Int(0))]);
    let y = b.node("Reshape", &[&x, &c]);
    b.output(&y, DataType::Float, &[-1, -1]);
    b.into_model(17)
}

#[test]
fn static_shapes_fold() {
    let model = reshape_by_own_dim(vec![Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(4)], 1);
    let r = rewrite(&model, vec![Box::new(FoldShapes), Box::new(EliminateDeadCode)]);
    insta::assert_snapshot!("shape_folding__static_reshape_target", r.snapshot);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    // the Concat, where the known values meet the Reshape, becomes an initializer
    assert_eq!(r.records[0].patches, 1);
    assert_eq!(r.model.graph.node_count(), 1);
    let target = &r.model.graph.initializers[0];
    assert_eq!(target.to_i64().unwrap().into_raw_vec_and_offset().0, vec![3, -1]);
}

#[test]
fn symbolic_shapes_do_not_fold() {
    let dims = vec![Dim::Symbol("batch".into()), Dim::Fixed(3), Dim::Fixed(4)];
    assert_eq!(proposed(&FoldShapes, &reshape_by_own_dim(dims, 0)), 0);
    // static, but IR 3 wants every initializer to be a graph input
    let mut old = reshape_by_own_dim(vec![Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(4)], 1);
    old.ir_version = 3;
    assert_eq!(proposed(&FoldShapes, &old), 0);
}

// ---------------------------------------------------------------------------
// MergeCommonSubexpressions
// ---------------------------------------------------------------------------

#[test]
fn common_subexpressions_merge() {
    let mut b = GraphBuilder::new("g");
    let x = b.input("x", DataType::Float, &[2, 4]);
    let w1 = b.initializer_f32("w1", &[4], &[0.5, -1.0, 2.0, 0.0]);
    let w2 = b.initializer_f32("w2", &[4], &[0.5, -1.0, 2.0, 0.0]);
    let a1 = b.node("Relu", &[&x]);
    let a2 = b.node("Relu", &[&x]);
    let b1 = b.node("Add", &[&a1, &w1]);
    let b2 = b.node("Add", &[&a2, &w2]);
    let y = b.node("Mul", &[&b1, &b2]);
    b.output(&y, DataType::Float, &[2, 4]);
    let model = b.into_model(17);

    let r = rewrite(&model, vec![Box::new(MergeCommonSubexpressions)]);
    insta::assert_snapshot!("common_subexpression__relu_add_twice", r.snapshot);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    // w2 into w1, then the Relu, then the Add (which only matched once both merged)
    assert_eq!(r.patches(), 3);
    assert_eq!(r.model.graph.node_count(), 3);
    assert_eq!(r.model.graph.initializers.len(), 1);
}

#[test]
fn subexpressions_that_differ() {
    let mut b = GraphBuilder::new("g");
    let x = b.input("x", DataType::Float, &[2, 4]);
    let c = b.input("c", DataType::Bool, &[]);
    // an initializer that is an input's default is not a constant
    b.input("default", DataType::Float, &[4]);
    b.initializer_f32("default", &[4], &[1.0; 4]);
    b.initializer_f32("ones", &[4], &[1.0; 4]);
    // the same bytes, another type
    b.initializer_f32("zero_f", &[1], &[0.0]);
    b.initializer(Tensor::from_raw("zero_i", DataType::Int32, vec![1], vec![0u8; 4].into()));
    let alpha = |a: f32| vec![("alpha", AttrValue::Float(a))];
    b.node_with("LeakyRelu", &[&x], alpha(0.1));
    b.node_with("LeakyRelu", &[&x], alpha(0.2));
    b.node_with("LeakyRelu", &[&x], alpha(0.0));
    b.node_with("LeakyRelu", &[&x], alpha(-0.0));
    b.node_with("Transpose", &[&x], vec![("perm", ints(&[1, 0]))]);
    b.node_with("Transpose", &[&x], vec![("perm", ints(&[0, 1]))]);
    b.node("RandomNormalLike", &[&x]);
    b.node("RandomNormalLike", &[&x]);
    let branch = |name: &str| {
        let mut g = GraphBuilder::new(name);
        let out = g.node("Neg", &["x"]);
        g.output(&out, DataType::Float, &[2, 4]);
        AttrValue::Graph(Box::new(g.into_graph()))
    };
    for out in ["if_1", "if_2"] {
        let node = Node::new("If", &[&c], &[out]);
        b.add(node.with_attr("then_branch", branch("t")).with_attr("else_branch", branch("e")));
    }
    // the later copy is a graph output: it stays
    b.add(Node::new("Neg", &[&x], &["neg"]));
    b.add(Node::new("Neg", &[&x], &["neg_out"]));
    b.output("neg_out", DataType::Float, &[2, 4]);
    let model = b.into_model(17);
    assert_eq!(proposed(&MergeCommonSubexpressions, &model), 0);
}

// ---------------------------------------------------------------------------
// All five on real exports
// ---------------------------------------------------------------------------

/// The cleanup passes in the order a pipeline runs them: dead code last, to take
/// what the others left unread.
fn cleanup_passes() -> Vec<Box<dyn Pass>> {
    vec![
        Box::new(RemoveNoOps),
        Box::new(FoldConstants::default()),
        Box::new(FoldShapes),
        Box::new(FoldConstants::default()),
        Box::new(MergeCommonSubexpressions),
        Box::new(EliminateDeadCode),
    ]
}

fn clean_and_compare(path: &Path) {
    let model = onnx::load(path).unwrap_or_else(|e| panic!("{e}"));
    let options = VerifyOptions { atol: 1e-4, rtol: 0.0, ..VerifyOptions::default() };
    let r = rewrite_and_compare(&model, &cleanup_passes(), &options);
    let name = path.file_name().unwrap().to_string_lossy();
    let steps: Vec<String> = r.records.iter().map(|p| format!("{} {}->{}", p.pass, p.nodes_before, p.nodes_after)).collect();
    eprintln!(
        "{name}: {} -> {} nodes, {} -> {} initializers, max abs diff {:.1e} ({})",
        model.graph.node_count(),
        r.model.graph.node_count(),
        model.graph.initializers.len(),
        r.model.graph.initializers.len(),
        r.comparison.max_abs(),
        steps.join(", ")
    );
    assert!(r.comparison.passed(), "{name}: {:?}", r.comparison);
    assert!(r.model.graph.node_count() < model.graph.node_count(), "{name}: nothing to clean up?");
    // a second run finds nothing left to do
    for pass in cleanup_passes() {
        assert_eq!(proposed(pass.as_ref(), &r.model), 0, "{name}: {} after the pipeline", pass.name());
    }
}

#[test]
fn cleanup_on_fixtures() {
    let mut files: Vec<_> = std::fs::read_dir(fixture("")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "onnx")).collect();
    files.sort();
    assert!(!files.is_empty());
    for path in files {
        clean_and_compare(&path);
    }
}

#[test]
fn cleanup_on_minilm() {
    for file in ["model.ts.onnx", "model.dynamo.onnx"] {
        let Some(path) = shared_model(file) else { continue };
        clean_and_compare(&path);
    }
}
