//! `prune`: weights (unstructured or N:M, [`crate::prune::prune`]), heads and
//! neurons ([`crate::prune::structured`]) or whole layers
//! ([`crate::prune::layers`]), each re-fitted to the original on calibration
//! data where the method can; the sparse methods are then checked against the
//! input, the block methods check themselves in tract on random tokens (their
//! report's `tract_min_cosine`).

use super::report::{BlocksReport, PruneReport};
use super::{check_line, refuse_unused, CommandError, Observer, Outcome, Step};
use crate::calibrate::CalibrationSource;
use crate::ir::Model;
use crate::prune::{Importance, LayerSparsity, PruneOptions, DEFAULT_OBS_ROUNDS};
use crate::verify::{Engine, VerifyOptions};

/// What is pruned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pruning {
    /// Any weights, a fraction of each layer's.
    Unstructured,
    /// N nonzeros in every M weights along the reduction axis.
    NofM,
    /// Attention heads and FFN neurons, to a fraction of the FLOPs.
    Structured,
    /// Whole transformer blocks.
    Layers,
}

impl Pruning {
    pub fn name(self) -> &'static str {
        match self {
            Pruning::Unstructured => "unstructured",
            Pruning::NofM => "nm",
            Pruning::Structured => "structured",
            Pruning::Layers => "layers",
        }
    }
}

impl std::str::FromStr for Pruning {
    type Err = String;
    fn from_str(s: &str) -> Result<Pruning, String> {
        let all = [Pruning::Unstructured, Pruning::NofM, Pruning::Structured, Pruning::Layers];
        all.into_iter().find(|m| m.name() == s).ok_or_else(|| format!("unknown method '{s}' (unstructured, nm, structured, layers)"))
    }
}

/// `structured`: the fraction of the blocks' linear-layer FLOPs kept.
pub const DEFAULT_KEEP_FLOPS: f64 = 0.7;
pub const DEFAULT_SPARSITY: &str = "0.5";
pub const DEFAULT_N_OF_M: &str = "2:4";
/// The smallest cosine between each output and the input's, on the first
/// calibration batch (seeded random token ids without calibration data: a
/// harsher test than text).
pub const DEFAULT_MIN_COSINE: f64 = 0.8;

/// What `prune` is asked to do. `None` fields take the method's default; an
/// option the method does not use is refused.
#[derive(Clone, Debug)]
pub struct PruneRequest {
    pub method: Pruning,
    /// structured: fraction of the blocks' linear-layer FLOPs to keep.
    pub keep_flops: Option<f64>,
    /// layers: how many blocks to drop (1 by default).
    pub drop_layers: Option<usize>,
    /// unstructured: a default fraction and `NAME=S` overrides.
    pub sparsity: Option<Vec<String>>,
    /// nm: `N:M`.
    pub n_of_m: Option<String>,
    /// unstructured, nm: OBS with calibration data, else magnitude.
    pub importance: Option<Importance>,
    /// Re-fit the kept weights (default: with calibration data).
    pub reconstruct: Option<bool>,
    pub damping: Option<f64>,
    pub obs_rounds: Option<usize>,
    pub calibration: Option<CalibrationSource>,
    /// unstructured, nm: check the result against the input.
    pub verify: bool,
    pub engine: Option<Engine>,
    pub min_cosine: Option<f64>,
}

impl PruneRequest {
    pub fn new(method: Pruning) -> PruneRequest {
        PruneRequest {
            method,
            keep_flops: None,
            drop_layers: None,
            sparsity: None,
            n_of_m: None,
            importance: None,
            reconstruct: None,
            damping: None,
            obs_rounds: None,
            calibration: None,
            verify: true,
            engine: None,
            min_cosine: None,
        }
    }

    fn refuse_unused_options(&self) -> Result<(), CommandError> {
        let method = self.method;
        let sparse = matches!(method, Pruning::Unstructured | Pruning::NofM);
        let not_for = |methods: &str| format!("for --method {methods}, not --method {}", method.name());
        refuse_unused(self.keep_flops.is_some() && method != Pruning::Structured, "--keep-flops", &not_for("structured"))?;
        refuse_unused(self.drop_layers.is_some() && method != Pruning::Layers, "--drop-layers", &not_for("layers"))?;
        refuse_unused(self.sparsity.is_some() && method != Pruning::Unstructured, "--sparsity", &not_for("unstructured"))?;
        refuse_unused(self.n_of_m.is_some() && method != Pruning::NofM, "--nm", &not_for("nm"))?;
        if !sparse {
            for (given, option) in
                [(self.importance.is_some(), "--importance"), (self.damping.is_some(), "--damping"), (self.obs_rounds.is_some(), "--obs-rounds")]
            {
                refuse_unused(given, option, &not_for("unstructured or nm"))?;
            }
            let why = "--method structured and layers check their result themselves, in tract on random tokens (the report's tract_min_cosine)";
            for (given, option) in [(self.engine.is_some(), "--engine"), (self.min_cosine.is_some(), "--min-cosine"), (!self.verify, "--no-verify")] {
                refuse_unused(given, option, why)?;
            }
        }
        refuse_unused(
            self.reconstruct == Some(true) && method == Pruning::Layers,
            "--reconstruct",
            "--method layers drops whole blocks, with nothing to re-fit",
        )?;
        if let Some(damping) = self.damping.filter(|d| !(*d > 0.0 && d.is_finite())) {
            return Err(CommandError::Request(format!("--damping {damping}: must be a positive number")));
        }
        Ok(())
    }
}

/// Prunes `original` as the request says; the sparse methods are checked.
pub fn prune(original: &Model, request: &PruneRequest, observer: &dyn Observer) -> Result<Outcome<PruneReport>, CommandError> {
    request.refuse_unused_options()?;
    match request.method {
        Pruning::Unstructured | Pruning::NofM => prune_weights(original, request, observer),
        Pruning::Structured | Pruning::Layers => prune_blocks(original, request, observer),
    }
}

fn prune_weights(original: &Model, request: &PruneRequest, observer: &dyn Observer) -> Result<Outcome<PruneReport>, CommandError> {
    let method = match request.method {
        Pruning::NofM => {
            let pattern = request.n_of_m.as_deref().unwrap_or(DEFAULT_N_OF_M);
            crate::prune::PruneMethod::NofM(pattern.parse().map_err(|e: String| CommandError::Request(format!("--nm {e}")))?)
        }
        _ => crate::prune::PruneMethod::Unstructured,
    };
    let calibration = request.calibration.clone();
    let mut options = PruneOptions::new(method);
    let sparsity = request.sparsity.clone().unwrap_or_else(|| vec![DEFAULT_SPARSITY.to_string()]);
    options.sparsity = LayerSparsity::parse(&sparsity)?;
    options.importance = match request.importance {
        Some(importance) => importance,
        // OBS measured 0.004 above Wanda on MiniLM at every setting tried
        // (50% and 2:4; 64 and 128 calibration sentences; benches/RESULTS.md)
        None if calibration.is_some() => Importance::Obs,
        None => Importance::Magnitude,
    };
    options.reconstruct = request.reconstruct.unwrap_or(calibration.is_some());
    options.damping = request.damping;
    options.obs_rounds = request.obs_rounds.unwrap_or(DEFAULT_OBS_ROUNDS);
    options.calibration = calibration;
    let mut pruned = {
        let _step = Step::begin(observer, "pruning");
        crate::prune::prune(original, &options)?
    };
    for l in &pruned.report.layers {
        let error = |e: Option<f64>| e.map(|e| format!("{e:.4}")).unwrap_or_else(|| "-".into());
        observer.say(&format!("{:<48} {:?} sparsity {:.3}, error {} -> {}", l.node, l.shape, l.sparsity, error(l.error_before), error(l.error_after)));
    }
    for s in &pruned.report.skipped {
        observer.say(&format!("skipped {}: {}", s.node, s.why));
    }
    let r = &pruned.report;
    observer.say(&format!(
        "{}; nonzero parameters {} -> {} of {}; {:.1} s, {} tract runs",
        r.removed.join("; "),
        r.nonzero_parameters_before,
        r.nonzero_parameters_after,
        r.parameters,
        r.seconds,
        r.calibration_runs
    ));
    let min_cosine = request.min_cosine.unwrap_or(DEFAULT_MIN_COSINE);
    let mut rejected = None;
    if request.verify {
        let _step = Step::begin(observer, "checking the result");
        // on the first calibration batch when there is one: real text, not random ids
        let inputs = match &options.calibration {
            Some(source) => source.batches(original)?.next().transpose()?,
            None => None,
        };
        let verify = VerifyOptions { atol: f32::INFINITY, rtol: 0.0, inputs, engine: request.engine.unwrap_or_default(), ..Default::default() };
        let comparison = crate::passes::verify_rewrite(original, &pruned.model, &verify).map_err(CommandError::Unverifiable)?;
        observer.say(&check_line(&comparison));
        let cosine = comparison.min_cosine();
        if cosine < min_cosine {
            rejected = Some(format!(
                "the pruned model's outputs point elsewhere than the input's (cosine {cosine:.6}, --min-cosine {min_cosine}); nothing written (prune less, or loosen the bound)"
            ));
        }
        pruned.report.verification = Some(comparison);
    }
    Ok(Outcome { model: pruned.model, report: PruneReport::Weights(pruned.report), rejected })
}

fn prune_blocks(original: &Model, request: &PruneRequest, observer: &dyn Observer) -> Result<Outcome<PruneReport>, CommandError> {
    let source = request.calibration.as_ref();
    let started = std::time::Instant::now();
    let _step = Step::begin(observer, "pruning");
    let (model, pruning) = match request.method {
        Pruning::Layers => {
            let source = source.ok_or_else(|| CommandError::needs_calibration("--method layers (it ranks blocks on calibration data)"))?;
            let (pruned, r) = crate::prune::layers::drop_layers(original, request.drop_layers.unwrap_or(1), source)?;
            observer.say(&format!(
                "cosine(input, output) per block: {:?}; dropped {:?}; linear FLOPs/token {} -> {}, parameters {} -> {}, tract cosine (random tokens) {:.4}",
                r.input_output_cosine, r.dropped, r.flops_before, r.flops_after, r.parameters_before, r.parameters_after, r.tract_min_cosine
            ));
            (pruned, BlocksReport::Layers(r))
        }
        _ => {
            let reconstruct = source.is_some() && request.reconstruct != Some(false);
            if request.reconstruct == Some(true) && source.is_none() {
                return Err(CommandError::needs_calibration("--reconstruct"));
            }
            let keep_flops = request.keep_flops.unwrap_or(DEFAULT_KEEP_FLOPS);
            let (pruned, r) = crate::prune::structured::prune_structured(original, keep_flops, source, reconstruct)?;
            for l in &r.layers {
                let e = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
                observer.say(&format!(
                    "layer {}: heads {}/{} {:?}, neurons {}/{}, attention error {} -> {}, ffn error {} -> {}",
                    l.layer,
                    l.heads_kept.len(),
                    l.heads_before,
                    l.heads_kept,
                    l.neurons_kept,
                    l.neurons_before,
                    e(l.attention_error_before),
                    e(l.attention_error_after),
                    e(l.ffn_error_before),
                    e(l.ffn_error_after)
                ));
            }
            observer.say(&format!(
                "linear FLOPs/token {} -> {} ({:.3}), parameters {} -> {}, tract cosine (random tokens) {:.4}",
                r.flops_before,
                r.flops_after,
                r.flops_after as f64 / r.flops_before as f64,
                r.parameters_before,
                r.parameters_after,
                r.tract_min_cosine
            ));
            (pruned, BlocksReport::Structured(r))
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    observer.say(&format!("pruned in {seconds:.1} s"));
    Ok(Outcome { model, report: PruneReport::Blocks { seconds, pruning }, rejected: None })
}
