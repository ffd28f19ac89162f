//! `quantize-dynamic`: int8 weights, activations quantized at run time, for every
//! MatMul (and Gemm) whose weight is a constant float32 matrix.
//!
//! What it rewrites: `MatMul(A, W)` with `W` a float32 initializer `[K, N]` (not
//! a graph input: those a caller may override), and `Gemm(A, W, C?)` with
//! constant `W`, `alpha = beta = 1`, `transA = 0` (`transB = 1` reads `W` as
//! `[N, K]`). `A` must be float32. Nodes named in `exclude` (or, unnamed, whose
//! first output is) stay in float.
//!
//! The math. Weights, symmetric per output column `n`:
//! `s_n = max_k |W[k, n]| / 127` (1 for an all-zero column), `Wq[k, n] =
//! round(W[k, n] / s_n)` in `[-127, 127]`, zero point 0. Activations, per tensor
//! and at run time, as ONNX's `DynamicQuantizeLinear` (and ORT's
//! `DynamicQuantizeMatMul`, which does the same internally):
//! `a = (max(0, max A) - min(0, min A)) / 255`, `z = saturate(round(-min(0, min A) / a))`,
//! `Aq = saturate(round(A / a) + z)` in uint8. Then, exactly in int32,
//! `acc[m, n] = sum_k (Aq[m, k] - z) * Wq[k, n]`, and `Y[m, n] = acc[m, n] * (a * s_n)`.
//!
//! Why it is approximately right: `A = a (Aq - z) + e_A` with `|e_A| <= a / 2`
//! (the range includes every value of A, so nothing saturates) and
//! `W = s_n Wq + e_W` with `|e_W| <= s_n / 2` (half a step per channel), so
//! `|Y - A W|[m, n] <= sum_k (|A[m, k]| s_n / 2 + |W[k, n]| a / 2 + a s_n / 4)`.
//! That is the worst case, every rounding error of one sign; independent errors
//! grow with `sqrt(K)` rather than `K`, which is why a 384-wide MiniLM keeps a
//! cosine near 0.98 to its float embeddings. The accumulation itself is exact
//! (|acc| < K * 255 * 127 fits int32 for K below 66 000).
//!
//! Targets:
//! - `ort`: one `com.microsoft.DynamicQuantizeMatMul(A, Wq, s, zeros, bias?)` per
//!   MatMul (ORT's fast kernel is u8 activations x s8 weights, what this op runs).
//!   A following `Add` of a constant float32 `[N]` vector, sole reader of the
//!   MatMul's output, becomes the op's bias input; a Gemm's `[N]` C too. Each
//!   op quantizes its A itself, so Q, K and V quantize theirs three times
//!   (all-MiniLM-L6-v2 in ORT 1.32, batch 1: 0.61x float latency, against
//!   0.58x for the portable form, which shares it).
//! - `portable`: standard ops (opset 11+). Each activation is quantized once, for
//!   every MatMul that reads it (Q, K and V projections share theirs).
//!
//! ```text
//! y = MatMul(x, w)                  ->  y = com.microsoft.DynamicQuantizeMatMul(x, y/weight_int8, y/weight_scale, y/weight_zero_point, b)
//! z = Add(y, b)   # ort target          (writes z)
//!
//! y = MatMul(x, w)                  ->  x/quantized, x/scale, x/zero_point = DynamicQuantizeLinear(x)
//!     # portable target                 y/accumulated = MatMulInteger(x/quantized, y/weight_int8, x/zero_point)
//!                                       y/scale = Mul(x/scale, y/weight_scale)
//!                                       y = Mul(Cast<float>(y/accumulated), y/scale)
//! ```
//! The float weights are left for `eliminate-dead-code`.

use super::lower_contrib::CONTRIB_DOMAIN;
use super::pipeline::Target;
use super::{Pass, PassError};
use crate::ir::{infer_types, AttrValue, DataType, Graph, Model, Node, NodeId, Patch, Tensor};
use bytes::Bytes;
use std::collections::{BTreeMap, HashSet};

/// The pass. See the module documentation.
pub struct QuantizeDynamic {
    /// `Ort` emits DynamicQuantizeMatMul; anything else, standard ops.
    pub target: Target,
    /// Node names (or first outputs) to keep in float.
    pub exclude: HashSet<String>,
}

/// One MatMul or Gemm to quantize.
struct Candidate {
    id: NodeId,
    activation: String,
    /// The tensor the quantized product stands for (the node's output).
    output: String,
    weights: QuantizedWeights,
    /// A constant `[N]` to add: a Gemm's C, or (ort) a folded Add's.
    bias: Option<String>,
    /// A Gemm's C of another shape: added after the product.
    addend: Option<String>,
    /// The Add folded into the op (ort): removed, its output written instead.
    folded_add: Option<(NodeId, String)>,
}

/// `W` as int8 `[K, N]` with per-column scales.
struct QuantizedWeights {
    values: Vec<i8>,
    scales: Vec<f32>,
    k: usize,
    n: usize,
}

impl Pass for QuantizeDynamic {
    fn name(&self) -> &'static str {
        "quantize-dynamic"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        // DynamicQuantizeLinear is opset 11
        let opset = model.opset("").unwrap_or(0);
        if self.target != Target::Ort && opset < 11 {
            let message = format!("the model imports default-domain opset {opset}; DynamicQuantizeLinear needs 11 or later");
            return Err(PassError::Failed { pass: self.name().into(), message });
        }
        let types = infer_types(model);
        let graph_inputs: HashSet<&str> = model.graph.inputs.iter().map(|v| v.name.as_str()).collect();
        let mut by_activation: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
        for (id, node) in model.graph.nodes_with_ids() {
            if self.excluded(node) {
                continue;
            }
            let Some(activation) = node.inputs.first() else { continue };
            if types.elem_type(activation) != Some(DataType::Float) {
                continue;
            }
            let Some(mut candidate) = candidate(&model.graph, &graph_inputs, id, node) else { continue };
            if self.target == Target::Ort && candidate.bias.is_none() && candidate.addend.is_none() {
                candidate.folded_add = foldable_bias_add(&model.graph, &candidate.output, candidate.weights.n);
                candidate.bias = candidate.folded_add.as_ref().and_then(|(add, _)| {
                    let add = model.graph.node(*add)?;
                    add.inputs.iter().find(|i| **i != candidate.output).cloned()
                });
            }
            by_activation.entry(activation.clone()).or_default().push(candidate);
        }
        Ok(by_activation.into_iter().map(|(activation, group)| self.patch(&activation, group)).collect())
    }
}

impl QuantizeDynamic {
    fn excluded(&self, node: &Node) -> bool {
        let name = if node.name.is_empty() { node.outputs.first().map(String::as_str).unwrap_or("") } else { &node.name };
        self.exclude.contains(name)
    }

    /// One patch per activation, so that the portable target quantizes it once.
    fn patch(&self, activation: &str, group: Vec<Candidate>) -> Patch {
        let mut patch = Patch::new(match self.target {
            Target::Ort => "dynamic-quantize-matmul",
            _ => "matmul-integer",
        });
        let shared = (self.target != Target::Ort).then(|| {
            let names = [format!("{activation}/quantized"), format!("{activation}/scale"), format!("{activation}/zero_point")];
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            patch.add_node(Node::new("DynamicQuantizeLinear", &[activation], &refs));
            names
        });
        for c in group {
            patch.remove_node(c.id);
            let root = &c.output;
            let (w, s, z) = c.weights.initializers(root);
            let (weight, scale, zero_point) = (w.name.clone(), s.name.clone(), z.name.clone());
            patch.add_initializer(w).add_initializer(s);
            if shared.is_none() {
                // MatMulInteger's B zero point defaults to 0; DynamicQuantizeMatMul's is given
                patch.add_initializer(z);
            }
            // the name the quantized product is written to: the folded Add's output,
            // the node's own when nothing follows, else a fresh one
            let product_output = match (&c.folded_add, &c.addend) {
                (Some((add, add_output)), _) => {
                    patch.remove_node(*add);
                    add_output.clone()
                }
                (None, Some(_)) => format!("{root}/product"),
                (None, None) => root.clone(),
            };
            match &shared {
                None => {
                    let mut inputs = vec![c.activation.as_str(), &weight, &scale, &zero_point];
                    inputs.extend(c.bias.as_deref());
                    patch.add_node(Node::new("DynamicQuantizeMatMul", &inputs, &[&product_output]).with_domain(CONTRIB_DOMAIN));
                }
                Some([quantized, a_scale, a_zero_point]) => {
                    let accumulated = format!("{root}/accumulated");
                    let as_float = format!("{root}/accumulated_float");
                    let combined_scale = format!("{root}/scale");
                    patch.add_node(Node::new("MatMulInteger", &[quantized, &weight, a_zero_point], &[&accumulated]));
                    let to = AttrValue::Int(DataType::Float.code() as i64);
                    patch.add_node(Node::new("Cast", &[&accumulated], &[&as_float]).with_attr("to", to));
                    patch.add_node(Node::new("Mul", &[a_scale, &scale], &[&combined_scale]));
                    match &c.bias {
                        Some(bias) => {
                            let scaled = format!("{root}/scaled");
                            patch.add_node(Node::new("Mul", &[&as_float, &combined_scale], &[&scaled]));
                            patch.add_node(Node::new("Add", &[&scaled, bias], &[&product_output]));
                        }
                        None => {
                            patch.add_node(Node::new("Mul", &[&as_float, &combined_scale], &[&product_output]));
                        }
                    }
                }
            }
            if let Some(addend) = &c.addend {
                patch.add_node(Node::new("Add", &[&product_output, addend], &[root]));
            }
        }
        patch
    }
}

impl QuantizedWeights {
    /// Quantizes `w`, read as `[K, N]` (or `[N, K]` when `transposed`), row by
    /// row over contiguous slices (indexing per element made BERT-base's
    /// quantize take 2.4 s in a debug build; this, 1.1-1.4 s in all).
    fn new(w: &[f32], rows: usize, cols: usize, transposed: bool) -> QuantizedWeights {
        let (k, n) = if transposed { (cols, rows) } else { (rows, cols) };
        let step = |max_abs: f32| if max_abs > 0.0 { max_abs / 127.0 } else { 1.0 };
        let quantize = |v: f32, scale: f32| (v / scale).round().clamp(-127.0, 127.0) as i8;
        let mut values = vec![0i8; k * n];
        let scales: Vec<f32> = if transposed {
            // row nn of w is output column nn
            let scales: Vec<f32> = w.chunks_exact(cols).map(|column| step(column.iter().fold(0f32, |m, v| m.max(v.abs())))).collect();
            for (nn, column) in w.chunks_exact(cols).enumerate() {
                for (kk, &v) in column.iter().enumerate() {
                    values[kk * n + nn] = quantize(v, scales[nn]);
                }
            }
            scales
        } else {
            let mut max_abs = vec![0f32; n];
            for row in w.chunks_exact(cols) {
                for (m, v) in max_abs.iter_mut().zip(row) {
                    *m = m.max(v.abs());
                }
            }
            let scales: Vec<f32> = max_abs.into_iter().map(step).collect();
            for (row, out) in w.chunks_exact(cols).zip(values.chunks_exact_mut(n)) {
                for ((q, &v), &scale) in out.iter_mut().zip(row).zip(&scales) {
                    *q = quantize(v, scale);
                }
            }
            scales
        };
        QuantizedWeights { values, scales, k, n }
    }

    /// The int8 weight `[K, N]`, its scales `[N]` and zero points `[N]`, named under `root`.
    fn initializers(&self, root: &str) -> (Tensor, Tensor, Tensor) {
        let n = self.n as i64;
        let bytes: Vec<u8> = self.values.iter().map(|v| *v as u8).collect();
        let weight = Tensor::from_raw(format!("{root}/weight_int8"), DataType::Int8, vec![self.k as i64, n], Bytes::from(bytes));
        let scales: Vec<u8> = self.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        let scale = Tensor::from_raw(format!("{root}/weight_scale"), DataType::Float, vec![n], Bytes::from(scales));
        let zero_point = Tensor::from_raw(format!("{root}/weight_zero_point"), DataType::Int8, vec![n], Bytes::from(vec![0u8; self.n]));
        (weight, scale, zero_point)
    }
}

/// A constant float32 initializer that is not a graph input.
fn constant<'g>(graph: &'g Graph, graph_inputs: &HashSet<&str>, name: &str) -> Option<&'g Tensor> {
    let tensor = graph.initializer(name)?;
    (tensor.dtype == DataType::Float && !graph_inputs.contains(name)).then_some(tensor)
}

/// The node as a [`Candidate`], when it is a MatMul or Gemm of a constant weight.
fn candidate(graph: &Graph, graph_inputs: &HashSet<&str>, id: NodeId, node: &Node) -> Option<Candidate> {
    let gemm = node.is_onnx("Gemm");
    if !(node.is_onnx("MatMul") || gemm) {
        return None;
    }
    let output = node.outputs.first().filter(|o| !o.is_empty())?.clone();
    let weight = constant(graph, graph_inputs, node.inputs.get(1)?)?;
    let [rows, cols] = weight.dims[..] else { return None };
    let (rows, cols) = (usize::try_from(rows).ok()?, usize::try_from(cols).ok()?);
    let values = weight.to_f32().ok()?;
    let values = values.as_slice()?;
    let transposed = gemm && node.attr_int("transB").unwrap_or(0) != 0;
    let (mut bias, mut addend) = (None, None);
    if gemm {
        let unit = |name: &str| node.attr_float(name).unwrap_or(1.0) == 1.0;
        if !unit("alpha") || !unit("beta") || node.attr_int("transA").unwrap_or(0) != 0 {
            return None;
        }
        let n = if transposed { rows } else { cols } as i64;
        match node.inputs.get(2).filter(|c| !c.is_empty()) {
            Some(c) if constant(graph, graph_inputs, c).is_some_and(|t| t.dims == [n]) => bias = Some(c.clone()),
            Some(c) => addend = Some(c.clone()),
            None => {}
        }
    }
    Some(Candidate {
        id,
        activation: node.inputs[0].clone(),
        output,
        weights: QuantizedWeights::new(values, rows, cols, transposed),
        bias,
        addend,
        folded_add: None,
    })
}

/// The Add that adds a constant float32 `[n]` to `product` and is its only reader.
fn foldable_bias_add(graph: &Graph, product: &str, n: usize) -> Option<(NodeId, String)> {
    if graph.is_graph_output(product) {
        return None;
    }
    let [single] = graph.uses(product) else { return None };
    let add = graph.node(single.node)?;
    if !add.is_onnx("Add") || add.inputs.len() != 2 {
        return None;
    }
    let other = add.inputs.iter().find(|i| *i != product)?;
    let tensor = graph.initializer(other)?;
    if tensor.dtype != DataType::Float || tensor.dims != [n as i64] {
        return None;
    }
    // a graph input's default may be overridden: not a constant
    if graph.inputs.iter().any(|v| &v.name == other) {
        return None;
    }
    Some((single.node, add.outputs.first()?.clone()))
}
