//! Patches: the only way a pass edits a graph.
//!
//! A pass looks at the model and proposes patches built with a few verbs
//! (`remove_node`, `add_node`, `add_initializer`, `replace_uses`); one driver
//! (`crate::passes::run_pipeline`) applies them in order and validates the graph
//! after each. Patches proposed together are computed against the same graph: a
//! patch whose nodes an earlier one already removed is stale and is skipped (the
//! pass runs again on the new graph until nothing is left to do).
//!
//! New tensor names must be unique across the patches of one round: derive them
//! from a tensor the patch consumes or replaces (`{root}/packed_qkv`), which is
//! unique already.

use super::{Graph, InvalidGraph, Node, NodeId, Tensor};
use std::collections::HashSet;

#[derive(Clone, Debug, Default)]
pub struct Patch {
    /// Which rule or step proposed it, for reports and errors.
    pub origin: String,
    removed: Vec<NodeId>,
    added: Vec<Node>,
    initializers: Vec<Tensor>,
    removed_initializers: Vec<String>,
    removed_value_info: Vec<String>,
    renames: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("patch from {origin}: node {node:?} was already removed by an earlier patch")]
    Stale { origin: String, node: NodeId },
    #[error("patch from {origin} adds initializer '{name}', which already exists")]
    NameClash { origin: String, name: String },
    #[error("patch from {origin} left the graph invalid: {source}")]
    Invalid {
        origin: String,
        #[source]
        source: Box<InvalidGraph>,
    },
}

impl Patch {
    pub fn new(origin: impl Into<String>) -> Patch {
        Patch { origin: origin.into(), ..Patch::default() }
    }

    pub fn remove_node(&mut self, id: NodeId) -> &mut Self {
        if !self.removed.contains(&id) {
            self.removed.push(id);
        }
        self
    }

    pub fn add_node(&mut self, node: Node) -> &mut Self {
        self.added.push(node);
        self
    }

    pub fn add_initializer(&mut self, tensor: Tensor) -> &mut Self {
        self.initializers.push(tensor);
        self
    }

    /// Drops an initializer (one no node reads any more). Removing a name and
    /// adding an initializer of the same name in one patch replaces it.
    pub fn remove_initializer(&mut self, name: impl Into<String>) -> &mut Self {
        self.removed_initializers.push(name.into());
        self
    }

    /// Drops the `value_info` entry of a tensor (one that no longer exists, such as
    /// a removed node's output: the entry would describe nothing).
    pub fn remove_value_info(&mut self, name: impl Into<String>) -> &mut Self {
        self.removed_value_info.push(name.into());
        self
    }

    /// Makes every node that reads `old` read `new` instead (graph outputs keep
    /// their names: a patch that replaces a graph output must produce it by name).
    pub fn replace_uses(&mut self, old: impl Into<String>, new: impl Into<String>) -> &mut Self {
        self.renames.push((old.into(), new.into()));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.removed.is_empty()
            && self.added.is_empty()
            && self.initializers.is_empty()
            && self.removed_initializers.is_empty()
            && self.removed_value_info.is_empty()
            && self.renames.is_empty()
    }

    pub fn removed_nodes(&self) -> &[NodeId] {
        &self.removed
    }
}

impl Graph {
    /// Applies a patch. A stale patch changes nothing and returns `Stale`; with
    /// `validate`, a patch that leaves the graph invalid is reported (the graph is
    /// then left as the patch made it: callers stop).
    pub fn apply(&mut self, patch: Patch, validate: bool) -> Result<(), PatchError> {
        let origin = patch.origin.clone();
        if let Some(&node) = patch.removed.iter().find(|&&id| self.node(id).is_none()) {
            return Err(PatchError::Stale { origin, node });
        }
        let existing: HashSet<&str> = self.initializers.iter().map(|t| t.name.as_str()).collect();
        let replaced = |t: &Tensor| patch.removed_initializers.contains(&t.name);
        if let Some(t) = patch.initializers.iter().find(|t| existing.contains(t.name.as_str()) && !replaced(t)) {
            return Err(PatchError::NameClash { origin, name: t.name.clone() });
        }
        for id in patch.removed {
            self.remove_node(id);
        }
        self.initializers.retain(|t| !patch.removed_initializers.contains(&t.name));
        self.initializers.extend(patch.initializers);
        self.value_info.retain(|v| !patch.removed_value_info.contains(&v.name));
        for node in patch.added {
            self.add_node(node);
        }
        for (old, new) in &patch.renames {
            self.replace_uses(old, new);
        }
        if validate {
            self.validate(&HashSet::new()).map_err(|source| PatchError::Invalid { origin, source: Box::new(source) })?;
        }
        Ok(())
    }
}
