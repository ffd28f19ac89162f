//! Numerical verification: run two models on the same inputs and compare
//! every output. Every rewrite onnxopt makes is checked this way, in tract (the
//! default: nothing to install) or in ONNX Runtime ([`Engine`]).
//!
//! A decoder with a KV cache is checked over a short generation
//! ([`decoder`]): a prefill step with an empty past, then decode steps that
//! feed the reference's `present.*` back as `past_key_values.*`; logits and
//! presents are compared at every step.
//!
//! tract reads the models as ONNX bytes encoded from the IR. Exporters record
//! symbolic dims in `value_info` that tract refuses to unify with concrete input
//! facts, so `value_info` and declared output shapes are ignored and every input
//! gets a concrete shape. tract can panic on a graph it misreads (tract-onnx
//! 0.23.9 on com.microsoft Attention): panics are caught and reported as errors.

pub mod decoder;
mod inputs;
pub mod onnx_runtime;

pub use inputs::{random_inputs, random_inputs_with, read_npz, DimSizes, NamedInput, SeededRng, TokenInput};
pub use onnx_runtime::OrtRunner;

use crate::ir::Model;
use crate::onnx;
use serde::Serialize;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use tract_onnx::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{model}: tract could not {stage} it: {message}")]
    Tract { model: String, stage: &'static str, message: String },
    #[error("{model}: tract panicked while trying to {stage} it: {message}")]
    Panic { model: String, stage: &'static str, message: String },
    #[error("input '{input}': {why}")]
    UnsupportedInput { input: String, why: String },
    #[error("{}: cannot use as inputs: {why}", path.display())]
    Inputs { path: PathBuf, why: String },
    #[error("the models differ in their outputs: {reference:?} against {candidate:?}")]
    OutputsDiffer { reference: Vec<String>, candidate: Vec<String> },
    #[error("{model}: ONNX Runtime could not {stage} it: {message}")]
    Ort { model: String, stage: &'static str, message: String },
    #[error("ONNX Runtime is not available: {why}")]
    OrtMissing { why: String },
    #[error("no engine could run the models: tract: {tract}; ONNX Runtime: {ort}")]
    NoEngine { tract: String, ort: String },
}

/// Which engine runs the models.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Engine {
    /// tract; ONNX Runtime where tract cannot run either model (and ORT is
    /// installed).
    #[default]
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "tract")]
    Tract,
    /// ONNX Runtime, loaded at run time (`onnx_runtime`).
    #[serde(rename = "onnxruntime")]
    Ort,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Auto => "auto",
            Engine::Tract => "tract",
            Engine::Ort => "onnxruntime",
        }
    }
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Engine, String> {
        match s {
            "auto" => Ok(Engine::Auto),
            "tract" => Ok(Engine::Tract),
            "ort" | "onnxruntime" => Ok(Engine::Ort),
            other => Err(format!("unknown engine '{other}' (auto, tract, ort)")),
        }
    }
}

/// Tolerances and inputs for a comparison.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    pub seed: u64,
    pub sizes: DimSizes,
    /// An output passes when every element satisfies |a - b| <= atol * s + rtol * |a|,
    /// with s = max(1, RMS of the reference output): rounding noise in a sum of
    /// many terms scales with the output's magnitude, not with each element's
    /// (a logit near 0 among logits of 20 carries the noise of the others).
    /// For outputs of RMS 1 or less this is the plain `atol + rtol * |a|`.
    pub atol: f32,
    pub rtol: f32,
    /// Inputs to use instead of random ones.
    pub inputs: Option<Vec<NamedInput>>,
    pub engine: Engine,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions { seed: 0, sizes: DimSizes::default(), atol: 1e-4, rtol: 1e-3, inputs: None, engine: Engine::Auto }
    }
}

/// How one output of the candidate differs from the reference.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OutputComparison {
    pub name: String,
    pub shape: Vec<usize>,
    pub max_abs: f64,
    pub max_rel: f64,
    pub cosine: f64,
    pub within_tolerance: bool,
    /// A decoder's present K/V cache, which the next step reads: a state, not
    /// a result (see [`Comparison::min_cosine`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cache: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Comparison {
    /// Per output; for a decoder, per output and step (`logits [decode 1]`).
    pub outputs: Vec<OutputComparison>,
    pub atol: f32,
    pub rtol: f32,
    /// The engine that ran both models: Tract or Ort, never Auto.
    pub engine: Engine,
    /// Why the engine is not the one asked for (tract's error, when ORT ran instead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.outputs.iter().all(|o| o.within_tolerance)
    }

    /// The largest absolute difference over all outputs.
    pub fn max_abs(&self) -> f64 {
        self.outputs.iter().map(|o| o.max_abs).fold(0.0, f64::max)
    }

    /// The smallest cosine similarity over all outputs.
    /// The smallest cosine over the model's results. A decoder's present
    /// caches are left out when it has other outputs: a lossy rewrite (int4,
    /// pruning) moves the cache of deep layers most, and what that does to the
    /// model shows in the next step's logits, which are compared.
    pub fn min_cosine(&self) -> f64 {
        let results = self.outputs.iter().filter(|o| !o.cache);
        let all = if self.outputs.iter().any(|o| !o.cache) { results.collect::<Vec<_>>() } else { self.outputs.iter().collect() };
        all.iter().map(|o| o.cosine).fold(1.0, f64::min)
    }
}

/// Runs both models on the same inputs, in the engine the options name, and
/// compares their outputs by name (by position when the names differ). Both
/// models run as given: lowering fused ops for tract is the caller's
/// (`passes::verify_rewrite`).
pub fn compare(reference: &Model, candidate: &Model, options: &VerifyOptions) -> Result<Comparison, VerifyError> {
    let engine = match options.engine {
        Engine::Auto => Engine::Tract,
        chosen => chosen,
    };
    compare_to(&Reference::run(reference, engine, options)?, candidate, options)
}

/// A model loaded into one of the engines.
pub enum ModelRunner {
    Tract(Runner),
    Ort(OrtRunner),
}

impl ModelRunner {
    /// `engine` is Tract or Ort (Auto reads as Tract).
    pub fn new(model: &Model, label: &str, engine: Engine) -> Result<ModelRunner, VerifyError> {
        Ok(match engine {
            Engine::Ort => ModelRunner::Ort(OrtRunner::new(model, label)?),
            Engine::Auto | Engine::Tract => ModelRunner::Tract(Runner::new(model, label)?),
        })
    }

    pub fn run(&self, inputs: &[NamedInput]) -> Result<Vec<(String, Tensor)>, VerifyError> {
        match self {
            ModelRunner::Tract(r) => r.run(inputs),
            ModelRunner::Ort(r) => r.run(inputs),
        }
    }

    pub fn engine(&self) -> Engine {
        match self {
            ModelRunner::Tract(_) => Engine::Tract,
            ModelRunner::Ort(_) => Engine::Ort,
        }
    }
}

/// One run of the reference: its inputs and outputs, and for a decoder which
/// step of the generation it is.
pub struct Step {
    /// `None` for a model without a KV cache (one step).
    pub label: Option<String>,
    pub inputs: Vec<NamedInput>,
    pub outputs: Vec<(String, Tensor)>,
    /// Output positions no caller reads (a padding token's logits and cache
    /// rows), left out of the comparison.
    pub padded: Vec<PaddedPositions>,
    /// The outputs that carry the KV cache to the next step.
    pub cache_outputs: Vec<String>,
}

/// The positions of one output that belong to padding tokens: along `axis`,
/// position `p` of batch row `b` is padding when `offset + p < padding[b]`
/// (`padding[b]` left-padding tokens in the attention mask's coordinates,
/// `offset` where the output's axis starts in them). Every later step masks
/// these positions out, and exporters disagree on them: a padding token's
/// query sees no key, so its row is whatever the masked softmax makes of it.
#[derive(Clone, Debug)]
pub struct PaddedPositions {
    pub output: String,
    pub axis: usize,
    pub offset: usize,
    pub padding: Vec<usize>,
}

impl PaddedPositions {
    /// Whether the element at flat (row-major) index `i` of a tensor of
    /// `shape` is a padding position.
    fn covers(&self, shape: &[usize], i: usize) -> bool {
        let inner: usize = shape.iter().skip(self.axis + 1).product();
        let along = shape.get(self.axis).copied().unwrap_or(1);
        let row_size: usize = shape.iter().skip(1).product();
        if row_size == 0 || inner == 0 || self.axis == 0 {
            return false;
        }
        let row = i / row_size;
        let position = (i / inner) % along;
        self.padding.get(row).is_some_and(|&pad| self.offset + position < pad)
    }
}

/// A reference model's inputs and outputs, computed once for comparing several
/// candidates against it.
pub struct Reference {
    pub steps: Vec<Step>,
    engine: Engine,
}

impl Reference {
    /// Runs `reference` in `engine` on the options' inputs (seeded random ones
    /// by default; for a decoder with a KV cache, a prefill and decode steps).
    pub fn run(reference: &Model, engine: Engine, options: &VerifyOptions) -> Result<Reference, VerifyError> {
        let runner = ModelRunner::new(reference, "reference", engine)?;
        let steps = match (&options.inputs, decoder::CacheLayout::detect(reference)) {
            (Some(given), _) => vec![Step { label: None, outputs: runner.run(given)?, inputs: given.clone(), padded: Vec::new(), cache_outputs: Vec::new() }],
            (None, Some(layout)) => layout.generate(reference, &runner, options.seed, options.sizes)?,
            (None, None) => {
                let inputs = random_inputs(reference, options.seed, options.sizes)?;
                vec![Step { label: None, outputs: runner.run(&inputs)?, inputs, padded: Vec::new(), cache_outputs: Vec::new() }]
            }
        };
        Ok(Reference { steps, engine: runner.engine() })
    }
}

/// Runs `candidate` on the reference's inputs, in the engine the reference ran
/// in, and compares its outputs.
pub fn compare_to(reference: &Reference, candidate: &Model, options: &VerifyOptions) -> Result<Comparison, VerifyError> {
    let runner = ModelRunner::new(candidate, "candidate", reference.engine)?;
    let mut outputs = Vec::new();
    for step in &reference.steps {
        let candidate_inputs: Vec<NamedInput> = step.inputs.iter().filter(|i| candidate.graph.inputs.iter().any(|c| c.name == i.name)).cloned().collect();
        let actual = runner.run(&candidate_inputs)?;
        let expected = &step.outputs;
        if expected.len() != actual.len() {
            return Err(VerifyError::OutputsDiffer {
                reference: expected.iter().map(|(n, _)| n.clone()).collect(),
                candidate: actual.into_iter().map(|(n, _)| n).collect(),
            });
        }
        for ((name, want), (_, got)) in expected.iter().zip(&actual) {
            let padded = step.padded.iter().find(|p| &p.output == name);
            let label = match &step.label {
                Some(label) => format!("{name} [{label}]"),
                None => name.clone(),
            };
            let mut comparison = compare_tensors(&label, want, got, padded, options.atol, options.rtol);
            comparison.cache = step.cache_outputs.contains(name);
            outputs.push(comparison);
        }
    }
    Ok(Comparison { outputs, atol: options.atol, rtol: options.rtol, engine: reference.engine, fallback: None })
}

/// What a caught panic said (its payload as text).
pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "unknown panic".into())
}

/// Runs `stage` and turns tract errors and panics into `VerifyError`s.
fn guarded<T>(label: &str, stage: &'static str, f: impl FnOnce() -> TractResult<T>) -> Result<T, VerifyError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(VerifyError::Tract { model: label.into(), stage, message: format!("{e:#}") }),
        Err(payload) => Err(VerifyError::Panic { model: label.into(), stage, message: panic_message(payload) }),
    }
}

/// Runs a model in tract; returns its outputs by name, in graph order.
pub fn run(model: &Model, label: &str, inputs: &[NamedInput]) -> Result<Vec<(String, Tensor)>, VerifyError> {
    Runner::new(model, label)?.run(inputs)
}

/// Plans a [`Runner`] keeps at once: the pruning code pads text batches to
/// multiples of 16 tokens, at most 8 shapes up to 128; each plan holds the
/// weights again, so more would cost memory for models of many shapes.
const CACHED_PLANS: usize = 8;

/// A model parsed by tract once, for running on many batches: optimised once
/// per distinct input shape (tract plans for concrete shapes), not per batch.
/// Measuring a candidate on 4 calibration batches of one shape parses and
/// optimises MiniLM once instead of 4 times.
pub struct Runner {
    parsed: InferenceModel,
    inputs: Vec<String>,
    outputs: Vec<String>,
    label: String,
    plans: std::cell::RefCell<std::collections::HashMap<Vec<Vec<usize>>, std::sync::Arc<TypedSimplePlan>>>,
}

impl Runner {
    pub fn new(model: &Model, label: &str) -> Result<Runner, VerifyError> {
        let bytes = onnx::to_bytes(model);
        let inputs: Vec<String> = model.graph.inputs.iter().filter(|i| model.graph.initializer(&i.name).is_none()).map(|i| i.name.clone()).collect();
        let parsed = guarded(label, "load", || {
            let mut parsed = tract_onnx::onnx().with_ignore_value_info(true).with_ignore_output_shapes(true).model_for_read(&mut bytes.as_slice())?;
            parsed.set_input_names(inputs.iter().map(String::as_str))?;
            Ok(parsed)
        })?;
        let outputs = model.graph.outputs.iter().map(|o| o.name.clone()).collect();
        Ok(Runner { parsed, inputs, outputs, label: label.into(), plans: Default::default() })
    }

    /// The outputs by name, in graph order.
    pub fn run(&self, inputs: &[NamedInput]) -> Result<Vec<(String, Tensor)>, VerifyError> {
        let ordered: Vec<&NamedInput> = self
            .inputs
            .iter()
            .map(|name| {
                inputs
                    .iter()
                    .find(|i| &i.name == name)
                    .ok_or_else(|| VerifyError::UnsupportedInput { input: name.to_string(), why: "no value given for it".into() })
            })
            .collect::<Result<_, _>>()?;
        let shapes: Vec<Vec<usize>> = ordered.iter().map(|i| i.value.shape().to_vec()).collect();
        let cached = self.plans.borrow().get(&shapes).cloned();
        let plan = match cached {
            Some(plan) => plan,
            None => {
                let plan = guarded(&self.label, "load", || {
                    let mut typed = self.parsed.clone();
                    for (ix, input) in ordered.iter().enumerate() {
                        let fact = InferenceFact::dt_shape(input.value.datum_type(), input.value.shape());
                        typed = typed.with_input_fact(ix, fact)?;
                    }
                    typed.into_optimized()?.into_runnable()
                })?;
                let mut plans = self.plans.borrow_mut();
                // a plan holds the model's weights (packed for its kernels):
                // text batches of many lengths must not keep one each
                if plans.len() >= CACHED_PLANS {
                    plans.clear();
                }
                plans.insert(shapes, plan.clone());
                plan
            }
        };
        let values: TVec<TValue> = ordered.iter().map(|i| i.value.clone().into_tvalue()).collect();
        let outputs = guarded(&self.label, "run", || plan.run(values))?;
        Ok(self.outputs.iter().cloned().zip(outputs).map(|(n, v)| (n, v.into_tensor())).collect())
    }
}

fn compare_tensors(name: &str, want: &Tensor, got: &Tensor, padded: Option<&PaddedPositions>, atol: f32, rtol: f32) -> OutputComparison {
    let as_f64 = |t: &Tensor| -> Option<Vec<f64>> {
        let cast = t.cast_to::<f64>().ok()?;
        let view = cast.to_plain_array_view::<f64>().ok()?;
        Some(view.iter().copied().collect())
    };
    let shape = want.shape().to_vec();
    // values that cannot be read as numbers, or of another shape: nothing agrees
    let unequal = |shape| OutputComparison {
        name: name.into(),
        shape,
        max_abs: f64::INFINITY,
        max_rel: f64::INFINITY,
        cosine: 0.0,
        within_tolerance: false,
        cache: false,
    };
    let (Some(a), Some(b)) = (as_f64(want), as_f64(got)) else {
        return unequal(shape);
    };
    if want.shape() != got.shape() {
        return unequal(shape);
    }
    let (mut max_abs, mut max_rel, mut dot, mut na, mut nb) = (0f64, 0f64, 0f64, 0f64, 0f64);
    // the largest |a - b| - rtol |a|, which atol (scaled) must cover
    let (mut excess, mut compared) = (0f64, 0usize);
    for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
        if padded.is_some_and(|p| p.covers(&shape, i)) {
            continue;
        }
        if !x.is_finite() || !y.is_finite() {
            // the same infinity, or NaN for NaN, agrees; any other pair does
            // not. Either way it stays out of the RMS scale and the cosine,
            // which one infinity would make meaningless.
            if !(x == y || (x.is_nan() && y.is_nan())) {
                (max_abs, excess) = (f64::INFINITY, f64::INFINITY);
            }
            continue;
        }
        let diff = (x - y).abs();
        max_abs = max_abs.max(diff);
        if x.abs() > 1e-6 {
            max_rel = max_rel.max(diff / x.abs());
        }
        excess = excess.max(diff - rtol as f64 * x.abs());
        compared += 1;
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    let cosine = if na == 0.0 && nb == 0.0 { 1.0 } else { dot / (na.sqrt() * nb.sqrt()).max(f64::MIN_POSITIVE) };
    let scale = (na / compared.max(1) as f64).sqrt().max(1.0);
    let within = excess <= atol as f64 * scale;
    OutputComparison { name: name.into(), shape, max_abs, max_rel, cosine, within_tolerance: within, cache: false }
}
