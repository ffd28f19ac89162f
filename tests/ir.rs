//! The IR's own behaviour: edges kept in step with names, topological order
//! after edits, validation messages, the text printer, and `inspect`.

mod common;

use common::*;
use onnxopt::inspect;
use onnxopt::ir::{AttrValue, DataType, GraphBuilder, InvalidGraph, Node, Slot};
use onnxopt::onnx;
use std::collections::HashSet;

#[test]
fn edges_follow_names() {
    let model = small_mlp();
    let g = &model.graph;
    let (mm, _) = g.producer("matmul_1").unwrap();
    let uses = g.uses("matmul_1");
    assert_eq!(uses.len(), 1);
    assert_eq!(g.node(uses[0].node).unwrap().op_type, "Add");
    assert_eq!(uses[0].slot, Slot::Input(0));
    assert_eq!(g.dag().edge_count(), 2);
    assert_eq!(g.node(mm).unwrap().op_type, "MatMul");
    assert_eq!(g.uses("x").len(), 1, "graph inputs have uses too");
}

#[test]
fn removing_and_rewiring_keeps_a_topological_order() {
    let mut model = small_mlp();
    let g = &mut model.graph;
    // insert an Identity after MatMul, added last, then bypass the Add with it
    let (add, _) = g.producer("add_2").unwrap();
    g.add_node(Node::new("Identity", &["matmul_1"], &["ident"]));
    g.update_node(add, |n| n.inputs[0] = "ident".into());
    let order: Vec<String> = g.nodes().map(|n| n.op_type.clone()).collect();
    assert_eq!(order, ["MatMul", "Identity", "Add", "Relu"]);
    g.validate(&HashSet::new()).unwrap();

    // removing the Identity leaves Add reading a name nothing produces
    let (ident, _) = g.producer("ident").unwrap();
    g.remove_node(ident);
    let err = g.validate(&HashSet::new()).unwrap_err();
    assert!(matches!(err, InvalidGraph::UndefinedInput { ref tensor, .. } if tensor == "ident"), "{err}");
    g.replace_uses("ident", "matmul_1");
    g.validate(&HashSet::new()).unwrap();
}

#[test]
fn cycles_and_duplicates_are_reported() {
    let mut b = GraphBuilder::new("g");
    let x = b.input("x", DataType::Float, &[2]);
    b.add(Node::new("Add", &[&x, "b"], &["a"]));
    b.add(Node::new("Relu", &["a"], &["b"]));
    b.output("b", DataType::Float, &[2]);
    let g = b.into_graph();
    let err = g.validate(&HashSet::new()).unwrap_err();
    assert!(err.to_string().contains("cycle"), "{err}");

    let mut b = GraphBuilder::new("g");
    let x = b.input("x", DataType::Float, &[2]);
    b.add(Node::new("Relu", &[&x], &["y"]).with_name("first"));
    b.add(Node::new("Neg", &[&x], &["y"]).with_name("second"));
    b.output("y", DataType::Float, &[2]);
    let err = b.into_graph().validate(&HashSet::new()).unwrap_err();
    assert_eq!(err.to_string(), "tensor 'y' in graph 'g' is produced twice (by node 'first' and by node 'second')");
}

#[test]
fn subgraphs_capture_outer_names() {
    let mut then_branch = GraphBuilder::new("then");
    let t = then_branch.node("Neg", &["x"]);
    then_branch.output(&t, DataType::Float, &[2]);
    let mut else_branch = GraphBuilder::new("else");
    let e = else_branch.node("Abs", &["x"]);
    else_branch.output(&e, DataType::Float, &[2]);
    let mut b = GraphBuilder::new("main");
    let x = b.input("x", DataType::Float, &[2]);
    let c = b.input("c", DataType::Bool, &[]);
    b.add(
        Node::new("If", &[&c], &["y"])
            .with_attr("then_branch", AttrValue::Graph(Box::new(then_branch.into_graph())))
            .with_attr("else_branch", AttrValue::Graph(Box::new(else_branch.into_graph()))),
    );
    b.output("y", DataType::Float, &[2]);
    let model = b.into_model(17);
    let g = &model.graph;
    assert!(g.uses(&x).iter().any(|u| u.slot == Slot::Captured));
    g.validate(&HashSet::new()).unwrap();
    // and it survives a round trip through bytes
    let back = onnx::load_bytes(onnx::to_bytes(&model).into(), std::path::Path::new("if.onnx")).unwrap();
    assert_eq!(back, model);
}

#[test]
fn printer_snapshot() {
    insta::assert_snapshot!("ir__small_mlp", small_mlp().to_string());
}

#[test]
fn inspect_small_model() {
    let summary = inspect::summarize(&small_mlp());
    assert_eq!(summary.parameters, 40);
    assert_eq!(summary.ops["ai.onnx"]["MatMul"], 1);
    assert_eq!(summary.inputs[0].r#type, "float32[d0,4]");
    assert_eq!(summary.bytes_by_dtype["float32"], 160);
}

#[test]
fn inspect_recognises_minilm() {
    for file in ["model.ts.onnx", "model.dynamo.onnx"] {
        let Some(path) = shared_model(file) else { return };
        let o = run(&["inspect", path.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let arch = &s["architecture"];
        assert_eq!(arch["kind"], "encoder", "{file}");
        assert_eq!(arch["layers"], 6, "{file}");
        assert_eq!(arch["hidden_size"], 384, "{file}");
        assert_eq!(arch["heads"], 12, "{file}");
        assert_eq!(arch["vocabulary"], 30522, "{file}");
        assert!(s["parameters"].as_u64().unwrap() > 22_000_000);
    }
}

/// The architecture `inspect` recognises on every committed fixture.
#[test]
fn inspect_recognises_the_fixtures() {
    let expected = [
        ("bert.ts.onnx", "encoder", Some(2), 32, 4),
        ("bert.dynamo.onnx", "encoder", Some(2), 32, 4),
        ("bert-eager.ts.onnx", "encoder", Some(2), 32, 4),
        ("gpt2.ts.onnx", "decoder", Some(2), 32, 4),
        ("gpt2.dynamo.onnx", "decoder", Some(2), 32, 4),
        ("llama.ts.onnx", "decoder", Some(2), 64, 4),
        ("llama.dynamo.onnx", "decoder", Some(2), 64, 4),
        ("vit.ts.onnx", "vision-encoder", Some(2), 32, 4),
        ("vit.dynamo.onnx", "vision-encoder", Some(2), 32, 4),
        ("t5.ts.onnx", "encoder-decoder", None, 32, 4),
        ("t5.dynamo.onnx", "encoder-decoder", None, 32, 4),
    ];
    for (file, kind, layers, hidden, heads) in expected {
        let model = onnx::load(&fixture(file)).unwrap();
        let a = inspect::summarize(&model).architecture;
        assert_eq!((a.kind.as_str(), a.layers, a.hidden_size, a.heads), (kind, layers, Some(hidden), Some(heads)), "{file}");
    }
}
