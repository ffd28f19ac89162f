//! `quantize-gather-int4`: block-wise int4 embedding tables. A transformer's
//! token embedding is a `Gather` from a constant `[V, D]` table, not a MatMul,
//! so `quantize-int4` leaves it in float32; on all-MiniLM-L6-v2 it is 47 MB of
//! the 90 MB file (30522 x 384), which kept an int4 model at 0.60x the size.
//!
//! What it rewrites: `Gather(table, indices) {axis = 0}` with `table` a float32
//! initializer `[V, D]` (not a graph input), `D` at least one block, not named in
//! `exclude`.
//!
//! The math, per row `v` (one token's vector) and block `g` of `B` consecutive
//! features, as `quantize-int4` does per column: symmetric `s = max|t| / 7`,
//! `q = round(t / s)` in `[-7, 7]`; or with a zero point over
//! `[min(0, min t), max(0, max t)]`, 16 levels. Rounding to nearest: a Gather
//! has no activations for GPTQ to weigh errors by, and each looked-up row is
//! used as it is, so `|t' - t| <= s / 2` per value is the whole error.
//!
//! ```text
//! y = Gather(t, ids)  ->  y = com.microsoft.GatherBlockQuantized(y/int4, ids, y/scale[, y/zero_point])
//!                             {gather_axis=0, quantize_axis=1, block_size}         # ort
//!                     ->  y = Gather(DequantizeLinear(y/int4, y/scale[, y/zero_point])
//!                             {axis=1, block_size}, ids)                           # portable, tensorrt
//! ```
//! The new initializers are named under `y`, the Gather's output. `y/int4` is int4 `[V, D]` (values `q`, or `q - 8` with a zero point stored as
//! `z - 8`: int4 holds -8..=7 and `q - z` is unchanged), `y/scale` float32
//! `[V, ceil(D / B)]`. ORT 1.32 runs GatherBlockQuantized on int4 data with float
//! scales (checked against the dequantized table: max abs 0). The portable form
//! dequantizes the whole table at run time: smaller on disk, not in memory.

use super::lower_contrib::CONTRIB_DOMAIN;
use super::{Pass, PassError};
use crate::ir::{AttrValue, DataType, Model, Node, Patch, Tensor};
use crate::quantize::gptq::{round_to_nearest, Grid, Levels};
use crate::quantize::int4::pack_nibbles;
use crate::target::Target;
use bytes::Bytes;
use std::collections::HashSet;

/// The pass. See the module documentation.
pub struct QuantizeGatherInt4 {
    /// `Ort` emits GatherBlockQuantized; anything else, DequantizeLinear + Gather.
    pub target: Target,
    /// Features per scale.
    pub block_size: usize,
    /// 16 levels with a zero point per block, rather than 15 symmetric ones.
    pub zero_point: bool,
    /// Node names (or first outputs) to keep in float.
    pub exclude: HashSet<String>,
}

impl Pass for QuantizeGatherInt4 {
    fn name(&self) -> &'static str {
        "quantize-gather-int4"
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let graph = &model.graph;
        let graph_inputs: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
        let grid = Grid { block: Some(self.block_size), levels: if self.zero_point { Levels::Asymmetric { max: 15 } } else { Levels::Symmetric { max: 7 } } };
        let mut patches = Vec::new();
        for (id, node) in graph.nodes_with_ids() {
            if !node.is_onnx("Gather") || node.attr_int("axis").unwrap_or(0) != 0 || self.exclude.contains(node.name_or_output()) {
                continue;
            }
            let (Some(table_name), Some(indices), Some(output)) = (node.inputs.first(), node.inputs.get(1), node.outputs.first()) else { continue };
            let Some(table) = graph.initializer(table_name) else { continue };
            if table.dtype != DataType::Float || graph_inputs.contains(table_name.as_str()) {
                continue;
            }
            let [rows, cols] = table.dims[..] else { continue };
            let (rows, cols) = (rows as usize, cols as usize);
            if cols < self.block_size || rows == 0 {
                continue;
            }
            let Ok(values) = table.to_f32() else { continue };
            let Some(values) = values.as_slice() else { continue };
            // a table's rows are the "columns" of quantize-int4's [K, N] layout, transposed
            let mut transposed = vec![0f32; rows * cols];
            for (r, row) in values.chunks_exact(cols).enumerate() {
                for (c, &v) in row.iter().enumerate() {
                    transposed[c * rows + r] = v;
                }
            }
            let q = round_to_nearest(&transposed, cols, rows, grid)
                .map_err(|e| PassError::Failed { pass: self.name().into(), message: format!("'{table_name}': {e}") })?;
            let blocks = q.blocks();
            // back to [V, D] and [V, blocks]
            let shift = if self.zero_point { 8 } else { 0 };
            let int4 = pack_nibbles((0..rows).flat_map(|r| (0..cols).map(move |c| (r, c))).map(|(r, c)| q.values[c * rows + r] - shift));
            let scales: Vec<u8> = (0..rows).flat_map(|r| (0..blocks).map(move |g| (r, g))).flat_map(|(r, g)| q.scales[g * rows + r].to_le_bytes()).collect();

            // named by the Gather's output: two Gathers of one table each get a copy
            let root = output;
            let (data, scale, zero) = (format!("{root}/int4"), format!("{root}/scale"), format!("{root}/zero_point"));
            let mut patch = Patch::new(match self.target {
                Target::Ort => "gather-block-quantized",
                _ => "dequantize-linear-gather-int4",
            });
            patch.remove_node(id);
            patch.add_initializer(Tensor::from_raw(&data, DataType::Int4, vec![rows as i64, cols as i64], Bytes::from(int4)));
            patch.add_initializer(Tensor::from_raw(&scale, DataType::Float, vec![rows as i64, blocks as i64], Bytes::from(scales)));
            let mut inputs = vec![data.as_str(), "", scale.as_str()];
            if self.zero_point {
                let zeros = pack_nibbles((0..rows).flat_map(|r| (0..blocks).map(move |g| (r, g))).map(|(r, g)| q.zero_points[g * rows + r] - shift));
                patch.add_initializer(Tensor::from_raw(&zero, DataType::Int4, vec![rows as i64, blocks as i64], Bytes::from(zeros)));
                inputs.push(&zero);
            }
            let block = AttrValue::Int(self.block_size as i64);
            match self.target {
                Target::Ort => {
                    inputs[1] = indices;
                    patch.add_node(
                        Node::new("GatherBlockQuantized", &inputs, &[output])
                            .with_domain(CONTRIB_DOMAIN)
                            .with_name(node.name.clone())
                            .with_attr("gather_axis", AttrValue::Int(0))
                            .with_attr("quantize_axis", AttrValue::Int(1))
                            .with_attr("block_size", block),
                    );
                }
                _ => {
                    inputs.remove(1);
                    let dequantized = format!("{root}/dequantized");
                    patch.add_node(Node::new("DequantizeLinear", &inputs, &[&dequantized]).with_attr("axis", AttrValue::Int(1)).with_attr("block_size", block));
                    patch.add_node(Node::new("Gather", &[&dequantized, indices], &[output]).with_name(node.name.clone()));
                }
            }
            patches.push(patch);
        }
        Ok(patches)
    }
}
