//! `RemoveNoOps`: removes nodes that pass their first input through unchanged,
//! pointing their readers at that input.
//!
//! The rules, one line each in `RULES`:
//! - `Identity(x)`;
//! - `Dropout(x)` in inference: no `training_mode` input or a constant false one
//!   (Dropout-12), `is_test` set (Dropout-1 and -6), and its mask unused;
//! - `Cast(x, to)` to the type `x` already has; `CastLike(x, t)` with `t` of that type;
//! - `Reshape(x, shape)` and `Expand(x, shape)` whose output has the input's shape,
//!   dim for dim, numbers or equal named symbols (types from `infer_types`);
//!   a `Reshape(x, [-1, d1, .., dn])` of an `x` whose dims after the first
//!   are those fixed `di` (its first is then `x`'s, by the element count);
//! - `Transpose(x)` with the identity permutation (or none, on a rank <= 1 tensor);
//! - `Slice(x, ...)` that takes every element of every sliced axis, in order;
//! - `Concat(x)` of one input.
//!
//! Why it is exact: each op copies its input's elements in the same order into a
//! tensor of the same type and shape. A Reshape or Expand whose output shape is
//! the input's moves no element; a Slice taking `[0:d:1]` of every sliced axis
//! takes all of them.
//!
//! Not removed: a no-op whose output is a graph output (see `propose`).
//!
//! ```text
//! a = Identity(x)
//! b = Transpose(a) {perm=[0,1]}    ->    y = Relu(x)
//! y = Relu(b)
//! ```

use super::{Pass, PassError};
use crate::ir::{infer_types, DataType, Dim, Graph, Model, Node, Patch, TypeMap};
use std::collections::HashMap;

pub struct RemoveNoOps;

/// What the rules may look at besides the node.
struct Facts<'a> {
    graph: &'a Graph,
    types: &'a TypeMap,
    /// The default domain's opset.
    opset: Option<i64>,
}

/// A no-op: the op it applies to, its name in reports, and the condition under
/// which the node passes input 0 through unchanged.
struct NoOpRule {
    op: &'static str,
    origin: &'static str,
    holds: fn(&Node, &Facts) -> bool,
}

#[rustfmt::skip]
const RULES: &[NoOpRule] = &[
    // Identity(x) -> x
    NoOpRule { op: "Identity", origin: "identity", holds: always },
    // Dropout(x) -> x when not training and the mask is unused
    NoOpRule { op: "Dropout", origin: "dropout-in-inference", holds: dropout_in_inference },
    // Cast(x: T, to=T) -> x
    NoOpRule { op: "Cast", origin: "cast-to-same-type", holds: cast_to_same_type },
    // CastLike(x: T, t: T) -> x
    NoOpRule { op: "CastLike", origin: "cast-to-same-type", holds: cast_like_same_type },
    // Reshape(x: [2,3], [2,3]) -> x
    NoOpRule { op: "Reshape", origin: "reshape-to-same-shape", holds: reshape_keeps_shape },
    // Expand(x: [2,3], [1,3]) -> x
    NoOpRule { op: "Expand", origin: "expand-to-same-shape", holds: keeps_shape },
    // Transpose(x, perm=[0,1,..]) -> x
    NoOpRule { op: "Transpose", origin: "identity-transpose", holds: identity_perm },
    // Slice(x: [d], starts=[0], ends=[d or more]) -> x
    NoOpRule { op: "Slice", origin: "slice-everything", holds: slices_everything },
    // Concat(x) -> x
    NoOpRule { op: "Concat", origin: "concat-of-one", holds: one_input },
    // Concat(x, e: [.., 0]) -> x: the rest empty along the axis (a partial
    // rotary's pass-through part when the rotary covers the whole head)
    NoOpRule { op: "Concat", origin: "concat-of-empty", holds: rest_empty },
];

impl Pass for RemoveNoOps {
    fn name(&self) -> &'static str {
        "remove-no-ops"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let graph = &model.graph;
        let types = infer_types(model);
        let facts = Facts { graph, types: &types, opset: model.opset("") };
        let order = graph.node_ids().map_err(|cycle| PassError::cycle(self.name(), cycle))?;
        // Output of a no-op removed this round -> the tensor its readers now read.
        let mut replaced_by: HashMap<&str, &str> = HashMap::new();
        let mut patches = Vec::new();
        for id in order {
            let Some(node) = graph.node(id) else { continue };
            let Some(rule) = RULES.iter().find(|r| node.is_onnx(r.op) && (r.holds)(node, &facts)) else { continue };
            let (Some(input), Some(output)) = (given(node.inputs.first()), given(node.outputs.first())) else {
                continue;
            };
            // Graph outputs keep their names (`replace_uses` leaves them alone): a
            // no-op producing one could only go by renaming its input, which may be
            // a graph input or read elsewhere under its own name. Left in place.
            if graph.is_graph_output(output) {
                continue;
            }
            // A chain of no-ops goes in one round: readers of each one read the
            // first tensor of the chain, which no patch of this round removes.
            let source = replaced_by.get(input).copied().unwrap_or(input);
            replaced_by.insert(output, source);
            let mut patch = Patch::new(rule.origin);
            patch.remove_node(id).replace_uses(output, source);
            patches.push(patch);
        }
        Ok(patches)
    }
}

/// A name that is present and not `""` (an omitted optional input or output).
fn given(name: Option<&String>) -> Option<&str> {
    name.map(String::as_str).filter(|n| !n.is_empty())
}

fn input(node: &Node, i: usize) -> Option<&str> {
    given(node.inputs.get(i))
}

fn always(_: &Node, _: &Facts) -> bool {
    true
}

fn dropout_in_inference(node: &Node, facts: &Facts) -> bool {
    let training = match (facts.opset, input(node, 2)) {
        // Dropout-1 and -6 train unless `is_test` is set.
        (Some(opset), _) if opset < 7 => node.attr_int("is_test").unwrap_or(0) == 0,
        // Dropout-12 trains when `training_mode` is true: only a known false will do.
        (_, Some(mode)) => facts.types.int_value(mode) != Some(vec![0]),
        // Dropout-7 and -10 have no flag: a runtime doing inference passes x through.
        _ => false,
    };
    let mask_read = given(node.outputs.get(1)).is_some_and(|mask| !facts.graph.uses(mask).is_empty() || facts.graph.is_graph_output(mask));
    !training && !mask_read
}

fn cast_to_same_type(node: &Node, facts: &Facts) -> bool {
    let to = node.attr_int("to").and_then(|code| i32::try_from(code).ok()).and_then(DataType::from_code);
    let from = input(node, 0).and_then(|x| facts.types.elem_type(x));
    to.is_some() && to == from
}

fn cast_like_same_type(node: &Node, facts: &Facts) -> bool {
    let dtype = |i| input(node, i).and_then(|x| facts.types.elem_type(x));
    dtype(0).is_some() && dtype(0) == dtype(1)
}

/// Output 0 has input 0's shape, and every dim of it is a known number.
/// Input and output shapes are equal dim for dim, each dim a number or a named
/// symbol (`infer_types` gives one symbol one runtime value, so equal symbols
/// are equal sizes); an unknown dim proves nothing.
fn keeps_shape(node: &Node, facts: &Facts) -> bool {
    let shape = |name: Option<&str>| name.and_then(|n| facts.types.shape(n));
    match (shape(input(node, 0)), shape(given(node.outputs.first()))) {
        (Some(a), Some(b)) => a == b && a.iter().all(|d| !matches!(d, Dim::Unknown)),
        _ => false,
    }
}

/// A Reshape keeps its input's shape when the shapes are known equal, or when
/// the target is `[-1, d1, .., dn]` (or `0` first, without allowzero) for an
/// input `[x, d1, .., dn]` with every `di` fixed and positive: the element
/// count leaves the first dim `x` whatever it is at run time (dynamo writes
/// such a Reshape after a batched product of windows or heads).
fn reshape_keeps_shape(node: &Node, facts: &Facts) -> bool {
    if keeps_shape(node, facts) {
        return true;
    }
    let (Some(dims), Some(target)) = (input(node, 0).and_then(|x| facts.types.shape(x)), input(node, 1).and_then(|t| facts.types.int_value(t))) else {
        return false;
    };
    let allowzero = node.attr_int("allowzero") == Some(1);
    match (dims.split_first(), target.split_first()) {
        (Some((_, rest)), Some((&first, target_rest))) => {
            (first == -1 || (first == 0 && !allowzero))
                && rest.len() == target_rest.len()
                && rest.iter().zip(target_rest).all(|(d, &t)| matches!(d, Dim::Fixed(v) if *v > 0 && *v == t))
        }
        _ => false,
    }
}

fn identity_perm(node: &Node, facts: &Facts) -> bool {
    match node.attr_ints("perm") {
        Some(perm) => perm.iter().enumerate().all(|(i, &p)| i64::try_from(i) == Ok(p)),
        // Without `perm` the axes are reversed, which changes nothing below rank 2.
        None => input(node, 0).and_then(|x| facts.types.rank(x)).is_some_and(|rank| rank <= 1),
    }
}

fn slices_everything(node: &Node, facts: &Facts) -> bool {
    slice_takes_everything(node, facts).unwrap_or(false)
}

/// `None` when a parameter or a sliced dim is not known.
fn slice_takes_everything(node: &Node, facts: &Facts) -> Option<bool> {
    let dims = facts.types.shape(input(node, 0)?)?;
    let value = |i: usize| facts.types.int_value(input(node, i)?);
    let optional = |i: usize| if input(node, i).is_some() { value(i).map(Some) } else { Some(None) };
    let (starts, ends, axes, steps) = match node.attr_ints("starts") {
        // Slice-1 took its parameters as attributes.
        Some(starts) => {
            let axes = node.attr_ints("axes").map(<[i64]>::to_vec);
            (starts.to_vec(), node.attr_ints("ends")?.to_vec(), axes, None)
        }
        None => {
            // an end that is the sliced dim itself, as a symbol (Slice(x, 0,
            // Shape(y)[i]) with y's dim i known equal to x's): the whole axis
            if let Some(whole) = slice_to_symbolic_dim(node, facts, dims) {
                return Some(whole);
            }
            (value(1)?, value(2)?, optional(3)?, optional(4)?)
        }
    };
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return None;
    }
    let rank = i64::try_from(dims.len()).ok()?;
    for k in 0..starts.len() {
        let axis = if axes[k] < 0 { axes[k] + rank } else { axes[k] };
        let dim = dims.get(usize::try_from(axis).ok()?)?;
        if !takes_whole_axis(dim, starts[k], ends[k], steps[k]) {
            return Some(false);
        }
    }
    Some(true)
}

/// Slice-10+ of one axis from 0 with step 1 whose end is a symbolic value equal
/// to the sliced dim (the same symbol or expression: `past + sequence`); `None`
/// when that is not the form.
fn slice_to_symbolic_dim(node: &Node, facts: &Facts, dims: &[Dim]) -> Option<bool> {
    let value = |i: usize| facts.types.value(input(node, i)?);
    let (starts, ends) = (facts.types.int_value(input(node, 1)?)?, value(2)?);
    let [Dim::Symbol(end)] = ends else { return None };
    let axes = match input(node, 3) {
        Some(a) => facts.types.int_value(a)?,
        None => vec![0],
    };
    let steps = match input(node, 4) {
        Some(s) => facts.types.int_value(s)?,
        None => vec![1],
    };
    let rank = i64::try_from(dims.len()).ok()?;
    match (starts.as_slice(), axes.as_slice(), steps.as_slice()) {
        ([0], [axis], [1]) => {
            let axis = if *axis < 0 { axis + rank } else { *axis };
            let dim = dims.get(usize::try_from(axis).ok()?)?;
            Some(matches!(dim, Dim::Symbol(d) if d == end))
        }
        _ => None,
    }
}

/// `[start:end:step]` takes every element of an axis of size `dim`, in order
/// (start and end clamped as Slice-10 does).
fn takes_whole_axis(dim: &Dim, start: i64, end: i64, step: i64) -> bool {
    if step != 1 {
        return false;
    }
    match dim {
        Dim::Fixed(d) => {
            let clamp = |v: i64| (if v < 0 { v.saturating_add(*d) } else { v }).clamp(0, *d);
            clamp(start) == 0 && clamp(end) == *d
        }
        // Exporters write "to the end" as a huge end (i64::MAX, i32::MAX); the same
        // bet as shape inference makes: no real dim is that big.
        _ => start == 0 && end >= i64::from(i32::MAX),
    }
}

/// Every input after the first has a fixed 0 on the concatenation axis, so
/// the output is the first input (same shape: Concat adds the axis lengths).
fn rest_empty(node: &Node, facts: &Facts) -> bool {
    let Some(rank) = input(node, 0).and_then(|x| facts.types.rank(x)) else { return false };
    let axis = node.attr_int("axis").unwrap_or(0);
    let Some(axis) = usize::try_from(if axis < 0 { axis + rank as i64 } else { axis }).ok().filter(|&a| a < rank) else { return false };
    let rest: Vec<&String> = node.inputs.iter().skip(1).filter(|n| !n.is_empty()).collect();
    !rest.is_empty() && rest.iter().all(|t| facts.types.shape(t).and_then(|d| d.get(axis)) == Some(&Dim::Fixed(0)))
}

fn one_input(node: &Node, _: &Facts) -> bool {
    node.inputs.iter().filter(|n| !n.is_empty()).count() == 1
}
