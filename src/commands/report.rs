//! What each command reports (`--report FILE` writes it as JSON, with the
//! input and output paths added), and the one-line summaries the CLI prints.

use crate::passes::PassRecord;
use crate::prune::layers::LayerDropReport;
use crate::prune::structured::StructuredReport;
use crate::sensitivity::Int8Choice;
use crate::target::Target;
use crate::verify::Comparison;
use serde::Serialize;

/// `optimize`: what each pass did, node counts and the check.
#[derive(Debug, Serialize)]
pub struct OptimizeReport {
    pub target: Target,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub opset_before: Option<i64>,
    pub opset_after: Option<i64>,
    pub passes: Vec<PassRecord>,
    pub verification: Option<Comparison>,
}

/// `quantize`, every mode.
#[derive(Debug, Serialize)]
pub struct QuantizeReport {
    pub target: Target,
    pub mode: &'static str,
    /// int8 modes: per tensor or per token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activations: Option<String>,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub tolerance: Tolerance,
    pub passes: Vec<PassRecord>,
    /// `--max-error`'s search: each layer's cost and what was kept in float.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<Int8Choice>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub int4: Option<Int4Report>,
    pub seconds: f64,
    pub verification: Option<Comparison>,
}

/// The bound a quantized model was checked against.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Tolerance {
    pub min_cosine: f64,
    /// None: no element bound.
    pub atol: Option<f32>,
    pub rtol: f32,
}

/// `quantize --mode int4-weight`: the choices and what they saved.
#[derive(Debug, Serialize)]
pub struct Int4Report {
    pub block_size: usize,
    pub rounding: &'static str,
    pub zero_point: bool,
    pub accuracy_level: Option<i64>,
    pub embeddings: &'static str,
    pub replaced_float_weight_bytes: u64,
    pub int4_weight_bytes: u64,
    pub initializer_bytes_before: u64,
    pub initializer_bytes_after: u64,
    /// What `onnxopt verify INPUT OUTPUT` reproduces: the same seeded inputs and lowering.
    pub verify_tolerance: Option<Tolerance>,
}

/// `prune`: per method.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum PruneReport {
    /// Unstructured and N:M: every layer's sparsity and error, and the check.
    Weights(crate::prune::PruneReport),
    /// Heads and neurons, or whole layers.
    Blocks { seconds: f64, pruning: BlocksReport },
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum BlocksReport {
    Structured(StructuredReport),
    Layers(LayerDropReport),
}

impl PruneReport {
    pub fn verification(&self) -> Option<&Comparison> {
        match self {
            PruneReport::Weights(r) => r.verification.as_ref(),
            PruneReport::Blocks { .. } => None,
        }
    }
}

/// What each pass did, one line per pass.
pub fn pass_lines(records: &[PassRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            let rules: Vec<String> = r.by_origin.iter().map(|(k, v)| format!("{k} x{v}")).collect();
            format!(
                "{:<28} {:>4} patches, nodes {:>4} -> {:<4} {:>6} ms  {}",
                r.pass,
                r.patches,
                r.nodes_before,
                r.nodes_after,
                r.milliseconds,
                rules.join(", ")
            )
        })
        .collect()
}
