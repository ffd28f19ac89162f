//! What a model holds: versions, interface, op histogram, parameters, and the
//! transformer architecture it appears to be (best effort, from the graph alone).

use crate::ir::{infer_types, DataType, Graph, Model, Node};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Serialize)]
pub struct ValueSummary {
    pub name: String,
    /// e.g. `int64[batch,sequence]`
    pub r#type: String,
}

#[derive(Debug, Serialize, Default)]
pub struct Architecture {
    /// `encoder`, `decoder`, `encoder-decoder`, `vision-encoder` or `unknown`.
    pub kind: String,
    pub layers: Option<usize>,
    pub hidden_size: Option<i64>,
    pub heads: Option<i64>,
    pub vocabulary: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct ModelSummary {
    pub ir_version: i64,
    pub opsets: BTreeMap<String, i64>,
    pub producer: String,
    pub inputs: Vec<ValueSummary>,
    pub outputs: Vec<ValueSummary>,
    pub nodes: usize,
    /// domain -> op type -> count (`ai.onnx` for the default domain).
    pub ops: BTreeMap<String, BTreeMap<String, usize>>,
    pub parameters: u64,
    /// dtype -> bytes of initializer data.
    pub bytes_by_dtype: BTreeMap<String, u64>,
    pub externally_stored_tensors: usize,
    pub functions: Vec<String>,
    pub architecture: Architecture,
}

fn domain_name(domain: &str) -> String {
    if domain.is_empty() {
        "ai.onnx".into()
    } else {
        domain.into()
    }
}

fn visit_nodes<'g>(g: &'g Graph, visit: &mut impl FnMut(&'g Node)) {
    for node in g.nodes() {
        visit(node);
        for a in &node.attributes {
            for sub in a.value.subgraphs() {
                visit_nodes(sub, visit);
            }
        }
    }
}

pub fn summarize(model: &Model) -> ModelSummary {
    let g = &model.graph;
    let mut ops: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut nodes = 0;
    visit_nodes(g, &mut |n| {
        nodes += 1;
        *ops.entry(domain_name(&n.domain)).or_default().entry(n.op_type.clone()).or_default() += 1;
    });
    let mut parameters = 0;
    let mut bytes_by_dtype: BTreeMap<String, u64> = BTreeMap::new();
    for t in &g.initializers {
        *bytes_by_dtype.entry(t.dtype.to_string()).or_default() += t.byte_len();
        if t.dtype.is_float() || matches!(t.dtype, DataType::Int8 | DataType::Uint8 | DataType::Int4 | DataType::Uint4) {
            parameters += t.element_count();
        }
    }
    let values = |v: &[crate::ir::ValueInfo]| {
        v.iter().map(|i| ValueSummary { name: i.name.clone(), r#type: i.ty.as_ref().map(|t| t.to_string()).unwrap_or_else(|| "?".into()) }).collect()
    };
    ModelSummary {
        ir_version: model.ir_version,
        opsets: model.opset_imports.iter().map(|o| (domain_name(&o.domain), o.version)).collect(),
        producer: format!("{} {}", model.producer_name, model.producer_version).trim().to_string(),
        inputs: values(&g.inputs),
        outputs: values(&g.outputs),
        nodes,
        ops,
        parameters,
        bytes_by_dtype,
        externally_stored_tensors: g.initializers.iter().filter(|t| t.stored_externally).count(),
        functions: model.functions.iter().map(|f| format!("{}.{}", domain_name(&f.domain), f.name)).collect(),
        architecture: architecture(model),
    }
}

fn architecture(model: &Model) -> Architecture {
    let g = &model.graph;
    let count = |op: &str| g.nodes().filter(|n| n.op_type == op).count();
    let has_input = |needle: &str| g.inputs.iter().any(|i| i.name.contains(needle));
    // Embedding table: a Gather on an initializer indexed by input_ids.
    // Embedding table: a Gather on an initializer indexed by input_ids, directly
    // or through a Reshape/Cast/Unsqueeze (GPT-2 flattens the ids first).
    let embedding = g.nodes().filter(|n| n.op_type == "Gather").find_map(|n| {
        let table = g.initializer(n.inputs.first()?)?;
        (table.dims.len() == 2 && derives_from(g, n.inputs.get(1)?, "input_ids", 3)).then_some(table)
    });
    let vocabulary = embedding.and_then(|t| t.dims.first().copied());
    let mut hidden_size = embedding.and_then(|t| t.dims.get(1).copied());
    // Vision models: hidden size from the patch-embedding Conv's output channels.
    if hidden_size.is_none() {
        hidden_size = g.nodes().find(|n| n.op_type == "Conv").and_then(|n| g.initializer(n.inputs.get(1)?)?.dims.first().copied());
    }
    // Heads: a Reshape to [.., .., heads, head_dim] with heads * head_dim = hidden,
    // its target shape resolved by shape inference (exports compute it from Shape ops).
    let types = infer_types(model);
    let heads = hidden_size.and_then(|h| {
        g.nodes().filter(|n| n.op_type == "Reshape").find_map(|n| {
            let dims = types.shape(n.outputs.first()?)?;
            match dims {
                [_, _, heads, head_dim] => {
                    let (heads, head_dim) = (heads.fixed()?, head_dim.fixed()?);
                    (heads > 0 && heads * head_dim == h).then_some(heads)
                }
                _ => None,
            }
        })
    });
    let softmax = count("Softmax");
    let normalizations = count("LayerNormalization")
        + count("SkipLayerNormalization")
        + count("SimplifiedLayerNormalization")
        + count("SkipSimplifiedLayerNormalization")
        + count("RMSNormalization");
    // A causal mask compares two position ranges (i <= j), or is a Trilu.
    let causal = count("Trilu") > 0 || g.nodes().any(|n| g.is_causal_comparison(n));
    let kind = if has_input("decoder_input_ids") {
        "encoder-decoder"
    } else if has_input("pixel_values") {
        "vision-encoder"
    } else if causal {
        "decoder"
    } else if softmax > 0 || count("Attention") + count("MultiHeadAttention") > 0 {
        "encoder"
    } else {
        "unknown"
    };
    let fused_attention = count("Attention") + count("MultiHeadAttention") + count("GroupQueryAttention");
    let layers = match (fused_attention, softmax, normalizations) {
        (n, _, _) if n > 0 => Some(n),
        (0, s, _) if s > 0 && kind != "encoder-decoder" => Some(s),
        _ => None,
    };
    Architecture { kind: kind.into(), layers, hidden_size, heads, vocabulary }
}

/// `tensor` is `source`, or computed from it through at most `hops` one-input
/// reshaping ops.
fn derives_from(g: &Graph, tensor: &str, source: &str, hops: usize) -> bool {
    if tensor == source {
        return true;
    }
    let Some(node) = g.producer(tensor).and_then(|(id, _)| g.node(id)) else { return false };
    hops > 0
        && matches!(node.op_type.as_str(), "Reshape" | "Cast" | "Unsqueeze" | "Flatten" | "Squeeze")
        && node.inputs.first().is_some_and(|i| derives_from(g, i, source, hops - 1))
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

impl fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opsets: Vec<String> = self.opsets.iter().map(|(d, v)| format!("{d} {v}")).collect();
        writeln!(f, "IR version {}, opsets: {}", self.ir_version, opsets.join(", "))?;
        writeln!(f, "producer:   {}", if self.producer.is_empty() { "-" } else { &self.producer })?;
        for (label, values) in [("inputs:", &self.inputs), ("outputs:", &self.outputs)] {
            writeln!(f, "{label}")?;
            for v in values {
                writeln!(f, "  {} {}", v.name, v.r#type)?;
            }
        }
        let a = &self.architecture;
        let opt = |v: Option<i64>| v.map(|x| x.to_string()).unwrap_or_else(|| "?".into());
        writeln!(
            f,
            "architecture: {}, layers {}, hidden {}, heads {}, vocabulary {}",
            a.kind,
            opt(a.layers.map(|l| l as i64)),
            opt(a.hidden_size),
            opt(a.heads),
            opt(a.vocabulary)
        )?;
        let total: u64 = self.bytes_by_dtype.values().sum();
        writeln!(f, "parameters: {} ({} of initializers)", self.parameters, human_bytes(total))?;
        for (dtype, bytes) in &self.bytes_by_dtype {
            writeln!(f, "  {dtype:<10} {}", human_bytes(*bytes))?;
        }
        if self.externally_stored_tensors > 0 {
            writeln!(f, "tensors in external data: {}", self.externally_stored_tensors)?;
        }
        if !self.functions.is_empty() {
            writeln!(f, "model-local functions: {}", self.functions.join(", "))?;
        }
        writeln!(f, "nodes: {}", self.nodes)?;
        for (domain, ops) in &self.ops {
            let mut ops: Vec<(&String, &usize)> = ops.iter().collect();
            ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let items: Vec<String> = ops.iter().map(|(op, n)| format!("{op} {n}")).collect();
            writeln!(f, "  {domain}: {}", items.join(", "))?;
        }
        Ok(())
    }
}
