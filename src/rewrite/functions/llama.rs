//! Functions of the Llama-style decoder fusions (`passes/llama.rules`): RMS
//! norms, rotary embeddings, and attention whose K/V heads are repeated for
//! grouped-query attention.

use super::{dims, var, Function};
use crate::ir::{AttrValue, DataType, Dim, Node, Tensor};
use crate::rewrite::matcher::MatchContext;
use crate::rewrite::rule::{Arg, Literal};

pub(super) const FUNCTIONS: &[(&str, Function)] = &[
    ("float32", Function::Condition(float32)),
    ("scalar-constant", Function::Condition(scalar_constant)),
    ("last-axis-mean", Function::Condition(last_axis_mean)),
    ("same-shape", Function::Condition(same_shape)),
    ("splits-heads", Function::Condition(splits_heads)),
    ("rotate-half", Function::Condition(rotate_half)),
    ("equal-halves", Function::Condition(equal_halves)),
    ("rotary-table", Function::Condition(rotary_table)),
    ("repeats-kv-heads", Function::Condition(repeats_kv_heads)),
    ("repeats-cache-heads", Function::Condition(repeats_cache_heads)),
    ("appends-to-cache", Function::Condition(appends_to_cache)),
    ("head-count", Function::Attribute(head_count)),
    ("same-head-count", Function::Condition(same_head_count)),
    ("same-batch", Function::Condition(same_batch)),
    ("head-size-multiple", Function::Condition(head_size_multiple)),
    ("scores-over-cache", Function::Condition(scores_over_cache)),
    ("infinite-fill", Function::Condition(infinite_fill)),
    ("float32-lowest", Function::Input(float32_lowest)),
    ("scalar-value", Function::Attribute(scalar_value)),
    ("rotary-rows", Function::Condition(rotary_rows)),
    ("int64s", Function::Input(int64s)),
    ("int64", Function::Input(int64)),
    ("half-rows", Function::Input(half_rows)),
    ("half-last-dim", Function::Input(half_last_dim)),
    ("kv-group-shape", Function::Input(kv_group_shape)),
    ("group-repeats", Function::Input(group_repeats)),
];

/// `(float32 ?x)`: ?x is float32 (the fused kernels compute half types in
/// float32, which the exported graph does not: only float32 is exact).
fn float32(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let t = var(ctx, args, 0)?;
    match ctx.types.elem_type(t) {
        Some(DataType::Float) => Ok(()),
        other => Err(format!("'{t}' is {other:?}, not float32")),
    }
}

/// The single value of a one-element float constant.
fn scalar(ctx: &MatchContext, t: &str) -> Result<f32, String> {
    let values = ctx.constant(t).and_then(|c| c.to_f32().ok()).ok_or_else(|| format!("'{t}' is not a float constant"))?;
    match values.iter().collect::<Vec<_>>().as_slice() {
        [v] => Ok(**v),
        _ => Err(format!("'{t}' has {} elements, not one", values.len())),
    }
}

/// `(scalar-constant ?c)`: ?c is a constant holding one float.
fn scalar_constant(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    scalar(ctx, var(ctx, args, 0)?).map(|_| ())
}

/// `(scalar-value ?c)`: the value of a one-element constant, as a float attribute.
fn scalar_value(ctx: &MatchContext, args: &[Arg]) -> Result<AttrValue, String> {
    scalar(ctx, var(ctx, args, 0)?).map(AttrValue::Float)
}

/// The labelled node of argument `i`.
fn labelled<'a>(ctx: &'a MatchContext, args: &[Arg], i: usize) -> Result<&'a Node, String> {
    match args.get(i) {
        Some(Arg::Label(l)) => ctx.labelled(l).ok_or_else(|| format!("@{l} is not bound")),
        _ => Err(format!("argument {} must be a @label", i + 1)),
    }
}

/// The integer values of `node`'s input `i` (a constant, or a value shape
/// inference knows), or of its attribute `attr` when the input is absent.
fn ints_of(ctx: &MatchContext, node: &Node, i: usize, attr: &str) -> Option<Vec<i64>> {
    match node.inputs.get(i).filter(|t| !t.is_empty()) {
        Some(t) => ctx.constant(t).and_then(|c| c.to_i64().ok()).map(|a| a.iter().copied().collect()).or_else(|| ctx.types.int_value(t)),
        None => node.attr_ints(attr).map(<[i64]>::to_vec),
    }
}

/// `axis` (negative counts from the end) as an index into `rank` dims.
fn resolve_axis(axis: i64, rank: usize) -> Option<usize> {
    let axis = if axis < 0 { axis + rank as i64 } else { axis };
    usize::try_from(axis).ok().filter(|&a| a < rank)
}

/// `(last-axis-mean @mean)`: the ReduceMean averages over the last axis only
/// and keeps it (axes an attribute before opset 18, an input from 18).
fn last_axis_mean(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let node = labelled(ctx, args, 0)?;
    let input = node.inputs.first().ok_or("ReduceMean without input")?;
    let rank = dims(ctx, input)?.len();
    let axes = ints_of(ctx, node, 1, "axes").ok_or_else(|| format!("the axes of '{}' are not known constants", node.name))?;
    if node.attr_int("keepdims").unwrap_or(1) != 1 {
        return Err(format!("'{}' drops the reduced axis", node.name));
    }
    match axes.as_slice() {
        [a] if resolve_axis(*a, rank) == Some(rank - 1) => Ok(()),
        _ => Err(format!("'{}' reduces axes {axes:?} of a rank-{rank} tensor, not the last one only", node.name)),
    }
}

/// Fully known dims: fixed numbers or named symbols.
fn known<'a>(ctx: &'a MatchContext, t: &str) -> Result<&'a [Dim], String> {
    let d = dims(ctx, t)?;
    if d.iter().any(|x| matches!(x, Dim::Unknown)) {
        return Err(format!("'{t}' has an unknown dim: {d:?}"));
    }
    Ok(d)
}

/// `(same-shape ?a ?b)`: both shapes are fully known and equal, dim for dim
/// (no broadcasting hides in an Add of the two).
fn same_shape(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let (a, b) = (var(ctx, args, 0)?, var(ctx, args, 1)?);
    let (da, db) = (known(ctx, a)?, known(ctx, b)?);
    if da == db {
        Ok(())
    } else {
        Err(format!("'{a}' is {da:?} but '{b}' is {db:?}"))
    }
}

/// The fixed size of a dim, or why not.
fn fixed(d: &Dim, what: &str) -> Result<i64, String> {
    d.fixed().ok_or_else(|| format!("{what} is {d:?}, not a fixed size"))
}

/// `(splits-heads ?x @split)`: @split reshapes ?x [B, S, N*H] into
/// [B, S, N, H] (N and H fixed): it only splits the last axis, so a kernel that
/// splits heads itself may read ?x.
fn splits_heads(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let x = var(ctx, args, 0)?;
    let split = var(ctx, args, 1)?;
    match (known(ctx, x)?, known(ctx, split)?) {
        ([b, s, d], [b2, s2, n, h]) if b == b2 && s == s2 => {
            let (d, n, h) = (fixed(d, "the hidden size")?, fixed(n, "the head count")?, fixed(h, "the head size")?);
            if n * h == d {
                Ok(())
            } else {
                Err(format!("{n} heads of {h} do not make {d}"))
            }
        }
        (dx, ds) => Err(format!("'{split}' {ds:?} is not '{x}' {dx:?} with its last axis split into heads")),
    }
}

/// The [start, end) a Slice node takes of the last axis of its rank-`rank`
/// input, with step 1.
fn last_axis_range(ctx: &MatchContext, slice: &Node, rank: usize) -> Result<(i64, i64), String> {
    let one = |i, what| match ints_of(ctx, slice, i, what).as_deref() {
        Some([v]) => Ok(*v),
        _ => Err(format!("'{}' has no single constant {what}", slice.name)),
    };
    let axis = one(3, "axes")?;
    let step = if slice.inputs.get(4).is_some_and(|s| !s.is_empty()) { one(4, "steps")? } else { 1 };
    if resolve_axis(axis, rank) != Some(rank - 1) || step != 1 {
        return Err(format!("'{}' does not slice the last axis with step 1", slice.name));
    }
    Ok((one(1, "starts")?, one(2, "ends")?))
}

/// `(rotate-half @first @second)`: the Slices take the first and the second
/// half of the last axis (of fixed, even size H) of the same tensor:
/// `x[..., :H/2]` and `x[..., H/2:]`.
fn rotate_half(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let (first, second) = (labelled(ctx, args, 0)?, labelled(ctx, args, 1)?);
    let x = first.inputs.first().ok_or("Slice without input")?;
    if second.inputs.first() != Some(x) {
        return Err("the two halves are sliced from different tensors".into());
    }
    let d = dims(ctx, x)?;
    let h = fixed(d.last().ok_or("a scalar has no halves")?, "the head size")?;
    if h % 2 != 0 {
        return Err(format!("the head size {h} is odd"));
    }
    let (a, b) = (last_axis_range(ctx, first, d.len())?, last_axis_range(ctx, second, d.len())?);
    if a == (0, h / 2) && b.0 == h / 2 && b.1 >= h {
        Ok(())
    } else {
        Err(format!("slices {a:?} and {b:?} are not the halves [0, {}) and [{}, {h})", h / 2, h / 2))
    }
}

/// `(equal-halves ?t)`: the last axis of ?t is two equal halves, provably:
/// ?t is `Concat(f, f)` along the last axis, through elementwise functions
/// (Cos, Sin, a product with a scalar constant) and Unsqueezes of other axes.
/// (HF rotary: `emb = cat(freqs, freqs); cos = emb.cos() * attention_scaling`.)
fn equal_halves(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let t = var(ctx, args, 0)?;
    let mut name = t.to_string();
    loop {
        let producer = ctx.graph.producer(&name).and_then(|(id, _)| ctx.graph.node(id));
        let node = producer.ok_or_else(|| format!("'{name}' is not computed in the graph"))?;
        let rank = dims(ctx, &name)?.len();
        let first = node.inputs.first().cloned().unwrap_or_default();
        name = match node.op_type.as_str() {
            "Cos" | "Sin" => first,
            "Mul" | "Div" if node.inputs.len() == 2 && scalar(ctx, &node.inputs[1]).is_ok() => first,
            "Mul" if node.inputs.len() == 2 && scalar(ctx, &first).is_ok() => node.inputs[1].clone(),
            "Unsqueeze" => {
                let axes = ints_of(ctx, node, 1, "axes").ok_or_else(|| format!("the axes of '{}' are unknown", node.name))?;
                if axes.iter().any(|&a| resolve_axis(a, rank) == Some(rank - 1)) {
                    return Err(format!("'{}' inserts the last axis", node.name));
                }
                first
            }
            "Concat" => {
                let axis = node.attr_int("axis").unwrap_or(0);
                return match node.inputs.as_slice() {
                    [a, b] if a == b && resolve_axis(axis, rank) == Some(rank - 1) => Ok(()),
                    _ => Err(format!("'{}' is not Concat(f, f) along the last axis", node.name)),
                };
            }
            other => return Err(format!("'{t}' comes through {other} '{}', which may not keep its halves equal", node.name)),
        };
    }
}

/// `(rotary-table ?cos @heads)`: ?cos [1, 1, S, H] broadcasts one row per
/// position over the batch and the heads of @heads [B, N, S, H] (same S, fixed
/// H): row s serves position s of every sequence, as RotaryEmbedding's cache
/// with position_ids = [0] does.
fn rotary_table(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let (table, heads) = (var(ctx, args, 0)?, var(ctx, args, 1)?);
    let (dt, dh) = (known(ctx, table)?, known(ctx, heads)?);
    match (dt, dh) {
        ([b, n, s, h], [_, _, s2, h2]) if b.fixed() == Some(1) && n.fixed() == Some(1) && s == s2 && h == h2 && h.fixed().is_some() => Ok(()),
        _ => Err(format!("'{table}' {dt:?} is not [1, 1, S, H] for '{heads}' {dh:?}")),
    }
}

/// `(rotary-rows ?cos @heads)`: ?cos [B, 1, S, H] holds one row per token of
/// each sequence (the table HF computes from the position_ids input, left
/// padding and all), broadcast over the heads of @heads [B, N, S, H] (same B and
/// S, fixed H). Flattened to [B*S, H], it is a rotary cache that token (b, s)
/// reads at row b*S + s.
fn rotary_rows(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let (table, heads) = (var(ctx, args, 0)?, var(ctx, args, 1)?);
    let (dt, dh) = (known(ctx, table)?, known(ctx, heads)?);
    match (dt, dh) {
        ([b, n, s, h], [b2, _, s2, h2]) if n.fixed() == Some(1) && b == b2 && s == s2 && h == h2 && h.fixed().is_some() => Ok(()),
        _ => Err(format!("'{table}' {dt:?} is not [B, 1, S, H] for '{heads}' {dh:?}")),
    }
}

/// `(repeats-kv-heads @group @expand @heads @q)`: @group [B, KV, 1, S, H] (the
/// K or V heads with an axis inserted at 2) expanded to [B, KV, G, S, H] and
/// reshaped to @heads [B, KV*G, S, H]: head n reads KV head n / G, torch's
/// `repeat_kv`. KV*G and H are those of the query split @q [B, S', N, H].
fn repeats_kv_heads(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let q = var(ctx, args, 3)?;
    match known(ctx, q)? {
        [_, _, n, h] => repeats_heads(ctx, args, n, h),
        d => Err(format!("'{q}' {d:?} is not a query split [B, S, N, H]")),
    }
}

/// `(repeats-cache-heads @group @expand @heads ?q)`: as `repeats-kv-heads`,
/// for the query heads ?q [B, N, S, H] (already transposed, the cache's layout).
fn repeats_cache_heads(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let q = var(ctx, args, 3)?;
    match known(ctx, q)? {
        [_, n, _, h] => repeats_heads(ctx, args, n, h),
        d => Err(format!("'{q}' {d:?} is not query heads [B, N, S, H]")),
    }
}

/// @group [B, KV, 1, S, H] -> @expand [B, KV, G, S, H] -> @heads [B, KV*G, S, H]
/// with KV*G = `qn` query heads of size `qh`.
fn repeats_heads(ctx: &MatchContext, args: &[Arg], qn: &Dim, qh: &Dim) -> Result<(), String> {
    let (group, expand, heads) = (var(ctx, args, 0)?, var(ctx, args, 1)?, var(ctx, args, 2)?);
    let dims = (known(ctx, group)?, known(ctx, expand)?, known(ctx, heads)?);
    let not_a_repeat = || {
        let (dg, de, dh) = dims;
        format!("'{group}' {dg:?} -> '{expand}' {de:?} -> '{heads}' {dh:?} is not a repeat of KV heads for {qn:?} query heads")
    };
    let ([b, kv, one, s, h], [b2, kv2, g, s2, h2], [b3, n, s3, h3]) = dims else {
        return Err(not_a_repeat());
    };
    let aligned = one.fixed() == Some(1) && b == b2 && b == b3 && kv == kv2 && s == s2 && s == s3 && [h2, h3, qh].iter().all(|x| *x == h);
    if !aligned {
        return Err(not_a_repeat());
    }
    let (kv, g) = (fixed(kv, "the KV head count")?, fixed(g, "the group size")?);
    let (n, qn) = (fixed(n, "the head count")?, fixed(qn, "the query head count")?);
    if kv * g == n && n == qn {
        Ok(())
    } else {
        Err(format!("{kv} KV heads x {g} are not the {qn} query heads"))
    }
}

/// `(appends-to-cache @present ?past ?new ?q)`: @present = Concat(?past, ?new)
/// along axis 2 of [B, KV, len, H] tensors: the past P rows of each KV head,
/// then the S new ones, for the query heads ?q [B, N, S, H] (N a multiple of
/// KV, the same B, S and H): the present cache GroupQueryAttention writes.
fn appends_to_cache(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let present = labelled(ctx, args, 0)?;
    let (past, new, q) = (var(ctx, args, 1)?, var(ctx, args, 2)?, var(ctx, args, 3)?);
    let axis = present.attr_int("axis").unwrap_or(0);
    if present.inputs.len() != 2 || resolve_axis(axis, 4) != Some(2) {
        return Err(format!("'{}' does not join two caches along their length axis", present.name));
    }
    match (known(ctx, past)?, known(ctx, new)?, known(ctx, q)?) {
        ([b, kv, _, h], [b2, kv2, s, h2], [b3, n, s2, h3]) if b == b2 && b == b3 && kv == kv2 && s == s2 && h == h2 && h == h3 => {
            let (kv, n) = (fixed(kv, "the KV head count")?, fixed(n, "the query head count")?);
            fixed(h, "the head size")?;
            if kv > 0 && n % kv == 0 {
                Ok(())
            } else {
                Err(format!("{n} query heads do not group over {kv} KV heads"))
            }
        }
        (dp, dn, dq) => Err(format!("past '{past}' {dp:?}, new '{new}' {dn:?} and query '{q}' {dq:?} are not one cache's [B, KV, len, H] and [B, N, S, H]")),
    }
}

/// `(scores-over-cache ?scores)`: ?scores = MatMul(q, k^T) where k comes, through
/// scalings, transposes, reshapes and the K/V head repeat, from a Concat that
/// joins a graph input (the past cache) with the new keys: self-attention of a
/// decoder step over its KV cache. A query row there that sees no key is a
/// padding token's, whose output no later step reads (every later mask hides
/// its position).
fn scores_over_cache(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let scores = var(ctx, args, 0)?;
    let node_of = |t: &str| ctx.graph.producer(t).and_then(|(id, _)| ctx.graph.node(id));
    let product = node_of(scores).filter(|n| n.is_onnx("MatMul") && n.inputs.len() == 2).ok_or_else(|| format!("'{scores}' is not a MatMul"))?;
    let graph_inputs: Vec<&str> = ctx.graph.inputs.iter().filter(|i| ctx.graph.initializer(&i.name).is_none()).map(|i| i.name.as_str()).collect();
    let mut key = product.inputs[1].clone();
    for _ in 0..8 {
        let node = node_of(&key).ok_or_else(|| format!("the keys of '{scores}' do not come from a cache"))?;
        match node.op_type.as_str() {
            "Concat" if node.inputs.iter().any(|i| graph_inputs.contains(&i.as_str())) => return Ok(()),
            "Mul" | "Div" | "Transpose" | "Reshape" | "Expand" | "Unsqueeze" => {
                // the tensor operand (a scale's other input is a constant)
                key = node.inputs.iter().find(|i| ctx.constant(i).is_none()).cloned().unwrap_or_default();
            }
            other => return Err(format!("the keys of '{scores}' come through {other} '{}', not from a cache", node.name)),
        }
    }
    Err(format!("no cache Concat within 8 nodes of the keys of '{scores}'"))
}

/// `(infinite-fill ?mask)`: ?mask is `Where(keep, 0, -inf)` (the -inf fill a
/// constant): an additive mask that makes a row with no visible key NaN.
fn infinite_fill(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let mask = var(ctx, args, 0)?;
    let node = ctx.graph.producer(mask).and_then(|(id, _)| ctx.graph.node(id)).filter(|n| n.is_onnx("Where") && n.inputs.len() == 3);
    let node = node.ok_or_else(|| format!("'{mask}' is not Where(keep, 0, fill)"))?;
    if super::mask_fill(ctx, node)?.iter().all(|v| *v == f32::NEG_INFINITY) {
        Ok(())
    } else {
        Err(format!("'{mask}' is not filled with -inf"))
    }
}

/// `(float32-lowest)`: the scalar float32 constant f32::MIN, the most negative
/// finite value (a mask fill whose softmax stays finite).
fn float32_lowest(_: &MatchContext, _: &[Arg]) -> Result<Tensor, String> {
    Ok(Tensor::from_f32("", &ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), f32::MIN)))
}

/// `(same-head-count ?a ?b)`: heads ?a and ?b [B, N, len, H] have the same
/// fixed N (K/V heads not grouped: multi-head attention).
fn same_head_count(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let (a, b) = (var(ctx, args, 0)?, var(ctx, args, 1)?);
    match (known(ctx, a)?, known(ctx, b)?) {
        ([_, n, _, _], [_, m, _, _]) if n == m && n.fixed().is_some() => Ok(()),
        (da, db) => Err(format!("'{a}' {da:?} and '{b}' {db:?} do not have the same fixed head count")),
    }
}

/// `(head-size-multiple ?t M)`: the fixed head size H of ?t [B, N, len, H] is a
/// multiple of M (ORT 1.32's GroupQueryAttention CPU kernel refuses H % 8 != 0).
fn head_size_multiple(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let t = var(ctx, args, 0)?;
    let m = super::int_arg(args, 1)?;
    let h = fixed(dims(ctx, t)?.last().ok_or_else(|| format!("'{t}' is a scalar"))?, "the head size")?;
    if m > 0 && h % m == 0 {
        Ok(())
    } else {
        Err(format!("head size {h} is not a multiple of {m}"))
    }
}

/// `(same-batch ?a ?b)`: dim 0 of ?a and ?b is the same known dim (a mask of
/// the whole batch, not one broadcast over it).
fn same_batch(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let (a, b) = (var(ctx, args, 0)?, var(ctx, args, 1)?);
    match (dims(ctx, a)?.first(), dims(ctx, b)?.first()) {
        (Some(x), Some(y)) if x == y && !matches!(x, Dim::Unknown) => Ok(()),
        (x, y) => Err(format!("'{a}' starts with {x:?}, '{b}' with {y:?}")),
    }
}

/// `(head-count ?t)`: N of heads ?t [B, N, S, H] (fixed), as an attribute.
fn head_count(ctx: &MatchContext, args: &[Arg]) -> Result<AttrValue, String> {
    let t = var(ctx, args, 0)?;
    match dims(ctx, t)? {
        [_, n, _, _] => Ok(AttrValue::Int(fixed(n, "the head count")?)),
        d => Err(format!("'{t}' {d:?} is not heads [B, N, S, H]")),
    }
}

/// `(int64s 0 1 ...)`: the 1-D int64 constant of these values (Slice bounds,
/// Squeeze axes, Reshape targets).
fn int64s(_: &MatchContext, args: &[Arg]) -> Result<Tensor, String> {
    let values = args
        .iter()
        .map(|a| match a {
            Arg::Literal(Literal::Int(v)) => Ok(*v),
            _ => Err("int64s takes integers".to_string()),
        })
        .collect::<Result<Vec<i64>, String>>()?;
    Ok(Tensor::from_i64("", vec![values.len() as i64], &values))
}

/// `(int64 v)`: the int64 scalar constant v (Gather indices, Range bounds).
fn int64(_: &MatchContext, args: &[Arg]) -> Result<Tensor, String> {
    match args {
        [Arg::Literal(Literal::Int(v))] => Ok(Tensor::from_i64("", vec![], &[*v])),
        _ => Err("int64 takes one integer".to_string()),
    }
}

/// `(half-rows ?t)`: [-1, H / 2] for ?t's fixed last dim H: the Reshape target
/// that makes every row of a table's first half a row of a rotary cache.
fn half_rows(ctx: &MatchContext, args: &[Arg]) -> Result<Tensor, String> {
    let t = var(ctx, args, 0)?;
    let h = fixed(dims(ctx, t)?.last().ok_or_else(|| format!("'{t}' is a scalar"))?, "the last dim")?;
    Ok(Tensor::from_i64("", vec![2], &[-1, h / 2]))
}

/// `(half-last-dim ?t)`: [H / 2] for ?t's fixed last dim H.
fn half_last_dim(ctx: &MatchContext, args: &[Arg]) -> Result<Tensor, String> {
    let t = var(ctx, args, 0)?;
    let h = fixed(dims(ctx, t)?.last().ok_or_else(|| format!("'{t}' is a scalar"))?, "the last dim")?;
    Ok(Tensor::from_i64("", vec![1], &[h / 2]))
}

/// `(kv-group-shape @k)`: [0, 0, KV, 1, H] for the K split @k [B, S, KV, H]:
/// the Reshape target that gives each KV head a group axis to expand.
fn kv_group_shape(ctx: &MatchContext, args: &[Arg]) -> Result<Tensor, String> {
    let k = var(ctx, args, 0)?;
    match dims(ctx, k)? {
        [_, _, kv, h] => Ok(Tensor::from_i64("", vec![5], &[0, 0, fixed(kv, "the KV head count")?, 1, fixed(h, "the head size")?])),
        d => Err(format!("'{k}' {d:?} is not [B, S, KV, H]")),
    }
}

/// `(group-repeats @expand)`: [1, 1, 1, G, 1] for @expand [B, KV, G, S, H]:
/// the Expand shape that repeats each KV head G times in [B, S, KV, 1, H].
fn group_repeats(ctx: &MatchContext, args: &[Arg]) -> Result<Tensor, String> {
    let expand = var(ctx, args, 0)?;
    match dims(ctx, expand)? {
        [_, _, g, _, _] => Ok(Tensor::from_i64("", vec![5], &[1, 1, 1, fixed(g, "the group size")?, 1])),
        d => Err(format!("'{expand}' {d:?} is not [B, KV, G, S, H]")),
    }
}
