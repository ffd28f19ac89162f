//! `EliminateDeadCode`: removes what no graph output depends on.
//!
//! What it rewrites, in the main graph:
//! - nodes none of whose outputs reaches a graph output. Liveness walks back from
//!   the graph outputs through producers; a live node makes live every tensor it
//!   reads, as an input or from inside one of its subgraphs (an If/Loop body's
//!   captured outer names);
//! - initializers no live node reads, unless they are also graph inputs (then they
//!   are an input's default value, part of the model's interface);
//! - `value_info` entries of tensors that no longer exist: outputs of the nodes
//!   removed here, and entries left behind by earlier passes.
//!
//! Graph inputs are never removed, used or not: they are the interface too.
//! Subgraph bodies are left as they are (patches edit the main graph).
//!
//! Why it is exact: ONNX ops have no side effects, so a node whose outputs reach no
//! graph output cannot change any of them.
//!
//! ```text
//! init w   # read by t only
//! y = Relu(x)                  ->       y = Relu(x)
//! t = MatMul(x, w)
//! u = Neg(t)
//! ```
//!
//! Dead nodes are removed one patch each, consumers first, so that the graph is
//! valid after every patch (a dead node's consumers are all dead and come later in
//! topological order); the initializers they read and the stale `value_info`
//! entries go in patches after them.

use super::{Pass, PassError};
use crate::ir::{Graph, Model, NodeId, Patch};
use std::collections::HashSet;

pub struct EliminateDeadCode;

impl Pass for EliminateDeadCode {
    fn name(&self) -> &'static str {
        "eliminate-dead-code"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let graph = &model.graph;
        let order = graph.node_ids().map_err(|cycle| PassError::cycle(self.name(), cycle))?;
        let live = Liveness::of(graph);
        let mut patches = Vec::new();

        for &id in order.iter().rev().filter(|id| !live.nodes.contains(id)) {
            let mut patch = Patch::new("unused-node");
            patch.remove_node(id);
            patches.push(patch);
        }

        let graph_inputs: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
        let unused_initializers: HashSet<&str> =
            graph.initializers.iter().map(|t| t.name.as_str()).filter(|name| !live.tensors.contains(*name) && !graph_inputs.contains(name)).collect();
        for name in graph.initializers.iter().map(|t| t.name.as_str()).filter(|n| unused_initializers.contains(n)) {
            let mut patch = Patch::new("unused-initializer");
            patch.remove_initializer(name);
            patches.push(patch);
        }

        // What will still exist once the patches above are applied.
        let defined = |name: &str| {
            graph_inputs.contains(name)
                || (graph.initializer(name).is_some() && !unused_initializers.contains(name))
                || graph.producer(name).is_some_and(|(id, _)| live.nodes.contains(&id))
        };
        let stale: Vec<&str> = graph.value_info.iter().map(|v| v.name.as_str()).filter(|n| !defined(n)).collect();
        if !stale.is_empty() {
            let mut patch = Patch::new("stale-value-info");
            for name in stale {
                patch.remove_value_info(name);
            }
            patches.push(patch);
        }
        Ok(patches)
    }
}

/// The nodes some graph output depends on, and every tensor they read.
struct Liveness {
    nodes: HashSet<NodeId>,
    /// Graph outputs and the tensors live nodes read (inputs and captured names).
    tensors: HashSet<String>,
}

impl Liveness {
    fn of(graph: &Graph) -> Liveness {
        let mut live = Liveness { nodes: HashSet::new(), tensors: HashSet::new() };
        let mut pending: Vec<String> = graph.outputs.iter().map(|o| o.name.clone()).collect();
        live.tensors.extend(pending.iter().cloned());
        while let Some(tensor) = pending.pop() {
            let Some((id, _)) = graph.producer(&tensor) else { continue };
            if !live.nodes.insert(id) {
                continue;
            }
            let Some(node) = graph.node(id) else { continue };
            let inputs = node.inputs.iter().filter(|n| !n.is_empty()).cloned();
            for read in inputs.chain(node.captured_names()) {
                if live.tensors.insert(read.clone()) {
                    pending.push(read);
                }
            }
        }
        live
    }
}
