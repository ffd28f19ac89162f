//! `convert-to-float16`: float16 weights, and (scope `WeightsAndCompute`)
//! float16 computation, with the model's float32 inputs and outputs kept.
//!
//! What it rewrites, in one patch (the element types of a graph must agree
//! everywhere at once, so there is no smaller step that leaves a valid model):
//! - every float32 initializer of more than one element (a weight), and every
//!   one a float16 node reads, becomes float16 under the same name; values
//!   beyond +-65504 (float16's largest finite value) are clamped to it, and
//!   every clamp is reported with the tensor's name and the count, as are
//!   nonzero values below float16's smallest subnormal (2^-24 = 5.96e-8),
//!   which become 0. Scalars only float32 nodes read stay float32: they are
//!   constants of the computation (sqrt 2, 1/sqrt(d), a mask fill), not
//!   weights, and weigh nothing;
//! - scope `WeightsAndCompute`: every node whose op is in [`FLOAT16_OPS`] (all
//!   its float inputs and outputs share one type parameter in the op's schema,
//!   so all may become float16 together), is not in [`RANGE_SENSITIVE_OPS`],
//!   asks for float32 statistics if it is a normalization (`stash_type`),
//!   and has no input or output of unknown type, computes in float16: its
//!   float32 inputs and outputs become float16. A `Cast(to=FLOAT)` whose every
//!   reader computes in float16 becomes `Cast(to=FLOAT16)`. Everything else
//!   (integer and shape subgraphs, the range-sensitive ops, ops of mixed or
//!   unknown typing, nodes named in `keep_float32`) stays float32;
//! - a `Cast` is inserted wherever a tensor is read in the other type (one per
//!   tensor and type, shared by its readers): graph inputs stay float32 and are
//!   Cast to float16 for float16 readers; a float16 graph output is computed
//!   as `NAME/float16` and Cast back to float32 under its own name; a float16
//!   weight read by a float32 node is Cast to `NAME/float32` (scope `Weights`:
//!   every weight, a runtime folds these Casts at load);
//! - `value_info` entries of tensors that became float16 are dropped (they
//!   would state float32).
//!
//! `Cast`, `Shape` and `Size` read any type and get no Cast in front.
//!
//! The math. float16 keeps 11 significant bits: a value `w` in float16's
//! normal range (`6.1e-5 <= |w| <= 65504`) is stored as `w (1 + e)` with
//! `|e| <= 2^-11 = 4.9e-4`, a smaller one with an absolute error of at most
//! `2^-25`. A product `y = sum_k x_k w_k` over float16 weights so moves by at
//! most `2^-11 sum_k |x_k w_k|`, about `2^-11 |y| / sqrt(K)`-ish for rounding
//! errors of random sign: scope `Weights` (float32 compute) loses nothing
//! else. Scope `WeightsAndCompute` also rounds every intermediate to 11 bits
//! (relative error `2^-11` per op, compounding over the layers); sums stay
//! exact enough where kernels accumulate in float32 (ORT's CUDA and TensorRT
//! MatMuls do, and ORT's CPU provider computes float16 nodes in float32
//! behind Casts, below). The output is rounded to float16 before its Cast
//! back, so no output is closer than `2^-11` relative. Both need the values to
//! stay within +-65504, which is why the range-sensitive ops stay float32.
//!
//! The block list [`RANGE_SENSITIVE_OPS`] is the float32 list of PyTorch's
//! autocast (the AMP op reference, "CUDA ops that can autocast to float32":
//! softmax, log_softmax, group_norm, pow, exp, log, reciprocal, sum, cumsum,
//! prod, norm), in ONNX terms, with ORT's own float16 converter's numeric
//! entries (`Range`, `CumSum`: onnxruntime/python/tools/transformers/float16.py,
//! `DEFAULT_OP_BLOCK_LIST`): a sum of squares, an `exp` beyond 11.1 or a
//! reciprocal below 1.5e-5 overflows float16, and a mean of many float16
//! values loses its low bits. autocast's layer_norm is not on it: ONNX's
//! LayerNormalization computes its statistics in float32 (`stash_type`), as
//! ORT's fused norms do (see `statistics_in_float32`), so they run in float16
//! unless a node asks for other statistics.
//!
//! Targets (chosen by the caller): ORT 1.32's CPU provider on x86-64 has
//! float16 kernels for data movement, `Max`, `Min`, `Clip` and the layer
//! norms only; for every other op (MatMul, Add, Erf, Softmax, Attention, ...)
//! it inserts Casts to float32 and back around the node at session creation
//! (InsertCastTransformer; measured by `tests/scripts/ort_float16_kernels.py`,
//! which prints, per op, whether ORT's optimized model runs it natively or
//! between Casts). So for ORT on CPU, float16 compute is float32 compute with
//! extra conversions: `onnxopt quantize --mode fp16 --target ort` uses scope
//! `Weights` (half the file, float32 speed and accuracy); `portable` and
//! `tensorrt` use `WeightsAndCompute` (for GPUs and TensorRT; ORT's CPU
//! provider runs it too, through its Casts).
//!
//! ```text
//! graph (x: float32) -> (y: float32)          graph (x: float32) -> (y: float32)
//!   init w: float32[4,8]                        init w: float16[4,8]
//!   init b: float32[8]                          init b: float16[8]
//!   h = MatMul(x, w)                  ->        x/float16 = Cast(x) {to=FLOAT16}
//!   a = Add(h, b)      # WeightsAndCompute      h = MatMul(x/float16, w)
//!   y = Softmax(a)                              a = Add(h, b)
//!                                               a/float32 = Cast(a) {to=FLOAT}
//!                                               y = Softmax(a/float32)
//!
//!   h = MatMul(x, w)                  ->        w/float32 = Cast(w) {to=FLOAT}
//!        # Weights                              h = MatMul(x, w/float32)
//! ```

use super::{Pass, PassError};
use crate::ir::{infer_types, AttrValue, DataType, Graph, Model, Node, NodeId, Patch, Tensor, TypeMap};
use bytes::Bytes;
use half::f16;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

/// What becomes float16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Float16Scope {
    /// Weights stored in float16 and Cast to float32 where read: half the
    /// file, float32 computation (ONNX Runtime on CPU).
    Weights,
    /// Weights and computation in float16, except the range-sensitive ops
    /// (GPUs, TensorRT).
    WeightsAndCompute,
}

/// Ops whose float inputs and outputs all share one type parameter `T` in
/// their schema (ONNX's operators.md; com.microsoft's ContribOperators.md),
/// so that all of them may become float16 at once. Qualified names.
pub const FLOAT16_OPS: &[&str] = &[
    // elementwise
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "Abs",
    "Sign",
    "Floor",
    "Ceil",
    "Round",
    "Relu",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Celu",
    "PRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Erf",
    "Gelu",
    "Sqrt",
    "Max",
    "Min",
    "Sum",
    "Mean",
    "Clip",
    "Where",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "IsNaN",
    "IsInf",
    // products
    "MatMul",
    "Gemm",
    "Einsum",
    // data movement
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Concat",
    "Split",
    "Slice",
    "Gather",
    "GatherElements",
    "GatherND",
    "Expand",
    "Tile",
    "Pad",
    "Identity",
    "Trilu",
    "ScatterND",
    "ScatterElements",
    // reductions that only pick a value
    "ReduceMax",
    "ReduceMin",
    // normalizations whose mean and variance are float32 whatever T is (see
    // `statistics_in_float32`)
    "LayerNormalization",
    "RMSNormalization",
    "com.microsoft.SkipLayerNormalization",
    "com.microsoft.SimplifiedLayerNormalization",
    "com.microsoft.SkipSimplifiedLayerNormalization",
    "com.microsoft.EmbedLayerNormalization",
    // ONNX Runtime's fused ops (their CUDA kernels run softmax in float32 themselves)
    "com.microsoft.Attention",
    "com.microsoft.MultiHeadAttention",
    "com.microsoft.BiasGelu",
    "com.microsoft.Gelu",
    "com.microsoft.FastGelu",
    "com.microsoft.QuickGelu",
    "com.microsoft.BiasAdd",
    "com.microsoft.RotaryEmbedding",
    // query, key, value, the caches, cos/sin and attention_bias are one T;
    // seqlens_k and total_sequence_length int32 (ORT's CUDA kernel is float16
    // or bfloat16 only: a float32 one runs on the CPU)
    "com.microsoft.GroupQueryAttention",
    // A, scales, bias and the output are one T1; the packed weights uint8
    "com.microsoft.MatMulNBits",
];

/// Ops kept in float32 although their typing would allow float16: their
/// results leave float16's range or lose its precision (see the module doc
/// for the sources).
pub const RANGE_SENSITIVE_OPS: &[&str] = &[
    "Softmax",
    "LogSoftmax",
    "GroupNormalization",
    "InstanceNormalization",
    "Exp",
    "Log",
    "Pow",
    "Reciprocal",
    "ReduceSum",
    "ReduceMean",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceProd",
    "CumSum",
    "Range",
];

/// Ops that read an input of any type: they read a tensor as it is stored.
const READS_ANY_TYPE: &[&str] = &["Cast", "Shape", "Size"];

/// The element bound `onnxopt quantize --mode fp16` checks by default,
/// `|a - b| <= CHECK_ATOL + CHECK_RTOL |a|`, with the cosine. A MiniLM output
/// element is O(1): float16's `2^-11` relative rounding, compounded over six
/// layers, gave max abs 3.0e-3 (scope `Weights`) and 6.4e-3
/// (`WeightsAndCompute`) on all-MiniLM-L6-v2 in tract at batch 2, seq 16
/// (the check's inputs), and up to 9.9e-3 at batch 4, seq 128: 2e-2 leaves
/// room for longer inputs. `onnxopt verify IN OUT --atol 2e-2 --rtol 1e-2`
/// re-checks it.
pub const CHECK_ATOL: f32 = 2e-2;
pub const CHECK_RTOL: f32 = 1e-2;

/// float16's largest finite value.
const FLOAT16_MAX: f32 = 65504.0;

/// The pass. See the module documentation.
pub struct ConvertToFloat16 {
    pub scope: Float16Scope,
    /// Node names (or, unnamed, first outputs) to keep in float32.
    pub keep_float32: HashSet<String>,
    notes: Mutex<Vec<String>>,
}

impl ConvertToFloat16 {
    pub fn new(scope: Float16Scope, keep_float32: HashSet<String>) -> ConvertToFloat16 {
        ConvertToFloat16 { scope, keep_float32, notes: Mutex::new(Vec::new()) }
    }

    fn note(&self, note: String) {
        if let Ok(mut notes) = self.notes.lock() {
            notes.push(note);
        }
    }

    /// `node` computes in float16 (scope `WeightsAndCompute` only), before Casts
    /// are considered.
    fn computes_in_float16(&self, node: &Node, types: &TypeMap) -> bool {
        let op = node.qualified_op();
        let name = node.name_or_output();
        let tensors = || node.inputs.iter().chain(&node.outputs).filter(|t| !t.is_empty());
        self.scope == Float16Scope::WeightsAndCompute
            && FLOAT16_OPS.contains(&op.as_str())
            && !RANGE_SENSITIVE_OPS.contains(&op.as_str())
            && !self.keep_float32.contains(name)
            && statistics_in_float32(node)
            && tensors().all(|t| types.elem_type(t).is_some())
            && tensors().any(|t| types.elem_type(t) == Some(DataType::Float))
    }
}

impl Pass for ConvertToFloat16 {
    fn name(&self) -> &'static str {
        "convert-to-float16"
    }

    fn take_notes(&self) -> Vec<String> {
        self.notes.lock().map(|mut n| std::mem::take(&mut *n)).unwrap_or_default()
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let graph = &model.graph;
        let types = infer_types(model);
        let is_float32 = |t: &str| types.elem_type(t) == Some(DataType::Float);
        for node in graph.nodes() {
            if let Some(captured) = node.captured_names().into_iter().find(|t| is_float32(t)) {
                let message = format!(
                    "node '{}' ({}) reads float32 tensor '{captured}' inside a subgraph; converting subgraphs to float16 is not supported",
                    node.name, node.op_type
                );
                return Err(PassError::Failed { pass: self.name().into(), message });
            }
        }
        let ids = graph.node_ids().map_err(|e| PassError::cycle(self.name(), e))?;
        let mut float16_nodes: HashSet<NodeId> = HashSet::new();
        for &id in &ids {
            if graph.node(id).is_some_and(|n| self.computes_in_float16(n, &types)) {
                float16_nodes.insert(id);
            }
        }
        // Cast(to=FLOAT) whose readers all compute in float16 casts to float16
        // instead; readers first, so that a chain of such Casts converts whole
        for &id in ids.iter().rev() {
            let Some(node) = graph.node(id) else { continue };
            if self.scope == Float16Scope::WeightsAndCompute && is_cast_to(node, DataType::Float) && feeds_only(graph, node, &float16_nodes) {
                float16_nodes.insert(id);
            }
        }
        let plan = Plan::new(graph, &types, &float16_nodes);
        let patch = self.patch(graph, &plan, &ids)?;
        Ok(if patch.is_empty() { Vec::new() } else { vec![patch] })
    }
}

/// A normalization computes its mean and variance in its `stash_type`,
/// float32 unless stated otherwise (ONNX's LayerNormalization-17 and
/// RMSNormalization-23; ORT's SimplifiedLayerNormalization): with float32
/// statistics, a float16 input and output are as safe as any elementwise op.
/// ORT's CPU kernels (layer_norm_impl.cc, skip_layer_norm.cc) convert float16
/// to float32 to compute, and on all-MiniLM-L6-v2 fused for ORT, float16
/// SkipLayerNormalization and EmbedLayerNormalization moved ORT's output by a
/// max abs 5.7e-3 (3.1e-3 with them in float32), cosine 0.999999 either way.
/// A node that asks for other statistics (`stash_type` not float32) stays float32.
fn statistics_in_float32(node: &Node) -> bool {
    node.attr_int("stash_type").is_none_or(|t| t == DataType::Float.code() as i64)
}

/// `node` is `Cast(to=dtype)`.
fn is_cast_to(node: &Node, dtype: DataType) -> bool {
    node.is_onnx("Cast") && node.attr_int("to") == Some(dtype.code() as i64)
}

/// Every reader of `node`'s one output computes in float16 (and there is one);
/// a graph output is read as float32.
fn feeds_only(graph: &Graph, node: &Node, float16_nodes: &HashSet<NodeId>) -> bool {
    let [output] = &node.outputs[..] else { return false };
    let uses = graph.uses(output);
    !graph.is_graph_output(output)
        && uses.iter().any(|u| float16_nodes.contains(&u.node))
        && uses.iter().all(|u| float16_nodes.contains(&u.node) || graph.node(u.node).is_some_and(|n| READS_ANY_TYPE.contains(&n.op_type.as_str())))
}

/// Where every float32 tensor of the model lives after the conversion.
struct Plan<'a> {
    /// The type each float32 tensor is computed or stored in.
    home: HashMap<&'a str, DataType>,
    float16_nodes: &'a HashSet<NodeId>,
    graph_outputs: HashSet<&'a str>,
}

impl<'a> Plan<'a> {
    fn new(graph: &'a Graph, types: &TypeMap, float16_nodes: &'a HashSet<NodeId>) -> Plan<'a> {
        let is_float32 = |t: &str| types.elem_type(t) == Some(DataType::Float);
        let graph_inputs: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
        let graph_outputs: HashSet<&str> = graph.outputs.iter().map(|v| v.name.as_str()).collect();
        let mut home = HashMap::new();
        for t in graph.initializers.iter().filter(|t| t.dtype == DataType::Float) {
            let name = t.name.as_str();
            // a graph input's initializer is a default a caller may override, a
            // graph output is the model's interface: both stay float32
            let weight = t.element_count() > 1 || graph.uses(name).iter().any(|u| float16_nodes.contains(&u.node));
            let stays = graph_inputs.contains(name) || graph_outputs.contains(name);
            home.insert(name, if weight && !stays { DataType::Float16 } else { DataType::Float });
        }
        for name in graph.inputs.iter().map(|v| v.name.as_str()).filter(|t| is_float32(t)) {
            home.insert(name, DataType::Float);
        }
        for (id, node) in graph.nodes_with_ids() {
            let dtype = if float16_nodes.contains(&id) { DataType::Float16 } else { DataType::Float };
            for output in node.outputs.iter().filter(|t| is_float32(t)) {
                home.insert(output.as_str(), dtype);
            }
        }
        Plan { home, float16_nodes, graph_outputs }
    }

    /// The name under which `tensor`, as stored or computed, can be read.
    fn stored_name(&self, tensor: &str) -> String {
        match self.home.get(tensor) {
            Some(DataType::Float16) if self.graph_outputs.contains(tensor) => format!("{tensor}/float16"),
            _ => tensor.to_string(),
        }
    }

    /// The name of `tensor` Cast to `dtype` (a float16 graph output's float32
    /// Cast writes the output itself).
    fn cast_name(&self, tensor: &str, dtype: DataType) -> String {
        match dtype {
            DataType::Float if self.graph_outputs.contains(tensor) => tensor.to_string(),
            DataType::Float => format!("{tensor}/float32"),
            _ => format!("{tensor}/float16"),
        }
    }
}

/// What the conversion of one initializer did to its values.
struct Float16Values {
    bytes: Vec<u8>,
    /// Finite values beyond +-65504, clamped to it.
    clamped: usize,
    /// The largest magnitude among the clamped.
    largest: f32,
    /// Nonzero values that became (signed) zero.
    flushed: usize,
}

impl Float16Values {
    fn new(values: &[f32]) -> Float16Values {
        let mut out = Float16Values { bytes: Vec::with_capacity(values.len() * 2), clamped: 0, largest: 0.0, flushed: 0 };
        for &v in values {
            let clamped = if v.is_finite() && v.abs() > FLOAT16_MAX {
                out.clamped += 1;
                out.largest = out.largest.max(v.abs());
                FLOAT16_MAX.copysign(v)
            } else {
                v
            };
            let h = f16::from_f32(clamped);
            if v != 0.0 && h.to_f32() == 0.0 {
                out.flushed += 1;
            }
            out.bytes.extend_from_slice(&h.to_le_bytes());
        }
        out
    }
}

impl ConvertToFloat16 {
    fn patch(&self, graph: &Graph, plan: &Plan, ids: &[NodeId]) -> Result<Patch, PassError> {
        let mut patch = Patch::new("float16");
        // (tensor, type it is Cast to), in a stable order
        let mut casts: BTreeMap<(String, DataType), ()> = BTreeMap::new();
        let mut kept_float32: BTreeMap<String, usize> = BTreeMap::new();
        let mut converted_nodes = 0;
        for &id in ids {
            let Some(node) = graph.node(id) else { continue };
            let in_float16 = plan.float16_nodes.contains(&id);
            let reads_any = READS_ANY_TYPE.contains(&node.op_type.as_str());
            let mut rewritten = node.clone();
            for input in rewritten.inputs.iter_mut() {
                let Some(&home) = plan.home.get(input.as_str()) else { continue };
                let wanted = match (in_float16, reads_any) {
                    (true, _) => DataType::Float16,
                    (false, true) => home,
                    (false, false) => DataType::Float,
                };
                *input = if wanted == home {
                    plan.stored_name(input)
                } else {
                    casts.insert((input.clone(), wanted), ());
                    plan.cast_name(input, wanted)
                };
            }
            for output in rewritten.outputs.iter_mut() {
                if plan.home.get(output.as_str()) == Some(&DataType::Float16) && plan.graph_outputs.contains(output.as_str()) {
                    casts.insert((output.clone(), DataType::Float), ());
                    *output = plan.stored_name(output);
                }
            }
            if in_float16 {
                converted_nodes += 1;
                if node.is_onnx("Cast") {
                    set_attr(&mut rewritten, "to", AttrValue::Int(DataType::Float16.code() as i64));
                }
            } else if node.inputs.iter().chain(&node.outputs).any(|t| plan.home.contains_key(t.as_str())) && !reads_any {
                *kept_float32.entry(node.qualified_op()).or_default() += 1;
            }
            if rewritten != *node {
                patch.remove_node(id);
                patch.add_node(rewritten);
            }
        }
        for (tensor, dtype) in casts.keys() {
            let (from, to) = (plan.stored_name(tensor), plan.cast_name(tensor, *dtype));
            patch.add_node(Node::new("Cast", &[&from], &[&to]).with_attr("to", AttrValue::Int(dtype.code() as i64)));
        }
        let (mut bytes_before, mut bytes_after, mut weights) = (0u64, 0u64, 0usize);
        for t in graph.initializers.iter().filter(|t| plan.home.get(t.name.as_str()) == Some(&DataType::Float16)) {
            let values = t.to_f32().map_err(|e| PassError::Failed { pass: self.name().into(), message: e.to_string() })?;
            let values = values.iter().copied().collect::<Vec<f32>>();
            let converted = Float16Values::new(&values);
            if converted.clamped > 0 {
                self.note(format!("'{}': {} values beyond +-65504 clamped to it (largest magnitude {:e})", t.name, converted.clamped, converted.largest));
            }
            if converted.flushed > 0 {
                self.note(format!("'{}': {} nonzero values below float16's smallest (5.96e-8) became 0", t.name, converted.flushed));
            }
            bytes_before += t.byte_len();
            bytes_after += converted.bytes.len() as u64;
            weights += 1;
            let mut float16 = Tensor::from_raw(t.name.clone(), DataType::Float16, t.dims.clone(), Bytes::from(converted.bytes));
            float16.extras = t.extras.clone();
            patch.remove_initializer(t.name.clone());
            patch.add_initializer(float16);
        }
        for v in &graph.value_info {
            if plan.home.get(v.name.as_str()) == Some(&DataType::Float16) {
                patch.remove_value_info(v.name.clone());
            }
        }
        if !patch.is_empty() {
            let kept: Vec<String> = kept_float32.iter().map(|(op, n)| format!("{op} x{n}")).collect();
            self.note(format!(
                "{weights} initializers to float16 ({bytes_before} -> {bytes_after} bytes); {converted_nodes} nodes compute in float16; float32 kept for: {}; {} Casts inserted",
                if kept.is_empty() { "none".to_string() } else { kept.join(", ") },
                casts.len()
            ));
        }
        Ok(patch)
    }
}

fn set_attr(node: &mut Node, name: &str, value: AttrValue) {
    match node.attributes.iter_mut().find(|a| a.name == name) {
        Some(a) => a.value = value,
        None => node.attributes.push(crate::ir::Attribute::new(name, value)),
    }
}
