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

mod source;
mod stats;
mod taps;

pub use source::{Batches, CalibrationSource};
pub use stats::{ChannelStats, Histogram, Stats, HISTOGRAM_BINS};
pub use taps::with_taps;

use crate::ir::Model;
use crate::verify::{self, VerifyError};
use std::path::PathBuf;

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
}

/// Runs `model` on every batch of `source` and returns the statistics of each
/// tensor in `taps`, in the order given. Each batch is a separate
/// `verify::run`, which optimises the model for that batch's concrete shape:
/// fine for a few hundred sentences, not for a large data set.
pub fn calibrate(model: &Model, taps: &[&str], source: &CalibrationSource) -> Result<Vec<Stats>, CalibrateError> {
    let tapped = with_taps(model, taps)?;
    let mut stats: Vec<Stats> = taps.iter().map(|t| Stats::new(t)).collect();
    let mut batches = 0;
    for batch in source.batches(model)? {
        let outputs = verify::run(&tapped, "calibration", &batch?)?;
        for s in &mut stats {
            let value = outputs.iter().find(|(name, _)| *name == s.name).map(|(_, v)| v);
            let value = value.ok_or_else(|| CalibrateError::Tap { tensor: s.name.clone(), why: "tract did not return it".into() })?;
            s.observe(value)?;
        }
        batches += 1;
    }
    if batches == 0 {
        return Err(CalibrateError::Empty("the source holds no samples".into()));
    }
    Ok(stats)
}
