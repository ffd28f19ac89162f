//! `FoldShapes`: writes the tensors whose value shape inference knows completely
//! as initializers.
//!
//! What it rewrites: `infer_types` carries the values of small integer and bool
//! tensors (shapes, axes, indices), each element a number, a symbol or unknown. A
//! node all of whose outputs hold numbers only is foldable: `Shape` of a tensor
//! with static dims and the Gather/Unsqueeze/Concat/Cast/arithmetic chains built on
//! it. Where a node that is not foldable reads such a node's output (the edge of the
//! foldable region), the node is replaced by initializers holding its outputs. The
//! nodes inside the region then feed nothing: run `EliminateDeadCode` after this.
//!
//! Conditions: IR version 4 or later (before, initializers must be graph inputs
//! too); not a `Constant` (`FoldConstants` turns those into initializers);
//! no output is a graph output (a model whose output is a constant is left as it
//! is: an initializer as a graph output is an unusual interface, not worth a risk).
//! With a symbolic dim (batch, sequence) the value holds a symbol and nothing
//! folds: that shape really changes from run to run.
//!
//! Why it is exact: inference computes these values with ONNX's integer semantics
//! (wrapping casts, truncating division, Slice clamping) in checked arithmetic and
//! leaves an element unknown wherever it is unsure; a fixed dim of a graph input is
//! part of the model's interface.
//!
//! ```text
//! x: float32[2,12]
//! s = Shape(x)                                 init c: int64[3] {2,3,4}
//! d = Gather(s, 0)                       ->    y = Reshape(x, c)
//! c = Concat(Unsqueeze(d, 0), [3,4])           (s, d, Unsqueeze: dead)
//! y = Reshape(x, c)
//! ```

use super::{Pass, PassError};
use crate::ir::{infer_types, DataType, Dim, Graph, Model, Node, NodeId, Patch, Slot, Tensor, TypeMap};
use bytes::Bytes;
use std::collections::HashMap;

pub struct FoldShapes;

impl Pass for FoldShapes {
    fn name(&self) -> &'static str {
        "fold-shapes"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        if !super::initializers_may_be_added(model) {
            return Ok(Vec::new());
        }
        let graph = &model.graph;
        let types = infer_types(model);
        let order = graph.node_ids().map_err(|cycle| PassError::cycle(self.name(), cycle))?;
        // Foldable nodes, with the value of each output that something reads.
        let mut foldable: HashMap<NodeId, Vec<Tensor>> = HashMap::new();
        for &id in &order {
            let Some(node) = graph.node(id) else { continue };
            if let Some(values) = known_outputs(graph, node, &types) {
                foldable.insert(id, values);
            }
        }
        let mut patches = Vec::new();
        for id in order {
            let Some(values) = foldable.get(&id) else { continue };
            let read_outside = values.iter().flat_map(|t| graph.uses(&t.name)).any(|u| u.slot == Slot::Captured || !foldable.contains_key(&u.node));
            if !read_outside {
                continue;
            }
            let mut patch = Patch::new("known-value");
            patch.remove_node(id);
            for tensor in values {
                patch.add_initializer(tensor.clone());
            }
            patches.push(patch);
        }
        Ok(patches)
    }
}

/// The values of a foldable node's outputs that some node reads; `None` when the
/// node is not foldable.
fn known_outputs(graph: &Graph, node: &Node, types: &TypeMap) -> Option<Vec<Tensor>> {
    if node.is_onnx("Constant") {
        return None;
    }
    let outputs: Vec<&str> = node.outputs.iter().map(String::as_str).filter(|n| !n.is_empty()).collect();
    if outputs.is_empty() || outputs.iter().any(|o| graph.is_graph_output(o)) {
        return None;
    }
    let values: Vec<Tensor> = outputs.iter().map(|o| known_tensor(o, types)).collect::<Option<_>>()?;
    Some(values.into_iter().filter(|t| !graph.uses(&t.name).is_empty()).collect())
}

/// The tensor named `name` when inference knows every element as a number.
fn known_tensor(name: &str, types: &TypeMap) -> Option<Tensor> {
    let values = types.int_value(name)?;
    let dtype = types.elem_type(name)?;
    let dims: Vec<i64> = types.shape(name)?.iter().map(Dim::fixed).collect::<Option<_>>()?;
    let count = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))?;
    if count != values.len() {
        return None;
    }
    Some(Tensor::from_raw(name, dtype, dims, Bytes::from(little_endian(dtype, &values)?)))
}

/// Values as `raw_data` of `dtype` (each already wrapped into its range by inference).
fn little_endian(dtype: DataType, values: &[i64]) -> Option<Vec<u8>> {
    use DataType::*;
    let bytes = |f: fn(i64) -> Vec<u8>| values.iter().flat_map(|&v| f(v)).collect();
    Some(match dtype {
        Int64 => bytes(|v| v.to_le_bytes().to_vec()),
        Uint64 => bytes(|v| (v as u64).to_le_bytes().to_vec()),
        Int32 => bytes(|v| (v as i32).to_le_bytes().to_vec()),
        Uint32 => bytes(|v| (v as u32).to_le_bytes().to_vec()),
        Int16 => bytes(|v| (v as i16).to_le_bytes().to_vec()),
        Uint16 => bytes(|v| (v as u16).to_le_bytes().to_vec()),
        Int8 | Uint8 => bytes(|v| vec![v as u8]),
        Bool => bytes(|v| vec![u8::from(v != 0)]),
        // Sub-byte types pack several elements a byte: not worth it for shapes.
        _ => return None,
    })
}
