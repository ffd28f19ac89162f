//! The pass order, written once.
//!
//! 0. `raise-opset` (only with `--opset N`): first, so that every later pass
//!    works at the final opset: the fusion rules choose their emissions by it
//!    (`:portable@20 (Gelu ?x)`), and constants folded or nodes emitted by
//!    later passes are then in the new opset's forms (ReduceMean axes as an
//!    input) rather than left behind in the old ones. It is not an optimization
//!    and `--passes` / `--skip` do not select it: the output's opset is what the
//!    user asked for.
//! 1. `remove-no-ops`: Identity, same-shape Reshape, ... go first: exporters put
//!    them inside the patterns fusions look for (an Identity between a bias and
//!    its Add, a Reshape to the same shape inside attention).
//! 2. `fold-constants`: Constant nodes become initializers, constant subgraphs
//!    values; rules then see constants where the exporter wrote computations.
//! 3. `fold-shapes`: shape computations whose value is known become constants.
//! 4. `fold-constants` again: what 3 made constant feeds float arithmetic
//!    (Optimum's GPT-2 computes its attention scale as
//!    `Sqrt(1 / Sqrt(Cast(head_size)))` from a shape).
//! 5. `inline-constant-if`: an If whose condition 2-4 made constant becomes
//!    its taken branch, so that the rules (and tract) see its nodes.
//! 6. `merge-common-subexpressions`: shared weights and repeated shape
//!    computations become one (after folding, so that folded copies merge).
//! 7. `eliminate-dead-code`: drops what 1-6 disconnected, so that rules see
//!    single-use intermediates (a fusion refuses a value used outside its match).
//! 8. `fuse`: the rules of `passes/*.rules` for the target (canonical forms,
//!    Llama's norms and rotary, attention, layer norm, Gelu), to a fixpoint.
//! 9. `expand-attention-bias` (ORT only): a key-padding mask `[B, 1, 1, T]`
//!    the fused Attention read is expanded to its query rows, which ORT's
//!    kernels do not broadcast (right after `fuse`, which made the ops).
//! 10. `pack-sibling-matmuls` (ORT only): MatMuls of one activation by
//!     different weights (a decoder's Q, K and V; its MLP's gate and up) become
//!     one MatMul and a Split: one kernel per decode step instead of three.
//! 11. `remove-no-ops` again: the identity Transposes and same-shape Reshapes
//!     fusions leave between fused ops.
//! 12. `merge-common-subexpressions` again: fusions compute new constants
//!     (packed QKV weights) that may repeat (all-zero biases of several layers),
//!     and the masks' expansions of 9, one per layer, become one.
//! 13. `eliminate-dead-code` again: what only the fused nodes read, and the
//!     duplicates 12 replaced.

use super::add_into_sum::AddIntoSum;
use super::approximate_gelu::ApproximateGelu;
use super::attention_opset::{RaiseOpsetForAttention, ATTENTION_OPSET};
use super::common_subexpression::MergeCommonSubexpressions;
use super::constant_folding::FoldConstants;
use super::dead_code::EliminateDeadCode;
use super::expand_attention_bias::ExpandAttentionBias;
use super::fuse::Fuse;
use super::inline_constant_if::InlineConstantIf;
use super::layer_norm_affine::LayerNormAffineIntoWeights;
use super::no_op::RemoveNoOps;
use super::pack_sibling_matmuls::PackSiblingMatMuls;
use super::quantize_dynamic::QuantizeDynamic;
use super::quantize_fp16::ConvertToFloat16;
use super::quantize_static::QuantizeStatic;
use super::raise_opset::RaiseOpset;
use super::residual_sum::ResidualAddAsSum;
use super::shape_folding::FoldShapes;
use super::split_attention_projection::SplitAttentionProjection;
use super::Pass;

pub use crate::target::Target;

/// Options that shape the pipeline.
#[derive(Clone, Debug, Default)]
pub struct PipelineOptions {
    /// Run only these passes (by name), when given.
    pub only: Option<Vec<String>>,
    pub skip: Vec<String>,
    pub trace_rule: Option<String>,
    /// Fusion rules not to apply (by name).
    pub skip_rules: Vec<String>,
    /// Raise the default-domain opset to this version first (`raise-opset`).
    pub opset: Option<i64>,
}

impl PipelineOptions {
    /// The cleanup passes only: no fusion and no packing of projections (what
    /// `quantize` runs first; fusing is `optimize`'s job).
    pub fn cleanup_only() -> PipelineOptions {
        PipelineOptions { skip: vec!["fuse".into(), "pack-sibling-matmuls".into()], ..PipelineOptions::default() }
    }
}

/// The passes for `target`, in order.
pub fn optimization_passes(target: Target, options: &PipelineOptions) -> Vec<Box<dyn Pass>> {
    let all: Vec<Box<dyn Pass>> = vec![
        Box::new(RemoveNoOps),
        Box::new(FoldConstants::default()),
        Box::new(FoldShapes),
        Box::new(FoldConstants::default()),
        Box::new(InlineConstantIf),
        Box::new(MergeCommonSubexpressions),
        Box::new(EliminateDeadCode),
        Box::new(Fuse::new(target.name(), options.trace_rule.clone()).without_rules(&options.skip_rules)),
        Box::new(ExpandAttentionBias),
        Box::new(PackSiblingMatMuls),
        // what the fusions leave: identity Transposes, Reshapes to the same shape
        Box::new(RemoveNoOps),
        Box::new(MergeCommonSubexpressions),
        Box::new(EliminateDeadCode),
    ];
    let raise = options.opset.map(|to| Box::new(RaiseOpset { to }) as Box<dyn Pass>);
    let selected = all
        .into_iter()
        // one kernel for Q, K and V pays in ONNX Runtime; elsewhere it is left to the engine
        .filter(|p| !["pack-sibling-matmuls", "expand-attention-bias"].contains(&p.name()) || target == Target::Ort)
        .filter(|p| options.only.as_ref().is_none_or(|only| only.iter().any(|n| n == p.name())))
        .filter(|p| !options.skip.iter().any(|n| n == p.name()));
    raise.into_iter().chain(selected).collect()
}

/// Fusions `--mode int8` leaves out. ORT 1.32's CPU SkipLayerNormalization
/// took 1.3 ms per call on MiniLM at batch 8 (its Add + LayerNormalization,
/// 0.6 ms); in a float model ORT fuses them back itself and nothing changes,
/// but behind per-token int8 products it does not, and the unfused form ran
/// 9% faster (batch 8, 125 -> 113 ms).
pub const INT8_UNFUSED_RULES: [&str; 4] = ["skip-layer-norm-bias", "skip-layer-norm", "skip-layer-norm-bias-sum", "skip-layer-norm-sum"];

/// The passes `onnxopt quantize --mode int8` runs before it quantizes, in
/// order: [`optimization_passes`] for `target` without [`INT8_UNFUSED_RULES`],
/// `layer-norm-affine-into-weights` (an FFN's first MatMul reads the
/// normalized rows, which quantize far better per tensor), then, for ORT:
/// - `raise-opset-for-attention` (to opset 23, where it can raise exactly;
///   left out when `max_opset` is below 23);
/// - `split-attention-projection`: the packed Q/K/V projection back out of
///   each fused Attention, as three MatMuls feeding ONNX Attention at opset
///   23 (MultiHeadAttention below), so that the `--max-error` search sees
///   every MatMul [`quantization_passes`] will quantize;
/// - `residual-add-as-sum`, so that ORT does not fuse what
///   [`INT8_UNFUSED_RULES`] left apart;
/// - `approximate-gelu`: ORT's tanh GELU kernel is faster than its erf one,
///   and the difference, under 5e-4, is far below the int8 step of the MatMul
///   that reads it.
pub fn int8_fusion_passes(target: Target, max_opset: Option<i64>) -> Vec<Box<dyn Pass>> {
    // packed projections would share one int8 scale per tensor: int8 keeps them apart
    let options = PipelineOptions {
        skip_rules: INT8_UNFUSED_RULES.iter().map(|r| r.to_string()).collect(),
        skip: vec!["pack-sibling-matmuls".into()],
        ..PipelineOptions::default()
    };
    let mut passes = optimization_passes(target, &options);
    passes.push(Box::new(LayerNormAffineIntoWeights));
    if target == Target::Ort {
        if max_opset.is_none_or(|highest| highest >= ATTENTION_OPSET) {
            passes.push(Box::new(RaiseOpsetForAttention));
        }
        passes.push(Box::new(SplitAttentionProjection));
        passes.push(Box::new(ResidualAddAsSum));
        passes.push(Box::new(ApproximateGelu));
    }
    passes
}

/// The passes of `onnxopt quantize`, in order:
/// 1. the cleanup passes of [`optimization_passes`] (1-5 and their second
///    round), without `fuse` (fusing is `optimize`'s job, or `--mode int8`'s
///    before it quantizes);
/// 2. for ORT, `split-attention-projection`: a fused Attention holds its
///    Q/K/V weights inside one op, where `quantize-dynamic` does not see a
///    MatMul; split out, they are one MatMul feeding MultiHeadAttention;
/// 3. `quantize-dynamic`, on the cleaned graph (folded constants are the
///    weights it looks for);
/// 4. `add-into-sum`: a bias Add left behind a per-token product (ORT's
///    MatMulIntegerToFloat would add a bias before its row scale) joins the
///    residual Sum it feeds;
/// 5. `eliminate-dead-code`: the float weights the int8 ones replaced.
pub fn quantization_passes(quantize: QuantizeDynamic) -> Vec<Box<dyn Pass>> {
    let cleanup = PipelineOptions::cleanup_only();
    let mut passes = optimization_passes(quantize.target, &cleanup);
    if quantize.target == Target::Ort {
        passes.push(Box::new(SplitAttentionProjection));
    }
    passes.push(Box::new(quantize));
    passes.push(Box::new(AddIntoSum));
    passes.push(Box::new(EliminateDeadCode));
    passes
}

/// The passes of `onnxopt quantize --mode fp16`, in order: the cleanup passes
/// as for [`quantization_passes`] (folded constants become initializers, which
/// `convert-to-float16` stores in float16; `fuse` is left to `optimize`, whose
/// fused ops convert as they are), then `convert-to-float16`, then
/// `eliminate-dead-code`.
pub fn float16_passes(target: Target, convert: ConvertToFloat16) -> Vec<Box<dyn Pass>> {
    let cleanup = PipelineOptions::cleanup_only();
    let mut passes = optimization_passes(target, &cleanup);
    passes.push(Box::new(convert));
    passes.push(Box::new(EliminateDeadCode));
    passes
}

/// `onnxopt quantize --mode int8-static` runs in two steps around calibration:
/// 1. [`cleanup_passes`] (as for `quantize-dynamic`): the activations are
///    calibrated on the cleaned graph, whose tensor names `quantize-static` reads;
/// 2. these: `quantize-static` with the calibrated ranges, then
///    `eliminate-dead-code` (the float weights the int8 ones replaced).
pub fn static_quantization_passes(quantize: QuantizeStatic) -> Vec<Box<dyn Pass>> {
    vec![Box::new(quantize), Box::new(EliminateDeadCode)]
}

/// The cleanup passes of [`optimization_passes`] without `fuse` (a fused op
/// hides the MatMuls quantization looks for).
pub fn cleanup_passes(target: Target) -> Vec<Box<dyn Pass>> {
    optimization_passes(target, &PipelineOptions::cleanup_only())
}

/// Every pass name, for `--passes` / `--skip` validation.
pub fn pass_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = optimization_passes(Target::Ort, &PipelineOptions::default()).iter().map(|p| p.name()).collect();
    names.sort();
    names.dedup();
    names
}
