//! Where calibration inputs come from: sentences through a tokenizer, or arrays
//! from an `.npz` file, yielded batch by batch as the model's named inputs.

use super::CalibrateError;
use crate::ir::{DataType, Model, ValueInfo};
use crate::verify::{read_npz, NamedInput, TokenInput};
use std::path::{Path, PathBuf};
use tokenizers::{Tokenizer, TruncationParams};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ndarray::Array2;

/// Tokens per sentence at most (special tokens included), unless asked otherwise.
pub const DEFAULT_MAX_LEN: usize = 128;
/// Sentences (or npz rows) per batch, unless asked otherwise.
pub const DEFAULT_BATCH: usize = 8;

#[derive(Clone, Debug)]
pub enum CalibrationSource {
    /// One sentence per non-blank line of `file`, tokenized with `tokenizer` (a
    /// `tokenizer.json`), truncated to `max_len` tokens (special tokens included).
    /// Each batch of `batch` sentences is right-padded to its longest one; the
    /// model's inputs are filled by name: `input_ids`, `attention_mask` (1 for
    /// tokens, 0 for padding), `token_type_ids` (zeros) and `position_ids`
    /// (0, 1, ...).
    Text { file: PathBuf, tokenizer: PathBuf, max_len: usize, batch: usize },
    /// Arrays named after the model's inputs, sharing a first (batch) axis, cut
    /// into batches of `batch` rows.
    Npz { path: PathBuf, batch: usize },
    /// Batches already made (a part of another source's, as `auto` holds some
    /// back to measure on): yielded as they are.
    Batches(std::sync::Arc<Vec<Vec<NamedInput>>>),
}

/// Batches of named inputs; an error ends the calibration.
pub struct Batches(Box<dyn Iterator<Item = Result<Vec<NamedInput>, CalibrateError>>>);

impl Iterator for Batches {
    type Item = Result<Vec<NamedInput>, CalibrateError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next()
    }
}

impl CalibrationSource {
    /// The batches for `model`, after checking that every one of its inputs can
    /// be filled.
    pub fn batches(&self, model: &Model) -> Result<Batches, CalibrateError> {
        let inputs: Vec<&ValueInfo> = model.graph.inputs.iter().filter(|i| model.graph.initializer(&i.name).is_none()).collect();
        match self {
            CalibrationSource::Text { file, tokenizer, max_len, batch } => text_batches(&inputs, file, tokenizer, *max_len, *batch),
            CalibrationSource::Npz { path, batch } => npz_batches(&inputs, path, *batch),
            CalibrationSource::Batches(batches) => {
                if let Some(missing) = inputs.iter().find(|i| batches.first().is_some_and(|b| !b.iter().any(|n| n.name == i.name))) {
                    let why = "the batches hold no value for it".into();
                    return Err(CalibrateError::UnfillableInput { input: missing.name.clone(), source_kind: "the given batches", why });
                }
                let batches = batches.clone();
                Ok(Batches(Box::new((0..batches.len()).map(move |i| Ok(batches[i].clone())))))
            }
        }
    }

    /// Every batch of this source for `model`, in memory.
    pub fn collect(&self, model: &Model) -> Result<Vec<Vec<NamedInput>>, CalibrateError> {
        self.batches(model)?.collect()
    }
}

fn source_error(path: &Path, why: impl ToString) -> CalibrateError {
    CalibrateError::Source { path: path.to_path_buf(), why: why.to_string() }
}

/// What a text batch gives a model input.
enum TextField {
    /// Token ids, mask, types or positions, in this integer type.
    Token(TokenInput, DatumType),
    /// A decoder's KV cache (`past*`, float, rank 3 or more), empty: its fixed
    /// dims kept (`Some`), the batch first, the open ones (the past length) 0.
    EmptyCache { dims: Vec<Option<usize>>, dtype: DatumType },
    /// Optimum's merged decoders: `use_cache_branch` false (no past yet).
    CacheBranch,
}

/// The field a model input takes, from its name, and its type.
fn text_field(input: &ValueInfo) -> Result<TextField, CalibrateError> {
    let unfillable = |why: &str| CalibrateError::UnfillableInput { input: input.name.clone(), source_kind: "text", why: why.into() };
    let ty = input.tensor_type();
    let elem = ty.and_then(|t| t.elem_type);
    let lower = input.name.to_lowercase();
    if lower.contains("use_cache_branch") && elem == Some(DataType::Bool) {
        return Ok(TextField::CacheBranch);
    }
    let dims = ty.and_then(|t| t.shape.as_ref());
    if lower.contains("past") && dims.is_some_and(|d| d.len() >= 3) {
        let dtype = match elem {
            Some(DataType::Float) => f32::datum_type(),
            Some(DataType::Float16) => half::f16::datum_type(),
            other => return Err(unfillable(&format!("a KV cache of {other:?} is not supported (float32 or float16)"))),
        };
        let dims = dims.into_iter().flatten().map(|d| d.fixed().and_then(|v| usize::try_from(v).ok())).collect();
        return Ok(TextField::EmptyCache { dims, dtype });
    }
    let field = match TokenInput::of(&input.name) {
        Some(field) => field,
        None => return Err(unfillable("a text source fills only input_ids, attention_mask, token_type_ids, position_ids and a decoder's KV cache (empty)")),
    };
    match elem {
        Some(DataType::Int64) => Ok(TextField::Token(field, i64::datum_type())),
        Some(DataType::Int32) => Ok(TextField::Token(field, i32::datum_type())),
        other => Err(unfillable(&format!("expected int64 or int32, the model declares {other:?}"))),
    }
}

fn text_batches(inputs: &[&ValueInfo], file: &Path, tokenizer_file: &Path, max_len: usize, batch: usize) -> Result<Batches, CalibrateError> {
    if batch == 0 || max_len == 0 {
        return Err(source_error(file, "batch and max_len must be at least 1"));
    }
    let fields: Vec<(String, TextField)> = inputs.iter().map(|i| text_field(i).map(|field| (i.name.clone(), field))).collect::<Result<_, _>>()?;
    let mut tokenizer = Tokenizer::from_file(tokenizer_file).map_err(|e| source_error(tokenizer_file, e))?;
    // tokenizer.json files often pad every sentence to a fixed length; batches
    // here pad to their longest sentence instead, with the same pad id.
    let pad_id = tokenizer.get_padding().map(|p| p.pad_id).or_else(|| tokenizer.token_to_id("[PAD]")).unwrap_or(0);
    tokenizer.with_padding(None);
    tokenizer.with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() })).map_err(|e| source_error(tokenizer_file, e))?;
    let text = std::fs::read_to_string(file).map_err(|e| source_error(file, e))?;
    let lines: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    let file = file.to_path_buf();
    let chunks: Vec<Vec<String>> = lines.chunks(batch).map(<[String]>::to_vec).collect();
    let batches = chunks.into_iter().map(move |sentences| {
        let mut ids = Vec::with_capacity(sentences.len());
        for sentence in &sentences {
            let encoding = tokenizer.encode(sentence.as_str(), true).map_err(|e| source_error(&file, e))?;
            ids.push(encoding.get_ids().to_vec());
        }
        padded_batch(&ids, pad_id, &fields).map_err(|e| source_error(&file, e))
    });
    Ok(Batches(Box::new(batches)))
}

/// The named inputs for token ids of one batch, right-padded to the longest
/// (a decoder's KV cache empty: the batch is its prompt).
fn padded_batch(ids: &[Vec<u32>], pad_id: u32, fields: &[(String, TextField)]) -> TractResult<Vec<NamedInput>> {
    let len = ids.iter().map(Vec::len).max().unwrap_or(0);
    let table = |value: &dyn Fn(&[u32], usize) -> i64| -> Vec<i64> { ids.iter().flat_map(|row| (0..len).map(move |c| value(row, c))).collect() };
    fields
        .iter()
        .map(|(name, field)| {
            let (field, dtype) = match field {
                TextField::Token(field, dtype) => (field, dtype),
                TextField::EmptyCache { dims, dtype } => {
                    let shape: Vec<usize> = std::iter::once(ids.len()).chain(dims.iter().skip(1).map(|d| d.unwrap_or(0))).collect();
                    let zeros = tract_onnx::tract_core::ndarray::ArrayD::<f32>::zeros(shape).into_tensor();
                    return Ok(NamedInput { name: name.clone(), value: zeros.cast_to_dt(*dtype)?.into_owned() });
                }
                TextField::CacheBranch => {
                    return Ok(NamedInput { name: name.clone(), value: tract_onnx::prelude::Tensor::from(false) });
                }
            };
            let values = match field {
                TokenInput::Ids => table(&|row, c| row.get(c).copied().unwrap_or(pad_id) as i64),
                TokenInput::AttentionMask => table(&|row, c| (c < row.len()) as i64),
                TokenInput::TokenTypes => vec![0; ids.len() * len],
                TokenInput::Positions => table(&|_, c| c as i64),
            };
            let tensor = Array2::from_shape_vec((ids.len(), len), values)?.into_tensor();
            let value = tensor.cast_to_dt(*dtype)?.into_owned();
            Ok(NamedInput { name: name.clone(), value })
        })
        .collect()
}

fn npz_batches(inputs: &[&ValueInfo], path: &Path, batch: usize) -> Result<Batches, CalibrateError> {
    if batch == 0 {
        return Err(source_error(path, "batch must be at least 1"));
    }
    let mut arrays = read_npz(path)?;
    let mut columns = Vec::new();
    for input in inputs {
        let unfillable = |why: &str| CalibrateError::UnfillableInput { input: input.name.clone(), source_kind: "an .npz file", why: why.into() };
        let at = arrays.iter().position(|a| a.name == input.name).ok_or_else(|| unfillable("no array of that name"))?;
        let array = arrays.swap_remove(at);
        if array.value.rank() == 0 {
            return Err(unfillable("the array is a scalar, with no batch axis"));
        }
        columns.push(array);
    }
    let rows = columns.first().map_or(0, |c| c.value.shape()[0]);
    if let Some(other) = columns.iter().find(|c| c.value.shape()[0] != rows) {
        return Err(source_error(
            path,
            format!("arrays disagree on the batch axis: {} rows in '{}', {rows} in '{}'", other.value.shape()[0], other.name, columns[0].name),
        ));
    }
    let path = path.to_path_buf();
    let batches = (0..rows).step_by(batch).map(move |start| {
        let end = (start + batch).min(rows);
        columns.iter().map(|c| Ok(NamedInput { name: c.name.clone(), value: c.value.slice(0, start, end).map_err(|e| source_error(&path, e))? })).collect()
    });
    Ok(Batches(Box::new(batches)))
}
