//! What the two lowering passes (`lower_contrib`, `lower_standard`) share: the
//! reading of the node being replaced and the emitting of its replacement into
//! a patch. Each pass's builder keeps its own state (how it names and shares
//! constants) and implements the few required methods; the rest is here once.

use crate::ir::{AttrValue, DataType, Graph, Node, TypeMap};
use std::collections::HashMap;

/// A lowering's reason for refusing a node.
pub(super) type Refusal = String;

/// Builds the replacement of one node: fresh names under its first output
/// (`root`), nodes and constants into a patch.
pub(super) trait Emitter<'m> {
    fn node(&self) -> &'m Node;
    fn graph(&self) -> &'m Graph;
    fn types(&self) -> &'m TypeMap;
    fn root(&self) -> &str;
    /// How often each fresh-name stem was taken.
    fn taken(&mut self) -> &mut HashMap<String, usize>;
    /// A one-output node writing `output` when given (one of the replaced node's
    /// own outputs), else a fresh name; returns what it wrote.
    fn op_into(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, AttrValue)>, output: Option<&str>, what: &str) -> String;
    /// A constant initializer; returns its name.
    fn constant(&mut self, what: &str, dtype: DataType, dims: Vec<i64>, raw: Vec<u8>) -> String;

    // ---- reading the node ----

    /// Input `i`, when given.
    fn input(&self, i: usize) -> Option<&'m str> {
        self.node().inputs.get(i).map(String::as_str).filter(|s| !s.is_empty())
    }

    fn required(&self, i: usize, what: &str) -> Result<&'m str, Refusal> {
        self.input(i).ok_or_else(|| format!("input {i} ({what}) is missing"))
    }

    /// Output `i`, when something reads it or the graph returns it.
    fn used_output(&self, i: usize) -> Option<&'m str> {
        let name = self.node().outputs.get(i).map(String::as_str).filter(|s| !s.is_empty())?;
        let graph = self.graph();
        (!graph.uses(name).is_empty() || graph.is_graph_output(name)).then_some(name)
    }

    fn rank(&self, name: &str) -> Result<usize, Refusal> {
        self.types().rank(name).ok_or_else(|| format!("the rank of '{name}' is unknown"))
    }

    /// Dim `axis` (negative counts from the end) of `name`, when it is a known number.
    fn fixed_dim(&self, name: &str, axis: isize) -> Option<i64> {
        let dims = self.types().shape(name)?;
        let axis = if axis < 0 { dims.len().checked_sub(axis.unsigned_abs())? } else { axis as usize };
        dims.get(axis)?.fixed()
    }

    // ---- emitting ----

    /// A fresh tensor name `{root}/{what}` (numbered from the second use on).
    fn fresh(&mut self, what: &str) -> String {
        loop {
            let n = {
                let count = self.taken().entry(what.to_string()).or_insert(0);
                *count += 1;
                *count
            };
            let name = if n == 1 { format!("{}/{what}", self.root()) } else { format!("{}/{what}_{n}", self.root()) };
            // another pass may have named a tensor under the same root
            // (quantize-dynamic's `{x}/row_max` for the input x of a MatMul)
            let graph = self.graph();
            let taken = graph.producer(&name).is_some() || graph.initializer(&name).is_some() || graph.inputs.iter().any(|v| v.name == name);
            if !taken {
                return name;
            }
        }
    }

    /// A one-output node writing a fresh name; returns it.
    fn op(&mut self, op: &str, inputs: &[&str], what: &str) -> String {
        self.op_into(op, inputs, Vec::new(), None, what)
    }

    fn op_with(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, AttrValue)>, what: &str) -> String {
        self.op_into(op, inputs, attrs, None, what)
    }

    /// A 1-D int64 constant, named by its values (`{root}/int64:[0,0,2,-1]`).
    fn ints(&mut self, values: &[i64]) -> String {
        let text: Vec<String> = values.iter().map(i64::to_string).collect();
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.constant(&format!("int64:[{}]", text.join(",")), DataType::Int64, vec![values.len() as i64], raw)
    }

    fn unsqueeze(&mut self, x: &str, axes: &[i64], what: &str) -> String {
        let axes = self.ints(axes);
        self.op("Unsqueeze", &[x, &axes], what)
    }

    fn reshape(&mut self, x: &str, shape: &[i64], output: Option<&str>, what: &str) -> String {
        let shape = self.ints(shape);
        self.op_into("Reshape", &[x, &shape], Vec::new(), output, what)
    }

    fn transpose(&mut self, x: &str, perm: &[i64], output: Option<&str>, what: &str) -> String {
        self.op_into("Transpose", &[x], vec![("perm", AttrValue::Ints(perm.to_vec()))], output, what)
    }

    fn cast(&mut self, x: &str, to: DataType, what: &str) -> String {
        self.op_with("Cast", &[x], vec![("to", AttrValue::Int(to.code() as i64))], what)
    }
}
