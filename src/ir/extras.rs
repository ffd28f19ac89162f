//! What the IR keeps of a message without interpreting it.

use bytes::Bytes;

/// Fields of an ONNX message that the IR does not interpret (doc strings,
/// metadata, device configurations, ...), kept verbatim so that a model written
/// back is equal field for field to the one read. Only `crate::onnx` looks inside.
///
/// proto2 keeps field presence: a field explicitly set to its default value is
/// not the same message as an absent one. The IR stores modeled optional fields
/// as plain values, so `present_defaults` remembers which of them were present
/// although they held the default (bit numbers are private to `crate::onnx`).
/// A value the IR creates has empty extras: defaults are then simply omitted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Extras {
    pub(crate) unmodeled: Bytes,
    pub(crate) present_defaults: u32,
}

impl Extras {
    pub fn is_empty(&self) -> bool {
        self.unmodeled.is_empty() && self.present_defaults == 0
    }
}

/// A protobuf message kept whole and uninterpreted (a non-tensor type, a sparse
/// tensor, a model-local function): its encoded bytes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Opaque(pub(crate) Bytes);
