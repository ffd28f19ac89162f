//! Functions of the attention fusions: head splits, masks, packed weights.

use super::{dims, var, Function};
use crate::ir::{AttrValue, Dim, Tensor, TensorData};
use crate::rewrite::matcher::MatchContext;
use crate::rewrite::rule::Arg;

pub(super) const FUNCTIONS: &[(&str, Function)] = &[
    ("head-split", Function::Condition(head_split)),
    ("attention-mask-shape", Function::Condition(attention_mask_shape)),
    ("linear-over-last-axis", Function::Condition(linear_over_last_axis)),
    ("packed-bias", Function::Condition(packed_bias)),
    ("splits-last-axis-in-three", Function::Condition(splits_last_axis_in_three)),
    ("scale-factors", Function::Condition(scale_factors)),
    ("rows-never-fully-masked", Function::Condition(rows_never_fully_masked)),
    ("heads", Function::Attribute(heads)),
    ("ratio", Function::Attribute(ratio)),
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

/// `(attention-mask-shape ?mask)`: the additive mask is 4-D, as ORT's
/// attention_bias must be: `(batch_size or 1, num_heads or 1,
/// sequence_length, total_sequence_length)` (ORT 1.32 ContribOperators.md).
/// The export adds it to the scores [batch, heads, seq, seq], so each of its
/// dims is already 1 or the scores' own: a padding mask [batch, 1, seq, seq],
/// a per-head bias [1, heads, seq, seq] (T5's relative positions), or a
/// key-padding mask [batch, 1, 1, seq], whose rows `expand-attention-bias`
/// expands for ORT. An absent mask (the `Add?` of the pattern skipped) passes:
/// no attention_bias.
fn attention_mask_shape(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let mask = var(ctx, args, 0)?;
    if mask.is_empty() {
        return Ok(());
    }
    match dims(ctx, mask)? {
        [_, _, _, _] => Ok(()),
        d => Err(format!("mask '{mask}' has dims {d:?}, not 4-D [batch or 1, heads or 1, seq or 1, seq]")),
    }
}

/// `(linear-over-last-axis ?x ?w @unflattened)`: `@unflattened =
/// Reshape(Gemm(Reshape(?x, [-1, H]), ?w, ..), ..)` is ?x times ?w over its last
/// axis: ?w is a 2-D constant [H, N] with H the static last dim of ?x (so the
/// inner Reshape, which Gemm needs 2-D, is [batch*seq, H], rows in ?x's order),
/// and @unflattened is [batch, seq, N] with ?x's leading dims, known.
fn linear_over_last_axis(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let (x, w, out) = (var(ctx, args, 0)?, var(ctx, args, 1)?, var(ctx, args, 2)?);
    let weights = ctx.constant(w).ok_or_else(|| format!("'{w}' is not a constant"))?;
    let [rows, cols] = weights.dims[..] else { return Err(format!("'{w}' has rank {}, not 2", weights.dims.len())) };
    match (dims(ctx, x)?, dims(ctx, out)?) {
        ([b, s, h], [ob, os, n]) if h.fixed() == Some(rows) && n.fixed() == Some(cols) && b == ob && s == os && ![b, s].contains(&&Dim::Unknown) => Ok(()),
        (xd, od) => Err(format!("'{x}' {xd:?} times '{w}' [{rows}, {cols}] is not '{out}' {od:?} with the same leading dims")),
    }
}

/// `(packed-bias ?b ?w)`: ?b is absent or a constant [N], N the columns of the
/// 2-D ?w (Attention's bias is [3 hidden]; a Gemm's C may broadcast otherwise).
fn packed_bias(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let (b, w) = (var(ctx, args, 0)?, var(ctx, args, 1)?);
    if b.is_empty() {
        return Ok(());
    }
    let cols = ctx.constant(w).and_then(|c| c.dims.last().copied()).ok_or_else(|| format!("'{w}' is not a constant"))?;
    match ctx.constant(b) {
        Some(c) if c.dims == [cols] => Ok(()),
        Some(c) => Err(format!("'{b}' has dims {:?}, not [{cols}]", c.dims)),
        None => Err(format!("'{b}' is not a constant")),
    }
}

/// `(splits-last-axis-in-three @split)`: the Split has exactly three outputs of
/// equal size along the last axis of its input (Q, K and V in packed order:
/// Attention takes equal thirds of its packed weights unless qkv_hidden_sizes
/// says otherwise).
fn splits_last_axis_in_three(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let Some(Arg::Label(label)) = args.first() else { return Err("usage: (splits-last-axis-in-three @split)".into()) };
    let split = ctx.labelled(label).ok_or_else(|| format!("@{label} is not bound"))?;
    let input = split.inputs.first().map(String::as_str).unwrap_or_default();
    let rank = dims(ctx, input)?.len() as i64;
    let axis = split.attr_int("axis").unwrap_or(0);
    if axis != rank - 1 && axis != -1 {
        return Err(format!("Split '{}' is on axis {axis}, not the last of {rank}", split.name));
    }
    if split.outputs.len() != 3 {
        return Err(format!("Split '{}' has {} outputs, not 3", split.name, split.outputs.len()));
    }
    let width = dims(ctx, input)?.last().and_then(Dim::fixed).ok_or_else(|| format!("the last dim of '{input}' is not static"))?;
    let sizes: Vec<i64> = match split.inputs.get(1).filter(|s| !s.is_empty()) {
        Some(sizes) => {
            let values = ctx.constant(sizes).and_then(|c| c.to_i64().ok());
            values.map(|a| a.iter().copied().collect()).ok_or_else(|| format!("split sizes '{sizes}' are not constant"))?
        }
        // before opset 13 the sizes are an attribute
        None if split.attr("split").is_some() => split.attr_ints("split").unwrap_or_default().to_vec(),
        // opset 18's num_outputs (or no sizes at all): equal parts when the width divides
        None if width % 3 == 0 => vec![width / 3; 3],
        None => return Err(format!("'{input}' of width {width} does not split in three equal parts")),
    };
    if sizes.len() == 3 && sizes.iter().all(|&s| s * 3 == width) {
        Ok(())
    } else {
        Err(format!("Split '{}' sizes {sizes:?} are not three equal thirds of {width}", split.name))
    }
}

/// `(scale-factors ?a ?b ...)`: each is a one-element non-zero float constant,
/// or absent (the operand of a skipped `Mul?` or `Div?`): what `product` and
/// `ratio` read. Zero is out: Attention reads `scale = 0` as "the default,
/// 1/sqrt(head_size)" (ORT ContribOperators.md).
fn scale_factors(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    for i in 0..args.len() {
        let t = var(ctx, args, i)?;
        if t.is_empty() {
            continue;
        }
        match ctx.constant(t).and_then(|c| c.to_f32().ok()) {
            Some(values) if values.len() == 1 && values.iter().all(|&v| v != 0.0 && v.is_finite()) => {}
            _ => return Err(format!("'{t}' is not a finite non-zero scalar float constant")),
        }
    }
    Ok(())
}

/// `(ratio ?a ?b .. ?denominator)`: the product of scalar constants divided by
/// the last one, as a float attribute; an absent one (a skipped `Mul?` or
/// `Div?`) counts as 1.
fn ratio(ctx: &MatchContext, args: &[Arg]) -> Result<AttrValue, String> {
    let scalar = |i: usize| -> Result<f32, String> {
        let t = var(ctx, args, i)?;
        if t.is_empty() {
            return Ok(1.0);
        }
        let values = ctx.constant(t).and_then(|c| c.to_f32().ok()).ok_or_else(|| format!("'{t}' is not a float constant"))?;
        match values.iter().collect::<Vec<_>>()[..] {
            [&v] => Ok(v),
            _ => Err(format!("'{t}' is not a scalar")),
        }
    };
    let Some(last) = args.len().checked_sub(1) else { return Err("usage: (ratio ?a .. ?denominator)".into()) };
    let numerator = (0..last).map(scalar).product::<Result<f32, String>>()?;
    let denominator = scalar(last)?;
    if denominator == 0.0 {
        return Err("the denominator is 0".into());
    }
    Ok(AttrValue::Float(numerator / denominator))
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

/// `(rows-never-fully-masked ?s)`: ?s = scores + Where(keep, 0, fill), and no row
/// of ?s can be entirely -inf for an input with at least one real token per
/// sequence: `fill` is finite, or `keep` is a key-padding mask (no comparison of
/// two position ranges, i.e. no causal triangle, feeds it).
fn rows_never_fully_masked(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let s = var(ctx, args, 0)?;
    let node_of = |t: &str| ctx.graph.producer(t).and_then(|(id, _)| ctx.graph.node(id));
    let add = node_of(s).filter(|n| n.is_onnx("Add")).ok_or_else(|| format!("'{s}' is not scores + mask"))?;
    let mask = add
        .inputs
        .iter()
        .filter_map(|i| node_of(i))
        .find(|n| n.is_onnx("Where") && n.inputs.len() == 3)
        .ok_or_else(|| format!("no Where(keep, 0, fill) mask adds into '{s}'"))?;
    let fill = super::mask_fill(ctx, mask)?;
    if fill.iter().all(|v| v.is_finite()) {
        return Ok(());
    }
    if compares_two_ranges(ctx, &mask.inputs[0], 12) {
        return Err("a causal mask filled with -inf: a row can be fully masked (left padding)".into());
    }
    Ok(())
}

/// A comparison of two tensors that both come from Range nodes (i <= j: the
/// causal triangle) feeds `tensor` within `hops` producers.
fn compares_two_ranges(ctx: &MatchContext, tensor: &str, hops: usize) -> bool {
    let Some(n) = ctx.graph.producer(tensor).and_then(|(id, _)| ctx.graph.node(id)) else { return false };
    ctx.graph.is_causal_comparison(n) || (hops > 0 && n.inputs.iter().any(|i| compares_two_ranges(ctx, i, hops - 1)))
}
