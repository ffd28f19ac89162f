//! Functions of the attention fusions: head splits, masks, packed weights.

use super::{dims, var, Function};
use crate::ir::{AttrValue, Tensor, TensorData};
use crate::rewrite::matcher::MatchContext;
use crate::rewrite::rule::Arg;
use ndarray::{concatenate, ArrayD, Axis};

pub(super) const FUNCTIONS: &[(&str, Function)] = &[
    ("head-split", Function::Condition(head_split)),
    ("attention-mask-shape", Function::Condition(attention_mask_shape)),
    ("heads", Function::Attribute(heads)),
    ("concat-last", Function::Input(concat_last)),
];

/// The static [heads, head_size] of a [batch, seq, heads, head_size] tensor.
fn head_dims(ctx: &MatchContext, t: &str) -> Result<(i64, i64), String> {
    match dims(ctx, t)? {
        [_, _, heads, size] => match (heads.fixed(), size.fixed()) {
            (Some(h), Some(s)) if h > 0 && s > 0 => Ok((h, s)),
            _ => Err(format!("heads and head size of '{t}' are not static")),
        },
        d => Err(format!("'{t}' has rank {}, not 4 ([batch, seq, heads, head_size])", d.len())),
    }
}

/// `(head-split ?x)`: ?x is [batch, seq, heads, head_size] with static heads and size.
fn head_split(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    head_dims(ctx, var(ctx, args, 0)?).map(|_| ())
}

/// `(attention-mask-shape ?mask ?scores)`: the additive mask broadcasts over
/// heads ([batch or 1, 1, seq or 1, seq]) as ORT's attention_bias requires
/// (`(batch_size or 1, num_heads or 1, sequence_length, total_sequence_length)`,
/// ORT 1.32 ContribOperators.md); a mask of [.., .., 1, seq] is expanded by ORT too.
fn attention_mask_shape(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let mask = var(ctx, args, 0)?;
    match dims(ctx, mask)? {
        [_, h, _, _] if h.fixed() == Some(1) => Ok(()),
        d => Err(format!("mask '{mask}' has dims {d:?}, not [batch, 1, seq, seq]")),
    }
}

/// `(heads ?x)`: the heads dim of a [batch, seq, heads, head_size] tensor.
fn heads(ctx: &MatchContext, args: &[Arg]) -> Result<AttrValue, String> {
    head_dims(ctx, var(ctx, args, 0)?).map(|(h, _)| AttrValue::Int(h))
}

/// `(concat-last ?a ?b ...)`: constants concatenated along their last axis
/// (packing Q, K and V weights [H, H] x 3 into [H, 3H], biases into [3H]).
fn concat_last(ctx: &MatchContext, args: &[Arg]) -> Result<Tensor, String> {
    let mut parts: Vec<ArrayD<f32>> = Vec::new();
    for i in 0..args.len() {
        let t = var(ctx, args, i)?;
        let c = ctx.constant(t).ok_or_else(|| format!("'{t}' is not a constant"))?;
        if matches!(c.data, TensorData::Empty) {
            return Err(format!("'{t}' holds no values"));
        }
        parts.push(c.to_f32().map_err(|e| e.to_string())?);
    }
    let axis = parts.first().map(|p| p.ndim()).filter(|&n| n > 0).ok_or("nothing to concatenate")? - 1;
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    let joined = concatenate(Axis(axis), &views).map_err(|e| format!("cannot concatenate: {e}"))?;
    Ok(Tensor::from_f32("", &joined))
}

