//! `pack-sibling-matmuls`: MatMuls that multiply the same activation by
//! different constant weights become one MatMul of the weights side by side,
//! split back into the original outputs.
//!
//! ```text
//! q = MatMul(x, Wq)                      w = [Wq | Wk | Wv]     (a new initializer, [K, Nq+Nk+Nv])
//! k = MatMul(x, Wk)              ->      qkv = MatMul(x, w)
//! v = MatMul(x, Wv)                      q, k, v = Split(qkv, [Nq, Nk, Nv]) {axis = -1}
//! ```
//!
//! Exact: column n of `x @ [W1 | W2]` is the dot product of each row of x with
//! column n of W1 (or W2), the same sum as before; only a kernel's blocking of
//! the longer row may order its float additions differently. Why: a decoder
//! step multiplies one token by each weight; ONNX Runtime then runs one kernel
//! instead of three (Q, K, V; and the MLP's gate and up projections), as ORT
//! GenAI's builder writes its models (packed QKV). Activations of any rank;
//! weights float32 initializers `[K, N]` that are not graph inputs (a caller
//! may override those), all of one K. The old weights are left for
//! `eliminate-dead-code`.
//!
//! Left alone: a lone MatMul, weights of other types or ranks, and models below
//! opset 11 (Split's sizes).

use super::{Pass, PassError};
use crate::ir::{AttrValue, DataType, Model, Node, NodeId, Patch, Tensor};
use bytes::Bytes;
use std::collections::{BTreeMap, HashSet};

/// The pass. See the module documentation.
pub struct PackSiblingMatMuls;

/// One MatMul of the shared activation: its node, output and weight `[K, N]`.
struct Sibling<'m> {
    id: NodeId,
    output: String,
    weight: &'m Tensor,
}

impl Pass for PackSiblingMatMuls {
    fn name(&self) -> &'static str {
        "pack-sibling-matmuls"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let opset = model.opset("").unwrap_or(0);
        if opset < 11 {
            return Ok(Vec::new());
        }
        let graph = &model.graph;
        let graph_inputs: HashSet<&str> = graph.inputs.iter().map(|i| i.name.as_str()).collect();
        // siblings by activation, in graph order (BTreeMap: a stable order of patches)
        let mut by_activation: BTreeMap<&str, Vec<Sibling>> = BTreeMap::new();
        for (id, node) in graph.nodes_with_ids() {
            if !node.is_onnx("MatMul") || node.inputs.len() != 2 || node.outputs.len() != 1 {
                continue;
            }
            let Some(weight) = graph.initializer(&node.inputs[1]).filter(|w| !graph_inputs.contains(w.name.as_str())) else { continue };
            if weight.dtype != DataType::Float || weight.dims.len() != 2 {
                continue;
            }
            by_activation.entry(&node.inputs[0]).or_default().push(Sibling { id, output: node.outputs[0].clone(), weight });
        }
        let mut patches = Vec::new();
        for (activation, siblings) in by_activation {
            // one group per K (a shared activation has one last dim; be safe)
            let mut by_k: BTreeMap<i64, Vec<&Sibling>> = BTreeMap::new();
            for s in &siblings {
                by_k.entry(s.weight.dims[0]).or_default().push(s);
            }
            for (k, group) in by_k {
                if group.len() < 2 {
                    continue;
                }
                patches.push(pack(activation, k, &group, opset).map_err(|message| PassError::Failed { pass: self.name().into(), message })?);
            }
        }
        Ok(patches)
    }
}

fn pack(activation: &str, k: i64, group: &[&Sibling], opset: i64) -> Result<Patch, String> {
    let columns: Vec<usize> = group.iter().map(|s| s.weight.dims[1] as usize).collect();
    let total: usize = columns.iter().sum();
    let rows = k as usize;
    let values: Vec<Vec<f32>> = group
        .iter()
        .map(|s| s.weight.to_f32().map(|a| a.iter().copied().collect()).map_err(|e| format!("'{}': {e}", s.weight.name)))
        .collect::<Result<_, _>>()?;
    let mut packed = Vec::with_capacity(rows * total * 4);
    for row in 0..rows {
        for (w, &n) in values.iter().zip(&columns) {
            for v in &w[row * n..(row + 1) * n] {
                packed.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    let root = &group[0].output;
    let (weight, product) = (format!("{root}/packed_weight"), format!("{root}/packed_product"));
    let mut patch = Patch::new("pack-sibling-matmuls");
    for s in group {
        patch.remove_node(s.id);
    }
    patch.add_initializer(Tensor::from_raw(&weight, DataType::Float, vec![k, total as i64], Bytes::from(packed)));
    patch.add_node(Node::new("MatMul", &[activation, &weight], &[&product]).with_name(format!("{root}/packed")));
    let outputs: Vec<&str> = group.iter().map(|s| s.output.as_str()).collect();
    let sizes: Vec<i64> = columns.iter().map(|&n| n as i64).collect();
    let split = if opset >= 13 {
        let sizes_name = format!("{root}/packed_sizes");
        patch.add_initializer(Tensor::from_i64(&sizes_name, vec![sizes.len() as i64], &sizes));
        Node::new("Split", &[&product, &sizes_name], &outputs)
    } else {
        Node::new("Split", &[&product], &outputs).with_attr("split", AttrValue::Ints(sizes))
    };
    patch.add_node(split.with_attr("axis", AttrValue::Int(-1)).with_name(format!("{root}/unpacked")));
    Ok(patch)
}
