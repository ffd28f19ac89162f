//! Node attributes.

use super::{Extras, Graph, Opaque, Tensor, ValueType};
use bytes::Bytes;

/// An attribute's value. Subgraphs (If/Loop/Scan bodies) are IR graphs of their own.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Float(f32),
    Int(i64),
    String(Bytes),
    Tensor(Tensor),
    Graph(Box<Graph>),
    SparseTensor(Opaque),
    Type(ValueType),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Strings(Vec<Bytes>),
    Tensors(Vec<Tensor>),
    Graphs(Vec<Graph>),
    SparseTensors(Vec<Opaque>),
    Types(Vec<ValueType>),
    /// An attribute the IR keeps as written without reading its value: a reference
    /// to a function's attribute (`ref_attr_name`), or one whose type and value
    /// fields disagree.
    Uninterpreted,
}

impl AttrValue {
    /// Short kind name, as in onnx's `AttributeType` (lower case).
    pub fn kind(&self) -> &'static str {
        match self {
            AttrValue::Float(_) => "float",
            AttrValue::Int(_) => "int",
            AttrValue::String(_) => "string",
            AttrValue::Tensor(_) => "tensor",
            AttrValue::Graph(_) => "graph",
            AttrValue::SparseTensor(_) => "sparse_tensor",
            AttrValue::Type(_) => "type_proto",
            AttrValue::Floats(_) => "floats",
            AttrValue::Ints(_) => "ints",
            AttrValue::Strings(_) => "strings",
            AttrValue::Tensors(_) => "tensors",
            AttrValue::Graphs(_) => "graphs",
            AttrValue::SparseTensors(_) => "sparse_tensors",
            AttrValue::Types(_) => "type_protos",
            AttrValue::Uninterpreted => "uninterpreted",
        }
    }

    /// The subgraphs this value holds.
    pub fn subgraphs(&self) -> &[Graph] {
        match self {
            AttrValue::Graph(g) => std::slice::from_ref(g.as_ref()),
            AttrValue::Graphs(gs) => gs,
            _ => &[],
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Attribute {
    pub name: String,
    pub value: AttrValue,
    pub extras: Extras,
}

impl Attribute {
    pub fn new(name: impl Into<String>, value: AttrValue) -> Attribute {
        Attribute { name: name.into(), value, extras: Extras::default() }
    }
}
