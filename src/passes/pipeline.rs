//! The pass order, written once.
//!
//! 1. `fuse`: the rules of `passes/*.rules` for the target (canonical forms,
//!    attention, layer norm, Gelu), to a fixpoint. Rules see the graph as
//!    exported: cleanup runs after, so that a fusion never has to undo it.

use super::fuse::Fuse;
use super::Pass;
use std::fmt;
use std::str::FromStr;

/// What the output is for: chooses rule emissions, never the matching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// ONNX Runtime: com.microsoft fused ops.
    Ort,
    /// Standard ONNX only, at the model's opset.
    Portable,
    /// Standard ops TensorRT parses, in the shapes its own fusions recognise.
    TensorRt,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Ort => "ort",
            Target::Portable => "portable",
            Target::TensorRt => "tensorrt",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Target, String> {
        match s {
            "ort" => Ok(Target::Ort),
            "portable" => Ok(Target::Portable),
            "tensorrt" => Ok(Target::TensorRt),
            other => Err(format!("unknown target '{other}' (ort, portable, tensorrt)")),
        }
    }
}

/// Options that shape the pipeline.
#[derive(Clone, Debug, Default)]
pub struct PipelineOptions {
    /// Run only these passes (by name), when given.
    pub only: Option<Vec<String>>,
    pub skip: Vec<String>,
    pub trace_rule: Option<String>,
}

/// The passes for `target`, in order.
pub fn optimization_passes(target: Target, options: &PipelineOptions) -> Vec<Box<dyn Pass>> {
    let all: Vec<Box<dyn Pass>> = vec![Box::new(Fuse::new(target.name(), options.trace_rule.clone()))];
    all.into_iter()
        .filter(|p| options.only.as_ref().is_none_or(|only| only.iter().any(|n| n == p.name())))
        .filter(|p| !options.skip.iter().any(|n| n == p.name()))
        .collect()
}

/// Every pass name, for `--passes` / `--skip` validation and `onnxopt rules`.
pub fn pass_names() -> Vec<&'static str> {
    optimization_passes(Target::Ort, &PipelineOptions::default()).iter().map(|p| p.name()).collect()
}
