//! Inputs to run a model on: seeded random values that are valid for what each
//! input means (token ids below the vocabulary size, attention masks of ones
//! with some padding), or arrays read from an `.npz` file.

use super::VerifyError;
use crate::ir::{DataType, Dim, Model};
use std::collections::HashMap;
use std::path::Path;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ndarray::{ArrayD, IxDyn};

/// A named input tensor.
#[derive(Clone, Debug)]
pub struct NamedInput {
    pub name: String,
    pub value: Tensor,
}

/// Concrete sizes for the dims a model leaves open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DimSizes {
    /// For an open first dim.
    pub batch: usize,
    /// For every other open dim (sequence lengths).
    pub sequence: usize,
}

impl Default for DimSizes {
    fn default() -> Self {
        DimSizes { batch: 2, sequence: 16 }
    }
}

/// A small deterministic generator (SplitMix64): the same seed gives the same
/// inputs on every machine, without a dependency for it.
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> SeededRng {
        SeededRng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in [low, high).
    pub fn below(&mut self, low: i64, high: i64) -> i64 {
        let span = (high - low).max(1) as u64;
        low + (self.next_u64() % span) as i64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// The size of the table an integer input indexes, when it feeds a Gather's
/// indices (an embedding lookup): token ids must stay below it.
fn embedding_rows(model: &Model, input: &str) -> Option<i64> {
    let g = &model.graph;
    g.uses(input).iter().find_map(|u| {
        let node = g.node(u.node)?;
        if node.op_type != "Gather" || node.inputs.get(1).map(String::as_str) != Some(input) {
            return None;
        }
        let table = g.initializer(node.inputs.first()?)?;
        let axis = node.attr_int("axis").unwrap_or(0);
        let axis = if axis < 0 { axis + table.dims.len() as i64 } else { axis };
        table.dims.get(usize::try_from(axis).ok()?).copied()
    })
}

/// Seeded random inputs for every graph input that is not also an initializer.
pub fn random_inputs(model: &Model, seed: u64, sizes: DimSizes) -> Result<Vec<NamedInput>, VerifyError> {
    random_inputs_with(model, seed, sizes, HashMap::new())
}

/// The size of a symbolic dim: a symbol given or met before, or a sum of them
/// and integers as exporters write it (`past_sequence_length + sequence_length`,
/// `past_sequence_length + 1`).
fn symbol_size(symbol: &str, symbols: &HashMap<String, usize>) -> Option<usize> {
    if let Some(&size) = symbols.get(symbol) {
        return Some(size);
    }
    if !symbol.contains('+') {
        return None;
    }
    symbol.split('+').map(str::trim).map(|term| term.parse::<usize>().ok().or_else(|| symbols.get(term).copied())).sum()
}

/// [`random_inputs`] with some symbolic dims' sizes given (a decoder's past and
/// new lengths); other open dims are `sizes.batch` first, `sizes.sequence` elsewhere.
pub fn random_inputs_with(model: &Model, seed: u64, sizes: DimSizes, mut symbols: HashMap<String, usize>) -> Result<Vec<NamedInput>, VerifyError> {
    let mut rng = SeededRng::new(seed);
    let mut inputs = Vec::new();
    for input in model.graph.inputs.iter().filter(|i| model.graph.initializer(&i.name).is_none()) {
        let unsupported = |why: &str| VerifyError::UnsupportedInput { input: input.name.clone(), why: why.into() };
        let ty = input.tensor_type().ok_or_else(|| unsupported("not a tensor"))?;
        let dtype = ty.elem_type.ok_or_else(|| unsupported("element type unknown"))?;
        let dims = ty.shape.as_ref().ok_or_else(|| unsupported("rank unknown"))?;
        let shape: Vec<usize> = dims
            .iter()
            .enumerate()
            .map(|(axis, d)| {
                let open = if axis == 0 { sizes.batch } else { sizes.sequence };
                match d {
                    Dim::Fixed(v) => usize::try_from(*v).unwrap_or(open),
                    Dim::Symbol(s) => match symbol_size(s, &symbols) {
                        Some(size) => size,
                        None => *symbols.entry(s.clone()).or_insert(open),
                    },
                    Dim::Unknown => open,
                }
            })
            .collect();
        let count: usize = shape.iter().product();
        let name = input.name.to_lowercase();
        let value = match dtype {
            DataType::Float | DataType::Float16 | DataType::Double => {
                // a float attention mask holds ones and zeros too (a model
                // computing `(1 - mask) * min` overflows on normal values)
                let values: Vec<f32> = match TokenInput::of(&name) {
                    Some(TokenInput::AttentionMask) => integer_input(&name, &shape, None, &mut rng).into_iter().map(|v| v as f32).collect(),
                    _ => (0..count).map(|_| rng.normal()).collect(),
                };
                let t = ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| unsupported(&e.to_string()))?.into_tensor();
                match dtype {
                    DataType::Float16 => t.cast_to::<f16>().map_err(|e| unsupported(&e.to_string()))?.into_owned(),
                    DataType::Double => t.cast_to::<f64>().map_err(|e| unsupported(&e.to_string()))?.into_owned(),
                    _ => t,
                }
            }
            DataType::Int64 | DataType::Int32 => {
                let values = integer_input(&name, &shape, embedding_rows(model, &input.name), &mut rng);
                let t = ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| unsupported(&e.to_string()))?.into_tensor();
                if dtype == DataType::Int32 {
                    t.cast_to::<i32>().map_err(|e| unsupported(&e.to_string()))?.into_owned()
                } else {
                    t
                }
            }
            DataType::Bool => ArrayD::from_elem(IxDyn(&shape), true).into_tensor(),
            other => return Err(unsupported(&format!("random {other} inputs are not generated; pass --inputs"))),
        };
        inputs.push(NamedInput { name: input.name.clone(), value });
    }
    Ok(inputs)
}

/// What an integer model input holds, read from its name the way transformer
/// exporters name them (`input_ids`, `attention_mask`, `token_type_ids`,
/// `position_ids`; `segment_ids` as token types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenInput {
    Ids,
    AttentionMask,
    TokenTypes,
    Positions,
}

impl TokenInput {
    pub fn of(name: &str) -> Option<TokenInput> {
        let name = name.to_lowercase();
        if name.contains("mask") {
            Some(TokenInput::AttentionMask)
        } else if name.contains("position") {
            Some(TokenInput::Positions)
        } else if name.contains("token_type") || name.contains("segment") {
            Some(TokenInput::TokenTypes)
        } else if name.contains("input_ids") {
            Some(TokenInput::Ids)
        } else {
            None
        }
    }
}

/// Values for an integer input, by what its name says it is (token ids for an
/// unrecognised name).
fn integer_input(name: &str, shape: &[usize], vocabulary: Option<i64>, rng: &mut SeededRng) -> Vec<i64> {
    let count: usize = shape.iter().product();
    let (rows, cols) = match shape {
        [] => (1, 1),
        [n] => (1, *n),
        [rows, rest @ ..] => (*rows, rest.iter().product()),
    };
    let role = TokenInput::of(name);
    if role == Some(TokenInput::AttentionMask) {
        // Ones, with the second half of the batch right-padded to random lengths:
        // the masking path must survive every rewrite.
        let mut mask = vec![1i64; count];
        for r in rows / 2..rows {
            let keep = rng.below((cols as i64 / 4).max(1), cols as i64 + 1) as usize;
            for c in keep..cols {
                mask[r * cols + c] = 0;
            }
        }
        return mask;
    }
    if role == Some(TokenInput::Positions) {
        return (0..count).map(|i| (i % cols) as i64).collect();
    }
    if role == Some(TokenInput::TokenTypes) {
        return vec![0; count];
    }
    let high = vocabulary.unwrap_or(100).max(1);
    (0..count).map(|_| rng.below(0, high)).collect()
}

/// Reads every array of an `.npz` file (float32, float64, float16 as float32, int64, int32, bool).
pub fn read_npz(path: &Path) -> Result<Vec<NamedInput>, VerifyError> {
    use ndarray_npy::NpzReader;
    let bad = |why: String| VerifyError::Inputs { path: path.to_path_buf(), why };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut reader = NpzReader::new(file).map_err(|e| bad(e.to_string()))?;
    let names = reader.names().map_err(|e| bad(e.to_string()))?;
    let mut inputs = Vec::new();
    for entry in names {
        let name = entry.trim_end_matches(".npy").to_string();
        macro_rules! try_as {
            ($t:ty) => {
                if let Ok(a) = reader.by_name::<ndarray::OwnedRepr<$t>, ndarray::IxDyn>(&entry) {
                    inputs.push(NamedInput { name, value: a.into_tensor() });
                    continue;
                }
            };
        }
        try_as!(f32);
        try_as!(i64);
        try_as!(i32);
        try_as!(f64);
        try_as!(bool);
        try_as!(u8);
        try_as!(i8);
        return Err(bad(format!("array '{name}' has a dtype onnxopt does not read")));
    }
    Ok(inputs)
}
