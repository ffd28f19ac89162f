//! `residual-add-as-sum`: writes a residual `Add` that feeds a
//! `LayerNormalization` as `Sum`, the same sum under another op type, so
//! that ONNX Runtime does not fuse the pair into `SkipLayerNormalization`
//! when it loads the model.
//!
//! ```text
//! r = Add(x, y)              ->  r = Sum(x, y)
//! n = LayerNormalization(r)      n = LayerNormalization(r)
//! ```
//!
//! Why: ORT 1.32's CPU `SkipLayerNormalization` is slower than its parts.
//! In MiniLM's `--mode int8` output at batch 8 its one call (ORT fused the
//! residual Add of layer 0, whose operands' shapes it could infer) took
//! 1.41 ms, against 0.18 ms for the `Sum` and about 0.2 ms for the
//! `LayerNormalization` after this rewrite. `onnxopt`'s own fusion leaves
//! the pair apart for int8 already (`pipeline::INT8_UNFUSED_RULES`); this
//! keeps ORT from undoing that. Exact: `Sum` of two tensors is their `Add`,
//! with the same broadcasting from opset 8.
//!
//! Left alone: an Add with a constant operand (a bias, not a residual), one
//! that does not feed a LayerNormalization's input, and models below opset 8.

use super::{Pass, PassError};
use crate::ir::{Model, Patch, Slot};

/// The pass. See the module documentation.
pub struct ResidualAddAsSum;

impl Pass for ResidualAddAsSum {
    fn name(&self) -> &'static str {
        "residual-add-as-sum"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        if model.opset("").unwrap_or(0) < 8 {
            return Ok(Vec::new());
        }
        let graph = &model.graph;
        let mut patches = Vec::new();
        for (id, node) in graph.nodes_with_ids() {
            if !node.is_onnx("Add") || node.inputs.len() != 2 || node.outputs.len() != 1 {
                continue;
            }
            if node.inputs.iter().any(|i| graph.initializer(i).is_some()) {
                continue;
            }
            let feeds_layer_norm = graph
                .uses(&node.outputs[0])
                .iter()
                .any(|u| u.slot == Slot::Input(0) && graph.node(u.node).is_some_and(|reader| reader.is_onnx("LayerNormalization")));
            if !feeds_layer_norm {
                continue;
            }
            // the same node (name, inputs, doc string) as Sum
            let mut sum = node.clone();
            sum.op_type = "Sum".into();
            let mut patch = Patch::new("residual-add-as-sum");
            patch.remove_node(id);
            patch.add_node(sum);
            patches.push(patch);
        }
        Ok(patches)
    }
}
