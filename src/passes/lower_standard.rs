//! `lower-standard-ops`: replaces the standard ONNX ops that tract-onnx 0.23.9
//! cannot run faithfully by standard ops it can, for verification only (like
//! `lower_contrib` for com.microsoft ops; the portable target ships the ops
//! themselves).
//!
//! What tract does with the opset 20-23 ops the portable target may emit, each
//! run as a one-node model against ONNX Runtime 1.32 (float32 unless said):
//! - `Gelu`-20 (none, tanh; float16 too): faithful (max abs 2.1e-6 on |y| < 6).
//!   Not lowered. (tract has no float64 tanh Gelu: it fails, loudly.)
//! - `RotaryEmbedding`-23 (3-D and 4-D, interleaved, partial, with and without
//!   position_ids): faithful (2.4e-7). Not lowered.
//! - `RMSNormalization`-23: faithful with the default `stash_type` (float), but
//!   tract ignores `stash_type` and always computes in float32 (float64 with
//!   stash_type double: 1.1e-7 from ORT, which computes in float64: 6e-13 from
//!   numpy). Lowered.
//! - `Attention`-23: faithful for plain, GQA, float-masked and past-free causal
//!   attention, but with `is_causal` and a `past_key` tract aligns the causal
//!   mask top-left (query i sees keys j <= i) where ONNX and ORT align it
//!   bottom-right (j <= i + past length): max abs 2.5 on a 3-query, 2-past case;
//!   and it rejects boolean masks and `softcap`. Lowered, every form.
//!
//! - `QuantizeLinear` whose scale is computed at run time (per-token
//!   quantization): tract 0.23.9 refuses it ("y_scale must be a const").
//!   Lowered, at any opset (blocked only with one block along the axis, the
//!   per-token form), to its definition
//!   `y = saturate(round(x / y_scale) + y_zero_point)`: Div, Round (half to
//!   even, as QuantizeLinear), Add, Clip to the output type's range, Cast.
//!   Exact: the same float32 division, and everything after it is on integers.
//!
//! Semantics followed: the ONNX-23 schemas (their function bodies, from onnx
//! 1.23), and ONNX Runtime 1.32's CPU kernels where those differ, measured:
//! - Attention: scores `s = scale * q @ k^T` (scale defaults to
//!   `1/sqrt(head_size)`), then `softcap * tanh(s / softcap)` when softcap > 0,
//!   then the bias: a float mask is added; a boolean mask adds 0 where true and
//!   `lowest()` where false; causal hides keys `j > i + past_length` by setting
//!   the bias there to `lowest()` (ORT overlays rather than adds); softmax over
//!   the keys; a row whose biased scores are all <= `lowest()` (every key
//!   hidden, or a float mask of `lowest()` or -inf) is zero. That last rule is
//!   ORT's: ONNX's function body zeroes only rows whose bias is -inf throughout,
//!   and gives a row masked by `lowest()` (torch's `finfo.min`, what exporters
//!   write) uniform weights. K and V heads are repeated for GQA (query head n
//!   reads KV head n / (q_heads / kv_heads)); `past_key`/`past_value` are
//!   prepended along the sequence axis and are the present outputs.
//!   ORT 1.32 skips the causal mask when there is one query and a past, which
//!   differs from the rule above only if that query comes with more than one
//!   new key; this lowering follows ONNX there.
//! - RMSNormalization: the function body: `xs = Cast(x, stash_type)`,
//!   `y = Cast(xs / sqrt(mean(xs^2 over axis..) + epsilon), T) * scale`.
//!
//! Exactness: the same formulas in the same association as ORT's kernel, so
//! float32 results differ by rounding only (`tests/scripts/check_lowerings.py`
//! runs each case of `tests/lower_standard.rs` in ORT both ways).
//!
//! Refused (the pass fails, naming the node and the reason): Attention on types
//! other than float32 (ORT computes float16 attention partly in float32, which
//! this does not replicate), its `qk_matmul_output` output, a `softmax_precision`
//! other than float, integer masks, head counts or head sizes that are not
//! known numbers where needed; RMSNormalization whose scale type is not x's.
//! Attention and RMSNormalization are lowered only in a model importing opset 23
//! or later (before 23 a default-domain Attention is no ONNX op); nodes inside
//! subgraphs are not lowered.
//!
//! Also lowered, at any opset: `DequantizeLinear` of a constant int4 or uint4
//! tensor (opset 21; `quantize-int4`'s portable form), which tract-onnx 0.23.9
//! cannot load, becomes its float32 value as a constant (exact: see
//! `dequantize_constant`).
//!
//! Sketch (4-D attention, no mask):
//! ```text
//! y = Attention(q, k, v) {is_causal=1}
//!   ->
//! y/scores = Mul(MatMul(q, Transpose(k) {perm=[0,1,3,2]}), y/scale)
//! y/biased = Add(y/scores, Where(y/visible, 0, lowest))    (visible: j <= i + past)
//! y        = MatMul(Where(y/empty_row, 0, Softmax(y/biased)), v)
//! ```
//! New tensors are named `{first output}/{what}`; the lowered ops write the
//! node's own output names, so readers and graph outputs are untouched.

use super::lowering::{Emitter, Refusal};
use super::{run_pipeline, DriverOptions, Pass, PassError, PassRecord};
use crate::ir::{infer_types, AttrValue, DataType, Graph, Model, Node, NodeId, Patch, Tensor, TypeMap};
use bytes::Bytes;
use half::{bf16, f16};
use std::collections::{HashMap, HashSet};

/// The pass. See the module documentation.
pub struct LowerStandardOps;

/// Why a node could not be lowered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("node '{node}' ({op}): {reason}")]
pub struct LowerError {
    pub node: String,
    pub op: String,
    pub reason: String,
}

/// The opset at which the ops lowered here appear.
const OPSET: i64 = 23;

impl Pass for LowerStandardOps {
    fn name(&self) -> &'static str {
        "lower-standard-ops"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let opset = model.opset("").unwrap_or(0);
        let targets: Vec<NodeId> = model
            .graph
            .nodes_with_ids()
            .into_iter()
            .filter(|(_, n)| needs_lowering(&model.graph, n, opset) || dequantizes_constant_int4(&model.graph, n))
            .map(|(id, _)| id)
            .collect();
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let types = infer_types(model);
        let failed = |e: LowerError| PassError::Failed { pass: self.name().into(), message: e.to_string() };
        targets.into_iter().map(|id| lower_node(model, &types, id).map_err(failed)).collect()
    }
}

/// `true` for the nodes this pass replaces in a model importing `opset`.
pub fn needs_lowering(graph: &Graph, node: &Node, opset: i64) -> bool {
    let opset_23_op = opset >= OPSET && (node.is_onnx("Attention") || node.is_onnx("RMSNormalization"));
    let computed_scale = node.is_onnx("QuantizeLinear") && node.inputs.get(1).is_some_and(|s| graph.initializer(s).is_none());
    opset_23_op || computed_scale
}

/// `true` for a DequantizeLinear of a constant int4 or uint4 tensor (opset 21),
/// which tract-onnx 0.23.9 cannot load: lowered to its float value.
pub fn dequantizes_constant_int4(graph: &Graph, node: &Node) -> bool {
    node.is_onnx("DequantizeLinear")
        && node.inputs.first().and_then(|x| graph.initializer(x)).is_some_and(|t| matches!(t.dtype, DataType::Int4 | DataType::Uint4))
}

/// Runs the pass to its fixpoint (what `verify_rewrite` does to both models).
pub fn lower_standard_ops(model: &mut Model, options: &DriverOptions) -> Result<PassRecord, PassError> {
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(LowerStandardOps)];
    Ok(run_pipeline(model, &passes, options)?.pop().unwrap_or_default())
}

/// The patch that replaces node `id`, or why it cannot be.
pub fn lower_node(model: &Model, types: &TypeMap, id: NodeId) -> Result<Patch, LowerError> {
    let Some(node) = model.graph.node(id) else {
        return Err(LowerError { node: format!("{id:?}"), op: "?".into(), reason: "no such node".into() });
    };
    let mut lowering = Lowering::new(model, types, node, id);
    let lowered = match node.op_type.as_str() {
        "Attention" => lowering.attention(),
        "RMSNormalization" => lowering.rms_normalization(),
        "QuantizeLinear" => lowering.quantize_linear(),
        "DequantizeLinear" => lowering.dequantize_constant(),
        other => Err(format!("{other} is not lowered here")),
    };
    lowered.map_err(|reason| LowerError { node: node.name_or_output().to_string(), op: node.op_type.clone(), reason })?;
    Ok(lowering.patch)
}

/// Builds one node's replacement into a patch: fresh names under the node's
/// first output, constants as initializers (named by what they hold, added
/// once); the shared helpers are `lowering::Emitter`'s.
struct Lowering<'m> {
    node: &'m Node,
    model: &'m Model,
    types: &'m TypeMap,
    root: String,
    taken: HashMap<String, usize>,
    constants: HashSet<String>,
    patch: Patch,
}

impl<'m> Emitter<'m> for Lowering<'m> {
    fn node(&self) -> &'m Node {
        self.node
    }

    fn graph(&self) -> &'m Graph {
        &self.model.graph
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

    fn op_into(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, AttrValue)>, output: Option<&str>, what: &str) -> String {
        let out = output.map_or_else(|| self.fresh(what), str::to_string);
        let mut node = Node::new(op, inputs, &[&out]);
        for (key, value) in attrs {
            node = node.with_attr(key, value);
        }
        self.patch.add_node(node);
        out
    }

    /// A constant initializer named `{root}/{what}`, added once.
    fn constant(&mut self, what: &str, dtype: DataType, dims: Vec<i64>, raw: Vec<u8>) -> String {
        let name = format!("{}/{what}", self.root);
        if self.constants.insert(name.clone()) {
            self.patch.add_initializer(Tensor::from_raw(name.clone(), dtype, dims, Bytes::from(raw)));
        }
        name
    }
}

impl<'m> Lowering<'m> {
    fn new(model: &'m Model, types: &'m TypeMap, node: &'m Node, id: NodeId) -> Lowering<'m> {
        let root = node.outputs.iter().find(|o| !o.is_empty()).cloned().unwrap_or_else(|| node.name.clone());
        let mut patch = Patch::new(format!("lower {}", node.op_type));
        patch.remove_node(id);
        Lowering { node, model, types, root, taken: HashMap::new(), constants: HashSet::new(), patch }
    }

    // ---- reading the node ----

    fn elem_type(&self, name: &str) -> Result<DataType, Refusal> {
        self.types.elem_type(name).ok_or_else(|| format!("the element type of '{name}' is unknown"))
    }

    // ---- emitting ----

    /// A scalar constant of a float type.
    fn float_scalar(&mut self, what: &str, dtype: DataType, value: f64) -> Result<String, Refusal> {
        let raw = match dtype {
            DataType::Float => (value as f32).to_le_bytes().to_vec(),
            DataType::Double => value.to_le_bytes().to_vec(),
            DataType::Float16 => f16::from_f64(value).to_le_bytes().to_vec(),
            DataType::Bfloat16 => bf16::from_f64(value).to_le_bytes().to_vec(),
            other => return Err(format!("{other} is not a float type")),
        };
        Ok(self.constant(&format!("{dtype}:{what}"), dtype, Vec::new(), raw))
    }

    /// Dim `axis` of `x` as an int64 scalar, at run time.
    fn dim(&mut self, x: &str, axis: i64, what: &str) -> String {
        let attrs = vec![("start", AttrValue::Int(axis)), ("end", AttrValue::Int(axis + 1))];
        let dim = self.op_into("Shape", &[x], attrs, None, &format!("{what}_1d"));
        let axes = self.ints(&[0]);
        self.op("Squeeze", &[&dim, &axes], what)
    }

    /// `0, 1, .., n-1` (int64) where `n` is dim `axis` of `x`.
    fn positions(&mut self, x: &str, axis: i64, what: &str) -> String {
        let len = self.dim(x, axis, &format!("{what}_count"));
        let zero = self.constant("int64:0", DataType::Int64, Vec::new(), 0i64.to_le_bytes().to_vec());
        let one = self.constant("int64:1", DataType::Int64, Vec::new(), 1i64.to_le_bytes().to_vec());
        self.op("Range", &[&zero, &len, &one], what)
    }

    // ---- the lowerings ----

    /// QuantizeLinear(x, y_scale, y_zero_point?) with a per-tensor or per-axis
    /// scale: `y = saturate(round(x / y_scale) + y_zero_point)`, the scale and
    /// zero point broadcast along `axis` (trailing 1s unsqueezed). Blocked
    /// (`block_size`, opset 21) only where one block spans the whole axis
    /// (scale of `x`'s rank with 1 on `axis`: per-token rows), which is
    /// plain broadcasting.
    fn quantize_linear(&mut self) -> Result<(), Refusal> {
        let (x, scale) = (self.required(0, "x")?, self.required(1, "y_scale")?);
        let blocked = self.node.attr_int("block_size").unwrap_or(0) != 0;
        if blocked {
            let rank = self.rank(x)? as i64;
            let axis = self.node.attr_int("axis").unwrap_or(1);
            let axis = if axis < 0 { axis + rank } else { axis };
            let one_block = self
                .types
                .shape(scale)
                .is_some_and(|dims| dims.len() as i64 == rank && usize::try_from(axis).ok().and_then(|a| dims.get(a)).is_some_and(|d| d.fixed() == Some(1)));
            if !one_block {
                return Err("blocked quantization is lowered only with one block along the axis (a scale of x's rank, 1 on the axis)".into());
            }
        }
        if self.elem_type(x)? != DataType::Float || self.elem_type(scale)? != DataType::Float {
            return Err("only float32 x and y_scale are lowered".into());
        }
        let zero_point = self.input(2);
        let dtype = match zero_point {
            Some(z) => self.elem_type(z)?,
            None => match self.node.attr_int("output_dtype").unwrap_or(0) {
                0 => DataType::Uint8,
                code => i32::try_from(code).ok().and_then(DataType::from_code).ok_or_else(|| format!("output_dtype {code} is not a data type"))?,
            },
        };
        let (low, high) = match dtype {
            DataType::Uint8 => (0.0, 255.0),
            DataType::Int8 => (-128.0, 127.0),
            other => return Err(format!("{other} output is not lowered (uint8 and int8 are)")),
        };
        let rank = self.rank(x)? as i64;
        let broadcast = |this: &mut Self, v: &str, what: &str| -> Result<String, Refusal> {
            match this.rank(v)? {
                0 => Ok(v.to_string()),
                r if blocked && r as i64 == rank => Ok(v.to_string()),
                1 => {
                    let axis = this.node.attr_int("axis").unwrap_or(1);
                    let axis = if axis < 0 { axis + rank } else { axis };
                    if !(0..rank).contains(&axis) {
                        return Err(format!("axis {axis} is outside x's rank {rank}"));
                    }
                    let trailing: Vec<i64> = (1..rank - axis).collect();
                    Ok(if trailing.is_empty() { v.to_string() } else { this.unsqueeze(v, &trailing, what) })
                }
                r => Err(format!("a rank-{r} {what} is not lowered (blocked quantization)")),
            }
        };
        let scale = broadcast(self, scale, "scale")?;
        let divided = self.op("Div", &[x, &scale], "divided");
        let mut value = self.op("Round", &[&divided], "rounded");
        if let Some(z) = zero_point {
            let z = broadcast(self, z, "zero_point")?;
            let z = self.cast(&z, DataType::Float, "zero_point_float");
            value = self.op("Add", &[&value, &z], "shifted");
        }
        let (low, high) = (self.float_scalar("low", DataType::Float, low)?, self.float_scalar("high", DataType::Float, high)?);
        let clipped = self.op("Clip", &[&value, &low, &high], "saturated");
        let output = self.used_output(0);
        self.op_into("Cast", &[&clipped], vec![("to", AttrValue::Int(dtype.code() as i64))], output, "y");
        Ok(())
    }

    /// DequantizeLinear-21 of constant int4/uint4 `x` (with constant float32
    /// `scale` and optional `zero_point` of `x`'s type): `y = (x - zero_point) *
    /// scale`, per tensor, per `axis`, or per block of `block_size` along `axis`
    /// (scale then has `x`'s rank, `ceil(dim / block_size)` on `axis`), computed
    /// here in float32 as ORT's kernel does (`x - zero_point` is a small integer:
    /// one rounding), and written as a constant named `y`. `x`, `scale` and
    /// `zero_point` go when nothing else reads them (tract could not load `x`).
    fn dequantize_constant(&mut self) -> Result<(), Refusal> {
        use crate::quantize::int4::unpack_nibbles;
        let graph = &self.model.graph;
        let node = self.node;
        let tensor = |i: usize, what: &str| -> Result<&Tensor, Refusal> {
            let name = self.required(i, what)?;
            graph.initializer(name).ok_or_else(|| format!("{what} '{name}' is not a constant"))
        };
        let x = tensor(0, "x")?;
        let scale = tensor(1, "x_scale")?;
        let zero_point = self.input(2).map(|_| tensor(2, "x_zero_point")).transpose()?;
        let signed = x.dtype == DataType::Int4;
        let nibbles = |t: &Tensor| match &t.data {
            crate::ir::TensorData::Raw(bytes) if t.dtype == x.dtype => {
                unpack_nibbles(bytes, t.element_count() as usize, signed).ok_or_else(|| format!("'{}' holds too few bytes", t.name))
            }
            _ => Err(format!("'{}' is not raw {} data", t.name, x.dtype)),
        };
        let values = nibbles(x)?;
        if scale.dtype != DataType::Float {
            return Err(format!("x_scale is {}; only float32 is lowered", scale.dtype));
        }
        let scales: Vec<f32> = scale.to_f32().map_err(|e| e.to_string())?.iter().copied().collect();
        let zeros = match zero_point {
            Some(z) => nibbles(z)?,
            None => vec![0; scales.len()],
        };
        let dims: Vec<usize> = x.dims.iter().map(|&d| usize::try_from(d).unwrap_or(0)).collect();
        let rank = dims.len() as i64;
        let axis = node.attr_int("axis").unwrap_or(1);
        let block = node.attr_int("block_size").unwrap_or(0);
        let per_tensor = scales.len() == 1 && block == 0 && scale.dims.len() <= 1;
        let axis = if axis < 0 { axis + rank } else { axis };
        if !per_tensor && !(0..rank).contains(&axis) {
            return Err(format!("axis {axis} is outside x's rank {rank}"));
        }
        let axis = axis.max(0) as usize;
        let (outer, length) = (dims[..axis.min(dims.len())].iter().product::<usize>(), dims.get(axis).copied().unwrap_or(1));
        let inner: usize = dims.get(axis + 1..).map_or(1, |d| d.iter().product());
        let (block, scale_count) = match block {
            _ if per_tensor => (0, 1),
            0 => (0, length),
            b if b > 0 => (b as usize, outer * length.div_ceil(b as usize) * inner),
            b => return Err(format!("block_size {b} is negative")),
        };
        if scales.len() != scale_count || zeros.len() != scales.len() {
            return Err(format!("x_scale has {} values (zero point {}), the layout needs {scale_count}", scales.len(), zeros.len()));
        }
        let mut raw = Vec::with_capacity(values.len() * 4);
        for (i, &v) in values.iter().enumerate() {
            let (o, a, r) = (i / (length * inner), i / inner % length, i % inner);
            let s = match (per_tensor, block) {
                (true, _) => 0,
                (false, 0) => a,
                (false, b) => (o * length.div_ceil(b) + a / b) * inner + r,
            };
            raw.extend_from_slice(&((v - zeros[s]) as f32 * scales[s]).to_le_bytes());
        }
        let output = self.node.outputs.first().filter(|o| !o.is_empty()).ok_or("the output is unnamed")?.clone();
        self.patch.add_initializer(Tensor::from_raw(output, DataType::Float, x.dims.clone(), Bytes::from(raw)));
        for input in node.inputs.iter().filter(|i| !i.is_empty()) {
            let only_here = graph.uses(input).iter().all(|u| graph.node(u.node).is_some_and(|n| std::ptr::eq(n, node)));
            if only_here && !graph.is_graph_output(input) {
                self.patch.remove_initializer(input.clone());
            }
        }
        Ok(())
    }

    /// RMSNormalization-23 (X, scale) -> Y, as its function body: over axes
    /// `axis..rank`, `xs = Cast(X, stash_type)`,
    /// `Y = Cast(xs / Sqrt(ReduceMean(xs * xs) + epsilon), T) * scale`.
    fn rms_normalization(&mut self) -> Result<(), Refusal> {
        let (x, scale) = (self.required(0, "X")?, self.required(1, "scale")?);
        let x_type = self.elem_type(x)?;
        let scale_type = self.elem_type(scale)?;
        if scale_type != x_type {
            return Err(format!("scale is {scale_type} and X {x_type}: the function body multiplies them as one type"));
        }
        let stash_code = self.node.attr_int("stash_type").unwrap_or(DataType::Float.code() as i64);
        let stash = i32::try_from(stash_code).ok().and_then(DataType::from_code).ok_or_else(|| format!("stash_type {stash_code} is not a data type"))?;
        let rank = self.rank(x)? as i64;
        let axis = self.node.attr_int("axis").unwrap_or(-1);
        let first = if axis < 0 { axis + rank } else { axis };
        if !(0..rank).contains(&first) {
            return Err(format!("axis {axis} is out of range for rank {rank}"));
        }
        let epsilon = self.node.attr_float("epsilon").unwrap_or(1e-5);
        let xs = if stash == x_type { x.to_string() } else { self.cast(x, stash, "x_stashed") };
        let eps = self.float_scalar("epsilon", stash, epsilon as f64)?;
        let square = self.op("Mul", &[&xs, &xs], "square");
        let axes = self.ints(&(first..rank).collect::<Vec<_>>());
        let mean_square = self.op_into("ReduceMean", &[&square, &axes], vec![("keepdims", AttrValue::Int(1))], None, "mean_square");
        let shifted = self.op("Add", &[&mean_square, &eps], "mean_square_eps");
        let rms = self.op("Sqrt", &[&shifted], "rms");
        let normalized = self.op("Div", &[&xs, &rms], "normalized");
        let normalized = if stash == x_type { normalized } else { self.cast(&normalized, x_type, "normalized_t") };
        self.op_into("Mul", &[&normalized, scale], Vec::new(), self.used_output(0), "out");
        Ok(())
    }

    /// Attention-23 (Q, K, V, attn_mask?, past_key?, past_value?) -> (Y,
    /// present_key?, present_value?); see the module documentation.
    fn attention(&mut self) -> Result<(), Refusal> {
        let (q, k, v) = (self.required(0, "Q")?, self.required(1, "K")?, self.required(2, "V")?);
        let dtype = self.elem_type(q)?;
        if dtype != DataType::Float {
            return Err(format!("{dtype} attention is not lowered (float32 only: ORT 1.32 computes float16 attention partly in float32)"));
        }
        if self.used_output(3).is_some() {
            return Err("output 3 (qk_matmul_output) is used, and is not supported".into());
        }
        if self.node.attr_int("softmax_precision").is_some_and(|p| p != DataType::Float.code() as i64) {
            return Err("a softmax_precision other than float is not supported".into());
        }
        let (past_key, past_value) = (self.input(4), self.input(5));
        if past_key.is_some() != past_value.is_some() {
            return Err("past_key and past_value must be given together".into());
        }
        let rank = self.rank(q)?;
        let (q4, k4, v4, heads) = match rank {
            3 => {
                let positive = |name: &str| self.node.attr_int(name).filter(|&n| n > 0).ok_or_else(|| format!("3-D inputs need a positive {name}"));
                let (q_heads, kv_heads) = (positive("q_num_heads")?, positive("kv_num_heads")?);
                let split = |this: &mut Self, x: &str, n: i64, what: &str| {
                    let x = this.reshape(x, &[0, 0, n, -1], None, &format!("{what}_split"));
                    this.transpose(&x, &[0, 2, 1, 3], None, &format!("{what}_heads"))
                };
                let (q4, k4, v4) = (split(self, q, q_heads, "q"), split(self, k, kv_heads, "k"), split(self, v, kv_heads, "v"));
                let per_head = |this: &Self, x: &str, n: i64| this.fixed_dim(x, -1).filter(|d| d % n == 0).map(|d| d / n);
                let heads = Heads { q: q_heads, kv: kv_heads, qk_size: per_head(self, q, q_heads), v_size: per_head(self, v, kv_heads) };
                (q4, k4, v4, heads)
            }
            4 => {
                let count = |this: &Self, x: &str| this.fixed_dim(x, 1).ok_or_else(|| format!("the head count (dim 1) of '{x}' is unknown"));
                let heads = Heads { q: count(self, q)?, kv: count(self, k)?, qk_size: self.fixed_dim(q, -1), v_size: self.fixed_dim(v, -1) };
                (q.to_string(), k.to_string(), v.to_string(), heads)
            }
            other => return Err(format!("{other}-D inputs are not supported (3-D or 4-D)")),
        };
        let scale = match self.node.attr_float("scale") {
            Some(s) => s,
            None => 1.0 / (heads.qk_size.filter(|&h| h > 0).ok_or("the head size is unknown, and with it the default scale")? as f32).sqrt(),
        };
        // K and V with the past prepended: the present outputs
        let with_past = |this: &mut Self, past: Option<&str>, x: &str, output: usize, what: &str| match (past, this.used_output(output)) {
            (Some(past), present) => this.op_into("Concat", &[past, x], vec![("axis", AttrValue::Int(2))], present, what),
            (None, Some(present)) => this.op_into("Identity", &[x], Vec::new(), Some(present), what),
            (None, None) => x.to_string(),
        };
        let k_all = with_past(self, past_key, &k4, 1, "present_key");
        let v_all = with_past(self, past_value, &v4, 2, "present_value");
        let (k_rep, v_rep) = if heads.q == heads.kv {
            (k_all.clone(), v_all)
        } else {
            if heads.kv <= 0 || heads.q % heads.kv != 0 {
                return Err(format!("q heads {} are not a multiple of kv heads {}", heads.q, heads.kv));
            }
            let qk_size = heads.qk_size.ok_or("the head size is unknown, needed to repeat the K heads")?;
            let v_size = heads.v_size.ok_or("V's head size is unknown, needed to repeat the V heads")?;
            let group = heads.q / heads.kv;
            (self.repeat_heads(&k_all, group, heads.q, qk_size, "k"), self.repeat_heads(&v_all, group, heads.q, v_size, "v"))
        };
        let k_t = self.transpose(&k_rep, &[0, 1, 3, 2], None, "k_t");
        let qk = self.op("MatMul", &[&q4, &k_t], "qk");
        let scale = self.float_scalar("scale", dtype, scale as f64)?;
        let mut scores = self.op("Mul", &[&qk, &scale], "scores");
        let softcap = self.node.attr_float("softcap").unwrap_or(0.0);
        if softcap > 0.0 {
            let cap = self.float_scalar("softcap", dtype, softcap as f64)?;
            let ratio = self.op("Div", &[&scores, &cap], "scores_over_cap");
            let tanh = self.op("Tanh", &[&ratio], "scores_tanh");
            scores = self.op("Mul", &[&tanh, &cap], "capped_scores");
        }
        if let Some(bias) = self.attention_bias(&q4, &k_all, past_key, dtype)? {
            scores = self.op("Add", &[&scores, &bias], "biased_scores");
        }
        let probs = self.op_into("Softmax", &[&scores], vec![("axis", AttrValue::Int(-1))], None, "probs");
        // ORT: a row whose scores are all <= lowest() is zero (module documentation)
        let last = self.ints(&[-1]);
        let row_max = self.op_into("ReduceMax", &[&scores, &last], vec![("keepdims", AttrValue::Int(1))], None, "row_max");
        let lowest = self.float_scalar("lowest", dtype, f32::MIN as f64)?;
        let empty = self.op("LessOrEqual", &[&row_max, &lowest], "empty_row");
        let zero = self.float_scalar("zero", dtype, 0.0)?;
        let probs = self.op("Where", &[&empty, &zero, &probs], "kept_probs");
        let output = self.used_output(0);
        if rank == 4 {
            self.op_into("MatMul", &[&probs, &v_rep], Vec::new(), output, "out");
        } else {
            let context = self.op("MatMul", &[&probs, &v_rep], "context");
            let merged = self.transpose(&context, &[0, 2, 1, 3], None, "context_bsnh");
            self.reshape(&merged, &[0, 0, -1], output, "out");
        }
        Ok(())
    }

    /// [B, KV, T, H] -> [B, KV * group, T, H], head n being KV head n / group.
    fn repeat_heads(&mut self, x: &str, group: i64, heads: i64, head_size: i64, what: &str) -> String {
        let x5 = self.unsqueeze(x, &[2], &format!("{what}_group_axis"));
        let repeats = self.ints(&[1, 1, group, 1, 1]);
        let expanded = self.op("Expand", &[&x5, &repeats], &format!("{what}_groups"));
        self.reshape(&expanded, &[0, heads, -1, head_size], None, &format!("{what}_repeated"))
    }

    /// The additive bias of the scores: the mask (a boolean one as 0 /
    /// lowest()), with keys after `i + past_length` set to lowest() when causal.
    fn attention_bias(&mut self, q4: &str, k_all: &str, past_key: Option<&str>, dtype: DataType) -> Result<Option<String>, Refusal> {
        let lowest = self.float_scalar("lowest", dtype, f32::MIN as f64)?;
        let zero = self.float_scalar("zero", dtype, 0.0)?;
        let mask = match self.input(3) {
            None => None,
            Some(mask) => match self.elem_type(mask)? {
                DataType::Bool => Some(self.op("Where", &[mask, &zero, &lowest], "mask_bias")),
                t if t == dtype => Some(mask.to_string()),
                other => return Err(format!("a {other} mask is not supported (boolean, or the type of Q)")),
            },
        };
        if self.node.attr_int("is_causal").unwrap_or(0) == 0 {
            return Ok(mask);
        }
        let q_pos = self.positions(q4, 2, "query_positions");
        let q_pos = self.unsqueeze(&q_pos, &[1], "query_column");
        let last_visible = match past_key {
            Some(past) => {
                let past_length = self.dim(past, 2, "past_length");
                self.op("Add", &[&q_pos, &past_length], "last_visible_key")
            }
            None => q_pos,
        };
        let k_pos = self.positions(k_all, 2, "key_positions");
        let k_pos = self.unsqueeze(&k_pos, &[0], "key_row");
        let visible = self.op("LessOrEqual", &[&k_pos, &last_visible], "visible");
        let kept = mask.as_deref().unwrap_or(&zero).to_string();
        Ok(Some(self.op("Where", &[&visible, &kept, &lowest], "causal_bias")))
    }
}

/// Head counts and sizes of an attention node.
struct Heads {
    q: i64,
    kv: i64,
    qk_size: Option<i64>,
    v_size: Option<i64>,
}
