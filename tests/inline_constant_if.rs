//! `inline-constant-if`: an If with a constant condition becomes its taken
//! branch (snapshots, the numbers in tract or ORT, where it must not fire).

mod common;

use onnxopt::ir::{AttrValue, DataType, GraphBuilder, Model, Tensor};
use onnxopt::passes::check::rewrite_and_compare;
use onnxopt::passes::inline_constant_if::InlineConstantIf;
use onnxopt::passes::Pass;
use onnxopt::verify::VerifyOptions;

/// `y = If(c) { then: Relu(x) * 2 ; else: Neg(x) }`, read by `z = Sigmoid(y)`
/// (`y_is_output`: `y` itself is the graph output). `c` is a constant when given.
fn if_model(condition: Option<bool>, y_is_output: bool) -> Model {
    let branch = |then: bool| {
        let mut b = GraphBuilder::new(if then { "then" } else { "else" });
        let out = if then {
            let two = b.initializer_f32(if then { "two" } else { "unused" }, &[1], &[2.0]);
            let r = b.node("Relu", &["x"]);
            b.node("Mul", &[&r, &two])
        } else {
            b.node("Neg", &["x"])
        };
        b.output(&out, DataType::Float, &[2, 3]);
        b.into_graph()
    };
    let mut b = GraphBuilder::new("g");
    b.input("x", DataType::Float, &[2, 3]);
    let c = match condition {
        Some(value) => b.initializer(Tensor::from_raw("c", DataType::Bool, vec![1], vec![u8::from(value)].into())),
        None => b.input("c", DataType::Bool, &[1]),
    };
    let then_branch = AttrValue::Graph(Box::new(branch(true)));
    let else_branch = AttrValue::Graph(Box::new(branch(false)));
    let y = b.node_with("If", &[&c], vec![("then_branch", then_branch), ("else_branch", else_branch)]);
    if y_is_output {
        b.output(&y, DataType::Float, &[2, 3]);
    } else {
        let z = b.node("Sigmoid", &[&y]);
        b.output(&z, DataType::Float, &[2, 3]);
    }
    b.into_model(17)
}

fn run(model: &Model) -> onnxopt::passes::check::Rewritten {
    rewrite_and_compare(model, &[Box::new(InlineConstantIf) as Box<dyn Pass>], &VerifyOptions { atol: 0.0, rtol: 0.0, ..Default::default() })
}

#[test]
fn inlines_the_then_branch() {
    let r = run(&if_model(Some(true), false));
    insta::assert_snapshot!("inline_constant_if__then", r.snapshot);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    assert_eq!(r.patches(), 1);
    assert!(r.model.graph.nodes().all(|n| n.op_type != "If"));
    assert!(r.model.graph.initializer("two").is_some());
}

#[test]
fn inlines_the_else_branch_into_a_graph_output() {
    let r = run(&if_model(Some(false), true));
    insta::assert_snapshot!("inline_constant_if__else_output", r.snapshot);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    let ops: Vec<&str> = r.model.graph.nodes().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops.len(), 2, "{ops:?}");
    assert!(ops.contains(&"Neg") && ops.contains(&"Identity"), "{ops:?}");
    assert_eq!(r.model.graph.outputs[0].name, if_model(Some(false), true).graph.outputs[0].name);
}

#[test]
fn leaves_a_condition_computed_at_run_time() {
    let model = if_model(None, false);
    assert!(InlineConstantIf.propose(&model).unwrap().is_empty());
}
