//! onnxopt: makes trained transformer ONNX models smaller and faster, and checks
//! every rewrite numerically by running the original and the rewritten model in
//! tract or ONNX Runtime.
//!
//! Layers, each using only those below it:
//! - [`ir`]: the graph every pass works on (no files, no protobuf);
//! - [`onnx`]: ONNX files <-> IR, zero-copy weights, external data, atomic writes;
//! - [`verify`]: runs two models on the same inputs (tract, or ONNX Runtime loaded at run time) and compares outputs;
//! - [`calibrate`]: runs a model on text or `.npz` batches and gathers statistics of chosen tensors;
//! - [`prune`]: sparsity (unstructured, N:M), heads, neurons and layers, with teacher-guided re-fitting;
//! - [`inspect`]: what a model holds, for humans and JSON;
//! - [`commands`]: one call per command (optimize, quantize, prune, verify), with its policy and report;
//! - [`lint`]: a model checked against a runtime's documented rules (TensorRT's Q/DQ);
//! - [`quantize`]: weight quantizers (GPTQ, round-to-nearest) the quantization passes use.

pub mod calibrate;
pub mod commands;
pub mod inspect;
pub mod ir;
pub mod lint;
pub mod onnx;
pub mod passes;
pub mod prune;
pub mod quantize;
pub mod rewrite;
pub mod sensitivity;
pub mod target;
pub mod verify;

/// The README's Rust example runs as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
