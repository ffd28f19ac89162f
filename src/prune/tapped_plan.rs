//! A model loaded into tract once (a [`Runner`]: one plan per input shape),
//! for every calibration batch.
//!
//! `verify::run` encodes, loads and optimises the model for each call: on
//! MiniLM most of a second per batch, and reconstruction runs the teacher and
//! the student over every batch at each of 24 depths (64 sentences took 610 s
//! that way). tract cannot optimise MiniLM for a symbolic sequence length (its
//! analysis of the ts export's `Flatten` fails), so plans are kept per concrete
//! shape, and text batches are padded to few shapes: the sequence up to a
//! multiple of [`SEQUENCE_STEP`], the batch up to the first batch's size.
//! Padding is masked (`attention_mask` 0), so real tokens compute what they
//! did, and `token_rows` leaves the padded rows out of every sum. The outputs
//! are the taps alone, so tract computes only what they need.

use crate::calibrate::{with_taps, CalibrateError};
use crate::ir::Model;
use crate::verify::{NamedInput, Runner, TokenInput, VerifyError};
use std::cell::Cell;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ndarray::Array2;

/// Text batches are padded to a multiple of this many tokens.
pub const SEQUENCE_STEP: usize = 16;

pub struct TappedPlan {
    /// The tapped model, parsed once; a plan per padded shape.
    runner: Runner,
    inputs: Vec<String>,
    /// Rows of the first text batch: later ones are padded up to it.
    batch_rows: Cell<Option<usize>>,
    label: String,
}

impl TappedPlan {
    /// `model` (runnable in tract: lowered) with `taps` as its only outputs.
    pub fn new(model: &Model, taps: &[&str], label: &str) -> Result<TappedPlan, CalibrateError> {
        let mut tapped = with_taps(model, taps)?;
        let mut outputs = std::mem::take(&mut tapped.graph.outputs);
        outputs.retain(|o| taps.contains(&o.name.as_str()));
        outputs.sort_by_key(|o| taps.iter().position(|t| *t == o.name));
        tapped.graph.outputs = outputs;
        let inputs = tapped.graph.inputs.iter().filter(|i| tapped.graph.initializer(&i.name).is_none()).map(|i| i.name.clone()).collect();
        Ok(TappedPlan { runner: Runner::new(&tapped, label)?, inputs, batch_rows: Cell::new(None), label: label.into() })
    }

    /// The inputs as run (text batches padded) and the taps' values, in the
    /// order given to [`TappedPlan::new`].
    pub fn run(&self, inputs: &[NamedInput]) -> Result<(Vec<NamedInput>, Vec<Tensor>), CalibrateError> {
        let ordered: Vec<NamedInput> = self
            .inputs
            .iter()
            .map(|name| {
                inputs
                    .iter()
                    .find(|i| &i.name == name)
                    .cloned()
                    .ok_or_else(|| VerifyError::UnsupportedInput { input: name.clone(), why: "no value given for it".into() })
            })
            .collect::<Result<_, _>>()?;
        let ordered = match self.padded(&ordered) {
            Some(padded) => padded.map_err(|e| VerifyError::Tract { model: self.label.clone(), stage: "pad a batch for", message: e.to_string() })?,
            None => ordered,
        };
        let outputs = self.runner.run(&ordered)?;
        Ok((ordered, outputs.into_iter().map(|(_, v)| v).collect()))
    }

    /// A text batch (every input a token field `[B, S]`) padded to the
    /// bucketed shape; `None` for other inputs, which run as given.
    fn padded(&self, inputs: &[NamedInput]) -> Option<TractResult<Vec<NamedInput>>> {
        let fields: Vec<TokenInput> = inputs.iter().map(|i| TokenInput::of(&i.name)).collect::<Option<_>>()?;
        let shape = inputs.first()?.value.shape().to_vec();
        if shape.len() != 2 || inputs.iter().any(|i| i.value.shape() != shape.as_slice()) {
            return None;
        }
        let (rows, len) = (shape[0], shape[1]);
        let rows_to = rows.max(*self.batch_rows.get().get_or_insert(rows));
        self.batch_rows.set(Some(rows_to));
        let len_to = len.div_ceil(SEQUENCE_STEP) * SEQUENCE_STEP;
        let pad = |input: &NamedInput, field: &TokenInput| -> TractResult<NamedInput> {
            let values = input.value.cast_to::<i64>()?;
            let values = values.to_plain_array_view::<i64>()?;
            let padded = Array2::from_shape_fn((rows_to, len_to), |(r, c)| match field {
                _ if r < rows && c < len => values[[r, c]],
                TokenInput::Positions => c as i64,
                // masked padding: any id serves, 0 is in every vocabulary
                _ => 0,
            });
            let tensor = padded.into_tensor().cast_to_dt(input.value.datum_type())?.into_owned();
            Ok(NamedInput { name: input.name.clone(), value: tensor })
        };
        Some(inputs.iter().zip(&fields).map(|(i, f)| pad(i, f)).collect())
    }
}
