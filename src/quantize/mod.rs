//! Weight quantizers that are not passes: they turn one float matrix into
//! integers, scales and zero points, and the passes (`quantize_int4`, and int8
//! weights later) put the result into the graph.
//!
//! - [`gptq`]: rounding against calibration data (GPTQ, Frantar et al. 2022),
//!   or to nearest, on a [`gptq::Grid`] of per-column or blocked scales.
//! - [`int4`]: packing 4-bit integers two to a byte (ONNX int4, ORT MatMulNBits).

pub mod gptq;
pub mod int4;
