//! `prune-weights`: puts pruned (and re-fitted) weights in place of the
//! originals. The values come from `crate::prune`, which chooses the masks and
//! solves the re-fit; this pass only edits the graph.
//!
//! What it rewrites: each initializer named in `weights` becomes a new
//! initializer `{name}/pruned` of the same type and shape, read wherever the
//! old one was; the old one is removed. A patch cannot add an initializer
//! under a name that still exists, hence the new name (which also tells a
//! reader of the graph which weights were pruned).
//!
//! Why it is safe: the graph's structure is unchanged; only weight values
//! differ, by as much as the pruning chose (the caller checks the result in
//! tract). A weight that is missing, not float32, or of another shape than its
//! replacement is refused.
//!
//! ```text
//! y = MatMul(x, w)    ->    y = MatMul(x, w/pruned)     # w/pruned: w with zeros, re-fitted
//! ```

use super::{Pass, PassError};
use crate::ir::{DataType, Model, Patch, Tensor};
use std::collections::BTreeMap;

/// The pass. See the module documentation.
pub struct PruneWeights {
    /// New values by initializer name, in the initializer's stored layout.
    pub weights: BTreeMap<String, Vec<f32>>,
}

/// The name a pruned weight gets.
pub fn pruned_name(weight: &str) -> String {
    format!("{weight}/pruned")
}

impl Pass for PruneWeights {
    fn name(&self) -> &'static str {
        "prune-weights"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let fail = |message: String| PassError::Failed { pass: self.name().into(), message };
        let mut patches = Vec::new();
        for (name, values) in &self.weights {
            let Some(old) = model.graph.initializer(name) else {
                // replaced in an earlier round
                if model.graph.initializer(&pruned_name(name)).is_some() {
                    continue;
                }
                return Err(fail(format!("no initializer '{name}' to prune")));
            };
            if old.dtype != DataType::Float || old.element_count() != values.len() as u64 {
                let why = format!("'{name}' is {:?} {:?}, the pruned values are {} float32", old.dtype, old.dims, values.len());
                return Err(fail(why));
            }
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let new = Tensor::from_raw(pruned_name(name), DataType::Float, old.dims.clone(), bytes.into());
            let mut patch = Patch::new("pruned-weight");
            patch.remove_initializer(name.clone()).add_initializer(new).replace_uses(name.clone(), pruned_name(name));
            patches.push(patch);
        }
        Ok(patches)
    }
}
