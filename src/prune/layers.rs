//! Layer dropping: removes the `n` transformer blocks that change their input
//! least, rewiring the residual stream around them.
//!
//! Importance: on the calibration batches, the mean over real tokens of
//! `cos(h_in, h_out)` between a block's input and output hidden states; a
//! block whose output points where its input did (cosine near 1) adds little,
//! and the next block reading its input instead sees nearly what it saw.
//! (With post-LN blocks the output is normalised and the input is the previous
//! block's normalised output, so the two are on the same scale.)
//!
//! Surgery: every reader of the dropped block's output reads its input instead;
//! when the output is the graph's output, an `Identity` of the input writes it.
//! The block's nodes and weights are then dead code. No re-fit is done: the
//! report gives the tract cosine of the result against the input.
//!
//! ```text
//! h1 = Block1(h0); h2 = Block2(h1); y = Block3(h2)   -- drop 2 ->   h1 = Block1(h0); y = Block3(h1)
//! ```

use super::blocks::{find_blocks, Block};
use super::PruneError;
use crate::calibrate::{for_each_batch, CalibrationSource};
use crate::ir::{Model, Node, Patch};
use serde::Serialize;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LayerDropReport {
    /// `(layer, mean cosine between its input and output)`, in layer order.
    pub input_output_cosine: Vec<(usize, f64)>,
    pub dropped: Vec<usize>,
    pub flops_before: u64,
    pub flops_after: u64,
    pub parameters_before: u64,
    pub parameters_after: u64,
    pub tract_min_cosine: f64,
}

/// Drops the `count` blocks of `model` whose output is most like their input on `source`.
pub fn drop_layers(model: &Model, count: usize, source: &CalibrationSource) -> Result<(Model, LayerDropReport), PruneError> {
    let blocks = find_blocks(model)?;
    if count == 0 || count >= blocks.len() {
        return Err(PruneError::Option(format!(
            "--drop-layers must be between 1 and {} (the model has {} blocks), got {count}",
            blocks.len().saturating_sub(1),
            blocks.len()
        )));
    }
    let cosines = input_output_cosines(model, &blocks, source)?;
    let mut order: Vec<usize> = (0..blocks.len()).collect();
    order.sort_by(|&a, &b| cosines[b].total_cmp(&cosines[a]).then(a.cmp(&b)));
    let mut dropped: Vec<usize> = order.into_iter().take(count).collect();
    dropped.sort();
    let mut pruned = model.clone();
    // the highest first: an earlier block's index is unchanged by dropping a later one
    for &layer in dropped.iter().rev() {
        let block = find_blocks(&pruned)?.into_iter().nth(layer).ok_or_else(|| PruneError::Surgery(format!("block {layer} is no longer recognisable")))?;
        let patch = bypass(&pruned, &block)?;
        pruned.graph.apply(patch, true)?;
    }
    super::finish(&mut pruned)?;
    let flops = |m: &Model| -> Result<u64, PruneError> { Ok(find_blocks(m)?.iter().map(Block::linear_flops_per_token).sum()) };
    let report = LayerDropReport {
        input_output_cosine: cosines.iter().copied().enumerate().collect(),
        dropped,
        flops_before: flops(model)?,
        flops_after: flops(&pruned)?,
        parameters_before: super::float_parameters(model),
        parameters_after: super::float_parameters(&pruned),
        tract_min_cosine: super::tract_min_cosine(model, &pruned)?,
    };
    Ok((pruned, report))
}

/// The patch making the block's readers read its input.
fn bypass(model: &Model, block: &Block) -> Result<Patch, PruneError> {
    let graph = &model.graph;
    let mut patch = Patch::new("drop-layer");
    if graph.is_graph_output(&block.output) {
        let (producer, _) = graph.producer(&block.output).ok_or_else(|| PruneError::Surgery(format!("no producer of '{}'", block.output)))?;
        patch.remove_node(producer);
        patch.add_node(Node::new("Identity", &[&block.input], &[&block.output]).with_name(format!("prune/drop_layer{}", block.index)));
    } else {
        patch.replace_uses(block.output.clone(), block.input.clone());
    }
    Ok(patch)
}

/// Per block, the mean over real calibration tokens of `cos(input, output)`.
fn input_output_cosines(model: &Model, blocks: &[Block], source: &CalibrationSource) -> Result<Vec<f64>, PruneError> {
    let taps: Vec<&str> = blocks.iter().flat_map(|b| [b.input.as_str(), b.output.as_str()]).collect();
    let mut sums = vec![0.0f64; blocks.len()];
    let mut tokens = 0u64;
    for_each_batch(&super::calibration_copy(model)?, &taps, source, |batch| {
        let mut rows_seen = 0;
        for (b, pair) in batch.taps.chunks(2).enumerate() {
            let keep = batch.token_rows(&pair[0]);
            let input = rows(&pair[0], taps[2 * b])?;
            let output = rows(&pair[1], taps[2 * b + 1])?;
            let width = pair[0].shape().last().copied().unwrap_or(1).max(1);
            rows_seen = 0;
            for (r, (x, y)) in input.chunks(width).zip(output.chunks(width)).enumerate() {
                if keep.as_ref().is_some_and(|k| !k.get(r).copied().unwrap_or(true)) {
                    continue;
                }
                sums[b] += cosine(x, y);
                rows_seen += 1;
            }
        }
        tokens += rows_seen;
        Ok(())
    })?;
    Ok(sums.into_iter().map(|s| s / tokens.max(1) as f64).collect())
}

fn rows(value: &tract_onnx::prelude::Tensor, name: &str) -> Result<Vec<f32>, crate::calibrate::CalibrateError> {
    let fail = |why: String| crate::calibrate::CalibrateError::Observe { tensor: name.to_string(), why };
    let cast = value.cast_to::<f32>().map_err(|e| fail(e.to_string()))?;
    let view = cast.to_plain_array_view::<f32>().map_err(|e| fail(e.to_string()))?;
    Ok(view.iter().copied().collect())
}

fn cosine(x: &[f32], y: &[f32]) -> f64 {
    let (mut xy, mut xx, mut yy) = (0.0f64, 0.0f64, 0.0f64);
    for (&a, &b) in x.iter().zip(y) {
        xy += a as f64 * b as f64;
        xx += a as f64 * a as f64;
        yy += b as f64 * b as f64;
    }
    if xx == 0.0 || yy == 0.0 {
        0.0
    } else {
        xy / (xx.sqrt() * yy.sqrt())
    }
}
