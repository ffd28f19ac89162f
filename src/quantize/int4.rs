//! 4-bit integers packed two to a byte, the first in the low nibble: ONNX's
//! `int4`/`uint4` `raw_data` (onnx IR.md, "packed ... the first element in the
//! 4 LSB") and ORT's `MatMulNBits` weight and zero points (ContribOperators.md;
//! checked against ORT 1.32's kernel by `tests/quantize_int4.rs`) pack alike.

/// Packs the low 4 bits of each value; an odd count leaves the last high nibble 0.
pub fn pack_nibbles(values: impl IntoIterator<Item = i32>) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        let nibble = (v & 0x0f) as u8;
        if i % 2 == 0 {
            bytes.push(nibble);
        } else if let Some(last) = bytes.last_mut() {
            *last |= nibble << 4;
        }
    }
    bytes
}

/// The first `count` nibbles of `bytes`, as `int4` (-8..=7) when `signed`, else
/// `uint4` (0..=15). `None` when `bytes` holds fewer than `count`.
pub fn unpack_nibbles(bytes: &[u8], count: usize, signed: bool) -> Option<Vec<i32>> {
    if bytes.len() < count.div_ceil(2) {
        return None;
    }
    Some(
        (0..count)
            .map(|i| {
                let nibble = (bytes[i / 2] >> (4 * (i % 2))) & 0x0f;
                if signed && nibble >= 8 {
                    nibble as i32 - 16
                } else {
                    nibble as i32
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibbles_round_trip_low_first() {
        let values = [-8, 7, -1, 0, 3];
        let packed = pack_nibbles(values);
        assert_eq!(packed, vec![0x78, 0x0f, 0x03]);
        assert_eq!(unpack_nibbles(&packed, 5, true), Some(values.to_vec()));
        assert_eq!(unpack_nibbles(&packed, 5, false), Some(vec![8, 7, 15, 0, 3]));
        assert_eq!(unpack_nibbles(&packed, 7, false), None);
    }
}
