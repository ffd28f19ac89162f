//! `MergeCommonSubexpressions`: computes a value once where the model computes it
//! several times, and keeps one copy of identical initializers.
//!
//! What it rewrites:
//! - initializers with the same element type, dims and bytes: readers of the later
//!   ones read the first, and the later ones go;
//! - nodes with the same op, domain, attributes (floats compared bit for bit) and
//!   inputs: readers of the later node's outputs read the first node's, and the
//!   later node goes. Nodes are visited in topological order with inputs renamed
//!   through the merges already made, so `Relu(Add(x, a))` twice merges both
//!   levels in one round.
//!
//! Conditions: not on initializers that are graph inputs (defaults a caller may
//! override, hence not constants); not on nodes with subgraphs, nor random ops,
//! nor ops of domains other than ONNX's and `com.microsoft` (a custom op may keep
//! state); the later copy produces no graph output (`replace_uses` leaves graph
//! outputs alone); both copies omit the same optional outputs.
//!
//! Why it is exact: ONNX ops are functions of their inputs and attributes, so two
//! applications to the same tensors give the same values.
//!
//! ```text
//! a = Relu(x)                           a = Relu(x)
//! b = Relu(x)                     ->    y = Mul(a, a)
//! y = Mul(a, b)
//! ```

use super::{Pass, PassError};
use crate::ir::{AttrValue, Attribute, Graph, Model, Node, NodeId, Patch, Tensor, TensorData, TypedValues};
use std::collections::{HashMap, HashSet};

pub struct MergeCommonSubexpressions;

/// Not merged: each application draws new random values.
const RANDOM_OPS: &[&str] = &["RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"];

impl Pass for MergeCommonSubexpressions {
    fn name(&self) -> &'static str {
        "merge-common-subexpressions"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let graph = &model.graph;
        let order = graph.node_ids().map_err(|cycle| PassError::cycle(self.name(), cycle))?;
        // A merged tensor -> the one its readers read now.
        let mut merged: HashMap<String, String> = HashMap::new();
        let mut patches = merge_initializers(graph, &mut merged);

        // Candidates by op and (renamed) inputs; attributes are compared within.
        let mut seen: HashMap<String, Vec<NodeId>> = HashMap::new();
        for id in order {
            let Some(node) = graph.node(id) else { continue };
            if !is_mergeable(node) {
                continue;
            }
            let inputs: Vec<&str> = node.inputs.iter().map(|i| merged.get(i).map_or(i.as_str(), String::as_str)).collect();
            let key = format!("{}\u{1}{}", node.qualified_op(), inputs.join("\u{1}"));
            let candidates = seen.entry(key).or_default();
            let first = candidates.iter().filter_map(|&c| graph.node(c)).find(|c| same_computation(c, node));
            let Some(first) = first else {
                candidates.push(id);
                continue;
            };
            if node.outputs.iter().any(|o| graph.is_graph_output(o)) {
                continue;
            }
            let mut patch = Patch::new("duplicate-node");
            patch.remove_node(id);
            for (later, kept) in node.outputs.iter().zip(&first.outputs).filter(|(o, _)| !o.is_empty()) {
                patch.replace_uses(later, kept);
                merged.insert(later.clone(), kept.clone());
            }
            patches.push(patch);
        }
        Ok(patches)
    }
}

/// Patches merging identical initializers into the first of them.
fn merge_initializers(graph: &Graph, merged: &mut HashMap<String, String>) -> Vec<Patch> {
    let inputs: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
    // Only tensors with the same type, dims and size can be equal: compare bytes within.
    let mut groups: HashMap<(i32, &[i64], u64), Vec<&Tensor>> = HashMap::new();
    let mut patches = Vec::new();
    for tensor in graph.initializers.iter().filter(|t| !inputs.contains(t.name.as_str())) {
        let group = groups.entry((tensor.dtype.code(), &tensor.dims, tensor.byte_len())).or_default();
        let Some(first) = group.iter().find(|kept| same_values(kept, tensor)) else {
            group.push(tensor);
            continue;
        };
        if graph.is_graph_output(&tensor.name) {
            continue;
        }
        let mut patch = Patch::new("duplicate-initializer");
        patch.replace_uses(&tensor.name, &first.name).remove_initializer(&tensor.name);
        merged.insert(tensor.name.clone(), first.name.clone());
        patches.push(patch);
    }
    patches
}

fn is_mergeable(node: &Node) -> bool {
    matches!(node.domain.as_str(), "" | "ai.onnx" | "com.microsoft")
        && !RANDOM_OPS.contains(&node.op_type.as_str())
        && node.attributes.iter().all(|a| a.value.subgraphs().is_empty())
}

/// Same attributes (in any order) and the same optional outputs omitted; the op
/// and inputs were matched by the caller.
fn same_computation(a: &Node, b: &Node) -> bool {
    let (attrs_a, attrs_b) = (sorted_attributes(a), sorted_attributes(b));
    a.outputs.len() == b.outputs.len()
        && a.outputs.iter().zip(&b.outputs).all(|(x, y)| x.is_empty() == y.is_empty())
        && attrs_a.len() == attrs_b.len()
        && attrs_a.iter().zip(&attrs_b).all(|(x, y)| x.name == y.name && same_value(&x.value, &y.value))
}

fn sorted_attributes(node: &Node) -> Vec<&Attribute> {
    let mut attrs: Vec<&Attribute> = node.attributes.iter().collect();
    attrs.sort_by(|x, y| x.name.cmp(&y.name));
    attrs
}

/// Equal attribute values, floats compared bit for bit (`-0.0` is not `0.0`, a NaN
/// equals itself).
fn same_value(a: &AttrValue, b: &AttrValue) -> bool {
    match (a, b) {
        (AttrValue::Float(x), AttrValue::Float(y)) => x.to_bits() == y.to_bits(),
        (AttrValue::Floats(x), AttrValue::Floats(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
        (AttrValue::Tensor(x), AttrValue::Tensor(y)) => same_values(x, y),
        (AttrValue::Tensors(x), AttrValue::Tensors(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_values(p, q)),
        // Kept unread: their meaning is unknown here.
        (AttrValue::Uninterpreted, _) | (_, AttrValue::Uninterpreted) => false,
        _ => a == b,
    }
}

/// The same type, dims and stored values (raw bytes, or typed fields with floats
/// compared bit for bit), whatever the tensors' names.
fn same_values(a: &Tensor, b: &Tensor) -> bool {
    let same_data = match (&a.data, &b.data) {
        (TensorData::Typed(TypedValues::Floats(x)), TensorData::Typed(TypedValues::Floats(y))) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
        }
        (TensorData::Typed(TypedValues::Doubles(x)), TensorData::Typed(TypedValues::Doubles(y))) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
        }
        // No values recorded for elements that exist: nothing says they are equal.
        (TensorData::Empty, _) | (_, TensorData::Empty) => a.element_count() == 0 && b.element_count() == 0,
        (x, y) => x == y,
    };
    a.dtype == b.dtype && a.dims == b.dims && same_data
}
