//! Functions of the normalisation fusions: embeddings and their positions.

use super::{dims, var, Function};
use crate::ir::Dim;
use crate::rewrite::matcher::MatchContext;
use crate::rewrite::rule::Arg;

pub(super) const FUNCTIONS: &[(&str, Function)] = &[
    ("not-embedding", Function::Condition(not_embedding)),
    ("arange-from-zero", Function::Condition(arange_from_zero)),
    ("sequence-length-of", Function::Condition(sequence_length_of)),
];

/// `(not-embedding ?x)`: ?x is not an embedding lookup (a Gather from a constant
/// table) nor a sum of them: the embeddings' LayerNorm is left for
/// EmbedLayerNormalization, not turned into SkipLayerNormalization.
fn not_embedding(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let t = var(ctx, args, 0)?;
    let mut stack = vec![t.to_string()];
    while let Some(name) = stack.pop() {
        let Some((id, _)) = ctx.graph.producer(&name) else { continue };
        let Some(node) = ctx.graph.node(id) else { continue };
        match node.op_type.as_str() {
            "Gather" if node.inputs.first().is_some_and(|table| ctx.constant(table).is_some()) => {
                return Err(format!("'{t}' comes from the embedding lookup '{}'", node.name));
            }
            "Add" => stack.extend(node.inputs.iter().cloned()),
            _ => {}
        }
    }
    Ok(())
}

/// `(arange-from-zero ?x)`: a constant holding 0, 1, 2, ... (any leading 1 dims).
fn arange_from_zero(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let t = var(ctx, args, 0)?;
    let values = ctx.constant(t).and_then(|c| c.to_i64().ok()).ok_or_else(|| format!("'{t}' is not an integer constant"))?;
    if values.iter().enumerate().all(|(i, &v)| v == i as i64) {
        Ok(())
    } else {
        Err(format!("'{t}' is not 0, 1, 2, ..."))
    }
}

/// `(sequence-length-of ?end ?ids)`: ?end's value is [the second dim of ?ids]
/// (a Slice end that takes exactly the sequence length).
fn sequence_length_of(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let (end, ids) = (var(ctx, args, 0)?, var(ctx, args, 1)?);
    let seq = dims(ctx, ids)?.get(1).cloned().ok_or_else(|| format!("'{ids}' has no second dim"))?;
    match ctx.types.value(end) {
        Some([v]) if *v == seq && !matches!(v, Dim::Unknown) => Ok(()),
        v => Err(format!("'{end}' is {v:?}, not the sequence length {seq:?} of '{ids}'")),
    }
}
