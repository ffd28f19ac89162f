//! `add-into-sum`: an `Add` read only by a `Sum` becomes two more operands of
//! that `Sum`.
//!
//! ```text
//! t = Add(a, b)          ->  s = Sum(x, a, b)
//! s = Sum(x, t)
//! ```
//!
//! The same sum, up to float rounding from the order of the additions; `Sum`
//! broadcasts all its operands together (opset 8 and later), and broadcasting
//! `a` with `b`, then the result with `x`, gives the shape of broadcasting the
//! three at once.
//!
//! Why: in `quantize --mode int8` output for ORT, a per-token product's bias
//! is an `Add` after its MatMulIntegerToFloat (ORT would add a bias input
//! before the row scale), and on a transformer that `Add` feeds the residual
//! `Sum` of `residual-add-as-sum`. One node less per such layer: about 20 us
//! of ORT's per-node cost at batch 1, and one pass over the activation fewer
//! (MiniLM at batch 8: 4 Adds of `[8, 128, 384]`).
//!
//! Left alone: an `Add` whose output is a graph output or is read by anything
//! besides one `Sum` input, and models below opset 8.

use super::{Pass, PassError};
use crate::ir::{Model, Patch, Slot};

/// The pass. See the module documentation.
pub struct AddIntoSum;

impl Pass for AddIntoSum {
    fn name(&self) -> &'static str {
        "add-into-sum"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        if model.opset("").unwrap_or(0) < 8 {
            return Ok(Vec::new());
        }
        let graph = &model.graph;
        let mut patches = Vec::new();
        for (id, add) in graph.nodes_with_ids() {
            if !add.is_onnx("Add") || add.inputs.len() != 2 || add.outputs.len() != 1 || graph.is_graph_output(&add.outputs[0]) {
                continue;
            }
            let [reader] = graph.uses(&add.outputs[0]) else { continue };
            let Slot::Input(slot) = reader.slot else { continue };
            let Some(sum) = graph.node(reader.node).filter(|n| n.is_onnx("Sum")) else { continue };
            let mut widened = sum.clone();
            widened.inputs.splice(slot..=slot, add.inputs.iter().cloned());
            let mut patch = Patch::new("add-into-sum");
            patch.remove_node(id);
            patch.remove_node(reader.node);
            patch.add_node(widened);
            patches.push(patch);
        }
        Ok(patches)
    }
}
