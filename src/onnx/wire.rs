//! Locating a decoding fault in the protobuf wire format, so that an error can
//! say where a file breaks ("truncated at byte N") rather than only that it does.

/// Names of `ModelProto`'s fields, for messages about the top level.
fn model_field_name(number: u64) -> &'static str {
    match number {
        1 => "ir_version",
        2 => "producer_name",
        3 => "producer_version",
        4 => "domain",
        5 => "model_version",
        6 => "doc_string",
        7 => "graph",
        8 => "opset_import",
        14 => "metadata_props",
        20 => "training_info",
        25 => "functions",
        26 => "configuration",
        _ => "unknown field",
    }
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Walks the top-level fields of `buf` and describes the first one that is cut
/// short or malformed; falls back to the decoder's own words.
pub fn describe_fault(buf: &[u8], decoder_message: &str) -> String {
    let mut pos = 0usize;
    while pos < buf.len() {
        let start = pos;
        let Some(key) = read_varint(buf, &mut pos) else {
            return format!("truncated protobuf at byte {start}: a field key runs past the end of the file");
        };
        let (number, wire_type) = (key >> 3, key & 7);
        let name = model_field_name(number);
        let remaining = |pos: usize| buf.len().saturating_sub(pos);
        let fits = match wire_type {
            0 => read_varint(buf, &mut pos).is_some(),
            1 => {
                pos += 8;
                pos <= buf.len()
            }
            5 => {
                pos += 4;
                pos <= buf.len()
            }
            2 => {
                let Some(len) = read_varint(buf, &mut pos) else {
                    return format!("truncated protobuf at byte {start}: the length of field {number} ({name}) runs past the end");
                };
                if len > remaining(pos) as u64 {
                    return format!("truncated protobuf at byte {start}: field {number} ({name}) declares {len} bytes but only {} remain", remaining(pos));
                }
                pos += len as usize;
                true
            }
            _ => return format!("invalid protobuf at byte {start}: wire type {wire_type} is not valid ({decoder_message})"),
        };
        if !fits {
            return format!("truncated protobuf at byte {start}: field {number} ({name}) runs past the end of the file");
        }
        if number == 0 {
            return format!("invalid protobuf at byte {start}: field number 0 ({decoder_message})");
        }
    }
    decoder_message.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_cut_field() {
        // field 7 (graph), length 10, only 2 bytes follow
        let buf = [0x3a, 10, 1, 2];
        let msg = describe_fault(&buf, "x");
        assert!(msg.contains("truncated protobuf at byte 0"), "{msg}");
        assert!(msg.contains("graph"), "{msg}");
    }

    #[test]
    fn well_formed_top_level_defers_to_decoder() {
        let buf = [0x08, 7]; // ir_version = 7
        assert_eq!(describe_fault(&buf, "deeper problem"), "deeper problem");
    }
}
