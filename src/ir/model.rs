//! The whole model: graph, opsets, producer, model-local functions.

use super::{Extras, Graph};
use bytes::Bytes;

#[derive(Clone, Debug, PartialEq)]
pub struct OpsetImport {
    /// `""` is the default ONNX domain.
    pub domain: String,
    pub version: i64,
    pub extras: Extras,
}

/// A model-local function (`FunctionProto`), kept as written; its name and domain
/// are read so that nodes calling it can be told apart from unknown ops.
#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    pub domain: String,
    pub name: String,
    pub(crate) encoded: Bytes,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub ir_version: i64,
    pub opset_imports: Vec<OpsetImport>,
    pub producer_name: String,
    pub producer_version: String,
    pub domain: String,
    pub model_version: i64,
    pub graph: Graph,
    pub functions: Vec<Function>,
    pub extras: Extras,
}

impl Model {
    /// A model around `graph` importing the default domain at `opset`.
    pub fn new(graph: Graph, opset: i64) -> Model {
        Model {
            ir_version: 10,
            opset_imports: vec![OpsetImport { domain: String::new(), version: opset, extras: Extras::default() }],
            producer_name: "onnxopt".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            domain: String::new(),
            model_version: 0,
            graph,
            functions: Vec::new(),
            extras: Extras::default(),
        }
    }

    /// The opset imported for `domain` (`""` or `ai.onnx` for the default domain).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        let is_default = |d: &str| d.is_empty() || d == "ai.onnx";
        self.opset_imports.iter().find(|o| o.domain == domain || (is_default(domain) && is_default(&o.domain))).map(|o| o.version)
    }
}
