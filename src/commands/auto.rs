//! `auto`: a preset (`-O1` to `-O4`, each a fixed recipe), or a search over
//! recipes under an accuracy budget that keeps the fastest.
//!
//! The search holds back the last part of the calibration batches (a fifth,
//! 1 to [`MAX_HELD_BACK_BATCHES`]); the recipes calibrate on the rest. Each
//! trial's model runs on the held-back batches beside the input's outputs:
//! - encoders: the mean cosine of their outputs, a `[batch, seq, hidden]`
//!   output mean-pooled over the real tokens first (a sentence embedding, as
//!   sentence-transformers pools), any other row by row; the worst output
//!   counts;
//! - decoders (a KV cache): the perplexity of the next token over the real
//!   tokens of each held-back sentence, as a ratio to the input's.
//!
//! Latency is measured in ONNX Runtime with every graph optimization on (as a
//! deployment loads the model), tract where ONNX Runtime is missing: the
//! median of [`LATENCY_ROUNDS`] runs, each round running the trial and the
//! input in turn, so that both meet the same machine. An encoder runs the
//! first held-back batch; a decoder one decode step after a prefill of
//! [`DECODER_PREFILL`] tokens (batch 1), its prefill reported beside it.
//!
//! The trials run in [`recipes`]' order until `max_trials` or `time_budget`
//! stops them; a recipe that fails is recorded with its error and the search
//! goes on. The fastest trial within the budget is the result (`fuse` is
//! exact, so there is always one unless it failed).

use super::report::{AutoReport, OptimizeReport, Trial};
use super::{optimize, prune, quantize, CommandError, Observer, OptimizeRequest, Outcome, PruneRequest, Pruning, QuantizeMode, QuantizeRequest, Step};
use crate::calibrate::CalibrationSource;
use crate::ir::Model;
use crate::passes::pipeline::PipelineOptions;
use crate::passes::quantize_dynamic::ActivationScale;
use crate::passes::{run_pipeline, DriverOptions, Pass};
use crate::target::Target;
use crate::verify::decoder::CacheLayout;
use crate::verify::{DimSizes, Engine, ModelRunner, NamedInput, OrtRunner, TokenInput, VerifyOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tract_onnx::prelude::Tensor;
use tract_onnx::tract_core::ndarray::{ArrayD, Axis};

/// Held-back calibration batches, at most.
pub const MAX_HELD_BACK_BATCHES: usize = 8;
/// Rounds of the latency measurement (each runs the trial and the input once).
pub const LATENCY_ROUNDS: usize = 15;
/// A decoder's prompt before the timed decode step (batch 1).
pub const DECODER_PREFILL: usize = 128;
/// -O3's bound on the outputs after GELU takes its tanh form.
pub const APPROXIMATE_GELU_MIN_COSINE: f64 = 0.9999;
/// The budget without one given: an encoder's outputs at mean cosine 0.99.
pub const DEFAULT_MIN_COSINE: f64 = 0.99;
/// The budget without one given: a decoder's perplexity at most 1.10x.
pub const DEFAULT_MAX_PERPLEXITY_RATIO: f64 = 1.10;

/// Optimum's optimization levels, as fixed recipes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Preset {
    /// Cleanup only: constant folding, dead code, no-ops, shapes (exact).
    O1,
    /// O1 and fusion for the target (exact up to float rounding).
    O2,
    /// O2 and GELU in its tanh form (ORT's FastGelu, within 5e-4).
    O3,
    /// O3 and float16 weights and computation (for GPUs: ORT's CUDA provider).
    O4,
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Preset, String> {
        match s.trim_start_matches(['-', 'O', 'o']) {
            "1" => Ok(Preset::O1),
            "2" => Ok(Preset::O2),
            "3" => Ok(Preset::O3),
            "4" => Ok(Preset::O4),
            _ => Err(format!("unknown preset '{s}' (O1, O2, O3, O4)")),
        }
    }
}

/// How far a trial may drift from the input.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum Budget {
    /// Encoders: the mean cosine of the outputs on held-back data, at least this.
    MinCosine(f64),
    /// Decoders: perplexity on held-back text, at most this times the input's.
    MaxPerplexityRatio(f64),
}

impl Budget {
    fn admits(self, fidelity: f64) -> bool {
        match self {
            Budget::MinCosine(c) => fidelity >= c,
            Budget::MaxPerplexityRatio(r) => fidelity <= r,
        }
    }
}

/// What `auto` is asked to do.
#[derive(Clone, Debug)]
pub struct AutoRequest {
    pub target: Target,
    /// A fixed recipe instead of the search.
    pub preset: Option<Preset>,
    /// The search's bound; by default [`DEFAULT_MIN_COSINE`] for encoders and
    /// [`DEFAULT_MAX_PERPLEXITY_RATIO`] for decoders.
    pub budget: Option<Budget>,
    /// Text or tensors: the search calibrates on them and measures on a
    /// held-back part.
    pub calibration: Option<CalibrationSource>,
    pub max_trials: Option<usize>,
    pub time_budget: Option<Duration>,
    /// Only the recipes of these names (see [`recipe_names`]).
    pub recipes: Option<Vec<String>>,
}

impl AutoRequest {
    pub fn new(target: Target) -> AutoRequest {
        AutoRequest { target, preset: None, budget: None, calibration: None, max_trials: None, time_budget: None, recipes: None }
    }
}

/// One way to make the model, built on the input or on the fused model.
struct Recipe {
    name: &'static str,
    what: &'static str,
    /// Encoders only, decoders only, or both.
    applies: Applies,
    build: fn(&RecipeInputs, &dyn Observer) -> Result<Model, CommandError>,
}

#[derive(Clone, Copy, PartialEq)]
enum Applies {
    Both,
    Encoders,
    Decoders,
}

/// What the recipes share: the input, the fused model (made once), the
/// calibration batches the search does not hold back.
struct RecipeInputs<'a> {
    original: &'a Model,
    target: Target,
    calibration: CalibrationSource,
    /// The input has a KV cache.
    decoder: bool,
    fused: std::cell::OnceCell<Model>,
}

impl RecipeInputs<'_> {
    fn fused(&self, observer: &dyn Observer) -> Result<&Model, CommandError> {
        if let Some(model) = self.fused.get() {
            return Ok(model);
        }
        let outcome = optimize(self.original, &OptimizeRequest { target: self.target, ..OptimizeRequest::default() }, observer)?;
        if let Some(why) = outcome.rejected {
            return Err(CommandError::Bug(why));
        }
        Ok(self.fused.get_or_init(|| outcome.model))
    }

    /// `mode` on `model`, unchecked (the search measures every trial itself).
    fn quantize(&self, model: &Model, mode: QuantizeMode, with: impl FnOnce(&mut QuantizeRequest), observer: &dyn Observer) -> Result<Model, CommandError> {
        let mut request = QuantizeRequest::new(mode, self.target);
        request.verify = false;
        with(&mut request);
        Ok(quantize(model, &request, observer)?.model)
    }

    fn int4(&self, block: usize, observer: &dyn Observer) -> Result<Model, CommandError> {
        let fused = self.fused(observer)?;
        self.quantize(
            fused,
            QuantizeMode::Int4Weight,
            |r| {
                r.block_size = Some(block);
                r.zero_point = true;
                r.calibration = Some(self.calibration.clone());
            },
            observer,
        )
    }

    fn pruned_int8(&self, keep_flops: f64, observer: &dyn Observer) -> Result<Model, CommandError> {
        let mut request = PruneRequest::new(Pruning::Structured);
        request.keep_flops = Some(keep_flops);
        request.calibration = Some(self.calibration.clone());
        let pruned = prune(self.original, &request, observer)?;
        if let Some(why) = pruned.rejected {
            return Err(CommandError::Request(why));
        }
        self.quantize(&pruned.model, QuantizeMode::Int8, |r| r.calibration = Some(self.calibration.clone()), observer)
    }
}

/// The search's recipes, in the order they are tried: the cheap and exact
/// first, then those that usually pay most for their kind of model.
fn recipes() -> Vec<Recipe> {
    vec![
        Recipe { name: "fuse", what: "optimize for the target (exact)", applies: Applies::Both, build: |t, o| t.fused(o).cloned() },
        Recipe {
            name: "int8",
            what: "quantize --mode int8: fused, int8 weights (GPTQ), per-token or per-tensor activations chosen per layer (a decoder: per token everywhere, rounded to nearest; its per-layer search would run the model once per layer and batch)",
            applies: Applies::Both,
            build: |t, o| t.quantize(t.original, QuantizeMode::Int8, |r| r.calibration = (!t.decoder).then(|| t.calibration.clone()), o),
        },
        Recipe { name: "int4-b32", what: "fused, then int4 weights, block 32, zero points, GPTQ", applies: Applies::Decoders, build: |t, o| t.int4(32, o) },
        Recipe {
            name: "int8-dynamic",
            what: "quantize --mode int8-dynamic: int8 weights, activations per tensor at run time",
            applies: Applies::Both,
            build: |t, o| t.quantize(t.original, QuantizeMode::Int8Dynamic, |_| {}, o),
        },
        Recipe {
            name: "int8-dynamic-per-token",
            what: "quantize --mode int8-dynamic --activations per-token, GPTQ weights",
            applies: Applies::Both,
            build: |t, o| {
                t.quantize(
                    t.original,
                    QuantizeMode::Int8Dynamic,
                    |r| {
                        r.activations = Some(ActivationScale::PerToken);
                        r.calibration = Some(t.calibration.clone());
                    },
                    o,
                )
            },
        },
        Recipe {
            name: "prune-0.85+int8",
            what: "prune --method structured --keep-flops 0.85 (re-fitted), then --mode int8",
            applies: Applies::Encoders,
            build: |t, o| t.pruned_int8(0.85, o),
        },
        Recipe { name: "int4-b64", what: "fused, then int4 weights, block 64, zero points, GPTQ", applies: Applies::Both, build: |t, o| t.int4(64, o) },
        Recipe {
            name: "fp16",
            what: "fused, then float16 weights (ORT on CPU computes in float32)",
            applies: Applies::Both,
            build: |t, o| {
                let fused = t.fused(o)?;
                t.quantize(fused, QuantizeMode::Fp16, |_| {}, o)
            },
        },
        Recipe {
            name: "prune-0.7+int8",
            what: "prune --method structured --keep-flops 0.7 (re-fitted), then --mode int8",
            applies: Applies::Encoders,
            build: |t, o| t.pruned_int8(0.7, o),
        },
        Recipe { name: "int4-b128", what: "fused, then int4 weights, block 128, zero points, GPTQ", applies: Applies::Both, build: |t, o| t.int4(128, o) },
    ]
}

/// The names `AutoRequest::recipes` takes, each with what it runs.
pub fn recipe_names() -> Vec<(&'static str, &'static str)> {
    recipes().into_iter().map(|r| (r.name, r.what)).collect()
}

/// Runs the preset, or searches the recipes, and returns the chosen model.
pub fn auto(original: &Model, request: &AutoRequest, observer: &dyn Observer) -> Result<Outcome<AutoReport>, CommandError> {
    let started = Instant::now();
    if let Some(preset) = request.preset {
        if request.budget.is_some() || request.max_trials.is_some() || request.time_budget.is_some() || request.recipes.is_some() {
            return Err(CommandError::Request(format!("-{preset:?} is a fixed recipe: it takes no budget, --max-trials, --time-budget or --recipes")));
        }
        if request.calibration.is_some() {
            return Err(CommandError::Request(format!("-{preset:?} reads no calibration data (the search does)")));
        }
        let (model, optimized, rejected) = run_preset(original, preset, request.target, observer)?;
        let report = AutoReport::preset(request.target, preset, optimized, started.elapsed().as_secs_f64());
        return Ok(Outcome { model, report, rejected });
    }
    search(original, request, observer, started)
}

/// A preset: `optimize` (cleanup only for O1), then approximate GELU (O3, O4;
/// checked to cosine [`APPROXIMATE_GELU_MIN_COSINE`]), then float16 compute
/// (O4, checked by `quantize`'s bound).
fn run_preset(original: &Model, preset: Preset, target: Target, observer: &dyn Observer) -> Result<(Model, OptimizeReport, Option<String>), CommandError> {
    let passes = match preset {
        Preset::O1 => {
            let cleanup = crate::passes::pipeline::optimization_passes(target, &PipelineOptions::cleanup_only());
            Some(cleanup.iter().map(|p| p.name().to_string()).collect())
        }
        _ => None,
    };
    let outcome = optimize(original, &OptimizeRequest { target, passes, ..OptimizeRequest::default() }, observer)?;
    if outcome.rejected.is_some() || preset < Preset::O3 {
        return Ok((outcome.model, outcome.report, outcome.rejected));
    }
    let mut model = outcome.model;
    if target == Target::Ort {
        let approximate: Vec<Box<dyn Pass>> = vec![Box::new(crate::passes::approximate_gelu::ApproximateGelu)];
        run_pipeline(&mut model, &approximate, &DriverOptions::default())?;
        // each GELU moves by under 5e-4, which the layers after it carry on:
        // bounded by the outputs' direction, as quantization is
        let any_element = VerifyOptions { atol: f32::INFINITY, rtol: 0.0, ..VerifyOptions::default() };
        let checked = super::check(original, &model, Some(&any_element), observer)?;
        if let Some(comparison) = checked.filter(|c| c.min_cosine() < APPROXIMATE_GELU_MIN_COSINE) {
            let why = format!(
                "approximate GELU moved the outputs to cosine {:.6} (max abs {:.3e}), below {APPROXIMATE_GELU_MIN_COSINE}; nothing written (-O2 keeps the exact form)",
                comparison.min_cosine(),
                comparison.max_abs()
            );
            return Ok((model, outcome.report, Some(why)));
        }
    } else {
        observer.say(&format!("-O3: the tanh GELU kernel is ORT's (FastGelu); --target {target} keeps the exact form"));
    }
    if preset == Preset::O4 {
        // for GPUs: float16 computation too (ORT's CUDA GroupQueryAttention is float16 only)
        let request = QuantizeRequest { float16_compute: target == Target::Ort, ..QuantizeRequest::new(QuantizeMode::Fp16, target) };
        let fp16 = quantize(&model, &request, observer)?;
        return Ok((fp16.model, outcome.report, fp16.rejected));
    }
    Ok((model, outcome.report, None))
}

/// Held-back data, the input's outputs on it, and the inputs latency is measured on.
struct Yardstick {
    held_back: Vec<Vec<NamedInput>>,
    /// Encoders: the input's outputs on them.
    reference_outputs: Vec<Vec<(String, Tensor)>>,
    /// Encoders: the first held-back batch; decoders: a decode step.
    timed: Vec<NamedInput>,
    /// Decoders: the prefill before it.
    prefill: Option<Vec<NamedInput>>,
    reference_perplexity: Option<f64>,
    engine: Engine,
    baseline: ModelRunner,
}

fn runner(model: &Model, label: &str, engine: Engine) -> Result<ModelRunner, CommandError> {
    Ok(match engine {
        Engine::Ort => ModelRunner::Ort(OrtRunner::deployed(model, label)?),
        _ => ModelRunner::new(&crate::passes::lowered_for_tract(model)?, label, Engine::Tract)?,
    })
}

fn search(original: &Model, request: &AutoRequest, observer: &dyn Observer, started: Instant) -> Result<Outcome<AutoReport>, CommandError> {
    let source = request.calibration.as_ref().ok_or_else(|| {
        CommandError::Request("the search measures every trial on held-back calibration data: --calib-text FILE --tokenizer tokenizer.json, or --calib data.npz (or take a preset, -O1 to -O4)".into())
    })?;
    let decoder = CacheLayout::detect(original);
    let budget = match (request.budget, &decoder) {
        (Some(Budget::MinCosine(_)), Some(_)) => {
            return Err(CommandError::Request("--min-cosine is an encoder's budget: a decoder's is --max-perplexity-ratio".into()))
        }
        (Some(Budget::MaxPerplexityRatio(_)), None) => {
            return Err(CommandError::Request(
                "--max-perplexity-ratio needs a decoder with a KV cache (past_key_values inputs); an encoder's budget is --min-cosine".into(),
            ))
        }
        (Some(b), _) => b,
        (None, Some(_)) => Budget::MaxPerplexityRatio(DEFAULT_MAX_PERPLEXITY_RATIO),
        (None, None) => Budget::MinCosine(DEFAULT_MIN_COSINE),
    };
    let known = recipes();
    if let Some(unknown) = request.recipes.iter().flatten().find(|n| !known.iter().any(|r| r.name == n.as_str())) {
        let names: Vec<&str> = known.iter().map(|r| r.name).collect();
        return Err(CommandError::Request(format!("unknown recipe '{unknown}' (recipes: {})", names.join(", "))));
    }
    let mut batches = {
        let _step = Step::begin(observer, "reading the calibration data");
        source.collect(original)?
    };
    if batches.len() < 2 {
        return Err(CommandError::Request(format!(
            "the calibration data makes {} batch(es): the search needs at least 2 (one to calibrate on, one held back); give more samples or a smaller --batch",
            batches.len()
        )));
    }
    let held = (batches.len() / 5).clamp(1, MAX_HELD_BACK_BATCHES);
    let held_back = batches.split_off(batches.len() - held);
    observer.say(&format!("calibrating on {} batches, measuring on {held} held back", batches.len()));
    let engine = if crate::verify::onnx_runtime::available().is_ok() { Engine::Ort } else { Engine::Tract };
    let yardstick = {
        let _step = Step::begin(observer, format!("running the input on the held-back data ({})", engine.name()));
        Yardstick::new(original, held_back, decoder.as_ref(), engine)?
    };
    let inputs = RecipeInputs {
        original,
        target: request.target,
        calibration: CalibrationSource::Batches(Arc::new(batches)),
        decoder: decoder.is_some(),
        fused: Default::default(),
    };
    let chosen_recipes: Vec<Recipe> = known
        .into_iter()
        .filter(|r| request.recipes.as_ref().is_none_or(|only| only.iter().any(|n| n == r.name)))
        .filter(|r| request.recipes.is_some() || r.applies == Applies::Both || (r.applies == Applies::Decoders) == decoder.is_some())
        .collect();
    let total = request.max_trials.map_or(chosen_recipes.len(), |m| m.min(chosen_recipes.len()));
    let mut trials: Vec<Trial> = Vec::new();
    let mut models: Vec<Option<Model>> = Vec::new();
    for (index, recipe) in chosen_recipes.iter().take(total).enumerate() {
        if let Some(limit) = request.time_budget.filter(|&limit| started.elapsed() >= limit) {
            observer.say(&format!("time budget of {} s spent: {} recipe(s) not tried", limit.as_secs(), total - index));
            break;
        }
        let _step = Step::begin(observer, format!("trial {}/{total}: {}", index + 1, recipe.name));
        let built = Instant::now();
        let (trial, model) = match (recipe.build)(&inputs, &super::Quiet(observer)) {
            Ok(model) => match yardstick.measure(&model, recipe.name, budget) {
                Ok(mut trial) => {
                    trial.build_seconds = built.elapsed().as_secs_f64() - trial.measure_seconds;
                    (trial, Some(model))
                }
                Err(e) => (Trial::failed(recipe.name, &e), None),
            },
            Err(e) => (Trial::failed(recipe.name, &e), None),
        };
        observer.say(&trial.line());
        trials.push(trial);
        models.push(model);
    }
    let best = trials
        .iter()
        .enumerate()
        .filter(|(_, t)| t.within_budget)
        .min_by(|(_, a), (_, b)| a.latency_ratio.unwrap_or(f64::INFINITY).total_cmp(&b.latency_ratio.unwrap_or(f64::INFINITY)))
        .map(|(i, _)| i);
    let report = AutoReport {
        target: request.target,
        preset: None,
        budget: Some(budget),
        engine: Some(yardstick.engine),
        held_back_batches: yardstick.held_back.len(),
        timed: if decoder.is_some() { format!("a decode step after {DECODER_PREFILL} tokens, batch 1") } else { "the first held-back batch".into() },
        reference_perplexity: yardstick.reference_perplexity,
        trials,
        chosen: best.map(|i| chosen_recipes[i].name.to_string()),
        optimize: None,
        seconds: started.elapsed().as_secs_f64(),
    };
    match best.and_then(|i| models[i].take()) {
        Some(model) => Ok(Outcome { model, report, rejected: None }),
        None => {
            let why = "no trial stayed within the budget; nothing written (loosen the budget, or see the report for each trial's fidelity)".into();
            Ok(Outcome { model: original.clone(), report, rejected: Some(why) })
        }
    }
}

impl Yardstick {
    fn new(original: &Model, held_back: Vec<Vec<NamedInput>>, decoder: Option<&CacheLayout>, engine: Engine) -> Result<Yardstick, CommandError> {
        let baseline = runner(original, "the input", engine)?;
        // a decoder's outputs (logits over the vocabulary, the caches) are
        // large: only its perplexity is kept
        let (timed, prefill, reference_perplexity, reference_outputs) = match decoder {
            Some(layout) => {
                let steps = layout.generate(original, &baseline, 7, DimSizes { batch: 1, sequence: DECODER_PREFILL })?;
                let ppl = perplexity(&baseline, &held_back)?.ok_or_else(|| {
                    CommandError::Request("the decoder's perplexity needs input_ids, an attention_mask and a [batch, seq, vocab] logits output".into())
                })?;
                (steps[1].inputs.clone(), Some(steps[0].inputs.clone()), Some(ppl), Vec::new())
            }
            None => {
                let outputs = held_back.iter().map(|b| baseline.run(b)).collect::<Result<Vec<_>, _>>()?;
                (held_back[0].clone(), None, None, outputs)
            }
        };
        Ok(Yardstick { held_back, reference_outputs, timed, prefill, reference_perplexity, engine, baseline })
    }

    /// Fidelity and latency of one trial's model.
    fn measure(&self, model: &Model, name: &str, budget: Budget) -> Result<Trial, CommandError> {
        let started = Instant::now();
        let candidate = runner(model, name, self.engine)?;
        let fidelity = match self.reference_perplexity {
            Some(reference) => perplexity(&candidate, &self.held_back)?.map(|p| p / reference),
            None => {
                let outputs = self.held_back.iter().map(|b| candidate.run(b)).collect::<Result<Vec<_>, _>>()?;
                Some(mean_cosine(&self.held_back, &self.reference_outputs, &outputs))
            }
        }
        .ok_or_else(|| CommandError::Request(format!("{name}: its outputs cannot be compared to the input's")))?;
        let (latency, baseline) = self.latency(&candidate, &self.timed)?;
        let prefill = self.prefill.as_ref().map(|p| self.latency(&candidate, p)).transpose()?;
        Ok(Trial {
            recipe: name.to_string(),
            fidelity: Some(fidelity),
            within_budget: fidelity.is_finite() && budget.admits(fidelity),
            latency_ms: Some(latency * 1e3),
            input_latency_ms: Some(baseline * 1e3),
            latency_ratio: Some(latency / baseline),
            prefill_ratio: prefill.map(|(c, b)| c / b),
            file_bytes: crate::onnx::to_bytes(model).len() as u64,
            build_seconds: 0.0,
            measure_seconds: started.elapsed().as_secs_f64(),
            error: None,
        })
    }

    /// Medians (seconds) of the candidate's and the input's runs, in turn.
    fn latency(&self, candidate: &ModelRunner, inputs: &[NamedInput]) -> Result<(f64, f64), CommandError> {
        // a first run of each: sessions allocate on it
        candidate.run(inputs)?;
        self.baseline.run(inputs)?;
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..LATENCY_ROUNDS {
            for (runner, times) in [(candidate, &mut ours), (&self.baseline, &mut theirs)] {
                let start = Instant::now();
                runner.run(inputs)?;
                times.push(start.elapsed().as_secs_f64());
            }
        }
        Ok((median(&mut ours), median(&mut theirs)))
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn as_f32(t: &Tensor) -> Option<ArrayD<f32>> {
    let t = t.cast_to::<f32>().ok()?;
    Some(t.to_plain_array_view::<f32>().ok()?.to_owned())
}

/// A batch's input of this kind, as integers `[batch, seq]`.
fn token_field(batch: &[NamedInput], kind: TokenInput) -> Option<ArrayD<i64>> {
    let input = batch.iter().find(|i| TokenInput::of(&i.name) == Some(kind) && !i.name.to_lowercase().contains("encoder"))?;
    let t = input.value.cast_to::<i64>().ok()?;
    Some(t.to_plain_array_view::<i64>().ok()?.to_owned()).filter(|a| a.ndim() == 2)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let (na, nb) = (norm(a), norm(b));
    if na == 0.0 && nb == 0.0 {
        1.0
    } else {
        dot / (na * nb).max(f64::MIN_POSITIVE)
    }
}

/// Rows to compare of one output: a `[batch, seq, hidden]` output with a
/// `[batch, seq]` attention mask mean-pooled over the real tokens (one
/// sentence embedding per row); anything else row by row along axis 0.
fn comparable_rows(value: &ArrayD<f32>, mask: Option<&ArrayD<i64>>) -> Vec<Vec<f32>> {
    if let Some(mask) = mask.filter(|m| value.ndim() == 3 && m.shape() == &value.shape()[..2]) {
        return value
            .axis_iter(Axis(0))
            .zip(mask.axis_iter(Axis(0)))
            .map(|(tokens, keep)| {
                let hidden = tokens.shape()[1];
                let mut sum = vec![0f32; hidden];
                let mut count = 0f32;
                for (row, &k) in tokens.axis_iter(Axis(0)).zip(keep.iter()) {
                    if k != 0 {
                        sum.iter_mut().zip(row.iter()).for_each(|(s, v)| *s += v);
                        count += 1.0;
                    }
                }
                sum.iter().map(|s| s / count.max(1.0)).collect()
            })
            .collect();
    }
    if value.ndim() == 0 {
        return vec![value.iter().copied().collect()];
    }
    value.axis_iter(Axis(0)).map(|row| row.iter().copied().collect()).collect()
}

/// The mean cosine of each output over the held-back rows; the worst output's.
fn mean_cosine(batches: &[Vec<NamedInput>], reference: &[Vec<(String, Tensor)>], candidate: &[Vec<(String, Tensor)>]) -> f64 {
    let outputs = reference.first().map_or(0, Vec::len);
    let mut worst = f64::INFINITY;
    for o in 0..outputs {
        let (mut sum, mut rows) = (0.0, 0usize);
        for ((batch, r), c) in batches.iter().zip(reference).zip(candidate) {
            let mask = token_field(batch, TokenInput::AttentionMask);
            let (Some(r), Some(c)) = (r.get(o).and_then(|(_, t)| as_f32(t)), c.get(o).and_then(|(_, t)| as_f32(t))) else { return f64::NAN };
            if r.shape() != c.shape() {
                return f64::NAN;
            }
            for (a, b) in comparable_rows(&r, mask.as_ref()).iter().zip(&comparable_rows(&c, mask.as_ref())) {
                sum += cosine(a, b);
                rows += 1;
            }
        }
        if rows > 0 {
            worst = worst.min(sum / rows as f64);
        }
    }
    worst
}

/// exp(mean negative log-likelihood) of each next real token over the
/// batches, one run at a time (see [`next_token_nll`]); `None` when the model
/// has no logits to read.
fn perplexity(model: &ModelRunner, batches: &[Vec<NamedInput>]) -> Result<Option<f64>, CommandError> {
    let (mut nll, mut count) = (0.0f64, 0usize);
    for batch in batches {
        let Some((sum, n)) = next_token_nll(batch, &model.run(batch)?) else { return Ok(None) };
        nll += sum;
        count += n;
    }
    Ok((count > 0).then(|| (nll / count as f64).exp()))
}

/// The summed negative log-likelihood of a batch's next tokens and how many:
/// `logits` (the output of that name, else the first rank-3 one) at position
/// t predicting `input_ids` at t + 1 where the mask has both.
fn next_token_nll(batch: &[NamedInput], outputs: &[(String, Tensor)]) -> Option<(f64, usize)> {
    let (mut nll, mut count) = (0.0f64, 0usize);
    let ids = token_field(batch, TokenInput::Ids)?;
    let mask = token_field(batch, TokenInput::AttentionMask).unwrap_or_else(|| ArrayD::from_elem(ids.shape(), 1));
    let logits = outputs.iter().find(|(n, _)| n == "logits").or_else(|| outputs.iter().find(|(_, t)| t.rank() == 3)).and_then(|(_, t)| as_f32(t))?;
    let (rows, seq) = (ids.shape()[0], ids.shape()[1]);
    if logits.ndim() != 3 || logits.shape()[0] != rows || logits.shape()[1] != seq {
        return None;
    }
    for b in 0..rows {
        for t in 0..seq.saturating_sub(1) {
            if mask[[b, t]] == 0 || mask[[b, t + 1]] == 0 {
                continue;
            }
            let row = logits.index_axis(Axis(0), b);
            let row = row.index_axis(Axis(0), t);
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let log_sum = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
            let target = usize::try_from(ids[[b, t + 1]]).ok().filter(|&i| i < row.len())?;
            nll += log_sum - row[target] as f64;
            count += 1;
        }
    }
    Some((nll, count))
}
