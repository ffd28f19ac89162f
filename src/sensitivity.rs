//! How much each quantized layer costs the model's output, measured in tract on
//! calibration inputs, and the search that spares the costliest layers until an
//! error budget holds (`quantize --max-error`). "Spared" is whatever the caller
//! makes of it: kept in float32, or given per-token rather than per-tensor
//! activation scales.
//!
//! The error of a model against the original is the mean, over real tokens
//! (padding left out) of the first output, of `1 - cosine` between the two
//! models' vectors on the last axis: for a sentence encoder, how far each
//! token's embedding turned.
//!
//! The search:
//! 1. quantize every layer the cheaper way; if the error is within budget, stop;
//! 2. spare every layer; if even that is over budget, stop (the caller spares
//!    more another way);
//! 3. measure each layer alone the cheaper way (every other layer spared): its
//!    error, less step 2's, is what that layer contributes;
//! 4. spare layers, costliest first: as many as it takes if the layers'
//!    contributions added up (they nearly do: on MiniLM the 36 layers' errors in
//!    float summed to within 15% of the all-quantized error), then measure the
//!    whole model and spare one more layer at a time until the error is within
//!    budget.
//!
//! Step 3 runs the model once per layer and batch: keep the batches few. Its
//! layers are measured in parallel (rayon), each on its own copy of the model.

use crate::ir::Model;
use crate::passes::{lowered_for_tract, PassError};
use crate::verify::{self, NamedInput, VerifyError};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::HashSet;
use tract_onnx::prelude::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum SensitivityError {
    #[error(transparent)]
    Run(#[from] VerifyError),
    #[error(transparent)]
    Lower(#[from] PassError),
    #[error("quantizing failed: {0}")]
    Quantize(String),
    #[error("the model's first output is not a float tensor tract returned: {0}")]
    Output(String),
    #[error(transparent)]
    Calibrate(#[from] crate::calibrate::CalibrateError),
}

/// One layer's contribution.
#[derive(Clone, Debug, Serialize)]
pub struct LayerError {
    /// Its node name (or first output), as `--exclude` takes it.
    pub layer: String,
    /// The model's error with only this layer done the cheaper way, less the
    /// error with every layer spared.
    pub error: f64,
}

/// What the search measured and chose.
#[derive(Clone, Debug, Serialize)]
pub struct SensitivityReport {
    pub budget: f64,
    /// Every layer done the cheaper way.
    pub error_none_spared: f64,
    /// Every layer spared; measured only when the cheaper way was over budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_all_spared: Option<f64>,
    /// Costliest first; empty when nothing was measured one at a time.
    pub layers: Vec<LayerError>,
    /// The layers spared, in the order they were chosen.
    pub spared: Vec<String>,
    /// The error of the model returned.
    pub error: f64,
}

impl SensitivityReport {
    /// Whether the model returned is within budget.
    pub fn within_budget(&self) -> bool {
        self.error <= self.budget
    }
}

/// The reference outputs the errors are measured against.
pub struct Measurement {
    inputs: Vec<Vec<NamedInput>>,
    reference: Vec<Tensor>,
}

impl Measurement {
    /// Runs `original` on each batch of `inputs` once.
    pub fn new(original: &Model, inputs: Vec<Vec<NamedInput>>) -> Result<Measurement, SensitivityError> {
        let runner = verify::Runner::new(&lowered_for_tract(original)?, "original")?;
        let reference = inputs.iter().map(|batch| first_output(&runner, batch)).collect::<Result<_, _>>()?;
        Ok(Measurement { inputs, reference })
    }

    /// The error of `candidate` (see the module documentation).
    pub fn error(&self, candidate: &Model) -> Result<f64, SensitivityError> {
        let runner = verify::Runner::new(&lowered_for_tract(candidate)?, "quantized")?;
        let (mut sum, mut rows) = (0.0, 0usize);
        for (batch, want) in self.inputs.iter().zip(&self.reference) {
            let got = first_output(&runner, batch)?;
            let keep = crate::calibrate::token_rows(batch, want);
            let (batch_sum, batch_rows) = row_cosine_distance(want, &got, keep.as_deref())?;
            sum += batch_sum;
            rows += batch_rows;
        }
        Ok(if rows == 0 { 0.0 } else { sum / rows as f64 })
    }
}

/// Runs the search. `quantize(spared)` quantizes the original with the named
/// layers spared; `layers` are the candidates. When sparing every layer is
/// still over budget, returns that model (every layer spared).
pub fn spare_costliest(
    measurement: &Measurement,
    layers: &[String],
    budget: f64,
    quantize: impl Fn(&HashSet<String>) -> Result<Model, SensitivityError> + Sync,
) -> Result<(Model, SensitivityReport), SensitivityError> {
    let mut model = quantize(&HashSet::new())?;
    let error_none_spared = measurement.error(&model)?;
    let mut report = SensitivityReport { budget, error_none_spared, error_all_spared: None, layers: Vec::new(), spared: Vec::new(), error: error_none_spared };
    if error_none_spared <= budget {
        return Ok((model, report));
    }
    let all: HashSet<String> = layers.iter().cloned().collect();
    let all_spared = quantize(&all)?;
    let floor = measurement.error(&all_spared)?;
    report.error_all_spared = Some(floor);
    if floor > budget {
        report.spared = layers.to_vec();
        report.error = floor;
        return Ok((all_spared, report));
    }
    // one model per layer, measured on all batches: independent, so on every core
    report.layers = layers
        .par_iter()
        .map(|layer| {
            let others: HashSet<String> = layers.iter().filter(|l| *l != layer).cloned().collect();
            let error = measurement.error(&quantize(&others)?)? - floor;
            Ok(LayerError { layer: layer.clone(), error })
        })
        .collect::<Result<_, SensitivityError>>()?;
    report.layers.sort_by(|a, b| b.error.total_cmp(&a.error));
    let ranked: Vec<String> = report.layers.iter().map(|l| l.layer.clone()).collect();
    // the shortest prefix that fits the budget if contributions added up
    let mut estimate = error_none_spared;
    let mut first_guess = 0;
    while first_guess < ranked.len() && estimate > budget {
        estimate -= report.layers[first_guess].error;
        first_guess += 1;
    }
    let mut spared: HashSet<String> = ranked[..first_guess].iter().cloned().collect();
    report.spared = ranked[..first_guess].to_vec();
    loop {
        model = quantize(&spared)?;
        report.error = measurement.error(&model)?;
        let Some(next) = ranked.get(report.spared.len()) else { break };
        if report.error <= budget {
            break;
        }
        spared.insert(next.clone());
        report.spared.push(next.clone());
    }
    Ok((model, report))
}

fn first_output(runner: &verify::Runner, inputs: &[NamedInput]) -> Result<Tensor, SensitivityError> {
    let mut outputs = runner.run(inputs)?;
    if outputs.is_empty() {
        return Err(SensitivityError::Output("the model has no output".into()));
    }
    Ok(outputs.swap_remove(0).1)
}

/// Sum over the kept rows of `1 - cosine(want_row, got_row)`, and the row count.
fn row_cosine_distance(want: &Tensor, got: &Tensor, keep: Option<&[bool]>) -> Result<(f64, usize), SensitivityError> {
    let as_f32 = |t: &Tensor| -> Result<Vec<f32>, SensitivityError> {
        let cast = t.cast_to::<f32>().map_err(|e| SensitivityError::Output(e.to_string()))?;
        let view = cast.to_plain_array_view::<f32>().map_err(|e| SensitivityError::Output(e.to_string()))?;
        Ok(view.iter().copied().collect())
    };
    if want.shape() != got.shape() {
        return Err(SensitivityError::Output(format!("shape {:?} against the original's {:?}", got.shape(), want.shape())));
    }
    let width = want.shape().last().copied().unwrap_or(1).max(1);
    let (want, got) = (as_f32(want)?, as_f32(got)?);
    let (mut sum, mut rows) = (0.0, 0);
    for (r, (a, b)) in want.chunks(width).zip(got.chunks(width)).enumerate() {
        if keep.is_some_and(|k| !k.get(r).copied().unwrap_or(true)) {
            continue;
        }
        let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
        for (&x, &y) in a.iter().zip(b) {
            dot += x as f64 * y as f64;
            na += x as f64 * x as f64;
            nb += y as f64 * y as f64;
        }
        let cosine = if na == 0.0 && nb == 0.0 { 1.0 } else { dot / (na.sqrt() * nb.sqrt()).max(f64::MIN_POSITIVE) };
        sum += 1.0 - cosine;
        rows += 1;
    }
    Ok((sum, rows))
}

/// The `--max-error` search of `quantize --mode int8` and `int8-dynamic`, on
/// the first `batches` calibration batches: which layers of `to_quantize`
/// (the original, or its fused or smoothed form) get per-tensor activation
/// scales, and which stay in float; errors are measured against `original`.
pub struct Int8Search<'a> {
    pub original: &'a Model,
    pub to_quantize: &'a Model,
    pub budget: f64,
    pub batches: usize,
    /// Layers the user keeps in float already (`--exclude`): not candidates.
    pub excluded_already: &'a [String],
}

/// What [`Int8Search`] chose, and what it measured on the way.
#[derive(Debug, Serialize)]
pub struct Int8Choice {
    /// Layers to keep in float beyond `--exclude`.
    #[serde(skip)]
    pub in_float: HashSet<String>,
    /// Layers whose activations take one scale per tensor, whatever
    /// `--activations` says.
    #[serde(skip)]
    pub per_tensor: HashSet<String>,
    /// Layers searched over.
    pub candidates: usize,
    /// Activations searched over for their scale (each read by one or more layers).
    pub activations: usize,
    /// Which activations need per-token scales (the rest take per-tensor); each
    /// is named by the layers that read it, "a + b".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activation_scales: Option<SensitivityReport>,
    /// Which layers stay in float (every other one per token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub float: Option<SensitivityReport>,
}

/// `quantize(in_float, per_tensor)`: the model quantized with `in_float`
/// layers kept in float and `per_tensor` layers' activations per tensor.
pub type QuantizeLayers<'q> = dyn Fn(&HashSet<String>, &HashSet<String>) -> Result<Model, PassError> + Sync + 'q;

impl Int8Search<'_> {
    /// With `choose_scales` (`--mode int8`), first the cheapest activation
    /// scales that fit the budget: per tensor (ORT's one-kernel
    /// DynamicQuantizeMatMul) where it costs little, per token where it does
    /// not. Only if every layer per token is still over budget, the costliest
    /// layers stay in float.
    pub fn run(
        &self,
        source: &crate::calibrate::CalibrationSource,
        choose_scales: bool,
        quantize: &QuantizeLayers<'_>,
    ) -> Result<Int8Choice, SensitivityError> {
        use crate::passes::quantize_dynamic::{layers_by_activation, quantizable_layers};
        let inputs: Vec<_> = source.batches(self.original)?.take(self.batches.max(1)).collect::<Result<_, _>>()?;
        let measurement = Measurement::new(self.original, inputs)?;
        let layers: Vec<String> = quantizable_layers(self.to_quantize).into_iter().filter(|l| !self.excluded_already.contains(l)).collect();
        let failed = |e: PassError| SensitivityError::Quantize(e.to_string());
        let none = HashSet::new();
        let mut choice =
            Int8Choice { in_float: HashSet::new(), per_tensor: HashSet::new(), candidates: layers.len(), activations: 0, activation_scales: None, float: None };
        if choose_scales {
            // the search's units: the layers reading one activation (Q, K and V
            // share one quantization of it, so one scale), named "a + b + c"
            let groups: Vec<Vec<String>> = layers_by_activation(self.to_quantize)
                .into_iter()
                .map(|group| group.into_iter().filter(|l| !self.excluded_already.contains(l)).collect::<Vec<_>>())
                .filter(|group| !group.is_empty())
                .collect();
            let units: Vec<String> = groups.iter().map(|group| group.join(" + ")).collect();
            choice.activations = units.len();
            let per_tensor_layers = |per_token_units: &HashSet<String>| -> HashSet<String> {
                units.iter().zip(&groups).filter(|(unit, _)| !per_token_units.contains(*unit)).flat_map(|(_, group)| group.iter().cloned()).collect()
            };
            let (_, scales) = spare_costliest(&measurement, &units, self.budget, |per_token| quantize(&none, &per_tensor_layers(per_token)).map_err(failed))?;
            let within = scales.within_budget();
            if within {
                choice.per_tensor = per_tensor_layers(&scales.spared.iter().cloned().collect());
            }
            choice.activation_scales = Some(scales);
            if within {
                return Ok(choice);
            }
        }
        let (_, float) = spare_costliest(&measurement, &layers, self.budget, |in_float| quantize(in_float, &none).map_err(failed))?;
        choice.in_float = float.spared.iter().cloned().collect();
        choice.float = Some(float);
        Ok(choice)
    }
}
