//! `approximate-gelu`: ONNX Runtime's erf GELUs become its tanh GELU, for
//! `quantize --mode int8` (ORT target) only.
//!
//! ```text
//! com.microsoft.BiasGelu(x, b)  ->  com.microsoft.FastGelu(x, b)
//! com.microsoft.Gelu(x)         ->  com.microsoft.FastGelu(x)
//!
//! erf form:   0.5 x (1 + erf(x / sqrt(2)))
//! tanh form:  0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
//! ```
//!
//! Not exact: the two forms differ by at most 4.7e-4 (near |x| = 2), against
//! an int8 step of 1e-2 or more on the FFN-output MatMul's input, which is
//! what reads the GELU. Both are at least -0.1701 (the tanh form's minimum is
//! -0.17004), so the one-sided per-token grid of `quantize-dynamic` holds.
//!
//! Why: ORT 1.32's CPU kernels on MiniLM's `[8, 128, 1536]` FFN activation
//! (AVX2): BiasGelu 1.39 ms, FastGelu with its bias 1.06 ms. In the whole
//! `--mode int8` model at batch 8 the six calls went from about 10 ms to 8.
//!
//! Left alone: ONNX `Gelu` (the portable target keeps the standard op) and
//! every GELU outside `--mode int8`, whose outputs must match the input model
//! to float rounding.

use super::lower_contrib::CONTRIB_DOMAIN;
use super::{Pass, PassError};
use crate::ir::{Model, Patch};

/// The pass. See the module documentation.
pub struct ApproximateGelu;

impl Pass for ApproximateGelu {
    fn name(&self) -> &'static str {
        "approximate-gelu"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let mut patches = Vec::new();
        for (id, node) in model.graph.nodes_with_ids() {
            let erf_gelu = node.domain == CONTRIB_DOMAIN && matches!(node.op_type.as_str(), "BiasGelu" | "Gelu");
            if !erf_gelu {
                continue;
            }
            let mut patch = Patch::new(format!("{}-as-fast-gelu", node.op_type.to_lowercase()));
            // the same node (name, inputs, attributes, doc string) under the tanh op
            let mut fast = node.clone();
            fast.op_type = "FastGelu".into();
            patch.remove_node(id);
            patch.add_node(fast);
            patches.push(patch);
        }
        Ok(patches)
    }
}
