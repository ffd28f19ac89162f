//! `InlineConstantIf`: an `If` whose condition is a constant becomes the nodes
//! of the branch it takes.
//!
//! Pattern: `y1, ..., yn = If(c) {then_branch, else_branch}` with `c` a
//! one-element initializer (what `fold-constants` leaves of a condition computed
//! from constants or shapes, such as Optimum's merged decoders' branch once
//! `use_cache_branch` is bound, or an exporter's `if x.dim() == 3` guard).
//!
//! Rewrite: the taken branch's nodes and initializers join the graph; each
//! `yi` is read from the branch's i-th output instead (an `Identity` writes
//! `yi` where it is a graph output, which must keep its name). Inlined nodes
//! are named `<If's name>/<their name>`.
//!
//! Why it is exact: ONNX runs exactly the taken branch, whose nodes read the
//! outer scope by name; names are unique across nested scopes (ONNX's SSA
//! rule), so the branch's names cannot clash with the graph's. Left alone: a
//! condition that is not a constant, a branch whose outputs a patch could not
//! map (output count differs), a branch that declares inputs (invalid for If).
//!
//! ```text
//! c = [true]
//! y = If(c) { then: t = Relu(x) -> t; else: ... }   ->   t = Relu(x); z = Neg(t)
//! z = Neg(y)
//! ```

use super::{Pass, PassError};
use crate::ir::{AttrValue, Graph, Model, Node, Patch};
use std::collections::HashSet;

pub struct InlineConstantIf;

/// The branch an `If` takes when its condition is a one-element constant.
fn taken_branch<'a>(graph: &Graph, node: &'a Node) -> Option<&'a Graph> {
    let condition = graph.initializer(node.inputs.first()?)?;
    let values = condition.to_i64().ok()?;
    if values.len() != 1 {
        return None;
    }
    let branch = if values.iter().next()? != &0 { "then_branch" } else { "else_branch" };
    match node.attr(branch)? {
        AttrValue::Graph(g) if g.inputs.is_empty() && g.outputs.len() == node.outputs.len() => Some(g),
        _ => None,
    }
}

impl Pass for InlineConstantIf {
    fn name(&self) -> &'static str {
        "inline-constant-if"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let graph = &model.graph;
        let graph_outputs: Vec<&str> = graph.outputs.iter().map(|o| o.name.as_str()).collect();
        let mut taken_names: HashSet<String> = graph.nodes().map(|n| n.name.clone()).collect();
        let mut patches = Vec::new();
        for (id, node) in graph.nodes_with_ids() {
            if node.op_type != "If" || !node.domain.is_empty() {
                continue;
            }
            let Some(branch) = taken_branch(graph, node) else { continue };
            let mut patch = Patch::new("constant-condition");
            patch.remove_node(id);
            // node names, unlike tensor names, may repeat across scopes, and
            // ORT refuses a graph with two nodes of one name
            for inner in branch.nodes() {
                let mut name = format!("{}/{}", node.name, inner.name);
                while taken_names.contains(&name) {
                    name.push('_');
                }
                taken_names.insert(name.clone());
                patch.add_node(inner.clone().with_name(name));
            }
            for tensor in &branch.initializers {
                patch.add_initializer(tensor.clone());
            }
            for (output, from) in node.outputs.iter().zip(&branch.outputs) {
                if output.is_empty() {
                    continue;
                }
                if graph_outputs.contains(&output.as_str()) {
                    patch.add_node(Node::new("Identity", &[&from.name], &[output]).with_name(format!("{}/{output}", node.name)));
                } else {
                    patch.replace_uses(output.clone(), from.name.clone());
                }
            }
            patches.push(patch);
        }
        Ok(patches)
    }
}
