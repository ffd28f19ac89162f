//! Inputs for decoders with a KV cache, consistent with the cache, over a short
//! generation: a prefill step with an empty past (length P = 0, S new tokens),
//! then decode steps of one token each that feed the reference's `present.*`
//! outputs back as `past_key_values.*`. At each step:
//! - `input_ids` are `[batch, S]` random tokens below the vocabulary;
//! - `attention_mask` has P + S columns (when its dim is the total length):
//!   ones, with the second half of the batch left-padded, as batched
//!   generation pads;
//! - `position_ids` are the mask's running count minus one (HF's
//!   `cumsum(mask) - 1`, 0 on padding) for the last S columns;
//!   `cache_position` is P..P+S;
//! - Optimum's merged decoders get `use_cache_branch` = P > 0;
//! - cross-attention caches (`past_key_values.N.encoder.key`, Whisper, T5,
//!   BART) keep the encoder's length at every step; `encoder_hidden_states`
//!   is random, of that length.
//!
//! Every candidate runs on the reference's inputs of each step, so each step is
//! compared on its own, not on a cache the candidate computed. The outputs at
//! padding positions (a padding token's logits and cache rows) are not
//! compared: every later step masks them out, and a padding token's query,
//! which sees no key, is whatever the masked softmax makes of it (exporters
//! and fused kernels differ there).

use super::inputs::random_inputs_with;
use super::{DimSizes, ModelRunner, NamedInput, PaddedPositions, Step, TokenInput, VerifyError};
use crate::ir::{DataType, Dim, Model};
use std::collections::HashMap;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ndarray::{ArrayD, IxDyn};

/// Decode steps after the prefill.
const DECODE_STEPS: usize = 2;

/// One cache input and the output that carries it to the next step.
#[derive(Clone, Debug)]
struct CacheInput {
    input: String,
    present: Option<String>,
    /// The axis that grows with the generation (the past length).
    length_axis: usize,
    /// A cross-attention cache (its length is the encoder's, fixed).
    cross: bool,
}

/// How a decoder's KV cache appears among its graph inputs and outputs.
#[derive(Clone, Debug)]
pub struct CacheLayout {
    caches: Vec<CacheInput>,
    /// The symbols of the batch, the new tokens' and the past's lengths.
    batch: Option<String>,
    sequence: Option<String>,
    past: Option<String>,
    /// The attention mask's length when the export gave it a symbol of its
    /// own (dynamo: `s3`, not `past + sequence`): P + S.
    total: Option<String>,
}

fn symbol(d: &Dim) -> Option<&str> {
    match d {
        Dim::Symbol(s) => Some(s),
        _ => None,
    }
}

/// The output that carries a past input to the next step: `past_key_values.0.key`
/// -> `present.0.key` (Optimum, GenAI) or `present_key_values.0.key`; `past_key.0`
/// -> `present_key.0`; `past.0` -> `present.0`.
fn present_for(past: &str, outputs: &[&str]) -> Option<String> {
    let candidates =
        [past.replacen("past_key_values", "present", 1), past.replacen("past_key_values", "present_key_values", 1), past.replacen("past", "present", 1)];
    candidates.into_iter().find(|c| c != past && outputs.contains(&c.as_str()))
}

impl CacheLayout {
    /// The layout, when the model takes a KV cache: float inputs of rank 3 or
    /// more whose name says `past`.
    pub fn detect(model: &Model) -> Option<CacheLayout> {
        let g = &model.graph;
        let free: Vec<_> = g.inputs.iter().filter(|i| g.initializer(&i.name).is_none()).collect();
        let ids = free.iter().find(|i| TokenInput::of(&i.name) == Some(TokenInput::Ids) || i.name == "input_ids")?;
        let id_dims = ids.tensor_type()?.shape.as_ref()?;
        let batch = id_dims.first().and_then(symbol).map(str::to_string);
        let sequence = id_dims.get(1).and_then(symbol).map(str::to_string);
        let outputs: Vec<&str> = g.outputs.iter().map(|o| o.name.as_str()).collect();
        let mut caches = Vec::new();
        let mut past = None;
        for input in &free {
            let lower = input.name.to_lowercase();
            let Some(ty) = input.tensor_type() else { continue };
            let Some(dims) = ty.shape.as_ref() else { continue };
            let float = matches!(ty.elem_type, Some(DataType::Float | DataType::Float16 | DataType::Bfloat16));
            if !lower.contains("past") || !float || dims.len() < 3 {
                continue;
            }
            // the growing axis: the first open one that is not the batch's
            let length_axis = dims
                .iter()
                .enumerate()
                .skip(1)
                .find(|(_, d)| !matches!(d, Dim::Fixed(_)) && symbol(d) != batch.as_deref())
                .map(|(axis, _)| axis)
                .unwrap_or(dims.len() - 2);
            let cross = lower.contains("encoder") || lower.contains("cross");
            if !cross && past.is_none() {
                past = dims.get(length_axis).and_then(symbol).map(str::to_string);
            }
            caches.push(CacheInput { input: input.name.clone(), present: present_for(&input.name, &outputs), length_axis, cross });
        }
        if caches.is_empty() {
            return None;
        }
        let mask = free.iter().find(|i| TokenInput::of(&i.name) == Some(TokenInput::AttentionMask) && !i.name.to_lowercase().contains("encoder"));
        let total = mask
            .and_then(|m| m.tensor_type()?.shape.as_ref()?.get(1).and_then(symbol).map(str::to_string))
            .filter(|s| !s.contains('+') && Some(s) != sequence.as_ref() && Some(s) != past.as_ref());
        Some(CacheLayout { caches, batch, sequence, past, total })
    }

    /// Runs the reference over a prefill and decode steps, each step's inputs
    /// made from the previous step's outputs.
    pub fn generate(&self, model: &Model, runner: &ModelRunner, seed: u64, sizes: DimSizes) -> Result<Vec<Step>, VerifyError> {
        let mut steps: Vec<Step> = Vec::new();
        let mut past = 0usize;
        let mut new = sizes.sequence.max(2);
        for index in 0..=DECODE_STEPS {
            let previous = steps.last();
            let inputs = self.step_inputs(model, seed, index, sizes, past, new, previous)?;
            let outputs = runner.run(&inputs)?;
            let label = if index == 0 { format!("prefill, {new} tokens") } else { format!("decode {index}, past {past}") };
            let padded = self.padded_positions(&outputs, padding_of(sizes, past + new, seed), past + new, new);
            let cache_outputs = self.caches.iter().filter_map(|c| c.present.clone()).collect();
            steps.push(Step { label: Some(label), inputs, outputs, padded, cache_outputs });
            past += new;
            new = 1;
        }
        Ok(steps)
    }

    /// Where the padding tokens sit in a step's outputs: along the length axis
    /// of each self-attention cache, and along axis 1 of outputs with one row
    /// per new token (logits, hidden states).
    fn padded_positions(&self, outputs: &[(String, Tensor)], padding: Vec<usize>, total: usize, new: usize) -> Vec<PaddedPositions> {
        if padding.iter().all(|&p| p == 0) {
            return Vec::new();
        }
        let mut padded = Vec::new();
        for (name, value) in outputs {
            let shape = value.shape();
            if shape.len() < 2 || shape[0] != padding.len() {
                continue;
            }
            let cache = self.caches.iter().find(|c| c.present.as_ref() == Some(name));
            let (axis, offset) = match cache {
                Some(c) if c.cross => continue,
                Some(c) => (c.length_axis, 0),
                None => (1, total - new),
            };
            let covered = if cache.is_some() { total } else { new };
            if shape.get(axis) == Some(&covered) {
                padded.push(PaddedPositions { output: name.clone(), axis, offset, padding: padding.clone() });
            }
        }
        padded
    }

    /// The inputs of step `index` (new tokens drawn from `seed + index`; the
    /// padding from `seed`, so that it stays put over the generation).
    #[allow(clippy::too_many_arguments)]
    fn step_inputs(
        &self,
        model: &Model,
        seed: u64,
        index: usize,
        sizes: DimSizes,
        past: usize,
        new: usize,
        previous: Option<&Step>,
    ) -> Result<Vec<NamedInput>, VerifyError> {
        let mut symbols = HashMap::new();
        for (name, size) in [(&self.batch, sizes.batch), (&self.sequence, new), (&self.past, past), (&self.total, past + new)] {
            if let Some(name) = name {
                symbols.insert(name.clone(), size);
            }
        }
        let mut inputs = random_inputs_with(model, seed.wrapping_add(index as u64), sizes, symbols)?;
        let total = past + new;
        let padding = padding_of(sizes, total, seed);
        let mut mask: Option<Vec<i64>> = None;
        for input in inputs.iter_mut() {
            let bad = |e: String| VerifyError::UnsupportedInput { input: input.name.clone(), why: e };
            if let Some(cache) = self.caches.iter().find(|c| c.input == input.name) {
                let carried = previous.zip(cache.present.as_ref()).and_then(|(step, present)| step.outputs.iter().find(|(n, _)| n == present));
                match carried {
                    Some((_, value)) => input.value = value.clone(),
                    None if !cache.cross => {
                        let mut shape = input.value.shape().to_vec();
                        shape[cache.length_axis] = past;
                        input.value = resized(&input.value, &shape).map_err(bad)?;
                    }
                    None => {}
                }
                continue;
            }
            let shape = input.value.shape().to_vec();
            match TokenInput::of(&input.name) {
                Some(TokenInput::AttentionMask) if !input.name.to_lowercase().contains("encoder") && shape.len() == 2 => {
                    let columns = shape[1];
                    let values: Vec<i64> = (0..shape[0])
                        .flat_map(|row| {
                            let pad = padding.get(row).copied().unwrap_or(0).min(columns.saturating_sub(1));
                            (0..columns).map(move |c| i64::from(c >= pad))
                        })
                        .collect();
                    mask = Some(values.clone());
                    input.value = integer_tensor(&shape, values, input.value.datum_type()).map_err(bad)?;
                }
                _ => {}
            }
        }
        for input in inputs.iter_mut() {
            let bad = |e: String| VerifyError::UnsupportedInput { input: input.name.clone(), why: e };
            let shape = input.value.shape().to_vec();
            let lower = input.name.to_lowercase();
            if lower.contains("cache_position") {
                let values = (past..total).map(|p| p as i64).take(shape.iter().product()).collect();
                input.value = integer_tensor(&shape, values, input.value.datum_type()).map_err(bad)?;
            } else if TokenInput::of(&input.name) == Some(TokenInput::Positions) && shape.len() == 2 {
                let values = positions(&shape, mask.as_deref(), past, total);
                input.value = integer_tensor(&shape, values, input.value.datum_type()).map_err(bad)?;
            } else if lower.contains("use_cache_branch") {
                input.value = ArrayD::from_elem(IxDyn(&shape), past > 0).into_tensor();
            }
        }
        Ok(inputs)
    }
}

/// Left padding per batch row: none in the first half, 1 to prefill/2
/// positions in the second.
fn padding_of(sizes: DimSizes, total: usize, seed: u64) -> Vec<usize> {
    let mut rng = super::SeededRng::new(seed);
    let first = sizes.sequence.max(2);
    (0..sizes.batch)
        .map(|row| if row < sizes.batch / 2 || sizes.batch < 2 { 0 } else { rng.below(1, (first as i64 / 2).max(1) + 1) as usize })
        .map(|p| p.min(total.saturating_sub(1)))
        .collect()
}

/// Position ids for the last `shape[1]` of `total` columns: the mask's running
/// count minus one (0 on padding), or past..total without a full-length mask.
fn positions(shape: &[usize], mask: Option<&[i64]>, past: usize, total: usize) -> Vec<i64> {
    let (rows, new) = (shape[0], shape[1]);
    match mask {
        Some(mask) if mask.len() == rows * total => (0..rows)
            .flat_map(|r| {
                let row = &mask[r * total..(r + 1) * total];
                let mut count = 0i64;
                let running: Vec<i64> = row
                    .iter()
                    .map(|&m| {
                        count += m;
                        (count - 1).max(0)
                    })
                    .collect();
                running[total - new..].to_vec()
            })
            .collect(),
        _ => (0..rows).flat_map(|_| (past..total).map(|p| p as i64)).collect(),
    }
}

fn integer_tensor(shape: &[usize], values: Vec<i64>, datum: DatumType) -> Result<Tensor, String> {
    let t = ArrayD::from_shape_vec(IxDyn(shape), values).map_err(|e| e.to_string())?.into_tensor();
    Ok(t.cast_to_dt(datum).map_err(|e| e.to_string())?.into_owned())
}

/// `value` with `shape` (a cache of a new past length; zeros past its own values).
fn resized(value: &Tensor, shape: &[usize]) -> Result<Tensor, String> {
    if value.shape() == shape {
        return Ok(value.clone());
    }
    let count: usize = shape.iter().product();
    let zeros = ArrayD::from_shape_vec(IxDyn(shape), vec![0f32; count]).map_err(|e| e.to_string())?.into_tensor();
    Ok(zeros.cast_to_dt(value.datum_type()).map_err(|e| e.to_string())?.into_owned())
}
