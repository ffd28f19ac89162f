//! `onnxopt._native`: the library's commands ([`onnxopt::commands`]) for the
//! Python package. Each function takes the model as bytes or a path, its
//! options as JSON (the Python wrapper, `onnxopt/__init__.py`, builds both from
//! keyword arguments) and returns the rewritten model's bytes (or `None` when
//! it was written to `output`) with the report as JSON. Errors are
//! `OnnxoptError` with the CLI's message; a result beyond the check's bound,
//! or one no engine could check, is `VerificationError`.

use onnxopt::calibrate::{CalibrationSource, DEFAULT_BATCH, DEFAULT_MAX_LEN};
use onnxopt::commands::{self, CommandError, Outcome, Silent};
use onnxopt::ir::Model;
use onnxopt::onnx;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use serde::Deserialize;
use std::path::{Path, PathBuf};

pyo3::create_exception!(_native, OnnxoptError, PyException, "onnxopt could not do what was asked: bad input, or an option it cannot use.");
pyo3::create_exception!(
    _native,
    VerificationError,
    OnnxoptError,
    "The result differs from the input beyond the bound, or no engine could check it; nothing was returned or written."
);

/// Protobuf cannot hold a message past 2 GiB: such models go to a file.
const PROTOBUF_LIMIT: usize = i32::MAX as usize;

/// A model as the caller gave it.
struct Input {
    model: Model,
    /// What errors name: the file, or `<bytes>`.
    label: String,
    path: Option<PathBuf>,
}

fn bad(e: impl std::fmt::Display) -> PyErr {
    OnnxoptError::new_err(e.to_string())
}

fn read(data: Option<Vec<u8>>, path: Option<PathBuf>) -> PyResult<Input> {
    match (data, path) {
        (Some(bytes), None) => {
            let model = onnx::load_bytes(bytes.into(), Path::new("<bytes>")).map_err(|e| bad(commands::sentence(&e)))?;
            Ok(Input { model, label: "<bytes>".into(), path: None })
        }
        (None, Some(path)) => {
            let model = onnx::load(&path).map_err(|e| bad(commands::sentence(&e)))?;
            Ok(Input { model, label: path.display().to_string(), path: Some(path) })
        }
        _ => Err(bad("give the model as bytes or as a path, not both")),
    }
}

fn options<'a, T: Deserialize<'a>>(json: &'a str) -> PyResult<T> {
    serde_json::from_str(json).map_err(|e| bad(format!("options: {e}")))
}

fn failure(label: &str, e: CommandError) -> PyErr {
    match e {
        CommandError::Unverifiable(_) => VerificationError::new_err(format!("could not verify: {}", commands::sentence(&e))),
        e => bad(format!("{label}: {}", commands::sentence(&e))),
    }
}

/// The rewritten model's bytes, or `None` once it is written to `output`;
/// the report as JSON. A rejected result is an error, with nothing written.
fn finish<R: serde::Serialize>(py: Python<'_>, outcome: Outcome<R>, input: &Input, output: Option<PathBuf>) -> PyResult<(Option<Py<PyBytes>>, String)> {
    let report = serde_json::to_string(&outcome.report).map_err(bad)?;
    if let Some(why) = outcome.rejected {
        return Err(VerificationError::new_err(why));
    }
    match output {
        Some(path) => {
            let same = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b);
            if input.path.as_deref().is_some_and(|p| same(p, &path) || same(p, &onnx::external_data_path(&path))) {
                return Err(bad(format!("{}: refusing to overwrite the input model", path.display())));
            }
            onnx::save(&outcome.model, &path, &onnx::SaveOptions::default()).map_err(|e| bad(commands::sentence(&e)))?;
            Ok((None, report))
        }
        None => {
            let bytes = onnx::to_bytes(&outcome.model);
            if bytes.len() > PROTOBUF_LIMIT {
                return Err(bad(format!(
                    "{}: the result is {} bytes, past protobuf's 2 GiB: give output= to write it with external data",
                    input.label,
                    bytes.len()
                )));
            }
            Ok((Some(PyBytes::new(py, &bytes).unbind()), report))
        }
    }
}

/// Calibration data: a text file with a tokenizer, or an `.npz`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Calibration {
    calib_text: Option<PathBuf>,
    tokenizer: Option<PathBuf>,
    calib: Option<PathBuf>,
    max_len: Option<usize>,
    batch: Option<usize>,
}

impl Calibration {
    fn source(&self) -> PyResult<Option<CalibrationSource>> {
        let batch = self.batch.unwrap_or(DEFAULT_BATCH);
        match (&self.calib_text, &self.tokenizer, &self.calib) {
            (Some(file), Some(tokenizer), None) => {
                Ok(Some(CalibrationSource::Text { file: file.clone(), tokenizer: tokenizer.clone(), max_len: self.max_len.unwrap_or(DEFAULT_MAX_LEN), batch }))
            }
            (Some(_), None, _) => Err(bad("calib_text needs tokenizer (the model's tokenizer.json)")),
            (None, None, Some(path)) => Ok(Some(CalibrationSource::Npz { path: path.clone(), batch })),
            (None, None, None) => Ok(None),
            _ => Err(bad("give calib_text with tokenizer, or calib (an .npz), not both")),
        }
    }
}

fn parsed<T: std::str::FromStr<Err = String>>(value: Option<&str>) -> PyResult<Option<T>> {
    value.map(|v| v.parse::<T>().map_err(bad)).transpose()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct OptimizeOptions {
    target: Option<String>,
    opset: Option<i64>,
    passes: Option<Vec<String>>,
    skip: Vec<String>,
    verify: Option<bool>,
    engine: Option<String>,
    atol: Option<f32>,
    rtol: Option<f32>,
}

#[pyfunction]
#[pyo3(signature = (data, path, output, options))]
fn optimize(py: Python<'_>, data: Option<Vec<u8>>, path: Option<PathBuf>, output: Option<PathBuf>, options: &str) -> PyResult<(Option<Py<PyBytes>>, String)> {
    let o: OptimizeOptions = self::options(options)?;
    let input = read(data, path)?;
    let defaults = onnxopt::verify::VerifyOptions::default();
    let verify = o.verify.unwrap_or(true).then(|| -> PyResult<_> {
        Ok(onnxopt::verify::VerifyOptions {
            atol: o.atol.unwrap_or(defaults.atol),
            rtol: o.rtol.unwrap_or(defaults.rtol),
            engine: parsed(o.engine.as_deref())?.unwrap_or_default(),
            ..Default::default()
        })
    });
    let request = commands::OptimizeRequest {
        target: parsed(o.target.as_deref())?.unwrap_or(onnxopt::target::Target::Ort),
        opset: o.opset,
        passes: o.passes,
        skip: o.skip,
        verify: verify.transpose()?,
        ..Default::default()
    };
    let outcome = py.detach(|| commands::optimize(&input.model, &request, &Silent)).map_err(|e| failure(&input.label, e))?;
    finish(py, outcome, &input, output)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct QuantizeOptions {
    mode: Option<String>,
    target: Option<String>,
    activations: Option<String>,
    exclude: Vec<String>,
    max_error: Option<f64>,
    max_error_batches: Option<usize>,
    max_opset: Option<i64>,
    smoothquant: Option<f32>,
    #[serde(flatten)]
    calibration: Calibration,
    calibration_method: Option<String>,
    percentile: Option<f64>,
    weight_type: Option<String>,
    rounding: Option<String>,
    block_size: Option<usize>,
    zero_point: bool,
    accuracy_level: Option<i64>,
    quantize_embeddings: bool,
    float16_compute: bool,
    verify: Option<bool>,
    engine: Option<String>,
    min_cosine: Option<f64>,
    atol: Option<f32>,
    rtol: Option<f32>,
}

#[pyfunction]
#[pyo3(signature = (data, path, output, options))]
fn quantize(py: Python<'_>, data: Option<Vec<u8>>, path: Option<PathBuf>, output: Option<PathBuf>, options: &str) -> PyResult<(Option<Py<PyBytes>>, String)> {
    use onnxopt::passes::quantize_dynamic::ActivationScale;
    use onnxopt::passes::quantize_static::{CalibrationMethod, WeightType};
    let o: QuantizeOptions = self::options(options)?;
    let mode: commands::QuantizeMode =
        parsed(o.mode.as_deref())?.ok_or_else(|| bad("quantize: mode= is needed (int8, int8-dynamic, fp16, int8-static, int4-weight)"))?;
    let target = parsed(o.target.as_deref())?.unwrap_or(onnxopt::target::Target::Ort);
    let mut request = commands::QuantizeRequest::new(mode, target);
    request.activations = match o.activations.as_deref() {
        None => None,
        Some("per-tensor") => Some(ActivationScale::PerTensor),
        Some("per-token") => Some(ActivationScale::PerToken),
        Some(other) => return Err(bad(format!("activations='{other}': per-tensor or per-token"))),
    };
    request.calibration_method = match (o.calibration_method.as_deref(), o.percentile) {
        (None, None) => None,
        (Some("minmax"), None) => Some(CalibrationMethod::MinMax),
        (Some("entropy"), None) => Some(CalibrationMethod::Entropy),
        (Some("percentile") | None, Some(p)) => Some(CalibrationMethod::Percentile(p)),
        (Some("percentile"), None) => Some(commands::quantize::DEFAULT_CALIBRATION_METHOD),
        (Some(other), _) => return Err(bad(format!("calibration_method='{other}': minmax, percentile or entropy (percentile= only with percentile)"))),
    };
    request.weight_type = match o.weight_type.as_deref() {
        None => None,
        Some("int8") => Some(WeightType::Int8),
        Some("uint8") => Some(WeightType::Uint8),
        Some(other) => return Err(bad(format!("weight_type='{other}': int8 or uint8"))),
    };
    request.rounding = match o.rounding.as_deref() {
        None => None,
        Some("rtn") => Some(commands::WeightRounding::Nearest),
        Some("gptq") => Some(commands::WeightRounding::Gptq),
        Some(other) => return Err(bad(format!("rounding='{other}': rtn or gptq"))),
    };
    request.exclude = o.exclude;
    request.max_error = o.max_error;
    request.max_error_batches = o.max_error_batches;
    request.max_opset = o.max_opset;
    request.smoothquant = o.smoothquant;
    request.calibration = o.calibration.source()?;
    request.block_size = o.block_size;
    request.zero_point = o.zero_point;
    request.accuracy_level = o.accuracy_level;
    request.quantize_embeddings = o.quantize_embeddings;
    request.float16_compute = o.float16_compute;
    request.verify = o.verify.unwrap_or(true);
    request.engine = parsed(o.engine.as_deref())?.unwrap_or_default();
    request.min_cosine = o.min_cosine;
    request.atol = o.atol;
    request.rtol = o.rtol;
    let input = read(data, path)?;
    let outcome = py.detach(|| commands::quantize(&input.model, &request, &Silent)).map_err(|e| failure(&input.label, e))?;
    finish(py, outcome, &input, output)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct PruneOptions {
    method: Option<String>,
    keep_flops: Option<f64>,
    drop_layers: Option<usize>,
    sparsity: Option<Vec<String>>,
    nm: Option<String>,
    importance: Option<String>,
    reconstruct: Option<bool>,
    damping: Option<f64>,
    obs_rounds: Option<usize>,
    #[serde(flatten)]
    calibration: Calibration,
    verify: Option<bool>,
    engine: Option<String>,
    min_cosine: Option<f64>,
}

#[pyfunction]
#[pyo3(signature = (data, path, output, options))]
fn prune(py: Python<'_>, data: Option<Vec<u8>>, path: Option<PathBuf>, output: Option<PathBuf>, options: &str) -> PyResult<(Option<Py<PyBytes>>, String)> {
    use onnxopt::prune::Importance;
    let o: PruneOptions = self::options(options)?;
    let method: commands::Pruning = parsed(o.method.as_deref())?.ok_or_else(|| bad("prune: method= is needed (unstructured, nm, structured, layers)"))?;
    let mut request = commands::PruneRequest::new(method);
    request.keep_flops = o.keep_flops;
    request.drop_layers = o.drop_layers;
    request.sparsity = o.sparsity;
    request.n_of_m = o.nm;
    request.importance = match o.importance.as_deref() {
        None => None,
        Some("magnitude") => Some(Importance::Magnitude),
        Some("wanda") => Some(Importance::Wanda),
        Some("obs") => Some(Importance::Obs),
        Some(other) => return Err(bad(format!("importance='{other}': magnitude, wanda or obs"))),
    };
    request.reconstruct = o.reconstruct;
    request.damping = o.damping;
    request.obs_rounds = o.obs_rounds;
    request.calibration = o.calibration.source()?;
    request.verify = o.verify.unwrap_or(true);
    request.engine = parsed(o.engine.as_deref())?;
    request.min_cosine = o.min_cosine;
    let input = read(data, path)?;
    let outcome = py.detach(|| commands::prune(&input.model, &request, &Silent)).map_err(|e| failure(&input.label, e))?;
    finish(py, outcome, &input, output)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct VerifyOptions {
    atol: Option<f32>,
    rtol: Option<f32>,
    engine: Option<String>,
    seed: Option<u64>,
    batch: Option<usize>,
    sequence: Option<usize>,
}

/// The comparison of two models as JSON (with `passed`).
#[pyfunction]
#[pyo3(signature = (reference_data, reference_path, candidate_data, candidate_path, options))]
fn verify(
    py: Python<'_>,
    reference_data: Option<Vec<u8>>,
    reference_path: Option<PathBuf>,
    candidate_data: Option<Vec<u8>>,
    candidate_path: Option<PathBuf>,
    options: &str,
) -> PyResult<String> {
    let o: VerifyOptions = self::options(options)?;
    let (reference, candidate) = (read(reference_data, reference_path)?, read(candidate_data, candidate_path)?);
    let defaults = onnxopt::verify::VerifyOptions::default();
    let options = onnxopt::verify::VerifyOptions {
        atol: o.atol.unwrap_or(defaults.atol),
        rtol: o.rtol.unwrap_or(defaults.rtol),
        engine: parsed(o.engine.as_deref())?.unwrap_or_default(),
        seed: o.seed.unwrap_or(defaults.seed),
        sizes: onnxopt::verify::DimSizes { batch: o.batch.unwrap_or(defaults.sizes.batch), sequence: o.sequence.unwrap_or(defaults.sizes.sequence) },
        inputs: None,
    };
    let comparison = py
        .detach(|| commands::verify(&reference.model, &candidate.model, &options))
        .map_err(|e| VerificationError::new_err(format!("could not verify: {}", commands::sentence(&e))))?;
    let mut json = serde_json::to_value(&comparison).map_err(bad)?;
    if let Some(fields) = json.as_object_mut() {
        fields.insert("passed".into(), comparison.passed().into());
    }
    Ok(json.to_string())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct AutoOptions {
    target: Option<String>,
    preset: Option<String>,
    min_cosine: Option<f64>,
    max_perplexity_ratio: Option<f64>,
    #[serde(flatten)]
    calibration: Calibration,
    max_trials: Option<usize>,
    time_budget: Option<f64>,
    recipes: Option<Vec<String>>,
}

#[pyfunction]
#[pyo3(signature = (data, path, output, options))]
fn auto(py: Python<'_>, data: Option<Vec<u8>>, path: Option<PathBuf>, output: Option<PathBuf>, options: &str) -> PyResult<(Option<Py<PyBytes>>, String)> {
    let o: AutoOptions = self::options(options)?;
    let input = read(data, path)?;
    let budget = match (o.min_cosine, o.max_perplexity_ratio) {
        (Some(_), Some(_)) => return Err(bad("give min_cosine (encoders) or max_perplexity_ratio (decoders), not both")),
        (Some(c), None) => Some(commands::Budget::MinCosine(c)),
        (None, Some(r)) => Some(commands::Budget::MaxPerplexityRatio(r)),
        (None, None) => None,
    };
    let request = commands::AutoRequest {
        target: parsed(o.target.as_deref())?.unwrap_or(onnxopt::target::Target::Ort),
        preset: parsed(o.preset.as_deref())?,
        budget,
        calibration: o.calibration.source()?,
        max_trials: o.max_trials,
        time_budget: o.time_budget.map(std::time::Duration::from_secs_f64),
        recipes: o.recipes,
    };
    let outcome = py.detach(|| commands::auto(&input.model, &request, &Silent)).map_err(|e| failure(&input.label, e))?;
    finish(py, outcome, &input, output)
}

/// What a model holds (`onnxopt inspect --json`), as JSON.
#[pyfunction]
#[pyo3(signature = (data, path))]
fn inspect(data: Option<Vec<u8>>, path: Option<PathBuf>) -> PyResult<String> {
    let input = read(data, path)?;
    serde_json::to_string(&onnxopt::inspect::summarize(&input.model)).map_err(bad)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("OnnxoptError", m.py().get_type::<OnnxoptError>())?;
    m.add("VerificationError", m.py().get_type::<VerificationError>())?;
    m.add_function(wrap_pyfunction!(optimize, m)?)?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(prune, m)?)?;
    m.add_function(wrap_pyfunction!(auto, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    Ok(())
}
