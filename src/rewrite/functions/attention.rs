//! Functions of the attention fusions: head splits, masks, packed weights.

use super::{dims, var, Function};
use crate::ir::{AttrValue, Tensor, TensorData};
use crate::rewrite::matcher::MatchContext;
use crate::rewrite::rule::Arg;

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
/// Rows are copied as bytes: no conversion, the dtype is kept (float32 or float16).
fn concat_last(ctx: &MatchContext, args: &[Arg]) -> Result<Tensor, String> {
    let mut parts: Vec<&Tensor> = Vec::new();
    for i in 0..args.len() {
        let t = var(ctx, args, i)?;
        parts.push(ctx.constant(t).ok_or_else(|| format!("'{t}' is not a constant"))?);
    }
    let first = parts.first().ok_or("nothing to concatenate")?;
    let rank = first.dims.len();
    if rank == 0 {
        return Err("scalars have no last axis".into());
    }
    let element_bytes = first.dtype.bit_width().filter(|b| b % 8 == 0).ok_or("a sub-byte or string type")? as usize / 8;
    let outer: Vec<i64> = first.dims[..rank - 1].to_vec();
    let mut rows: Vec<&[u8]> = Vec::new();
    for p in &parts {
        if p.dtype != first.dtype || p.dims.len() != rank || p.dims[..rank - 1] != outer[..] {
            return Err(format!("'{}' {:?} {} does not stack with '{}' {:?} {}", p.name, p.dims, p.dtype, first.name, first.dims, first.dtype));
        }
        let TensorData::Raw(bytes) = &p.data else { return Err(format!("'{}' does not hold raw data", p.name)) };
        rows.push(bytes);
    }
    let row_count: usize = outer.iter().map(|&d| d as usize).product();
    let widths: Vec<usize> = parts.iter().map(|p| p.dims[rank - 1] as usize * element_bytes).collect();
    let mut joined = Vec::with_capacity(rows.iter().map(|r| r.len()).sum());
    for r in 0..row_count {
        for (bytes, &width) in rows.iter().zip(&widths) {
            joined.extend_from_slice(bytes.get(r * width..(r + 1) * width).ok_or("data shorter than its dims")?);
        }
    }
    let mut dims = outer;
    dims.push(parts.iter().map(|p| p.dims[rank - 1]).sum());
    Ok(Tensor::from_raw("", first.dtype, dims, joined.into()))
}

