//! A deterministic text form of the IR, for snapshots and `inspect --graph`.
//!
//! ```text
//! graph main (x: float32[batch,4]) -> (y: float32[batch,4])
//!   init w: float32[4,4]
//!   y = MatMul(x, w)  # mm
//! ```
//! Nodes appear in topological order; attributes in the node's order; tensor
//! values are summarised by type and shape, never printed whole.

use super::{AttrValue, Graph, Model, Tensor, ValueInfo};
use std::fmt::{self, Write};

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opsets: Vec<String> =
            self.opset_imports.iter().map(|o| format!("{}={}", if o.domain.is_empty() { "ai.onnx" } else { &o.domain }, o.version)).collect();
        writeln!(f, "model ir={} opsets [{}]", self.ir_version, opsets.join(", "))?;
        write_graph(f, &self.graph, 0)
    }
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_graph(f, self, 0)
    }
}

fn value_list(values: &[ValueInfo]) -> String {
    let items: Vec<String> = values
        .iter()
        .map(|v| match &v.ty {
            Some(t) => format!("{}: {t}", v.name),
            None => v.name.clone(),
        })
        .collect();
    items.join(", ")
}

fn tensor_summary(t: &Tensor) -> String {
    let dims: Vec<String> = t.dims.iter().map(i64::to_string).collect();
    let mut s = format!("{}[{}]", t.dtype, dims.join(","));
    // Small constants print their values: they are what shape rules read.
    if t.element_count() <= 8 {
        if let Ok(v) = t.to_i64().map(|a| a.iter().map(i64::to_string).collect::<Vec<_>>()) {
            write!(s, " {{{}}}", v.join(",")).ok();
        } else if let Ok(v) = t.to_f32().map(|a| a.iter().map(|x| format!("{x}")).collect::<Vec<_>>()) {
            write!(s, " {{{}}}", v.join(",")).ok();
        }
    }
    s
}

fn attr_text(value: &AttrValue) -> String {
    let list = |items: Vec<String>| format!("[{}]", items.join(","));
    match value {
        AttrValue::Float(x) => format!("{x}"),
        AttrValue::Int(i) => i.to_string(),
        AttrValue::String(s) => format!("{:?}", String::from_utf8_lossy(s)),
        AttrValue::Tensor(t) => tensor_summary(t),
        AttrValue::Graph(g) => format!("<graph {}>", g.name),
        AttrValue::Floats(v) => list(v.iter().map(|x| format!("{x}")).collect()),
        AttrValue::Ints(v) => list(v.iter().map(i64::to_string).collect()),
        AttrValue::Strings(v) => list(v.iter().map(|s| format!("{:?}", String::from_utf8_lossy(s))).collect()),
        AttrValue::Tensors(v) => list(v.iter().map(tensor_summary).collect()),
        AttrValue::Graphs(v) => list(v.iter().map(|g| format!("<graph {}>", g.name)).collect()),
        AttrValue::Type(t) => format!("<type {t}>"),
        other => format!("<{}>", other.kind()),
    }
}

fn write_graph(f: &mut impl Write, g: &Graph, depth: usize) -> fmt::Result {
    let pad = "  ".repeat(depth);
    writeln!(f, "{pad}graph {} ({}) -> ({})", g.name, value_list(&g.inputs), value_list(&g.outputs))?;
    for t in &g.initializers {
        writeln!(f, "{pad}  init {}: {}", t.name, tensor_summary(t))?;
    }
    for node in g.nodes() {
        let attrs: Vec<String> = node.attributes.iter().map(|a| format!("{}={}", a.name, attr_text(&a.value))).collect();
        let attrs = if attrs.is_empty() { String::new() } else { format!(" {{{}}}", attrs.join(", ")) };
        let name = if node.name.is_empty() { String::new() } else { format!("  # {}", node.name) };
        writeln!(f, "{pad}  {} = {}({}){attrs}{name}", node.outputs.join(", "), node.qualified_op(), node.inputs.join(", "))?;
        for attr in &node.attributes {
            for sub in attr.value.subgraphs() {
                write_graph(f, sub, depth + 2)?;
            }
        }
    }
    Ok(())
}
