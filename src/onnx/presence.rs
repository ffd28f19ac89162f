//! Field presence for the optional fields the IR models as plain values.
//!
//! proto2 tells a field set to its default apart from an absent one, and
//! `onnx.load(a) == onnx.load(b)` does too. The IR stores such fields as plain
//! values and sets a bit in [`Extras::present_defaults`] when one was present
//! although it held the default; saving writes a field when it is not the
//! default or its bit is set.

use crate::ir::Extras;
use bytes::Bytes;
use prost::Message;

// Bit numbers, per message.
pub const NAME: u32 = 0;
pub const NODE_OP_TYPE: u32 = 1;
pub const NODE_DOMAIN: u32 = 2;
/// Attribute: the `type` discriminator was absent (old exporters); it is inferred on load.
pub const ATTR_TYPE_ABSENT: u32 = 1;
pub const TENSOR_DATA_TYPE: u32 = 1;
pub const TENSOR_RAW_DATA: u32 = 2;
pub const TENSOR_DATA_LOCATION: u32 = 3;
pub const MODEL_IR_VERSION: u32 = 0;
pub const MODEL_PRODUCER_NAME: u32 = 1;
pub const MODEL_PRODUCER_VERSION: u32 = 2;
pub const MODEL_DOMAIN: u32 = 3;
pub const MODEL_VERSION: u32 = 4;
pub const OPSET_DOMAIN: u32 = 0;
pub const OPSET_VERSION: u32 = 1;

/// Takes an optional field's value, noting presence of a default value in `present`.
pub fn take<T: Default + PartialEq>(field: &mut Option<T>, bit: u32, present: &mut u32) -> T {
    match field.take() {
        Some(v) => {
            if v == T::default() {
                *present |= 1 << bit;
            }
            v
        }
        None => T::default(),
    }
}

/// The optional field to write for `value`.
pub fn put<T: Default + PartialEq>(value: T, bit: u32, extras: &Extras) -> Option<T> {
    if value != T::default() || extras.present_defaults & (1 << bit) != 0 {
        Some(value)
    } else {
        None
    }
}

/// The extras of a message whose modeled fields were taken out.
pub fn extras_of<M: Message>(rest: &M, present_defaults: u32) -> Extras {
    let unmodeled = if rest.encoded_len() == 0 { Bytes::new() } else { Bytes::from(rest.encode_to_vec()) };
    Extras { unmodeled, present_defaults }
}

/// The message to fill modeled fields into: the unmodeled ones as read.
pub fn rest_of<M: Message + Default>(extras: &Extras) -> M {
    // The bytes were encoded by `extras_of` from the same message type, so they decode.
    M::decode(extras.unmodeled.clone()).unwrap_or_default()
}
