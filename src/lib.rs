//! onnxopt: makes trained transformer ONNX models smaller and faster, and checks
//! every rewrite numerically by running the original and the rewritten model in tract.
//!
//! Layers, each using only those below it:
//! - [`ir`]: the graph every pass works on (no files, no protobuf);
//! - [`onnx`]: ONNX files <-> IR, zero-copy weights, external data, atomic writes;
//! - [`verify`]: runs two models in tract on the same inputs and compares outputs;
//! - [`calibrate`]: runs a model on text or `.npz` batches and gathers statistics of chosen tensors;
//! - [`prune`]: unstructured and N:M sparsity, with teacher-guided re-fitting of the kept weights;
//! - [`inspect`]: what a model holds, for humans and JSON.

pub mod calibrate;
pub mod inspect;
pub mod ir;
pub mod onnx;
pub mod passes;
pub mod prune;
pub mod rewrite;
pub mod verify;

/// The README's Rust example runs as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
