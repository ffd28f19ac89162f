//! `layer-norm-affine-into-weights`: a widening projection of a
//! LayerNormalization's output (a transformer's first FFN MatMul) reads the
//! normalized rows instead, with the norm's scale folded into the weight's
//! rows and its shift into the bias. For `quantize --mode int8` only.
//!
//! ```text
//! y = LayerNormalization(x, g, b)       y = LayerNormalization(x, g, b)    # still read elsewhere (the residual)
//! h = MatMul(y, W)                 ->   n = LayerNormalization(x, 1, 0)    # the same axis, epsilon, stash_type
//! f = BiasGelu(h, c)                    h = MatMul(n, diag(g) W)
//!                                       f = BiasGelu(h, c + b W)
//! ```
//!
//! Exact up to float rounding: `y W = (g * n + b) W = n (diag(g) W) + b W`.
//! The shift `b W` joins the constant the product's one reader adds (an
//! `Add`'s, a BiasGelu's or FastGelu's bias), or an `Add` of its own.
//!
//! Why: the norm's per-channel shift and scale are what make its output hard
//! to quantize with one scale per tensor; the normalized rows are not. On
//! all-MiniLM-L6-v2's six FFN inputs (64 calibration sentences, int8 weights
//! per column, 1 - cosine of the FFN1 product): per tensor on `y` 7.5e-4 to
//! 2.9e-3, per tensor on `n` 3.1e-4 to 5.1e-4, per token on `y` 1.0e-4 to
//! 3.2e-4, per token on `n` 5.9e-5 to 1.2e-4. The cost is one more
//! LayerNormalization pass over the FFN's input.
//!
//! Left alone: a norm without an affine part (scale 1, shift 0), a norm over
//! another axis than the last, a scale or shift that
//! is not a constant float32 `[K]` initializer, a norm whose Mean or
//! InvStdDev output is read, and projections that do not widen (`N <= K`:
//! Q/K/V, which quantize well per tensor as they are).

use super::{Pass, PassError};
use crate::ir::{DataType, Model, Node, Patch, Tensor};
use ndarray::{Array1, Array2, ArrayD, Axis, Ix1, Ix2};

/// The pass. See the module documentation.
pub struct LayerNormAffineIntoWeights;

impl Pass for LayerNormAffineIntoWeights {
    fn name(&self) -> &'static str {
        "layer-norm-affine-into-weights"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let graph = &model.graph;
        let mut patches = Vec::new();
        for (_, norm) in graph.nodes_with_ids() {
            if !norm.is_onnx("LayerNormalization") || norm.attr_int("axis").unwrap_or(-1) != -1 {
                continue;
            }
            if norm.outputs.iter().skip(1).any(|o| !o.is_empty() && !graph.uses(o).is_empty()) {
                continue;
            }
            let y = &norm.outputs[0];
            for reader in graph.uses(y) {
                let Some(matmul) = graph.node(reader.node) else { continue };
                if !matmul.is_onnx("MatMul") || matmul.inputs[0] != *y || matmul.inputs.get(1) == Some(y) {
                    continue;
                }
                let Some(weight) = graph.initializer(&matmul.inputs[1]).filter(|w| w.dtype == DataType::Float && w.dims.len() == 2) else { continue };
                let (k, n) = (weight.dims[0] as usize, weight.dims[1] as usize);
                if n <= k {
                    continue;
                }
                let Some(scale) = norm.inputs.get(1).and_then(|s| float_vector(model, s, k)) else { continue };
                let shift = match norm.inputs.get(2).filter(|b| !b.is_empty()) {
                    Some(b) => match float_vector(model, b, k) {
                        Some(shift) => shift,
                        None => continue,
                    },
                    None => Array1::zeros(k),
                };
                if scale.iter().all(|&v| v == 1.0) && shift.iter().all(|&v| v == 0.0) {
                    continue; // no affine part to fold (this pass's own norms)
                }
                let Some(w) = weight.to_f32().ok().and_then(|w| w.into_dimensionality::<Ix2>().ok()) else { continue };
                let h = &matmul.outputs[0];
                let name = |what: &str| format!("{h}/{what}");
                let mut patch = Patch::new("layer-norm-affine-into-weights");

                // n: the same norm without its affine part
                let normalized = name("normalized");
                let (ones, zeros) = (name("unit_scale"), name("zero_shift"));
                patch.add_initializer(Tensor::from_f32(ones.clone(), &ArrayD::from_elem(vec![k], 1.0f32)));
                patch.add_initializer(Tensor::from_f32(zeros.clone(), &ArrayD::zeros(vec![k])));
                let mut plain = Node::new("LayerNormalization", &[&norm.inputs[0], &ones, &zeros], &[&normalized])
                    .with_name(format!("{}/normalized", norm.name_or_output()));
                for attribute in &norm.attributes {
                    plain = plain.with_attr(attribute.name.clone(), attribute.value.clone());
                }
                patch.add_node(plain);

                // diag(g) W, and b W
                let scaled: Array2<f32> = &w * &scale.view().insert_axis(Axis(1));
                let scaled_weight = name("scaled_weight");
                patch.add_initializer(Tensor::from_f32(scaled_weight.clone(), &scaled.into_dyn()));
                let shift_product: Array1<f32> = shift.dot(&w);
                patch.remove_node(reader.node);
                let product = |output: &str| Node::new("MatMul", &[&normalized, &scaled_weight], &[output]).with_name(matmul.name.clone());
                match bias_reader(model, h, n) {
                    // b W joins the bias the product's reader adds
                    Some((reader_id, slot, bias)) => {
                        patch.add_node(product(h));
                        let folded = name("shifted_bias");
                        patch.add_initializer(Tensor::from_f32(folded.clone(), &(bias + &shift_product).into_dyn()));
                        let mut rewritten = graph.node(reader_id).expect("a reader of h").clone();
                        rewritten.inputs[slot] = folded;
                        patch.remove_node(reader_id);
                        patch.add_node(rewritten);
                    }
                    None if shift.iter().all(|&v| v == 0.0) => {
                        patch.add_node(product(h));
                    }
                    // an Add of its own; h keeps its name
                    None => {
                        let (unshifted, shift_name) = (name("unshifted"), name("shift"));
                        patch.add_initializer(Tensor::from_f32(shift_name.clone(), &shift_product.into_dyn()));
                        patch.add_node(product(&unshifted));
                        patch.add_node(Node::new("Add", &[&unshifted, &shift_name], &[h]));
                    }
                }
                patches.push(patch);
            }
        }
        Ok(patches)
    }
}

/// The one reader of `h` that adds a constant float32 `[n]` bias to it: an
/// `Add`, or com.microsoft `BiasGelu` / `FastGelu` (bias at input 1). Its
/// node, the bias's input slot, and the bias.
fn bias_reader(model: &Model, h: &str, n: usize) -> Option<(crate::ir::NodeId, usize, Array1<f32>)> {
    let graph = &model.graph;
    let [only] = graph.uses(h) else { return None };
    let reader = graph.node(only.node)?;
    if graph.is_graph_output(h) {
        return None;
    }
    let contrib_gelu = reader.domain == super::lower_contrib::CONTRIB_DOMAIN && matches!(reader.op_type.as_str(), "BiasGelu" | "FastGelu");
    let slot = if reader.is_onnx("Add") {
        reader.inputs.iter().position(|i| i != h)?
    } else if contrib_gelu && reader.inputs.first().map(String::as_str) == Some(h) {
        1
    } else {
        return None;
    };
    Some((only.node, slot, float_vector(model, reader.inputs.get(slot)?, n)?))
}

/// The float32 `[len]` initializer `name`, as a vector.
fn float_vector(model: &Model, name: &str, len: usize) -> Option<Array1<f32>> {
    let tensor = model.graph.initializer(name).filter(|t| t.dtype == DataType::Float && t.dims == [len as i64])?;
    tensor.to_f32().ok()?.into_dimensionality::<Ix1>().ok()
}
