//! IR invariants: every tensor read has one definition, graph outputs are defined,
//! no cycles. Checked on load, and after every pass in tests and debug builds.

use super::{Graph, Node};
use std::collections::HashSet;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidGraph {
    #[error("node '{node}' ({op_type}) in graph '{graph}' reads '{tensor}', which no node, graph input or initializer produces")]
    UndefinedInput { graph: String, node: String, op_type: String, tensor: String },
    #[error("tensor '{tensor}' in graph '{graph}' is produced twice (by {first} and by {second})")]
    DuplicateDefinition { graph: String, tensor: String, first: String, second: String },
    #[error("graph '{graph}' declares output '{tensor}', which nothing produces")]
    UndefinedOutput { graph: String, tensor: String },
    #[error("graph '{graph}': {source}")]
    Cycle {
        graph: String,
        #[source]
        source: super::CycleError,
    },
}

impl Graph {
    /// Checks the invariants of this graph and its subgraphs; `outer` holds the
    /// names visible from enclosing graphs (empty for the main graph).
    pub fn validate(&self, outer: &HashSet<String>) -> Result<(), InvalidGraph> {
        let mut defined: HashSet<String> = outer.clone();
        let mut local: HashSet<&str> = HashSet::new();
        for input in &self.inputs {
            local.insert(&input.name);
        }
        // An initializer may share a graph input's name (the input's default value).
        for t in &self.initializers {
            local.insert(&t.name);
        }
        let node_label = |n: &Node| if n.name.is_empty() { n.op_type.clone() } else { n.name.clone() };
        for node in self.nodes() {
            for output in node.outputs.iter().filter(|n| !n.is_empty()) {
                if local.contains(output.as_str()) {
                    let first = match self.producer(output) {
                        Some((id, _)) if self.node(id) != Some(node) => {
                            format!("node '{}'", self.node(id).map(node_label).unwrap_or_default())
                        }
                        _ => "a graph input or initializer".to_string(),
                    };
                    return Err(InvalidGraph::DuplicateDefinition {
                        graph: self.name.clone(),
                        tensor: output.clone(),
                        first,
                        second: format!("node '{}'", node_label(node)),
                    });
                }
                local.insert(output);
            }
        }
        defined.extend(local.iter().map(|s| s.to_string()));
        for node in self.nodes() {
            for input in node.inputs.iter().filter(|n| !n.is_empty()) {
                if !defined.contains(input) {
                    return Err(InvalidGraph::UndefinedInput {
                        graph: self.name.clone(),
                        node: node_label(node),
                        op_type: node.op_type.clone(),
                        tensor: input.clone(),
                    });
                }
            }
            for attr in &node.attributes {
                for sub in attr.value.subgraphs() {
                    sub.validate(&defined)?;
                }
            }
        }
        for output in &self.outputs {
            if !defined.contains(&output.name) {
                return Err(InvalidGraph::UndefinedOutput { graph: self.name.clone(), tensor: output.name.clone() });
            }
        }
        self.node_ids().map_err(|source| InvalidGraph::Cycle { graph: self.name.clone(), source })?;
        Ok(())
    }
}
