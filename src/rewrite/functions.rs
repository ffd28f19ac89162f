//! Named conditions, computed attributes and computed constants that rules call:
//! what a pattern cannot say (ranks, head counts, packed weights) is a small
//! function registered here by name.

use super::matcher::MatchContext;
use super::rule::{Arg, Literal};
use crate::ir::{AttrValue, Dim, Tensor, TensorData};
use ndarray::{concatenate, ArrayD, Axis};
use std::collections::BTreeMap;

/// What a function computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// `:if (f ...)`: holds, or says why not.
    Condition,
    /// `:attr (f ...)` in a template.
    Attribute,
    /// `(f ...)` in a template's input position: a new constant tensor.
    Input,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Condition => "condition",
            Role::Attribute => "attribute",
            Role::Input => "input",
        }
    }
}

pub type ConditionFn = fn(&MatchContext, &[Arg]) -> Result<(), String>;
pub type AttributeFn = fn(&MatchContext, &[Arg]) -> Result<AttrValue, String>;
pub type InputFn = fn(&MatchContext, &[Arg]) -> Result<Tensor, String>;

pub struct Registry {
    conditions: BTreeMap<&'static str, ConditionFn>,
    attributes: BTreeMap<&'static str, AttributeFn>,
    inputs: BTreeMap<&'static str, InputFn>,
}

impl Registry {
    pub fn has(&self, name: &str, role: Role) -> bool {
        match role {
            Role::Condition => self.conditions.contains_key(name),
            Role::Attribute => self.attributes.contains_key(name),
            Role::Input => self.inputs.contains_key(name),
        }
    }

    pub fn names(&self, role: Role) -> Vec<&'static str> {
        match role {
            Role::Condition => self.conditions.keys().copied().collect(),
            Role::Attribute => self.attributes.keys().copied().collect(),
            Role::Input => self.inputs.keys().copied().collect(),
        }
    }

    pub fn condition(&self, name: &str) -> Option<ConditionFn> {
        self.conditions.get(name).copied()
    }

    pub fn attribute(&self, name: &str) -> Option<AttributeFn> {
        self.attributes.get(name).copied()
    }

    pub fn input(&self, name: &str) -> Option<InputFn> {
        self.inputs.get(name).copied()
    }

    /// Every function the rules may call.
    pub fn standard() -> Registry {
        let conditions: [(&'static str, ConditionFn); 10] = [
            ("arange-from-zero", arange_from_zero),
            ("sequence-length-of", sequence_length_of),
            ("swaps-last-two", swaps_last_two),
            ("not-embedding", not_embedding),
            ("rank", rank),
            ("constant", constant),
            ("one-d-constant", one_d_constant),
            ("last-dims-equal", last_dims_equal),
            ("head-split", head_split),
            ("attention-mask-shape", attention_mask_shape),
        ];
        let attributes: [(&'static str, AttributeFn); 4] =
            [("copy-attr", copy_attr), ("heads", heads), ("product", product), ("composed-perm", composed_perm)];
        let inputs: [(&'static str, InputFn); 1] = [("concat-last", concat_last)];
        Registry {
            conditions: conditions.into_iter().collect(),
            attributes: attributes.into_iter().collect(),
            inputs: inputs.into_iter().collect(),
        }
    }
}

/// A tensor argument: a bound `?var`, or the first output of a `@label`led node.
fn var<'a>(ctx: &'a MatchContext, args: &[Arg], i: usize) -> Result<&'a str, String> {
    match args.get(i) {
        Some(Arg::Var(v)) => ctx.tensor(v).ok_or_else(|| format!("?{v} is not bound")),
        Some(Arg::Label(l)) => ctx
            .labelled(l)
            .and_then(|n| n.outputs.first())
            .map(String::as_str)
            .ok_or_else(|| format!("@{l} is not bound")),
        _ => Err(format!("argument {} must be a ?var or @label", i + 1)),
    }
}

fn int_arg(args: &[Arg], i: usize) -> Result<i64, String> {
    match args.get(i) {
        Some(Arg::Literal(Literal::Int(v))) => Ok(*v),
        _ => Err(format!("argument {} must be an integer", i + 1)),
    }
}

fn dims<'a>(ctx: &'a MatchContext, tensor: &str) -> Result<&'a [Dim], String> {
    ctx.types.shape(tensor).ok_or_else(|| format!("the shape of '{tensor}' is unknown"))
}

/// `(rank ?x N)`: ?x has rank N.
fn rank(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let t = var(ctx, args, 0)?;
    let want = int_arg(args, 1)?;
    let got = dims(ctx, t)?.len() as i64;
    if got == want { Ok(()) } else { Err(format!("rank of '{t}' is {got}, not {want}")) }
}

/// `(constant ?x)`: ?x is an initializer or a Constant node's output.
fn constant(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let t = var(ctx, args, 0)?;
    ctx.constant(t).map(|_| ()).ok_or_else(|| format!("'{t}' is not a constant"))
}

/// `(one-d-constant ?x)`: ?x is a constant of rank 1 (ORT's SkipLayerNormalization
/// and LayerNormalization fusions need 1-D gamma and beta).
fn one_d_constant(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let t = var(ctx, args, 0)?;
    match ctx.constant(t) {
        Some(c) if c.dims.len() == 1 => Ok(()),
        Some(c) => Err(format!("'{t}' has rank {}, not 1", c.dims.len())),
        None => Err(format!("'{t}' is not a constant")),
    }
}

/// `(last-dims-equal ?a ?b)`: both have the same static last dim.
fn last_dims_equal(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let (a, b) = (var(ctx, args, 0)?, var(ctx, args, 1)?);
    let last = |t| dims(ctx, t).ok().and_then(|d| d.last()).and_then(Dim::fixed);
    match (last(a), last(b)) {
        (Some(x), Some(y)) if x == y => Ok(()),
        (x, y) => Err(format!("last dims of '{a}' ({x:?}) and '{b}' ({y:?}) differ or are unknown")),
    }
}

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

/// `(copy-attr @node name)`: the attribute of a matched node.
fn copy_attr(ctx: &MatchContext, args: &[Arg]) -> Result<AttrValue, String> {
    let (Some(Arg::Label(label)), Some(Arg::Literal(Literal::Str(name)))) = (args.first(), args.get(1)) else {
        return Err("usage: (copy-attr @label \"name\")".into());
    };
    let node = ctx.labelled(label).ok_or_else(|| format!("@{label} is not bound"))?;
    node.attr(name).cloned().ok_or_else(|| format!("@{label} has no attribute {name}"))
}

/// `(heads ?x)`: the heads dim of a [batch, seq, heads, head_size] tensor.
fn heads(ctx: &MatchContext, args: &[Arg]) -> Result<AttrValue, String> {
    head_dims(ctx, var(ctx, args, 0)?).map(|(h, _)| AttrValue::Int(h))
}

/// `(product ?a ?b ...)`: the product of scalar constants, as a float attribute.
fn product(ctx: &MatchContext, args: &[Arg]) -> Result<AttrValue, String> {
    let mut p = 1.0f32;
    for i in 0..args.len() {
        let t = var(ctx, args, i)?;
        let values = ctx.constant(t).and_then(|c| c.to_f32().ok()).ok_or_else(|| format!("'{t}' is not a float constant"))?;
        if values.len() != 1 {
            return Err(format!("'{t}' is not a scalar"));
        }
        p *= values.iter().next().copied().unwrap_or(1.0);
    }
    Ok(AttrValue::Float(p))
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

/// `(swaps-last-two ?y @merged @out)`: ?y is [a, b, c, d], @merged is [_, c, d]
/// (the leading axes merged) and @out is [a, b, d, c].
fn swaps_last_two(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let (y, merged, out) = (var(ctx, args, 0)?, var(ctx, args, 1)?, var(ctx, args, 2)?);
    let (y_dims, merged_dims, out_dims) = (dims(ctx, y)?, dims(ctx, merged)?, dims(ctx, out)?);
    let known = |d: &Dim| !matches!(d, Dim::Unknown);
    match (y_dims, merged_dims, out_dims) {
        ([a, b, c, d], [_, mc, md], [oa, ob, od, oc])
            if [a, b, c, d].iter().all(|x| known(x)) && mc == c && md == d && oa == a && ob == b && oc == c && od == d =>
        {
            Ok(())
        }
        _ => Err(format!("'{y}' {y_dims:?} -> '{merged}' {merged_dims:?} -> '{out}' {out_dims:?} is not a swap of the last two axes")),
    }
}

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

/// `(composed-perm @inner @outer)`: the perm of Transpose[outer](Transpose[inner](x)).
fn composed_perm(ctx: &MatchContext, args: &[Arg]) -> Result<AttrValue, String> {
    let perm_of = |i: usize| -> Result<Vec<i64>, String> {
        let Some(Arg::Label(l)) = args.get(i) else { return Err("usage: (composed-perm @inner @outer)".into()) };
        let node = ctx.labelled(l).ok_or_else(|| format!("@{l} is not bound"))?;
        node.attr_ints("perm").map(<[i64]>::to_vec).ok_or_else(|| format!("@{l} has no explicit perm"))
    };
    let (inner, outer) = (perm_of(0)?, perm_of(1)?);
    if inner.len() != outer.len() {
        return Err("perms of different ranks".into());
    }
    outer
        .iter()
        .map(|&o| usize::try_from(o).ok().and_then(|o| inner.get(o).copied()).ok_or_else(|| "perm out of range".to_string()))
        .collect::<Result<Vec<i64>, String>>()
        .map(AttrValue::Ints)
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
