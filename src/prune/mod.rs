//! Pruning: zero weights of linear layers (MatMul, Gemm, com.microsoft
//! Attention's packed QKV), then re-fit the survivors against the original.
//!
//! 1. [`linear_layers`] finds every layer with a constant float32 2-D weight
//!    read by that layer alone (a shared weight cannot take two masks), in graph
//!    order, with the activation it reads and its "depth": how many prunable
//!    layers lie on the longest path before it. Layers of one depth never feed
//!    each other.
//! 2. A method chooses masks ([`sparse`]): unstructured or N:M, by magnitude,
//!    Wanda or OBS importance.
//! 3. With reconstruction ([`reconstruct`]), depth by depth: the calibration
//!    batches run through the teacher (the original) and the student (the model
//!    pruned and re-fitted so far), both tapped at the inputs of this depth's
//!    layers; from those sums each layer gets its mask (on the student's input;
//!    OBS in rounds, each after the first ranking the re-fitted weights) and its
//!    least-squares re-fit (weights and bias, damped towards the original, the
//!    damping cross-validated). One pair of tract runs per depth and batch
//!    (24 depths in a 6-layer BERT), rather than one per layer.
//! 4. The weights go into the model through the `prune-weights` pass.
//!
//! The caller checks the result against the input in tract (the CLI does).
//!
//! Structured pruning removes whole pieces instead, making the model smaller:
//! - [`blocks`]: finds the transformer blocks of a graph (unfused exports and
//!   `optimize --target ort` output);
//! - [`structured`]: attention heads and FFN neurons to a FLOP budget, with
//!   teacher-guided least-squares reconstruction;
//! - [`layers`]: drops whole blocks, the ones that change their input least.

pub mod blocks;
pub mod layers;
pub mod reconstruct;
pub mod sparse;
pub mod structured;
mod tapped_plan;

use crate::calibrate::{self, CalibrateError, CalibrationSource};
use crate::ir::{DataType, Model, Node};
use crate::passes::prune_weights::PruneWeights;
use crate::passes::{lowered_for_tract, run_pipeline, DriverOptions, PassError};
use reconstruct::{PairedGram, ReconstructError, Sums};
use serde::Serialize;
use sparse::{LinearWeight, NofM, SparsityPattern};
use std::collections::{BTreeMap, HashMap, HashSet};
use tapped_plan::TappedPlan;

/// What to remove.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum PruneMethod {
    /// Any weights, the same fraction of each output's (`--sparsity`).
    Unstructured,
    /// N nonzeros in every M consecutive weights along the reduction axis.
    NofM(NofM),
    // Structured { keep_flops }: attention heads and FFN neurons chosen together
    //   (src/prune/structured.rs, another branch).
    // Layers { drop }: whole transformer blocks (src/prune/layers.rs, another branch).
}

/// How a weight's importance is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Importance {
    /// `|W|`.
    Magnitude,
    /// `|W| * ||X||` over calibration tokens (Sun et al., 2023).
    Wanda,
    /// `|W| / sqrt([(X^T X)^-1]_kk)`: Optimal Brain Surgeon's saliency, what a
    /// weight costs once the re-fit has compensated (`reconstruct::obs_factors`).
    Obs,
}

/// The fraction of weights to zero, per layer: a default and overrides by node
/// or weight name.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSparsity {
    pub default: f64,
    pub by_layer: BTreeMap<String, f64>,
}

impl LayerSparsity {
    /// From `0.5` (every layer) and `NAME=0.3` items (one layer, by node name or
    /// weight name); each in `[0, 1)`.
    pub fn parse(items: &[String]) -> Result<LayerSparsity, PruneError> {
        let mut sparsity = LayerSparsity { default: 0.5, by_layer: BTreeMap::new() };
        for item in items {
            let (name, value) = match item.rsplit_once('=') {
                Some((name, value)) => (Some(name.to_string()), value),
                None => (None, item.as_str()),
            };
            let value: f64 = value.trim().parse().map_err(|_| PruneError::Option(format!("--sparsity: '{item}' is not a number (or NAME=number)")))?;
            if !(0.0..1.0).contains(&value) {
                return Err(PruneError::Option(format!("--sparsity: {value} is outside [0, 1) (the fraction of weights to zero)")));
            }
            match name {
                Some(name) => sparsity.by_layer.insert(name, value),
                None => Some(std::mem::replace(&mut sparsity.default, value)),
            };
        }
        Ok(sparsity)
    }

    fn of(&self, layer: &LinearLayer) -> f64 {
        self.by_layer.get(&layer.node).or_else(|| self.by_layer.get(&layer.weight)).copied().unwrap_or(self.default)
    }
}

#[derive(Clone, Debug)]
pub struct PruneOptions {
    pub method: PruneMethod,
    /// For [`PruneMethod::Unstructured`].
    pub sparsity: LayerSparsity,
    pub importance: Importance,
    /// Re-fit the kept weights against the original (needs `calibration`).
    pub reconstruct: bool,
    pub calibration: Option<CalibrationSource>,
    /// Ridge added to the re-fit's normal equations, relative to the mean
    /// diagonal of `X_s^T X_s`; `None` chooses it per layer by cross-validation
    /// (`reconstruct::refit_cross_validated`). OBS importance damps its
    /// inverse with this, or [`DEFAULT_DAMPING`].
    pub damping: Option<f64>,
    /// With reconstruction, OBS chooses each mask in this many rounds, each
    /// after the first on the weights re-fitted to what is still kept
    /// ([`DEFAULT_OBS_ROUNDS`]; 1: one ranking of the original weights).
    pub obs_rounds: usize,
}

/// MiniLM 50%, all 500 calibration sentences: one round 0.9873, two
/// 0.98965, four 0.99041 (128 sentences: one 0.9828, two 0.9845). Each
/// round after the first costs two factorisations per output (about 150 s on
/// MiniLM).
pub const DEFAULT_OBS_ROUNDS: usize = 4;

/// SparseGPT's `percdamp`.
pub const DEFAULT_DAMPING: f64 = 0.01;

impl PruneOptions {
    pub fn new(method: PruneMethod) -> PruneOptions {
        PruneOptions {
            method,
            sparsity: LayerSparsity { default: 0.5, by_layer: BTreeMap::new() },
            importance: Importance::Magnitude,
            reconstruct: false,
            calibration: None,
            damping: None,
            obs_rounds: DEFAULT_OBS_ROUNDS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("{0}")]
    Option(String),
    #[error("{0} needs calibration data (--calib-text with --tokenizer, or --calib)")]
    NeedsCalibration(&'static str),
    #[error("--sparsity names '{0}', which is no prunable layer (node or weight name)")]
    UnknownLayer(String),
    #[error("weight '{weight}': {why}")]
    Weight { weight: String, why: String },
    #[error("calibration: {0}")]
    Calibrate(#[from] CalibrateError),
    #[error("re-fitting '{layer}': {source}")]
    Reconstruct {
        layer: String,
        #[source]
        source: ReconstructError,
    },
    #[error(transparent)]
    Pass(#[from] PassError),
    #[error(transparent)]
    Blocks(#[from] blocks::BlockError),
    #[error("surgery: {0}")]
    Surgery(String),
    #[error("surgery left an invalid graph: {0}")]
    Patch(#[from] crate::ir::PatchError),
    #[error("checking the pruned model in tract: {0}")]
    Check(#[from] crate::passes::CheckError),
}

/// A linear layer whose weight can be pruned.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearLayer {
    /// The node's name, or its first output when unnamed.
    pub node: String,
    pub op: String,
    pub weight: String,
    /// The activation it multiplies (`X` in `X W`).
    pub activation: String,
    /// Stored `[N, K]` (Gemm `transB = 1`) rather than `[K, N]`.
    pub transposed: bool,
    /// Stored dims.
    pub dims: [usize; 2],
    /// Prunable layers on the longest path before this one.
    pub depth: usize,
    /// The float `[N]` initializer added to this layer's output alone (the
    /// bias), which the re-fit may shift.
    pub bias: Option<String>,
}

impl LinearLayer {
    fn read(&self, model: &Model) -> Result<LinearWeight, PruneError> {
        let fail = |why: String| PruneError::Weight { weight: self.weight.clone(), why };
        let tensor = model.graph.initializer(&self.weight).ok_or_else(|| fail("not an initializer".into()))?;
        let values = tensor.to_f32().map_err(|e| fail(e.to_string()))?;
        let values = values.as_slice().ok_or_else(|| fail("not contiguous".into()))?;
        Ok(LinearWeight::from_stored(values, self.dims[0], self.dims[1], self.transposed))
    }

    fn read_bias(&self, model: &Model, bias: &str) -> Result<Vec<f32>, PruneError> {
        let fail = |why: String| PruneError::Weight { weight: bias.to_string(), why };
        let tensor = model.graph.initializer(bias).ok_or_else(|| fail("not an initializer".into()))?;
        Ok(tensor.to_f32().map_err(|e| fail(e.to_string()))?.iter().copied().collect())
    }
}

/// A layer left alone, and why.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SkippedLayer {
    pub node: String,
    pub why: String,
}

/// What pruning did to one layer.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LayerReport {
    pub node: String,
    pub op: String,
    pub weight: String,
    /// As stored.
    pub shape: [usize; 2],
    pub depth: usize,
    /// Fraction of the weight that is zero afterwards.
    pub sparsity: f64,
    /// For N:M, whether every group along K satisfies it (checked on the written weight).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nm_satisfied: Option<bool>,
    /// `sum ||X_s w' - X_t w||^2 / sum ||X_t w||^2` over calibration tokens,
    /// with the mask alone; `None` without calibration data.
    pub error_before: Option<f64>,
    /// The same after the re-fit; `None` without reconstruction.
    pub error_after: Option<f64>,
    /// The re-fit's damping (cross-validated unless fixed); `None` without a
    /// re-fit, or when cross-validation kept the masked original weights.
    pub damping: Option<f64>,
}

/// What `prune` did (serialised as the `--report`).
#[derive(Clone, Debug, Serialize)]
pub struct PruneReport {
    pub method: PruneMethod,
    pub importance: Importance,
    pub reconstruct: bool,
    /// The fixed re-fit damping; `None`: cross-validated per layer.
    pub damping: Option<f64>,
    /// Rounds of OBS mask selection (with reconstruction).
    pub obs_rounds: usize,
    pub layers: Vec<LayerReport>,
    pub skipped: Vec<SkippedLayer>,
    /// A line per kind of thing removed.
    pub removed: Vec<String>,
    /// Float parameters in the model, and how many are nonzero before and after.
    pub parameters: u64,
    pub nonzero_parameters_before: u64,
    pub nonzero_parameters_after: u64,
    /// Multiply-adds x 2 per token in the pruned layers, counting nonzero weights
    /// only (what a sparse kernel does; a dense kernel does the `before` figure).
    pub linear_flops_per_token_before: u64,
    pub linear_flops_per_token_after: u64,
    /// Tract runs over calibration batches (student and teacher counted apart).
    pub calibration_runs: usize,
    pub seconds: f64,
    /// The tract comparison of the result with the input, filled by the caller.
    pub verification: Option<crate::verify::Comparison>,
}

/// A pruned model and what was done.
pub struct Pruned {
    pub model: Model,
    pub report: PruneReport,
}

/// The prunable linear layers of `model` in graph order, and the ones passed over.
pub fn linear_layers(model: &Model) -> Result<(Vec<LinearLayer>, Vec<SkippedLayer>), PruneError> {
    let graph = &model.graph;
    let graph_inputs: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
    let order = graph.node_ids().map_err(|c| PassError::cycle("prune", c))?;
    let mut level: HashMap<&str, usize> = HashMap::new();
    let (mut layers, mut skipped) = (Vec::new(), Vec::new());
    for id in order {
        let Some(node) = graph.node(id) else { continue };
        let before = node.inputs.iter().filter_map(|i| level.get(i.as_str())).copied().max().unwrap_or(0);
        let mut after = before;
        if let Some(found) = linear_layer(model, &graph_inputs, node, before) {
            match found {
                Ok(layer) => {
                    after = before + 1;
                    layers.push(layer);
                }
                Err(why) => skipped.push(SkippedLayer { node: node_label(node), why }),
            }
        }
        for output in &node.outputs {
            level.insert(output, after);
        }
    }
    Ok((layers, skipped))
}

fn node_label(node: &Node) -> String {
    node.name_or_output().to_string()
}

/// `None` for a node that is no linear layer with a constant weight; `Err(why)`
/// for one that is but cannot be pruned.
fn linear_layer(model: &Model, graph_inputs: &HashSet<&str>, node: &Node, depth: usize) -> Option<Result<LinearLayer, String>> {
    let attention = node.op_type == "Attention" && node.domain == crate::passes::lower_contrib::CONTRIB_DOMAIN;
    if !(node.is_onnx("MatMul") || node.is_onnx("Gemm") || attention) {
        return None;
    }
    let weight_name = node.inputs.get(1)?;
    let weight = model.graph.initializer(weight_name)?;
    if graph_inputs.contains(weight_name.as_str()) {
        return None; // a graph input's default: a caller may override it
    }
    let activation = node.inputs.first().filter(|a| !a.is_empty() && model.graph.initializer(a).is_none())?;
    let check = || -> Result<LinearLayer, String> {
        if weight.dtype != DataType::Float {
            return Err(format!("weight '{weight_name}' is {}, not float32", weight.dtype));
        }
        let [rows, cols] = weight.dims[..] else {
            return Err(format!("weight '{weight_name}' has dims {:?}, not 2-D", weight.dims));
        };
        if model.graph.uses(weight_name).len() != 1 {
            return Err(format!("weight '{weight_name}' is read by {} nodes (one mask cannot serve them all)", model.graph.uses(weight_name).len()));
        }
        let gemm = node.is_onnx("Gemm");
        if gemm && node.attr_int("transA").unwrap_or(0) != 0 {
            return Err("Gemm with transA = 1 (its rows are not tokens)".into());
        }
        let transposed = gemm && node.attr_int("transB").unwrap_or(0) != 0;
        let outputs = if transposed { rows } else { cols } as usize;
        Ok(LinearLayer {
            node: node_label(node),
            op: node.qualified_op(),
            weight: weight_name.clone(),
            activation: activation.clone(),
            transposed,
            dims: [rows as usize, cols as usize],
            depth,
            bias: layer_bias(model, graph_inputs, node, outputs),
        })
    };
    Some(check())
}

/// The bias of a linear layer with `outputs` outputs: a float `[outputs]`
/// initializer read by nothing else and added to the product unchanged:
/// Gemm's and com.microsoft Attention's input 2, or the other input of an Add,
/// BiasGelu (input 1) or SkipLayerNormalization (input 4) that alone reads a
/// MatMul's output.
fn layer_bias(model: &Model, graph_inputs: &HashSet<&str>, node: &Node, outputs: usize) -> Option<String> {
    let graph = &model.graph;
    let name = if node.is_onnx("MatMul") {
        let product = node.outputs.first()?;
        if graph.is_graph_output(product) {
            return None;
        }
        let [single] = graph.uses(product) else { return None };
        let crate::ir::Slot::Input(slot) = single.slot else { return None };
        let reader = graph.node(single.node)?;
        let contrib = reader.domain == crate::passes::lower_contrib::CONTRIB_DOMAIN;
        match (reader.op_type.as_str(), slot) {
            ("Add", 0 | 1) if reader.is_onnx("Add") && reader.inputs.len() == 2 => reader.inputs.get(1 - slot)?,
            ("BiasGelu", 0) if contrib => reader.inputs.get(1)?,
            ("SkipLayerNormalization", 0) if contrib => reader.inputs.get(4)?,
            _ => return None,
        }
    } else {
        node.inputs.get(2)?
    };
    let tensor = graph.initializer(name)?;
    let usable = tensor.dtype == DataType::Float
        && tensor.dims == [outputs as i64]
        && graph.uses(name).len() == 1
        && !graph_inputs.contains(name.as_str())
        && !graph.is_graph_output(name);
    usable.then(|| name.clone())
}

/// Prunes `model` as `options` say; see the module documentation.
pub fn prune(model: &Model, options: &PruneOptions) -> Result<Pruned, PruneError> {
    let started = std::time::Instant::now();
    let (layers, mut skipped) = linear_layers(model)?;
    for name in options.sparsity.by_layer.keys() {
        if !layers.iter().any(|l| &l.node == name || &l.weight == name) {
            return Err(PruneError::UnknownLayer(name.clone()));
        }
    }
    let calibration = match (&options.calibration, options.importance, options.reconstruct) {
        (Some(source), _, _) => Some(source),
        (None, Importance::Wanda, _) => return Err(PruneError::NeedsCalibration("Wanda importance")),
        (None, Importance::Obs, _) => return Err(PruneError::NeedsCalibration("OBS importance")),
        (None, _, true) => return Err(PruneError::NeedsCalibration("reconstruction")),
        (None, _, false) => None,
    };
    // the pattern of each layer kept for pruning
    let mut planned: Vec<(LinearLayer, SparsityPattern)> = Vec::new();
    for layer in layers {
        let k = if layer.transposed { layer.dims[1] } else { layer.dims[0] };
        let pattern = match options.method {
            PruneMethod::Unstructured => SparsityPattern::Unstructured(options.sparsity.of(&layer)),
            PruneMethod::NofM(nm) if !k.is_multiple_of(nm.group) => {
                skipped.push(SkippedLayer { node: layer.node.clone(), why: format!("K = {k} is not a multiple of {}", nm.group) });
                continue;
            }
            PruneMethod::NofM(nm) => SparsityPattern::NofM(nm),
        };
        if pattern == SparsityPattern::Unstructured(0.0) {
            continue;
        }
        planned.push((layer, pattern));
    }
    let mut pruning = Pruning { model, options, weights: BTreeMap::new(), reports: Vec::new(), runs: 0 };
    match calibration {
        Some(source) if options.reconstruct => pruning.sequential(&planned, source)?,
        _ => pruning.one_shot(&planned, calibration)?,
    }
    let Pruning { weights, reports, runs, .. } = pruning;
    let pruned = with_weights(model, weights)?;
    let mut report = PruneReport {
        method: options.method,
        importance: options.importance,
        reconstruct: options.reconstruct,
        damping: options.damping,
        obs_rounds: options.obs_rounds,
        layers: reports,
        skipped,
        removed: Vec::new(),
        parameters: 0,
        nonzero_parameters_before: 0,
        nonzero_parameters_after: 0,
        linear_flops_per_token_before: 0,
        linear_flops_per_token_after: 0,
        calibration_runs: runs,
        seconds: 0.0,
        verification: None,
    };
    count(model, &pruned, &planned, &mut report)?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(Pruned { model: pruned, report })
}

/// The running state of one pruning.
struct Pruning<'a> {
    model: &'a Model,
    options: &'a PruneOptions,
    /// New values by weight name, stored layout.
    weights: BTreeMap<String, Vec<f32>>,
    reports: Vec<LayerReport>,
    runs: usize,
}

impl Pruning<'_> {
    /// Masks from the original model's weights (and its input norms for Wanda),
    /// all at once; layer errors from the teacher's Gram matrices when there is
    /// calibration data.
    fn one_shot(&mut self, planned: &[(LinearLayer, SparsityPattern)], calibration: Option<&CalibrationSource>) -> Result<(), PruneError> {
        let grams = match calibration {
            Some(source) => {
                let teacher = lowered_for_tract(self.model)?;
                let taps = distinct_activations(planned.iter().map(|(l, _)| l));
                let grams = gram_matrices(&teacher, &taps, source)?;
                self.runs += batches(self.model, source)?;
                taps.into_iter().map(String::from).zip(grams).collect()
            }
            None => HashMap::new(),
        };
        for (layer, pattern) in planned {
            let weight = layer.read(self.model)?;
            let gram = grams.get(&layer.activation);
            let norms: Option<Vec<f64>> = match self.options.importance {
                Importance::Magnitude => None,
                Importance::Wanda => gram.map(|g| g.squared_norms().into_iter().map(|s| s.max(0.0).sqrt()).collect()),
                Importance::Obs => gram.and_then(|g| reconstruct::obs_factors(g.xtx.as_ref(), self.obs_damping())),
            };
            let norms = norms.as_deref();
            let keep = sparse::mask(&weight, norms, *pattern);
            let pruned = weight.masked(&keep);
            let error = gram.map(|g| reconstruct::relative_error(&pruned, None, &weight, Sums::same(g.xtx.as_ref())));
            self.record(layer, *pattern, &pruned, error, None, None);
        }
        Ok(())
    }

    /// Depth by depth: the student (pruned so far) and the teacher run on the
    /// calibration data, each layer of the depth is masked and re-fitted.
    fn sequential(&mut self, planned: &[(LinearLayer, SparsityPattern)], source: &CalibrationSource) -> Result<(), PruneError> {
        let teacher = lowered_for_tract(self.model)?;
        let mut depths: Vec<usize> = planned.iter().map(|(l, _)| l.depth).collect();
        depths.dedup();
        for depth in depths {
            let here: Vec<&(LinearLayer, SparsityPattern)> = planned.iter().filter(|(l, _)| l.depth == depth).collect();
            let taps = distinct_activations(here.iter().map(|(l, _)| l));
            let student = lowered_for_tract(&with_weights(self.model, self.weights.clone())?)?;
            let sums = paired_grams(&teacher, &student, &taps, source)?;
            self.runs += 2 * batches(self.model, source)?;
            for (layer, pattern) in here {
                let stats = sums.iter().find(|s| s.total.name == layer.activation).expect("every activation was tapped");
                let weight = layer.read(self.model)?;
                let keep = self.student_mask(layer, &weight, *pattern, stats)?;
                let refit = self.refit(layer, &weight, &keep, stats)?;
                if let (Some(bias), Some(shift)) = (&layer.bias, &refit.bias_shift) {
                    let shifted = layer.read_bias(self.model, bias)?.iter().zip(shift).map(|(b, d)| (*b as f64 + d) as f32).collect();
                    self.weights.insert(bias.clone(), shifted);
                }
                self.record(layer, *pattern, &refit.weight, Some(refit.error_before), Some(refit.error_after), refit.damping);
            }
        }
        Ok(())
    }

    /// The mask of one layer, from the student's input sums: OBS in rounds
    /// (each after the first ranks the weights re-fitted on what is kept),
    /// Wanda on the student's input norms, or magnitude.
    fn student_mask(&self, layer: &LinearLayer, weight: &LinearWeight, pattern: SparsityPattern, stats: &FoldedGram) -> Result<Vec<bool>, PruneError> {
        let failed = |source| PruneError::Reconstruct { layer: layer.node.clone(), source };
        Ok(match self.options.importance {
            Importance::Magnitude => sparse::mask(weight, None, pattern),
            Importance::Wanda => sparse::mask(weight, Some(&stats.total.student_norms()), pattern),
            Importance::Obs => {
                let factors = reconstruct::obs_factors(stats.total.student.as_ref(), self.obs_damping());
                let steps = sparse::rounds(pattern, self.options.obs_rounds);
                let mut keep = sparse::mask(weight, factors.as_deref(), steps[0]);
                for step in &steps[1..] {
                    let removals = |kept: &[usize]| sparse::removals_to(*step, weight.k, kept);
                    keep = reconstruct::refined_mask(weight, &keep, stats.total.sums(), self.obs_damping(), removals).map_err(failed)?;
                }
                keep
            }
        })
    }

    /// The re-fit of one layer under `keep`, its bias too when it has one; the
    /// damping fixed by the options or cross-validated over the two folds.
    fn refit(&self, layer: &LinearLayer, weight: &LinearWeight, keep: &[bool], stats: &FoldedGram) -> Result<reconstruct::Refit, PruneError> {
        let with_bias = layer.bias.is_some();
        match self.options.damping {
            Some(damping) => reconstruct::refit(weight, keep, with_bias, stats.total.sums(), damping),
            None => {
                let folds = [stats.folds[0].sums(), stats.folds[1].sums()];
                reconstruct::refit_cross_validated(weight, keep, with_bias, stats.total.sums(), folds, DEFAULT_DAMPING)
            }
        }
        .map_err(|source| PruneError::Reconstruct { layer: layer.node.clone(), source })
    }

    fn obs_damping(&self) -> f64 {
        self.options.damping.unwrap_or(DEFAULT_DAMPING)
    }

    fn record(
        &mut self,
        layer: &LinearLayer,
        pattern: SparsityPattern,
        pruned: &LinearWeight,
        error_before: Option<f64>,
        error_after: Option<f64>,
        damping: Option<f64>,
    ) {
        let total = (pruned.k * pruned.n).max(1);
        self.reports.push(LayerReport {
            node: layer.node.clone(),
            op: layer.op.clone(),
            weight: layer.weight.clone(),
            shape: layer.dims,
            depth: layer.depth,
            sparsity: 1.0 - pruned.nonzeros() as f64 / total as f64,
            nm_satisfied: match pattern {
                SparsityPattern::NofM(nm) => Some(sparse::satisfies_nm(pruned, nm)),
                SparsityPattern::Unstructured(_) => None,
            },
            error_before,
            error_after,
            damping,
        });
        self.weights.insert(layer.weight.clone(), pruned.to_stored(layer.transposed));
    }
}

/// The activations the layers read, each once, in order.
fn distinct_activations<'l>(layers: impl Iterator<Item = &'l LinearLayer>) -> Vec<&'l str> {
    let mut seen = HashSet::new();
    layers.map(|l| l.activation.as_str()).filter(|a| seen.insert(*a)).collect()
}

/// How many batches `source` yields for `model` (for the report).
fn batches(model: &Model, source: &CalibrationSource) -> Result<usize, PruneError> {
    Ok(source.batches(model)?.count())
}

/// `model` with `weights` put in by the `prune-weights` pass.
fn with_weights(model: &Model, weights: BTreeMap<String, Vec<f32>>) -> Result<Model, PruneError> {
    let mut out = model.clone();
    if !weights.is_empty() {
        run_pipeline(&mut out, &[Box::new(PruneWeights { weights })], &DriverOptions::default())?;
    }
    Ok(out)
}

/// One activation's [`PairedGram`] over all calibration batches, and over the
/// even and the odd batches apart (the folds that cross-validate the damping).
struct FoldedGram {
    total: PairedGram,
    folds: [PairedGram; 2],
}

/// The student's and the teacher's sums at `taps`, over every batch of
/// `source`: both run on the same inputs. Both are loaded for this depth with
/// `taps` as their only outputs, so tract computes no further than the taps
/// (the teacher tapped at every depth at once would run whole, 24 times).
fn paired_grams(teacher: &Model, student: &Model, taps: &[&str], source: &CalibrationSource) -> Result<Vec<FoldedGram>, PruneError> {
    let teacher_plan = TappedPlan::new(teacher, taps, "teacher")?;
    let student_plan = TappedPlan::new(student, taps, "student")?;
    let mut folds: Vec<[PairedGram; 2]> = taps.iter().map(|t| [PairedGram::new(t), PairedGram::new(t)]).collect();
    let mut batches = 0;
    for inputs in source.batches(student)? {
        let inputs = inputs?;
        let (padded, teacher_values) = teacher_plan.run(&inputs)?;
        let (_, student_values) = student_plan.run(&inputs)?;
        for ((pair, t), s) in folds.iter_mut().zip(&teacher_values).zip(&student_values) {
            pair[batches % 2].observe(s, t, calibrate::token_rows(&padded, t).as_deref())?;
        }
        batches += 1;
    }
    if batches == 0 {
        return Err(CalibrateError::Empty("the source holds no samples".into()).into());
    }
    Ok(folds.into_iter().map(|[even, odd]| FoldedGram { total: even.plus(&odd), folds: [even, odd] }).collect())
}

/// Gram matrices (`X^T X`, real-token rows) of `taps` in `model`, as
/// `calibrate::gram_matrices` gives them, with the model loaded into tract once.
fn gram_matrices(model: &Model, taps: &[&str], source: &CalibrationSource) -> Result<Vec<calibrate::Gram>, PruneError> {
    let plan = TappedPlan::new(model, taps, "original")?;
    let mut grams: Vec<calibrate::Gram> = taps.iter().map(|t| calibrate::Gram::new(t)).collect();
    let mut batches = 0;
    for inputs in source.batches(model)? {
        let inputs = inputs?;
        let (padded, values) = plan.run(&inputs)?;
        for (gram, value) in grams.iter_mut().zip(values) {
            gram.observe(&value, calibrate::token_rows(&padded, &value).as_deref())?;
        }
        batches += 1;
    }
    if batches == 0 {
        return Err(CalibrateError::Empty("the source holds no samples".into()).into());
    }
    Ok(grams)
}

/// Fills the parameter and FLOP counts and the `removed` lines.
fn count(original: &Model, pruned: &Model, planned: &[(LinearLayer, SparsityPattern)], report: &mut PruneReport) -> Result<(), PruneError> {
    let nonzero_floats = |model: &Model| -> Result<(u64, u64), PruneError> {
        let (mut all, mut nonzero) = (0u64, 0u64);
        for t in model.graph.initializers.iter().filter(|t| t.dtype == DataType::Float) {
            let values = t.to_f32().map_err(|e| PruneError::Weight { weight: t.name.clone(), why: e.to_string() })?;
            all += values.len() as u64;
            nonzero += values.iter().filter(|v| **v != 0.0).count() as u64;
        }
        Ok((all, nonzero))
    };
    let (parameters, before) = nonzero_floats(original)?;
    let (_, after) = nonzero_floats(pruned)?;
    report.parameters = parameters;
    report.nonzero_parameters_before = before;
    report.nonzero_parameters_after = after;
    for (layer, _) in planned {
        report.linear_flops_per_token_before += 2 * layer.read(original)?.nonzeros() as u64;
    }
    for layer in &report.layers {
        report.linear_flops_per_token_after += (2.0 * (1.0 - layer.sparsity) * (layer.shape[0] * layer.shape[1]) as f64).round() as u64;
    }
    let zeroed = before.saturating_sub(after);
    report.removed.push(format!(
        "{zeroed} weights zeroed in {} linear layers ({:.1}% of their weights)",
        report.layers.len(),
        100.0 * zeroed as f64 / (report.linear_flops_per_token_before / 2).max(1) as f64
    ));
    Ok(())
}

// ---- shared by the structured methods (blocks, structured, layers) ----

/// Drops what the surgery left unread (old weights, dead nodes) and the
/// `value_info` entries, whose recorded widths no longer hold.
fn finish(model: &mut Model) -> Result<(), PruneError> {
    let passes: Vec<Box<dyn crate::passes::Pass>> = vec![Box::new(crate::passes::dead_code::EliminateDeadCode)];
    run_pipeline(model, &passes, &DriverOptions { validate: true, ..DriverOptions::default() })?;
    model.graph.value_info.clear();
    Ok(())
}

/// The smallest cosine between the outputs of `original` and `pruned` in tract
/// on seeded random inputs (pruning changes values: only the shapes must agree).
fn tract_min_cosine(original: &Model, pruned: &Model) -> Result<f64, PruneError> {
    let options = crate::verify::VerifyOptions { atol: f32::MAX, rtol: 0.0, ..Default::default() };
    Ok(crate::passes::verify_rewrite(original, pruned, &options)?.min_cosine())
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
