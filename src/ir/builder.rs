//! A compact way to build graphs by hand, for tests and examples.
//!
//! ```
//! use onnxopt::ir::{DataType, GraphBuilder};
//! let mut b = GraphBuilder::new("g");
//! let x = b.input("x", DataType::Float, &[2, 3]);
//! let w = b.initializer_f32("w", &[3, 4], &[0.5; 12]);
//! let y = b.node("MatMul", &[&x, &w]);
//! b.output(&y, DataType::Float, &[2, 4]);
//! let model = b.into_model(17);
//! assert_eq!(model.graph.node_count(), 1);
//! ```

use super::{AttrValue, DataType, Dim, Graph, Model, Node, Tensor, ValueInfo};
use ndarray::{ArrayD, IxDyn};

pub struct GraphBuilder {
    graph: Graph,
    next_id: usize,
}

/// Dims as given: non-negative numbers are fixed, `-1` is a symbol named `d<index>`.
fn dims_of(shape: &[i64]) -> Vec<Dim> {
    shape.iter().enumerate().map(|(i, &d)| if d >= 0 { Dim::Fixed(d) } else { Dim::Symbol(format!("d{i}")) }).collect()
}

impl GraphBuilder {
    pub fn new(name: &str) -> GraphBuilder {
        GraphBuilder { graph: Graph::new(name), next_id: 0 }
    }

    /// A graph input; a `-1` dim becomes symbolic.
    pub fn input(&mut self, name: &str, dtype: DataType, shape: &[i64]) -> String {
        self.graph.inputs.push(ValueInfo::tensor(name, dtype, dims_of(shape)));
        name.to_string()
    }

    pub fn input_symbolic(&mut self, name: &str, dtype: DataType, dims: Vec<Dim>) -> String {
        self.graph.inputs.push(ValueInfo::tensor(name, dtype, dims));
        name.to_string()
    }

    pub fn initializer(&mut self, tensor: Tensor) -> String {
        let name = tensor.name.clone();
        self.graph.initializers.push(tensor);
        name
    }

    pub fn initializer_f32(&mut self, name: &str, shape: &[usize], values: &[f32]) -> String {
        let array = ArrayD::from_shape_vec(IxDyn(shape), values.to_vec()).expect("values fill the shape");
        self.initializer(Tensor::from_f32(name, &array))
    }

    pub fn initializer_i64(&mut self, name: &str, shape: &[i64], values: &[i64]) -> String {
        self.initializer(Tensor::from_i64(name, shape.to_vec(), values))
    }

    /// A one-output node of the default domain; returns its output's name.
    pub fn node(&mut self, op_type: &str, inputs: &[&str]) -> String {
        self.node_with(op_type, inputs, Vec::new())
    }

    pub fn node_with(&mut self, op_type: &str, inputs: &[&str], attrs: Vec<(&str, AttrValue)>) -> String {
        self.next_id += 1;
        let out = format!("{}_{}", op_type.to_lowercase(), self.next_id);
        let mut node = Node::new(op_type, inputs, &[&out]).with_name(format!("n{}", self.next_id));
        for (k, v) in attrs {
            node = node.with_attr(k, v);
        }
        self.graph.add_node(node);
        out
    }

    /// Adds a fully specified node (several outputs, another domain).
    pub fn add(&mut self, node: Node) {
        self.graph.add_node(node);
    }

    pub fn output(&mut self, name: &str, dtype: DataType, shape: &[i64]) {
        self.graph.outputs.push(ValueInfo::tensor(name, dtype, dims_of(shape)));
    }

    pub fn into_graph(self) -> Graph {
        self.graph
    }

    pub fn into_model(self, opset: i64) -> Model {
        Model::new(self.graph, opset)
    }
}
