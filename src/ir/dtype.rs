//! Element types of ONNX tensors (`TensorProto.DataType`), with the facts the
//! loader and the passes need: storage width, and which typed field of a
//! `TensorProto` holds values when `raw_data` is absent.

use std::fmt;

/// An ONNX element type. The discriminants are the `TensorProto.DataType` codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(i32)]
pub enum DataType {
    Undefined = 0,
    Float = 1,
    Uint8 = 2,
    Int8 = 3,
    Uint16 = 4,
    Int16 = 5,
    Int32 = 6,
    Int64 = 7,
    String = 8,
    Bool = 9,
    Float16 = 10,
    Double = 11,
    Uint32 = 12,
    Uint64 = 13,
    Complex64 = 14,
    Complex128 = 15,
    Bfloat16 = 16,
    Float8E4M3Fn = 17,
    Float8E4M3Fnuz = 18,
    Float8E5M2 = 19,
    Float8E5M2Fnuz = 20,
    Uint4 = 21,
    Int4 = 22,
    Float4E2M1 = 23,
    Float8E8M0 = 24,
    Uint2 = 25,
    Int2 = 26,
    Float6E2M3 = 27,
    Float6E3M2 = 28,
}

/// The typed `TensorProto` field that carries a type's values when `raw_data` is not used
/// (onnx.proto, comments on `float_data` .. `uint64_data`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TypedField {
    FloatData,
    Int32Data,
    StringData,
    Int64Data,
    DoubleData,
    Uint64Data,
}

impl DataType {
    const ALL: [DataType; 29] = [
        DataType::Undefined,
        DataType::Float,
        DataType::Uint8,
        DataType::Int8,
        DataType::Uint16,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::String,
        DataType::Bool,
        DataType::Float16,
        DataType::Double,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Complex64,
        DataType::Complex128,
        DataType::Bfloat16,
        DataType::Float8E4M3Fn,
        DataType::Float8E4M3Fnuz,
        DataType::Float8E5M2,
        DataType::Float8E5M2Fnuz,
        DataType::Uint4,
        DataType::Int4,
        DataType::Float4E2M1,
        DataType::Float8E8M0,
        DataType::Uint2,
        DataType::Int2,
        DataType::Float6E2M3,
        DataType::Float6E3M2,
    ];

    /// The type with this `TensorProto.DataType` code, if onnx 1.23 defines one.
    pub fn from_code(code: i32) -> Option<DataType> {
        usize::try_from(code).ok().and_then(|i| Self::ALL.get(i)).copied()
    }

    pub fn code(self) -> i32 {
        self as i32
    }

    /// Bits one element occupies in `raw_data`; `None` for strings (variable length)
    /// and `Undefined`. Sub-byte types pack from the low bits up (onnx IR.md).
    pub fn bit_width(self) -> Option<u64> {
        use DataType::*;
        Some(match self {
            Undefined | String => return None,
            Int2 | Uint2 => 2,
            Int4 | Uint4 | Float4E2M1 => 4,
            Float6E2M3 | Float6E3M2 => 6,
            Uint8 | Int8 | Bool | Float8E4M3Fn | Float8E4M3Fnuz | Float8E5M2 | Float8E5M2Fnuz | Float8E8M0 => 8,
            Uint16 | Int16 | Float16 | Bfloat16 => 16,
            Float | Int32 | Uint32 => 32,
            Int64 | Double | Uint64 | Complex64 => 64,
            Complex128 => 128,
        })
    }

    /// Bytes `element_count` elements occupy in `raw_data`, or `None` on overflow
    /// or for types without a fixed width.
    pub fn raw_byte_len(self, element_count: u64) -> Option<u64> {
        let bits = element_count.checked_mul(self.bit_width()?)?;
        Some(bits.div_ceil(8))
    }

    /// Values per element in the typed field (complex numbers take two).
    pub fn typed_values_per_element(self) -> u64 {
        match self {
            DataType::Complex64 | DataType::Complex128 => 2,
            _ => 1,
        }
    }

    /// The typed field holding this type's values (onnx.proto TensorProto comments).
    pub fn typed_field(self) -> Option<TypedField> {
        use DataType::*;
        Some(match self {
            Undefined => return None,
            Float | Complex64 => TypedField::FloatData,
            String => TypedField::StringData,
            Int64 => TypedField::Int64Data,
            Double | Complex128 => TypedField::DoubleData,
            Uint32 | Uint64 => TypedField::Uint64Data,
            _ => TypedField::Int32Data,
        })
    }

    pub fn is_float(self) -> bool {
        use DataType::*;
        matches!(
            self,
            Float
                | Float16
                | Double
                | Bfloat16
                | Float8E4M3Fn
                | Float8E4M3Fnuz
                | Float8E5M2
                | Float8E5M2Fnuz
                | Float4E2M1
                | Float8E8M0
                | Float6E2M3
                | Float6E3M2
        )
    }

    pub fn is_integer(self) -> bool {
        use DataType::*;
        matches!(self, Uint8 | Int8 | Uint16 | Int16 | Int32 | Int64 | Uint32 | Uint64 | Uint4 | Int4 | Uint2 | Int2)
    }

    /// The name onnx uses (`TensorProto.DataType` enum value, lower case).
    pub fn name(self) -> &'static str {
        use DataType::*;
        match self {
            Undefined => "undefined",
            Float => "float32",
            Uint8 => "uint8",
            Int8 => "int8",
            Uint16 => "uint16",
            Int16 => "int16",
            Int32 => "int32",
            Int64 => "int64",
            String => "string",
            Bool => "bool",
            Float16 => "float16",
            Double => "float64",
            Uint32 => "uint32",
            Uint64 => "uint64",
            Complex64 => "complex64",
            Complex128 => "complex128",
            Bfloat16 => "bfloat16",
            Float8E4M3Fn => "float8e4m3fn",
            Float8E4M3Fnuz => "float8e4m3fnuz",
            Float8E5M2 => "float8e5m2",
            Float8E5M2Fnuz => "float8e5m2fnuz",
            Uint4 => "uint4",
            Int4 => "int4",
            Float4E2M1 => "float4e2m1",
            Float8E8M0 => "float8e8m0",
            Uint2 => "uint2",
            Int2 => "int2",
            Float6E2M3 => "float6e2m3",
            Float6E3M2 => "float6e3m2",
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in 0..29 {
            assert_eq!(DataType::from_code(code).map(DataType::code), Some(code));
        }
        assert_eq!(DataType::from_code(29), None);
        assert_eq!(DataType::from_code(-1), None);
    }

    #[test]
    fn sub_byte_types_round_up() {
        assert_eq!(DataType::Int4.raw_byte_len(3), Some(2));
        assert_eq!(DataType::Float.raw_byte_len(3), Some(12));
        assert_eq!(DataType::Float.raw_byte_len(u64::MAX), None);
        assert_eq!(DataType::String.raw_byte_len(1), None);
    }
}
