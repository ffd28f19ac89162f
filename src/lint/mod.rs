//! Lints: checks of a model against a runtime's documented rules, reporting
//! every violation with the node and the rule (and where the rule is written).
//!
//! - [`tensorrt`]: Q/DQ placement and types for TensorRT's explicit quantization.

pub mod tensorrt;

use serde::Serialize;

/// One broken rule at one node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Violation {
    /// The node's name (its first output when it has none).
    pub node: String,
    /// The rule's id (`zero-point-zero`).
    pub rule: &'static str,
    pub message: String,
    /// Where the rule comes from.
    pub citation: &'static str,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: [{}] {} ({})", self.node, self.rule, self.message, self.citation)
    }
}
