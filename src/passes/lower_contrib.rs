//! `lower-contrib-ops`: replaces every ONNX Runtime contrib op (domain
//! `com.microsoft`, plus ORT's `SimplifiedLayerNormalization`, which ORT
//! registers in the default domain although ONNX has no such op) by standard
//! ONNX ops at the model's default-domain opset (17 or later).
//!
//! Why: the fusion passes emit these ops for ONNX Runtime and TensorRT, but
//! tract cannot run them (tract-onnx 0.23.9 keys its registry by op type alone:
//! a com.microsoft `Attention` is read as ONNX's opset-23 `Attention` and panics;
//! `EmbedLayerNormalization` is not implemented). Verification lowers the fused
//! model with this pass and runs it in tract; the `portable` target ships the
//! lowered model.
//!
//! Semantics followed: ONNX Runtime 1.32.0 (its operator schemas and its CPU
//! kernels, which `tests/scripts/check_lowerings.py` runs against each lowering).
//! Each lowering below carries its math; the forms are opset-17 compatible
//! (LayerNormalization-17, Softmax over axis -1, Squeeze/Unsqueeze/ReduceSum axes
//! as inputs, ReduceMean axes as an attribute before opset 18 and an input from 18).
//!
//! Exactness: every lowering computes the same formula as the ORT kernel with the
//! same association of additions where ORT fixes one, so float32 results differ
//! only by rounding (ORT's own erf/tanh/exp approximations, summation order inside
//! reductions and matmuls): on `tests/lower_contrib.rs`'s cases, ORT's kernel and
//! ORT running the lowering differ by at most 2.4e-7 (attention: bit-identical).
//! Where ORT overrides the formula, the lowering follows ORT: masks add
//! `mask_filter_value` (not -inf), future keys get `lowest()`, a GQA query row
//! that sees no key is zero. Half-precision RMS norms are computed in float32 as
//! ORT does; other ops run in the node's type, where ORT may accumulate in float32.
//!
//! Entry points: the pass ([`LowerContribOps`]); [`lower_contrib_ops`], which also
//! drops the unused opset import; [`lower_node`], to ask whether (and why not) a
//! node a fusion is about to emit can be lowered.
//!
//! What is refused (the pass fails, naming the node and the reason, rather than
//! emit something inexact): KV caches (`past*` inputs, `present*` outputs except
//! GroupQueryAttention's no-cache presents), packed QKV for MultiHeadAttention,
//! Attention's 4-D Megatron mask (ORT 1.32's CPU kernel rejects it too: "4D mask
//! in attention cpu kernel is not supported") and its (2B)/(3B+2) index forms,
//! causal MultiHeadAttention with a query length that may differ from the key
//! length (ORT 1.32's CPU mask is not the usual triangle then; measured), and
//! GroupQueryAttention's rotary, softcap, smooth softmax, sinks, biases and
//! quantized or windowed caches, and local_window_size 0. Nodes inside subgraphs
//! are not lowered.
//!
//! Sketch (SkipLayerNormalization):
//! ```text
//! y, sum = com.microsoft.SkipLayerNormalization(x, skip, gamma, beta, bias)
//!   ->
//! y/input_skip = Add(x, skip)
//! sum          = Add(y/input_skip, bias)
//! y            = LayerNormalization(sum, gamma, beta) {axis=-1, epsilon=..}
//! ```
//! Patches name new tensors `{first output}/{what}`; the lowered ops write the
//! contrib node's own output names, so consumers and graph outputs are untouched.

use super::lowering::{Emitter, Refusal};
use super::{run_pipeline, DriverOptions, Pass, PassError, PassRecord};
use crate::ir::{infer_types, AttrValue, DataType, Dim, Graph, Model, Node, NodeId, Patch, Tensor, TypeMap};
use bytes::Bytes;
use half::{bf16, f16};
use std::collections::HashMap;

pub const CONTRIB_DOMAIN: &str = "com.microsoft";

/// The pass. See the module documentation.
pub struct LowerContribOps;

/// Why a node could not be lowered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LowerError {
    #[error("node '{node}' ({op}): {reason}")]
    Unsupported { node: String, op: String, reason: String },
    #[error("the model imports default-domain opset {found}; lowering contrib ops needs 17 or later (LayerNormalization)")]
    OpsetTooOld { found: i64 },
}

impl Pass for LowerContribOps {
    fn name(&self) -> &'static str {
        "lower-contrib-ops"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let failed = |e: LowerError| PassError::Failed { pass: self.name().into(), message: e.to_string() };
        let targets: Vec<NodeId> = model.graph.nodes_with_ids().into_iter().filter(|(_, n)| needs_lowering(n)).map(|(id, _)| id).collect();
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let types = infer_types(model);
        targets.into_iter().map(|id| lower_node(model, &types, id).map_err(failed)).collect()
    }
}

/// `true` for the nodes this pass replaces: the contrib domain, and ORT's
/// default-domain `SimplifiedLayerNormalization` (not an ONNX op).
pub fn needs_lowering(node: &Node) -> bool {
    node.domain == CONTRIB_DOMAIN || node.is_onnx("SimplifiedLayerNormalization")
}

/// Runs the pass to its fixpoint, then drops the `com.microsoft` opset import if
/// nothing uses it any more (a [`Patch`] edits the graph only, so this step lives
/// here rather than in the pass).
pub fn lower_contrib_ops(model: &mut Model, options: &DriverOptions) -> Result<PassRecord, PassError> {
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(LowerContribOps)];
    let record = run_pipeline(model, &passes, options)?.pop().unwrap_or_default();
    let still_used = graph_uses_domain(&model.graph, CONTRIB_DOMAIN) || model.functions.iter().any(|f| f.domain == CONTRIB_DOMAIN);
    if !still_used {
        model.opset_imports.retain(|o| o.domain != CONTRIB_DOMAIN);
    }
    Ok(record)
}

fn graph_uses_domain(graph: &Graph, domain: &str) -> bool {
    graph.nodes().any(|n| n.domain == domain || n.attributes.iter().any(|a| a.value.subgraphs().iter().any(|g| graph_uses_domain(g, domain))))
}

/// The patch that replaces node `id` by standard ops, or why it cannot be.
pub fn lower_node(model: &Model, types: &TypeMap, id: NodeId) -> Result<Patch, LowerError> {
    let opset = model.opset("").unwrap_or(0);
    if opset < 17 {
        return Err(LowerError::OpsetTooOld { found: opset });
    }
    let Some(node) = model.graph.node(id) else {
        return Err(LowerError::Unsupported { node: format!("{id:?}"), op: "?".into(), reason: "no such node".into() });
    };
    let unsupported = |reason: String| LowerError::Unsupported { node: node.name_or_output().to_string(), op: node.qualified_op(), reason };
    if !needs_lowering(node) {
        return Err(unsupported("not a contrib op: nothing to lower".into()));
    }
    let mut lowering = Lowering::new(model, types, node, id, opset);
    let lowered = match node.op_type.as_str() {
        "Gelu" => lowering.gelu(),
        "BiasGelu" => lowering.bias_gelu(),
        "FastGelu" => lowering.fast_gelu(),
        "QuickGelu" => lowering.quick_gelu(),
        "SkipLayerNormalization" => lowering.skip_layer_norm(),
        "SimplifiedLayerNormalization" => lowering.simplified_layer_norm(),
        "SkipSimplifiedLayerNormalization" => lowering.skip_simplified_layer_norm(),
        "EmbedLayerNormalization" => lowering.embed_layer_norm(),
        "MultiHeadAttention" => lowering.multi_head_attention(),
        "Attention" => lowering.attention(),
        "RotaryEmbedding" => lowering.rotary_embedding(),
        "GroupQueryAttention" => lowering.group_query_attention(),
        "DynamicQuantizeMatMul" => lowering.dynamic_quantize_matmul(),
        "MatMulIntegerToFloat" => lowering.matmul_integer_to_float(),
        "MatMulNBits" => lowering.matmul_n_bits(),
        "GatherBlockQuantized" => lowering.gather_block_quantized(),
        other => Err(format!("no lowering of {other} to standard ONNX ops")),
    };
    lowered.map_err(unsupported)?;
    Ok(lowering.patch)
}

/// How attention scores are formed: `scale * q @ k^T + additive`, then the
/// scores where `visible` is false hidden.
struct ScoreRule<'a> {
    scale: f32,
    additive: Option<&'a str>,
    visible: Option<&'a str>,
    dtype: DataType,
}

/// Builds the replacement of one node into a patch: fresh names under the node's
/// first output, constants as initializers, opset-aware forms of the ops whose
/// signature changed.
struct Lowering<'m> {
    node: &'m Node,
    graph: &'m Graph,
    types: &'m TypeMap,
    opset: i64,
    root: String,
    taken: HashMap<String, usize>,
    constants: HashMap<(String, DataType, Vec<i64>, Vec<u8>), String>,
    positions: HashMap<(String, i64), String>,
    patch: Patch,
}

impl<'m> Emitter<'m> for Lowering<'m> {
    fn node(&self) -> &'m Node {
        self.node
    }

    fn graph(&self) -> &'m Graph {
        self.graph
    }

    fn types(&self) -> &'m TypeMap {
        self.types
    }

    fn root(&self) -> &str {
        &self.root
    }

    fn taken(&mut self) -> &mut HashMap<String, usize> {
        &mut self.taken
    }

    /// A one-output node writing `output` when given (a contrib output), else a fresh name.
    fn op_into(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, AttrValue)>, output: Option<&str>, what: &str) -> String {
        let out = output.map_or_else(|| self.fresh(what), str::to_string);
        self.emit(op, inputs, attrs, &[&out]);
        out
    }

    /// One constant per distinct `what` and value.
    fn constant(&mut self, what: &str, dtype: DataType, dims: Vec<i64>, raw: Vec<u8>) -> String {
        let key = (what.to_string(), dtype, dims.clone(), raw.clone());
        if let Some(name) = self.constants.get(&key) {
            return name.clone();
        }
        let name = self.fresh(what);
        self.patch.add_initializer(Tensor::from_raw(name.clone(), dtype, dims, Bytes::from(raw)));
        self.constants.insert(key, name.clone());
        name
    }
}

impl<'m> Lowering<'m> {
    fn new(model: &'m Model, types: &'m TypeMap, node: &'m Node, id: NodeId, opset: i64) -> Lowering<'m> {
        let root = node.outputs.iter().find(|o| !o.is_empty()).cloned().unwrap_or_else(|| node.name.clone());
        let mut patch = Patch::new(format!("lower {}", node.op_type));
        patch.remove_node(id);
        Lowering { node, graph: &model.graph, types, opset, root, taken: HashMap::new(), constants: HashMap::new(), positions: HashMap::new(), patch }
    }

    // ---- reading the node ----

    fn refuse_inputs(&self, inputs: &[(usize, &str)]) -> Result<(), Refusal> {
        match inputs.iter().find(|(i, _)| self.input(*i).is_some()) {
            Some((i, what)) => Err(format!("input {i} ({what}) is not supported")),
            None => Ok(()),
        }
    }

    fn refuse_outputs(&self, outputs: &[(usize, &str)]) -> Result<(), Refusal> {
        match outputs.iter().find(|(i, _)| self.used_output(*i).is_some()) {
            Some((i, what)) => Err(format!("output {i} ({what}) is used, and is not supported")),
            None => Ok(()),
        }
    }

    fn int_attr(&self, name: &str, default: i64) -> i64 {
        self.node.attr_int(name).unwrap_or(default)
    }

    fn float_attr(&self, name: &str, default: f32) -> f32 {
        self.node.attr_float(name).unwrap_or(default)
    }

    fn positive_attr(&self, name: &str) -> Result<i64, Refusal> {
        self.node.attr_int(name).filter(|&n| n > 0).ok_or_else(|| format!("attribute {name} must be a positive integer"))
    }

    /// The element type of tensor `name` (a float type for the values lowered here).
    fn float_type(&self, name: &str) -> Result<DataType, Refusal> {
        match self.types.elem_type(name) {
            Some(t @ (DataType::Float | DataType::Float16 | DataType::Bfloat16 | DataType::Double)) => Ok(t),
            Some(other) => Err(format!("'{name}' is {other}, not a float type")),
            None => Err(format!("the element type of '{name}' is unknown")),
        }
    }

    fn shape(&self, name: &str) -> Option<&'m [Dim]> {
        self.types.shape(name)
    }

    // ---- emitting ----

    /// Adds a node writing `outputs` (names already chosen).
    fn emit(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, AttrValue)>, outputs: &[&str]) {
        // unnamed: the output names, all under the contrib node's first output, say where they came from
        let mut node = Node::new(op, inputs, outputs);
        for (key, value) in attrs {
            node = node.with_attr(key, value);
        }
        self.patch.add_node(node);
    }

    /// A scalar int32 or int64 constant, named by its value (`{root}/int32:0`).
    fn int_scalar(&mut self, dtype: DataType, value: i64) -> Result<String, Refusal> {
        let raw = match dtype {
            DataType::Int64 => value.to_le_bytes().to_vec(),
            DataType::Int32 => (value as i32).to_le_bytes().to_vec(),
            other => return Err(format!("integer inputs of type {other} are not supported")),
        };
        Ok(self.constant(&format!("{dtype}:{value}"), dtype, Vec::new(), raw))
    }

    /// A scalar constant of a float type.
    fn float_scalar(&mut self, what: &str, dtype: DataType, value: f64) -> String {
        let raw = match dtype {
            DataType::Double => value.to_le_bytes().to_vec(),
            DataType::Float16 => f16::from_f64(value).to_le_bytes().to_vec(),
            DataType::Bfloat16 => bf16::from_f64(value).to_le_bytes().to_vec(),
            // float_type() admits nothing else
            _ => (value as f32).to_le_bytes().to_vec(),
        };
        self.constant(what, dtype, Vec::new(), raw)
    }

    /// The most negative finite value of `dtype` (ORT's `numeric_limits<T>::lowest()`).
    fn lowest(&mut self, dtype: DataType) -> String {
        let value = match dtype {
            DataType::Double => f64::MIN,
            DataType::Float16 => f16::MIN.to_f64(),
            DataType::Bfloat16 => bf16::MIN.to_f64(),
            _ => f32::MIN as f64,
        };
        self.float_scalar("lowest", dtype, value)
    }

    fn squeeze(&mut self, x: &str, axes: &[i64], what: &str) -> String {
        let axes = self.ints(axes);
        self.op("Squeeze", &[x, &axes], what)
    }

    /// ReduceMean keeping dims: axes became an input in opset 18.
    fn reduce_mean(&mut self, x: &str, axes: &[i64], what: &str) -> String {
        let keep = ("keepdims", AttrValue::Int(1));
        if self.opset >= 18 {
            let axes = self.ints(axes);
            self.op_with("ReduceMean", &[x, &axes], vec![keep], what)
        } else {
            self.op_with("ReduceMean", &[x], vec![keep, ("axes", AttrValue::Ints(axes.to_vec()))], what)
        }
    }

    /// `x[..., start:end]` on the last axis.
    fn slice_last(&mut self, x: &str, start: i64, end: i64, what: &str) -> String {
        let starts = self.ints(&[start]);
        let ends = self.ints(&[end]);
        let axes = self.ints(&[-1]);
        self.op("Slice", &[x, &starts, &ends, &axes], what)
    }

    /// Splits the last axis into pieces of these sizes.
    fn split_last(&mut self, x: &str, sizes: &[i64], whats: &[&str]) -> Vec<String> {
        let split = self.ints(sizes);
        let outputs: Vec<String> = whats.iter().map(|w| self.fresh(w)).collect();
        let refs: Vec<&str> = outputs.iter().map(String::as_str).collect();
        self.emit("Split", &[x, &split], vec![("axis", AttrValue::Int(-1))], &refs);
        outputs
    }

    /// `0, 1, .., n-1` (int64) where n is dim `axis` of `x`.
    fn positions(&mut self, x: &str, axis: i64, what: &str) -> String {
        if let Some(done) = self.positions.get(&(x.to_string(), axis)) {
            return done.clone();
        }
        let attrs = vec![("start", AttrValue::Int(axis)), ("end", AttrValue::Int(axis + 1))];
        let len = self.op_with("Shape", &[x], attrs, &format!("{what}_len"));
        let len = self.squeeze(&len, &[0], &format!("{what}_count"));
        let zero = self.int_scalar(DataType::Int64, 0).expect("int64 is supported");
        let one = self.int_scalar(DataType::Int64, 1).expect("int64 is supported");
        let positions = self.op("Range", &[&zero, &len, &one], what);
        self.positions.insert((x.to_string(), axis), positions.clone());
        positions
    }

    // ---- shared pieces ----

    /// ORT's erf Gelu: `y = 0.5 * x * (1 + erf(x * (1/sqrt2)))` (contrib Gelu's
    /// CPU kernel multiplies by M_SQRT1_2).
    fn erf_gelu(&mut self, x: &str, dtype: DataType) -> Result<(), Refusal> {
        let output = self.used_output(0);
        let rsqrt2 = self.float_scalar("rsqrt2", dtype, std::f64::consts::FRAC_1_SQRT_2);
        let one = self.float_scalar("one", dtype, 1.0);
        let half = self.float_scalar("half", dtype, 0.5);
        let scaled = self.op("Mul", &[x, &rsqrt2], "scaled");
        let erf = self.op("Erf", &[&scaled], "erf");
        let gate = self.op("Add", &[&erf, &one], "gate");
        let gated = self.op("Mul", &[x, &gate], "gated");
        self.op_into("Mul", &[&gated, &half], Vec::new(), output, "out");
        Ok(())
    }

    /// LayerNormalization-17 over the last axis, writing outputs Y, Mean, InvStdDev
    /// to the contrib node's outputs `outputs` (Y always).
    fn layer_norm(&mut self, x: &str, gamma: &str, beta: Option<&str>, epsilon: f32, outputs: [Option<&str>; 3]) {
        let y = match outputs[0] {
            Some(name) => name.to_string(),
            None => self.fresh("out"),
        };
        let mut inputs = vec![x, gamma];
        inputs.extend(beta);
        let mean = outputs[1].unwrap_or("");
        let inv_std = outputs[2].unwrap_or("");
        let outs: Vec<&str> = match (mean, inv_std) {
            ("", "") => vec![&y],
            (_, "") => vec![&y, mean],
            _ => vec![&y, mean, inv_std],
        };
        let attrs = vec![("axis", AttrValue::Int(-1)), ("epsilon", AttrValue::Float(epsilon))];
        self.emit("LayerNormalization", &inputs, attrs, &outs);
    }

    /// ORT's RMS norm (`layer_norm_impl.cc`, simplified): over `axes`,
    /// `rms = sqrt(mean(x^2) + eps)`, `y = x / rms * scale`, `inv_std_var = 1 / rms`,
    /// computed in float32 (half inputs are widened, as ORT's kernel does; y is
    /// narrowed back to `y_type`). `x` comes with its type: it may be a tensor
    /// this lowering made (SkipSimplifiedLayerNormalization's sum), untyped yet.
    fn rms_norm(
        &mut self,
        (x, x_type): (&str, DataType),
        scale: &str,
        axes: &[i64],
        epsilon: f32,
        y_type: DataType,
        outputs: [Option<&str>; 3],
    ) -> Result<(), Refusal> {
        let widen = |this: &mut Self, name: &str, dtype: DataType, what: &str| -> String {
            match dtype {
                DataType::Float => name.to_string(),
                _ => this.cast(name, DataType::Float, what),
            }
        };
        let xf = widen(self, x, x_type, "x_f32");
        let scale_type = self.float_type(scale)?;
        let scale_f = widen(self, scale, scale_type, "scale_f32");
        let eps = self.float_scalar("epsilon", DataType::Float, epsilon as f64);
        let square = self.op("Mul", &[&xf, &xf], "square");
        let mean_square = self.reduce_mean(&square, axes, "mean_square");
        let shifted = self.op("Add", &[&mean_square, &eps], "mean_square_eps");
        let rms = self.op("Sqrt", &[&shifted], "rms");
        let normalized = self.op("Div", &[&xf, &rms], "normalized");
        let y = if y_type == DataType::Float { outputs[0] } else { None };
        let scaled = self.op_into("Mul", &[&normalized, &scale_f], Vec::new(), y, "scaled");
        if y_type != DataType::Float {
            let to = ("to", AttrValue::Int(y_type.code() as i64));
            self.op_into("Cast", &[&scaled], vec![to], outputs[0], "out");
        }
        if let Some(mean) = outputs[1] {
            // ORT 1.32's SkipSimplifiedLayerNormalization writes zeros there (measured).
            let shape = self.op("Shape", &[&rms], "stat_shape");
            let zero = AttrValue::Tensor(Tensor::from_raw("value", DataType::Float, vec![1], Bytes::from(0f32.to_le_bytes().to_vec())));
            self.emit("ConstantOfShape", &[&shape], vec![("value", zero)], &[mean]);
        }
        if outputs[2].is_some() {
            self.op_into("Reciprocal", &[&rms], Vec::new(), outputs[2], "inv_std_var");
        }
        Ok(())
    }

    /// `x + skip (+ bias)` in ORT's order, written to `output` when used.
    fn skip_sum(&mut self, input: &str, skip: &str, bias: Option<&str>, output: Option<&str>) -> String {
        match bias {
            Some(bias) => {
                let partial = self.op("Add", &[input, skip], "input_skip");
                self.op_into("Add", &[&partial, bias], Vec::new(), output, "input_skip_bias_sum")
            }
            None => self.op_into("Add", &[input, skip], Vec::new(), output, "input_skip_bias_sum"),
        }
    }

    /// Additive key-padding bias from an ORT mask: `mask > 0 -> 0`, else
    /// `mask_filter_value` (ORT's `PrepareMask`), shaped to broadcast against
    /// scores [B, N, S, T]. Forms: (B) key lengths, (B, T) 0/1, (B, S, T) 0/1.
    fn padding_bias(&mut self, mask: &str, batch_of: &str, keys: &str, dtype: DataType, filter: f32) -> Result<String, Refusal> {
        let mask_type = self.types.elem_type(mask).ok_or_else(|| format!("the element type of '{mask}' is unknown"))?;
        let keep = match self.rank(mask)? {
            1 => {
                let (mask_dims, batch_dims) = (self.shape(mask), self.shape(batch_of));
                let is_batch = matches!((mask_dims, batch_dims), (Some([m]), Some([b, ..])) if m == b && *m != Dim::Unknown);
                if !is_batch {
                    return Err("a 1-D mask must be (batch) key lengths; (2*batch) and (3*batch+2) forms are not supported, and this one's length is not provably the batch".into());
                }
                let lengths = self.cast(mask, DataType::Int64, "key_lengths");
                let lengths = self.unsqueeze(&lengths, &[1], "key_lengths_column");
                let key_pos = self.positions(keys, 1, "key_positions");
                let key_pos = self.unsqueeze(&key_pos, &[0], "key_positions_row");
                let keep = self.op("Less", &[&key_pos, &lengths], "key_keep");
                self.unsqueeze(&keep, &[1, 2], "key_keep_4d")
            }
            2 | 3 => {
                let zero = self.int_scalar(mask_type, 0)?;
                let keep = self.op("Greater", &[mask, &zero], "key_keep");
                let axes: &[i64] = if self.rank(mask)? == 2 { &[1, 2] } else { &[1] };
                self.unsqueeze(&keep, axes, "key_keep_4d")
            }
            rank => return Err(format!("a {rank}-D mask is not supported (ORT 1.32's CPU kernel rejects 4-D masks)")),
        };
        let zero = self.float_scalar("bias_zero", dtype, 0.0);
        let filter = self.float_scalar("mask_filter_value", dtype, filter as f64);
        Ok(self.op("Where", &[&keep, &zero, &filter], "padding_bias"))
    }

    /// The bias ORT adds to the scaled scores of Attention/MultiHeadAttention:
    /// `attention_bias + mask`, where the mask is the padding bias with future keys
    /// set to `lowest()` when causal (ORT's `PrepareMask` then `ComputeAttentionProbs`).
    fn attention_bias(&mut self, padding: Option<String>, causal_over: Option<&str>, attention_bias: Option<&str>, dtype: DataType) -> Option<String> {
        let mask = match causal_over {
            Some(query) => {
                // S == T: one range serves queries and keys
                let positions = self.positions(query, 1, "positions");
                let q_pos = self.unsqueeze(&positions, &[1], "query_column");
                let k_pos = self.unsqueeze(&positions, &[0], "key_row");
                let future = self.op("Greater", &[&k_pos, &q_pos], "future");
                let lowest = self.lowest(dtype);
                let otherwise = match &padding {
                    Some(p) => p.clone(),
                    None => self.float_scalar("bias_zero", dtype, 0.0),
                };
                Some(self.op("Where", &[&future, &lowest, &otherwise], "mask_bias"))
            }
            None => padding,
        };
        match (attention_bias, mask) {
            (Some(bias), Some(mask)) => Some(self.op("Add", &[bias, &mask], "total_bias")),
            (Some(bias), None) => Some(bias.to_string()),
            (None, mask) => mask,
        }
    }

    /// `softmax(scores) @ v` with q [.., S, H], k_t [.., H, T], v [.., T, Hv] and
    /// the scores as `rule` says. Hidden scores become `lowest()`, so they get
    /// weight exactly 0 as ORT's skipped columns do, and a row with no visible key
    /// gets zero weights (ORT 1.32's GQA output there).
    fn attend(&mut self, q: &str, k_t: &str, v: &str, rule: &ScoreRule) -> String {
        let dtype = rule.dtype;
        let scale = self.float_scalar("scale", dtype, rule.scale as f64);
        let qk = self.op("MatMul", &[q, k_t], "qk");
        let mut scores = self.op("Mul", &[&qk, &scale], "scaled_qk");
        if let Some(bias) = rule.additive {
            scores = self.op("Add", &[&scores, bias], "biased_qk");
        }
        if let Some(keep) = rule.visible {
            let lowest = self.lowest(dtype);
            scores = self.op("Where", &[keep, &scores, &lowest], "masked_qk");
        }
        let mut probs = self.op_with("Softmax", &[&scores], vec![("axis", AttrValue::Int(-1))], "probs");
        if let Some(keep) = rule.visible {
            // a row with no visible key would be uniform; ORT returns zeros for it
            let zero = self.float_scalar("prob_zero", dtype, 0.0);
            probs = self.op("Where", &[keep, &probs, &zero], "visible_probs");
        }
        self.op("MatMul", &[&probs, v], "context")
    }

    /// ORT's default scale `1/sqrt(head_size)` (computed in f32), or the attribute.
    fn scale(&self, head_size: Option<i64>, head_size_source: &str) -> Result<f32, Refusal> {
        match self.node.attr_float("scale").filter(|&s| s != 0.0) {
            Some(s) => Ok(s),
            None => match head_size {
                Some(h) if h > 0 => Ok(1.0 / (h as f32).sqrt()),
                _ => Err(format!("the head size is unknown ({head_size_source}), so the default scale 1/sqrt(head_size) is; give the node a scale attribute")),
            },
        }
    }

    // ---- the lowerings ----

    /// DynamicQuantizeMatMul(A, B, b_scale, b_zero_point?, bias?): `A` quantized to
    /// uint8 per tensor exactly as DynamicQuantizeLinear does (ORT's kernel calls the
    /// same `GetQuantizationParameter`: the range includes 0, scale = range / 255),
    /// an int32 product with B's zero point subtracted (scalar or per column `[N]`),
    /// then `Y = acc * (a_scale * b_scale) (+ bias)`, ORT's association
    /// (`matmul_integer_to_float.cc` multiplies the two scales first).
    fn dynamic_quantize_matmul(&mut self) -> Result<(), Refusal> {
        let a = self.required(0, "A")?;
        let b = self.required(1, "B")?;
        let b_scale = self.required(2, "b_scale")?;
        if self.types.elem_type(a) != Some(DataType::Float) {
            return Err(format!("'{a}' must be float32 (DynamicQuantizeLinear's only input type)"));
        }
        let output = self.used_output(0);
        let names = [self.fresh("a_quantized"), self.fresh("a_scale"), self.fresh("a_zero_point")];
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        self.emit("DynamicQuantizeLinear", &[a], Vec::new(), &refs);
        let [a_quantized, a_scale, a_zero_point] = &names;
        let mut matmul_inputs = vec![a_quantized.as_str(), b, a_zero_point];
        if let Some(b_zero_point) = self.input(3) {
            matmul_inputs.push(b_zero_point);
        }
        let accumulated = self.op("MatMulInteger", &matmul_inputs, "accumulated");
        self.scale_and_bias(&accumulated, a_scale, b_scale, self.input(4), output)
    }

    /// MatMulIntegerToFloat(A, B, a_scale, b_scale, a_zero_point?, b_zero_point?, bias?):
    /// `Y = (A - a_zero_point) (B - b_zero_point) * (a_scale * b_scale) + bias`,
    /// the integer product exact in int32 as in ORT's kernel. An `a_scale` of
    /// more than one element (a row scale `[..., M, 1]`) ORT multiplies into
    /// the output after the bias (`ScaleOutput` in `dynamic_quantize_matmul.cc`):
    /// `Y = ((A - za) (B - zb) * b_scale + bias) * a_scale`.
    fn matmul_integer_to_float(&mut self) -> Result<(), Refusal> {
        let a = self.required(0, "A")?;
        let b = self.required(1, "B")?;
        let a_scale = self.required(2, "a_scale")?;
        let b_scale = self.required(3, "b_scale")?;
        let output = self.used_output(0);
        let mut matmul_inputs = vec![a.to_string(), b.to_string()];
        match (self.input(4), self.input(5)) {
            (a_zero_point, Some(b_zero_point)) => {
                let a_zero_point = match a_zero_point {
                    Some(z) => z.to_string(),
                    None => {
                        let dtype = self.types.elem_type(a).ok_or_else(|| format!("the element type of '{a}' is unknown"))?;
                        self.constant(&format!("{dtype}:0"), dtype, Vec::new(), vec![0])
                    }
                };
                matmul_inputs.extend([a_zero_point, b_zero_point.to_string()]);
            }
            (Some(a_zero_point), None) => matmul_inputs.push(a_zero_point.to_string()),
            (None, None) => {}
        }
        let refs: Vec<&str> = matmul_inputs.iter().map(String::as_str).collect();
        let accumulated = self.op("MatMulInteger", &refs, "accumulated");
        let Some(bias) = self.input(6) else {
            return self.scale_and_bias(&accumulated, a_scale, b_scale, None, output);
        };
        let one_element = |shape: &[Dim]| shape.len() <= 1 && shape.iter().all(|d| d.fixed() == Some(1));
        match self.types.shape(a_scale) {
            Some(shape) if one_element(shape) => self.scale_and_bias(&accumulated, a_scale, b_scale, Some(bias), output),
            Some(_) => {
                let accumulated = self.cast(&accumulated, DataType::Float, "accumulated_float");
                let scaled = self.op("Mul", &[&accumulated, b_scale], "scaled");
                let biased = self.op("Add", &[&scaled, bias], "biased");
                self.op_into("Mul", &[&biased, a_scale], Vec::new(), output, "y");
                Ok(())
            }
            None => Err(format!("the shape of a_scale '{a_scale}' is unknown; with a bias, ORT's result depends on it")),
        }
    }

    /// `Cast<float>(accumulated) * (a_scale * b_scale) (+ bias)`, into `output`:
    /// the float side of DynamicQuantizeMatMul and MatMulIntegerToFloat.
    fn scale_and_bias(&mut self, accumulated: &str, a_scale: &str, b_scale: &str, bias: Option<&str>, output: Option<&'m str>) -> Result<(), Refusal> {
        let accumulated = self.cast(accumulated, DataType::Float, "accumulated_float");
        let scale = self.op("Mul", &[a_scale, b_scale], "scale");
        match bias {
            Some(bias) => {
                let scaled = self.op("Mul", &[&accumulated, &scale], "scaled");
                self.op_into("Add", &[&scaled, bias], Vec::new(), output, "y");
            }
            None => {
                self.op_into("Mul", &[&accumulated, &scale], Vec::new(), output, "y");
            }
        }
        Ok(())
    }

    /// GroupQueryAttention's present cache (B, KV, P+S, H) from `past` (B, KV, P,
    /// H) and the new heads (B, KV, S, H), as ORT 1.32 writes it (measured): row
    /// b keeps its first `offset[b]` past rows, then its S new ones, then zeros;
    /// `offset` = P for every row makes it Concat(past, new).
    fn cache_rows(&mut self, past: &str, new_heads: &str, offset: &str, new: &str, output: Option<&str>, what: &str) -> String {
        let joined = self.op_with("Concat", &[past, new_heads], vec![("axis", AttrValue::Int(2))], &format!("{what}_joined"));
        let positions = self.positions(&joined, 2, &format!("{what}_positions"));
        let j = self.unsqueeze(&positions, &[0], &format!("{what}_position_row"));
        let past_len = self.op_with("Shape", &[past], vec![("start", AttrValue::Int(2)), ("end", AttrValue::Int(3))], &format!("{what}_past_len"));
        let past_len = self.squeeze(&past_len, &[0], &format!("{what}_past_count"));
        let relative = self.op("Sub", &[&j, offset], &format!("{what}_relative"));
        let from_past = self.op("Less", &[&j, offset], &format!("{what}_from_past"));
        let zero = self.int_scalar(DataType::Int64, 0).expect("int64 is supported");
        let after = self.op("GreaterOrEqual", &[&relative, &zero], &format!("{what}_after_past"));
        let before_end = self.op("Less", &[&relative, new], &format!("{what}_before_end"));
        let from_new = self.op("And", &[&after, &before_end], &format!("{what}_from_new"));
        let new_index = self.op("Add", &[&relative, &past_len], &format!("{what}_new_index"));
        let index = self.op("Where", &[&from_new, &new_index, &zero], &format!("{what}_new_or_zero"));
        let index = self.op("Where", &[&from_past, &j, &index], &format!("{what}_index"));
        let written = self.op("Or", &[&from_past, &from_new], &format!("{what}_written"));
        let index = self.unsqueeze(&index, &[1, 3], &format!("{what}_index_4d"));
        let shape = self.op("Shape", &[&joined], &format!("{what}_shape"));
        let index = self.op("Expand", &[&index, &shape], &format!("{what}_index_full"));
        let gathered = self.op_with("GatherElements", &[&joined, &index], vec![("axis", AttrValue::Int(2))], &format!("{what}_gathered"));
        let written = self.unsqueeze(&written, &[1, 3], &format!("{what}_written_4d"));
        let dtype = self.types.elem_type(past).unwrap_or(DataType::Float);
        let zero = self.float_scalar(&format!("{what}_zero"), dtype, 0.0);
        self.op_into("Where", &[&written, &gathered, &zero], Vec::new(), output, what)
    }

    /// `a` (float32, last axis K) as MatMulNBits' int8 compute sees it: per block
    /// of `block` along K, `s = max|a| / 127` and `round(a * (1/s)) * s`, 0 for
    /// a block of zeros (ORT's QuantizeARow for accuracy_level 4).
    fn int8_blocks(&mut self, a: &str, block: usize) -> Result<String, Refusal> {
        if self.types.elem_type(a) != Some(DataType::Float) {
            return Err(format!("accuracy_level 4 with '{a}' not float32 is not lowered"));
        }
        let blocks = self.reshape(a, &[0, -1, block as i64], None, "a_blocks");
        let magnitude = self.op("Abs", &[&blocks], "a_abs");
        let keep = ("keepdims", AttrValue::Int(1));
        let amax = if self.opset >= 18 {
            let axes = self.ints(&[-1]);
            self.op_with("ReduceMax", &[&magnitude, &axes], vec![keep], "a_amax")
        } else {
            self.op_with("ReduceMax", &[&magnitude], vec![keep, ("axes", AttrValue::Ints(vec![-1]))], "a_amax")
        };
        let levels = self.float_scalar("int8_levels", DataType::Float, 127.0);
        let scale = self.op("Div", &[&amax, &levels], "a_scale");
        let zero = self.float_scalar("zero", DataType::Float, 0.0);
        let one = self.float_scalar("one", DataType::Float, 1.0);
        let is_zero = self.op("Equal", &[&scale, &zero], "a_block_zero");
        let safe = self.op("Where", &[&is_zero, &one, &scale], "a_scale_nonzero");
        let inverse = self.op("Reciprocal", &[&safe], "a_inverse_scale");
        let inverse = self.op("Where", &[&is_zero, &zero, &inverse], "a_inverse_scale_or_zero");
        let scaled = self.op("Mul", &[&blocks, &inverse], "a_scaled");
        let rounded = self.op("Round", &[&scaled], "a_int8");
        let dequantized = self.op("Mul", &[&rounded, &scale], "a_dequantized");
        let shape = self.op("Shape", &[a], "a_shape");
        Ok(self.op("Reshape", &[&dequantized, &shape], "a_int8_compute"))
    }

    /// MatMulNBits(A, B, scales, zero_points?) with `bits = 4`: `Y = A @ W` with
    /// `W[k, n] = (q[n, k] - z[n, g]) * scales[n * blocks + g]`, `g = k / block_size`,
    /// `q` unpacked from `B` `[N, blocks, block_size / 2]` low nibble first, `z`
    /// from the packed uint8 zero points (8 when absent). `W` becomes a float32
    /// constant: `q - z` is a small integer, so its product with the scale is the
    /// one rounding ORT's dequantization makes too (`quantize_int4.rs`). ORT
    /// computes in float32 with `accuracy_level` 0 or 1. With 4 (int8 compute)
    /// it first quantizes `A` per block of `block_size` along K, symmetric:
    /// `s = max|a| / 127`, `a' = round(a * (1/s)) * s` (0 where the block is 0),
    /// and the int32 products of the blocks scaled by `s * scale` sum to
    /// `a' @ W`: lowered so (measured against ORT 1.32's MLAS kernel: 6e-5 max abs
    /// on outputs of 270, where the float product differs by 1.9). Levels 2 and 3
    /// (fp16, bf16 compute) are refused, as are `g_idx` and float zero points.
    fn matmul_n_bits(&mut self) -> Result<(), Refusal> {
        let a = self.required(0, "A")?;
        let (b, scales) = (self.required(1, "B")?, self.required(2, "scales")?);
        self.refuse_inputs(&[(4, "g_idx")])?;
        if self.int_attr("bits", 4) != 4 {
            return Err("only bits = 4 is lowered".into());
        }
        let accuracy_level = self.int_attr("accuracy_level", 0);
        if !matches!(accuracy_level, 0 | 1 | 4) {
            return Err(format!("accuracy_level {accuracy_level} (half-precision compute) is not lowered; 0, 1 and 4 are"));
        }
        let (k, n, block) = (self.positive_attr("K")? as usize, self.positive_attr("N")? as usize, self.positive_attr("block_size")? as usize);
        if accuracy_level == 4 && k % block != 0 {
            return Err(format!("accuracy_level 4 with K = {k} not a multiple of block_size {block} is not lowered"));
        }
        let blocks = k.div_ceil(block);
        let raw = |name: &str, dtype: DataType| -> Result<Vec<u8>, Refusal> {
            let tensor = self.graph.initializer(name).ok_or_else(|| format!("'{name}' is not a constant"))?;
            match (&tensor.data, tensor.dtype) {
                (crate::ir::TensorData::Raw(bytes), t) if t == dtype => Ok(bytes.to_vec()),
                (_, t) if t == dtype => tensor.to_i64().map(|v| v.iter().map(|&x| x as u8).collect()).map_err(|e| e.to_string()),
                (_, other) => Err(format!("'{name}' is {other}, not {dtype}")),
            }
        };
        let packed = raw(b, DataType::Uint8)?;
        let q = crate::quantize::int4::unpack_nibbles(&packed, n * blocks * block, false)
            .ok_or_else(|| format!("'{b}' holds {} bytes, not N * blocks * block_size / 2 = {}", packed.len(), n * blocks * block / 2))?;
        let scale_tensor = self.graph.initializer(scales).ok_or_else(|| format!("'{scales}' is not a constant"))?;
        if scale_tensor.dtype != DataType::Float {
            return Err(format!("'{scales}' is {}; only float32 is lowered", scale_tensor.dtype));
        }
        let scale_values = scale_tensor.to_f32().map_err(|e| e.to_string())?.iter().copied().collect::<Vec<f32>>();
        if scale_values.len() != n * blocks {
            return Err(format!("'{scales}' has {} values, not N * blocks = {}", scale_values.len(), n * blocks));
        }
        let zero_points = match self.input(3) {
            Some(z) => {
                let packed = raw(z, DataType::Uint8).map_err(|e| format!("{e} (float zero points are not lowered)"))?;
                let per_column = blocks.div_ceil(2) * 2;
                let all = crate::quantize::int4::unpack_nibbles(&packed, n * per_column, false)
                    .ok_or_else(|| format!("'{z}' holds {} bytes, not N * ceil(blocks / 2) = {}", packed.len(), n * blocks.div_ceil(2)))?;
                (0..n).flat_map(|column| all[column * per_column..column * per_column + blocks].to_vec()).collect()
            }
            None => vec![8; n * blocks],
        };
        let mut weight = Vec::with_capacity(k * n * 4);
        for row in 0..k {
            let g = row / block;
            for column in 0..n {
                let value = (q[(column * blocks + g) * block + row % block] - zero_points[column * blocks + g]) as f32 * scale_values[column * blocks + g];
                weight.extend_from_slice(&value.to_le_bytes());
            }
        }
        let weight = self.constant("weight", DataType::Float, vec![k as i64, n as i64], weight);
        let a = if accuracy_level == 4 { self.int8_blocks(a, block)? } else { a.to_string() };
        let product = match self.input(5) {
            Some(_) => self.op("MatMul", &[&a, &weight], "product"),
            None => {
                let output = self.used_output(0);
                self.op_into("MatMul", &[&a, &weight], Vec::new(), output, "y")
            }
        };
        if let Some(bias) = self.input(5) {
            let output = self.used_output(0);
            self.op_into("Add", &[&product, bias], Vec::new(), output, "y");
        }
        Ok(())
    }

    /// GatherBlockQuantized(data, indices, scales, zero_points?) with int4 or
    /// uint4 `data` (the form `quantize-gather-int4` writes):
    /// `Gather(DequantizeLinear(data, scales, zero_points) {axis = quantize_axis,
    /// block_size}, indices) {axis = gather_axis}`, ORT's definition written in
    /// standard ops; the DequantizeLinear of the constant table is then lowered
    /// by `lower-standard-ops` to a float32 constant. uint8 data (packed `bits`)
    /// is refused.
    fn gather_block_quantized(&mut self) -> Result<(), Refusal> {
        let (data, indices, scales) = (self.required(0, "data")?, self.required(1, "indices")?, self.required(2, "scales")?);
        let packed = self.graph.initializer(data).ok_or_else(|| format!("data '{data}' is not a constant"))?;
        if !matches!(packed.dtype, DataType::Int4 | DataType::Uint4) {
            return Err(format!("data is {}; only int4 and uint4 are lowered", packed.dtype));
        }
        let block = self.int_attr("block_size", 128);
        let mut inputs = vec![data, scales];
        inputs.extend(self.input(3));
        let attrs = vec![("axis", AttrValue::Int(self.int_attr("quantize_axis", 1))), ("block_size", AttrValue::Int(block))];
        let table = self.op_with("DequantizeLinear", &inputs, attrs, "table");
        let output = self.used_output(0);
        self.op_into("Gather", &[&table, indices], vec![("axis", AttrValue::Int(self.int_attr("gather_axis", 0)))], output, "y");
        Ok(())
    }

    /// com.microsoft Gelu: `y = 0.5 * x * (1 + erf(x / sqrt2))`.
    fn gelu(&mut self) -> Result<(), Refusal> {
        let x = self.required(0, "X")?;
        let dtype = self.float_type(x)?;
        self.erf_gelu(x, dtype)
    }

    /// BiasGelu: `y = Gelu(a + b)`, `b` 1-D broadcast over the last axis.
    fn bias_gelu(&mut self) -> Result<(), Refusal> {
        let (a, b) = (self.required(0, "A")?, self.required(1, "B")?);
        let dtype = self.float_type(a)?;
        let x = self.op("Add", &[a, b], "biased");
        self.erf_gelu(&x, dtype)
    }

    /// FastGelu (tanh approximation), `x = X (+ bias)`:
    /// `y = 0.5 * x * (1 + tanh(x * (0.035677408136300125 * x * x + 0.7978845608028654)))`,
    /// the constants being sqrt(2/pi) * 0.044715 and sqrt(2/pi), in ORT's kernel's
    /// association (`fast_gelu.cc`).
    fn fast_gelu(&mut self) -> Result<(), Refusal> {
        let input = self.required(0, "X")?;
        let dtype = self.float_type(input)?;
        let x = match self.input(1) {
            Some(bias) => self.op("Add", &[input, bias], "biased"),
            None => input.to_string(),
        };
        let output = self.used_output(0);
        let cubic = self.float_scalar("cubic_coefficient", dtype, 0.035_677_408_136_300_125);
        let linear = self.float_scalar("sqrt_2_over_pi", dtype, 0.797_884_560_802_865_4);
        let one = self.float_scalar("one", dtype, 1.0);
        let half = self.float_scalar("half", dtype, 0.5);
        let square = self.op("Mul", &[&x, &x], "square");
        let cubic_term = self.op("Mul", &[&square, &cubic], "cubic_term");
        let inner = self.op("Add", &[&cubic_term, &linear], "inner");
        let argument = self.op("Mul", &[&x, &inner], "tanh_argument");
        let tanh = self.op("Tanh", &[&argument], "tanh");
        let gate = self.op("Add", &[&tanh, &one], "gate");
        let gated = self.op("Mul", &[&x, &gate], "gated");
        self.op_into("Mul", &[&gated, &half], Vec::new(), output, "out");
        Ok(())
    }

    /// QuickGelu: `x * Sigmoid(alpha * x)`, alpha 1.702 by default (ORT 1.32
    /// ContribOperators.md).
    fn quick_gelu(&mut self) -> Result<(), Refusal> {
        let x = self.required(0, "X")?;
        let dtype = self.float_type(x)?;
        let output = self.used_output(0);
        let alpha = self.float_scalar("alpha", dtype, self.float_attr("alpha", 1.702) as f64);
        let scaled = self.op("Mul", &[x, &alpha], "scaled");
        let gate = self.op("Sigmoid", &[&scaled], "gate");
        self.op_into("Mul", &[x, &gate], Vec::new(), output, "out");
        Ok(())
    }

    /// SkipLayerNormalization: `s = (input + skip) + bias`,
    /// `output, mean, inv_std_var = LayerNormalization(s, gamma, beta; axis -1, epsilon)`
    /// (mean and inv_std_var [.., 1], as ORT 1.32 returns them), `input_skip_bias_sum = s`.
    /// epsilon defaults to 1e-12.
    fn skip_layer_norm(&mut self) -> Result<(), Refusal> {
        let (input, skip, gamma) = (self.required(0, "input")?, self.required(1, "skip")?, self.required(2, "gamma")?);
        self.float_type(input)?;
        let sum = self.skip_sum(input, skip, self.input(4), self.used_output(3));
        let epsilon = self.float_attr("epsilon", 1e-12);
        let outputs = [self.used_output(0), self.used_output(1), self.used_output(2)];
        self.layer_norm(&sum, gamma, self.input(3), epsilon, outputs);
        Ok(())
    }

    /// SimplifiedLayerNormalization (ORT registers it in the default domain):
    /// RMS norm over axes `axis..rank`, `y = x / sqrt(mean(x^2) + eps) * scale`,
    /// `inv_std_var = 1 / sqrt(mean(x^2) + eps)`; epsilon defaults to 1e-5, axis to -1.
    fn simplified_layer_norm(&mut self) -> Result<(), Refusal> {
        let (x, scale) = (self.required(0, "X")?, self.required(1, "scale")?);
        let axis = self.int_attr("axis", -1);
        let axes: Vec<i64> = if axis == -1 {
            vec![-1]
        } else {
            let rank = self.rank(x)? as i64;
            let first = if axis < 0 { axis + rank } else { axis };
            if !(0..rank).contains(&first) {
                return Err(format!("axis {axis} is out of range for rank {rank}"));
            }
            (first..rank).collect()
        };
        let epsilon = self.float_attr("epsilon", 1e-5);
        let y_type = self.float_type(scale)?;
        let x_type = self.float_type(x)?;
        self.rms_norm((x, x_type), scale, &axes, epsilon, y_type, [self.used_output(0), None, self.used_output(1)])
    }

    /// SkipSimplifiedLayerNormalization: `s = (input + skip) + bias`, then the RMS
    /// norm of `s` over the last axis with gamma; outputs output, mean (zeros in
    /// ORT 1.32), inv_std_var, input_skip_bias_sum = s. epsilon defaults to 1e-12.
    fn skip_simplified_layer_norm(&mut self) -> Result<(), Refusal> {
        let (input, skip, gamma) = (self.required(0, "input")?, self.required(1, "skip")?, self.required(2, "gamma")?);
        let dtype = self.float_type(input)?;
        let sum = self.skip_sum(input, skip, self.input(3), self.used_output(3));
        let epsilon = self.float_attr("epsilon", 1e-12);
        let outputs = [self.used_output(0), self.used_output(1), self.used_output(2)];
        self.rms_norm((&sum, dtype), gamma, &[-1], epsilon, dtype, outputs)
    }

    /// EmbedLayerNormalization:
    /// `e = (word_embedding[input_ids] + position_embedding[position_ids or 0..S])
    ///      + segment_embedding[segment_ids]`,
    /// `output = LayerNormalization(e, gamma, beta; axis -1, epsilon 1e-12 default)`,
    /// `mask_index[b] = count(mask[b, :] == 1)` as int32 (zeros without a mask: ORT
    /// 1.32 counts ones, measured), `embedding_sum = e`.
    fn embed_layer_norm(&mut self) -> Result<(), Refusal> {
        let ids = self.required(0, "input_ids")?;
        let words = self.required(2, "word_embedding")?;
        let positions_table = self.required(3, "position_embedding")?;
        let (gamma, beta) = (self.required(5, "gamma")?, self.required(6, "beta")?);
        self.float_type(words)?;
        let word = self.op("Gather", &[words, ids], "word");
        let position = match self.input(8) {
            Some(position_ids) => self.op("Gather", &[positions_table, position_ids], "position"),
            None => {
                let len = self.op_with("Shape", &[ids], vec![("start", AttrValue::Int(1)), ("end", AttrValue::Int(2))], "sequence_length");
                let starts = self.ints(&[0]);
                let axes = self.ints(&[0]);
                self.op("Slice", &[positions_table, &starts, &len, &axes], "position")
            }
        };
        let segment = match (self.input(1), self.input(4)) {
            (Some(segment_ids), Some(table)) => Some(self.op("Gather", &[table, segment_ids], "segment")),
            (None, None) => None,
            _ => return Err("segment_ids and segment_embedding must be given together".into()),
        };
        let sum_output = self.used_output(2);
        let sum = match segment {
            Some(segment) => {
                let partial = self.op("Add", &[&word, &position], "word_position");
                self.op_into("Add", &[&partial, &segment], Vec::new(), sum_output, "embedding_sum")
            }
            None => self.op_into("Add", &[&word, &position], Vec::new(), sum_output, "embedding_sum"),
        };
        let epsilon = self.float_attr("epsilon", 1e-12);
        self.layer_norm(&sum, gamma, Some(beta), epsilon, [self.used_output(0), None, None]);
        if let Some(mask_index) = self.used_output(1) {
            match self.input(7) {
                Some(mask) => {
                    let mask_type = self.types.elem_type(mask).ok_or("the element type of the mask is unknown")?;
                    let one = self.int_scalar(mask_type, 1)?;
                    let ones = self.op("Equal", &[mask, &one], "mask_is_one");
                    let ones = self.cast(&ones, DataType::Int32, "mask_ones");
                    let axes = self.ints(&[1]);
                    let keep = ("keepdims", AttrValue::Int(0));
                    self.op_into("ReduceSum", &[&ones, &axes], vec![keep], Some(mask_index), "mask_index");
                }
                None => {
                    let batch = self.op_with("Shape", &[ids], vec![("start", AttrValue::Int(0)), ("end", AttrValue::Int(1))], "batch");
                    let zero = Tensor::from_raw("value", DataType::Int32, vec![1], Bytes::from(0i32.to_le_bytes().to_vec()));
                    self.emit("ConstantOfShape", &[&batch], vec![("value", AttrValue::Tensor(zero))], &[mask_index]);
                }
            }
        }
        Ok(())
    }

    /// MultiHeadAttention, separate Q/K/V [B,S,D], [B,L,D], [B,L,Dv], no cache:
    /// `q, k, v = query + bias[:D], key + bias[D:2D], value + bias[2D:]`, split into
    /// N heads; `scores = scale * q @ k^T + (attention_bias + mask)` where the mask
    /// is 0 for kept keys and mask_filter_value (default -10000) for padded ones
    /// (`key_padding_mask` (B) lengths, (B,L) or (B,S,L) 1/0), and lowest() for
    /// future keys when unidirectional; `output = merge_heads(softmax(scores) @ v)`.
    /// scale defaults to 1/sqrt(D/N).
    fn multi_head_attention(&mut self) -> Result<(), Refusal> {
        let num_heads = self.positive_attr("num_heads")?;
        let query = self.required(0, "query")?;
        let dtype = self.float_type(query)?;
        if self.rank(query)? != 3 {
            return Err("only a 3-D query (batch, sequence, hidden) is supported, not packed QKV".into());
        }
        let key = self.input(1).ok_or("packed QKV (no key input) is not supported")?;
        let value = self.input(2).ok_or("packed KV (no value input) is not supported")?;
        if self.rank(key)? != 3 || self.rank(value)? != 3 {
            return Err("key and value must be 3-D (batch, kv_sequence, hidden); BNSH or packed forms are not supported".into());
        }
        self.refuse_inputs(&[(8, "past_sequence_length"), (9, "cache_indirection")])?;
        self.refuse_outputs(&[(3, "qk")])?;
        let past = match (self.input(6), self.input(7)) {
            (Some(k), Some(v)) => Some((k, v)),
            (None, None) => None,
            _ => return Err("past_key and past_value must be given together".into()),
        };
        if past.is_none() {
            self.refuse_outputs(&[(1, "present_key"), (2, "present_value")])?;
        }
        let unidirectional = self.int_attr("unidirectional", 0) != 0;
        if past.is_some() && (unidirectional || self.input(4).is_some()) {
            return Err("a past cache with unidirectional or key_padding_mask is not supported (attention_bias is)".into());
        }
        if unidirectional {
            let same = matches!((self.shape(query), self.shape(key)), (Some(q), Some(k)) if q[1] == k[1] && q[1] != Dim::Unknown);
            if !same {
                return Err(
                    "unidirectional needs the query and key sequence lengths provably equal (ORT 1.32's CPU causal mask is not a triangle otherwise)".into()
                );
            }
        }
        let hidden = self.fixed_dim(query, -1);
        let head_size = hidden.filter(|h| h % num_heads == 0).map(|h| h / num_heads);
        let scale = self.scale(head_size, "the query's hidden size is not a fixed multiple of num_heads")?;
        let (query, key, value) = match self.input(3) {
            Some(bias) => {
                let hidden = hidden.ok_or("with a bias input the query's hidden size must be known")?;
                let q_bias = self.slice_last(bias, 0, hidden, "query_bias");
                let k_bias = self.slice_last(bias, hidden, 2 * hidden, "key_bias");
                let v_bias = self.slice_last(bias, 2 * hidden, i64::MAX, "value_bias");
                (
                    self.op("Add", &[query, &q_bias], "query_biased"),
                    self.op("Add", &[key, &k_bias], "key_biased"),
                    self.op("Add", &[value, &v_bias], "value_biased"),
                )
            }
            None => (query.to_string(), key.to_string(), value.to_string()),
        };
        let padding = match self.input(4) {
            Some(mask) => {
                let filter = self.float_attr("mask_filter_value", -10000.0);
                Some(self.padding_bias(mask, &query, &key, dtype, filter)?)
            }
            None => None,
        };
        let bias = self.attention_bias(padding, unidirectional.then_some(query.as_str()), self.input(5), dtype);
        let rule = ScoreRule { scale, additive: bias.as_deref(), visible: None, dtype };
        match past {
            None => self.heads_attention(&query, &key, &value, num_heads, &rule),
            Some(past) => self.cached_heads_attention(&query, &key, &value, past, num_heads, &rule),
        }
        Ok(())
    }

    /// Splits q [B,S,N*H], k [B,T,N*H], v [B,T,N*Hv] into heads, attends, and
    /// merges the heads of the result into output 0 [B,S,N*Hv].
    fn heads_attention(&mut self, query: &str, key: &str, value: &str, num_heads: i64, rule: &ScoreRule) {
        let q = self.split_heads(query, num_heads, "q");
        let k = self.reshape(key, &[0, 0, num_heads, -1], None, "k_split");
        let k_t = self.transpose(&k, &[0, 2, 3, 1], None, "k_heads_t");
        let v = self.split_heads(value, num_heads, "v");
        self.attend_and_merge(&q, &k_t, &v, rule);
    }

    /// x [B,S,N*H] as heads [B,N,S,H] (`{what}_split`, `{what}_heads`).
    fn split_heads(&mut self, x: &str, num_heads: i64, what: &str) -> String {
        let split = self.reshape(x, &[0, 0, num_heads, -1], None, &format!("{what}_split"));
        self.transpose(&split, &[0, 2, 1, 3], None, &format!("{what}_heads"))
    }

    /// MultiHeadAttention over a KV cache: the new K/V heads appended to
    /// past_key/value (B, N, P, H) along the length axis are the present outputs
    /// (B, N, P+S, H), and the queries attend over all of them; masking is the
    /// attention_bias's alone (ORT 1.32 measured: a decode step and a batched
    /// 2-token step with left padding, 2e-7).
    fn cached_heads_attention(&mut self, query: &str, key: &str, value: &str, past: (&str, &str), num_heads: i64, rule: &ScoreRule) {
        let q = self.split_heads(query, num_heads, "q");
        let k = self.split_heads(key, num_heads, "k");
        let v = self.split_heads(value, num_heads, "v");
        let axis = vec![("axis", AttrValue::Int(2))];
        let (present_key, present_value) = (self.used_output(1), self.used_output(2));
        let k = self.op_into("Concat", &[past.0, &k], axis.clone(), present_key, "present_key");
        let v = self.op_into("Concat", &[past.1, &v], axis, present_value, "present_value");
        let k_t = self.transpose(&k, &[0, 1, 3, 2], None, "k_heads_t");
        self.attend_and_merge(&q, &k_t, &v, rule);
    }

    /// softmax(q k^T) v over heads q [B,N,S,H], k^T [B,N,H,T], v [B,N,T,Hv],
    /// merged into output 0 [B,S,N*Hv].
    fn attend_and_merge(&mut self, q: &str, k_t: &str, v: &str, rule: &ScoreRule) {
        let context = self.attend(q, k_t, v, rule);
        let merged = self.transpose(&context, &[0, 2, 1, 3], None, "context_bsnh");
        let output = self.used_output(0);
        self.reshape(&merged, &[0, 0, -1], output, "out");
    }

    /// Attention (packed QKV weights, no cache):
    /// `q, k, v = split(input @ weights + bias, qkv_hidden_sizes or thirds)`, then as
    /// MultiHeadAttention with `mask_index` as the key padding mask ((B) lengths,
    /// (B,T) or (B,S,T) 1/0) and future keys at lowest() when unidirectional.
    fn attention(&mut self) -> Result<(), Refusal> {
        let num_heads = self.positive_attr("num_heads")?;
        let (input, weights) = (self.required(0, "input")?, self.required(1, "weights")?);
        let dtype = self.float_type(input)?;
        if self.rank(input)? != 3 {
            return Err("input must be 3-D (batch, sequence, hidden)".into());
        }
        self.refuse_inputs(&[(4, "past"), (6, "past_sequence_length")])?;
        self.refuse_outputs(&[(1, "present")])?;
        if self.int_attr("do_rotary", 0) != 0 {
            return Err("do_rotary is not supported".into());
        }
        let sizes: Vec<i64> = match self.node.attr_ints("qkv_hidden_sizes") {
            Some(sizes) if sizes.len() == 3 => sizes.to_vec(),
            Some(_) => return Err("qkv_hidden_sizes must have three values".into()),
            None => {
                let total = self.fixed_dim(weights, -1).ok_or("the weights' last dim is unknown")?;
                if total % 3 != 0 {
                    return Err(format!("the weights' last dim {total} is not divisible by 3"));
                }
                vec![total / 3; 3]
            }
        };
        if sizes[0] != sizes[1] || sizes.iter().any(|&s| s <= 0 || s % num_heads != 0) {
            return Err(format!("qkv hidden sizes {sizes:?} must be positive multiples of num_heads with Q and K equal"));
        }
        let scale = self.scale(Some(sizes[0] / num_heads), "")?;
        let projected = self.op("MatMul", &[input, weights], "qkv");
        let projected = match self.input(2) {
            Some(bias) => self.op("Add", &[&projected, bias], "qkv_biased"),
            None => projected,
        };
        let qkv = self.split_last(&projected, &sizes, &["q", "k", "v"]);
        let padding = match self.input(3) {
            Some(mask) => {
                let filter = self.float_attr("mask_filter_value", -10000.0);
                Some(self.padding_bias(mask, input, input, dtype, filter)?)
            }
            None => None,
        };
        let causal = (self.int_attr("unidirectional", 0) != 0).then_some(input);
        let bias = self.attention_bias(padding, causal, self.input(5), dtype);
        let rule = ScoreRule { scale, additive: bias.as_deref(), visible: None, dtype };
        self.heads_attention(&qkv[0], &qkv[1], &qkv[2], num_heads, &rule);
        Ok(())
    }

    /// com.microsoft RotaryEmbedding (input, position_ids, cos_cache, sin_cache):
    /// per head, with `r = rotary_embedding_dim or head_size`, `c, s = cos_cache[p],
    /// sin_cache[p]` (p = position_ids (B,S), or position_ids[0] + 0..S for a (1)
    /// tensor) and x1, x2 the halves of `x[..r]` (or its even and odd elements when
    /// interleaved): `x1' = c*x1 - s*x2`, `x2' = s*x1 + c*x2`; `x[r..]` passes through.
    /// Input (B,S,N*H) or (B,N,S,H). ORT 1.32's CPU kernel ignores `scale` (measured).
    fn rotary_embedding(&mut self) -> Result<(), Refusal> {
        let x = self.required(0, "input")?;
        let position_ids = self.required(1, "position_ids")?;
        let (cos_cache, sin_cache) = (self.required(2, "cos_cache")?, self.required(3, "sin_cache")?);
        self.float_type(x)?;
        if self.int_attr("is_packed_batching", 0) != 0 {
            return Err("is_packed_batching is not supported".into());
        }
        let rank = self.rank(x)?;
        let num_heads = self.int_attr("num_heads", 0);
        let rotary_dim = self.int_attr("rotary_embedding_dim", 0);
        let from_cache = self.fixed_dim(cos_cache, -1).map(|half| 2 * half);
        let head_size = match rank {
            4 => self.fixed_dim(x, -1),
            3 if num_heads > 0 => self.fixed_dim(x, -1).filter(|d| d % num_heads == 0).map(|d| d / num_heads),
            // ORT infers the head size from the cache when num_heads is not given
            3 if rotary_dim == 0 => from_cache,
            3 => return Err("rotary_embedding_dim needs num_heads with a 3-D input".into()),
            _ => return Err(format!("a {rank}-D input is not supported")),
        }
        .ok_or("the head size is unknown")?;
        let rotary = if rotary_dim > 0 { rotary_dim } else { head_size };
        if rotary % 2 != 0 || rotary > head_size {
            return Err(format!("rotary dim {rotary} must be even and at most the head size {head_size}"));
        }
        let half = rotary / 2;
        // layout [B, S, N, H] (3-D input) or [B, N, S, H]; caches broadcast on the head axis
        let (x4, sequence_axis, head_axis) = match rank {
            3 => (self.reshape(x, &[0, 0, -1, head_size], None, "x_heads"), 1, 2),
            _ => (x.to_string(), 2, 1),
        };
        let positions = match self.rank(position_ids)? {
            2 => position_ids.to_string(),
            1 => {
                let offsets = self.positions(&x4, sequence_axis, "sequence_positions");
                let positions = self.op("Add", &[position_ids, &offsets], "positions");
                self.unsqueeze(&positions, &[0], "positions_row")
            }
            other => return Err(format!("{other}-D position_ids are not supported")),
        };
        let cos = self.op("Gather", &[cos_cache, &positions], "cos");
        let sin = self.op("Gather", &[sin_cache, &positions], "sin");
        let cos = self.unsqueeze(&cos, &[head_axis], "cos_heads");
        let sin = self.unsqueeze(&sin, &[head_axis], "sin_heads");
        let rotated_part = if rotary < head_size { self.slice_last(&x4, 0, rotary, "x_rotary") } else { x4.clone() };
        let interleaved = self.int_attr("interleaved", 0) != 0;
        let (x1, x2, cos, sin) = if interleaved {
            let pairs = self.reshape(&rotated_part, &[0, 0, 0, -1, 2], None, "x_pairs");
            let x1 = self.slice_last(&pairs, 0, 1, "x_even");
            let x2 = self.slice_last(&pairs, 1, 2, "x_odd");
            let cos = self.unsqueeze(&cos, &[-1], "cos_pairs");
            let sin = self.unsqueeze(&sin, &[-1], "sin_pairs");
            (x1, x2, cos, sin)
        } else {
            let x1 = self.slice_last(&rotated_part, 0, half, "x_first_half");
            let x2 = self.slice_last(&rotated_part, half, rotary, "x_second_half");
            (x1, x2, cos, sin)
        };
        let cos_x1 = self.op("Mul", &[&cos, &x1], "cos_x1");
        let sin_x2 = self.op("Mul", &[&sin, &x2], "sin_x2");
        let real = self.op("Sub", &[&cos_x1, &sin_x2], "real");
        let sin_x1 = self.op("Mul", &[&sin, &x1], "sin_x1");
        let cos_x2 = self.op("Mul", &[&cos, &x2], "cos_x2");
        let imaginary = self.op("Add", &[&sin_x1, &cos_x2], "imaginary");
        let output = self.used_output(0);
        let partial = rotary < head_size;
        // the last op writes the contrib output
        let rotated_target = if rank == 4 && !partial { output } else { None };
        let concat_target = if interleaved { None } else { rotated_target };
        let axis = ("axis", AttrValue::Int(-1));
        let mut rotated = self.op_into("Concat", &[&real, &imaginary], vec![axis.clone()], concat_target, "rotated");
        if interleaved {
            rotated = self.reshape(&rotated, &[0, 0, 0, -1], rotated_target, "rotated_flat");
        }
        let whole = if partial {
            let pass_through = self.slice_last(&x4, rotary, head_size, "x_pass");
            let target = if rank == 4 { output } else { None };
            self.op_into("Concat", &[&rotated, &pass_through], vec![axis], target, "out_heads")
        } else {
            rotated
        };
        if rank == 3 {
            self.reshape(&whole, &[0, 0, -1], output, "out");
        }
        Ok(())
    }

    /// GroupQueryAttention: q (B,S,N*H), k and v (B,S,KV*H) (or packed in query);
    /// with a cache, past_key/value (B,KV,P,H) come first: present_key/value =
    /// Concat(past, new heads) along the length axis (B,KV,P+S,H), else the new
    /// heads alone. Query head i reads KV head i / (N/KV). Query s of row b sits at
    /// position `q_b + s`, `q_b = 0` for the first prompt (S equal to
    /// total_sequence_length), else `seqlens_k[b] + 1 - S`; key j is visible to it
    /// iff `j <= seqlens_k[b]` and, when causal (default), `j <= q_b + s`, and with
    /// local_window_size W > 0 also `q_b + s - j < W`; attention_bias (B or 1, 1,
    /// S, P+S) is added to the scaled scores;
    /// `output = merge_heads(softmax(scale * q @ k^T + bias over visible keys) @ v)`.
    /// Measured on ORT 1.32: padded query rows see only the valid keys as well,
    /// and a row that sees no key is zero.
    fn group_query_attention(&mut self) -> Result<(), Refusal> {
        let num_heads = self.positive_attr("num_heads")?;
        let kv_heads = self.positive_attr("kv_num_heads")?;
        if num_heads % kv_heads != 0 {
            return Err(format!("num_heads {num_heads} is not a multiple of kv_num_heads {kv_heads}"));
        }
        let query = self.required(0, "query")?;
        let seqlens = self.required(5, "seqlens_k")?;
        self.required(6, "total_sequence_length")?;
        let dtype = self.float_type(query)?;
        if self.rank(query)? != 3 {
            return Err("query must be 3-D".into());
        }
        self.refuse_inputs(&[
            (7, "cos_cache"),
            (8, "sin_cache"),
            (9, "position_ids"),
            (11, "head_sink"),
            (12, "k_scale"),
            (13, "v_scale"),
            (14, "q_norm_weight"),
            (15, "k_norm_weight"),
            (16, "query_seqlens"),
        ])?;
        self.refuse_outputs(&[(3, "output_qk")])?;
        for attr in ["do_rotary", "smooth_softmax", "qk_output", "sliding_window_cache"] {
            // 0 is off for each; smooth_softmax's default is -1, also off
            if self.int_attr(attr, 0) > 0 {
                return Err(format!("{attr} is not supported"));
            }
        }
        if self.float_attr("softcap", 0.0) != 0.0 {
            return Err("softcap is not supported".into());
        }
        let packed = self.input(1).is_none();
        let query_heads = if packed { num_heads + 2 * kv_heads } else { num_heads };
        let head_size = self.fixed_dim(query, -1).filter(|d| d % query_heads == 0).map(|d| d / query_heads);
        let scale = self.scale(head_size, "the query's hidden size is not a fixed multiple of the heads")?;
        let (q, k, v) = if packed {
            let h = head_size.ok_or("packed QKV needs a known hidden size")?;
            let parts = self.split_last(query, &[num_heads * h, kv_heads * h, kv_heads * h], &["q", "k", "v"]);
            (parts[0].clone(), parts[1].clone(), parts[2].clone())
        } else {
            let value = self.input(2).ok_or("key without value")?;
            (query.to_string(), self.input(1).unwrap_or_default().to_string(), value.to_string())
        };
        let group = num_heads / kv_heads;
        // q [B, KV, G, S, H] against k, v [B, KV, 1, T, H]: MatMul broadcasts the group
        let q = self.reshape(&q, &[0, 0, kv_heads, group, -1], None, "q_split");
        let q = self.transpose(&q, &[0, 2, 3, 1, 4], None, "q_groups");
        let k = self.reshape(&k, &[0, 0, kv_heads, -1], None, "k_split");
        let v = self.reshape(&v, &[0, 0, kv_heads, -1], None, "v_split");
        let present_key = self.used_output(1);
        let present_value = self.used_output(2);
        let (past_key, past_value) = (self.input(3), self.input(4));
        if past_key.is_some() != past_value.is_some() {
            return Err("past_key and past_value must be given together".into());
        }
        let cached = past_key.zip(past_value);
        let (k_target, v_target) = if cached.is_some() { (None, None) } else { (present_key, present_value) };
        let mut k_heads = self.transpose(&k, &[0, 2, 1, 3], k_target, "k_heads");
        let mut v_heads = self.transpose(&v, &[0, 2, 1, 3], v_target, "v_heads");
        let lengths = self.cast(seqlens, DataType::Int64, "last_valid_key");
        let lengths = self.unsqueeze(&lengths, &[1], "last_valid_key_column");
        let query_positions = self.positions(query, 1, "query_positions");
        // where row b's new tokens sit [B, 1]: after its past of seqlens_k + 1 - S
        // rows, or at 0 for the first prompt (S = total_sequence_length)
        let offset = match cached {
            None => None,
            Some((past_key, past_value)) => {
                if self.int_attr("past_present_share_buffer", 0) != 0 {
                    return Err("a past buffer shared with present is not supported".into());
                }
                let total = self.required(6, "total_sequence_length")?;
                let total = self.cast(total, DataType::Int64, "total_length");
                let new = self.op_with("Shape", &[query], vec![("start", AttrValue::Int(1)), ("end", AttrValue::Int(2))], "new_len");
                let new = self.squeeze(&new, &[0], "new_count");
                let first_prompt = self.op("Equal", &[&new, &total], "first_prompt");
                let one = self.int_scalar(DataType::Int64, 1)?;
                let zero = self.int_scalar(DataType::Int64, 0)?;
                let after_last = self.op("Add", &[&lengths, &one], "key_count");
                let offset = self.op("Sub", &[&after_last, &new], "past_count");
                let offset = self.op("Where", &[&first_prompt, &zero, &offset], "query_offset");
                k_heads = self.cache_rows(past_key, &k_heads, &offset, &new, present_key, "present_key");
                v_heads = self.cache_rows(past_value, &v_heads, &offset, &new, present_value, "present_value");
                Some(offset)
            }
        };
        let k_t = self.transpose(&k_heads, &[0, 1, 3, 2], None, "k_heads_t");
        let k_t = self.unsqueeze(&k_t, &[2], "k_groups_t");
        let v5 = self.unsqueeze(&v_heads, &[2], "v_groups");
        // visibility [B, 1, 1, S, T]
        let key_positions = self.positions(&k_heads, 2, "key_positions");
        let k_pos = self.unsqueeze(&key_positions, &[0], "key_row");
        let valid = self.op("LessOrEqual", &[&k_pos, &lengths], "key_valid");
        let mut keep = self.unsqueeze(&valid, &[1, 2, 3], "key_valid_5d");
        // query positions [B or 1, S, 1]: offset + s
        let q_pos = match offset {
            None => self.unsqueeze(&query_positions, &[0, 2], "query_column"),
            Some(offset) => {
                let row = self.unsqueeze(&query_positions, &[0], "query_row");
                let q_pos = self.op("Add", &[&offset, &row], "query_position");
                self.unsqueeze(&q_pos, &[2], "query_column")
            }
        };
        if self.int_attr("causal", 1) != 0 {
            let past = self.op("LessOrEqual", &[&k_pos, &q_pos], "causal");
            let past = self.unsqueeze(&past, &[1, 2], "causal_5d");
            keep = self.op("And", &[&keep, &past], "causal_valid");
            let window = self.int_attr("local_window_size", -1);
            if window == 0 {
                return Err("local_window_size 0 is not supported (ORT 1.32's result for it follows no window rule; measured)".into());
            }
            if window > 0 {
                // the window holds `window` keys, the query's own included (measured on ORT 1.32)
                let distance = self.op("Sub", &[&q_pos, &k_pos], "distance");
                let limit = self.int_scalar(DataType::Int64, window)?;
                let near = self.op("Less", &[&distance, &limit], "in_window");
                let near = self.unsqueeze(&near, &[1, 2], "in_window_5d");
                keep = self.op("And", &[&keep, &near], "windowed_valid");
            }
        } else if self.int_attr("local_window_size", -1) != -1 {
            return Err("local_window_size needs causal=1".into());
        }
        let bias = match self.input(10) {
            None => None,
            Some(bias) => match self.shape(bias) {
                Some([_, heads, _, _]) if heads.fixed() == Some(1) => Some(self.unsqueeze(bias, &[2], "bias_5d")),
                _ => return Err("attention_bias must be (B or 1, 1, S, T): per-head biases are not supported".into()),
            },
        };
        let rule = ScoreRule { scale, additive: bias.as_deref(), visible: Some(&keep), dtype };
        let context = self.attend(&q, &k_t, &v5, &rule);
        let merged = self.transpose(&context, &[0, 3, 1, 2, 4], None, "context_bsgh");
        let output = self.used_output(0);
        self.reshape(&merged, &[0, 0, -1], output, "out");
        Ok(())
    }
}
