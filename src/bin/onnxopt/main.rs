//! The `onnxopt` command line. Exit codes: 0 success, 1 verification failed,
//! 2 bad input or usage. Each command is one library call
//! ([`onnxopt::commands`]); this file reads and writes the files, shows
//! progress and prints.

mod args;

use anyhow::{Context, Result};
use args::{Cli, Command, OutputArgs};
use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use onnxopt::commands::{self, CommandError, Observer, Outcome};
use onnxopt::target::Target;
use onnxopt::{inspect, ir::Model, onnx, verify};
use std::cell::RefCell;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// Why a run failed, by exit code.
enum Failure {
    /// Bad input or usage (exit 2).
    BadInput(anyhow::Error),
    /// The result differs from the input beyond the bound, or two models
    /// compared differ (exit 1; the reason is printed already).
    VerificationFailed,
    /// No engine could run the models to compare them: not the input's fault (exit 1).
    Unverifiable(anyhow::Error),
    /// `check` found rule violations (printed already; exit 1).
    Violations,
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::BadInput(e)
    }
}

/// A command's error, naming the input file it was working on.
fn command_failure(input: &Path, e: CommandError) -> Failure {
    match e {
        CommandError::Unverifiable(_) => Failure::Unverifiable(e.into()),
        e => Failure::BadInput(anyhow::Error::from(e).context(format!("{}", input.display()))),
    }
}

/// Shows a command's steps as spinners on stderr and its lines (unless quiet).
struct Terminal {
    quiet: bool,
    steps: RefCell<Vec<ProgressBar>>,
}

impl Terminal {
    fn new(quiet: bool) -> Terminal {
        Terminal { quiet, steps: RefCell::new(Vec::new()) }
    }

    fn print(&self, line: &str) {
        match self.steps.borrow().last() {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}

impl Observer for Terminal {
    fn begin(&self, step: &str) {
        if self.quiet {
            return;
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("static template"));
        bar.set_message(step.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        self.steps.borrow_mut().push(bar);
    }

    fn end(&self) {
        if let Some(bar) = self.steps.borrow_mut().pop() {
            bar.finish_and_clear();
        }
    }

    fn say(&self, line: &str) {
        if !self.quiet {
            self.print(line);
        }
    }

    fn warn(&self, line: &str) {
        self.print(line);
    }
}

/// Reads a model; `populate` when every weight will be read (see `LoadOptions`).
fn load(path: &Path, terminal: &Terminal, populate: bool) -> Result<Model> {
    terminal.begin(&format!("reading {}", path.display()));
    let model = onnx::load_with(path, onnx::LoadOptions { populate });
    terminal.end();
    Ok(model?)
}

/// Refuses an output that is the input file, or whose external data file would be.
fn check_not_input(input: &Path, output: &Path) -> Result<()> {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(input, output) || same(input, &onnx::external_data_path(output)) {
        anyhow::bail!("{}: refusing to overwrite the input model", output.display());
    }
    Ok(())
}

fn save(model: &Model, input: &Path, out: &OutputArgs, terminal: &Terminal) -> Result<()> {
    check_not_input(input, &out.output)?;
    terminal.begin(&format!("writing {}", out.output.display()));
    let summary = onnx::save(model, &out.output, &out.options());
    terminal.end();
    let summary = summary?;
    terminal.say(&format!("wrote {} ({} bytes)", out.output.display(), summary.model_bytes));
    if let Some((path, size)) = summary.external_file {
        terminal.say(&format!("wrote {} ({size} bytes of external data)", path.display()));
    }
    Ok(())
}

/// Writes a command's result: its report when asked (with the input and output
/// paths), then the model, unless the check rejected it.
fn finish<R: serde::Serialize>(outcome: Outcome<R>, input: &Path, output: &OutputArgs, report: Option<&Path>, terminal: &Terminal) -> Result<(), Failure> {
    if let Some(path) = report {
        let mut json = serde_json::to_value(&outcome.report).context("encoding the report")?;
        if let Some(fields) = json.as_object_mut() {
            fields.insert("input".into(), serde_json::json!(input));
            fields.insert("output".into(), serde_json::json!(output.output));
        }
        write_report(path, &json)?;
    }
    if let Some(why) = outcome.rejected {
        eprintln!("error: {why}");
        return Err(Failure::VerificationFailed);
    }
    save(&outcome.model, input, output, terminal)?;
    Ok(())
}

fn run(cli: Cli) -> Result<(), Failure> {
    let terminal = Terminal::new(cli.quiet);
    match cli.command {
        Command::Inspect { model: path, json, graph } => {
            let model = load(&path, &terminal, false)?;
            let text = if graph {
                model.to_string()
            } else if json {
                serde_json::to_string_pretty(&inspect::summarize(&model)).context("encoding the summary")? + "\n"
            } else {
                inspect::summarize(&model).to_string()
            };
            write_stdout(&text)?;
        }
        Command::Convert { input, output } => {
            let model = load(&input, &terminal, true)?;
            save(&model, &input, &output, &terminal)?;
        }
        Command::Optimize(args) => {
            let request = args.request();
            let original = load(&args.input, &terminal, true)?;
            let outcome = commands::optimize(&original, &request, &terminal).map_err(|e| command_failure(&args.input, e))?;
            finish(outcome, &args.input, &args.output, args.report.as_deref(), &terminal)?;
        }
        Command::Quantize(args) => {
            let request = args.request()?;
            let original = load(&args.input, &terminal, true)?;
            let outcome = commands::quantize(&original, &request, &terminal).map_err(|e| command_failure(&args.input, e))?;
            finish(outcome, &args.input, &args.output, args.report.as_deref(), &terminal)?;
        }
        Command::Auto(args) => {
            let request = args.request()?;
            let original = load(&args.input, &terminal, true)?;
            let outcome = commands::auto(&original, &request, &terminal).map_err(|e| command_failure(&args.input, e))?;
            if let Some(path) = &args.html {
                std::fs::write(path, outcome.report.html()).with_context(|| format!("{}: cannot write the page", path.display()))?;
            }
            if let Some(chosen) = &outcome.report.chosen {
                terminal.say(&format!("chosen: {chosen}"));
            }
            finish(outcome, &args.input, &args.output, args.report.as_deref(), &terminal)?;
        }
        Command::Prune(args) => {
            let request = args.request()?;
            let original = load(&args.input, &terminal, true)?;
            let outcome = commands::prune(&original, &request, &terminal).map_err(|e| command_failure(&args.input, e))?;
            finish(outcome, &args.input, &args.output, args.report.as_deref(), &terminal)?;
        }
        Command::Check { model: path, target, json } => {
            if target != Target::TensorRt {
                return Err(Failure::BadInput(anyhow::anyhow!("check --target: tensorrt (the only runtime with rules to lint so far)")));
            }
            let model = load(&path, &terminal, false)?;
            let violations = onnxopt::lint::tensorrt::check(&model);
            let text = if json {
                serde_json::to_string_pretty(&violations).context("encoding the violations")? + "\n"
            } else {
                violations.iter().map(|v| format!("{v}\n")).collect()
            };
            write_stdout(&text)?;
            terminal.say(&format!("{}: {} violation(s) of TensorRT's explicit-quantization rules", path.display(), violations.len()));
            if !violations.is_empty() {
                return Err(Failure::Violations);
            }
        }
        Command::Calibrate { model: path, data, tensors, json } => {
            let source = data.source()?;
            let model = load(&path, &terminal, true)?;
            let taps = if tensors.is_empty() { onnxopt::calibrate::matmul_activations(&model) } else { tensors };
            let tap_names: Vec<&str> = taps.iter().map(String::as_str).collect();
            terminal.begin(&format!("calibrating {} tensors", taps.len()));
            let stats = onnxopt::calibrate::calibrate(&model, &tap_names, &source);
            terminal.end();
            let stats = stats.map_err(anyhow::Error::from)?;
            let text = if json {
                serde_json::to_string_pretty(&stats).context("encoding the statistics")? + "\n"
            } else {
                let mut lines = String::new();
                for s in &stats {
                    let range = s.percentile_range(99.9).map(|(lo, hi)| format!("{lo:.4} .. {hi:.4}")).unwrap_or_else(|| "-".into());
                    lines += &format!("{}: min {:.4}, max {:.4}, 99.9% in {range}, {} values\n", s.name, s.min, s.max, s.count);
                }
                lines
            };
            write_stdout(&text)?;
        }
        Command::Rules => {
            let rules = onnxopt::rewrite::standard_rules().map_err(anyhow::Error::from)?;
            let mut text = String::new();
            for rule in rules {
                let targets: Vec<String> = rule
                    .emissions
                    .iter()
                    .map(|e| match e.min_opset {
                        Some(v) => format!("{}@{v}", e.target),
                        None => e.target.clone(),
                    })
                    .collect();
                text += &format!("{} ({}) [{}]\n", rule.name, rule.location, targets.join(", "));
                for line in &rule.doc {
                    text += &format!("    # {line}\n");
                }
            }
            write_stdout(&text)?;
        }
        Command::Verify { reference, candidate, inputs, seed, atol, rtol, batch, seq, json, engine } => {
            let a = load(&reference, &terminal, true)?;
            let b = load(&candidate, &terminal, true)?;
            let inputs = inputs.map(|p| verify::read_npz(&p)).transpose().map_err(anyhow::Error::from)?;
            let options = verify::VerifyOptions { seed, sizes: verify::DimSizes { batch, sequence: seq }, atol, rtol, inputs, engine };
            terminal.begin(&format!("running both models ({})", engine.name()));
            let comparison = commands::verify(&a, &b, &options);
            terminal.end();
            let comparison = comparison.map_err(|e| Failure::Unverifiable(e.into()))?;
            if let Some(why) = &comparison.fallback {
                eprintln!("note: {why}");
            }
            let text = if json {
                serde_json::to_string_pretty(&comparison).context("encoding the comparison")? + "\n"
            } else {
                let verdict = |ok: bool| if ok { "ok" } else { "BEYOND TOLERANCE" };
                let line = |o: &verify::OutputComparison| {
                    format!(
                        "{} {:?}: max abs {:.3e}, max rel {:.3e}, cosine {:.6} {}\n",
                        o.name,
                        o.shape,
                        o.max_abs,
                        o.max_rel,
                        o.cosine,
                        verdict(o.within_tolerance)
                    )
                };
                comparison.outputs.iter().map(line).collect()
            };
            write_stdout(&text)?;
            if !comparison.passed() {
                return Err(Failure::VerificationFailed);
            }
        }
    }
    Ok(())
}

/// Writes a JSON report (optimize, quantize, prune).
fn write_report(path: &Path, json: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(json).context("encoding the report")?;
    std::fs::write(path, text).with_context(|| format!("{}: cannot write the report", path.display()))
}

/// Writes to stdout; a reader that closed the pipe early (`| head`) is not an error.
fn write_stdout(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::VerificationFailed) => {
            eprintln!("error: outputs differ beyond tolerance");
            ExitCode::from(1)
        }
        Err(Failure::Violations) => ExitCode::from(1),
        Err(Failure::Unverifiable(e)) => {
            eprintln!("error: could not verify: {}", commands::sentence(e.as_ref()));
            ExitCode::from(1)
        }
        Err(Failure::BadInput(e)) => {
            eprintln!("error: {}", commands::sentence(e.as_ref()));
            ExitCode::from(2)
        }
    }
}
