//! Constant tensors: initializers, `Constant` values and tensor attributes.

use super::{DataType, Extras};
use bytes::Bytes;
use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};

/// Where a tensor's values are.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// Little-endian bytes packed as onnx IR.md prescribes (`raw_data`, or external
    /// data read in). Usually a slice of the memory-mapped input file: no copy.
    Raw(Bytes),
    /// Values in the typed repeated field the producer used; kept as written so that
    /// the round trip is exact.
    Typed(TypedValues),
    /// No values recorded (an empty tensor, or one whose data lives elsewhere).
    Empty,
}

/// The typed `TensorProto` fields.
#[derive(Clone, Debug, PartialEq)]
pub enum TypedValues {
    Floats(Vec<f32>),
    Int32s(Vec<i32>),
    Strings(Vec<Bytes>),
    Int64s(Vec<i64>),
    Doubles(Vec<f64>),
    Uint64s(Vec<u64>),
}

impl TypedValues {
    pub fn len(&self) -> usize {
        match self {
            TypedValues::Floats(v) => v.len(),
            TypedValues::Int32s(v) => v.len(),
            TypedValues::Strings(v) => v.len(),
            TypedValues::Int64s(v) => v.len(),
            TypedValues::Doubles(v) => v.len(),
            TypedValues::Uint64s(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A constant tensor. `dims` are checked non-negative, with a product that fits,
/// and the data length agrees with them, when a model is loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DataType,
    pub dims: Vec<i64>,
    pub data: TensorData,
    /// The input stored these values in an external file: saving keeps them external
    /// unless told to inline.
    pub stored_externally: bool,
    pub extras: Extras,
}

/// Why a tensor's values could not be read as the numbers asked for.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorValueError {
    #[error("tensor '{name}' holds {dtype}, not a type convertible to {wanted}")]
    UnsupportedType { name: String, dtype: DataType, wanted: &'static str },
    #[error("tensor '{name}' has {found} values for shape {dims:?}")]
    LengthMismatch { name: String, found: usize, dims: Vec<i64> },
}

impl Tensor {
    /// A tensor that owns its little-endian bytes.
    pub fn from_raw(name: impl Into<String>, dtype: DataType, dims: Vec<i64>, raw: Bytes) -> Tensor {
        Tensor { name: name.into(), dtype, dims, data: TensorData::Raw(raw), stored_externally: false, extras: Extras::default() }
    }

    pub fn from_f32(name: impl Into<String>, values: &ArrayD<f32>) -> Tensor {
        let raw = match values.as_slice() {
            Some(contiguous) => f32s_to_le_bytes(contiguous),
            None => f32s_to_le_bytes(&values.iter().copied().collect::<Vec<f32>>()),
        };
        Tensor::from_raw(name, DataType::Float, dims_of(values.shape()), Bytes::from(raw))
    }

    pub fn from_i64(name: impl Into<String>, dims: Vec<i64>, values: &[i64]) -> Tensor {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_raw(name, DataType::Int64, dims, Bytes::from(raw))
    }

    /// Number of elements (1 for a scalar). Dims were checked at load; a tensor built
    /// in memory with a negative dim counts as empty.
    pub fn element_count(&self) -> u64 {
        self.dims.iter().map(|&d| u64::try_from(d).unwrap_or(0)).product()
    }

    /// Bytes the values occupy in memory or on disk (raw or typed).
    pub fn byte_len(&self) -> u64 {
        match &self.data {
            TensorData::Raw(b) => b.len() as u64,
            TensorData::Typed(TypedValues::Strings(v)) => v.iter().map(|s| s.len() as u64).sum(),
            TensorData::Typed(_) => self.dtype.raw_byte_len(self.element_count()).unwrap_or(0),
            TensorData::Empty => 0,
        }
    }

    fn shape(&self) -> IxDyn {
        IxDyn(&self.dims.iter().map(|&d| usize::try_from(d).unwrap_or(0)).collect::<Vec<_>>())
    }

    fn to_array<T>(&self, values: Vec<T>) -> Result<ArrayD<T>, TensorValueError> {
        let found = values.len();
        ArrayD::from_shape_vec(self.shape(), values).map_err(|_| TensorValueError::LengthMismatch { name: self.name.clone(), found, dims: self.dims.clone() })
    }

    fn unsupported(&self, wanted: &'static str) -> TensorValueError {
        TensorValueError::UnsupportedType { name: self.name.clone(), dtype: self.dtype, wanted }
    }

    /// The values as f32, from any float type (f64 narrowed) or integer type.
    pub fn to_f32(&self) -> Result<ArrayD<f32>, TensorValueError> {
        use DataType::*;
        let values: Vec<f32> = match (&self.data, self.dtype) {
            (TensorData::Raw(b), Float) => le_bytes_to_f32s(b),
            (TensorData::Raw(b), Double) => le_chunks::<8>(b).map(|c| f64::from_le_bytes(c) as f32).collect(),
            (TensorData::Raw(b), Float16) => le_chunks::<2>(b).map(|c| f16::from_le_bytes(c).to_f32()).collect(),
            (TensorData::Raw(b), Bfloat16) => le_chunks::<2>(b).map(|c| bf16::from_le_bytes(c).to_f32()).collect(),
            (TensorData::Typed(TypedValues::Floats(v)), Float) => v.clone(),
            (TensorData::Typed(TypedValues::Doubles(v)), Double) => v.iter().map(|&x| x as f32).collect(),
            // float16 and bfloat16 values sit in int32_data as their bit patterns
            (TensorData::Typed(TypedValues::Int32s(v)), Float16) => v.iter().map(|&x| f16::from_bits(x as u16).to_f32()).collect(),
            (TensorData::Typed(TypedValues::Int32s(v)), Bfloat16) => v.iter().map(|&x| bf16::from_bits(x as u16).to_f32()).collect(),
            (TensorData::Empty, _) if self.element_count() == 0 => Vec::new(),
            _ if self.dtype.is_integer() || self.dtype == Bool => {
                return self.to_i64().map(|a| a.mapv(|x| x as f32));
            }
            _ => return Err(self.unsupported("f32")),
        };
        self.to_array(values)
    }

    /// The values as i64, from any integer type or bool (sub-byte types excluded).
    pub fn to_i64(&self) -> Result<ArrayD<i64>, TensorValueError> {
        use DataType::*;
        let values: Vec<i64> = match (&self.data, self.dtype) {
            (TensorData::Raw(b), Int64) => le_chunks::<8>(b).map(i64::from_le_bytes).collect(),
            (TensorData::Raw(b), Int32) => le_chunks::<4>(b).map(|c| i32::from_le_bytes(c) as i64).collect(),
            (TensorData::Raw(b), Uint32) => le_chunks::<4>(b).map(|c| u32::from_le_bytes(c) as i64).collect(),
            (TensorData::Raw(b), Int16) => le_chunks::<2>(b).map(|c| i16::from_le_bytes(c) as i64).collect(),
            (TensorData::Raw(b), Uint16) => le_chunks::<2>(b).map(|c| u16::from_le_bytes(c) as i64).collect(),
            (TensorData::Raw(b), Int8) => b.iter().map(|&x| x as i8 as i64).collect(),
            (TensorData::Raw(b), Uint8 | Bool) => b.iter().map(|&x| x as i64).collect(),
            (TensorData::Raw(b), Uint64) => le_chunks::<8>(b).map(|c| u64::from_le_bytes(c) as i64).collect(),
            (TensorData::Typed(TypedValues::Int64s(v)), Int64) => v.clone(),
            (TensorData::Typed(TypedValues::Int32s(v)), Int32 | Int16 | Int8 | Uint16 | Uint8 | Bool) => v.iter().map(|&x| x as i64).collect(),
            (TensorData::Typed(TypedValues::Uint64s(v)), Uint32 | Uint64) => v.iter().map(|&x| x as i64).collect(),
            (TensorData::Empty, _) if self.element_count() == 0 => Vec::new(),
            _ => return Err(self.unsupported("i64")),
        };
        self.to_array(values)
    }
}

/// f32 values as little-endian bytes (one copy on little-endian machines).
pub fn f32s_to_le_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for chunk in values.chunks(4096) {
        for v in chunk {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Little-endian bytes as f32 values (lengths were checked at load; a partial
/// trailing chunk is ignored).
pub fn le_bytes_to_f32s(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(bytes.len() / 4);
    out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
    out
}

fn dims_of(shape: &[usize]) -> Vec<i64> {
    shape.iter().map(|&d| d as i64).collect()
}

/// Fixed-size little-endian chunks of a byte buffer (a trailing partial chunk is
/// ignored; lengths were checked at load).
fn le_chunks<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip_through_raw_bytes() {
        let a = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1.0f32, -2.5, 3.0, 0.0]).unwrap();
        let t = Tensor::from_f32("w", &a);
        assert_eq!(t.dims, vec![2, 2]);
        assert_eq!(t.byte_len(), 16);
        assert_eq!(t.to_f32().unwrap(), a);
    }

    #[test]
    fn integers_widen_to_i64_and_f32() {
        let t = Tensor::from_raw("i", DataType::Int8, vec![3], Bytes::from_static(&[0xff, 1, 2]));
        assert_eq!(t.to_i64().unwrap().into_raw_vec_and_offset().0, vec![-1, 1, 2]);
        assert_eq!(t.to_f32().unwrap().into_raw_vec_and_offset().0, vec![-1.0, 1.0, 2.0]);
    }

    #[test]
    fn strings_are_not_numbers() {
        let t = Tensor {
            name: "s".into(),
            dtype: DataType::String,
            dims: vec![1],
            data: TensorData::Typed(TypedValues::Strings(vec![Bytes::from_static(b"x")])),
            stored_externally: false,
            extras: Extras::default(),
        };
        assert!(matches!(t.to_f32(), Err(TensorValueError::UnsupportedType { .. })));
    }
}
