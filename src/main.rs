//! The `onnxopt` command line. Exit codes: 0 success, 1 verification failed,
//! 2 bad input or usage. Logic lives in the library; this file only wires it.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use onnxopt::passes::pipeline::{
    cleanup_passes, float16_passes, int8_fusion_passes, optimization_passes, quantization_passes, static_quantization_passes, PipelineOptions, Target,
};
use onnxopt::passes::quantize_dynamic::{calibrate_int8, ActivationScale, Int8Calibration, QuantizeDynamic};
use onnxopt::passes::quantize_fp16::{ConvertToFloat16, Float16Scope};
use onnxopt::passes::quantize_gather_int4::QuantizeGatherInt4;
use onnxopt::passes::quantize_int4::{activation_hessians, QuantizeInt4, Rounding};
use onnxopt::passes::quantize_static::{activation_ranges, activations_to_calibrate, CalibrationMethod, QuantizeStatic, WeightType};
use onnxopt::passes::{run_pipeline, DriverOptions, PassRecord};
use onnxopt::sensitivity::{Int8Choice, Int8Search};
use onnxopt::{inspect, ir::Model, onnx, verify};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "onnxopt",
    version,
    about = "Makes transformer ONNX models smaller and faster, checking every result numerically (tract, or ONNX Runtime).",
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
    #[command(
        after_help = "Examples:\n  onnxopt convert model.onnx -o copy.onnx\n  onnxopt convert big.onnx -o big-external.onnx --external-data\n  onnxopt convert external.onnx -o inline.onnx --inline"
    )]
    Convert {
        input: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Fuse and clean up a model for a target, check the result against the input, write it.
    #[command(
        after_help = "Examples:\n  onnxopt optimize model.onnx -o model.ort.onnx --target ort --report report.json\n  onnxopt optimize model.onnx -o model.trt.onnx --target tensorrt\n  onnxopt optimize model.onnx -o model.std.onnx --target portable --opset 20   # standard Gelu\n  onnxopt optimize model.onnx -o out.onnx --stop-after 3     # bisect a bad rewrite\n  onnxopt optimize model.onnx -o out.onnx --trace-rule attention-sdpa --no-verify"
    )]
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
        /// Write the result without checking it against the input.
        #[arg(long)]
        no_verify: bool,
        /// The engine that runs the input and the result to compare them: auto
        /// (tract; ONNX Runtime where tract cannot run them), tract, or ort
        /// (ONNX Runtime from ORT_DYLIB_PATH or the onnxruntime Python wheel;
        /// com.microsoft ops run in ORT's own kernels).
        #[arg(long, default_value = "auto")]
        engine: verify::Engine,
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
    /// Quantize a model's constant-weight MatMuls to int8 or int4 (or its weights and compute to float16), check it against the input, write it.
    #[command(
        after_help = "Examples:\n  onnxopt quantize model.onnx -o model.int8.onnx --mode int8 --calib-text calib.txt --tokenizer tokenizer.json\n  onnxopt quantize model.onnx -o model.int8.onnx --mode int8-dynamic --activations per-token\n  onnxopt quantize model.onnx -o model.qdq.onnx --mode int8-static --target tensorrt --calib data.npz\n  onnxopt quantize model.onnx -o model.fp16.onnx --mode fp16   # float16 weights, float32 compute (ORT CPU)\n  onnxopt quantize model.onnx -o model.int4.onnx --mode int4-weight --block-size 32 --rounding gptq --calib-text calib.txt --tokenizer tokenizer.json\n  onnxopt quantize model.onnx -o model.int8.onnx --mode int8-dynamic --target portable --exclude /pooler/dense/MatMul"
    )]
    Quantize {
        input: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
        /// The quantization scheme (see the modes below).
        #[arg(long)]
        mode: QuantizeMode,
        /// int8, int8-dynamic: ort (com.microsoft ops) or portable (standard ops);
        /// int8-static: ort (uint8 activations, QDQ that ORT fuses) or tensorrt (int8 symmetric, TensorRT's placement);
        /// fp16: ort stores weights in float16 and computes in float32 (ORT's CPU provider has
        /// no float16 MatMul on x86-64: it would Cast around every node); portable and
        /// tensorrt compute in float16 too, range-sensitive ops (Softmax, norms, Pow, ...) in float32.
        #[arg(long, default_value = "ort")]
        target: Target,
        /// int8 modes: per-tensor (one scale per activation tensor) or per-token
        /// (one scale per row: closer to float, a few more ops). --mode int8 is per-token.
        #[arg(long, default_value = "per-tensor")]
        activations: ActivationArg,
        /// Keep these nodes in float32 (comma-separated node names; int8: MatMul/Gemm).
        #[arg(long, value_delimiter = ',')]
        exclude: Vec<String>,
        /// Keep the layers that cost the output most in float until the model's
        /// error on calibration data is at most E: the mean over tokens of
        /// 1 - cosine to the input's output (e.g. 0.002). Per-layer errors go to
        /// the report. Needs calibration data; --mode int8 uses 0.003 by default.
        #[arg(long, value_name = "E")]
        max_error: Option<f64>,
        /// Calibration batches the --max-error search measures on (the model runs
        /// once per layer and batch).
        #[arg(long, default_value_t = 4)]
        max_error_batches: usize,
        /// The highest default-domain (ai.onnx) opset the output may import.
        /// --mode int8 for ORT raises a model to 23 to write its attention as
        /// ONNX Attention (faster on ORT's CPU, but only ORT 1.23 or later loads
        /// it); with N below 23 the attention stays
        /// com.microsoft.MultiHeadAttention and the output keeps the input's
        /// opset. --mode int4-weight for portable and tensorrt needs 21
        /// (int4 DequantizeLinear). Refused below the input's own opset.
        #[arg(long, value_name = "N")]
        max_opset: Option<i64>,
        /// SmoothQuant migration strength (0..1, typically 0.5): move outlier
        /// channels' range from activations into weights first (needs
        /// calibration data; an exact rewrite, checked in tract).
        #[arg(long, value_name = "ALPHA")]
        smoothquant: Option<f32>,
        #[command(flatten)]
        calibration: CalibrationArgs,
        /// Write what each pass did and the verification as JSON.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Write the result without checking it against the input.
        #[arg(long)]
        no_verify: bool,
        /// The engine that runs the input and the result to compare them: auto
        /// (tract; ONNX Runtime where tract cannot run them), tract, or ort
        /// (ONNX Runtime from ORT_DYLIB_PATH or the onnxruntime Python wheel;
        /// com.microsoft ops run in ORT's own kernels).
        #[arg(long, default_value = "auto")]
        engine: verify::Engine,
        /// Smallest cosine similarity allowed between each output and the input's,
        /// in tract on seeded inputs (int8 rounding moves single values, not directions).
        /// Default 0.98 for the int8 modes, 0.9999 for fp16, 0.9 for int4-weight
        /// (all-MiniLM-L6-v2 at int4 scores 0.93-0.96 on the seeded random token
        /// ids, 0.99 mean cosine on real sentences with GPTQ).
        #[arg(long)]
        min_cosine: Option<f64>,
        /// Also bound every element: |a - b| <= atol * s + rtol * |a|, s = max(1, the
        /// output's RMS) (default: no bound for
        /// int8-dynamic; for fp16 2e-2 and 1e-2, float16's rounding compounded).
        #[arg(long)]
        atol: Option<f32>,
        #[arg(long)]
        rtol: Option<f32>,
        /// int8-static: how each activation's range is chosen from calibration.
        #[arg(long, default_value = "percentile")]
        calibration_method: CalibrationMethodArg,
        /// With --calibration-method percentile: the central percentage kept.
        #[arg(long, default_value_t = 99.99)]
        percentile: f64,
        /// int8-static: int8 or uint8 weights (symmetric either way; uint8 has zero
        /// point 128). Default: uint8 for ort (ORT's u8s8 kernel saturates on x86
        /// CPUs without VNNI; on VNNI machines int8 is as exact), int8 for tensorrt
        /// (the only type it takes).
        #[arg(long)]
        weight_type: Option<WeightTypeArg>,
        /// int4-weight: input features sharing one scale (32, 64 or 128).
        #[arg(long, default_value_t = 32)]
        block_size: usize,
        /// Weight rounding for int4-weight and the dynamic int8 modes: rtn (round
        /// to nearest) or gptq (needs calibration data). Default: gptq for
        /// --mode int8 with calibration data, else rtn.
        #[arg(long)]
        rounding: Option<RoundingArg>,
        /// int4-weight: a zero point per block (16 levels) rather than symmetric (15).
        #[arg(long)]
        zero_point: bool,
        /// int4-weight --target ort: MatMulNBits' accuracy_level. 4 (the
        /// default) quantizes the activations to int8 per block and multiplies
        /// in int8, as ORT GenAI's builder writes for CPU (about 2x faster
        /// decoding than float); 0 multiplies in float32.
        #[arg(long, value_parser = clap::builder::TypedValueParser::map(clap::builder::PossibleValuesParser::new(["0", "4"]), |s: String| s.parse::<i64>().unwrap_or(0)))]
        accuracy_level: Option<i64>,
        /// int4-weight: embedding tables (Gathers from a constant [V, D] table)
        /// int4 too, block-wise per row. Shrinks all-MiniLM-L6-v2's file from
        /// 0.60x to 0.16x, at a fidelity cost (see the README).
        #[arg(long)]
        quantize_embeddings: bool,
    },
    /// Lint a QDQ model against a runtime's quantization rules; exit 1 on violations.
    #[command(after_help = "Examples:\n  onnxopt check --target tensorrt model.qdq.onnx\n  onnxopt check --target tensorrt model.qdq.onnx --json")]
    Check {
        model: PathBuf,
        /// tensorrt (explicit quantization: int8, zero point 0, Q/DQ placement).
        #[arg(long)]
        target: Target,
        /// The violations as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Prune: zero weights of linear layers (unstructured or N:M), or remove
    /// attention heads and FFN neurons (structured) or whole layers; re-fit what
    /// is kept against the original on calibration data, check the result, write it.
    #[command(
        after_help = "Examples:\n  onnxopt prune model.onnx -o small.onnx --method structured --keep-flops 0.7 --calib-text calib.txt --tokenizer tokenizer.json\n  onnxopt prune model.onnx -o small.onnx --method layers --drop-layers 2 --calib-text calib.txt --tokenizer tokenizer.json\n  onnxopt prune model.onnx -o sparse.onnx --method unstructured --sparsity 0.5 --calib-text calib.txt --tokenizer tokenizer.json\n  onnxopt prune model.onnx -o 24.onnx --method nm --nm 2:4 --calib-text calib.txt --tokenizer tokenizer.json --report r.json\n  onnxopt prune model.onnx -o mag.onnx --method unstructured --sparsity 0.3,/encoder/layer.0/attention/self/query/MatMul=0.1"
    )]
    Prune {
        input: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
        /// unstructured (any weights), nm (N of every M along the reduction axis),
        /// structured (attention heads and FFN neurons, to --keep-flops) or layers
        /// (--drop-layers whole blocks).
        #[arg(long)]
        method: PruneMethodArg,
        /// structured: fraction of the blocks' linear-layer FLOPs to keep.
        #[arg(long, default_value_t = 0.7)]
        keep_flops: f64,
        /// layers: how many blocks to drop.
        #[arg(long, default_value_t = 1)]
        drop_layers: usize,
        /// Fraction of each layer's weights to zero, in [0, 1): a default and
        /// NAME=S overrides by node or weight name (comma-separated). Unstructured only.
        #[arg(long, value_delimiter = ',', default_value = "0.5")]
        sparsity: Vec<String>,
        /// The N:M pattern of --method nm: N nonzeros kept in every M weights.
        #[arg(long, default_value = "2:4")]
        nm: String,
        /// magnitude (|W|), wanda (|W| x input norm) or obs (Optimal Brain Surgeon: |W| / sqrt([(X^T X)^-1]_kk), what a weight costs after the re-fit; default with calibration data).
        #[arg(long)]
        importance: Option<PruneImportanceArg>,
        /// Re-fit the kept weights so each layer matches the original (default with calibration data).
        #[arg(long, conflicts_with = "no_reconstruct")]
        reconstruct: bool,
        #[arg(long)]
        no_reconstruct: bool,
        /// The re-fit's ridge term (towards the original weights), relative to
        /// the mean diagonal of the layer input's Gram matrix: larger fits the
        /// calibration data less closely. Default: chosen per layer by two-fold
        /// cross-validation over the calibration batches.
        #[arg(long)]
        damping: Option<f64>,
        /// OBS importance with the re-fit: choose each mask in this many rounds,
        /// each after the first ranking the weights re-fitted to what is still kept.
        #[arg(long, default_value_t = onnxopt::prune::DEFAULT_OBS_ROUNDS as u64, value_parser = clap::value_parser!(u64).range(1..=16))]
        obs_rounds: u64,
        #[command(flatten)]
        data: CalibrationArgs,
        /// Write the layers, their errors, parameter and FLOP counts and the verification as JSON.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Write the result without checking it against the input.
        #[arg(long)]
        no_verify: bool,
        /// The engine that runs the input and the result to compare them: auto
        /// (tract; ONNX Runtime where tract cannot run them), tract, or ort
        /// (ONNX Runtime from ORT_DYLIB_PATH or the onnxruntime Python wheel;
        /// com.microsoft ops run in ORT's own kernels).
        #[arg(long, default_value = "auto")]
        engine: verify::Engine,
        /// Smallest cosine similarity allowed between each output and the input's,
        /// in tract on the first calibration batch (seeded random inputs without
        /// calibration data: random token ids, a harsher test than text).
        #[arg(long, default_value_t = 0.8)]
        min_cosine: f64,
    },
    /// Run a model on calibration data and print statistics of the tensors that
    /// quantization and pruning read (every MatMul/Gemm activation, or --tensors).
    #[command(
        after_help = "Examples:\n  onnxopt calibrate model.onnx --calib-text calib.txt --tokenizer tokenizer.json\n  onnxopt calibrate model.onnx --calib batch.npz --tensors x,h --json"
    )]
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
    /// Run two models on the same inputs (tract or ONNX Runtime) and compare every output
    /// (for tract, com.microsoft ops and standard ops it runs unfaithfully are lowered first;
    /// decoders with a KV cache run a prefill and two decode steps).
    #[command(
        after_help = "Examples:\n  onnxopt verify model.onnx optimized.onnx\n  onnxopt verify a.onnx b.onnx --inputs batch.npz --atol 1e-3\n\nRandom inputs are seeded: token ids below the embedding table size, attention\nmasks of ones with the second half of the batch padded, floats N(0,1)."
    )]
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
        /// Size given to every other open dim (a decoder's prefill length).
        #[arg(long, default_value_t = 16)]
        seq: usize,
        #[arg(long)]
        json: bool,
        /// The engine that runs the input and the result to compare them: auto
        /// (tract; ONNX Runtime where tract cannot run them), tract, or ort
        /// (ONNX Runtime from ORT_DYLIB_PATH or the onnxruntime Python wheel;
        /// com.microsoft ops run in ORT's own kernels).
        #[arg(long, default_value = "auto")]
        engine: verify::Engine,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ActivationArg {
    PerTensor,
    PerToken,
}

impl From<ActivationArg> for ActivationScale {
    fn from(a: ActivationArg) -> ActivationScale {
        match a {
            ActivationArg::PerTensor => ActivationScale::PerTensor,
            ActivationArg::PerToken => ActivationScale::PerToken,
        }
    }
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum QuantizeMode {
    /// What most users want: fusion for the target, then int8 weights and
    /// activations for the MatMuls left. With calibration data: GPTQ-rounded
    /// weights, and per-tensor activation scales where they cost little,
    /// per-token ones where they do not, until the error on the calibration
    /// data is within --max-error (default 0.003); only if per token
    /// everywhere is still over, the costliest layers stay in float.
    Int8,
    /// int8 weights, activations quantized at run time, per tensor or per token (--activations).
    Int8Dynamic,
    /// float16 weights (and compute, for portable and tensorrt), float32 inputs and outputs.
    Fp16,
    /// int8 weights and activations, activation scales from calibration (QDQ).
    Int8Static,
    /// Block-wise int4 weights, float activations (com.microsoft.MatMulNBits for
    /// ort; DequantizeLinear-21 int4 + MatMul for portable and tensorrt).
    Int4Weight,
}

impl QuantizeMode {
    fn name(self) -> &'static str {
        match self {
            QuantizeMode::Int8 => "int8",
            QuantizeMode::Int8Dynamic => "int8-dynamic",
            QuantizeMode::Fp16 => "fp16",
            QuantizeMode::Int8Static => "int8-static",
            QuantizeMode::Int4Weight => "int4-weight",
        }
    }

    /// The default check: (min cosine, atol, rtol).
    fn tolerance(self) -> (f64, f32, f32) {
        match self {
            QuantizeMode::Int8 | QuantizeMode::Int8Dynamic | QuantizeMode::Int8Static => (0.98, f32::INFINITY, 0.0),
            QuantizeMode::Int4Weight => (0.9, f32::INFINITY, 0.0),
            QuantizeMode::Fp16 => (0.9999, onnxopt::passes::quantize_fp16::CHECK_ATOL, onnxopt::passes::quantize_fp16::CHECK_RTOL),
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum WeightTypeArg {
    Int8,
    Uint8,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CalibrationMethodArg {
    /// Every value seen.
    Minmax,
    /// The central --percentile of the values.
    Percentile,
    /// TensorRT's entropy (KL-divergence) threshold.
    Entropy,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RoundingArg {
    /// Round to nearest.
    Rtn,
    /// GPTQ against the calibration activations.
    Gptq,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum PruneMethodArg {
    Unstructured,
    Nm,
    /// Attention heads and FFN neurons, to --keep-flops.
    Structured,
    /// Whole transformer blocks, --drop-layers of them.
    Layers,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PruneImportanceArg {
    Magnitude,
    Wanda,
    /// Optimal Brain Surgeon's saliency |W| / sqrt([(X^T X)^-1]_kk).
    Obs,
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
    /// Whether any calibration data was given.
    fn given(&self) -> bool {
        self.calib_text.is_some() || self.calib.is_some()
    }

    /// The source when calibration data was given.
    fn optional_source(&self) -> Result<Option<onnxopt::calibrate::CalibrationSource>> {
        if self.given() {
            self.source().map(Some)
        } else {
            Ok(None)
        }
    }

    fn source(&self) -> Result<onnxopt::calibrate::CalibrationSource> {
        use onnxopt::calibrate::CalibrationSource;
        match (&self.calib_text, &self.tokenizer, &self.calib) {
            (Some(file), Some(tokenizer), _) => {
                Ok(CalibrationSource::Text { file: file.clone(), tokenizer: tokenizer.clone(), max_len: self.max_len, batch: self.batch })
            }
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
    /// No engine could run the models to compare them: not the input's fault.
    Unverifiable(anyhow::Error),
    /// `check` found rule violations (printed already).
    Violations,
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
        Command::Optimize { input, output, target, opset, report, no_verify, engine, passes, skip, stop_after, trace_rule, atol, rtol } => {
            let known = onnxopt::passes::pipeline::pass_names();
            if let Some(unknown) = passes.iter().flatten().chain(&skip).find(|n| !known.contains(&n.as_str())) {
                return Err(Failure::BadInput(anyhow::anyhow!("unknown pass '{unknown}' (passes: {})", known.join(", "))));
            }
            let original = load(&input, quiet, true)?;
            let options = PipelineOptions { only: passes, skip, trace_rule, opset, skip_rules: Vec::new() };
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
            let verify_options = verify::VerifyOptions { atol, rtol, engine, ..Default::default() };
            let comparison = check_result(&original, &optimized, &verify_options, no_verify, quiet)?;
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
                    print_check(c);
                }
                if !c.passed() {
                    let culprit = {
                        let _progress = Progress::start(quiet, "finding the pass that broke it".into());
                        // in the engine that ran the check (ORT when tract could not)
                        let options = verify::VerifyOptions { engine: c.engine, ..verify_options.clone() };
                        onnxopt::passes::first_failing_pass(&original, &pipeline, &driver, &options).map_err(anyhow::Error::from)?
                    };
                    let culprit = culprit.unwrap_or_else(|| "none alone (the passes together)".into());
                    eprintln!("error: the result differs from the input beyond tolerance; the first pass whose result does: {culprit}; nothing written (bisect its patches with --stop-after)");
                    return Err(Failure::VerificationFailed);
                }
            }
            save(&optimized, &input, &output, quiet)?;
        }
        Command::Quantize {
            input,
            output,
            mode: QuantizeMode::Int4Weight,
            target,
            exclude,
            report,
            no_verify,
            engine,
            min_cosine,
            atol,
            rtol,
            block_size,
            rounding,
            zero_point,
            accuracy_level,
            quantize_embeddings,
            calibration,
            max_opset,
            ..
        } => {
            if accuracy_level.is_some() && target != Target::Ort {
                return Err(Failure::BadInput(anyhow::anyhow!(
                    "--accuracy-level is MatMulNBits' (--target ort); --target {target} writes DequantizeLinear + MatMul"
                )));
            }
            let accuracy_level = accuracy_level.unwrap_or(4);
            let min_cosine = min_cosine.unwrap_or(0.9);
            let rtol = rtol.unwrap_or(0.0);
            if ![32, 64, 128].contains(&block_size) {
                return Err(Failure::BadInput(anyhow::anyhow!("--block-size {block_size}: 32, 64 or 128")));
            }
            let source = (rounding == Some(RoundingArg::Gptq)).then(|| calibration.source()).transpose()?;
            let started = std::time::Instant::now();
            let original = load(&input, quiet, true)?;
            check_exclusions(&original, &exclude)?;
            let exclude: std::collections::HashSet<String> = exclude.into_iter().collect();
            // the portable forms need DequantizeLinear-21 (int4, block_size)
            let opset = original.opset("").unwrap_or(0);
            let raise = (target != Target::Ort && opset < onnxopt::passes::quantize_int4::BLOCKED_DEQUANTIZE_OPSET)
                .then_some(onnxopt::passes::quantize_int4::BLOCKED_DEQUANTIZE_OPSET);
            check_max_opset(max_opset, &input, &original)?;
            if let (Some(highest), Some(needed)) = (max_opset, raise) {
                if highest < needed {
                    return Err(Failure::BadInput(anyhow::anyhow!("--max-opset {highest}: --mode int4-weight --target {target} writes DequantizeLinear with int4 blocks, from opset {needed} (--target ort needs no raise)")));
                }
            }
            let cleanup = optimization_passes(target, &PipelineOptions { opset: raise, ..PipelineOptions::cleanup_only() });
            let mut quantized = original.clone();
            let mut records = {
                let _progress = Progress::start(quiet, "cleaning up".into());
                run_pipeline(&mut quantized, &cleanup, &DriverOptions::default()).map_err(anyhow::Error::from)?
            };
            let rounding = match &source {
                None => Rounding::Nearest,
                Some(source) => {
                    let _progress = Progress::start(quiet, "calibrating (X^T X of every quantized MatMul's input)".into());
                    let hessians = activation_hessians(&quantized, source, block_size, &exclude).map_err(anyhow::Error::from)?;
                    Rounding::Gptq { hessians, options: Default::default() }
                }
            };
            // embeddings last: type inference does not see through the contrib op
            // that replaces them, and quantize-int4 takes only float32 activations
            let mut passes: Vec<Box<dyn onnxopt::passes::Pass>> =
                vec![Box::new(QuantizeInt4 { target, block_size, zero_point, rounding, exclude: exclude.clone(), accuracy_level })];
            if quantize_embeddings {
                passes.push(Box::new(QuantizeGatherInt4 { target, block_size, zero_point, exclude }));
            }
            passes.push(Box::new(onnxopt::passes::dead_code::EliminateDeadCode));
            records.extend({
                let _progress = Progress::start(quiet, format!("quantizing to int4 for {target}"));
                run_pipeline(&mut quantized, &passes, &DriverOptions::default()).map_err(anyhow::Error::from)?
            });
            if !quiet {
                print_records(&records);
            }
            let initializer_bytes = |m: &Model| m.graph.initializers.iter().map(|t| t.byte_len()).sum::<u64>();
            let replaced: u64 = original.graph.initializers.iter().filter(|t| quantized.graph.initializer(&t.name).is_none()).map(|t| t.byte_len()).sum();
            let int4: u64 = quantized.graph.initializers.iter().filter(|t| original.graph.initializer(&t.name).is_none()).map(|t| t.byte_len()).sum();
            if !quiet {
                eprintln!(
                    "weights: {replaced} float bytes -> {int4} int4 bytes with scales ({:.3}x); all initializers {} -> {} bytes",
                    int4 as f64 / replaced.max(1) as f64,
                    initializer_bytes(&original),
                    initializer_bytes(&quantized)
                );
            }
            let options = verify::VerifyOptions { atol: atol.unwrap_or(f32::INFINITY), rtol, engine, ..Default::default() };
            let comparison = check_result(&original, &quantized, &options, no_verify, quiet)?;
            if let Some(path) = &report {
                let json = serde_json::json!({
                    "input": input, "output": output.output, "target": target.name(), "mode": "int4-weight",
                    "block_size": block_size, "rounding": if source.is_some() { "gptq" } else { "rtn" }, "zero_point": zero_point, "accuracy_level": accuracy_level,
                    "embeddings": if quantize_embeddings { "int4, rounded to nearest" } else { "float32" },
                    "nodes_before": original.graph.node_count(), "nodes_after": quantized.graph.node_count(),
                    "replaced_float_weight_bytes": replaced, "int4_weight_bytes": int4,
                    "initializer_bytes_before": initializer_bytes(&original), "initializer_bytes_after": initializer_bytes(&quantized),
                    "seconds": started.elapsed().as_secs_f64(),
                    "passes": records, "verification": comparison,
                    // what `onnxopt verify INPUT OUTPUT` reproduces: the same seeded inputs and lowering
                    "verify_tolerance": comparison.as_ref().map(|c| serde_json::json!({ "atol": c.max_abs(), "rtol": 0.0, "min_cosine": c.min_cosine() })),
                });
                write_report(path, &json)?;
            }
            let bound = atol.map(|a| format!(", --atol {a}")).unwrap_or_default();
            check_quantized(
                comparison.as_ref(),
                min_cosine,
                &bound,
                "--exclude the sensitive MatMuls, a smaller --block-size, --rounding gptq, or loosen the bound",
                quiet,
            )?;
            save(&quantized, &input, &output, quiet)?;
        }
        Command::Quantize {
            input,
            output,
            mode,
            target,
            activations,
            exclude,
            max_error,
            max_error_batches,
            max_opset,
            smoothquant,
            calibration,
            calibration_method,
            percentile,
            weight_type,
            rounding,
            report,
            no_verify,
            engine,
            min_cosine,
            atol,
            rtol,
            accuracy_level,
            ..
        } => {
            if accuracy_level.is_some() {
                return Err(Failure::BadInput(anyhow::anyhow!("--accuracy-level is for --mode int4-weight (MatMulNBits), not --mode {}", mode.name())));
            }
            let (default_cosine, default_atol, default_rtol) = mode.tolerance();
            let (min_cosine, atol_bound, rtol) = (min_cosine.unwrap_or(default_cosine), atol.unwrap_or(default_atol), rtol.unwrap_or(default_rtol));
            let int8 = matches!(mode, QuantizeMode::Int8 | QuantizeMode::Int8Dynamic);
            if target == Target::TensorRt && int8 {
                return Err(Failure::BadInput(anyhow::anyhow!("quantize --target: ort or portable (TensorRT wants static Q/DQ, not dynamic quantization)")));
            }
            if mode == QuantizeMode::Int8Static && target == Target::Portable {
                return Err(Failure::BadInput(anyhow::anyhow!("quantize --mode int8-static --target: ort or tensorrt")));
            }
            let needs_calibration =
                |what: &str| anyhow::anyhow!("{what} needs calibration data: --calib-text FILE --tokenizer tokenizer.json, or --calib data.npz");
            let max_error = match (mode, max_error) {
                (_, Some(e)) if !calibration.given() => return Err(Failure::BadInput(needs_calibration(&format!("--max-error {e}")))),
                (QuantizeMode::Int8, None) if calibration.given() => Some(DEFAULT_INT8_MAX_ERROR),
                (_, given) => given,
            };
            let activations = if mode == QuantizeMode::Int8 { ActivationScale::PerToken } else { activations.into() };
            let gptq = match (rounding, mode) {
                (Some(RoundingArg::Gptq), QuantizeMode::Int8 | QuantizeMode::Int8Dynamic) if !calibration.given() => {
                    return Err(Failure::BadInput(needs_calibration("--rounding gptq")));
                }
                (Some(RoundingArg::Gptq), QuantizeMode::Int8 | QuantizeMode::Int8Dynamic) => true,
                (Some(RoundingArg::Gptq), _) => {
                    return Err(Failure::BadInput(anyhow::anyhow!("--rounding gptq: for --mode int8, int8-dynamic or int4-weight")))
                }
                (None, QuantizeMode::Int8) => calibration.given(),
                _ => false,
            };
            let original = load(&input, quiet, true)?;
            check_exclusions(&original, &exclude)?;
            check_max_opset(max_opset, &input, &original)?;
            let mut original_or_smoothed = original.clone();
            if let Some(alpha) = smoothquant {
                if !(0.0..=1.0).contains(&alpha) {
                    return Err(Failure::BadInput(anyhow::anyhow!("--smoothquant {alpha}: the strength is between 0 and 1")));
                }
                if !calibration.given() {
                    return Err(Failure::BadInput(needs_calibration("--smoothquant")));
                }
                original_or_smoothed = smooth(&original, alpha, &calibration.source()?, quiet)?;
            }
            if mode == QuantizeMode::Int8 {
                let _progress = Progress::start(quiet, format!("fusing for {target}"));
                let records =
                    run_pipeline(&mut original_or_smoothed, &int8_fusion_passes(target, max_opset), &DriverOptions::default()).map_err(anyhow::Error::from)?;
                if !quiet {
                    print_records(&records);
                }
            }
            // GPTQ's X^T X and the GELU outputs' row maxima, in one run over the calibration data
            let per_token_possible = activations == ActivationScale::PerToken;
            let calibrated = if int8 && (gptq || (per_token_possible && calibration.given())) {
                let what = if gptq { "GPTQ: X^T X of every quantized MatMul's input, then rounding" } else { "row maxima of GELU outputs" };
                let _progress = Progress::start(quiet, what.into());
                calibrate_int8(&original_or_smoothed, &calibration.source()?, gptq).map_err(anyhow::Error::from)?
            } else {
                Int8Calibration::default()
            };
            let (rounded, gelu_zero_points) = (Arc::new(calibrated.rounded), Arc::new(calibrated.gelu_zero_points));
            // `in_float`: layers kept in float beyond --exclude; `per_tensor`: layers
            // whose activations get one scale whatever --activations says
            let quantize_with = |in_float: &HashSet<String>, per_tensor: &HashSet<String>| -> Result<(Model, Vec<PassRecord>), onnxopt::passes::PassError> {
                let excluded = exclude.iter().chain(in_float).cloned().collect();
                let pipeline = match mode {
                    QuantizeMode::Fp16 => {
                        let scope = if target == Target::Ort { Float16Scope::Weights } else { Float16Scope::WeightsAndCompute };
                        float16_passes(target, ConvertToFloat16::new(scope, excluded))
                    }
                    _ => quantization_passes(QuantizeDynamic {
                        target,
                        exclude: excluded,
                        activations,
                        per_tensor_layers: per_tensor.clone(),
                        rounded: rounded.clone(),
                        gelu_zero_points: gelu_zero_points.clone(),
                    }),
                };
                let mut quantized = original_or_smoothed.clone();
                let records = run_pipeline(&mut quantized, &pipeline, &DriverOptions::default())?;
                Ok((quantized, records))
            };
            let mut sensitivity = None;
            let (quantized, records) = match max_error.filter(|_| int8) {
                None if mode == QuantizeMode::Int8Static => {
                    let method = match calibration_method {
                        CalibrationMethodArg::Minmax => CalibrationMethod::MinMax,
                        CalibrationMethodArg::Percentile => CalibrationMethod::Percentile(percentile),
                        CalibrationMethodArg::Entropy => CalibrationMethod::Entropy,
                    };
                    let weight_type = match (weight_type, target) {
                        (Some(WeightTypeArg::Uint8), Target::TensorRt) => {
                            return Err(Failure::BadInput(anyhow::anyhow!("--weight-type uint8: TensorRT takes int8 weights only")));
                        }
                        (Some(WeightTypeArg::Int8), _) | (None, Target::TensorRt) => WeightType::Int8,
                        (Some(WeightTypeArg::Uint8), _) | (None, _) => WeightType::Uint8,
                    };
                    quantize_static(&original_or_smoothed, target, exclude.iter().cloned().collect(), weight_type, &calibration, method, quiet)?
                }
                None => {
                    let _progress = Progress::start(quiet, format!("quantizing for {target}"));
                    quantize_with(&HashSet::new(), &HashSet::new()).map_err(anyhow::Error::from)?
                }
                Some(budget) => {
                    let search = {
                        let _progress = Progress::start(quiet, format!("measuring each layer's error on {max_error_batches} calibration batches"));
                        let problem = Int8Search {
                            original: &original,
                            to_quantize: &original_or_smoothed,
                            budget,
                            batches: max_error_batches,
                            excluded_already: &exclude,
                        };
                        let quantize = |in_float: &HashSet<String>, per_tensor: &HashSet<String>| quantize_with(in_float, per_tensor).map(|(model, _)| model);
                        problem.run(&calibration.source()?, mode == QuantizeMode::Int8, &quantize).map_err(anyhow::Error::from)?
                    };
                    if !quiet {
                        print_int8_choice(&search);
                    }
                    let quantized = quantize_with(&search.in_float, &search.per_tensor).map_err(anyhow::Error::from)?;
                    sensitivity = Some(search);
                    quantized
                }
            };
            if !quiet {
                print_records(&records);
                for note in records.iter().flat_map(|r| &r.notes) {
                    eprintln!("note: {note}");
                }
            }
            let options = verify::VerifyOptions { atol: atol_bound, rtol, engine, ..Default::default() };
            let comparison = check_result(&original, &quantized, &options, no_verify, quiet)?;
            if let Some(path) = &report {
                let json = serde_json::json!({
                    "input": input, "output": output.output, "target": target.name(), "mode": mode.name(),
                    "activations": int8.then(|| format!("{activations:?}")),
                    "nodes_before": original.graph.node_count(), "nodes_after": quantized.graph.node_count(),
                    "tolerance": { "min_cosine": min_cosine, "atol": atol_bound.is_finite().then_some(atol_bound), "rtol": rtol },
                    "passes": records, "sensitivity": sensitivity, "verification": comparison,
                });
                write_report(path, &json)?;
            }
            let bound = if atol_bound.is_finite() { format!(", --atol {atol_bound} --rtol {rtol}") } else { String::new() };
            check_quantized(comparison.as_ref(), min_cosine, &bound, "--exclude the sensitive MatMuls, or loosen the bound", quiet)?;
            save(&quantized, &input, &output, quiet)?;
        }
        Command::Check { model: path, target, json } => {
            if target != Target::TensorRt {
                return Err(Failure::BadInput(anyhow::anyhow!("check --target: tensorrt (the only runtime with rules to lint so far)")));
            }
            let model = load(&path, quiet, false)?;
            let violations = onnxopt::lint::tensorrt::check(&model);
            let text = if json {
                serde_json::to_string_pretty(&violations).context("encoding the violations")? + "\n"
            } else {
                violations.iter().map(|v| format!("{v}\n")).collect()
            };
            write_stdout(&text)?;
            if !quiet {
                eprintln!("{}: {} violation(s) of TensorRT's explicit-quantization rules", path.display(), violations.len());
            }
            if !violations.is_empty() {
                return Err(Failure::Violations);
            }
        }
        Command::Prune {
            input,
            output,
            method: method @ (PruneMethodArg::Structured | PruneMethodArg::Layers),
            keep_flops,
            drop_layers,
            no_reconstruct,
            report,
            data,
            ..
        } => {
            prune_blocks(&input, &output, method, keep_flops, drop_layers, no_reconstruct, report.as_deref(), &data, quiet)?;
        }
        Command::Prune {
            input,
            output,
            method,
            sparsity,
            nm,
            importance,
            reconstruct,
            no_reconstruct,
            damping,
            obs_rounds,
            data,
            report,
            no_verify,
            engine,
            min_cosine,
            ..
        } => {
            use onnxopt::prune::{Importance, LayerSparsity, PruneMethod, PruneOptions};
            let bad = |e: String| Failure::BadInput(anyhow::anyhow!(e));
            let method = match method {
                PruneMethodArg::Nm => PruneMethod::NofM(nm.parse().map_err(|e: String| bad(format!("--nm {e}")))?),
                _ => PruneMethod::Unstructured,
            };
            let calibration = data.optional_source()?;
            let mut options = PruneOptions::new(method);
            options.sparsity = LayerSparsity::parse(&sparsity).map_err(anyhow::Error::from)?;
            options.importance = match importance {
                Some(PruneImportanceArg::Magnitude) => Importance::Magnitude,
                Some(PruneImportanceArg::Wanda) => Importance::Wanda,
                Some(PruneImportanceArg::Obs) => Importance::Obs,
                // OBS measured 0.004 above Wanda on MiniLM at every setting tried
                // (50% and 2:4; 64 and 128 calibration sentences; README)
                None if calibration.is_some() => Importance::Obs,
                None => Importance::Magnitude,
            };
            options.reconstruct = reconstruct || (calibration.is_some() && !no_reconstruct);
            if let Some(damping) = damping.filter(|d| !(*d > 0.0 && d.is_finite())) {
                return Err(bad(format!("--damping {damping}: must be a positive number")));
            }
            options.damping = damping;
            options.obs_rounds = obs_rounds as usize;
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
                eprintln!(
                    "{}; nonzero parameters {} -> {} of {}; {:.1} s, {} tract runs",
                    r.removed.join("; "),
                    r.nonzero_parameters_before,
                    r.nonzero_parameters_after,
                    r.parameters,
                    r.seconds,
                    r.calibration_runs
                );
            }
            if !no_verify {
                let _progress = Progress::start(quiet, "checking the result in tract".into());
                // on the first calibration batch when there is one: real text, not random ids
                let inputs = match &options.calibration {
                    Some(source) => source.batches(&original).map_err(anyhow::Error::from)?.next().transpose().map_err(anyhow::Error::from)?,
                    None => None,
                };
                let options = verify::VerifyOptions { atol: f32::INFINITY, rtol: 0.0, inputs, engine, ..Default::default() };
                pruned.report.verification = Some(onnxopt::passes::verify_rewrite(&original, &pruned.model, &options).map_err(unverifiable_result)?);
            }
            if let Some(path) = &report {
                write_report(path, &serde_json::to_value(&pruned.report).context("encoding the report")?)?;
            }
            if let Some(c) = &pruned.report.verification {
                let cosine = c.min_cosine();
                if !quiet {
                    print_check(c);
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
            let taps = if tensors.is_empty() { onnxopt::calibrate::matmul_activations(&model) } else { tensors };
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
                    .map(|e| match e.min_opset {
                        Some(v) => format!("{}@{v}", e.target),
                        None => e.target.clone(),
                    })
                    .collect();
                println!("{} ({}) [{}]", rule.name, rule.location, targets.join(", "));
                for line in &rule.doc {
                    println!("    # {line}");
                }
            }
        }
        Command::Verify { reference, candidate, inputs, seed, atol, rtol, batch, seq, json, engine } => {
            let a = load(&reference, quiet, true)?;
            let b = load(&candidate, quiet, true)?;
            let inputs = inputs.map(|p| verify::read_npz(&p)).transpose().map_err(anyhow::Error::from)?;
            let options = verify::VerifyOptions { seed, sizes: verify::DimSizes { batch, sequence: seq }, atol, rtol, inputs, engine };
            let comparison = {
                let _progress = Progress::start(quiet, format!("running both models ({})", engine.name()));
                onnxopt::passes::verify_rewrite(&a, &b, &options).map_err(|e| Failure::Unverifiable(e.into()))?
            };
            if let Some(why) = &comparison.fallback {
                eprintln!("note: {why}");
            }
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

/// Prints the tract check of a quantized model and fails when it is beyond
/// tolerance (`bound` names the element bound given, `advice` what to try).
fn check_quantized(comparison: Option<&verify::Comparison>, min_cosine: f64, bound: &str, advice: &str, quiet: bool) -> Result<(), Failure> {
    let Some(c) = comparison else { return Ok(()) };
    let cosine = c.min_cosine();
    if !quiet {
        print_check(c);
    }
    if !c.passed() || cosine < min_cosine {
        eprintln!("error: the quantized model differs from the input beyond tolerance (cosine {cosine:.6}, --min-cosine {min_cosine}{bound}); nothing written ({advice})");
        return Err(Failure::VerificationFailed);
    }
    Ok(())
}

/// `rewritten` against `original` in the options' engine (`None` with `--no-verify`).
fn check_result(
    original: &Model,
    rewritten: &Model,
    options: &verify::VerifyOptions,
    no_verify: bool,
    quiet: bool,
) -> Result<Option<verify::Comparison>, Failure> {
    if no_verify {
        return Ok(None);
    }
    let _progress = Progress::start(quiet, format!("checking the result ({})", options.engine.name()));
    let comparison = onnxopt::passes::verify_rewrite(original, rewritten, options).map_err(unverifiable_result)?;
    if let (Some(why), false) = (&comparison.fallback, quiet) {
        eprintln!("note: {why}");
    }
    Ok(Some(comparison))
}

/// A result no engine could check: not written, and not the input's fault.
fn unverifiable_result(e: onnxopt::passes::CheckError) -> Failure {
    Failure::Unverifiable(anyhow::anyhow!("{e}; nothing written (--no-verify writes the result unchecked)"))
}

/// How a check's outcome reads: `check in tract: max abs .., cosine ..`.
fn print_check(c: &verify::Comparison) {
    eprintln!("check in {}: max abs {:.3e}, cosine {:.6}", c.engine.name(), c.max_abs(), c.min_cosine());
}

/// Every `--exclude` name is a node of `model` (or the first output of one).
fn check_exclusions(model: &Model, exclude: &[String]) -> Result<(), Failure> {
    let named = |name: &String| model.graph.nodes().any(|n| &n.name == name || n.outputs.first() == Some(name));
    match exclude.iter().find(|name| !named(name)) {
        Some(unknown) => Err(Failure::BadInput(anyhow::anyhow!("--exclude: no node named '{unknown}' (nor writing a tensor of that name)"))),
        None => Ok(()),
    }
}

/// `--max-opset N` below the input's own opset asks for what no pass does.
fn check_max_opset(max_opset: Option<i64>, input: &Path, model: &Model) -> Result<(), Failure> {
    let opset = model.opset("").unwrap_or(0);
    match max_opset {
        Some(highest) if highest < opset => Err(Failure::BadInput(anyhow::anyhow!("--max-opset {highest}: {} is already at opset {opset}", input.display()))),
        _ => Ok(()),
    }
}

/// `--mode int8`'s error budget (mean over tokens of 1 - cosine on calibration
/// data). On all-MiniLM-L6-v2 with GPTQ weights, per-token int8 everywhere
/// measured 2.5e-3 (text) to 2.8e-3 (padded npz), and sentence embeddings
/// stayed at mean cosine 0.9976 to 0.9986 on the dev sentences: per-token
/// errors partly cancel in the mean pooling.
const DEFAULT_INT8_MAX_ERROR: f64 = 3e-3;

/// The search's choice on stderr, one line per step it took.
fn print_int8_choice(choice: &Int8Choice) {
    if let Some(scales) = &choice.activation_scales {
        let chosen = if scales.within_budget() {
            format!("per token for {} of {} activations: {:.2e}", scales.spared.len(), choice.activations, scales.error)
        } else {
            format!("per token everywhere: {:.2e}", scales.error)
        };
        eprintln!("error on calibration data: {:.2e} with per-tensor activations, {chosen} (budget {:.2e})", scales.error_none_spared, scales.budget);
    }
    if let Some(float) = &choice.float {
        eprintln!(
            "error on calibration data: {:.2e} with every layer quantized, {:.2e} with {} kept in float (budget {:.2e})",
            float.error_none_spared,
            float.error,
            float.spared.len(),
            float.budget
        );
    }
}

/// SmoothQuant with ranges from calibration: the smoothed model, after a tract
/// check that it still computes what `original` does (it is an exact rewrite).
fn smooth(original: &Model, alpha: f32, source: &onnxopt::calibrate::CalibrationSource, quiet: bool) -> Result<Model> {
    use onnxopt::passes::smooth_quant::SmoothQuant;
    let taps = onnxopt::calibrate::matmul_activations(original);
    let tap_names: Vec<&str> = taps.iter().map(String::as_str).collect();
    let stats = {
        let _progress = Progress::start(quiet, format!("calibrating {} activations", taps.len()));
        onnxopt::calibrate::calibrate(original, &tap_names, source)?
    };
    let mut smoothed = original.clone();
    let passes: Vec<Box<dyn onnxopt::passes::Pass>> = vec![Box::new(SmoothQuant::from_stats(&stats, alpha))];
    let records = run_pipeline(&mut smoothed, &passes, &DriverOptions::default())?;
    if !quiet {
        print_records(&records);
    }
    let _progress = Progress::start(quiet, "checking the smoothing in tract".into());
    let exact = verify::VerifyOptions { atol: 1e-3, rtol: 1e-3, ..Default::default() };
    let comparison = onnxopt::passes::verify_rewrite(original, &smoothed, &exact)?;
    if !comparison.passed() {
        anyhow::bail!("smooth-quant changed the model's outputs (max abs {:.3e}): a bug, please report it", comparison.max_abs());
    }
    Ok(smoothed)
}

/// `quantize --mode int8-static`: cleanup, calibration of the activations
/// `quantize-static` will quantize (on the cleaned graph), then the pass.
fn quantize_static(
    original: &Model,
    target: Target,
    exclude: std::collections::HashSet<String>,
    weight_type: WeightType,
    calibration: &CalibrationArgs,
    method: CalibrationMethod,
    quiet: bool,
) -> Result<(Model, Vec<PassRecord>)> {
    let source = calibration.source()?;
    let mut quantized = original.clone();
    let mut records = {
        let _progress = Progress::start(quiet, "cleaning up".into());
        run_pipeline(&mut quantized, &cleanup_passes(target), &DriverOptions::default())?
    };
    let taps = activations_to_calibrate(&quantized, target, &exclude);
    let tap_names: Vec<&str> = taps.iter().map(String::as_str).collect();
    let stats = {
        let _progress = Progress::start(quiet, format!("calibrating {} activations", taps.len()));
        onnxopt::calibrate::calibrate(&quantized, &tap_names, &source)?
    };
    let ranges = activation_ranges(&stats, method)?;
    let _progress = Progress::start(quiet, format!("quantizing for {target}"));
    let pipeline = static_quantization_passes(QuantizeStatic { target, ranges, exclude, weight_type });
    records.extend(run_pipeline(&mut quantized, &pipeline, &DriverOptions::default())?);
    Ok((quantized, records))
}

/// `prune --method structured|layers`: heads and neurons, or whole blocks (see
/// `onnxopt::prune::structured` and `onnxopt::prune::layers`).
#[allow(clippy::too_many_arguments)]
fn prune_blocks(
    input: &Path,
    output: &OutputArgs,
    method: PruneMethodArg,
    keep_flops: f64,
    drop_layers: usize,
    no_reconstruct: bool,
    report: Option<&Path>,
    data: &CalibrationArgs,
    quiet: bool,
) -> Result<()> {
    let original = load(input, quiet, true)?;
    let source = data.optional_source()?;
    let started = std::time::Instant::now();
    let _progress = Progress::start(quiet, "pruning".into());
    let (pruned, json) = match method {
        PruneMethodArg::Structured => {
            let (pruned, r) = onnxopt::prune::structured::prune_structured(&original, keep_flops, source.as_ref(), source.is_some() && !no_reconstruct)
                .map_err(anyhow::Error::from)?;
            if !quiet {
                for l in &r.layers {
                    let e = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
                    eprintln!(
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
                    );
                }
                eprintln!(
                    "linear FLOPs/token {} -> {} ({:.3}), parameters {} -> {}, tract cosine (random tokens) {:.4}",
                    r.flops_before,
                    r.flops_after,
                    r.flops_after as f64 / r.flops_before as f64,
                    r.parameters_before,
                    r.parameters_after,
                    r.tract_min_cosine
                );
            }
            (pruned, serde_json::to_value(&r).context("encoding the report")?)
        }
        PruneMethodArg::Layers => {
            let source = source.ok_or_else(|| {
                anyhow::anyhow!("--method layers ranks blocks on calibration data: --calib-text FILE --tokenizer tokenizer.json, or --calib data.npz")
            })?;
            let (pruned, r) = onnxopt::prune::layers::drop_layers(&original, drop_layers, &source).map_err(anyhow::Error::from)?;
            if !quiet {
                eprintln!(
                    "cosine(input, output) per block: {:?}; dropped {:?}; linear FLOPs/token {} -> {}, parameters {} -> {}, tract cosine (random tokens) {:.4}",
                    r.input_output_cosine, r.dropped, r.flops_before, r.flops_after, r.parameters_before, r.parameters_after, r.tract_min_cosine
                );
            }
            (pruned, serde_json::to_value(&r).context("encoding the report")?)
        }
        PruneMethodArg::Unstructured | PruneMethodArg::Nm => anyhow::bail!("prune_blocks: the sparse methods are pruned by onnxopt::prune::prune"),
    };
    if !quiet {
        eprintln!("pruned in {:.1} s", started.elapsed().as_secs_f64());
    }
    if let Some(path) = report {
        write_report(path, &serde_json::json!({ "input": input, "output": output.output, "seconds": started.elapsed().as_secs_f64(), "pruning": json }))?;
    }
    save(&pruned, input, output, quiet)?;
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

/// An error and its causes in one line, each cause once: the library's
/// messages already quote their source (`cannot read: No such file or
/// directory`), which `{:#}` would print a second time.
fn sentence(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
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
            eprintln!("error: could not verify: {}", sentence(&e));
            ExitCode::from(1)
        }
        Err(Failure::BadInput(e)) => {
            eprintln!("error: {}", sentence(&e));
            ExitCode::from(2)
        }
    }
}
