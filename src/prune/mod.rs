//! Pruning: removing weights, heads, neurons and layers, each result checked
//! in tract against the model it came from.
//!
//! - [`blocks`]: finds the transformer blocks of a graph (unfused exports and
//!   `optimize --target ort` output);
//! - [`structured`]: attention heads and FFN neurons to a FLOP budget, with
//!   teacher-guided least-squares reconstruction;
//! - [`layers`]: drops whole blocks, the ones that change their input least.

pub mod blocks;
pub mod layers;
pub mod structured;

use crate::ir::{DataType, Model, PatchError};
use crate::passes::dead_code::EliminateDeadCode;
use crate::passes::{run_pipeline, verify_rewrite, CheckError, DriverOptions, Pass, PassError};

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Blocks(#[from] blocks::BlockError),
    #[error("calibration: {0}")]
    Calibrate(#[from] crate::calibrate::CalibrateError),
    #[error("{0}")]
    Option(String),
    #[error("surgery: {0}")]
    Surgery(String),
    #[error("surgery left an invalid graph: {0}")]
    Patch(#[from] PatchError),
    #[error(transparent)]
    Pass(#[from] PassError),
    #[error("checking the pruned model in tract: {0}")]
    Check(#[from] CheckError),
}

/// Drops what the surgery left unread (old weights, dead nodes) and the
/// `value_info` entries, whose recorded widths no longer hold.
fn finish(model: &mut Model) -> Result<(), PruneError> {
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(EliminateDeadCode)];
    run_pipeline(model, &passes, &DriverOptions { validate: true, ..DriverOptions::default() })?;
    model.graph.value_info.clear();
    Ok(())
}

/// The smallest cosine between the outputs of `original` and `pruned` in tract
/// on seeded random inputs (pruning changes values: only the shapes must agree).
fn tract_min_cosine(original: &Model, pruned: &Model) -> Result<f64, PruneError> {
    let options = crate::verify::VerifyOptions { atol: f32::MAX, rtol: 0.0, ..Default::default() };
    Ok(verify_rewrite(original, pruned, &options)?.min_cosine())
}

/// The copy calibration runs: contrib ops lowered (tract runs no com.microsoft
/// op faithfully; the lowerings keep every tensor name the taps use) and no
/// graph outputs, so that tract stops at the last tapped tensor.
fn calibration_copy(model: &Model) -> Result<Model, PruneError> {
    let mut m = crate::passes::lowered_for_tract(model)?;
    m.graph.outputs.clear();
    Ok(m)
}

/// Elements of the model's floating-point initializers.
pub fn float_parameters(model: &Model) -> u64 {
    model
        .graph
        .initializers
        .iter()
        .filter(|t| matches!(t.dtype, DataType::Float | DataType::Float16 | DataType::Bfloat16 | DataType::Double))
        .map(|t| t.element_count())
        .sum()
}
