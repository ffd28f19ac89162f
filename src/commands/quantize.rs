//! `quantize`: every mode's policy in one place. Defaults, the options each
//! mode takes, calibration, the passes (from [`crate::passes::pipeline`]) and
//! the check of the result, whose cosine bound rejects a result that points
//! elsewhere than the input.
//!
//! The modes:
//! - `int8`: fusion for the target, then int8 weights and per-token int8
//!   activations; with calibration data GPTQ-rounded weights and a search
//!   ([`crate::sensitivity`]) that keeps per-tensor scales where they cost
//!   little and float layers only when per-token everywhere is over budget;
//! - `int8-dynamic`: int8 weights, activations quantized at run time;
//! - `int8-static`: QDQ with activation ranges from calibration;
//! - `fp16`: float16 weights (and compute, outside ORT);
//! - `int4-weight`: block-wise int4 weights (MatMulNBits for ORT).

use super::report::{pass_lines, Int4Report, QuantizeReport, Tolerance};
use super::{check, check_exclusions, refuse_unused, CommandError, Observer, Outcome, Step};
use crate::calibrate::CalibrationSource;
use crate::ir::Model;
use crate::passes::pipeline::{
    cleanup_passes, float16_passes, int8_fusion_passes, optimization_passes, quantization_passes, static_quantization_passes, PipelineOptions,
};
use crate::passes::quantize_dynamic::{calibrate_int8, ActivationScale, Int8Calibration, QuantizeDynamic};
use crate::passes::quantize_fp16::{ConvertToFloat16, Float16Scope};
use crate::passes::quantize_gather_int4::QuantizeGatherInt4;
use crate::passes::quantize_int4::{activation_hessians, QuantizeInt4, Rounding, BLOCKED_DEQUANTIZE_OPSET};
use crate::passes::quantize_static::{activation_ranges, activations_to_calibrate, CalibrationMethod, QuantizeStatic, WeightType};
use crate::passes::{run_pipeline, DriverOptions, Pass, PassRecord};
use crate::sensitivity::{Int8Choice, Int8Search};
use crate::target::Target;
use crate::verify::{Engine, VerifyOptions};
use std::collections::HashSet;
use std::sync::Arc;

/// The quantization scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantizeMode {
    Int8,
    Int8Dynamic,
    Fp16,
    Int8Static,
    Int4Weight,
}

impl QuantizeMode {
    pub fn name(self) -> &'static str {
        match self {
            QuantizeMode::Int8 => "int8",
            QuantizeMode::Int8Dynamic => "int8-dynamic",
            QuantizeMode::Fp16 => "fp16",
            QuantizeMode::Int8Static => "int8-static",
            QuantizeMode::Int4Weight => "int4-weight",
        }
    }

    /// The default check: (min cosine, atol, rtol). int8 rounding moves single
    /// values, not directions: the cosine bounds it. On all-MiniLM-L6-v2, int4
    /// scores 0.93-0.96 on seeded random token ids (0.99 mean cosine on real
    /// sentences with GPTQ). float16 is bounded element by element too, its
    /// rounding compounded through the layers.
    pub fn default_tolerance(self) -> Tolerance {
        match self {
            QuantizeMode::Int8 | QuantizeMode::Int8Dynamic | QuantizeMode::Int8Static => Tolerance { min_cosine: 0.98, atol: None, rtol: 0.0 },
            QuantizeMode::Int4Weight => Tolerance { min_cosine: 0.9, atol: None, rtol: 0.0 },
            QuantizeMode::Fp16 => {
                Tolerance { min_cosine: 0.9999, atol: Some(crate::passes::quantize_fp16::CHECK_ATOL), rtol: crate::passes::quantize_fp16::CHECK_RTOL }
            }
        }
    }

    pub const ALL: [QuantizeMode; 5] = [QuantizeMode::Int8, QuantizeMode::Int8Dynamic, QuantizeMode::Fp16, QuantizeMode::Int8Static, QuantizeMode::Int4Weight];

    fn is_int8(self) -> bool {
        matches!(self, QuantizeMode::Int8 | QuantizeMode::Int8Dynamic | QuantizeMode::Int8Static)
    }
}

impl std::str::FromStr for QuantizeMode {
    type Err = String;
    fn from_str(s: &str) -> Result<QuantizeMode, String> {
        let names: Vec<&str> = QuantizeMode::ALL.iter().map(|m| m.name()).collect();
        QuantizeMode::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| format!("unknown mode '{s}' ({})", names.join(", ")))
    }
}

/// How weights are rounded to the integer grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightRounding {
    Nearest,
    /// GPTQ against the calibration activations.
    Gptq,
}

/// `--mode int8`'s error budget (mean over tokens of 1 - cosine on calibration
/// data). On all-MiniLM-L6-v2 with GPTQ weights, per-token int8 everywhere
/// measured 2.5e-3 (text) to 2.8e-3 (padded npz), and sentence embeddings
/// stayed at mean cosine 0.9976 to 0.9986 on the dev sentences: per-token
/// errors partly cancel in the mean pooling.
pub const DEFAULT_INT8_MAX_ERROR: f64 = 3e-3;
/// Calibration batches the `max_error` search measures on (the model runs
/// once per layer and batch).
pub const DEFAULT_MAX_ERROR_BATCHES: usize = 4;
pub const DEFAULT_INT4_BLOCK_SIZE: usize = 32;
/// MatMulNBits' `accuracy_level` for `--target ort`: int8 compute, as ORT
/// GenAI's builder writes for CPU (about 2x faster decoding than float).
pub const DEFAULT_ACCURACY_LEVEL: i64 = 4;
/// int8-static's activation ranges: the central 99.99% of the values seen.
pub const DEFAULT_CALIBRATION_METHOD: CalibrationMethod = CalibrationMethod::Percentile(99.99);

/// What `quantize` is asked to do. `None` and `false` fields take the mode's
/// default; an option the mode does not use is refused.
#[derive(Clone, Debug)]
pub struct QuantizeRequest {
    pub mode: QuantizeMode,
    pub target: Target,
    /// int8-dynamic: per tensor (default) or per token. (`int8` is per token.)
    pub activations: Option<ActivationScale>,
    /// Node names (or first outputs) kept in float.
    pub exclude: Vec<String>,
    /// int8, int8-dynamic: keep the costliest layers in float until the error on
    /// calibration data is at most this ([`DEFAULT_INT8_MAX_ERROR`] for int8).
    pub max_error: Option<f64>,
    pub max_error_batches: Option<usize>,
    /// The highest default-domain opset the output may import.
    pub max_opset: Option<i64>,
    /// The int8 modes: SmoothQuant's migration strength (0..1).
    pub smoothquant: Option<f32>,
    pub calibration: Option<CalibrationSource>,
    /// int8-static: how each activation's range is chosen.
    pub calibration_method: Option<CalibrationMethod>,
    /// int8-static: int8 or uint8 weights (uint8 for ort, int8 for tensorrt).
    pub weight_type: Option<WeightType>,
    /// int8, int8-dynamic, int4-weight: GPTQ by default with calibration data.
    pub rounding: Option<WeightRounding>,
    /// int4-weight: input features per scale (32, 64 or 128).
    pub block_size: Option<usize>,
    /// int4-weight: a zero point per block (16 levels) rather than symmetric (15).
    pub zero_point: bool,
    /// int4-weight for ort: MatMulNBits' accuracy_level, 0 or 4.
    pub accuracy_level: Option<i64>,
    /// int4-weight: embedding tables int4 too.
    pub quantize_embeddings: bool,
    /// fp16 for ort: compute in float16 too, for ORT's CUDA provider (its
    /// GroupQueryAttention kernel is float16 only). portable and tensorrt
    /// always do; ORT's CPU provider would only Cast around every node.
    pub float16_compute: bool,
    /// Check the result against the input (and reject it beyond the bound).
    pub verify: bool,
    pub engine: Engine,
    pub min_cosine: Option<f64>,
    pub atol: Option<f32>,
    pub rtol: Option<f32>,
}

impl QuantizeRequest {
    /// `mode` for `target` with every option at its default.
    pub fn new(mode: QuantizeMode, target: Target) -> QuantizeRequest {
        QuantizeRequest {
            mode,
            target,
            activations: None,
            exclude: Vec::new(),
            max_error: None,
            max_error_batches: None,
            max_opset: None,
            smoothquant: None,
            calibration: None,
            calibration_method: None,
            weight_type: None,
            rounding: None,
            block_size: None,
            zero_point: false,
            accuracy_level: None,
            quantize_embeddings: false,
            float16_compute: false,
            verify: true,
            engine: Engine::Auto,
            min_cosine: None,
            atol: None,
            rtol: None,
        }
    }

    /// The bound the result is checked against: the mode's, with what was given.
    fn tolerance(&self) -> Tolerance {
        let default = self.mode.default_tolerance();
        Tolerance { min_cosine: self.min_cosine.unwrap_or(default.min_cosine), atol: self.atol.or(default.atol), rtol: self.rtol.unwrap_or(default.rtol) }
    }

    /// Refuses an option the mode (or target) does not use.
    fn refuse_unused_options(&self) -> Result<(), CommandError> {
        use QuantizeMode::*;
        let mode = self.mode;
        let not_for = |modes: &str| format!("for --mode {modes}, not --mode {}", mode.name());
        refuse_unused(
            self.accuracy_level.is_some() && mode != Int4Weight,
            "--accuracy-level is for --mode int4-weight (MatMulNBits)",
            &format!("not --mode {}", mode.name()),
        )?;
        refuse_unused(
            self.accuracy_level.is_some() && self.target != Target::Ort,
            "--accuracy-level",
            &format!("MatMulNBits' (--target ort); --target {} writes DequantizeLinear + MatMul", self.target),
        )?;
        refuse_unused(self.block_size.is_some() && mode != Int4Weight, "--block-size", &not_for("int4-weight"))?;
        refuse_unused(self.zero_point && mode != Int4Weight, "--zero-point", &not_for("int4-weight"))?;
        refuse_unused(self.quantize_embeddings && mode != Int4Weight, "--quantize-embeddings", &not_for("int4-weight"))?;
        refuse_unused(self.float16_compute && mode != Fp16, "--float16-compute", &not_for("fp16"))?;
        refuse_unused(
            self.float16_compute && self.target != Target::Ort,
            "--float16-compute",
            &format!("--target {} computes in float16 already", self.target),
        )?;
        refuse_unused(self.activations.is_some() && mode == Int8, "--activations", "--mode int8 chooses per token or per tensor per layer itself")?;
        refuse_unused(self.activations.is_some() && mode != Int8Dynamic && mode != Int8, "--activations", &not_for("int8-dynamic"))?;
        refuse_unused(self.max_error.is_some() && !matches!(mode, Int8 | Int8Dynamic), "--max-error", &not_for("int8 or int8-dynamic"))?;
        let searches = self.max_error.is_some() || (mode == Int8 && self.calibration.is_some());
        refuse_unused(
            self.max_error_batches.is_some() && !searches,
            "--max-error-batches",
            "the batches of --max-error's search, which needs --max-error (or --mode int8) and calibration data",
        )?;
        refuse_unused(self.smoothquant.is_some() && !mode.is_int8(), "--smoothquant", &not_for("int8, int8-dynamic or int8-static"))?;
        refuse_unused(self.calibration_method.is_some() && mode != Int8Static, "--calibration-method and --percentile", &not_for("int8-static"))?;
        refuse_unused(self.weight_type.is_some() && mode != Int8Static, "--weight-type", &not_for("int8-static"))?;
        refuse_unused(
            self.rounding.is_some() && !matches!(mode, Int8 | Int8Dynamic | Int4Weight),
            "--rounding",
            &not_for("int8, int8-dynamic or int4-weight"),
        )?;
        refuse_unused(self.calibration.is_some() && mode == Fp16, "calibration data", "--mode fp16 converts every weight as it is")?;
        refuse_unused(
            self.calibration.is_some() && mode == Int4Weight && self.rounding == Some(WeightRounding::Nearest),
            "calibration data",
            "--rounding rtn reads none (GPTQ does)",
        )?;
        let dynamic_reads_calibration = self.rounding == Some(WeightRounding::Gptq)
            || self.activations == Some(ActivationScale::PerToken)
            || self.max_error.is_some()
            || self.smoothquant.is_some();
        refuse_unused(
            self.calibration.is_some() && mode == Int8Dynamic && !dynamic_reads_calibration,
            "calibration data",
            "--mode int8-dynamic reads it only for --rounding gptq, --activations per-token, --max-error or --smoothquant",
        )?;
        if self.target == Target::TensorRt && matches!(mode, Int8 | Int8Dynamic) {
            return Err(CommandError::Request("quantize --target: ort or portable (TensorRT wants static Q/DQ, not dynamic quantization)".into()));
        }
        if mode == Int8Static && self.target == Target::Portable {
            return Err(CommandError::Request("quantize --mode int8-static --target: ort or tensorrt".into()));
        }
        if self.rounding == Some(WeightRounding::Gptq) && self.calibration.is_none() {
            return Err(CommandError::needs_calibration("--rounding gptq"));
        }
        if let Some(e) = self.max_error.filter(|_| self.calibration.is_none()) {
            return Err(CommandError::needs_calibration(&format!("--max-error {e}")));
        }
        if let Some(alpha) = self.smoothquant {
            if !(0.0..=1.0).contains(&alpha) {
                return Err(CommandError::Request(format!("--smoothquant {alpha}: the strength is between 0 and 1")));
            }
            if self.calibration.is_none() {
                return Err(CommandError::needs_calibration("--smoothquant"));
            }
        }
        if mode == Int8Static && self.calibration.is_none() {
            return Err(CommandError::Request("calibration data needed: --calib-text FILE --tokenizer tokenizer.json, or --calib data.npz".into()));
        }
        if let Some(size) = self.block_size.filter(|s| ![32, 64, 128].contains(s)) {
            return Err(CommandError::Request(format!("--block-size {size}: 32, 64 or 128")));
        }
        if let Some(level) = self.accuracy_level.filter(|l| ![0, 4].contains(l)) {
            return Err(CommandError::Request(format!("--accuracy-level {level}: 0 or 4")));
        }
        if let Some(WeightType::Uint8) = self.weight_type.filter(|_| self.target == Target::TensorRt) {
            return Err(CommandError::Request("--weight-type uint8: TensorRT takes int8 weights only".into()));
        }
        Ok(())
    }

    fn verify_options(&self) -> Option<VerifyOptions> {
        let tolerance = self.tolerance();
        self.verify.then(|| VerifyOptions { atol: tolerance.atol.unwrap_or(f32::INFINITY), rtol: tolerance.rtol, engine: self.engine, ..Default::default() })
    }
}

/// Quantizes `original` as the request says and checks the result.
pub fn quantize(original: &Model, request: &QuantizeRequest, observer: &dyn Observer) -> Result<Outcome<QuantizeReport>, CommandError> {
    request.refuse_unused_options()?;
    check_exclusions(original, &request.exclude)?;
    let opset = original.opset("").unwrap_or(0);
    if let Some(highest) = request.max_opset.filter(|&h| h < opset) {
        return Err(CommandError::Request(format!("--max-opset {highest}: the model is already at opset {opset}")));
    }
    let started = std::time::Instant::now();
    let (quantized, records, sensitivity, int4) = match request.mode {
        QuantizeMode::Int4Weight => {
            let (model, records, report) = quantize_int4(original, request, observer)?;
            (model, records, None, Some(report))
        }
        _ => {
            let (model, records, sensitivity) = quantize_int8_or_fp16(original, request, observer)?;
            (model, records, sensitivity, None)
        }
    };
    for line in pass_lines(&records) {
        observer.say(&line);
    }
    for note in records.iter().flat_map(|r| &r.notes) {
        observer.say(&format!("note: {note}"));
    }
    let tolerance = request.tolerance();
    let comparison = check(original, &quantized, request.verify_options().as_ref(), observer)?;
    let rejected = comparison.as_ref().and_then(|c| {
        let cosine = c.min_cosine();
        if c.passed() && cosine >= tolerance.min_cosine {
            return None;
        }
        let bound = match tolerance.atol {
            Some(atol) if request.mode == QuantizeMode::Int4Weight => format!(", --atol {atol}"),
            Some(atol) => format!(", --atol {atol} --rtol {}", tolerance.rtol),
            None => String::new(),
        };
        let advice = match request.mode {
            QuantizeMode::Int4Weight => "--exclude the sensitive MatMuls, a smaller --block-size, --rounding gptq, or loosen the bound",
            _ => "--exclude the sensitive MatMuls, or loosen the bound",
        };
        Some(format!(
            "the quantized model differs from the input beyond tolerance (cosine {cosine:.6}, --min-cosine {}{bound}); nothing written ({advice})",
            tolerance.min_cosine
        ))
    });
    let int4 = int4.map(|mut r| {
        r.verify_tolerance = comparison.as_ref().map(|c| Tolerance { min_cosine: c.min_cosine(), atol: Some(c.max_abs() as f32), rtol: 0.0 });
        r
    });
    let report = QuantizeReport {
        target: request.target,
        mode: request.mode.name(),
        activations: matches!(request.mode, QuantizeMode::Int8 | QuantizeMode::Int8Dynamic).then(|| format!("{:?}", activations(request))),
        nodes_before: original.graph.node_count(),
        nodes_after: quantized.graph.node_count(),
        tolerance,
        passes: records,
        sensitivity,
        int4,
        seconds: started.elapsed().as_secs_f64(),
        verification: comparison,
    };
    Ok(Outcome { model: quantized, report, rejected })
}

/// The activation scales of the int8 modes.
fn activations(request: &QuantizeRequest) -> ActivationScale {
    match request.mode {
        QuantizeMode::Int8 => ActivationScale::PerToken,
        _ => request.activations.unwrap_or_default(),
    }
}

/// `int4-weight`: cleanup (raising the opset for the portable forms), GPTQ's
/// `X^T X` when rounding is GPTQ, then the weights and, when asked, the
/// embedding tables.
fn quantize_int4(original: &Model, request: &QuantizeRequest, observer: &dyn Observer) -> Result<(Model, Vec<PassRecord>, Int4Report), CommandError> {
    let target = request.target;
    let block_size = request.block_size.unwrap_or(DEFAULT_INT4_BLOCK_SIZE);
    let accuracy_level = (target == Target::Ort).then(|| request.accuracy_level.unwrap_or(DEFAULT_ACCURACY_LEVEL));
    let gptq = match request.rounding {
        Some(rounding) => rounding == WeightRounding::Gptq,
        None => request.calibration.is_some(),
    };
    let exclude: HashSet<String> = request.exclude.iter().cloned().collect();
    // the portable forms need DequantizeLinear-21 (int4, block_size)
    let raise = (target != Target::Ort && original.opset("").unwrap_or(0) < BLOCKED_DEQUANTIZE_OPSET).then_some(BLOCKED_DEQUANTIZE_OPSET);
    if let (Some(highest), Some(needed)) = (request.max_opset, raise) {
        if highest < needed {
            return Err(CommandError::Request(format!(
                "--max-opset {highest}: --mode int4-weight --target {target} writes DequantizeLinear with int4 blocks, from opset {needed} (--target ort needs no raise)"
            )));
        }
    }
    let cleanup = optimization_passes(target, &PipelineOptions { opset: raise, ..PipelineOptions::cleanup_only() });
    let mut quantized = original.clone();
    let mut records = {
        let _step = Step::begin(observer, "cleaning up");
        run_pipeline(&mut quantized, &cleanup, &DriverOptions::default())?
    };
    let rounding = match request.calibration.as_ref().filter(|_| gptq) {
        None => Rounding::Nearest,
        Some(source) => {
            let _step = Step::begin(observer, "calibrating (X^T X of every quantized MatMul's input)");
            Rounding::Gptq { hessians: activation_hessians(&quantized, source, block_size, &exclude)?, options: Default::default() }
        }
    };
    // embeddings last: type inference does not see through the contrib op
    // that replaces them, and quantize-int4 takes only float32 activations
    let zero_point = request.zero_point;
    let mut passes: Vec<Box<dyn Pass>> =
        vec![Box::new(QuantizeInt4 { target, block_size, zero_point, rounding, exclude: exclude.clone(), accuracy_level: accuracy_level.unwrap_or(0) })];
    if request.quantize_embeddings {
        passes.push(Box::new(QuantizeGatherInt4 { target, block_size, zero_point, exclude }));
    }
    passes.push(Box::new(crate::passes::dead_code::EliminateDeadCode));
    records.extend({
        let _step = Step::begin(observer, format!("quantizing to int4 for {target}"));
        run_pipeline(&mut quantized, &passes, &DriverOptions::default())?
    });
    let initializer_bytes = |m: &Model| m.graph.initializers.iter().map(|t| t.byte_len()).sum::<u64>();
    let replaced: u64 = original.graph.initializers.iter().filter(|t| quantized.graph.initializer(&t.name).is_none()).map(|t| t.byte_len()).sum();
    let int4: u64 = quantized.graph.initializers.iter().filter(|t| original.graph.initializer(&t.name).is_none()).map(|t| t.byte_len()).sum();
    observer.say(&format!(
        "weights: {replaced} float bytes -> {int4} int4 bytes with scales ({:.3}x); all initializers {} -> {} bytes",
        int4 as f64 / replaced.max(1) as f64,
        initializer_bytes(original),
        initializer_bytes(&quantized)
    ));
    let report = Int4Report {
        block_size,
        rounding: if gptq { "gptq" } else { "rtn" },
        zero_point,
        accuracy_level,
        embeddings: if request.quantize_embeddings { "int4, rounded to nearest" } else { "float32" },
        replaced_float_weight_bytes: replaced,
        int4_weight_bytes: int4,
        initializer_bytes_before: initializer_bytes(original),
        initializer_bytes_after: initializer_bytes(&quantized),
        verify_tolerance: None,
    };
    Ok((quantized, records, report))
}

/// The int8 modes and fp16: SmoothQuant first when asked, fusion (`int8`),
/// calibration (GPTQ's `X^T X`, GELU outputs' row maxima, or static ranges),
/// then the passes, under `max_error`'s search when there is a budget.
fn quantize_int8_or_fp16(
    original: &Model,
    request: &QuantizeRequest,
    observer: &dyn Observer,
) -> Result<(Model, Vec<PassRecord>, Option<Int8Choice>), CommandError> {
    let (mode, target) = (request.mode, request.target);
    let calibration = request.calibration.as_ref();
    let int8_dynamic = matches!(mode, QuantizeMode::Int8 | QuantizeMode::Int8Dynamic);
    let max_error = match (mode, request.max_error) {
        (QuantizeMode::Int8, None) if calibration.is_some() => Some(DEFAULT_INT8_MAX_ERROR),
        (_, given) => given,
    };
    let activations = activations(request);
    let gptq = match request.rounding {
        Some(rounding) => rounding == WeightRounding::Gptq,
        None => mode == QuantizeMode::Int8 && calibration.is_some(),
    };
    let mut to_quantize = match (request.smoothquant, calibration) {
        (Some(alpha), Some(source)) => smooth(original, alpha, source, observer)?,
        _ => original.clone(),
    };
    if mode == QuantizeMode::Int8 {
        let _step = Step::begin(observer, format!("fusing for {target}"));
        let records = run_pipeline(&mut to_quantize, &int8_fusion_passes(target, request.max_opset), &DriverOptions::default())?;
        for line in pass_lines(&records) {
            observer.say(&line);
        }
    }
    if mode == QuantizeMode::Int8Static {
        let source = calibration.ok_or_else(|| CommandError::needs_calibration("--mode int8-static"))?;
        let (model, records) = quantize_static(&to_quantize, request, source, observer)?;
        return Ok((model, records, None));
    }
    // GPTQ's X^T X and the GELU outputs' row maxima, in one run over the calibration data
    let calibrated = match calibration.filter(|_| int8_dynamic && (gptq || activations == ActivationScale::PerToken)) {
        Some(source) => {
            let what = if gptq { "GPTQ: X^T X of every quantized MatMul's input, then rounding" } else { "row maxima of GELU outputs" };
            let _step = Step::begin(observer, what);
            calibrate_int8(&to_quantize, source, gptq)?
        }
        None => Int8Calibration::default(),
    };
    let (rounded, gelu_zero_points) = (Arc::new(calibrated.rounded), Arc::new(calibrated.gelu_zero_points));
    // `in_float`: layers kept in float beyond `exclude`; `per_tensor`: layers
    // whose activations get one scale whatever `activations` says
    let quantize_with = |in_float: &HashSet<String>, per_tensor: &HashSet<String>| -> Result<(Model, Vec<PassRecord>), crate::passes::PassError> {
        let excluded = request.exclude.iter().chain(in_float).cloned().collect();
        let pipeline = match mode {
            QuantizeMode::Fp16 => {
                let scope = if target == Target::Ort && !request.float16_compute { Float16Scope::Weights } else { Float16Scope::WeightsAndCompute };
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
        let mut quantized = to_quantize.clone();
        let records = run_pipeline(&mut quantized, &pipeline, &DriverOptions::default())?;
        Ok((quantized, records))
    };
    let (Some(budget), Some(source), true) = (max_error, calibration, int8_dynamic) else {
        let _step = Step::begin(observer, format!("quantizing for {target}"));
        let (model, records) = quantize_with(&HashSet::new(), &HashSet::new())?;
        return Ok((model, records, None));
    };
    let batches = request.max_error_batches.unwrap_or(DEFAULT_MAX_ERROR_BATCHES);
    let search = {
        let _step = Step::begin(observer, format!("measuring each layer's error on {batches} calibration batches"));
        let excluded_already: Vec<String> = request.exclude.clone();
        let problem = Int8Search { original, to_quantize: &to_quantize, budget, batches, excluded_already: &excluded_already };
        let quantize = |in_float: &HashSet<String>, per_tensor: &HashSet<String>| quantize_with(in_float, per_tensor).map(|(model, _)| model);
        problem.run(source, mode == QuantizeMode::Int8, &quantize)?
    };
    for line in choice_lines(&search) {
        observer.say(&line);
    }
    let (model, records) = quantize_with(&search.in_float, &search.per_tensor)?;
    Ok((model, records, Some(search)))
}

/// The search's choice, one line per step it took.
fn choice_lines(choice: &Int8Choice) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(scales) = &choice.activation_scales {
        let chosen = if scales.within_budget() {
            format!("per token for {} of {} activations: {:.2e}", scales.spared.len(), choice.activations, scales.error)
        } else {
            format!("per token everywhere: {:.2e}", scales.error)
        };
        lines.push(format!("error on calibration data: {:.2e} with per-tensor activations, {chosen} (budget {:.2e})", scales.error_none_spared, scales.budget));
    }
    if let Some(float) = &choice.float {
        lines.push(format!(
            "error on calibration data: {:.2e} with every layer quantized, {:.2e} with {} kept in float (budget {:.2e})",
            float.error_none_spared,
            float.error,
            float.spared.len(),
            float.budget
        ));
    }
    lines
}

/// SmoothQuant with ranges from calibration: the smoothed model, after a check
/// that it still computes what `original` does (it is an exact rewrite).
fn smooth(original: &Model, alpha: f32, source: &CalibrationSource, observer: &dyn Observer) -> Result<Model, CommandError> {
    use crate::passes::smooth_quant::SmoothQuant;
    let taps = crate::calibrate::matmul_activations(original);
    let tap_names: Vec<&str> = taps.iter().map(String::as_str).collect();
    let stats = {
        let _step = Step::begin(observer, format!("calibrating {} activations", taps.len()));
        crate::calibrate::calibrate(original, &tap_names, source)?
    };
    let mut smoothed = original.clone();
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(SmoothQuant::from_stats(&stats, alpha))];
    let records = run_pipeline(&mut smoothed, &passes, &DriverOptions::default())?;
    for line in pass_lines(&records) {
        observer.say(&line);
    }
    let _step = Step::begin(observer, "checking the smoothing in tract");
    let exact = VerifyOptions { atol: 1e-3, rtol: 1e-3, ..Default::default() };
    let comparison = crate::passes::verify_rewrite(original, &smoothed, &exact).map_err(CommandError::Unverifiable)?;
    if !comparison.passed() {
        return Err(CommandError::Bug(format!("smooth-quant changed the model's outputs (max abs {:.3e})", comparison.max_abs())));
    }
    Ok(smoothed)
}

/// `int8-static`: cleanup, calibration of the activations `quantize-static`
/// will quantize (on the cleaned graph), then the pass.
fn quantize_static(
    model: &Model,
    request: &QuantizeRequest,
    source: &CalibrationSource,
    observer: &dyn Observer,
) -> Result<(Model, Vec<PassRecord>), CommandError> {
    let target = request.target;
    let exclude: HashSet<String> = request.exclude.iter().cloned().collect();
    let weight_type = match (request.weight_type, target) {
        (Some(given), _) => given,
        (None, Target::TensorRt) => WeightType::Int8,
        // ORT's u8s8 kernel saturates on x86 CPUs without VNNI; on VNNI machines int8 is as exact
        (None, _) => WeightType::Uint8,
    };
    let mut quantized = model.clone();
    let mut records = {
        let _step = Step::begin(observer, "cleaning up");
        run_pipeline(&mut quantized, &cleanup_passes(target), &DriverOptions::default())?
    };
    let taps = activations_to_calibrate(&quantized, target, &exclude);
    let tap_names: Vec<&str> = taps.iter().map(String::as_str).collect();
    let stats = {
        let _step = Step::begin(observer, format!("calibrating {} activations", taps.len()));
        crate::calibrate::calibrate(&quantized, &tap_names, source)?
    };
    let ranges = activation_ranges(&stats, request.calibration_method.unwrap_or(DEFAULT_CALIBRATION_METHOD))?;
    let _step = Step::begin(observer, format!("quantizing for {target}"));
    let pipeline = static_quantization_passes(QuantizeStatic { target, ranges, exclude, weight_type });
    records.extend(run_pipeline(&mut quantized, &pipeline, &DriverOptions::default())?);
    Ok((quantized, records))
}
