//! The `onnxopt` command line. Exit codes: 0 success, 1 verification failed,
//! 2 bad input or usage. Logic lives in the library; this file only wires it.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use onnxopt::passes::pipeline::{optimization_passes, quantization_passes, PipelineOptions, Target};
use onnxopt::passes::quantize_dynamic::QuantizeDynamic;
use onnxopt::passes::{run_pipeline, DriverOptions, PassRecord};
use onnxopt::{inspect, ir::Model, onnx, verify};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "onnxopt",
    version,
    about = "Makes transformer ONNX models smaller and faster, checking every result numerically in tract.",
    after_help = "Examples:\n  onnxopt inspect model.onnx\n  onnxopt convert model.onnx -o copy.onnx --external-data\n  onnxopt verify model.onnx rewritten.onnx --atol 1e-4\n\nExit codes: 0 ok, 1 verification failed, 2 bad input or usage."
)]
struct Cli {
    /// No progress output on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print what a model holds: versions, inputs and outputs, ops, parameters, architecture.
    #[command(after_help = "Examples:\n  onnxopt inspect model.onnx\n  onnxopt inspect model.onnx --json\n  onnxopt inspect model.onnx --graph")]
    Inspect {
        model: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Print the whole graph as text, one node a line.
        #[arg(long, conflicts_with = "json")]
        graph: bool,
    },
    /// Read a model and write it back unchanged (a lossless round trip), moving
    /// tensor data to or from an external file.
    #[command(after_help = "Examples:\n  onnxopt convert model.onnx -o copy.onnx\n  onnxopt convert big.onnx -o big-external.onnx --external-data\n  onnxopt convert external.onnx -o inline.onnx --inline")]
    Convert {
        input: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Fuse and clean up a model for a target, check the result in tract, write it.
    #[command(after_help = "Examples:\n  onnxopt optimize model.onnx -o model.ort.onnx --target ort --report report.json\n  onnxopt optimize model.onnx -o model.trt.onnx --target tensorrt\n  onnxopt optimize model.onnx -o model.std.onnx --target portable --opset 20   # standard Gelu\n  onnxopt optimize model.onnx -o out.onnx --stop-after 3     # bisect a bad rewrite\n  onnxopt optimize model.onnx -o out.onnx --trace-rule attention-sdpa --no-verify")]
    Optimize {
        input: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
        /// ort (com.microsoft fused ops), portable (standard ONNX), tensorrt.
        #[arg(long, default_value = "ort")]
        target: Target,
        /// Raise the model's default-domain (ai.onnx) opset to N first (17 to 23;
        /// exact; refused for a model with an op whose changes raise-opset does
        /// not know). Rules with newer standard ops then apply (Gelu from 20).
        #[arg(long, value_name = "N")]
        opset: Option<i64>,
        /// Write what each pass did, node counts and the verification as JSON.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Skip the tract check of the result against the input.
        #[arg(long)]
        no_verify: bool,
        /// Run only these passes (comma-separated names).
        #[arg(long, value_delimiter = ',')]
        passes: Option<Vec<String>>,
        /// Skip these passes (comma-separated names).
        #[arg(long, value_delimiter = ',')]
        skip: Vec<String>,
        /// Stop after this many patches (to find the one that broke something).
        #[arg(long)]
        stop_after: Option<usize>,
        /// Say why this rule did not fire where it nearly matched.
        #[arg(long)]
        trace_rule: Option<String>,
        #[arg(long, default_value_t = 1e-4)]
        atol: f32,
        #[arg(long, default_value_t = 1e-3)]
        rtol: f32,
    },
    /// Quantize a model's constant-weight MatMuls to int8, check it in tract, write it.
    #[command(after_help = "Examples:\n  onnxopt quantize model.onnx -o model.int8.onnx --mode int8-dynamic\n  onnxopt quantize model.onnx -o model.int8.onnx --mode int8-dynamic --target portable --exclude /pooler/dense/MatMul\n  onnxopt quantize model.onnx -o model.int8.onnx --mode int8-dynamic --atol 0.2 --report report.json")]
    Quantize {
        input: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
        /// int8-dynamic: int8 weights per output channel, activations quantized at run time.
        #[arg(long)]
        mode: QuantizeMode,
        /// ort (com.microsoft.DynamicQuantizeMatMul) or portable (standard ops).
        #[arg(long, default_value = "ort")]
        target: Target,
        /// Keep these MatMul/Gemm nodes in float (comma-separated node names).
        #[arg(long, value_delimiter = ',')]
        exclude: Vec<String>,
        /// Write what each pass did and the verification as JSON.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Skip the tract check of the result against the input.
        #[arg(long)]
        no_verify: bool,
        /// Smallest cosine similarity allowed between each output and the input's,
        /// in tract on seeded inputs (int8 rounding moves single values, not directions).
        #[arg(long, default_value_t = 0.98)]
        min_cosine: f64,
        /// Also bound every element: |a - b| <= atol + rtol * |a|.
        #[arg(long)]
        atol: Option<f32>,
        #[arg(long, default_value_t = 0.0)]
        rtol: f32,
    },
    /// Zero weights of linear layers (unstructured or N:M), re-fit the kept ones
    /// against the original on calibration data, check the result in tract, write it.
    #[command(after_help = "Examples:\n  onnxopt prune model.onnx -o sparse.onnx --method unstructured --sparsity 0.5 --calib-text calib.txt --tokenizer tokenizer.json\n  onnxopt prune model.onnx -o 24.onnx --method nm --nm 2:4 --calib-text calib.txt --tokenizer tokenizer.json --report r.json\n  onnxopt prune model.onnx -o mag.onnx --method unstructured --sparsity 0.3,/encoder/layer.0/attention/self/query/MatMul=0.1")]
    Prune {
        input: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
        /// unstructured (any weights) or nm (N of every M along the reduction axis).
        #[arg(long)]
        method: PruneMethodArg,
        /// Fraction of each layer's weights to zero, in [0, 1): a default and
        /// NAME=S overrides by node or weight name (comma-separated). Unstructured only.
        #[arg(long, value_delimiter = ',', default_value = "0.5")]
        sparsity: Vec<String>,
        /// The N:M pattern of --method nm: N nonzeros kept in every M weights.
        #[arg(long, default_value = "2:4")]
        nm: String,
        /// magnitude (|W|) or wanda (|W| x input norm; default with calibration data).
        #[arg(long)]
        importance: Option<PruneImportanceArg>,
        /// Re-fit the kept weights so each layer matches the original (default with calibration data).
        #[arg(long, conflicts_with = "no_reconstruct")]
        reconstruct: bool,
        #[arg(long)]
        no_reconstruct: bool,
        #[command(flatten)]
        data: CalibrationArgs,
        /// Write the layers, their errors, parameter and FLOP counts and the verification as JSON.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Skip the tract check of the result against the input.
        #[arg(long)]
        no_verify: bool,
        /// Smallest cosine similarity allowed between each output and the input's,
        /// in tract on the first calibration batch (seeded random inputs without
        /// calibration data: random token ids, a harsher test than text).
        #[arg(long, default_value_t = 0.8)]
        min_cosine: f64,
    },
    /// Run a model on calibration data and print statistics of the tensors that
    /// quantization and pruning read (every MatMul/Gemm activation, or --tensors).
    #[command(after_help = "Examples:\n  onnxopt calibrate model.onnx --calib-text calib.txt --tokenizer tokenizer.json\n  onnxopt calibrate model.onnx --calib batch.npz --tensors x,h --json")]
    Calibrate {
        model: PathBuf,
        #[command(flatten)]
        data: CalibrationArgs,
        /// Tensors to observe (comma-separated); default: the activation every
        /// MatMul or Gemm with a constant weight reads (the layers quantization
        /// and pruning change).
        #[arg(long, value_delimiter = ',')]
        tensors: Vec<String>,
        /// Everything, histograms included, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the fusion rules with the math each relies on.
    Rules,
    /// Run two models in tract on the same inputs and compare every output.
    #[command(after_help = "Examples:\n  onnxopt verify model.onnx optimized.onnx\n  onnxopt verify a.onnx b.onnx --inputs batch.npz --atol 1e-3\n\nRandom inputs are seeded: token ids below the embedding table size, attention\nmasks of ones with the second half of the batch padded, floats N(0,1).")]
    Verify {
        reference: PathBuf,
        candidate: PathBuf,
        /// Inputs as an .npz of arrays named after the model inputs.
        #[arg(long)]
        inputs: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 1e-4)]
        atol: f32,
        #[arg(long, default_value_t = 1e-3)]
        rtol: f32,
        /// Size given to an open batch dim.
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Size given to every other open dim.
        #[arg(long, default_value_t = 16)]
        seq: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum QuantizeMode {
    /// int8 weights, activations quantized per tensor at run time.
    Int8Dynamic,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PruneMethodArg {
    Unstructured,
    Nm,
    // structured, layers: with src/prune/structured.rs and layers.rs
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PruneImportanceArg {
    Magnitude,
    Wanda,
}

#[derive(Args)]
struct CalibrationArgs {
    /// Sentences, one per line (needs --tokenizer).
    #[arg(long, requires = "tokenizer", conflicts_with = "calib")]
    calib_text: Option<PathBuf>,
    /// The tokenizer.json of the model.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Input tensors as an .npz of arrays named after the model's inputs.
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Tokens per sentence at most (special tokens included).
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// Sentences (or npz rows) per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
}

impl CalibrationArgs {
    /// The source when calibration data was given.
    fn given(&self) -> Result<Option<onnxopt::calibrate::CalibrationSource>> {
        if self.calib_text.is_none() && self.calib.is_none() { Ok(None) } else { self.source().map(Some) }
    }
}

impl CalibrationArgs {
    fn source(&self) -> Result<onnxopt::calibrate::CalibrationSource> {
        use onnxopt::calibrate::CalibrationSource;
        match (&self.calib_text, &self.tokenizer, &self.calib) {
            (Some(file), Some(tokenizer), _) => Ok(CalibrationSource::Text {
                file: file.clone(),
                tokenizer: tokenizer.clone(),
                max_len: self.max_len,
                batch: self.batch,
            }),
            (_, _, Some(path)) => Ok(CalibrationSource::Npz { path: path.clone(), batch: self.batch }),
            _ => anyhow::bail!("calibration data needed: --calib-text FILE --tokenizer tokenizer.json, or --calib data.npz"),
        }
    }
}

#[derive(Args)]
struct OutputArgs {
    /// Where to write the model (never the input itself).
    #[arg(short, long)]
    output: PathBuf,
    /// Put every tensor of 1 KiB or more in OUTPUT.data.
    #[arg(long, conflicts_with = "inline")]
    external_data: bool,
    /// Put every tensor inline (fails past protobuf's 2 GiB limit).
    #[arg(long)]
    inline: bool,
}

impl OutputArgs {
    fn options(&self) -> onnx::SaveOptions {
        let external_data = if self.external_data {
            onnx::ExternalData::Always
        } else if self.inline {
            onnx::ExternalData::Never
        } else {
            onnx::ExternalData::AsInput
        };
        onnx::SaveOptions { external_data }
    }
}

/// An error that means "bad input" (exit 2) rather than "verification failed" (exit 1).
enum Failure {
    BadInput(anyhow::Error),
    VerificationFailed,
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::BadInput(e)
    }
}

struct Progress(Option<ProgressBar>);

impl Progress {
    fn start(quiet: bool, message: String) -> Progress {
        if quiet {
            return Progress(None);
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("static template"));
        bar.set_message(message);
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress(Some(bar))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// Reads a model; `populate` when every weight will be read (see `LoadOptions`).
fn load(path: &Path, quiet: bool, populate: bool) -> Result<Model> {
    let _progress = Progress::start(quiet, format!("reading {}", path.display()));
    Ok(onnx::load_with(path, onnx::LoadOptions { populate })?)
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

fn save(model: &Model, input: &Path, out: &OutputArgs, quiet: bool) -> Result<()> {
    check_not_input(input, &out.output)?;
    let _progress = Progress::start(quiet, format!("writing {}", out.output.display()));
    let summary = onnx::save(model, &out.output, &out.options())?;
    if !quiet {
        eprintln!("wrote {} ({} bytes)", out.output.display(), summary.model_bytes);
        if let Some((path, size)) = summary.external_file {
            eprintln!("wrote {} ({size} bytes of external data)", path.display());
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), Failure> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Inspect { model: path, json, graph } => {
            let model = load(&path, quiet, false)?;
            let text = if graph {
                model.to_string()
            } else if json {
                let summary = inspect::summarize(&model);
                serde_json::to_string_pretty(&summary).context("encoding the summary")? + "\n"
            } else {
                inspect::summarize(&model).to_string()
            };
            write_stdout(&text)?;
        }
        Command::Convert { input, output } => {
            let model = load(&input, quiet, true)?;
            save(&model, &input, &output, quiet)?;
        }
        Command::Optimize { input, output, target, opset, report, no_verify, passes, skip, stop_after, trace_rule, atol, rtol } => {
            let known = onnxopt::passes::pipeline::pass_names();
            if let Some(unknown) = passes.iter().flatten().chain(&skip).find(|n| !known.contains(&n.as_str())) {
                return Err(Failure::BadInput(anyhow::anyhow!("unknown pass '{unknown}' (passes: {})", known.join(", "))));
            }
            let original = load(&input, quiet, true)?;
            let options = PipelineOptions { only: passes, skip, trace_rule, opset };
            let pipeline = optimization_passes(target, &options);
            let mut optimized = original.clone();
            let driver = DriverOptions { stop_after, ..DriverOptions::default() };
            let records = {
                let _progress = Progress::start(quiet, format!("optimizing for {target}"));
                run_pipeline(&mut optimized, &pipeline, &driver).map_err(anyhow::Error::from)?
            };
            for note in records.iter().flat_map(|r| &r.notes) {
                eprintln!("trace: {note}");
            }
            if !quiet {
                print_records(&records);
            }
            let verify_options = verify::VerifyOptions { atol, rtol, ..Default::default() };
            let comparison = if no_verify {
                None
            } else {
                let _progress = Progress::start(quiet, "checking the result in tract".into());
                Some(onnxopt::passes::verify_rewrite(&original, &optimized, &verify_options).map_err(anyhow::Error::from)?)
            };
            if let Some(path) = &report {
                let json = serde_json::json!({
                    "input": input, "output": output.output, "target": target.name(),
                    "nodes_before": original.graph.node_count(), "nodes_after": optimized.graph.node_count(),
                    "opset_before": original.opset(""), "opset_after": optimized.opset(""),
                    "passes": records, "verification": comparison,
                });
                write_report(path, &json)?;
            }
            if let Some(c) = &comparison {
                if !quiet {
                    eprintln!("tract check: max abs {:.3e}, cosine {:.6}", c.max_abs(), c.min_cosine());
                }
                if !c.passed() {
                    let culprit = {
                        let _progress = Progress::start(quiet, "finding the pass that broke it".into());
                        onnxopt::passes::first_failing_pass(&original, &pipeline, &driver, &verify_options).map_err(anyhow::Error::from)?
                    };
                    let culprit = culprit.unwrap_or_else(|| "none alone (the passes together)".into());
                    eprintln!("error: the result differs from the input beyond tolerance; the first pass whose result does: {culprit}; nothing written (bisect its patches with --stop-after)");
                    return Err(Failure::VerificationFailed);
                }
            }
            save(&optimized, &input, &output, quiet)?;
        }
        Command::Quantize { input, output, mode: QuantizeMode::Int8Dynamic, target, exclude, report, no_verify, min_cosine, atol, rtol } => {
            if target == Target::TensorRt {
                return Err(Failure::BadInput(anyhow::anyhow!("quantize --target: ort or portable (TensorRT wants static Q/DQ, not dynamic quantization)")));
            }
            let original = load(&input, quiet, true)?;
            let named = |name: &String| original.graph.nodes().any(|n| &n.name == name || n.outputs.first() == Some(name));
            if let Some(unknown) = exclude.iter().find(|name| !named(name)) {
                return Err(Failure::BadInput(anyhow::anyhow!("--exclude: no node named '{unknown}' (nor writing a tensor of that name)")));
            }
            let pipeline = quantization_passes(QuantizeDynamic { target, exclude: exclude.into_iter().collect() });
            let mut quantized = original.clone();
            let records = {
                let _progress = Progress::start(quiet, format!("quantizing for {target}"));
                run_pipeline(&mut quantized, &pipeline, &DriverOptions::default()).map_err(anyhow::Error::from)?
            };
            if !quiet {
                print_records(&records);
            }
            let comparison = if no_verify {
                None
            } else {
                let _progress = Progress::start(quiet, "checking the result in tract".into());
                let options = verify::VerifyOptions { atol: atol.unwrap_or(f32::INFINITY), rtol, ..Default::default() };
                Some(onnxopt::passes::verify_rewrite(&original, &quantized, &options).map_err(anyhow::Error::from)?)
            };
            if let Some(path) = &report {
                let json = serde_json::json!({
                    "input": input, "output": output.output, "target": target.name(), "mode": "int8-dynamic",
                    "nodes_before": original.graph.node_count(), "nodes_after": quantized.graph.node_count(),
                    "passes": records, "verification": comparison,
                });
                write_report(path, &json)?;
            }
            if let Some(c) = &comparison {
                if !quiet {
                    eprintln!("tract check: max abs {:.3e}, cosine {:.6}", c.max_abs(), c.min_cosine());
                }
                let cosine = c.min_cosine();
                if !c.passed() || cosine < min_cosine {
                    eprintln!(
                        "error: the quantized model differs from the input beyond tolerance (cosine {cosine:.6}, --min-cosine {min_cosine}{}); nothing written (--exclude the sensitive MatMuls, or loosen the bound)",
                        atol.map(|a| format!(", --atol {a}")).unwrap_or_default()
                    );
                    return Err(Failure::VerificationFailed);
                }
            }
            save(&quantized, &input, &output, quiet)?;
        }
        Command::Prune { input, output, method, sparsity, nm, importance, reconstruct, no_reconstruct, data, report, no_verify, min_cosine } => {
            use onnxopt::prune::{Importance, LayerSparsity, PruneMethod, PruneOptions};
            let bad = |e: String| Failure::BadInput(anyhow::anyhow!(e));
            let method = match method {
                PruneMethodArg::Unstructured => PruneMethod::Unstructured,
                PruneMethodArg::Nm => PruneMethod::NofM(nm.parse().map_err(|e: String| bad(format!("--nm {e}")))?),
            };
            let calibration = data.given()?;
            let mut options = PruneOptions::new(method);
            options.sparsity = LayerSparsity::parse(&sparsity).map_err(anyhow::Error::from)?;
            options.importance = match importance {
                Some(PruneImportanceArg::Magnitude) => Importance::Magnitude,
                Some(PruneImportanceArg::Wanda) => Importance::Wanda,
                None if calibration.is_some() => Importance::Wanda,
                None => Importance::Magnitude,
            };
            options.reconstruct = reconstruct || (calibration.is_some() && !no_reconstruct);
            options.calibration = calibration;
            let original = load(&input, quiet, true)?;
            let mut pruned = {
                let _progress = Progress::start(quiet, "pruning".into());
                onnxopt::prune::prune(&original, &options).map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?
            };
            if !quiet {
                for l in &pruned.report.layers {
                    let error = |e: Option<f64>| e.map(|e| format!("{e:.4}")).unwrap_or_else(|| "-".into());
                    eprintln!("{:<48} {:?} sparsity {:.3}, error {} -> {}", l.node, l.shape, l.sparsity, error(l.error_before), error(l.error_after));
                }
                for s in &pruned.report.skipped {
                    eprintln!("skipped {}: {}", s.node, s.why);
                }
                let r = &pruned.report;
                eprintln!("{}; nonzero parameters {} -> {} of {}; {:.1} s, {} tract runs", r.removed.join("; "), r.nonzero_parameters_before, r.nonzero_parameters_after, r.parameters, r.seconds, r.calibration_runs);
            }
            if !no_verify {
                let _progress = Progress::start(quiet, "checking the result in tract".into());
                // on the first calibration batch when there is one: real text, not random ids
                let inputs = match &options.calibration {
                    Some(source) => source.batches(&original).map_err(anyhow::Error::from)?.next().transpose().map_err(anyhow::Error::from)?,
                    None => None,
                };
                let options = verify::VerifyOptions { atol: f32::INFINITY, rtol: 0.0, inputs, ..Default::default() };
                pruned.report.verification = Some(onnxopt::passes::verify_rewrite(&original, &pruned.model, &options).map_err(anyhow::Error::from)?);
            }
            if let Some(path) = &report {
                write_report(path, &serde_json::to_value(&pruned.report).context("encoding the report")?)?;
            }
            if let Some(c) = &pruned.report.verification {
                let cosine = c.min_cosine();
                if !quiet {
                    eprintln!("tract check: max abs {:.3e}, cosine {cosine:.6}", c.max_abs());
                }
                if cosine < min_cosine {
                    eprintln!("error: the pruned model's outputs point elsewhere than the input's (cosine {cosine:.6}, --min-cosine {min_cosine}); nothing written (prune less, or loosen the bound)");
                    return Err(Failure::VerificationFailed);
                }
            }
            save(&pruned.model, &input, &output, quiet)?;
        }
        Command::Calibrate { model: path, data, tensors, json } => {
            let source = data.source()?;
            let model = load(&path, quiet, true)?;
            let taps: Vec<String> = if tensors.is_empty() {
                let mut reads: Vec<String> = model
                    .graph
                    .nodes()
                    .filter(|n| n.is_onnx("MatMul") || n.is_onnx("Gemm"))
                    .filter(|n| n.inputs.get(1).is_some_and(|w| model.graph.initializer(w).is_some()))
                    .filter_map(|n| n.inputs.first().cloned())
                    .filter(|t| model.graph.initializer(t).is_none())
                    .collect();
                let mut seen = std::collections::HashSet::new();
                reads.retain(|t| seen.insert(t.clone()));
                reads
            } else {
                tensors
            };
            let tap_names: Vec<&str> = taps.iter().map(String::as_str).collect();
            let stats = {
                let _progress = Progress::start(quiet, format!("calibrating {} tensors", taps.len()));
                onnxopt::calibrate::calibrate(&model, &tap_names, &source).map_err(anyhow::Error::from)?
            };
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
            for rule in rules {
                let targets: Vec<String> = rule
                    .emissions
                    .iter()
                    .map(|e| match e.min_opset { Some(v) => format!("{}@{v}", e.target), None => e.target.clone() })
                    .collect();
                println!("{} ({}) [{}]", rule.name, rule.location, targets.join(", "));
                for line in &rule.doc {
                    println!("    # {line}");
                }
            }
        }
        Command::Verify { reference, candidate, inputs, seed, atol, rtol, batch, seq, json } => {
            let a = load(&reference, quiet, true)?;
            let b = load(&candidate, quiet, true)?;
            let inputs = inputs.map(|p| verify::read_npz(&p)).transpose().map_err(anyhow::Error::from)?;
            let options = verify::VerifyOptions { seed, sizes: verify::DimSizes { batch, sequence: seq }, atol, rtol, inputs };
            let comparison = {
                let _progress = Progress::start(quiet, "running both models in tract".into());
                verify::compare(&a, &b, &options).map_err(anyhow::Error::from)?
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&comparison).context("encoding the comparison")?);
            } else {
                for o in &comparison.outputs {
                    println!(
                        "{} {:?}: max abs {:.3e}, max rel {:.3e}, cosine {:.6} {}",
                        o.name,
                        o.shape,
                        o.max_abs,
                        o.max_rel,
                        o.cosine,
                        if o.within_tolerance { "ok" } else { "BEYOND TOLERANCE" }
                    );
                }
            }
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

fn print_records(records: &[PassRecord]) {
    for r in records {
        let rules: Vec<String> = r.by_origin.iter().map(|(k, v)| format!("{k} x{v}")).collect();
        eprintln!(
            "{:<28} {:>4} patches, nodes {:>4} -> {:<4} {:>6} ms  {}",
            r.pass,
            r.patches,
            r.nodes_before,
            r.nodes_after,
            r.milliseconds,
            rules.join(", ")
        );
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
        Err(Failure::BadInput(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
