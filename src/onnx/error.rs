//! Errors at the file boundary. Every message starts with the file it is about.

use crate::ir::InvalidGraph;
use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: empty file, not an ONNX model", path.display())]
    Empty { path: PathBuf },
    #[error("{}: not a valid ONNX protobuf: {detail}", path.display())]
    Decode { path: PathBuf, detail: String },
    #[error("{}: a valid protobuf, but not an ONNX model: {reason}", path.display())]
    NotAModel { path: PathBuf, reason: String },
    #[error("{}: tensor '{tensor}': {problem}", path.display())]
    BadTensor { path: PathBuf, tensor: String, problem: String },
    #[error("{}: external data of tensor '{tensor}': {problem}", path.display())]
    ExternalData { path: PathBuf, tensor: String, problem: String },
    #[error("{}: {source}", path.display())]
    InvalidGraph {
        path: PathBuf,
        // boxed: it carries several names, and LoadError travels in every Result
        #[source]
        source: Box<InvalidGraph>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("{}: cannot write: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: the model holds {size} bytes of tensors, past protobuf's 2 GiB limit: it needs external data (drop --inline)", path.display())]
    TooLargeToInline { path: PathBuf, size: u64 },
    #[error("{}: refusing to overwrite the input model", path.display())]
    WouldOverwriteInput { path: PathBuf },
    #[error("{}: cannot write: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}
