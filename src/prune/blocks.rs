//! Finding the transformer blocks of an encoder graph: what structured pruning
//! and layer dropping cut.
//!
//! A [`Block`] is one post-LN (BERT-style) layer, read the same way in the three
//! forms onnxopt meets:
//! - the TorchScript export: `MatMul` + bias `Add` per projection, heads split by
//!   `Reshape` + `Transpose`, `Softmax`, merged back by `Transpose` + `Reshape`;
//! - the dynamo export: the same ops, with K^T built through extra
//!   `Reshape`/`Transpose` steps and shared shape constants;
//! - `onnxopt optimize --target ort`: `com.microsoft.Attention` (packed QKV weight
//!   `[hidden, 3 * hidden]`, bias `[3 * hidden]`, `num_heads`), the biases of the
//!   output projection and of FFN2 folded into `SkipLayerNormalization`, FFN1's
//!   into `BiasGelu`.
//!
//! The walk starts at every `Softmax` (unfused) or `Attention` (fused): back from
//! the scores to the Q and K projections, back from the context MatMul to V,
//! forward to the output projection, the residual `Add` + `LayerNormalization`
//! (or `SkipLayerNormalization`), FFN1, its activation, FFN2 and the second
//! residual + norm, whose output is the block's output. Sizes come from the
//! weights; the head size from the split `Reshape`'s target (the exporters write
//! `[batch, seq, -1, head_size]`), or from `num_heads`.
//!
//! Every constant the surgery edits is found through the node that reads it
//! ([`ConstantSite`]): biases shared between layers (the TorchScript export
//! dedups equal initializers behind `Identity` nodes) are then replaced for one
//! reader only.

use crate::ir::{infer_types, AttrValue, Dim, Graph, Model, Node, NodeId, Tensor, TypeMap};
use ndarray::ArrayD;

/// A constant as one node reads it: `node`'s input `slot` holds `values`
/// (an initializer, or a `Constant` node's value, possibly behind `Identity`).
#[derive(Clone, Debug)]
pub struct ConstantSite {
    pub node: NodeId,
    pub slot: usize,
    pub values: ArrayD<f32>,
}

/// `output = input @ weight (+ bias)`: a MatMul with a constant 2-D weight, and
/// the constant vector added to its output, wherever that happens (an `Add`,
/// the bias input of `SkipLayerNormalization`, `BiasGelu` or `FastGelu`).
#[derive(Clone, Debug)]
pub struct Linear {
    pub node: NodeId,
    pub input: String,
    pub output: String,
    pub weight: ConstantSite,
    pub bias: Option<ConstantSite>,
}

impl Linear {
    pub fn rows(&self) -> usize {
        self.weight.values.shape()[0]
    }
    pub fn cols(&self) -> usize {
        self.weight.values.shape()[1]
    }
}

/// How Q, K and V are computed.
// One per attention block, built once: the size of `Separate` costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Projections {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// `com.microsoft.Attention`: weight `[hidden, 3 * heads * head_size]`
    /// (Q, K, V side by side, each head-major), bias `[3 * heads * head_size]`.
    Packed {
        attention: NodeId,
        weight: ConstantSite,
        bias: Option<ConstantSite>,
    },
}

/// A shape constant one of whose elements is `heads * per_head` (the head count
/// of a split `Reshape`'s target, `per_head` = 1, or the merged width,
/// `per_head` = head size): element `index` of the constant at `site`.
#[derive(Clone, Debug)]
pub struct HeadShapeConstant {
    pub site: ConstantSite,
    pub index: usize,
    pub per_head: usize,
}

/// One post-LN transformer layer.
#[derive(Clone, Debug)]
pub struct Block {
    /// 0-based, in graph order.
    pub index: usize,
    /// The hidden state entering the block (Q/K/V's input and the first residual).
    pub input: String,
    /// The hidden state between the halves (the first norm's output): FFN1's
    /// input and the second residual.
    pub middle: String,
    /// The hidden state leaving it (the second norm's output).
    pub output: String,
    pub hidden: usize,
    pub heads: usize,
    pub head_size: usize,
    /// FFN width.
    pub neurons: usize,
    pub projections: Projections,
    pub head_constants: Vec<HeadShapeConstant>,
    pub attention_output: Linear,
    pub ffn_in: Linear,
    pub ffn_out: Linear,
}

impl Block {
    /// Multiply-adds per token in the block's linear layers, times two.
    pub fn linear_flops_per_token(&self) -> u64 {
        let (d, a, n) = (self.hidden as u64, (self.heads * self.head_size) as u64, self.neurons as u64);
        2 * (d * 3 * a + a * d + d * n + n * d)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("no transformer block found (no Softmax or com.microsoft.Attention whose projections, output projection, residual norms and feed-forward could be followed)")]
    NoBlocks,
    #[error("transformer block at '{at}': {why}")]
    Unrecognised { at: String, why: String },
    #[error("the graph has a cycle: {0}")]
    Cycle(#[from] crate::ir::CycleError),
}

/// The blocks of `model`, in graph order.
pub fn find_blocks(model: &Model) -> Result<Vec<Block>, BlockError> {
    let graph = &model.graph;
    let types = infer_types(model);
    let mut blocks = Vec::new();
    for (id, node) in graph.nodes_with_ids() {
        let core = if node.is_onnx("Softmax") {
            unfused_attention(graph, &types, id)?
        } else if node.op_type == "Attention" && node.domain == "com.microsoft" {
            fused_attention(graph, id)?
        } else {
            continue;
        };
        let Some(core) = core else { continue };
        blocks.push(complete_block(graph, blocks.len(), core)?);
    }
    if blocks.is_empty() {
        return Err(BlockError::NoBlocks);
    }
    Ok(blocks)
}

/// The attention half of a block up to the tensor the output projection reads.
struct AttentionCore {
    at: String,
    input: String,
    projections: Projections,
    heads: usize,
    head_size: usize,
    head_constants: Vec<HeadShapeConstant>,
    /// The merged heads, `[batch, seq, heads * head_size]`.
    context: String,
}

fn unrecognised(at: &str, why: impl Into<String>) -> BlockError {
    BlockError::Unrecognised { at: at.to_string(), why: why.into() }
}

/// The constant `name` holds: an initializer, a `Constant` node's value, through `Identity`.
pub fn constant_tensor(graph: &Graph, name: &str) -> Option<Tensor> {
    if let Some(t) = graph.initializer(name) {
        return Some(t.clone());
    }
    let (id, _) = graph.producer(name)?;
    let node = graph.node(id)?;
    if node.is_onnx("Identity") {
        return constant_tensor(graph, node.inputs.first()?);
    }
    if node.is_onnx("Constant") {
        if let Some(AttrValue::Tensor(t)) = node.attr("value") {
            return Some(t.clone());
        }
    }
    None
}

fn site(graph: &Graph, node: NodeId, slot: usize) -> Option<ConstantSite> {
    let name = graph.node(node)?.inputs.get(slot)?;
    if name.is_empty() {
        return None;
    }
    let values = constant_tensor(graph, name)?.to_f32().ok()?;
    Some(ConstantSite { node, slot, values })
}

fn producer_node<'g>(graph: &'g Graph, tensor: &str) -> Option<(NodeId, &'g Node)> {
    let (id, _) = graph.producer(tensor)?;
    Some((id, graph.node(id)?))
}

/// The consumers of `tensor` other than `Shape` reads.
fn data_uses<'g>(graph: &'g Graph, tensor: &str) -> Vec<(NodeId, &'g Node)> {
    graph.uses(tensor).iter().filter_map(|u| Some((u.node, graph.node(u.node)?))).filter(|(_, n)| !n.is_onnx("Shape")).collect()
}

fn is_constant(graph: &Graph, name: &str) -> bool {
    constant_tensor(graph, name).is_some()
}

/// `node` as a projection: a MatMul whose second input is a constant 2-D float matrix.
fn as_linear(graph: &Graph, id: NodeId) -> Option<Linear> {
    let node = graph.node(id)?;
    if !node.is_onnx("MatMul") {
        return None;
    }
    let weight = site(graph, id, 1)?;
    if weight.values.ndim() != 2 {
        return None;
    }
    let output = node.outputs.first()?.clone();
    let bias = bias_site(graph, &output, weight.values.shape()[1]);
    Some(Linear { node: id, input: node.inputs.first()?.clone(), output, weight, bias })
}

/// Where a constant `[width]` vector is added to `tensor`, its only data reader.
fn bias_site(graph: &Graph, tensor: &str, width: usize) -> Option<ConstantSite> {
    let uses = data_uses(graph, tensor);
    let [(id, node)] = uses.as_slice() else { return None };
    let slot = match (node.domain.as_str(), node.op_type.as_str()) {
        ("" | "ai.onnx", "Add") => node.inputs.iter().position(|i| i != tensor)?,
        ("com.microsoft", "SkipLayerNormalization") if node.inputs.first().map(String::as_str) == Some(tensor) => 4,
        ("com.microsoft", "BiasGelu" | "FastGelu") if node.inputs.first().map(String::as_str) == Some(tensor) => 1,
        _ => return None,
    };
    let s = site(graph, *id, slot)?;
    (s.values.shape() == [width]).then_some(s)
}

/// The tensor the projection's bias was added to (the bias `Add`'s output), or
/// the MatMul's own output when the bias sits in a fused op or is absent.
fn biased_output(graph: &Graph, linear: &Linear) -> String {
    match &linear.bias {
        Some(b) if graph.node(b.node).is_some_and(|n| n.is_onnx("Add")) => {
            graph.node(b.node).and_then(|n| n.outputs.first().cloned()).unwrap_or_else(|| linear.output.clone())
        }
        _ => linear.output.clone(),
    }
}

/// Walks back from `tensor` through the ops that move a projection's output
/// into heads (Reshape, Transpose, scaling by a constant, a bias Add) to the
/// projection; collects the Reshapes met.
fn projection_behind(graph: &Graph, tensor: &str, reshapes: &mut Vec<NodeId>) -> Option<Linear> {
    let mut current = tensor.to_string();
    for _ in 0..12 {
        let (id, node) = producer_node(graph, &current)?;
        if let Some(linear) = as_linear(graph, id) {
            return Some(linear);
        }
        let next = match node.op_type.as_str() {
            "Reshape" => {
                reshapes.push(id);
                node.inputs.first()?
            }
            "Transpose" | "Squeeze" | "Unsqueeze" | "Identity" => node.inputs.first()?,
            "Mul" | "Div" | "Add" => {
                let moving: Vec<&String> = node.inputs.iter().filter(|i| !is_constant(graph, i)).collect();
                let [only] = moving.as_slice() else { return None };
                *only
            }
            _ => return None,
        };
        current = next.clone();
    }
    None
}

fn unfused_attention(graph: &Graph, types: &TypeMap, softmax: NodeId) -> Result<Option<AttentionCore>, BlockError> {
    let Some(node) = graph.node(softmax) else { return Ok(None) };
    let at = node.name.clone();
    let Some(probs) = node.outputs.first() else { return Ok(None) };
    // back from the scores to their MatMul: through the mask Add, scaling, a NaN guard
    let Some(scores) = walk_back_to_matmul(graph, node.inputs.first().map(String::as_str).unwrap_or("")) else {
        return Ok(None);
    };
    // forward from the probabilities (through the NaN guard's Where) to the context MatMul
    let Some(context_mm) = walk_forward_to_matmul(graph, probs) else { return Ok(None) };
    let (Some(scores_node), Some(context_node)) = (graph.node(scores), graph.node(context_mm)) else { return Ok(None) };
    let mut split_reshapes = Vec::new();
    let q = projection_behind(graph, &scores_node.inputs[0], &mut split_reshapes);
    let k = projection_behind(graph, &scores_node.inputs[1], &mut split_reshapes);
    let v = projection_behind(graph, &context_node.inputs[1], &mut split_reshapes);
    let (Some(q), Some(k), Some(v)) = (q, k, v) else {
        return Err(unrecognised(&at, "Q, K and V could not be followed back to MatMuls with constant weights"));
    };
    if q.input != k.input || q.input != v.input {
        return Err(unrecognised(&at, "Q, K and V read different tensors (cross-attention is not supported)"));
    }
    let width = q.cols();
    if k.cols() != width || v.cols() != width || q.rows() != k.rows() || q.rows() != v.rows() {
        return Err(unrecognised(&at, "Q, K and V weights differ in shape (grouped K/V heads are not supported)"));
    }
    // forward from the context to the merged heads the output projection reads
    let mut merge_reshapes = Vec::new();
    let mut context = context_node.outputs.first().cloned().unwrap_or_default();
    for _ in 0..4 {
        let uses = data_uses(graph, &context);
        let [(id, next)] = uses.as_slice() else { break };
        if next.is_onnx("Reshape") {
            merge_reshapes.push(*id);
        } else if !next.is_onnx("Transpose") {
            break;
        }
        context = next.outputs.first().cloned().unwrap_or_default();
    }
    // the head size: the last element of the first split Reshape's target
    let head_size = split_reshapes
        .iter()
        .filter_map(|&r| graph.node(r))
        .filter_map(|r| types.value(r.inputs.get(1)?))
        .find_map(|target| match target {
            [_, _, _, Dim::Fixed(d)] if *d > 0 => Some(*d as usize),
            [_, _, Dim::Fixed(h), _] if *h > 0 => Some(width / *h as usize),
            _ => None,
        })
        .ok_or_else(|| unrecognised(&at, "the head size could not be read from the split Reshape's target"))?;
    if head_size == 0 || width % head_size != 0 {
        return Err(unrecognised(&at, format!("projection width {width} is not a multiple of the head size {head_size}")));
    }
    let heads = width / head_size;
    let mut head_constants = Vec::new();
    for &r in &split_reshapes {
        head_constants.extend(head_constant(graph, r, 2, 4, heads, 1));
    }
    for &r in &merge_reshapes {
        head_constants.extend(head_constant(graph, r, 2, 3, heads, head_size));
    }
    Ok(Some(AttentionCore { at, input: q.input.clone(), projections: Projections::Separate { q, k, v }, heads, head_size, head_constants, context }))
}

/// The constant element `index` of Reshape `reshape`'s target of rank `rank`
/// when it equals `heads * per_head` (a `-1` or a dim read from a Shape needs no edit).
fn head_constant(graph: &Graph, reshape: NodeId, index: usize, rank: usize, heads: usize, per_head: usize) -> Option<HeadShapeConstant> {
    let expected = (heads * per_head) as f32;
    let node = graph.node(reshape)?;
    if let Some(s) = site(graph, reshape, 1) {
        return (s.values.len() == rank && s.values.iter().nth(index) == Some(&expected)).then_some(HeadShapeConstant { site: s, index, per_head });
    }
    // a Concat of one-element pieces
    let (concat_id, concat) = producer_node(graph, node.inputs.get(1)?)?;
    if !concat.is_onnx("Concat") || concat.inputs.len() != rank {
        return None;
    }
    let s = site(graph, concat_id, index)?;
    (s.values.len() == 1 && s.values.iter().next() == Some(&expected)).then_some(HeadShapeConstant { site: s, index: 0, per_head })
}

fn walk_back_to_matmul(graph: &Graph, tensor: &str) -> Option<NodeId> {
    let mut current = tensor.to_string();
    for _ in 0..8 {
        let (id, node) = producer_node(graph, &current)?;
        match node.op_type.as_str() {
            "MatMul" => return Some(id),
            "Add" | "Mul" | "Div" | "Where" | "Cast" => {
                // the operand computed from a MatMul (the other is the mask or the scale)
                let next = node.inputs.iter().find(|i| graph.computed_by(i, "MatMul", 0) || !is_constant(graph, i) && graph.computed_by(i, "MatMul", 2))?;
                current = next.clone();
            }
            _ => return None,
        }
    }
    None
}

fn walk_forward_to_matmul(graph: &Graph, tensor: &str) -> Option<NodeId> {
    let mut frontier = vec![tensor.to_string()];
    for _ in 0..4 {
        let mut next = Vec::new();
        for t in &frontier {
            for (id, node) in data_uses(graph, t) {
                if node.is_onnx("MatMul") && node.inputs.first() == Some(t) {
                    return Some(id);
                }
                if matches!(node.op_type.as_str(), "Where" | "Cast" | "Dropout" | "Identity") {
                    next.extend(node.outputs.first().cloned());
                }
            }
        }
        frontier = next;
    }
    None
}

fn fused_attention(graph: &Graph, id: NodeId) -> Result<Option<AttentionCore>, BlockError> {
    let Some(node) = graph.node(id) else { return Ok(None) };
    let at = node.name.clone();
    let heads = node.attr_int("num_heads").filter(|&h| h > 0).ok_or_else(|| unrecognised(&at, "Attention without num_heads"))? as usize;
    if node.attr_int("unidirectional").unwrap_or(0) != 0 || node.inputs.get(4).is_some_and(|p| !p.is_empty()) {
        return Err(unrecognised(&at, "causal or cached Attention is not supported (encoders only)"));
    }
    let weight = site(graph, id, 1).ok_or_else(|| unrecognised(&at, "Attention's weight is not a constant"))?;
    let shape = weight.values.shape().to_vec();
    if shape.len() != 2 || shape[1] % 3 != 0 || (shape[1] / 3) % heads != 0 {
        return Err(unrecognised(&at, format!("packed weight of shape {shape:?} is not [hidden, 3 * heads * head_size] for {heads} heads")));
    }
    if let Some(sizes) = node.attr_ints("qkv_hidden_sizes") {
        if sizes.iter().any(|&s| s as usize != shape[1] / 3) {
            return Err(unrecognised(&at, "Q, K and V of different widths (qkv_hidden_sizes) are not supported"));
        }
    }
    let bias = site(graph, id, 2);
    let head_size = shape[1] / 3 / heads;
    Ok(Some(AttentionCore {
        at,
        input: node.inputs.first().cloned().unwrap_or_default(),
        projections: Projections::Packed { attention: id, weight, bias },
        heads,
        head_size,
        head_constants: Vec::new(),
        context: node.outputs.first().cloned().unwrap_or_default(),
    }))
}

/// From the merged heads on: output projection, residual norm, FFN, residual norm.
fn complete_block(graph: &Graph, index: usize, core: AttentionCore) -> Result<Block, BlockError> {
    let at = core.at.clone();
    let attention_output = single_linear_reading(graph, &core.context)
        .ok_or_else(|| unrecognised(&at, "the merged heads do not feed one MatMul with a constant weight (the output projection)"))?;
    let hidden = attention_output.cols();
    let width = core.heads * core.head_size;
    if attention_output.rows() != width {
        return Err(unrecognised(&at, format!("output projection has {} rows, the heads give {width}", attention_output.rows())));
    }
    let middle = residual_norm(graph, &biased_output(graph, &attention_output), &core.input).ok_or_else(|| {
        unrecognised(&at, "no residual Add + LayerNormalization (or SkipLayerNormalization) after the output projection (pre-LN blocks are not supported)")
    })?;
    let ffn_in = single_linear_reading(graph, &middle).ok_or_else(|| unrecognised(&at, "the attention half's output feeds no single FFN MatMul"))?;
    let neurons = ffn_in.cols();
    let ffn_out = ffn_output_behind_activation(graph, &biased_output(graph, &ffn_in), neurons)
        .ok_or_else(|| unrecognised(&at, "no FFN2 MatMul with a constant [ffn, hidden] weight after the activation"))?;
    let output = residual_norm(graph, &biased_output(graph, &ffn_out), &middle)
        .ok_or_else(|| unrecognised(&at, "no residual Add + LayerNormalization (or SkipLayerNormalization) after FFN2"))?;
    if ffn_in.rows() != hidden || ffn_out.cols() != hidden || ffn_out.rows() != neurons {
        return Err(unrecognised(&at, "FFN weights do not match the hidden size"));
    }
    Ok(Block {
        index,
        input: core.input,
        middle,
        output,
        hidden,
        heads: core.heads,
        head_size: core.head_size,
        neurons,
        projections: core.projections,
        head_constants: core.head_constants,
        attention_output,
        ffn_in,
        ffn_out,
    })
}

fn single_linear_reading(graph: &Graph, tensor: &str) -> Option<Linear> {
    let linears: Vec<Linear> = data_uses(graph, tensor)
        .into_iter()
        .filter(|(_, n)| n.inputs.first().map(String::as_str) == Some(tensor))
        .filter_map(|(id, _)| as_linear(graph, id))
        .collect();
    match <[Linear; 1]>::try_from(linears) {
        Ok([one]) => Some(one),
        Err(_) => None,
    }
}

/// `LayerNormalization(Add(branch, residual))` or
/// `SkipLayerNormalization(branch, residual, ...)`: the normalised sum.
fn residual_norm(graph: &Graph, branch: &str, residual: &str) -> Option<String> {
    for (_, node) in data_uses(graph, branch) {
        if node.op_type == "SkipLayerNormalization" && node.domain == "com.microsoft" && node.inputs.iter().take(2).any(|i| i == residual) {
            return node.outputs.first().cloned();
        }
        if node.is_onnx("Add") && node.inputs.iter().any(|i| i == residual) {
            let sum = node.outputs.first()?;
            let uses = data_uses(graph, sum);
            let [(_, norm)] = uses.as_slice() else { return None };
            return norm.is_onnx("LayerNormalization").then(|| norm.outputs.first().cloned()).flatten();
        }
    }
    None
}

/// The FFN2 MatMul after the activation: forward through elementwise ops.
fn ffn_output_behind_activation(graph: &Graph, tensor: &str, neurons: usize) -> Option<Linear> {
    let mut frontier = vec![tensor.to_string()];
    let mut found: Option<Linear> = None;
    for _ in 0..8 {
        let mut next = Vec::new();
        for t in &frontier {
            for (id, node) in data_uses(graph, t) {
                if let Some(linear) = as_linear(graph, id) {
                    if linear.rows() == neurons && node.inputs.first() == Some(t) {
                        if found.as_ref().is_some_and(|f| f.node != id) {
                            return None;
                        }
                        found = Some(linear);
                    }
                    continue;
                }
                let elementwise = matches!(
                    node.op_type.as_str(),
                    "Add" | "Mul" | "Div" | "Erf" | "Tanh" | "Pow" | "Sigmoid" | "Relu" | "Gelu" | "FastGelu" | "BiasGelu" | "Sqrt"
                );
                if elementwise {
                    next.extend(node.outputs.first().cloned());
                }
            }
        }
        if found.is_some() {
            return found;
        }
        next.sort();
        next.dedup();
        frontier = next;
    }
    None
}
