//! Functions about shapes, constants and attributes in general.

use super::{dims, int_arg, var, Function};
use crate::ir::{AttrValue, Dim};
use crate::rewrite::matcher::MatchContext;
use crate::rewrite::rule::{Arg, Literal};

pub(super) const FUNCTIONS: &[(&str, Function)] = &[
    ("rank", Function::Condition(rank)),
    ("constant", Function::Condition(constant)),
    ("one-d-constant", Function::Condition(one_d_constant)),
    ("last-dims-equal", Function::Condition(last_dims_equal)),
    ("swaps-last-two", Function::Condition(swaps_last_two)),
    ("zeros-copy-shared-dims", Function::Condition(zeros_copy_shared_dims)),
    ("identity-perm", Function::Condition(identity_perm)),
    ("copy-attr", Function::Attribute(copy_attr)),
    ("product", Function::Attribute(product)),
    ("composed-perm", Function::Attribute(composed_perm)),
];

/// `(rank ?x N)`: ?x has rank N.
fn rank(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let t = var(ctx, args, 0)?;
    let want = int_arg(args, 1)?;
    let got = dims(ctx, t)?.len() as i64;
    if got == want {
        Ok(())
    } else {
        Err(format!("rank of '{t}' is {got}, not {want}"))
    }
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

/// `(copy-attr @node name)`: the attribute of a matched node.
fn copy_attr(ctx: &MatchContext, args: &[Arg]) -> Result<AttrValue, String> {
    let (Some(Arg::Label(label)), Some(Arg::Literal(Literal::Str(name)))) = (args.first(), args.get(1)) else {
        return Err("usage: (copy-attr @label \"name\")".into());
    };
    let node = ctx.labelled(label).ok_or_else(|| format!("@{label} is not bound"))?;
    node.attr(name).cloned().ok_or_else(|| format!("@{label} has no attribute {name}"))
}

/// `(product ?a ?b ...)`: the product of scalar constants, as a float attribute
/// (an absent one, a skipped `Mul?`, counts as 1).
fn product(ctx: &MatchContext, args: &[Arg]) -> Result<AttrValue, String> {
    let mut p = 1.0f32;
    for i in 0..args.len() {
        let t = var(ctx, args, i)?;
        if t.is_empty() {
            // a skipped optional factor (`Mul?`)
            continue;
        }
        let values = ctx.constant(t).and_then(|c| c.to_f32().ok()).ok_or_else(|| format!("'{t}' is not a float constant"))?;
        if values.len() != 1 {
            return Err(format!("'{t}' is not a scalar"));
        }
        p *= values.iter().next().copied().unwrap_or(1.0);
    }
    Ok(AttrValue::Float(p))
}

/// `(zeros-copy-shared-dims @inner @outer ?x)`: @outer = Reshape(@inner =
/// Reshape(?x, a), b) with b a known value, `allowzero` 0 on both, and every 0
/// of b at an index where @inner's output and ?x have the same known dim: the
/// outer Reshape reads the same target off ?x as off the intermediate.
fn zeros_copy_shared_dims(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let label = |i: usize| match args.get(i) {
        Some(Arg::Label(l)) => ctx.labelled(l).ok_or_else(|| format!("@{l} is not bound")),
        _ => Err("usage: (zeros-copy-shared-dims @inner @outer ?x)".to_string()),
    };
    let (inner, outer) = (label(0)?, label(1)?);
    let x = var(ctx, args, 2)?;
    if [inner, outer].iter().any(|n| n.attr_int("allowzero").unwrap_or(0) != 0) {
        return Err("allowzero Reshape".into());
    }
    let target = outer.inputs.get(1).ok_or("Reshape without a shape")?;
    let shape = ctx
        .constant(target)
        .and_then(|c| c.to_i64().ok())
        .map(|a| a.iter().copied().collect::<Vec<i64>>())
        .or_else(|| ctx.types.int_value(target))
        .ok_or_else(|| format!("the target of '{}' is not known", outer.name))?;
    let middle = inner.outputs.first().ok_or("Reshape without output")?;
    let (dm, dx) = (dims(ctx, middle)?, dims(ctx, x)?);
    for (i, _) in shape.iter().enumerate().filter(|(_, &v)| v == 0) {
        match (dm.get(i), dx.get(i)) {
            (Some(a), Some(b)) if a == b && !matches!(a, Dim::Unknown) => {}
            (a, b) => return Err(format!("dim {i} copied from '{middle}' is {a:?}, '{x}' has {b:?}")),
        }
    }
    Ok(())
}

/// `(identity-perm @t)`: the Transpose @t has perm [0, 1, .., n-1].
fn identity_perm(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let Some(Arg::Label(l)) = args.first() else { return Err("usage: (identity-perm @t)".into()) };
    let node = ctx.labelled(l).ok_or_else(|| format!("@{l} is not bound"))?;
    match node.attr_ints("perm") {
        Some(perm) if perm.iter().enumerate().all(|(i, &p)| p == i as i64) => Ok(()),
        other => Err(format!("perm {other:?} is not the identity")),
    }
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

/// `(swaps-last-two ?y @merged @out)`: ?y is [a, b, c, d], @merged is [_, c, d]
/// (the leading axes merged) and @out is [a, b, d, c].
fn swaps_last_two(ctx: &MatchContext, args: &[Arg]) -> Result<(), String> {
    let (y, merged, out) = (var(ctx, args, 0)?, var(ctx, args, 1)?, var(ctx, args, 2)?);
    let (y_dims, merged_dims, out_dims) = (dims(ctx, y)?, dims(ctx, merged)?, dims(ctx, out)?);
    let known = |d: &Dim| !matches!(d, Dim::Unknown);
    let positive = |d: &Dim| matches!(d, Dim::Fixed(v) if *v > 0);
    match (y_dims, merged_dims, out_dims) {
        ([a, b, c, d], [_, mc, md], [oa, ob, od, oc])
            if [a, b, c, d].iter().all(|x| known(x)) && mc == c && md == d && oa == a && ob == b && oc == c && od == d =>
        {
            Ok(())
        }
        // the leading dims unknown (a batch of windows, read off a Shape at
        // run time): with b, c, d fixed, a Reshape keeps the element count, so
        // oa * b * d * c = a * b * c * d forces oa = a
        ([_, b, c, d], [_, mc, md], [_, ob, od, oc]) if [b, c, d].iter().all(|x| positive(x)) && mc == c && md == d && ob == b && oc == c && od == d => Ok(()),
        _ => Err(format!("'{y}' {y_dims:?} -> '{merged}' {merged_dims:?} -> '{out}' {out_dims:?} is not a swap of the last two axes")),
    }
}
