//! Calibration: run a model on representative inputs and gather, for chosen
//! intermediate tensors, the statistics a quantizer picks ranges from.
//!
//! 1. [`CalibrationSource`] turns a text file (through a `tokenizer.json`) or an
//!    `.npz` file into batches of named inputs.
//! 2. [`with_taps`] copies the model with the tensors to observe ("taps") added
//!    to its graph outputs, so that [`crate::verify::run`] returns them: tract
//!    computes only what outputs need, and an output is the one way to read an
//!    intermediate tensor back.
//! 3. [`Stats`] folds every batch of a tapped tensor into bounded-size
//!    statistics (min/max, per-channel min/max/mean |x|, a histogram for
//!    percentiles); no activation is kept.
//!
//! [`calibrate`] does all three. Activations at padding positions are observed
//! like any other (the model computes them); sort sentences by length or use
//! small batches to keep their weight down.

mod entropy;
mod gram;
mod source;
mod stats;
mod taps;

pub use entropy::{entropy_threshold, LEVELS as ENTROPY_LEVELS};
pub use gram::Gram;
pub use source::{Batches, CalibrationSource, DEFAULT_BATCH, DEFAULT_MAX_LEN};
pub use stats::{ChannelStats, Histogram, Stats, HISTOGRAM_BINS};
pub use taps::with_taps;

use crate::ir::Model;
use crate::verify::{self, NamedInput, VerifyError};
use std::path::PathBuf;
use tract_onnx::prelude::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    #[error("{}: {why}", path.display())]
    Source { path: PathBuf, why: String },
    #[error("model input '{input}' cannot be filled from {source_kind}: {why}")]
    UnfillableInput { input: String, source_kind: &'static str, why: String },
    #[error("cannot tap '{tensor}': {why}")]
    Tap { tensor: String, why: String },
    #[error("tapped tensor '{tensor}': {why}")]
    Observe { tensor: String, why: String },
    #[error("no calibration batches: {0}")]
    Empty(String),
    #[error(transparent)]
    Run(#[from] VerifyError),
    #[error("lowering the model for tract: {0}")]
    Lower(#[from] crate::passes::PassError),
}

/// Runs `model` on every batch of `source` and returns the statistics of each
/// tensor in `taps`, in the order given.
pub fn calibrate(model: &Model, taps: &[&str], source: &CalibrationSource) -> Result<Vec<Stats>, CalibrateError> {
    let mut stats: Vec<Stats> = taps.iter().map(|t| Stats::new(t)).collect();
    for_each_batch(model, taps, source, |batch| {
        for (s, value) in stats.iter_mut().zip(&batch.taps) {
            s.observe(value)?;
        }
        Ok(())
    })?;
    Ok(stats)
}

/// The activations that quantization and pruning change the reading of: the
/// first input of every MatMul or Gemm whose weight is an initializer, each
/// once, in graph order.
pub fn matmul_activations(model: &Model) -> Vec<String> {
    let graph = &model.graph;
    let mut seen = std::collections::HashSet::new();
    graph
        .nodes()
        .filter(|n| n.is_onnx("MatMul") || n.is_onnx("Gemm"))
        .filter(|n| n.inputs.get(1).is_some_and(|w| graph.initializer(w).is_some()))
        .filter_map(|n| n.inputs.first().cloned())
        .filter(|t| graph.initializer(t).is_none() && seen.insert(t.clone()))
        .collect()
}

/// [`Gram`] matrices (`X^T X`) of each tensor in `taps`, over the rows of real
/// tokens (padding left out when the inputs have an `attention_mask`).
pub fn gram_matrices(model: &Model, taps: &[&str], source: &CalibrationSource) -> Result<Vec<Gram>, CalibrateError> {
    let mut grams: Vec<Gram> = taps.iter().map(|t| Gram::new(t)).collect();
    for_each_batch(model, taps, source, |batch| {
        for (gram, value) in grams.iter_mut().zip(&batch.taps) {
            gram.observe(value, batch.token_rows(value).as_deref())?;
        }
        Ok(())
    })?;
    Ok(grams)
}

/// One calibration batch after the model ran on it.
pub struct ObservedBatch<'a> {
    /// The inputs the model was given.
    pub inputs: &'a [NamedInput],
    /// The tapped tensors, in the order of `taps`.
    pub taps: Vec<Tensor>,
    /// The model's own outputs, in graph order.
    pub outputs: Vec<Tensor>,
}

impl ObservedBatch<'_> {
    /// For a tensor whose leading axes are the `attention_mask`'s `[batch,
    /// sequence]`, which of its rows (everything but the last axis, row-major)
    /// are real tokens. `None` without a mask or when the shapes do not line up
    /// (every row then counts).
    pub fn token_rows(&self, value: &Tensor) -> Option<Vec<bool>> {
        token_rows(self.inputs, value)
    }
}

/// Which rows of `value` (`[batch, sequence, features]`) are real tokens, from
/// the `attention_mask` among `inputs`; `None` without one or when the shapes
/// do not line up.
pub fn token_rows(inputs: &[NamedInput], value: &Tensor) -> Option<Vec<bool>> {
    let mask = inputs.iter().find(|i| i.name == "attention_mask")?;
    let mask = mask.value.cast_to::<i64>().ok()?;
    let mask = mask.to_plain_array_view::<i64>().ok()?;
    let shape = value.shape();
    if shape.len() != 3 || mask.shape() != &shape[..2] {
        return None;
    }
    Some(mask.iter().map(|&m| m != 0).collect())
}

/// Runs `model` on every batch of `source` with `taps` exposed and hands each
/// batch to `visit`; returns how many batches there were (at least one). Each
/// batch is a separate `verify::run`, which optimises the model for that
/// batch's concrete shape: fine for a few hundred sentences, not for a large
/// data set.
pub fn for_each_batch(
    model: &Model,
    taps: &[&str],
    source: &CalibrationSource,
    mut visit: impl FnMut(ObservedBatch) -> Result<(), CalibrateError>,
) -> Result<usize, CalibrateError> {
    // fused and quantized models hold contrib ops tract runs only lowered
    let tapped = verify::Runner::new(&with_taps(&crate::passes::lowered_for_tract(model)?, taps)?, "calibration")?;
    let own_outputs = model.graph.outputs.len();
    let mut batches = 0;
    for inputs in source.batches(model)? {
        let inputs = inputs?;
        let mut outputs: Vec<(String, Tensor)> = tapped.run(&inputs)?;
        let mut tapped_values = Vec::with_capacity(taps.len());
        for tap in taps {
            let value = outputs.iter().find(|(name, _)| name == tap).map(|(_, v)| v.clone());
            tapped_values.push(value.ok_or_else(|| CalibrateError::Tap { tensor: tap.to_string(), why: "tract did not return it".into() })?);
        }
        outputs.truncate(own_outputs);
        visit(ObservedBatch { inputs: &inputs, taps: tapped_values, outputs: outputs.into_iter().map(|(_, v)| v).collect() })?;
        batches += 1;
    }
    if batches == 0 {
        return Err(CalibrateError::Empty("the source holds no samples".into()));
    }
    Ok(batches)
}
