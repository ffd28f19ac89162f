//! ONNX Runtime as a second engine, through the `ort` crate's `load-dynamic`
//! feature: the shared library is opened at run time, never downloaded at build
//! time. It comes from `ORT_DYLIB_PATH` when set, else from the `onnxruntime`
//! Python wheel (`onnxruntime/capi/libonnxruntime.so.*`) that `python3` imports.
//!
//! ORT runs what tract cannot load (custom domains, nested `If`s, shape
//! arithmetic tract will not unify) and runs com.microsoft ops with its own
//! kernels: a `--target ort` output is checked as it will be deployed, with no
//! lowering. Sessions use ORT's basic graph optimizations only (constant
//! folding, redundant nodes), so the reference is not fused by ORT behind the
//! comparison's back.

use super::{NamedInput, VerifyError};
use crate::ir::Model;
use crate::onnx;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use tract_onnx::prelude::{DatumType, Tensor};
use tract_onnx::tract_core::ndarray::{ArrayD, IxDyn};

/// The process's one ORT environment, or why there is none.
static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Where the ONNX Runtime library is: `ORT_DYLIB_PATH`, or the `onnxruntime`
/// wheel `python3` imports.
fn library_path() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return Ok(PathBuf::from(path));
    }
    let probe = std::process::Command::new("python3")
        .args(["-c", "import os, onnxruntime; print(os.path.dirname(onnxruntime.__file__))"])
        .output()
        .map_err(|e| format!("ORT_DYLIB_PATH is not set and python3 could not be run ({e})"))?;
    if !probe.status.success() {
        return Err("ORT_DYLIB_PATH is not set and python3 cannot import onnxruntime (pip install onnxruntime)".into());
    }
    let package = PathBuf::from(String::from_utf8_lossy(&probe.stdout).trim()).join("capi");
    let entries = std::fs::read_dir(&package).map_err(|e| format!("{}: {e}", package.display()))?;
    let mut libraries: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so") || n == "libonnxruntime.dylib"))
        .collect();
    libraries.sort();
    libraries.pop().ok_or_else(|| format!("{}: no libonnxruntime.so.* in the onnxruntime package", package.display()))
}

fn environment() -> Result<&'static ort::environment::Environment, String> {
    let env = ENVIRONMENT.get_or_init(|| {
        let path = library_path()?;
        let builder = ort::init_from(&path).map_err(|e| format!("{}: cannot load ONNX Runtime: {e}", path.display()))?;
        builder.with_name("onnxopt").build().map_err(|e| format!("{}: {e}", path.display()))
    });
    env.as_ref().map_err(Clone::clone)
}

/// Whether ONNX Runtime can be loaded here, or why not.
pub fn available() -> Result<(), String> {
    environment().map(|_| ())
}

/// A model loaded into an ONNX Runtime session once, for running many batches.
pub struct OrtRunner {
    session: Mutex<Session>,
    inputs: Vec<String>,
    outputs: Vec<String>,
    label: String,
}

impl OrtRunner {
    pub fn new(model: &Model, label: &str) -> Result<OrtRunner, VerifyError> {
        OrtRunner::with_level(model, label, GraphOptimizationLevel::Level1)
    }

    /// A session with every graph optimization ORT has, as a deployment loads
    /// the model: what latency is measured on.
    pub fn deployed(model: &Model, label: &str) -> Result<OrtRunner, VerifyError> {
        OrtRunner::with_level(model, label, GraphOptimizationLevel::Level3)
    }

    fn with_level(model: &Model, label: &str, level: GraphOptimizationLevel) -> Result<OrtRunner, VerifyError> {
        let fail = |message: String| VerifyError::Ort { model: label.into(), stage: "load", message };
        let env = environment().map_err(|why| VerifyError::OrtMissing { why })?;
        let bytes = onnx::to_bytes(model);
        let session = Session::builder(env)
            .map_err(|e| fail(e.to_string()))?
            .with_optimization_level(level)
            .map_err(|e| fail(e.to_string()))?
            .with_log_level(ort::logging::LogLevel::Error)
            .map_err(|e| fail(e.to_string()))?
            .commit_from_memory(&bytes)
            .map_err(|e| fail(e.to_string()))?;
        let inputs = session.inputs().iter().map(|i| i.name().to_string()).collect();
        let outputs = model.graph.outputs.iter().map(|o| o.name.clone()).collect();
        Ok(OrtRunner { session: Mutex::new(session), inputs, outputs, label: label.into() })
    }

    /// The outputs by name, in graph order.
    pub fn run(&self, inputs: &[NamedInput]) -> Result<Vec<(String, Tensor)>, VerifyError> {
        let fail = |message: String| VerifyError::Ort { model: self.label.clone(), stage: "run", message };
        let mut feed: Vec<(String, DynValue)> = Vec::new();
        for name in &self.inputs {
            let Some(input) = inputs.iter().find(|i| &i.name == name) else {
                return Err(VerifyError::UnsupportedInput { input: name.clone(), why: "no value given for it".into() });
            };
            feed.push((name.clone(), to_ort(&input.value).map_err(|why| VerifyError::UnsupportedInput { input: name.clone(), why })?));
        }
        let mut session = self.session.lock().map_err(|_| fail("an earlier run panicked".into()))?;
        let mut results = session.run(feed).map_err(|e| fail(e.to_string()))?;
        self.outputs
            .iter()
            .map(|name| {
                let value = results.remove(name.as_str()).ok_or_else(|| fail(format!("no output '{name}'")))?;
                Ok((name.clone(), from_ort(&value).map_err(|why| fail(format!("output '{name}': {why}")))?))
            })
            .collect()
    }
}

/// A tract tensor (the value type of verification) as an ORT value.
fn to_ort(t: &Tensor) -> Result<DynValue, String> {
    let shape: Vec<usize> = t.shape().to_vec();
    macro_rules! as_ort {
        ($t:ty) => {{
            let values: Vec<$t> = t.to_plain_array_view::<$t>().map_err(|e| e.to_string())?.iter().cloned().collect();
            OrtTensor::from_array((shape, values)).map(|v| v.into_dyn()).map_err(|e| e.to_string())
        }};
    }
    match t.datum_type() {
        DatumType::F32 => as_ort!(f32),
        DatumType::F16 => as_ort!(half::f16),
        DatumType::F64 => as_ort!(f64),
        DatumType::I64 => as_ort!(i64),
        DatumType::I32 => as_ort!(i32),
        DatumType::I8 => as_ort!(i8),
        DatumType::U8 => as_ort!(u8),
        DatumType::Bool => as_ort!(bool),
        other => Err(format!("{other:?} inputs are not passed to ONNX Runtime")),
    }
}

/// An ORT output as a tract tensor.
fn from_ort(value: &DynValue) -> Result<Tensor, String> {
    let ValueType::Tensor { ty, .. } = value.dtype() else { return Err("not a tensor".into()) };
    macro_rules! as_tract {
        ($t:ty) => {{
            let (shape, data) = value.try_extract_tensor::<$t>().map_err(|e| e.to_string())?;
            let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
            Ok(ArrayD::from_shape_vec(IxDyn(&dims), data.to_vec()).map_err(|e| e.to_string())?.into())
        }};
    }
    match ty {
        TensorElementType::Float32 => as_tract!(f32),
        TensorElementType::Float16 => as_tract!(half::f16),
        TensorElementType::Float64 => as_tract!(f64),
        TensorElementType::Int64 => as_tract!(i64),
        TensorElementType::Int32 => as_tract!(i32),
        TensorElementType::Int8 => as_tract!(i8),
        TensorElementType::Uint8 => as_tract!(u8),
        TensorElementType::Bool => as_tract!(bool),
        other => Err(format!("{other:?} outputs are not compared")),
    }
}
