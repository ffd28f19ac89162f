//! One library call per command, each with a request type and a result:
//! [`optimize()`], [`quantize()`], [`prune()`] and [`verify()`]. Every
//! command's policy lives here: its defaults, the passes it runs and in which
//! order (through [`crate::passes::pipeline`]), which options a mode takes (one
//! it does not use is refused, never ignored), and when a result is rejected.
//! The `onnxopt` binary parses arguments into a request, calls one of these and
//! prints; the Python package does the same.
//!
//! A command never writes a file. It returns an [`Outcome`]: the rewritten
//! model, its report (serde types, [`report`]) and, when the check found the
//! result beyond the request's bound, why it must not be written.

pub mod auto;
pub mod optimize;
pub mod prune;
pub mod quantize;
pub mod report;

pub use auto::{auto, AutoRequest, Budget, Preset};
pub use optimize::{optimize, OptimizeRequest};
pub use prune::{prune, PruneRequest, Pruning};
pub use quantize::{quantize, QuantizeMode, QuantizeRequest, WeightRounding};

use crate::ir::Model;
use crate::passes::{CheckError, PassError};
use crate::verify::{Comparison, VerifyOptions};

/// What a command tells its caller while it runs. Every method has a do-nothing
/// default ([`Silent`]).
pub trait Observer {
    /// A long step begins; [`Observer::end`] follows when it is over.
    fn begin(&self, _step: &str) {}
    fn end(&self) {}
    /// A line of progress for the user (what each pass did, a choice made).
    fn say(&self, _line: &str) {}
    /// A line the user should see even when they asked for quiet (a rule
    /// trace, a note on how the check ran).
    fn warn(&self, _line: &str) {}
}

/// An observer that shows nothing.
pub struct Silent;

impl Observer for Silent {}

/// Another observer's steps and warnings, not its lines: for a command run
/// inside another (each of `auto`'s trials), whose caller prints one line for it.
pub(crate) struct Quiet<'a>(pub(crate) &'a dyn Observer);

impl Observer for Quiet<'_> {
    fn begin(&self, step: &str) {
        self.0.begin(step);
    }
    fn end(&self) {
        self.0.end();
    }
    fn warn(&self, line: &str) {
        self.0.warn(line);
    }
}

/// A step of a command, from `begin` until dropped.
pub(crate) struct Step<'a>(&'a dyn Observer);

impl<'a> Step<'a> {
    pub(crate) fn begin(observer: &'a dyn Observer, what: impl AsRef<str>) -> Step<'a> {
        observer.begin(what.as_ref());
        Step(observer)
    }
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// What a command returns.
#[derive(Debug)]
pub struct Outcome<R> {
    pub model: Model,
    pub report: R,
    /// Why `model` must not be written: the check found it beyond the
    /// request's bound (the message says by how much and what to try).
    pub rejected: Option<String>,
}

/// Why a command did not produce a model.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// An option the command cannot use as given: a value out of range, an
    /// option the mode does not take, calibration data missing.
    #[error("{0}")]
    Request(String),
    #[error(transparent)]
    Pass(#[from] PassError),
    #[error(transparent)]
    Calibrate(#[from] crate::calibrate::CalibrateError),
    #[error(transparent)]
    Prune(#[from] crate::prune::PruneError),
    #[error(transparent)]
    Sensitivity(#[from] crate::sensitivity::SensitivityError),
    #[error(transparent)]
    Gptq(#[from] crate::passes::quantize_dynamic::GptqRoundingError),
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    /// No engine could run the models to compare them: not the input's fault.
    #[error("{0}; nothing written (--no-verify writes the result unchecked)")]
    Unverifiable(#[source] CheckError),
    /// A rewrite that must be exact was not: a bug of onnxopt's.
    #[error("{0}: a bug, please report it")]
    Bug(String),
}

impl CommandError {
    /// The error for an option that needs calibration data.
    pub(crate) fn needs_calibration(what: &str) -> CommandError {
        CommandError::Request(format!("{what} needs calibration data: --calib-text FILE --tokenizer tokenizer.json, or --calib data.npz"))
    }
}

/// Refuses an option a mode does not use: `given` says whether it was set.
pub(crate) fn refuse_unused(given: bool, option: &str, why: &str) -> Result<(), CommandError> {
    if given {
        return Err(CommandError::Request(format!("{option}: {why}")));
    }
    Ok(())
}

/// Runs `original` and `rewritten` on the same inputs in the options' engine
/// (`None` when `options` is: the caller asked for no check).
pub(crate) fn check(original: &Model, rewritten: &Model, options: Option<&VerifyOptions>, observer: &dyn Observer) -> Result<Option<Comparison>, CommandError> {
    let Some(options) = options else { return Ok(None) };
    let comparison = {
        let _step = Step::begin(observer, format!("checking the result ({})", options.engine.name()));
        crate::passes::verify_rewrite(original, rewritten, options).map_err(CommandError::Unverifiable)?
    };
    if let Some(why) = &comparison.fallback {
        observer.say(&format!("note: {why}"));
    }
    observer.say(&check_line(&comparison));
    Ok(Some(comparison))
}

/// How a check's outcome reads: `check in tract: max abs .., cosine ..`.
pub(crate) fn check_line(c: &Comparison) -> String {
    format!("check in {}: max abs {:.3e}, cosine {:.6}", c.engine.name(), c.max_abs(), c.min_cosine())
}

/// Every `--exclude` name is a node of `model` (or the first output of one).
pub(crate) fn check_exclusions(model: &Model, exclude: &[String]) -> Result<(), CommandError> {
    let named = |name: &String| model.graph.nodes().any(|n| &n.name == name || n.outputs.first() == Some(name));
    match exclude.iter().find(|name| !named(name)) {
        Some(unknown) => Err(CommandError::Request(format!("--exclude: no node named '{unknown}' (nor writing a tensor of that name)"))),
        None => Ok(()),
    }
}

/// An error and its causes in one line, each cause once: the library's
/// messages often quote their source already (`cannot read: No such file or
/// directory`), which printing the whole chain would repeat.
pub fn sentence(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let line = c.to_string();
        if !text.contains(&line) {
            text = format!("{text}: {line}");
        }
        cause = c.source();
    }
    text
}

/// Compares two models on the same inputs in the options' engine: the
/// `verify` command (com.microsoft ops lowered for tract, decoders run over
/// their KV cache; see [`crate::passes::verify_rewrite`]).
pub fn verify(reference: &Model, candidate: &Model, options: &VerifyOptions) -> Result<Comparison, CheckError> {
    crate::passes::verify_rewrite(reference, candidate, options)
}
