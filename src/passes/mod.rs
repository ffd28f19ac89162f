//! Passes and the one driver that applies what they propose.
//!
//! A [`Pass`] looks at the model and proposes [`Patch`]es; [`run_pipeline`]
//! applies them, repeats a pass until it proposes nothing (up to an iteration
//! cap), and can stop after N patches to bisect a bad rewrite. It validates the
//! IR after every pass, and after every single patch when asked (the tests ask,
//! so that a broken patch is named; the CLI checks per pass to stay fast).
//! The order of passes is written once, in `pipeline.rs`.

pub mod add_into_sum;
pub mod approximate_gelu;
pub mod attention_opset;
pub mod check;
pub mod common_subexpression;
pub mod constant_folding;
pub mod dead_code;
pub mod expand_attention_bias;
pub mod fuse;
pub mod inline_constant_if;
pub mod layer_norm_affine;
pub mod lower_contrib;
pub mod lower_float16_gemm;
pub mod lower_standard;
mod lowering;
pub mod no_op;
pub mod pack_sibling_matmuls;
pub mod pipeline;
pub mod prune_weights;
pub mod quantize_dynamic;
pub mod quantize_fp16;
pub mod quantize_gather_int4;
pub mod quantize_int4;
pub mod quantize_static;
pub mod raise_opset;
pub mod residual_sum;
pub mod shape_folding;
pub mod smooth_quant;
pub mod split_attention_projection;

use crate::ir::{Model, Patch, PatchError};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("pass {pass}: {message}")]
    Failed { pass: String, message: String },
    #[error("pass {pass}: {source}")]
    Patch {
        pass: String,
        // boxed: a graph error carries several names, and PassError travels in
        // every pass's Result
        #[source]
        source: Box<PatchError>,
    },
    #[error("pass {pass} still proposed changes after {iterations} rounds (a rule that undoes another?)")]
    NoFixpoint { pass: String, iterations: usize },
}

impl PassError {
    /// A pass met a graph with a cycle (no topological order to walk).
    pub fn cycle(pass: &str, cycle: crate::ir::CycleError) -> PassError {
        PassError::Failed { pass: pass.into(), message: cycle.to_string() }
    }
}

/// A rewrite of the model, proposed as patches.
pub trait Pass {
    /// Kebab-case, as used by `--passes` / `--skip` and in reports.
    fn name(&self) -> &'static str;
    /// What the pass has to say beyond its patches (the fuse pass's `--trace-rule`
    /// explanations); the driver collects it into the pass's record.
    fn take_notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// The patches this pass would make to `model` now; empty when it is done.
    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError>;
    /// The default-domain opset `model` must import once this pass has run, for
    /// a pass that changes it (`raise-opset`); `None` leaves the import alone. A
    /// patch edits the graph only, so the driver sets the import, after the
    /// pass's last round and before the next pass: no pass sees nodes of one
    /// opset under the import of another. Asked of the model as the pass left
    /// it (a bisect may have stopped the pass before its patches).
    fn default_opset(&self, _model: &Model) -> Option<i64> {
        None
    }
}

#[derive(Clone, Debug)]
pub struct DriverOptions {
    /// Rounds a pass may take before it counts as not converging.
    pub max_rounds: usize,
    /// Stop after this many applied patches (bisecting a bad rewrite).
    pub stop_after: Option<usize>,
    /// Validate the IR after every patch, not only after every pass.
    pub validate: bool,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions { max_rounds: 32, stop_after: None, validate: false }
    }
}

/// What one pass did.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PassRecord {
    pub pass: String,
    pub patches: usize,
    /// Patches by the rule or step that proposed them.
    pub by_origin: BTreeMap<String, usize>,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub milliseconds: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Runs `passes` in order, each to a fixpoint.
pub fn run_pipeline(model: &mut Model, passes: &[Box<dyn Pass>], options: &DriverOptions) -> Result<Vec<PassRecord>, PassError> {
    let mut records = Vec::new();
    let mut applied_total = 0usize;
    for pass in passes {
        let mut record = PassRecord { pass: pass.name().to_string(), nodes_before: model.graph.node_count(), ..PassRecord::default() };
        let started = std::time::Instant::now();
        let mut rounds = 0;
        'rounds: loop {
            let patches = pass.propose(model)?;
            if patches.is_empty() {
                break;
            }
            rounds += 1;
            if rounds > options.max_rounds {
                return Err(PassError::NoFixpoint { pass: pass.name().into(), iterations: options.max_rounds });
            }
            let mut applied_this_round = 0;
            for patch in patches {
                if options.stop_after.is_some_and(|limit| applied_total >= limit) {
                    break 'rounds;
                }
                let origin = patch.origin.clone();
                match model.graph.apply(patch, options.validate) {
                    Ok(()) => {
                        applied_total += 1;
                        applied_this_round += 1;
                        record.patches += 1;
                        *record.by_origin.entry(origin).or_default() += 1;
                    }
                    // overlapping an earlier patch of this round: the next round retries
                    Err(PatchError::Stale { .. }) => {}
                    Err(source) => return Err(PassError::Patch { pass: pass.name().into(), source: Box::new(source) }),
                }
            }
            if applied_this_round == 0 {
                break;
            }
        }
        if let Some(version) = pass.default_opset(model) {
            set_default_opset(model, version);
        }
        import_used_domains(model);
        model.graph.validate(&std::collections::HashSet::new()).map_err(|source| PassError::Patch {
            pass: pass.name().into(),
            source: Box::new(PatchError::Invalid { origin: format!("the {} pass", pass.name()), source: Box::new(source) }),
        })?;
        record.notes = pass.take_notes();
        record.milliseconds = started.elapsed().as_millis() as u64;
        record.nodes_after = model.graph.node_count();
        records.push(record);
        if options.stop_after.is_some_and(|limit| applied_total >= limit) {
            break;
        }
    }
    Ok(records)
}

/// Makes the model import the default domain at `version`.
fn set_default_opset(model: &mut Model, version: i64) {
    match model.opset_imports.iter_mut().find(|o| o.domain.is_empty() || o.domain == "ai.onnx") {
        Some(import) => import.version = version,
        None => model.opset_imports.push(crate::ir::OpsetImport { domain: String::new(), version, extras: Default::default() }),
    }
}

/// Whether a pass may add initializers that are not graph inputs: before IR
/// version 4 every initializer must also be a graph input (ORT's
/// remove_initializer_from_input.py refuses such models), so folding passes
/// leave those models alone.
pub(crate) fn initializers_may_be_added(model: &Model) -> bool {
    model.ir_version >= 4
}

/// Adds an opset import for every domain a node now uses (a fusion that emits
/// the first com.microsoft op needs `com.microsoft` version 1).
fn import_used_domains(model: &mut Model) {
    let mut used: Vec<String> = model.graph.nodes().map(|n| n.domain.clone()).filter(|d| !d.is_empty() && d != "ai.onnx").collect();
    used.sort();
    used.dedup();
    for domain in used {
        if model.opset(&domain).is_none() {
            model.opset_imports.push(crate::ir::OpsetImport { domain, version: 1, extras: Default::default() });
        }
    }
}

/// Why a rewritten model could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("lowering for tract: {0}")]
    Lower(#[from] PassError),
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
}

/// Checks a rewritten model against its original in the engine the options
/// name ([`Engine`]):
/// - tract never sees a com.microsoft op, nor a standard op it runs
///   unfaithfully (opset-23 Attention and RMSNormalization): both models are
///   lowered first (`lower_contrib`, then `lower_standard`, each lowering
///   checked against ONNX Runtime's kernels);
/// - ONNX Runtime runs both as they are, fused ops with its own kernels;
/// - `Auto` runs tract, and ONNX Runtime where tract cannot load or run either
///   model (the comparison's `fallback` says why); when ORT is not installed
///   either, the error names both reasons.
pub fn verify_rewrite(original: &Model, rewritten: &Model, options: &crate::verify::VerifyOptions) -> Result<crate::verify::Comparison, CheckError> {
    use crate::verify::{compare, onnx_runtime, Engine, VerifyError, VerifyOptions};
    let in_engine = |engine: Engine| -> Result<crate::verify::Comparison, CheckError> {
        let options = VerifyOptions { engine, ..options.clone() };
        Ok(compare(&prepared_for(original, engine)?, &prepared_for(rewritten, engine)?, &options)?)
    };
    match options.engine {
        Engine::Auto => match in_engine(Engine::Tract) {
            Ok(comparison) => Ok(comparison),
            Err(tract) => match onnx_runtime::available() {
                Ok(()) => {
                    let mut comparison = in_engine(Engine::Ort)?;
                    comparison.fallback = Some(format!("tract could not run the models ({tract}); ONNX Runtime ran them"));
                    Ok(comparison)
                }
                Err(ort) => Err(CheckError::Verify(VerifyError::NoEngine { tract: tract.to_string(), ort })),
            },
        },
        engine => in_engine(engine),
    }
}

/// `model` as `engine` runs it: lowered for tract, unchanged for ONNX Runtime.
pub fn prepared_for(model: &Model, engine: crate::verify::Engine) -> Result<Model, PassError> {
    match engine {
        crate::verify::Engine::Ort => Ok(model.clone()),
        _ => lowered_for_tract(model),
    }
}

/// A copy of `model` tract can run faithfully: contrib ops and the standard ops
/// tract misreads lowered to what it runs right.
pub fn lowered_for_tract(model: &Model) -> Result<Model, PassError> {
    let driver = DriverOptions { validate: true, ..DriverOptions::default() };
    let mut m = model.clone();
    // The lowerings emit LayerNormalization-17. Opsets 13 to 16 differ from
    // 17 only by additions (new types, optional attributes, new ops), so the
    // copy tract runs, never written, may declare 17.
    if let Some(import) = m.opset_imports.iter_mut().find(|o| o.domain.is_empty() || o.domain == "ai.onnx") {
        if (13..17).contains(&import.version) {
            import.version = 17;
        }
    }
    // an If with a constant condition is its branch (tract runs If only
    // when it can fold the condition itself)
    run_pipeline(&mut m, &[Box::new(inline_constant_if::InlineConstantIf) as Box<dyn Pass>], &driver)?;
    lower_contrib::lower_contrib_ops(&mut m, &driver)?;
    lower_standard::lower_standard_ops(&mut m, &driver)?;
    // tract refuses a float16 Gemm with C or alpha (quantize --mode fp16 makes them)
    run_pipeline(&mut m, &[Box::new(lower_float16_gemm::LowerFloat16Gemm) as Box<dyn Pass>], &driver)?;
    Ok(m)
}

/// The first pass after which `original` and the rewritten model differ beyond
/// tolerance: passes run one at a time, each checked in the options' engine
/// (tract for `Auto`). For naming the culprit once a whole pipeline's result
/// failed its check.
pub fn first_failing_pass(
    original: &Model,
    passes: &[Box<dyn Pass>],
    driver: &DriverOptions,
    options: &crate::verify::VerifyOptions,
) -> Result<Option<String>, CheckError> {
    // the original runs in tract once; each pass's result is compared with it
    let engine = match options.engine {
        crate::verify::Engine::Ort => crate::verify::Engine::Ort,
        _ => crate::verify::Engine::Tract,
    };
    let reference = crate::verify::Reference::run(&prepared_for(original, engine)?, engine, options)?;
    let mut model = original.clone();
    for (index, pass) in passes.iter().enumerate() {
        let record = run_pipeline(&mut model, std::slice::from_ref(pass), driver)?;
        if record.iter().all(|r| r.patches == 0) {
            continue;
        }
        if !crate::verify::compare_to(&reference, &prepared_for(&model, engine)?, options)?.passed() {
            return Ok(Some(format!("{} (pass {} of {})", pass.name(), index + 1, passes.len())));
        }
    }
    Ok(None)
}
