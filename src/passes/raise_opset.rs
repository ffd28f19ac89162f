//! `raise-opset`: converts the default-domain (`ai.onnx`) ops of a model from its
//! opset to a higher one, at most [`MAX_OPSET`], exactly.
//!
//! What it rewrites, between the model's opset `from` (17 or later) and `to`:
//! - Reduce* other than ReduceSum (axes became an input at 18): an `axes`
//!   attribute becomes an int64 initializer `{output}/axes` read as input 1; an
//!   absent or empty one stays absent (both mean "every axis" before and after,
//!   `noop_with_empty_axes` defaulting to 0);
//! - Split without a `split` input (18 made `split` or `num_outputs` mandatory):
//!   gains `num_outputs` = its number of outputs;
//! - every other op: nothing, when [`OP_HISTORY`] says each schema change in
//!   `(from, to]` is one that keeps the meaning of every node valid before it.
//!
//! (tract 0.23.9 reads an explicitly empty `axes` attribute as "no axes", the
//! input unchanged, where ONNX's reference implementation, its shape inference
//! and ONNX Runtime 1.32 reduce over every axis, measured: such a model's raise
//! fails the tract check, loudly, though ORT agrees with it.)
//!
//! The driver then sets the model's default-domain import to `to` (through
//! [`Pass::default_opset`]: a patch edits the graph only), after the conversion
//! patch, so no pass sees nodes of one opset under the import of another. The IR
//! version is left as it is: onnx.checker and ONNX Runtime 1.32 accept opset 23
//! at IR 8 (measured on `fixtures/bert.ts.onnx`).
//!
//! Conditions (the pass fails, naming what and why, rather than guess):
//! - every default-domain node's op is in [`OP_HISTORY`], and exists at `from`
//!   (a default-domain `Gelu` in an opset-17 model is not ONNX's Gelu-20);
//! - `from >= 17` (the table records changes after 17) and `from <= to <= 23`;
//! - no model-local functions (their bodies import the default domain too, and
//!   must agree with the model). Ops with subgraphs (If, Loop, Scan) are not in
//!   the table, so subgraphs never need converting.
//!
//! Why it is exact: the table records, for each op, every version in 18..=23 at
//! which ONNX gave it a new schema and what the change was, from the ONNX
//! changelog (onnx 1.23's `onnx.defs` schemas; `tests/scripts/check_opset_table.py`
//! checks the versions against them). New element types, and new optional
//! inputs, attributes or modes whose absence keeps the old behaviour, leave every
//! existing node meaning what it meant; the two other changes are converted as
//! above. Split-18 with `num_outputs` gives a smaller last chunk when the axis is
//! not divisible, where Split-13 without `split` is undefined: equal wherever the
//! old node was defined.
//!
//! ```text
//! opset 17                                         opset 23
//! m = ReduceMean(x) {axes=[-1], keepdims=1}   ->   init m/axes: int64[1] {-1}
//!                                                  m = ReduceMean(x, m/axes) {keepdims=1}
//! a, b = Split(y) {axis=2}                    ->   a, b = Split(y) {axis=2, num_outputs=2}
//! ```

use super::{Pass, PassError};
use crate::ir::{AttrValue, Attribute, Model, Node, Patch, Tensor};
use std::collections::BTreeMap;

/// The highest opset this pass converts to.
pub const MAX_OPSET: i64 = 23;

/// The lowest opset it converts from: [`OP_HISTORY`] records changes after it.
pub const MIN_SOURCE_OPSET: i64 = 17;

/// What an op's new schema at some opset changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// New element types only.
    Types,
    /// A new optional input, attribute or mode whose absence keeps the old
    /// behaviour (named here).
    Extended(&'static str),
    /// Reduce*-18: `axes` moved from an attribute to an optional input.
    AxesToInput,
    /// Split-18: without a `split` input, `num_outputs` must be given.
    SplitNumOutputs,
    /// The op first exists at this version.
    Introduced,
}

impl Change {
    /// Whether a node valid before the change means the same after it without
    /// being rewritten.
    fn keeps_meaning(self) -> bool {
        matches!(self, Change::Types | Change::Extended(_))
    }
}

use Change::*;

/// Every op `raise-opset` knows, with each version in 18..=23 at which its
/// schema changed (empty: unchanged since 17). Ops the fixtures and MiniLM use,
/// the other reductions, and the elementwise and shape ops transformers export.
#[rustfmt::skip]
pub const OP_HISTORY: &[(&str, &[(i64, Change)])] = &[
    ("Abs", &[]),
    ("Acos", &[(22, Types)]),
    ("Add", &[]),
    ("And", &[]),
    ("ArgMax", &[]),
    ("ArgMin", &[]),
    ("Asin", &[(22, Types)]),
    ("Atan", &[(22, Types)]),
    ("Attention", &[(23, Introduced)]),
    ("BatchNormalization", &[]),
    // saturate (default 1) only affects float 8 targets, types new at 19
    ("Cast", &[(19, Extended("saturate, for float 8 targets")), (21, Types), (23, Types)]),
    ("Ceil", &[]),
    ("Clip", &[]),
    ("Concat", &[]),
    ("Constant", &[(19, Types), (21, Types), (23, Types)]),
    ("ConstantOfShape", &[(20, Types), (21, Types), (23, Types)]),
    ("Conv", &[(22, Types)]),
    ("Cos", &[(22, Types)]),
    ("Cosh", &[(22, Types)]),
    ("CumSum", &[]),
    ("Div", &[]),
    ("Dropout", &[(22, Types)]),
    ("Einsum", &[]),
    ("Elu", &[(22, Types)]),
    ("Equal", &[(19, Types)]),
    ("Erf", &[]),
    ("Exp", &[]),
    ("Expand", &[]),
    ("Flatten", &[(21, Types), (23, Types)]),
    ("Floor", &[]),
    ("Gather", &[]),
    ("GatherElements", &[]),
    ("GatherND", &[]),
    ("Gelu", &[(20, Introduced)]),
    ("Gemm", &[]),
    ("Greater", &[]),
    ("GreaterOrEqual", &[]),
    ("HardSigmoid", &[(22, Types)]),
    ("Identity", &[(19, Types), (21, Types), (23, Types)]),
    ("InstanceNormalization", &[(22, Types)]),
    ("IsInf", &[(20, Types)]),
    ("IsNaN", &[(20, Types)]),
    ("LayerNormalization", &[]),
    ("LeakyRelu", &[]),
    ("Less", &[]),
    ("LessOrEqual", &[]),
    ("Log", &[]),
    ("LogSoftmax", &[]),
    ("MatMul", &[]),
    ("Max", &[]),
    ("Mean", &[]),
    ("Min", &[]),
    ("Mod", &[]),
    ("Mul", &[]),
    ("Neg", &[]),
    ("NonZero", &[]),
    ("Not", &[]),
    ("OneHot", &[]),
    ("Or", &[]),
    ("Pad", &[(18, Extended("optional axes input")), (19, Extended("wrap mode")), (21, Types), (23, Types)]),
    ("Pow", &[]),
    ("RMSNormalization", &[(23, Introduced)]),
    ("Range", &[]),
    ("Reciprocal", &[]),
    ("ReduceL1", &[(18, AxesToInput)]),
    ("ReduceL2", &[(18, AxesToInput)]),
    ("ReduceLogSum", &[(18, AxesToInput)]),
    ("ReduceLogSumExp", &[(18, AxesToInput)]),
    ("ReduceMax", &[(18, AxesToInput), (20, Types)]),
    ("ReduceMean", &[(18, AxesToInput)]),
    ("ReduceMin", &[(18, AxesToInput), (20, Types)]),
    ("ReduceProd", &[(18, AxesToInput)]),
    // axes became an input at 13
    ("ReduceSum", &[]),
    ("ReduceSumSquare", &[(18, AxesToInput)]),
    ("Relu", &[]),
    ("Reshape", &[(19, Types), (21, Types), (23, Types)]),
    ("RotaryEmbedding", &[(23, Introduced)]),
    ("Round", &[(22, Types)]),
    ("Shape", &[(19, Types), (21, Types), (23, Types)]),
    ("Sigmoid", &[]),
    ("Sign", &[]),
    ("Sin", &[(22, Types)]),
    ("Sinh", &[(22, Types)]),
    ("Size", &[(19, Types), (21, Types), (23, Types)]),
    ("Slice", &[]),
    ("Softmax", &[]),
    ("Softplus", &[(22, Types)]),
    ("Split", &[(18, SplitNumOutputs)]),
    ("Sqrt", &[]),
    ("Squeeze", &[(21, Types), (23, Types)]),
    ("Sub", &[]),
    ("Sum", &[]),
    ("Tan", &[(22, Types)]),
    ("Tanh", &[]),
    ("Tile", &[]),
    ("TopK", &[]),
    ("Transpose", &[(21, Types), (23, Types)]),
    ("Trilu", &[]),
    ("Unsqueeze", &[(21, Types), (23, Types)]),
    ("Where", &[]),
    ("Xor", &[]),
];

/// The recorded schema changes of `op` after opset 17, when the table knows it.
pub fn op_history(op: &str) -> Option<&'static [(i64, Change)]> {
    OP_HISTORY.iter().find(|(name, _)| *name == op).map(|(_, changes)| *changes)
}

/// The pass. See the module documentation.
pub struct RaiseOpset {
    pub to: i64,
}

/// Why a model cannot be raised.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RaiseError {
    #[error("opset {to} is beyond what raise-opset converts to (at most {MAX_OPSET})")]
    TargetTooNew { to: i64 },
    #[error("the model imports opset {from}; raise-opset converts from opset {MIN_SOURCE_OPSET} or later")]
    SourceTooOld { from: i64 },
    #[error("the model imports opset {from}, above {to}: raise-opset never lowers an opset")]
    WouldLower { from: i64, to: i64 },
    #[error("the model imports no default-domain (ai.onnx) opset")]
    NoDefaultOpset,
    #[error("the model has {count} model-local function(s), whose bodies import the default domain too; raise-opset does not convert them")]
    LocalFunctions { count: usize },
    #[error("cannot raise opset {from} to {to}: {}", .ops.join("; "))]
    Unconvertible { from: i64, to: i64, ops: Vec<String> },
}

impl RaiseOpset {
    /// The model's opset, once `to` is a version this pass can reach from it.
    fn source_opset(&self, model: &Model) -> Result<i64, RaiseError> {
        let from = model.opset("").ok_or(RaiseError::NoDefaultOpset)?;
        if self.to > MAX_OPSET {
            return Err(RaiseError::TargetTooNew { to: self.to });
        }
        if from > self.to {
            return Err(RaiseError::WouldLower { from, to: self.to });
        }
        if from < self.to && from < MIN_SOURCE_OPSET {
            return Err(RaiseError::SourceTooOld { from });
        }
        if from < self.to && !model.functions.is_empty() {
            return Err(RaiseError::LocalFunctions { count: model.functions.len() });
        }
        Ok(from)
    }

    /// The schema changes of `node`'s op in `(from, to]`, or why there is no
    /// knowing them (what follows "Op (node 'n') " in the refusal).
    fn changes(&self, node: &Node, from: i64) -> Result<Vec<Change>, String> {
        let op = &node.op_type;
        let history = op_history(op)
            .ok_or_else(|| format!("is not in raise-opset's table of ops whose meaning is known from opset {MIN_SOURCE_OPSET} to {MAX_OPSET}"))?;
        if let Some((introduced, _)) = history.iter().find(|(_, c)| *c == Introduced) {
            if *introduced > from {
                return Err(format!("is not an ONNX op at opset {from} (ONNX's {op} exists from opset {introduced})"));
            }
        }
        Ok(history.iter().filter(|(v, _)| *v > from && *v <= self.to).map(|(_, c)| *c).collect())
    }
}

/// The ops a raise is refused for: one line per op, naming its first node.
#[derive(Default)]
struct Refusals(BTreeMap<String, (String, usize, String)>);

impl Refusals {
    fn add(&mut self, node: &Node, reason: String) {
        let entry = self.0.entry(node.op_type.clone()).or_insert_with(|| (node_label(node).to_string(), 0, reason));
        entry.1 += 1;
    }

    fn lines(self) -> Vec<String> {
        self.0
            .into_iter()
            .map(|(op, (first, count, reason))| match count {
                1 => format!("{op} (node '{first}') {reason}"),
                n => format!("{op} (node '{first}' and {} more) {reason}", n - 1),
            })
            .collect()
    }
}

impl Pass for RaiseOpset {
    fn name(&self) -> &'static str {
        "raise-opset"
    }

    /// One patch converting every node that needs it (a bisect never stops
    /// half-way through a raise), or none.
    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let failed = |e: RaiseError| PassError::Failed { pass: self.name().into(), message: e.to_string() };
        let from = self.source_opset(model).map_err(failed)?;
        if from == self.to {
            return Ok(Vec::new());
        }
        let mut refusals = Refusals::default();
        let mut patch = Patch::new(format!("opset {from} -> {}", self.to));
        for (id, node) in model.graph.nodes_with_ids() {
            if !(node.domain.is_empty() || node.domain == "ai.onnx") {
                continue;
            }
            let changes = match self.changes(node, from) {
                Ok(changes) => changes,
                Err(reason) => {
                    refusals.add(node, reason);
                    continue;
                }
            };
            let mut converted = node.clone();
            let converting = changes.into_iter().filter(|c| !c.keeps_meaning()).try_for_each(|change| match change {
                AxesToInput => axes_to_input(&mut converted, &mut patch),
                SplitNumOutputs => {
                    add_num_outputs(&mut converted);
                    Ok(())
                }
                Types | Extended(_) | Introduced => Ok(()),
            });
            if let Err(reason) = converting {
                refusals.add(node, reason);
                continue;
            }
            if converted != *node {
                patch.remove_node(id);
                patch.add_node(converted);
            }
        }
        if !refusals.0.is_empty() {
            return Err(failed(RaiseError::Unconvertible { from, to: self.to, ops: refusals.lines() }));
        }
        Ok(if patch.is_empty() { Vec::new() } else { vec![patch] })
    }

    /// `to`, once nothing is left to convert (a bisect that stopped before the
    /// conversion patch keeps the old import, which the graph still matches).
    fn default_opset(&self, model: &Model) -> Option<i64> {
        self.propose(model).is_ok_and(|patches| patches.is_empty()).then_some(self.to)
    }
}

fn node_label(node: &Node) -> &str {
    if node.name.is_empty() {
        node.outputs.first().map(String::as_str).unwrap_or_default()
    } else {
        &node.name
    }
}

/// Reduce*-13 -> -18: the `axes` attribute becomes input 1 (a new initializer
/// named after the node's output); an empty one is dropped (both mean every axis).
/// Without the attribute there is nothing to move (a node this pass converted
/// already is left alone: the driver proposes again until nothing changes).
fn axes_to_input(node: &mut Node, patch: &mut Patch) -> Result<(), String> {
    let Some(at) = node.attributes.iter().position(|a| a.name == "axes") else { return Ok(()) };
    if node.inputs.len() != 1 {
        return Err(format!("has an axes attribute and {} inputs, where {}-13 has one input", node.inputs.len(), node.op_type));
    }
    let AttrValue::Ints(axes) = node.attributes.remove(at).value else {
        return Err("has an axes attribute that is not a list of integers".into());
    };
    if !axes.is_empty() {
        let name = format!("{}/axes", node.outputs.first().map(String::as_str).unwrap_or(&node.name));
        patch.add_initializer(Tensor::from_i64(name.clone(), vec![axes.len() as i64], &axes));
        node.inputs.push(name);
    }
    Ok(())
}

/// Split-13 -> -18: without a `split` input, `num_outputs` = the outputs it has.
fn add_num_outputs(node: &mut Node) {
    let has_split = node.inputs.get(1).is_some_and(|s| !s.is_empty());
    if !has_split && node.attr("num_outputs").is_none() {
        let count = node.outputs.len() as i64;
        node.inputs.truncate(1);
        node.attributes.push(Attribute::new("num_outputs", AttrValue::Int(count)));
    }
}
