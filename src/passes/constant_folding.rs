//! `FoldConstants`: turns `Constant` nodes into initializers, and evaluates in
//! tract the nodes whose inputs are all constant, replacing each by its value.
//!
//! What it rewrites, walking the nodes in topological order:
//! - `c = Constant {value=...}` becomes initializer `c` (any of the `value*`
//!   attributes; `sparse_value` is left alone);
//! - a node whose inputs are all constants (initializers that are not graph inputs,
//!   `Constant` values, or values folded earlier in the same walk, so a whole chain
//!   folds in one round) is run alone in tract, as a model of that one node; its
//!   outputs become initializers and the constants only it read are dropped.
//!
//! Nothing happens in a model of IR version < 4, where initializers must be graph
//! inputs too (then they are no constants).
//!
//! Conditions for a fold:
//! - a default-domain op (tract knows few others, and they are what fusions make),
//!   without subgraphs, not random (`RANDOM_OPS`), with at least one input;
//! - no output is a graph output (a model whose output is a constant is left as it is);
//! - tract evaluates it (an error or a panic means "leave it", never a failure),
//!   giving the element type and shape shape inference expects for each output;
//! - every written output is at most `max_bytes`, and together they are no bigger
//!   than the constants the fold frees, or at most `SMALL_OUTPUT_BYTES`: folding
//!   never bloats the file (a `ConstantOfShape` or `Expand` making a large tensor
//!   from a small shape stays). Sizes are checked from inferred types before tract
//!   runs, and again on its result.
//!
//! Why it is exact: the node would compute the same function of the same values
//! at run time. Data movement (Transpose, Gather, Concat, ...) and integer
//! arithmetic give the very same bits anywhere; for float math (Sqrt, Exp, Div)
//! the written value is tract's, which another runtime may round differently in
//! the last place.
//!
//! ```text
//! k = Constant {value=float32[16]}
//! t = Transpose(w) {perm=[1,0]}          init t: float32[4,16] (w transposed)
//! s = Mul(k, b)                    ->    init s: float32[16]
//! y = Add(MatMul(x, t), s)               y = Add(MatMul(x, t), s)
//! ```

use super::{Pass, PassError};
use crate::ir::{
    infer_types, AttrValue, DataType, Dim, Extras, Graph, Model, Node, NodeId, Patch, Tensor, TensorData, TypeMap, TypedValues, ValueInfo, ValueType,
};
use crate::verify;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use tract_onnx::prelude::{f16, Datum, DatumType, Tensor as TractTensor};

pub struct FoldConstants {
    /// The largest output, in bytes, a fold may write.
    pub max_bytes: u64,
}

impl Default for FoldConstants {
    fn default() -> Self {
        FoldConstants { max_bytes: 1 << 20 }
    }
}

/// Outputs up to this size are written even when they free less: the node they
/// replace (op type, names, attributes) takes about as many bytes of the file.
const SMALL_OUTPUT_BYTES: u64 = 64;

/// Never folded: their outputs are random draws. Dropout draws a mask when
/// training (in inference it is `RemoveNoOps`' business).
const RANDOM_OPS: &[&str] = &["RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"];

impl Pass for FoldConstants {
    fn name(&self) -> &'static str {
        "fold-constants"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        if !super::initializers_may_be_added(model) {
            return Ok(Vec::new());
        }
        let graph = &model.graph;
        let types = infer_types(model);
        let order = graph.node_ids().map_err(|cycle| PassError::cycle(self.name(), cycle))?;
        let mut constants = Constants::of(graph);
        let mut patches = Vec::new();
        for id in order {
            let Some(node) = graph.node(id) else { continue };
            if node.is_onnx("Constant") {
                let Some(value) = constant_value(node) else { continue };
                if !graph.is_graph_output(&value.name) {
                    let mut patch = Patch::new("constant-node");
                    patch.remove_node(id).add_initializer(value.clone());
                    patches.push(patch);
                }
                constants.folded.insert(value.name.clone(), value);
                continue;
            }
            if let Some(patch) = self.fold(model, id, node, &types, &mut constants) {
                patches.push(patch);
            }
        }
        Ok(patches)
    }
}

impl FoldConstants {
    /// The patch replacing `node` by its value, if it folds (see the module docs).
    fn fold(&self, model: &Model, id: NodeId, node: &Node, types: &TypeMap, constants: &mut Constants) -> Option<Patch> {
        let graph = &model.graph;
        if !is_foldable_op(node) {
            return None;
        }
        let mut inputs: Vec<&str> = Vec::new();
        for name in node.inputs.iter().filter(|n| !n.is_empty()) {
            if !inputs.contains(&name.as_str()) {
                inputs.push(name);
            }
        }
        let values: Vec<&Tensor> = inputs.iter().map(|name| constants.get(name)).collect::<Option<_>>()?;
        let outputs: Vec<&str> = node.outputs.iter().map(String::as_str).filter(|n| !n.is_empty()).collect();
        if values.is_empty() || outputs.iter().any(|o| graph.is_graph_output(o)) {
            return None;
        }
        let freed: Vec<(&str, u64)> =
            inputs.iter().zip(&values).filter(|(name, _)| only_read_by(graph, name, id)).map(|(name, value)| (*name, value.byte_len())).collect();
        let freed_bytes: u64 = freed.iter().map(|(_, bytes)| bytes).sum();
        let read: Vec<&str> = outputs.iter().copied().filter(|o| !graph.uses(o).is_empty()).collect();
        // A node nothing reads is dead code, not a constant to write.
        if read.is_empty() {
            return None;
        }

        let predicted: Option<Vec<u64>> = read.iter().map(|o| inferred_byte_len(o, types)).collect();
        if predicted.is_some_and(|sizes| !self.worth_writing(&sizes, freed_bytes)) {
            return None;
        }
        let mut results = evaluate(model, node, &values, types)?;
        results.retain(|t| read.contains(&t.name.as_str()));
        let sizes: Vec<u64> = results.iter().map(Tensor::byte_len).collect();
        if !self.worth_writing(&sizes, freed_bytes) {
            return None;
        }

        let mut patch = Patch::new("constant-inputs");
        patch.remove_node(id);
        for (name, _) in &freed {
            patch.remove_initializer(*name);
        }
        for value in results {
            patch.add_initializer(value.clone());
            constants.folded.insert(value.name.clone(), value);
        }
        Some(patch)
    }

    fn worth_writing(&self, sizes: &[u64], freed_bytes: u64) -> bool {
        let total: u64 = sizes.iter().sum();
        sizes.iter().all(|&s| s <= self.max_bytes) && (total <= freed_bytes || total <= SMALL_OUTPUT_BYTES)
    }
}

/// The constant tensors a fold may read.
struct Constants<'a> {
    /// Initializers that are not graph inputs (those are defaults a caller may override).
    initializers: HashMap<&'a str, &'a Tensor>,
    /// `Constant` values and the outputs folded so far in this round.
    folded: HashMap<String, Tensor>,
}

impl<'a> Constants<'a> {
    fn of(graph: &'a Graph) -> Constants<'a> {
        let inputs: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
        let initializers = graph.initializers.iter().filter(|t| !inputs.contains(t.name.as_str())).map(|t| (t.name.as_str(), t)).collect();
        Constants { initializers, folded: HashMap::new() }
    }

    fn get(&self, name: &str) -> Option<&Tensor> {
        self.folded.get(name).or_else(|| self.initializers.get(name).copied())
    }
}

fn is_foldable_op(node: &Node) -> bool {
    (node.domain.is_empty() || node.domain == "ai.onnx")
        && !RANDOM_OPS.contains(&node.op_type.as_str())
        && node.attributes.iter().all(|a| a.value.subgraphs().is_empty())
}

/// Only `node` reads `tensor` (so folding it frees the tensor), and it is no graph output.
fn only_read_by(graph: &Graph, tensor: &str, node: NodeId) -> bool {
    !graph.is_graph_output(tensor) && graph.uses(tensor).iter().all(|u| u.node == node)
}

/// Bytes of a tensor whose element type and dims inference knows.
fn inferred_byte_len(name: &str, types: &TypeMap) -> Option<u64> {
    let dtype = types.elem_type(name)?;
    let count = types.shape(name)?.iter().try_fold(1u64, |n, d| n.checked_mul(u64::try_from(d.fixed()?).ok()?))?;
    dtype.raw_byte_len(count)
}

/// Runs `node` alone in tract on `inputs`; its outputs (the non-omitted ones, in
/// order), each with the element type and shape inference gives it. `None` when
/// tract fails or disagrees with inference.
fn evaluate(model: &Model, node: &Node, inputs: &[&Tensor], types: &TypeMap) -> Option<Vec<Tensor>> {
    let mut graph = Graph::new("constant_folding");
    graph.initializers = inputs.iter().map(|t| (*t).clone()).collect();
    for output in node.outputs.iter().filter(|n| !n.is_empty()) {
        let ty = types.get(output).cloned().map(ValueType::Tensor);
        graph.outputs.push(ValueInfo { name: output.clone(), ty, extras: Extras::default() });
    }
    graph.add_node(node.clone());
    let mut single = Model::new(graph, 0);
    single.ir_version = model.ir_version;
    single.opset_imports = model.opset_imports.clone();
    let results = verify::run(&single, "constant folding", &[]).ok()?;
    results
        .iter()
        .map(|(name, value)| {
            let tensor = from_tract(name, value)?;
            let agrees = types.elem_type(name) == Some(tensor.dtype) && types.shape(name).is_none_or(|dims| shape_fits(dims, &tensor.dims));
            agrees.then_some(tensor)
        })
        .collect()
}

/// `actual` has the inferred rank and every dim inference knows.
fn shape_fits(inferred: &[Dim], actual: &[i64]) -> bool {
    inferred.len() == actual.len() && inferred.iter().zip(actual).all(|(d, &a)| d.fixed().is_none_or(|v| v == a))
}

/// A tract value as an IR tensor; `None` for what ONNX numbers cannot hold
/// (strings, quantized types, symbolic dims).
fn from_tract(name: &str, value: &TractTensor) -> Option<Tensor> {
    use DataType::*;
    let dims: Vec<i64> = value.shape().iter().map(|&d| i64::try_from(d).ok()).collect::<Option<_>>()?;
    let (dtype, raw) = match value.datum_type() {
        DatumType::F32 => (Float, little_endian(value, f32::to_le_bytes)?),
        DatumType::F64 => (Double, little_endian(value, f64::to_le_bytes)?),
        DatumType::F16 => (Float16, little_endian(value, f16::to_le_bytes)?),
        DatumType::I64 => (Int64, little_endian(value, i64::to_le_bytes)?),
        DatumType::I32 => (Int32, little_endian(value, i32::to_le_bytes)?),
        DatumType::I16 => (Int16, little_endian(value, i16::to_le_bytes)?),
        DatumType::I8 => (Int8, little_endian(value, i8::to_le_bytes)?),
        DatumType::U64 => (Uint64, little_endian(value, u64::to_le_bytes)?),
        DatumType::U32 => (Uint32, little_endian(value, u32::to_le_bytes)?),
        DatumType::U16 => (Uint16, little_endian(value, u16::to_le_bytes)?),
        DatumType::U8 => (Uint8, little_endian(value, u8::to_le_bytes)?),
        DatumType::Bool => (Bool, little_endian(value, |b: bool| [u8::from(b)])?),
        // tract computes shapes as TDim; a known one is an int64 to ONNX.
        DatumType::TDim => (Int64, little_endian(value.cast_to::<i64>().ok()?.as_ref(), i64::to_le_bytes)?),
        _ => return None,
    };
    Some(Tensor::from_raw(name, dtype, dims, Bytes::from(raw)))
}

fn little_endian<T: Datum + Copy, const N: usize>(value: &TractTensor, bytes: fn(T) -> [u8; N]) -> Option<Vec<u8>> {
    Some(value.to_plain_array_view::<T>().ok()?.iter().flat_map(|&v| bytes(v)).collect())
}

/// A `Constant` node's value, as a tensor named after its output.
fn constant_value(node: &Node) -> Option<Tensor> {
    let output = node.outputs.first().filter(|n| !n.is_empty())?;
    let [attr] = node.attributes.as_slice() else { return None };
    let raw = |dtype, dims, bytes: Vec<u8>| Tensor::from_raw(output, dtype, dims, Bytes::from(bytes));
    let strings = |dims, values: Vec<Bytes>| Tensor {
        name: output.clone(),
        dtype: DataType::String,
        dims,
        data: TensorData::Typed(TypedValues::Strings(values)),
        stored_externally: false,
        extras: Extras::default(),
    };
    let len = |n: usize| vec![n as i64];
    Some(match (attr.name.as_str(), &attr.value) {
        ("value", AttrValue::Tensor(t)) => Tensor { name: output.clone(), ..t.clone() },
        ("value_int", AttrValue::Int(v)) => raw(DataType::Int64, vec![], v.to_le_bytes().to_vec()),
        ("value_ints", AttrValue::Ints(v)) => Tensor::from_i64(output, len(v.len()), v),
        ("value_float", AttrValue::Float(v)) => raw(DataType::Float, vec![], v.to_le_bytes().to_vec()),
        ("value_floats", AttrValue::Floats(v)) => raw(DataType::Float, len(v.len()), v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ("value_string", AttrValue::String(s)) => strings(vec![], vec![s.clone()]),
        ("value_strings", AttrValue::Strings(v)) => strings(len(v.len()), v.clone()),
        // sparse_value, or an attribute reference inside a function
        _ => return None,
    })
}
