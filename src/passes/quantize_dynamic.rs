//! `quantize-dynamic`: int8 weights, activations quantized at run time, for every
//! MatMul (and Gemm) whose weight is a constant float32 matrix.
//!
//! What it rewrites: `MatMul(A, W)` with `W` a float32 initializer `[K, N]` (not
//! a graph input: those a caller may override) or the Transpose of one `[N, K]`
//! (a tied lm_head reading the embedding table), and `Gemm(A, W, C?)` with
//! constant `W`, `alpha = beta = 1`, `transA = 0` (`transB = 1` reads `W` as
//! `[N, K]`). `A` must be float32. Nodes named in `exclude` (or, unnamed, whose
//! first output is) stay in float.
//!
//! The math. Weights, symmetric per output column `n`, with a step that keeps
//! every aligned pair of rows within 128 (see "Saturation" below):
//! `s_n = max_i (|W[2i, n]| + |W[2i+1, n]|) / 127` (1 for an all-zero column),
//! `Wq[k, n] = round(W[k, n] / s_n)` in `[-127, 127]`, zero point 0; then
//! `|Wq[2i, n]| + |Wq[2i+1, n]| <= 127 + 2 * 0.5 = 128`. Activations, per tensor
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
//! Per-token activations (`ActivationScale::PerToken`, the ZeroQuant scheme):
//! one symmetric scale per row (token) of `A`, over its last axis:
//! `a_m = max_k |A[m, k]| / 127`, `Aq[m, k] = round(A[m, k] / a_m) + 128` in uint8
//! (`QuantizeLinear` per axis over the rows flattened to `[M, K]`, or from
//! opset 21 with one block of K per row), then
//! `Y[m, n] = (sum_k (Aq[m, k] - 128) * Wq[k, n]) * s_n * a_m`. A row's scale
//! follows its own range, so one large token no longer coarsens the others;
//! the error bound above holds with `a` replaced by `a_m` per row.
//!
//! Saturation. ORT's fast x86 kernel for uint8 x int8 (AVX2 `vpmaddubsw`)
//! adds the products of rows `2i` and `2i+1` into int16 with saturation, so
//! `Aq[m, 2i] Wq[2i, n] + Aq[m, 2i+1] Wq[2i+1, n]` must stay within
//! `[-32768, 32767]`; with `Aq <= 255` that holds exactly when
//! `|Wq[2i, n]| + |Wq[2i+1, n]| <= 128`, which the weight step above ensures.
//! Measured in ORT 1.32 on this AVX2 machine: a `[1024, 384] x [384, 1536]`
//! MatMulInteger of full-range values was off by 120 000 of 340 000 (plain
//! 127-level weights cost MiniLM's per-token form 0.006 of mean cosine this
//! way); with the pair bound, exact (and off again when the pairs are shifted
//! by one row: the kernel pairs rows 0-1, 2-3, ...). Uint8 x uint8 is exact
//! without the bound but runs at float speed, int8 x int8 3x slower than float.
//! The bound costs little: a column's largest weight rarely sits beside a
//! large one, so its step is close to `max |W| / 127`.
//!
//! GELU inputs. A GELU's output is at least -0.1701 (`GELU_MINIMUM`), and a
//! FFN's second MatMul reads it. Per token, such a row can take a one-sided
//! grid with a zero point `z` fixed per activation instead of the symmetric
//! one: `a_m = max(max_k A[m, k], 0.1701 (255 - z) / z) / (255 - z)`,
//! `Aq[m, k] = round(A[m, k] / a_m) + z`. Nothing saturates: `A / a_m <= 255 - z`
//! above, and `A / a_m >= -0.1701 / a_m >= -z` below. For a row maximum `R`
//! well above 0.17 the step `R / (255 - z)` is about half the symmetric
//! `R / 127`, and the row maximum needs no `Abs`. `z` comes from calibration
//! ([`calibrate_int8`], [`one_sided_zero_point`]): the one that minimises the
//! mean squared step over the calibration rows, used only where that beats
//! the symmetric grid (rows whose maxima are near 0.17 gain nothing). On
//! all-MiniLM-L6-v2 it chose 17-26 for the four FFN-output layers the
//! search left per token, and took the calibration error with every layer
//! per token from 2.76e-3 to 2.19e-3.
//!
//! Targets:
//! - `ort`: `com.microsoft.DynamicQuantizeMatMul(A, Wq, s, zeros, bias?)` for a
//!   MatMul whose activation no other quantized MatMul reads (ORT's fast
//!   kernel is u8 activations x s8 weights, what this op runs; it quantizes A
//!   itself). An activation read by several (Q, K and V) is quantized once, by
//!   `DynamicQuantizeLinear`, for a `MatMulIntegerToFloat(Aq, Wq, a, s, z, _,
//!   bias?)` each. A following `Add` of a constant float32 `[N]` vector, sole
//!   reader of the MatMul's output, becomes the op's bias input; a Gemm's `[N]`
//!   C too.
//! - `portable`: standard ops (opset 11+). Each activation is quantized once, for
//!   every MatMul that reads it.
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
//!
//! Per token, for both targets (ort's `MatMulIntegerToFloat` does the Cast,
//! the weight-scale Mul and, given the `[..., 1]` row scale as A's scale, the
//! row-scale Mul in one kernel; it adds a bias before that last Mul, so the
//! bias is an Add after it):
//! ```text
//! y = MatMul(x, w)  ->  x/row_scale = Max(Mul(ReduceMax(Abs(x), axes=-1), 1/127), tiny)      # GELU input: Mul(Max(ReduceMax(x), 0.1701 (255-z)/z), 1/(255-z))
//!                       x/quantized = Reshape(QuantizeLinear(Reshape(x, [-1, K]), Reshape(x/row_scale, [-1]), 128, axis=0), Shape(x))   # GELU input: z, not 128
//!                                   = QuantizeLinear(x, x/row_scale, Expand(128, Shape(x/row_scale)), axis=-1, block_size=K)          # opset 21 and later
//!                       y           = com.microsoft.MatMulIntegerToFloat(x/quantized, y/weight_int8, x/row_scale, y/weight_scale, 128)   # ort
//!                                   = Mul(Mul(Cast<float>(MatMulInteger(x/quantized, y/weight_int8, 128)), y/weight_scale), x/row_scale) # portable
//! ```
//! The weight-scale and row-scale Muls of the portable form stay separate on
//! purpose: ORT 1.32's MatMulIntegerToFloat fusion turns `Mul(Cast(MatMulInteger),
//! Mul(a_scale, b_scale))` into one op that reads `a_scale` as a scalar, which
//! for a per-row scale gave garbage (mean cosine 0.08 on MiniLM).
//!
//! Per layer: `per_tensor_layers` names layers scaled per tensor whatever
//! `activations` says (`onnxopt quantize --mode int8`'s `--max-error` search
//! fills it with the layers where one scale costs little); `rounded` holds
//! weights already rounded on the same pair-bounded grid by GPTQ
//! ([`gptq_rounded_weights`]), used instead of rounding to nearest.
//!
//! The float weights are left for `eliminate-dead-code`.

use super::lower_contrib::CONTRIB_DOMAIN;
use super::{Pass, PassError};
use crate::calibrate::{for_each_batch, CalibrateError, CalibrationSource, Gram};
use crate::ir::{infer_types, AttrValue, DataType, Graph, Model, Node, NodeId, Patch, Tensor};
use crate::quantize::gptq::{gptq, GptqError, GptqOptions, Grid, Levels, QuantizedMatrix};
use crate::target::Target;
use bytes::Bytes;
use faer::Mat;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// The pass. See the module documentation.
pub struct QuantizeDynamic {
    /// `Ort` emits com.microsoft ops; anything else, standard ops.
    pub target: Target,
    /// Node names (or first outputs) to keep in float.
    pub exclude: HashSet<String>,
    pub activations: ActivationScale,
    /// Layers (node names, or first outputs) whose activations are scaled per
    /// tensor whatever `activations` says: where one scale is close enough,
    /// ORT's DynamicQuantizeMatMul does in one kernel what per token takes
    /// seven ops for.
    pub per_tensor_layers: HashSet<String>,
    /// Weights already rounded (GPTQ, see [`gptq_rounded_weights`]), by the
    /// name of the float initializer they stand for; the others are rounded
    /// to nearest here.
    pub rounded: Arc<RoundedWeights>,
    /// The one-sided grid's zero point for GELU outputs read per token, by
    /// activation name (see "GELU inputs", [`calibrate_int8`]); the others
    /// take the symmetric grid.
    pub gelu_zero_points: Arc<HashMap<String, u8>>,
}

/// Int8 weights rounded ahead of the pass, by float initializer name.
pub type RoundedWeights = HashMap<String, QuantizedMatrix>;

/// The int8 grid of this pass: symmetric per output column, aligned row
/// pairs within 128 (see "Saturation").
pub const INT8_PAIR_GRID: Grid = Grid { block: None, levels: Levels::SymmetricPairs { max: 127, pair_sum: 128 } };

/// How activations are scaled at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum ActivationScale {
    /// One scale for the whole tensor (DynamicQuantizeLinear).
    #[default]
    PerTensor,
    /// One scale per row of the last axis (per token).
    PerToken,
}

/// Levels each side of zero of a per-token activation.
const TOKEN_LEVELS: f32 = 127.0;
/// Its zero point: the quantized values span `1..=255`.
const TOKEN_ZERO_POINT: u8 = 128;
/// From this opset on, QuantizeLinear quantizes per block (`block_size`): a
/// row scale `[..., 1]` with one block of K applies as it is, without the
/// Reshapes to `[M, K]` that per-axis quantization needs (7 nodes -> 3).
const BLOCKED_QUANTIZE_OPSET: i64 = 21;

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
        let (needed, what) = match self.activations {
            ActivationScale::PerTensor => (11, "DynamicQuantizeLinear"),
            ActivationScale::PerToken => (13, "QuantizeLinear per axis"),
        };
        if (self.target != Target::Ort || self.activations == ActivationScale::PerToken) && opset < needed {
            let message = format!("the model imports default-domain opset {opset}; {what} needs {needed} or later");
            return Err(PassError::Failed { pass: self.name().into(), message });
        }
        let types = infer_types(model);
        let graph_inputs: HashSet<&str> = model.graph.inputs.iter().map(|v| v.name.as_str()).collect();
        let mut by_activation: BTreeMap<(String, ActivationScale), Vec<Candidate>> = BTreeMap::new();
        for (id, node) in model.graph.nodes_with_ids() {
            if self.excluded(node) {
                continue;
            }
            let scale = if self.per_tensor_layers.contains(node.name_or_output()) { ActivationScale::PerTensor } else { self.activations };
            let Some(activation) = node.inputs.first() else { continue };
            if types.elem_type(activation) != Some(DataType::Float) {
                continue;
            }
            let Some(mut candidate) = candidate(&model.graph, &graph_inputs, id, node, &self.rounded) else { continue };
            let fused_op_adds_bias = self.target == Target::Ort && scale == ActivationScale::PerTensor;
            if fused_op_adds_bias && candidate.bias.is_none() && candidate.addend.is_none() {
                candidate.folded_add = foldable_bias_add(&model.graph, &candidate.output, candidate.weights.n);
                candidate.bias = candidate.folded_add.as_ref().and_then(|(add, _)| {
                    let add = model.graph.node(*add)?;
                    add.inputs.iter().find(|i| **i != candidate.output).cloned()
                });
            }
            by_activation.entry((activation.clone(), scale)).or_default().push(candidate);
        }
        Ok(by_activation
            .into_iter()
            .map(|((activation, scale), group)| match scale {
                ActivationScale::PerTensor => self.patch(&activation, group, opset),
                ActivationScale::PerToken => {
                    let one_sided = self.gelu_zero_points.get(&activation).filter(|_| is_gelu_output(&model.graph, &activation));
                    self.per_token_patch(&activation, group, opset, one_sided.copied())
                }
            })
            .collect())
    }
}

impl QuantizeDynamic {
    fn excluded(&self, node: &Node) -> bool {
        self.exclude.contains(node.name_or_output())
    }

    /// One patch per activation, so that the portable target quantizes it once.
    fn patch(&self, activation: &str, group: Vec<Candidate>, opset: i64) -> Patch {
        let mut patch = Patch::new(match self.target {
            Target::Ort if group.len() == 1 => "dynamic-quantize-matmul",
            Target::Ort => "matmul-integer-to-float",
            _ => "matmul-integer",
        });
        // ORT quantizes a lone MatMul's activation inside DynamicQuantizeMatMul;
        // one read by several (Q, K and V) once, for a MatMulIntegerToFloat each
        let fused_quantization = self.target == Target::Ort && (group.len() == 1 || opset < 11);
        let shared = (!fused_quantization).then(|| {
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
            if fused_quantization {
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
                Some([quantized, a_scale, a_zero_point]) if self.target == Target::Ort => {
                    let mut inputs = vec![quantized.as_str(), &weight, a_scale, &scale, a_zero_point];
                    if let Some(bias) = &c.bias {
                        inputs.extend(["", bias.as_str()]);
                    }
                    patch.add_node(Node::new("MatMulIntegerToFloat", &inputs, &[&product_output]).with_domain(CONTRIB_DOMAIN));
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

impl QuantizeDynamic {
    /// One patch per activation: its rows quantized once, then one integer
    /// product per MatMul reading it. `one_sided`: the zero point of the
    /// one-sided grid, for a GELU's output (see "GELU inputs").
    fn per_token_patch(&self, activation: &str, group: Vec<Candidate>, opset: i64, one_sided: Option<u8>) -> Patch {
        let mut patch = Patch::new(match (self.target, one_sided) {
            (Target::Ort, None) => "matmul-integer-to-float-per-token",
            (Target::Ort, Some(_)) => "matmul-integer-to-float-per-token-gelu",
            (_, None) => "matmul-integer-per-token",
            (_, Some(_)) => "matmul-integer-per-token-gelu",
        });
        let Some(k) = group.first().map(|c| c.weights.k) else { return patch };
        let x = activation;
        let name = |what: &str| format!("{x}/{what}");
        let scalar_f32 = |what: &str, v: f32| Tensor::from_raw(name(what), DataType::Float, vec![], Bytes::from(v.to_le_bytes().to_vec()));
        let ints = |what: &str, v: &[i64]| {
            let raw: Vec<u8> = v.iter().flat_map(|i| i.to_le_bytes()).collect();
            Tensor::from_raw(name(what), DataType::Int64, vec![v.len() as i64], Bytes::from(raw))
        };

        let reduce_max = |input: &str| {
            let node = if opset >= 18 {
                Node::new("ReduceMax", &[input, &name("last_axis")], &[&name("row_max")])
            } else {
                Node::new("ReduceMax", &[input], &[&name("row_max")]).with_attr("axes", AttrValue::Ints(vec![-1]))
            };
            node.with_attr("keepdims", AttrValue::Int(1))
        };
        if opset >= 18 {
            patch.add_initializer(ints("last_axis", &[-1]));
        }
        let zero_point = match one_sided {
            None => {
                patch.add_initializer(scalar_f32("inverse_levels", 1.0 / TOKEN_LEVELS));
                patch.add_initializer(scalar_f32("smallest_scale", f32::MIN_POSITIVE));
                patch.add_node(Node::new("Abs", &[x], &[&name("abs")]));
                patch.add_node(reduce_max(&name("abs")));
                patch.add_node(Node::new("Mul", &[&name("row_max"), &name("inverse_levels")], &[&name("row_step")]));
                // an all-zero row would get scale 0, and QuantizeLinear divides by it
                patch.add_node(Node::new("Max", &[&name("row_step"), &name("smallest_scale")], &[&name("row_scale")]));
                TOKEN_ZERO_POINT
            }
            Some(zero_point) => {
                let levels = 255.0 - zero_point as f32;
                patch.add_initializer(scalar_f32("inverse_levels", 1.0 / levels));
                patch.add_initializer(scalar_f32("smallest_max", -GELU_MINIMUM * levels / zero_point as f32));
                patch.add_node(reduce_max(x));
                patch.add_node(Node::new("Max", &[&name("row_max"), &name("smallest_max")], &[&name("row_bound")]));
                patch.add_node(Node::new("Mul", &[&name("row_bound"), &name("inverse_levels")], &[&name("row_scale")]));
                zero_point
            }
        };
        patch.add_initializer(Tensor::from_raw(name("zero_point"), DataType::Uint8, vec![], Bytes::from(vec![zero_point])));
        if opset >= BLOCKED_QUANTIZE_OPSET {
            // one block of K along the last axis: the row scale [..., 1] as it is
            patch.add_node(Node::new("Shape", &[&name("row_scale")], &[&name("scale_shape")]));
            patch.add_node(Node::new("Expand", &[&name("zero_point"), &name("scale_shape")], &[&name("row_zero_points")]));
            patch.add_node(
                Node::new("QuantizeLinear", &[x, &name("row_scale"), &name("row_zero_points")], &[&name("quantized")])
                    .with_attr("axis", AttrValue::Int(-1))
                    .with_attr("block_size", AttrValue::Int(k as i64)),
            );
        } else {
            // per axis 0 over the rows flattened to [M, K]
            patch.add_initializer(ints("rows_shape", &[-1, k as i64]));
            patch.add_initializer(ints("flat_shape", &[-1]));
            patch.add_node(Node::new("Reshape", &[x, &name("rows_shape")], &[&name("rows")]));
            patch.add_node(Node::new("Reshape", &[&name("row_scale"), &name("flat_shape")], &[&name("row_scale_flat")]));
            patch.add_node(Node::new("Shape", &[&name("row_scale_flat")], &[&name("row_count")]));
            patch.add_node(Node::new("Expand", &[&name("zero_point"), &name("row_count")], &[&name("row_zero_points")]));
            patch.add_node(
                Node::new("QuantizeLinear", &[&name("rows"), &name("row_scale_flat"), &name("row_zero_points")], &[&name("rows_quantized")])
                    .with_attr("axis", AttrValue::Int(0)),
            );
            patch.add_node(Node::new("Shape", &[x], &[&name("shape")]));
            patch.add_node(Node::new("Reshape", &[&name("rows_quantized"), &name("shape")], &[&name("quantized")]));
        }

        for c in group {
            patch.remove_node(c.id);
            let root = &c.output;
            let (w, s, _) = c.weights.initializers(root);
            let (weight, weight_scale) = (w.name.clone(), s.name.clone());
            patch.add_initializer(w).add_initializer(s);
            let scaled = if c.bias.is_some() || c.addend.is_some() { format!("{root}/scaled") } else { root.clone() };
            match self.target {
                Target::Ort => {
                    // the row scale as A's scale: ORT multiplies the output by it
                    let inputs = [name("quantized"), weight, name("row_scale"), weight_scale, name("zero_point")];
                    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                    patch.add_node(Node::new("MatMulIntegerToFloat", &refs, &[&scaled]).with_domain(CONTRIB_DOMAIN));
                }
                _ => {
                    let accumulated = format!("{root}/accumulated");
                    let as_float = format!("{root}/accumulated_float");
                    let unscaled = format!("{root}/unscaled");
                    patch.add_node(Node::new("MatMulInteger", &[&name("quantized"), &weight, &name("zero_point")], &[&accumulated]));
                    let to = AttrValue::Int(DataType::Float.code() as i64);
                    patch.add_node(Node::new("Cast", &[&accumulated], &[&as_float]).with_attr("to", to));
                    patch.add_node(Node::new("Mul", &[&as_float, &weight_scale], &[&unscaled]));
                    patch.add_node(Node::new("Mul", &[&unscaled, &name("row_scale")], &[&scaled]));
                }
            }
            match (&c.bias, &c.addend) {
                (Some(bias), Some(addend)) => {
                    let biased = format!("{root}/biased");
                    patch.add_node(Node::new("Add", &[&scaled, bias], &[&biased]));
                    patch.add_node(Node::new("Add", &[&biased, addend], &[root]));
                }
                (Some(extra), None) | (None, Some(extra)) => {
                    patch.add_node(Node::new("Add", &[&scaled, extra], &[root]));
                }
                (None, None) => {}
            }
        }
        patch
    }
}

/// The lowest value a GELU (erf or tanh form) outputs, rounded down: `x Phi(x)`
/// is smallest at `x = -0.7518`, -0.169971; the tanh form's minimum is -0.170041.
pub const GELU_MINIMUM: f32 = -0.1701;

/// Whether `activation` is the output of a GELU (com.microsoft BiasGelu, Gelu
/// or FastGelu, or ONNX Gelu), whose values are all at least [`GELU_MINIMUM`].
fn is_gelu_output(graph: &Graph, activation: &str) -> bool {
    let Some(node) = graph.producer(activation).and_then(|(id, _)| graph.node(id)) else { return false };
    let contrib_gelu = node.domain == CONTRIB_DOMAIN && matches!(node.op_type.as_str(), "BiasGelu" | "Gelu" | "FastGelu");
    contrib_gelu || node.is_onnx("Gelu")
}

/// The zero point of the one-sided grid for rows with these maxima, or
/// `None` where the symmetric grid is as fine. A row's step is
/// `max(R / (255 - z), -GELU_MINIMUM / z)` one-sided and `max(R, -GELU_MINIMUM) / 127`
/// symmetric; the `z` in `1..=127` with the least mean squared step wins if
/// it beats the symmetric grid's.
pub fn one_sided_zero_point(row_maxima: &[f32]) -> Option<u8> {
    let floor = -GELU_MINIMUM as f64;
    let mean_squared_step = |step: &dyn Fn(f64) -> f64| row_maxima.iter().map(|&r| step(r as f64).powi(2)).sum::<f64>() / row_maxima.len().max(1) as f64;
    let symmetric = mean_squared_step(&|r| r.max(floor) / 127.0);
    let (best, cost) = (1..=127u8).map(|z| (z, mean_squared_step(&|r| (r / (255.0 - z as f64)).max(floor / z as f64)))).min_by(|a, b| a.1.total_cmp(&b.1))?;
    (cost < symmetric && !row_maxima.is_empty()).then_some(best)
}

impl QuantizedWeights {
    /// Quantizes `w`, read as `[K, N]` (or `[N, K]` when `transposed`), row by
    /// row over contiguous slices (indexing per element made BERT-base's
    /// quantize take 2.4 s in a debug build; this, 1.1-1.4 s in all).
    fn new(w: &[f32], rows: usize, cols: usize, transposed: bool) -> QuantizedWeights {
        let (k, n) = if transposed { (cols, rows) } else { (rows, cols) };
        // the largest |W[2i, n]| + |W[2i+1, n]| of each column (see "Saturation")
        let mut pair_max = vec![0f32; n];
        let mut pair_sum = vec![0f32; n];
        if transposed {
            for (nn, column) in w.chunks_exact(cols).enumerate() {
                pair_max[nn] = column.chunks(2).map(|pair| pair.iter().map(|v| v.abs()).sum::<f32>()).fold(0f32, f32::max);
            }
        } else {
            for (kk, row) in w.chunks_exact(cols).enumerate() {
                for ((sum, max), v) in pair_sum.iter_mut().zip(pair_max.iter_mut()).zip(row) {
                    *sum += v.abs();
                    if kk % 2 == 1 || kk + 1 == k {
                        *max = max.max(*sum);
                        *sum = 0.0;
                    }
                }
            }
        }
        let scales: Vec<f32> = pair_max.into_iter().map(|m| if m > 0.0 { m / 127.0 } else { 1.0 }).collect();
        let quantize = |v: f32, scale: f32| (v / scale).round().clamp(-127.0, 127.0) as i8;
        let mut values = vec![0i8; k * n];
        if transposed {
            // row nn of w is output column nn
            for (nn, column) in w.chunks_exact(cols).enumerate() {
                for (kk, &v) in column.iter().enumerate() {
                    values[kk * n + nn] = quantize(v, scales[nn]);
                }
            }
        } else {
            for (row, out) in w.chunks_exact(cols).zip(values.chunks_exact_mut(n)) {
                for ((q, &v), &scale) in out.iter_mut().zip(row).zip(&scales) {
                    *q = quantize(v, scale);
                }
            }
        }
        QuantizedWeights { values, scales, k, n }
    }

    /// A matrix rounded on [`INT8_PAIR_GRID`].
    fn from_matrix(matrix: &QuantizedMatrix) -> QuantizedWeights {
        QuantizedWeights { values: matrix.values.iter().map(|&v| v as i8).collect(), scales: matrix.scales.clone(), k: matrix.k, n: matrix.n }
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

/// The names (`exclude` takes them) of the layers the pass would quantize.
pub fn quantizable_layers(model: &Model) -> Vec<String> {
    let graph_inputs: HashSet<&str> = model.graph.inputs.iter().map(|v| v.name.as_str()).collect();
    model.graph.nodes().filter(|n| quantizable_weight(&model.graph, &graph_inputs, n).is_some()).map(|n| n.name_or_output().to_string()).collect()
}

/// The layers the pass would quantize, grouped by the activation they read,
/// in graph order. A group shares one quantization of its activation (Q, K
/// and V), so it takes one activation scale: per tensor or per token.
pub fn layers_by_activation(model: &Model) -> Vec<Vec<String>> {
    let graph_inputs: HashSet<&str> = model.graph.inputs.iter().map(|v| v.name.as_str()).collect();
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for node in model.graph.nodes().filter(|n| quantizable_weight(&model.graph, &graph_inputs, n).is_some()) {
        let Some(activation) = node.inputs.first() else { continue };
        let layer = node.name_or_output().to_string();
        match groups.iter_mut().find(|(a, _)| a == activation) {
            Some((_, layers)) => layers.push(layer),
            None => groups.push((activation.clone(), vec![layer])),
        }
    }
    groups.into_iter().map(|(_, layers)| layers).collect()
}

/// The activations (first inputs) of the layers the pass would quantize, each once.
pub fn quantized_activations(model: &Model) -> Vec<String> {
    let graph_inputs: HashSet<&str> = model.graph.inputs.iter().map(|v| v.name.as_str()).collect();
    let mut seen = HashSet::new();
    model
        .graph
        .nodes()
        .filter(|n| quantizable_weight(&model.graph, &graph_inputs, n).is_some())
        .filter_map(|n| n.inputs.first().cloned())
        .filter(|a| seen.insert(a.clone()))
        .collect()
}

/// The constant float32 weight of a MatMul, or of a Gemm with `alpha = beta =
/// 1` and `transA = 0`, and whether it is read as `[N, K]` (Gemm `transB`).
pub(super) fn quantizable_weight<'g>(graph: &'g Graph, graph_inputs: &HashSet<&str>, node: &Node) -> Option<(&'g Tensor, bool)> {
    let gemm = node.is_onnx("Gemm");
    if !(node.is_onnx("MatMul") || gemm) {
        return None;
    }
    if gemm {
        let unit = |name: &str| node.attr_float(name).unwrap_or(1.0) == 1.0;
        if !unit("alpha") || !unit("beta") || node.attr_int("transA").unwrap_or(0) != 0 {
            return None;
        }
    }
    let name = node.inputs.get(1)?;
    let transposed = gemm && node.attr_int("transB").unwrap_or(0) != 0;
    if let Some(weight) = constant(graph, graph_inputs, name) {
        return (weight.dims.len() == 2).then_some((weight, transposed));
    }
    // a tied lm_head: MatMul(x, Transpose(E)) with E the [V, D] embedding table,
    // read as the [N, K] weight it is (the Transpose is left for dead-code)
    let producer = graph.producer(name).and_then(|(id, _)| graph.node(id)).filter(|n| n.is_onnx("Transpose") && n.inputs.len() == 1)?;
    let swaps = producer.attr_ints("perm").is_none_or(|p| p == [1, 0]);
    let table = constant(graph, graph_inputs, &producer.inputs[0])?;
    (swaps && !gemm && table.dims.len() == 2).then_some((table, true))
}

/// The node as a [`Candidate`], when it is a MatMul or Gemm of a constant weight.
fn candidate(graph: &Graph, graph_inputs: &HashSet<&str>, id: NodeId, node: &Node, rounded: &RoundedWeights) -> Option<Candidate> {
    let output = node.outputs.first().filter(|o| !o.is_empty())?.clone();
    let (weight, transposed) = quantizable_weight(graph, graph_inputs, node)?;
    let [rows, cols] = weight.dims[..] else { return None };
    let (rows, cols) = (usize::try_from(rows).ok()?, usize::try_from(cols).ok()?);
    let weights = match rounded.get(&weight.name) {
        Some(matrix) => QuantizedWeights::from_matrix(matrix),
        None => {
            let values = weight.to_f32().ok()?;
            QuantizedWeights::new(values.as_slice()?, rows, cols, transposed)
        }
    };
    let (mut bias, mut addend) = (None, None);
    if node.is_onnx("Gemm") {
        let n = if transposed { rows } else { cols } as i64;
        match node.inputs.get(2).filter(|c| !c.is_empty()) {
            Some(c) if constant(graph, graph_inputs, c).is_some_and(|t| t.dims == [n]) => bias = Some(c.clone()),
            Some(c) => addend = Some(c.clone()),
            None => {}
        }
    }
    Some(Candidate { id, activation: node.inputs[0].clone(), output, weights, bias, addend, folded_add: None })
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

/// What [`QuantizeDynamic`] takes from calibration data.
#[derive(Debug, Default)]
pub struct Int8Calibration {
    /// Weights GPTQ-rounded against `X^T X` of their input, for
    /// [`QuantizeDynamic::rounded`] (empty when GPTQ was not asked for).
    pub rounded: RoundedWeights,
    /// For [`QuantizeDynamic::gelu_zero_points`]: each GELU output a
    /// quantized MatMul reads, where the one-sided grid beats the symmetric one
    /// on the calibration rows ([`one_sided_zero_point`]).
    pub gelu_zero_points: HashMap<String, u8>,
}

/// One run of `model` over `source` (real-token rows only, padding left
/// out): with `gptq`, `X^T X` of every quantized MatMul's input and the int8
/// weights GPTQ-rounded against it; and the row maxima of each GELU output a
/// quantized MatMul reads, for its one-sided grid.
pub fn calibrate_int8(model: &Model, source: &CalibrationSource, gptq: bool) -> Result<Int8Calibration, GptqRoundingError> {
    let activations = quantized_activations(model);
    let gelu_outputs: Vec<&str> = activations.iter().map(String::as_str).filter(|a| is_gelu_output(&model.graph, a)).collect();
    let taps: Vec<&str> = if gptq { activations.iter().map(String::as_str).collect() } else { gelu_outputs.clone() };
    if taps.is_empty() {
        return Ok(Int8Calibration::default());
    }
    let mut grams: Vec<Gram> = if gptq { taps.iter().map(|t| Gram::new(t)).collect() } else { Vec::new() };
    let mut row_maxima: Vec<Vec<f32>> = vec![Vec::new(); gelu_outputs.len()];
    for_each_batch(model, &taps, source, |batch| {
        for (gram, value) in grams.iter_mut().zip(&batch.taps) {
            gram.observe(value, batch.token_rows(value).as_deref())?;
        }
        for (maxima, gelu) in row_maxima.iter_mut().zip(&gelu_outputs) {
            let Some(value) = taps.iter().position(|t| t == gelu).map(|i| &batch.taps[i]) else { continue };
            maxima.extend(row_maxima_of(gelu, value, batch.token_rows(value).as_deref())?);
        }
        Ok(())
    })?;
    let gelu_zero_points = gelu_outputs.iter().zip(&row_maxima).filter_map(|(name, maxima)| Some((name.to_string(), one_sided_zero_point(maxima)?))).collect();
    let rounded = if gptq {
        let hessians = grams.into_iter().map(|g| (g.name, g.xtx)).collect();
        gptq_rounded_weights(model, &hessians)?
    } else {
        RoundedWeights::new()
    };
    Ok(Int8Calibration { rounded, gelu_zero_points })
}

/// The largest value of each row (last axis) of `value` whose `keep` entry is true.
fn row_maxima_of(name: &str, value: &tract_onnx::prelude::Tensor, keep: Option<&[bool]>) -> Result<Vec<f32>, CalibrateError> {
    let fail = |why: String| CalibrateError::Observe { tensor: name.to_string(), why };
    let cast = value.cast_to::<f32>().map_err(|e| fail(format!("not numeric: {e}")))?;
    let view = cast.to_plain_array_view::<f32>().map_err(|e| fail(e.to_string()))?;
    let values = view.as_slice().ok_or_else(|| fail("not contiguous".into()))?;
    let width = value.shape().last().copied().unwrap_or(1).max(1);
    let rows = values.chunks_exact(width).enumerate().filter(|(r, _)| keep.is_none_or(|k| k.get(*r).copied().unwrap_or(true)));
    Ok(rows.map(|(_, row)| row.iter().copied().fold(f32::NEG_INFINITY, f32::max)).collect())
}

/// Why [`calibrate_int8`] failed.
#[derive(Debug, thiserror::Error)]
pub enum GptqRoundingError {
    #[error("calibration for GPTQ: {0}")]
    Calibrate(#[from] CalibrateError),
    #[error("GPTQ: {0}")]
    Gptq(#[from] GptqError),
}

/// GPTQ-rounds, on [`INT8_PAIR_GRID`], the weight of every MatMul or Gemm
/// whose activation has a Hessian in `hessians` (`X^T X` by activation name),
/// for [`QuantizeDynamic::rounded`]. A weight read by several nodes is rounded
/// against the first one's activation.
pub fn gptq_rounded_weights(model: &Model, hessians: &HashMap<String, Mat<f64>>) -> Result<RoundedWeights, GptqError> {
    let graph_inputs: HashSet<&str> = model.graph.inputs.iter().map(|v| v.name.as_str()).collect();
    let mut jobs: Vec<(&Tensor, bool, &Mat<f64>)> = Vec::new();
    for node in model.graph.nodes() {
        let Some((weight, transposed)) = quantizable_weight(&model.graph, &graph_inputs, node) else { continue };
        let Some(hessian) = node.inputs.first().and_then(|a| hessians.get(a)) else { continue };
        if !jobs.iter().any(|(w, _, _)| w.name == weight.name) {
            jobs.push((weight, transposed, hessian));
        }
    }
    use rayon::prelude::*;
    jobs.into_par_iter()
        .filter_map(|(weight, transposed, hessian)| {
            let values = weight.to_f32().ok()?;
            let values = values.as_slice()?.to_vec();
            let [rows, cols] = weight.dims[..] else { return None };
            let (rows, cols) = (rows as usize, cols as usize);
            // GPTQ reads W as [K, N]; a transposed Gemm weight is [N, K]
            let (k, n, w) = if transposed {
                let mut t = vec![0f32; rows * cols];
                for (r, row) in values.chunks_exact(cols).enumerate() {
                    for (c, &v) in row.iter().enumerate() {
                        t[c * rows + r] = v;
                    }
                }
                (cols, rows, t)
            } else {
                (rows, cols, values)
            };
            Some(gptq(&w, k, n, hessian.as_ref(), INT8_PAIR_GRID, GptqOptions::default()).map(|m| (weight.name.clone(), m)))
        })
        .collect()
}
