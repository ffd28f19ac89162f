//! `optimize`: the cleanup and fusion pipeline for a target
//! ([`crate::passes::pipeline::optimization_passes`]), then a check of the
//! result against the input; when the check fails, the first pass whose
//! result alone fails it is named.

use super::report::{pass_lines, OptimizeReport};
use super::{check, CommandError, Observer, Outcome, Step};
use crate::ir::Model;
use crate::passes::pipeline::{optimization_passes, pass_names, PipelineOptions};
use crate::passes::{first_failing_pass, run_pipeline, DriverOptions};
use crate::target::Target;
use crate::verify::VerifyOptions;

/// What `optimize` is asked to do.
#[derive(Clone, Debug)]
pub struct OptimizeRequest {
    pub target: Target,
    /// Raise the default-domain opset to this version first.
    pub opset: Option<i64>,
    /// Run only these passes (by name), when given.
    pub passes: Option<Vec<String>>,
    pub skip: Vec<String>,
    /// Stop after this many patches (to bisect a bad rewrite).
    pub stop_after: Option<usize>,
    /// Say why this rule did not fire where it nearly matched.
    pub trace_rule: Option<String>,
    /// The check of the result against the input; `None` writes it unchecked.
    /// Fusions are exact up to float rounding: the default bound is
    /// atol 1e-4, rtol 1e-3 ([`VerifyOptions::default`]).
    pub verify: Option<VerifyOptions>,
}

impl Default for OptimizeRequest {
    fn default() -> OptimizeRequest {
        OptimizeRequest {
            target: Target::Ort,
            opset: None,
            passes: None,
            skip: Vec::new(),
            stop_after: None,
            trace_rule: None,
            verify: Some(VerifyOptions::default()),
        }
    }
}

/// Fuses and cleans up `original` for the request's target and checks the result.
pub fn optimize(original: &Model, request: &OptimizeRequest, observer: &dyn Observer) -> Result<Outcome<OptimizeReport>, CommandError> {
    let known = pass_names();
    if let Some(unknown) = request.passes.iter().flatten().chain(&request.skip).find(|n| !known.contains(&n.as_str())) {
        return Err(CommandError::Request(format!("unknown pass '{unknown}' (passes: {})", known.join(", "))));
    }
    let options = PipelineOptions {
        only: request.passes.clone(),
        skip: request.skip.clone(),
        trace_rule: request.trace_rule.clone(),
        opset: request.opset,
        skip_rules: Vec::new(),
    };
    let pipeline = optimization_passes(request.target, &options);
    let driver = DriverOptions { stop_after: request.stop_after, ..DriverOptions::default() };
    let mut optimized = original.clone();
    let records = {
        let _step = Step::begin(observer, format!("optimizing for {}", request.target));
        run_pipeline(&mut optimized, &pipeline, &driver)?
    };
    for note in records.iter().flat_map(|r| &r.notes) {
        observer.warn(&format!("trace: {note}"));
    }
    for line in pass_lines(&records) {
        observer.say(&line);
    }
    let comparison = check(original, &optimized, request.verify.as_ref(), observer)?;
    let mut rejected = None;
    if let (Some(c), Some(options)) = (&comparison, &request.verify) {
        if !c.passed() {
            let culprit = {
                let _step = Step::begin(observer, "finding the pass that broke it");
                // in the engine that ran the check (ORT when tract could not)
                let options = VerifyOptions { engine: c.engine, ..options.clone() };
                first_failing_pass(original, &pipeline, &driver, &options).map_err(CommandError::Unverifiable)?
            };
            let culprit = culprit.unwrap_or_else(|| "none alone (the passes together)".into());
            rejected = Some(format!(
                "the result differs from the input beyond tolerance; the first pass whose result does: {culprit}; nothing written (bisect its patches with --stop-after)"
            ));
        }
    }
    let report = OptimizeReport {
        target: request.target,
        nodes_before: original.graph.node_count(),
        nodes_after: optimized.graph.node_count(),
        opset_before: original.opset(""),
        opset_after: optimized.opset(""),
        passes: records,
        verification: comparison,
    };
    Ok(Outcome { model: optimized, report, rejected })
}
