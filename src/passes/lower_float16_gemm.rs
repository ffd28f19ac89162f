//! `lower-float16-gemm`: for verification only, runs a float16 `Gemm` that
//! tract cannot load in float32 between Casts.
//!
//! tract-onnx 0.23.9 refuses a float16 Gemm with a C input or `alpha != 1`
//! ("Output mismatch after rewiring expansion for output #0: expected ...,F16
//! got ...,F32": its expansion scales in float32); without either it runs
//! (measured on one-node models). `onnxopt quantize --mode fp16` makes such
//! Gemms (GPT-2's Conv1D layers are `Gemm(x, w, b)`), so `verify_rewrite`
//! lowers them before tract runs: the inputs are Cast to float32, the Gemm
//! runs with its own attributes, its result is Cast back to float16. That is
//! how ONNX Runtime's CPU provider runs every float16 Gemm
//! (`tests/scripts/ort_float16_kernels.py`); against float16 arithmetic it
//! differs by the rounding of the product (the result is rounded to float16
//! once, at the end).
//!
//! ```text
//! y = Gemm(a, w, c) {transB=1}    ->   y/input0_float32 = Cast(a) {to=FLOAT}
//!     # all float16                    y/input1_float32 = Cast(w) {to=FLOAT}
//!                                      y/input2_float32 = Cast(c) {to=FLOAT}
//!                                      y/float32 = Gemm(y/input0_float32, y/input1_float32, y/input2_float32) {transB=1}
//!                                      y = Cast(y/float32) {to=FLOAT16}
//! ```

use super::{Pass, PassError};
use crate::ir::{infer_types, AttrValue, DataType, Model, Node, Patch};

/// The pass. See the module documentation.
pub struct LowerFloat16Gemm;

impl Pass for LowerFloat16Gemm {
    fn name(&self) -> &'static str {
        "lower-float16-gemm"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let types = infer_types(model);
        let mut patches = Vec::new();
        for (id, node) in model.graph.nodes_with_ids() {
            let [output] = &node.outputs[..] else { continue };
            let scaled = node.attr_float("alpha").is_some_and(|a| a != 1.0);
            let with_c = node.inputs.get(2).is_some_and(|c| !c.is_empty());
            if !node.is_onnx("Gemm") || types.elem_type(output) != Some(DataType::Float16) || !(scaled || with_c) {
                continue;
            }
            let mut patch = Patch::new("float16-gemm-in-float32");
            patch.remove_node(id);
            let cast = |to: DataType| AttrValue::Int(to.code() as i64);
            let mut widened = Vec::new();
            for (i, input) in node.inputs.iter().enumerate() {
                let name = if input.is_empty() { String::new() } else { format!("{output}/input{i}_float32") };
                if !input.is_empty() {
                    patch.add_node(Node::new("Cast", &[input], &[&name]).with_attr("to", cast(DataType::Float)));
                }
                widened.push(name);
            }
            let product = format!("{output}/float32");
            let inputs: Vec<&str> = widened.iter().map(String::as_str).collect();
            let mut gemm = Node::new("Gemm", &inputs, &[&product]).with_name(node.name.clone());
            gemm.attributes = node.attributes.clone();
            patch.add_node(gemm);
            patch.add_node(Node::new("Cast", &[&product], &[output]).with_attr("to", cast(DataType::Float16)));
            patches.push(patch);
        }
        Ok(patches)
    }
}
