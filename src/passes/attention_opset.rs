//! `raise-opset-for-attention`: raises the default-domain opset to 23, with
//! `raise-opset` (exactly), when the model holds a fused com.microsoft
//! `Attention` that `split-attention-projection` would then write as ONNX
//! `Attention`-23 instead of com.microsoft `MultiHeadAttention`; otherwise, or
//! where `raise-opset` cannot convert every op (a model below opset 17, an op
//! it does not know), nothing.
//!
//! Why: ONNX Runtime 1.32's CPU kernel for ONNX `Attention` is faster than its
//! `MultiHeadAttention` on the same inputs. One MiniLM layer at batch 8, seq
//! 128, 12 heads of 32, with a `[B, 1, S, S]` float mask: 2.83-2.93 ms against
//! 3.15-3.29 ms; the whole `--mode int8` MiniLM model, 40 alternating runs:
//! 0.664x -> 0.598x of fp32 at batch 1 and 0.599x -> 0.577x at batch 8 (the
//! MultiHeadAttention model and an opset-23 copy with ONNX Attention, the
//! same int8 products). ORT reads opset 23 from version 1.23 on.

use super::raise_opset::RaiseOpset;
use super::split_attention_projection::has_attention_for_onnx;
use super::{Pass, PassError};
use crate::ir::{Model, Patch};

/// The opset ONNX `Attention` was introduced at.
pub const ATTENTION_OPSET: i64 = 23;

/// The pass. See the module documentation.
pub struct RaiseOpsetForAttention;

impl RaiseOpsetForAttention {
    fn wanted(model: &Model) -> bool {
        model.opset("").is_some_and(|opset| opset < ATTENTION_OPSET) && has_attention_for_onnx(model)
    }
}

impl Pass for RaiseOpsetForAttention {
    fn name(&self) -> &'static str {
        "raise-opset-for-attention"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        if !Self::wanted(model) {
            return Ok(Vec::new());
        }
        // a model raise-opset cannot convert stays as it is, and keeps MultiHeadAttention
        Ok(RaiseOpset { to: ATTENTION_OPSET }.propose(model).unwrap_or_default())
    }

    fn default_opset(&self, model: &Model) -> Option<i64> {
        Self::wanted(model).then(|| RaiseOpset { to: ATTENTION_OPSET }.default_opset(model)).flatten()
    }
}
