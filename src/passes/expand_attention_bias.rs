//! `expand-attention-bias`: the additive mask of a fused com.microsoft
//! Attention or MultiHeadAttention, when it has one row for every query
//! (`[B, 1, 1, T]`, a key-padding mask), is expanded to the query rows.
//!
//! ```text
//! y = Attention(x, w, b, _, _, mask)    ->  rows = Concat([1, 1], Gather(Shape(x), [1]), [1])
//!     mask: [B, 1, 1, T]                    y = Attention(x, w, b, _, _, Expand(mask, rows))
//! ```
//!
//! Why: ORT 1.32's kernels take attention_bias as `[B or 1, H or 1, S, T]`
//! and do not broadcast its third axis ("Input 'attention_bias' dimension 2
//! should be same as sequence_length, got 1"), while exports often add such
//! a mask to the scores `[B, H, S, T]` and let the Add broadcast it (a
//! hand-written `scores + (1 - mask[:, None, None, :]) * min`). The fusion
//! rules match it, and tract, whose lowering of the fused op broadcasts, ran
//! the result fine: only ORT refused it.
//!
//! Exact: `Expand` broadcasts the rows as the exporter's Add did (every query
//! row reads the same mask row). Left alone: masks whose third axis is not
//! known to be 1, and queries of one row.

use super::{Pass, PassError};
use crate::ir::{infer_types, Dim, Model, Node, Patch, Tensor, TypeMap};

/// The pass. See the module documentation.
pub struct ExpandAttentionBias;

/// The fused ops with an attention_bias input, and where it is.
const ATTENTION_BIAS_INPUT: [(&str, usize); 2] = [("Attention", 5), ("MultiHeadAttention", 5)];

impl Pass for ExpandAttentionBias {
    fn name(&self) -> &'static str {
        "expand-attention-bias"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let types = infer_types(model);
        let mut patches = Vec::new();
        for (id, node) in model.graph.nodes_with_ids() {
            let Some(slot) = bias_to_expand(node, &types) else { continue };
            let (query, bias) = (&node.inputs[0], &node.inputs[slot]);
            let name = |what: &str| format!("{bias}/expand-attention-bias/{}/{what}", node.outputs[0]);
            let mut patch = Patch::new("expand-attention-bias");
            patch.add_initializer(Tensor::from_i64(name("one-index"), vec![1], &[1]));
            patch.add_initializer(Tensor::from_i64(name("leading-ones"), vec![2], &[1, 1]));
            patch.add_initializer(Tensor::from_i64(name("trailing-one"), vec![1], &[1]));
            patch.add_node(Node::new("Shape", &[query.as_str()], &[&name("query-shape")]).with_name(name("query-shape")));
            patch.add_node(Node::new("Gather", &[&name("query-shape"), &name("one-index")], &[&name("rows")]).with_name(name("rows")));
            patch.add_node(
                Node::new("Concat", &[&name("leading-ones"), &name("rows"), &name("trailing-one")], &[&name("shape")])
                    .with_name(name("shape"))
                    .with_attr("axis", crate::ir::AttrValue::Int(0)),
            );
            patch.add_node(Node::new("Expand", &[bias.as_str(), &name("shape")], &[&name("expanded")]).with_name(name("expanded")));
            let mut fused = node.clone();
            fused.inputs[slot] = name("expanded");
            patch.remove_node(id);
            patch.add_node(fused);
            patches.push(patch);
        }
        Ok(patches)
    }
}

/// The attention_bias slot of `node` when it needs expanding: a fused op with
/// a 3-D query whose rows are not known to be one, and a bias `[_, _, 1, _]`.
fn bias_to_expand(node: &Node, types: &TypeMap) -> Option<usize> {
    let (_, slot) = ATTENTION_BIAS_INPUT.iter().find(|(op, _)| node.domain == "com.microsoft" && node.op_type == *op)?;
    let bias = node.inputs.get(*slot).filter(|b| !b.is_empty())?;
    let [_, _, rows, _] = types.shape(bias)? else { return None };
    let [_, query_rows, _] = types.shape(&node.inputs[0])? else { return None };
    (*rows == Dim::Fixed(1) && *query_rows != Dim::Fixed(1)).then_some(*slot)
}
