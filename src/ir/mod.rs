//! The intermediate representation every pass works on.
//!
//! A [`Model`] holds a [`Graph`]: nodes in a petgraph `StableDiGraph` joined by
//! tensor edges, plus inputs, outputs, `value_info` and initializers. Weights are
//! [`Tensor`]s whose bytes are usually slices of the memory-mapped input file.
//! The IR knows nothing of files or protobuf: `crate::onnx` converts both ways.

mod attribute;
mod builder;
mod dtype;
mod extras;
mod graph;
mod model;
mod patch;
mod printer;
mod shape;
mod tensor;
mod validate;
mod value;

pub use attribute::{AttrValue, Attribute};
pub use builder::GraphBuilder;
pub use dtype::{DataType, TypedField};
pub use extras::{Extras, Opaque};
pub use graph::{CycleError, Graph, Node, NodeId, Slot, TensorEdge, Use};
pub use model::{Function, Model, OpsetImport};
pub use patch::{Patch, PatchError};
pub use shape::{infer_types, TypeMap, MAX_VALUE_ELEMENTS};
pub use tensor::{Tensor, TensorData, TensorValueError, TypedValues};
pub use validate::InvalidGraph;
pub use value::{Dim, TensorType, ValueInfo, ValueType};
