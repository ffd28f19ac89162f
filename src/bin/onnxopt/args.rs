//! The command line's arguments, and how each command's become the library's
//! request ([`onnxopt::commands`]). Defaults of quantization and pruning are
//! the library's: an option left out is `None` here.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use onnxopt::commands::{self, OptimizeRequest, PruneRequest, Pruning, QuantizeRequest, WeightRounding};
use onnxopt::passes::quantize_dynamic::ActivationScale;
use onnxopt::passes::quantize_static::{CalibrationMethod, WeightType};
use onnxopt::prune::Importance;
use onnxopt::target::Target;
use onnxopt::{onnx, verify};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "onnxopt",
    version,
    about = "Makes transformer ONNX models smaller and faster, checking every result numerically (tract, or ONNX Runtime).",
    after_help = "Examples:\n  onnxopt inspect model.onnx\n  onnxopt convert model.onnx -o copy.onnx --external-data\n  onnxopt verify model.onnx rewritten.onnx --atol 1e-4\n\nExit codes: 0 ok, 1 verification failed, 2 bad input or usage."
)]
pub struct Cli {
    /// No progress output on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    Optimize(OptimizeArgs),
    /// Quantize a model's constant-weight MatMuls to int8 or int4 (or its weights and compute to float16), check it against the input, write it.
    #[command(
        after_help = "Examples:\n  onnxopt quantize model.onnx -o model.int8.onnx --mode int8 --calib-text calib.txt --tokenizer tokenizer.json\n  onnxopt quantize model.onnx -o model.int8.onnx --mode int8-dynamic --activations per-token\n  onnxopt quantize model.onnx -o model.qdq.onnx --mode int8-static --target tensorrt --calib data.npz\n  onnxopt quantize model.onnx -o model.fp16.onnx --mode fp16   # float16 weights, float32 compute (ORT CPU)\n  onnxopt quantize model.onnx -o model.int4.onnx --mode int4-weight --block-size 32 --rounding gptq --calib-text calib.txt --tokenizer tokenizer.json\n  onnxopt quantize model.onnx -o model.int8.onnx --mode int8-dynamic --target portable --exclude /pooler/dense/MatMul"
    )]
    Quantize(QuantizeArgs),
    /// Choose a recipe: a preset (-O1 to -O4), or a search over fusion, int8,
    /// int4, fp16 and pruning that keeps the fastest within an accuracy budget.
    #[command(
        after_help = "Examples:\n  onnxopt auto model.onnx -o model.fast.onnx -O2\n  onnxopt auto model.onnx -o model.fast.onnx --min-cosine 0.997 --calib-text calib.txt --tokenizer tokenizer.json --html auto.html\n  onnxopt auto decoder.onnx -o decoder.fast.onnx --max-perplexity-ratio 1.10 --calib-text calib.txt --tokenizer tokenizer.json --time-budget 900\n\nPresets: -O1 cleanup (exact); -O2 -O1 and fusion for the target; -O3 -O2 and GELU in its tanh form (ORT's FastGelu);\n-O4 -O3 and float16 weights and compute (for ORT on a GPU). One int8 file serves every x86 CPU: ORT picks its AVX2, AVX-512 or VNNI kernels at load time.\n\nThe search holds back the last fifth of the calibration batches, measures each trial's fidelity on them (encoders:\nmean cosine, [batch, seq, hidden] outputs mean-pooled over real tokens; decoders: perplexity ratio) and its latency\nin ONNX Runtime (tract without it), in turn with the input's, and writes the fastest within the budget."
    )]
    Auto(AutoArgs),
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
    Prune(PruneArgs),
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

#[derive(Args)]
pub struct OptimizeArgs {
    pub input: PathBuf,
    #[command(flatten)]
    pub output: OutputArgs,
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
    pub report: Option<PathBuf>,
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
}

#[derive(Args)]
pub struct QuantizeArgs {
    pub input: PathBuf,
    #[command(flatten)]
    pub output: OutputArgs,
    /// The quantization scheme (see the modes below).
    #[arg(long)]
    mode: QuantizeModeArg,
    /// int8, int8-dynamic: ort (com.microsoft ops) or portable (standard ops);
    /// int8-static: ort (uint8 activations, QDQ that ORT fuses) or tensorrt (int8 symmetric, TensorRT's placement);
    /// fp16: ort stores weights in float16 and computes in float32 (ORT's CPU provider has
    /// no float16 MatMul on x86-64: it would Cast around every node); portable and
    /// tensorrt compute in float16 too, range-sensitive ops (Softmax, norms, Pow, ...) in float32.
    #[arg(long, default_value = "ort")]
    target: Target,
    /// int8 modes: per-tensor (one scale per activation tensor) or per-token
    /// (one scale per row: closer to float, a few more ops). Default per-tensor;
    /// --mode int8 chooses per layer.
    #[arg(long)]
    activations: Option<ActivationArg>,
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
    /// once per layer and batch). Default 4.
    #[arg(long)]
    max_error_batches: Option<usize>,
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
    pub report: Option<PathBuf>,
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
    /// int8-static: how each activation's range is chosen from calibration
    /// (default: percentile).
    #[arg(long)]
    calibration_method: Option<CalibrationMethodArg>,
    /// With --calibration-method percentile: the central percentage kept (default 99.99).
    #[arg(long)]
    percentile: Option<f64>,
    /// int8-static: int8 or uint8 weights (symmetric either way; uint8 has zero
    /// point 128). Default: uint8 for ort (ORT's u8s8 kernel saturates on x86
    /// CPUs without VNNI; on VNNI machines int8 is as exact), int8 for tensorrt
    /// (the only type it takes).
    #[arg(long)]
    weight_type: Option<WeightTypeArg>,
    /// int4-weight: input features sharing one scale (32, 64 or 128; default 32).
    #[arg(long)]
    block_size: Option<usize>,
    /// Weight rounding for int4-weight and the dynamic int8 modes: rtn (round
    /// to nearest) or gptq (needs calibration data). Default: gptq for
    /// --mode int8 and int4-weight with calibration data, else rtn.
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
    /// fp16 for ort: compute in float16 too, for ORT's CUDA provider (its
    /// GroupQueryAttention kernel is float16 only). portable and tensorrt
    /// always compute in float16; ORT's CPU provider would only Cast around
    /// every node.
    #[arg(long)]
    float16_compute: bool,
}

#[derive(Args)]
pub struct PruneArgs {
    pub input: PathBuf,
    #[command(flatten)]
    pub output: OutputArgs,
    /// unstructured (any weights), nm (N of every M along the reduction axis),
    /// structured (attention heads and FFN neurons, to --keep-flops) or layers
    /// (--drop-layers whole blocks).
    #[arg(long)]
    method: PruneMethodArg,
    /// structured: fraction of the blocks' linear-layer FLOPs to keep (default 0.7).
    #[arg(long)]
    keep_flops: Option<f64>,
    /// layers: how many blocks to drop (default 1).
    #[arg(long)]
    drop_layers: Option<usize>,
    /// unstructured: fraction of each layer's weights to zero, in [0, 1): a
    /// default (0.5 if none) and NAME=S overrides by node or weight name (comma-separated).
    #[arg(long, value_delimiter = ',')]
    sparsity: Option<Vec<String>>,
    /// The N:M pattern of --method nm: N nonzeros kept in every M weights (default 2:4).
    #[arg(long)]
    nm: Option<String>,
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
    /// each after the first ranking the weights re-fitted to what is still kept (default 4).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=16))]
    obs_rounds: Option<u64>,
    #[command(flatten)]
    data: CalibrationArgs,
    /// Write the layers, their errors, parameter and FLOP counts and the verification as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write the result without checking it against the input.
    #[arg(long)]
    no_verify: bool,
    /// The engine that runs the input and the result to compare them: auto
    /// (tract; ONNX Runtime where tract cannot run them), tract, or ort
    /// (ONNX Runtime from ORT_DYLIB_PATH or the onnxruntime Python wheel;
    /// com.microsoft ops run in ORT's own kernels).
    #[arg(long)]
    engine: Option<verify::Engine>,
    /// Smallest cosine similarity allowed between each output and the input's,
    /// on the first calibration batch (seeded random inputs without
    /// calibration data: random token ids, a harsher test than text). Default 0.8.
    #[arg(long)]
    min_cosine: Option<f64>,
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
pub enum QuantizeModeArg {
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

impl From<QuantizeModeArg> for commands::QuantizeMode {
    fn from(mode: QuantizeModeArg) -> commands::QuantizeMode {
        match mode {
            QuantizeModeArg::Int8 => commands::QuantizeMode::Int8,
            QuantizeModeArg::Int8Dynamic => commands::QuantizeMode::Int8Dynamic,
            QuantizeModeArg::Fp16 => commands::QuantizeMode::Fp16,
            QuantizeModeArg::Int8Static => commands::QuantizeMode::Int8Static,
            QuantizeModeArg::Int4Weight => commands::QuantizeMode::Int4Weight,
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
pub struct AutoArgs {
    pub input: PathBuf,
    #[command(flatten)]
    pub output: OutputArgs,
    /// ort (com.microsoft fused ops), portable (standard ONNX), tensorrt.
    #[arg(long, default_value = "ort")]
    target: Target,
    /// A preset instead of the search: -O1, -O2, -O3 or -O4.
    #[arg(short = 'O', value_name = "LEVEL")]
    level: Option<commands::Preset>,
    /// Encoders: keep trials whose outputs' mean cosine on held-back data is
    /// at least C (default 0.99).
    #[arg(long, value_name = "C", conflicts_with = "max_perplexity_ratio")]
    min_cosine: Option<f64>,
    /// Decoders: keep trials whose perplexity on held-back text is at most R
    /// times the input's (default 1.10).
    #[arg(long, value_name = "R")]
    max_perplexity_ratio: Option<f64>,
    #[command(flatten)]
    calibration: CalibrationArgs,
    /// Try at most N recipes.
    #[arg(long, value_name = "N")]
    max_trials: Option<usize>,
    /// Start no trial after SECONDS.
    #[arg(long, value_name = "SECONDS")]
    time_budget: Option<u64>,
    /// Only these recipes (comma-separated; an unknown name lists them).
    #[arg(long, value_delimiter = ',')]
    pub recipes: Option<Vec<String>>,
    /// Write every trial and the choice as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write the search as an HTML page: latency against fidelity for every
    /// trial, the Pareto front marked.
    #[arg(long)]
    pub html: Option<PathBuf>,
}

impl AutoArgs {
    pub fn request(&self) -> Result<commands::AutoRequest> {
        let budget = match (self.min_cosine, self.max_perplexity_ratio) {
            (Some(c), _) => Some(commands::Budget::MinCosine(c)),
            (_, Some(r)) => Some(commands::Budget::MaxPerplexityRatio(r)),
            _ => None,
        };
        Ok(commands::AutoRequest {
            target: self.target,
            preset: self.level,
            budget,
            calibration: self.calibration.optional_source()?,
            max_trials: self.max_trials,
            time_budget: self.time_budget.map(std::time::Duration::from_secs),
            recipes: self.recipes.clone(),
        })
    }
}

#[derive(Args)]
pub struct CalibrationArgs {
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
    #[arg(long, default_value_t = onnxopt::calibrate::DEFAULT_MAX_LEN)]
    max_len: usize,
    /// Sentences (or npz rows) per batch.
    #[arg(long, default_value_t = onnxopt::calibrate::DEFAULT_BATCH)]
    batch: usize,
}

impl CalibrationArgs {
    /// Whether any calibration data was given.
    pub fn given(&self) -> bool {
        self.calib_text.is_some() || self.calib.is_some()
    }

    /// The source when calibration data was given.
    pub fn optional_source(&self) -> Result<Option<onnxopt::calibrate::CalibrationSource>> {
        if self.given() {
            self.source().map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn source(&self) -> Result<onnxopt::calibrate::CalibrationSource> {
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
pub struct OutputArgs {
    /// Where to write the model (never the input itself).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Put every tensor of 1 KiB or more in OUTPUT.data.
    #[arg(long, conflicts_with = "inline")]
    external_data: bool,
    /// Put every tensor inline (fails past protobuf's 2 GiB limit).
    #[arg(long)]
    inline: bool,
}

impl OutputArgs {
    pub fn options(&self) -> onnx::SaveOptions {
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

impl OptimizeArgs {
    pub fn request(&self) -> OptimizeRequest {
        let verify = (!self.no_verify).then(|| verify::VerifyOptions { atol: self.atol, rtol: self.rtol, engine: self.engine, ..Default::default() });
        OptimizeRequest {
            target: self.target,
            opset: self.opset,
            passes: self.passes.clone(),
            skip: self.skip.clone(),
            stop_after: self.stop_after,
            trace_rule: self.trace_rule.clone(),
            verify,
        }
    }
}

impl QuantizeArgs {
    pub fn request(&self) -> Result<QuantizeRequest> {
        let calibration_method = match (self.calibration_method, self.percentile) {
            (Some(CalibrationMethodArg::Minmax), None) => Some(CalibrationMethod::MinMax),
            (Some(CalibrationMethodArg::Entropy), None) => Some(CalibrationMethod::Entropy),
            (Some(_), Some(p)) if !matches!(self.calibration_method, Some(CalibrationMethodArg::Percentile)) => {
                anyhow::bail!("--percentile {p}: for --calibration-method percentile")
            }
            (_, Some(p)) => Some(CalibrationMethod::Percentile(p)),
            (Some(CalibrationMethodArg::Percentile), None) => Some(commands::quantize::DEFAULT_CALIBRATION_METHOD),
            (None, None) => None,
        };
        Ok(QuantizeRequest {
            mode: self.mode.into(),
            target: self.target,
            activations: self.activations.map(ActivationScale::from),
            exclude: self.exclude.clone(),
            max_error: self.max_error,
            max_error_batches: self.max_error_batches,
            max_opset: self.max_opset,
            smoothquant: self.smoothquant,
            calibration: self.calibration.optional_source()?,
            calibration_method,
            weight_type: self.weight_type.map(|w| match w {
                WeightTypeArg::Int8 => WeightType::Int8,
                WeightTypeArg::Uint8 => WeightType::Uint8,
            }),
            rounding: self.rounding.map(|r| match r {
                RoundingArg::Rtn => WeightRounding::Nearest,
                RoundingArg::Gptq => WeightRounding::Gptq,
            }),
            block_size: self.block_size,
            zero_point: self.zero_point,
            accuracy_level: self.accuracy_level,
            quantize_embeddings: self.quantize_embeddings,
            float16_compute: self.float16_compute,
            verify: !self.no_verify,
            engine: self.engine,
            min_cosine: self.min_cosine,
            atol: self.atol,
            rtol: self.rtol,
        })
    }
}

impl PruneArgs {
    pub fn request(&self) -> Result<PruneRequest> {
        let reconstruct = match (self.reconstruct, self.no_reconstruct) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
        Ok(PruneRequest {
            method: match self.method {
                PruneMethodArg::Unstructured => Pruning::Unstructured,
                PruneMethodArg::Nm => Pruning::NofM,
                PruneMethodArg::Structured => Pruning::Structured,
                PruneMethodArg::Layers => Pruning::Layers,
            },
            keep_flops: self.keep_flops,
            drop_layers: self.drop_layers,
            sparsity: self.sparsity.clone(),
            n_of_m: self.nm.clone(),
            importance: self.importance.map(|i| match i {
                PruneImportanceArg::Magnitude => Importance::Magnitude,
                PruneImportanceArg::Wanda => Importance::Wanda,
                PruneImportanceArg::Obs => Importance::Obs,
            }),
            reconstruct,
            damping: self.damping,
            obs_rounds: self.obs_rounds.map(|r| r as usize),
            calibration: self.data.optional_source()?,
            verify: !self.no_verify,
            engine: self.engine,
            min_cosine: self.min_cosine,
        })
    }
}
