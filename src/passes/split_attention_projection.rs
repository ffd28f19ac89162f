//! `split-attention-projection`: takes the packed Q/K/V projection out of
//! ORT's fused `com.microsoft.Attention`, so that quantization can reach it.
//!
//! `Attention` multiplies its input by its own `[H, 3H]` weight inside the
//! kernel, in float32; a quantization pass sees no MatMul there and leaves a
//! quarter of a BERT layer's linear FLOPs in float (MiniLM `--mode int8`:
//! 0.77x float latency at batch 8, of which 36 ms were these projections).
//! `MultiHeadAttention` takes projected Q, K and V instead, and adds the bias
//! itself, so the same computation is
//!
//! ```text
//! y = com.microsoft.Attention(x, W, b, mask_index?, _, attention_bias?)
//!   ->  q = MatMul(x, W[:, :Hq])                      # the columns of W, one
//!       k = MatMul(x, W[:, Hq:Hq+Hk])                 # quantizable MatMul each,
//!       v = MatMul(x, W[:, Hq+Hk:])                   # reading the same x
//!       y = com.microsoft.MultiHeadAttention(q, k, v, b, mask_index?, attention_bias?)
//! ```
//!
//! with `num_heads`, `scale`, `mask_filter_value` and `unidirectional` carried
//! over. Exact up to float reassociation: both kernels compute
//! `softmax(scale * (x Wq + bq)(x Wk + bk)^T + bias) (x Wv + bv)` per head.
//! Three MatMuls rather than one packed MatMul and a Split: quantized, they
//! share one quantization of `x` (`quantize-dynamic`), and the Split's copy
//! of `[B, S, 3H]` goes (MiniLM int8 at batch 8: 0.4 ms a layer in ORT 1.32,
//! measured with the packed product and Split against three products).
//! `MultiHeadAttention` reads the key padding mask in the same formats as
//! `Attention`'s 1-D and 2-D `mask_index` (valid lengths `[B]`, or `[B, T]`
//! of 0/1).
//!
//! At opset 23 (`raise-opset-for-attention` raises a model to it for
//! `--mode int8`) and without a `mask_index`, the attention is ONNX
//! `Attention` instead, which ORT runs faster on CPU; it takes no bias, so
//! each projection gets its block of `b` as an Add:
//!
//! ```text
//!   ->  q = Add(MatMul(x, W[:, :Hq]), b[:Hq])         # likewise k and v
//!       y = Attention(q, k, v, attention_bias?) {q_num_heads = kv_num_heads = num_heads, scale?, is_causal = unidirectional}
//! ```
//!
//! Left alone: a weight or bias that is not a constant float32 initializer
//! (nothing to quantize), a `mask_index` of another rank, `past`/`present`
//! (ORT's CPU `MultiHeadAttention` takes a cache in another layout), rotary
//! embedding, and `past_sequence_length`.

use super::lower_contrib::CONTRIB_DOMAIN;
use super::{Pass, PassError};
use crate::ir::{infer_types, AttrValue, DataType, Model, Node, Patch, Tensor, TypeMap};
use ndarray::ArrayD;

/// The pass. See the module documentation.
pub struct SplitAttentionProjection;

/// Attributes `Attention` and `MultiHeadAttention` share, with one meaning.
const SHARED_ATTRIBUTES: [&str; 4] = ["num_heads", "scale", "mask_filter_value", "unidirectional"];

impl Pass for SplitAttentionProjection {
    fn name(&self) -> &'static str {
        "split-attention-projection"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let types = infer_types(model);
        let mut patches = Vec::new();
        for (id, node) in model.graph.nodes_with_ids() {
            let Some(sizes) = splittable(model, &types, node) else { continue };
            let out = &node.outputs[0];
            let name = |what: &str| format!("{out}/{what}");
            let (x, weight, bias) = (&node.inputs[0], &node.inputs[1], &node.inputs[2]);
            let mask_index = node.inputs.get(3).map(String::as_str).unwrap_or("");
            let attention_bias = node.inputs.get(5).map(String::as_str).unwrap_or("");

            let Some(columns) = model.graph.initializer(weight).and_then(|w| column_blocks(w, &sizes)) else { continue };
            let onnx_attention = writes_onnx_attention(model, node);
            let bias_blocks = if onnx_attention {
                let Some(blocks) = model.graph.initializer(bias).and_then(|b| bias_blocks(b, &sizes)) else { continue };
                Some(blocks)
            } else {
                None
            };
            let mut patch = Patch::new(if onnx_attention { "split-attention-projection-onnx" } else { "split-attention-projection" });
            patch.remove_node(id);
            // named, so that `--exclude` and `--max-error` can keep each in float
            let base = if node.name.is_empty() { out } else { &node.name };
            let parts = [name("q"), name("k"), name("v")];
            for (index, (part, block)) in parts.iter().zip(columns).enumerate() {
                let block_weight = format!("{part}/weight");
                patch.add_initializer(Tensor::from_f32(block_weight.clone(), &block));
                let which = part.rsplit('/').next().unwrap_or_default();
                let projection = |output: &str| Node::new("MatMul", &[x, &block_weight], &[output]).with_name(format!("{base}/{which}_projection"));
                match &bias_blocks {
                    // ONNX Attention takes no bias: an Add after each projection
                    // (which quantize-dynamic folds into the int8 product)
                    Some(blocks) => {
                        let (unbiased, block_bias) = (format!("{part}/unbiased"), format!("{part}/bias"));
                        patch.add_initializer(Tensor::from_f32(block_bias.clone(), &blocks[index]));
                        patch.add_node(projection(&unbiased));
                        patch.add_node(Node::new("Add", &[&unbiased, &block_bias], &[part]));
                    }
                    None => {
                        patch.add_node(projection(part));
                    }
                }
            }
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            if onnx_attention {
                patch.add_node(onnx_attention_node(node, &parts, attention_bias));
                patches.push(patch);
                continue;
            }
            let mut inputs = vec![parts[0], parts[1], parts[2], bias.as_str(), mask_index, attention_bias];
            while inputs.last() == Some(&"") {
                inputs.pop();
            }
            let mut attention = Node::new("MultiHeadAttention", &inputs, &[out]).with_domain(CONTRIB_DOMAIN).with_name(node.name.clone());
            for attribute in &node.attributes {
                if SHARED_ATTRIBUTES.contains(&attribute.name.as_str()) {
                    attention = attention.with_attr(attribute.name.clone(), attribute.value.clone());
                }
            }
            patch.add_node(attention);
            patches.push(patch);
        }
        Ok(patches)
    }
}

/// Whether the split-out `Attention` becomes ONNX `Attention` (opset 23)
/// rather than `MultiHeadAttention`: the model imports opset 23 or later
/// (`raise-opset-for-attention` raises it), and the mask, if any, is an
/// `attention_bias` (ONNX Attention's `attn_mask` adds it the same way; a
/// `mask_index` it does not read).
pub fn writes_onnx_attention(model: &Model, node: &Node) -> bool {
    model.opset("").unwrap_or(0) >= 23 && !reads_mask_index(node)
}

fn reads_mask_index(attention: &Node) -> bool {
    attention.inputs.get(3).is_some_and(|m| !m.is_empty())
}

/// Whether some fused `Attention` of `model` would become ONNX `Attention`
/// were the model at opset 23 (see [`writes_onnx_attention`]).
pub fn has_attention_for_onnx(model: &Model) -> bool {
    let types = infer_types(model);
    model.graph.nodes().any(|node| splittable(model, &types, node).is_some() && !reads_mask_index(node))
}

/// ONNX `Attention`-23 over projected, biased `q, k, v` `[B, S, H]`: the
/// heads as `q_num_heads = kv_num_heads`, the fused op's `scale` (0, or none,
/// is `1/sqrt(head_size)` in both) and `unidirectional` as `is_causal`.
fn onnx_attention_node(fused: &Node, parts: &[&str], attention_bias: &str) -> Node {
    let mut inputs = parts.to_vec();
    if !attention_bias.is_empty() {
        inputs.push(attention_bias);
    }
    let heads = fused.attr_int("num_heads").unwrap_or(1);
    let mut attention = Node::new("Attention", &inputs, &[&fused.outputs[0]])
        .with_name(fused.name.clone())
        .with_attr("q_num_heads", AttrValue::Int(heads))
        .with_attr("kv_num_heads", AttrValue::Int(heads));
    if let Some(scale) = fused.attr_float("scale").filter(|&s| s != 0.0) {
        attention = attention.with_attr("scale", AttrValue::Float(scale));
    }
    if fused.attr_int("unidirectional").unwrap_or(0) != 0 {
        attention = attention.with_attr("is_causal", AttrValue::Int(1));
    }
    attention
}

/// `bias` `[sum(widths)]` in blocks of `widths`.
fn bias_blocks(bias: &Tensor, widths: &[i64; 3]) -> Option<[ArrayD<f32>; 3]> {
    let values = bias.to_f32().ok()?;
    let values = values.as_slice()?;
    let (q, rest) = values.split_at_checked(usize::try_from(widths[0]).ok()?)?;
    let (k, v) = rest.split_at_checked(usize::try_from(widths[1]).ok()?)?;
    let block = |b: &[f32]| ArrayD::from_shape_vec(vec![b.len()], b.to_vec()).ok();
    Some([block(q)?, block(k)?, block(v)?])
}

/// The columns of `weight` `[H, sum(widths)]` in blocks of `widths`, each `[H, width]`.
fn column_blocks(weight: &Tensor, widths: &[i64; 3]) -> Option<[ArrayD<f32>; 3]> {
    let values = weight.to_f32().ok()?;
    let matrix = values.into_dimensionality::<ndarray::Ix2>().ok()?;
    let mut start = 0;
    let mut block = |width: i64| {
        let end = start + usize::try_from(width).ok()?;
        let columns = matrix.slice(ndarray::s![.., start..end]).to_owned().into_dyn();
        start = end;
        Some(columns)
    };
    Some([block(widths[0])?, block(widths[1])?, block(widths[2])?])
}

/// The Q, K and V widths of an `Attention` this pass can split, or `None`.
fn splittable(model: &Model, types: &TypeMap, node: &Node) -> Option<[i64; 3]> {
    if node.op_type != "Attention" || node.domain != CONTRIB_DOMAIN || node.outputs.len() != 1 {
        return None;
    }
    let input = |i: usize| node.inputs.get(i).map(String::as_str).filter(|s| !s.is_empty());
    // past (4), past_sequence_length (6) and anything later: not this form
    if input(4).is_some() || node.inputs.iter().skip(6).any(|i| !i.is_empty()) {
        return None;
    }
    if let Some(mask_index) = input(3) {
        if !matches!(types.rank(mask_index), Some(1 | 2)) {
            return None;
        }
    }
    let unsupported = ["do_rotary", "past_present_share_buffer"];
    if unsupported.iter().any(|a| node.attr_int(a).unwrap_or(0) != 0) {
        return None;
    }
    let graph_inputs = |name: &str| model.graph.inputs.iter().any(|v| v.name == name);
    let constant = |name: &str| model.graph.initializer(name).filter(|t| t.dtype == DataType::Float && !graph_inputs(name));
    let weight = constant(input(1)?)?;
    let bias = constant(input(2)?)?;
    let [_, width] = weight.dims[..] else { return None };
    if bias.dims != [width] {
        return None;
    }
    let sizes = match node.attr_ints("qkv_hidden_sizes") {
        Some(&[q, k, v]) => [q, k, v],
        Some(_) => return None,
        None if width % 3 == 0 => [width / 3; 3],
        None => return None,
    };
    (sizes.iter().sum::<i64>() == width && sizes[0] == sizes[1]).then_some(sizes)
}
