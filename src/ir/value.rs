//! Typed values flowing along edges: `ValueInfo` and its tensor type and shape.

use super::{DataType, Extras, Opaque};
use std::fmt;

/// One dimension of a tensor shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(i64),
    /// A named symbolic size (`dim_param`), e.g. `batch` or `s10`.
    Symbol(String),
    /// Neither value nor name recorded.
    Unknown,
}

impl Dim {
    pub fn fixed(&self) -> Option<i64> {
        match self {
            Dim::Fixed(v) => Some(*v),
            _ => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Symbol(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// A tensor's element type and shape, each possibly unknown.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorType {
    pub elem_type: Option<DataType>,
    /// `None`: rank unknown. `Some(dims)`: rank known, dims possibly symbolic.
    pub shape: Option<Vec<Dim>>,
}

impl TensorType {
    pub fn new(elem_type: DataType, shape: Vec<Dim>) -> TensorType {
        TensorType { elem_type: Some(elem_type), shape: Some(shape) }
    }

    pub fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(Vec::len)
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.elem_type {
            Some(t) => write!(f, "{t}")?,
            None => f.write_str("?")?,
        }
        match &self.shape {
            Some(dims) => {
                f.write_str("[")?;
                for (i, d) in dims.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{d}")?;
                }
                f.write_str("]")
            }
            None => f.write_str("[..]"),
        }
    }
}

/// The type of a value. Tensor types are interpreted; sequences, maps, optionals,
/// sparse tensors and anything carrying denotations are kept as written.
#[derive(Clone, Debug, PartialEq)]
pub enum ValueType {
    Tensor(TensorType),
    Other(Opaque),
}

impl ValueType {
    pub fn as_tensor(&self) -> Option<&TensorType> {
        match self {
            ValueType::Tensor(t) => Some(t),
            ValueType::Other(_) => None,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueType::Tensor(t) => write!(f, "{t}"),
            ValueType::Other(_) => f.write_str("<non-tensor>"),
        }
    }
}

/// A named value with its type, as in a graph's inputs, outputs and `value_info`.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub ty: Option<ValueType>,
    pub extras: Extras,
}

impl ValueInfo {
    pub fn tensor(name: impl Into<String>, elem_type: DataType, shape: Vec<Dim>) -> ValueInfo {
        ValueInfo { name: name.into(), ty: Some(ValueType::Tensor(TensorType::new(elem_type, shape))), extras: Extras::default() }
    }

    pub fn tensor_type(&self) -> Option<&TensorType> {
        self.ty.as_ref().and_then(ValueType::as_tensor)
    }
}
