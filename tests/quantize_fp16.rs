//! `convert-to-float16` and `onnxopt quantize --mode fp16`: float16 weights
//! (scope `Weights`, the ort target) or weights and compute (`WeightsAndCompute`,
//! portable and tensorrt), float32 inputs and outputs behind Casts, the
//! range-sensitive ops kept in float32, clamps reported, the tract check, and
//! ONNX Runtime running the result.

mod common;

use common::*;
use onnxopt::ir::{AttrValue, DataType, Dim, Graph, GraphBuilder, Model, Node, ValueInfo};
use onnxopt::passes::check::rewrite_and_compare;
use onnxopt::passes::lower_float16_gemm::LowerFloat16Gemm;
use onnxopt::passes::quantize_fp16::{ConvertToFloat16, Float16Scope, CHECK_ATOL, CHECK_RTOL};
use onnxopt::passes::{run_pipeline, DriverOptions, Pass, PassRecord};
use onnxopt::{onnx, verify};
use std::path::Path;

fn convert(scope: Float16Scope, keep_float32: &[&str]) -> Vec<Box<dyn Pass>> {
    vec![Box::new(ConvertToFloat16::new(scope, keep_float32.iter().map(|s| s.to_string()).collect()))]
}

fn converted(model: &Model, scope: Float16Scope) -> (Model, PassRecord) {
    let mut out = model.clone();
    let driver = DriverOptions { validate: true, ..DriverOptions::default() };
    let records = run_pipeline(&mut out, &convert(scope, &[]), &driver).unwrap();
    (out, records[0].clone())
}

/// The element bound `onnxopt quantize --mode fp16` checks by default.
fn fp16_bound() -> verify::VerifyOptions {
    verify::VerifyOptions { atol: CHECK_ATOL, rtol: CHECK_RTOL, ..Default::default() }
}

fn dtype_of(model: &Model, initializer: &str) -> DataType {
    model.graph.initializer(initializer).unwrap().dtype
}

fn ops(model: &Model) -> Vec<String> {
    model.graph.nodes().map(|n| n.qualified_op()).collect()
}

fn casts_to(model: &Model, dtype: DataType) -> usize {
    model.graph.nodes().filter(|n| n.is_onnx("Cast") && n.attr_int("to") == Some(dtype.code() as i64)).count()
}

/// y = Softmax(0.5 * (x @ w + b)): a weight, a bias, a scalar and a
/// range-sensitive op.
fn scaled_softmax() -> Model {
    let mut b = GraphBuilder::new("scaled_softmax");
    let x = b.input("x", DataType::Float, &[-1, 4]);
    let w: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) / 10.0).collect();
    let w = b.initializer_f32("w", &[4, 8], &w);
    let bias = b.initializer_f32("b", &[8], &[0.1, -0.2, 0.3, 0.0, 0.5, -0.6, 0.7, 0.01]);
    let half = b.initializer_f32("half", &[], &[0.5]);
    let h = b.node("MatMul", &[&x, &w]);
    let h = b.node("Add", &[&h, &bias]);
    let h = b.node("Mul", &[&h, &half]);
    let y = b.node("Softmax", &[&h]);
    b.output(&y, DataType::Float, &[-1, 8]);
    b.into_model(17)
}

#[test]
fn weights_scope_stores_weights_in_float16_and_computes_in_float32() {
    let model = scaled_softmax();
    let r = rewrite_and_compare(&model, &convert(Float16Scope::Weights, &[]), &fp16_bound());
    assert_eq!(r.patches(), 1);
    assert_eq!(dtype_of(&r.model, "w"), DataType::Float16);
    assert_eq!(dtype_of(&r.model, "b"), DataType::Float16);
    assert_eq!(dtype_of(&r.model, "half"), DataType::Float, "a scalar only float32 nodes read stays");
    // one Cast per weight, to float32, and no float16 computation
    assert_eq!(casts_to(&r.model, DataType::Float), 2);
    assert_eq!(casts_to(&r.model, DataType::Float16), 0);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    // weights rounded to 11 bits, float32 compute: well within the fp16 bound
    assert!(r.comparison.max_abs() < 1e-3, "max abs {}", r.comparison.max_abs());
    insta::assert_snapshot!("convert_to_float16__scaled_softmax_weights", r.snapshot);
}

#[test]
fn compute_scope_runs_in_float16_with_softmax_in_float32() {
    let model = scaled_softmax();
    let r = rewrite_and_compare(&model, &convert(Float16Scope::WeightsAndCompute, &[]), &fp16_bound());
    assert_eq!(r.patches(), 1);
    for name in ["w", "b", "half"] {
        assert_eq!(dtype_of(&r.model, name), DataType::Float16, "{name}");
    }
    // x Cast in; Softmax's input Cast back to float32; Softmax writes y itself
    assert_eq!(casts_to(&r.model, DataType::Float16), 1);
    assert_eq!(casts_to(&r.model, DataType::Float), 1);
    let softmax = r.model.graph.nodes().find(|n| n.op_type == "Softmax").unwrap();
    assert_eq!(softmax.outputs, model.graph.outputs.iter().map(|o| o.name.clone()).collect::<Vec<_>>());
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    insta::assert_snapshot!("convert_to_float16__scaled_softmax_compute", r.snapshot);
}

/// LayerNormalization computes its statistics in float32 (`stash_type`
/// 1, the default): it runs in float16. Asking for other statistics keeps it
/// in float32.
#[test]
fn a_layer_norm_computes_in_float16_unless_its_statistics_are_not_float32() {
    let layer_norm = |stash_type: Option<i64>| {
        let mut b = GraphBuilder::new("norm");
        let x = b.input("x", DataType::Float, &[2, 3, 8]);
        let gamma = b.initializer_f32("gamma", &[8], &[1.0, 0.5, 2.0, 1.0, 1.5, 1.0, 0.25, 1.0]);
        let beta = b.initializer_f32("beta", &[8], &[0.0, 0.1, 0.0, -0.1, 0.0, 0.2, 0.0, 0.0]);
        let mut attrs = vec![("axis", AttrValue::Int(-1))];
        attrs.extend(stash_type.map(|t| ("stash_type", AttrValue::Int(t))));
        let y = b.node_with("LayerNormalization", &[&x, &gamma, &beta], attrs);
        b.output(&y, DataType::Float, &[2, 3, 8]);
        b.into_model(17)
    };
    let model = layer_norm(None);
    let r = rewrite_and_compare(&model, &convert(Float16Scope::WeightsAndCompute, &[]), &fp16_bound());
    let norm = r.model.graph.nodes().find(|n| n.op_type == "LayerNormalization").unwrap();
    assert_eq!(norm.inputs, ["x/float16", "gamma", "beta"]);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    let (out, _) = converted(&layer_norm(Some(DataType::Bfloat16.code() as i64)), Float16Scope::WeightsAndCompute);
    let norm = out.graph.nodes().find(|n| n.op_type == "LayerNormalization").unwrap();
    assert_eq!(norm.inputs, ["x", "gamma/float32", "beta/float32"]);
}

/// A float16 Gemm with C: tract refuses it, so the verification lowering
/// (`lower-float16-gemm`) runs it in float32 between Casts; the converted
/// model itself keeps the float16 Gemm.
#[test]
fn a_float16_gemm_with_bias_is_checked_in_tract() {
    let mut b = GraphBuilder::new("conv1d");
    let x = b.input("x", DataType::Float, &[3, 4]);
    let w = b.initializer_f32("w", &[6, 4], &(0..24).map(|i| (i as f32 - 11.0) / 7.0).collect::<Vec<_>>());
    let c = b.initializer_f32("c", &[6], &[0.5, -0.5, 0.25, 0.0, 1.0, -1.0]);
    b.add(Node::new("Gemm", &[&x, &w, &c], &["y"]).with_attr("transB", AttrValue::Int(1)));
    b.output("y", DataType::Float, &[3, 6]);
    let model = b.into_model(17);
    let r = rewrite_and_compare(&model, &convert(Float16Scope::WeightsAndCompute, &[]), &fp16_bound());
    assert!(r.comparison.passed(), "{:?}", r.comparison);
    let gemm = r.model.graph.nodes().find(|n| n.op_type == "Gemm").unwrap();
    assert_eq!(gemm.inputs, ["x/float16", "w", "c"]);
    // what tract runs
    let mut lowered = r.model.clone();
    let driver = DriverOptions { validate: true, ..DriverOptions::default() };
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(LowerFloat16Gemm)];
    let records = run_pipeline(&mut lowered, &passes, &driver).unwrap();
    assert_eq!(records[0].patches, 1);
    insta::assert_snapshot!("lower_float16_gemm__gemm_with_bias", format!("before:\n{}\nafter:\n{lowered}", r.model));
    // a float16 Gemm without C nor alpha runs in tract as it is: left alone
    let mut b = GraphBuilder::new("plain");
    let x = b.input("x", DataType::Float, &[3, 4]);
    let w = b.initializer_f32("w", &[4, 6], &(0..24).map(|i| (i as f32 - 11.0) / 7.0).collect::<Vec<_>>());
    b.add(Node::new("Gemm", &[&x, &w], &["y"]));
    b.output("y", DataType::Float, &[3, 6]);
    let (plain, _) = converted(&b.into_model(17), Float16Scope::WeightsAndCompute);
    let mut lowered = plain.clone();
    assert_eq!(run_pipeline(&mut lowered, &passes, &driver).unwrap()[0].patches, 0);
}

#[test]
fn inputs_and_outputs_stay_float32() {
    // y = Relu(x @ w) is a graph output that another node also reads: z = y + y
    let mut b = GraphBuilder::new("two_outputs");
    let x = b.input("x", DataType::Float, &[2, 4]);
    let w = b.initializer_f32("w", &[4, 3], &(0..12).map(|i| i as f32 / 6.0 - 1.0).collect::<Vec<_>>());
    let h = b.node("MatMul", &[&x, &w]);
    b.add(Node::new("Relu", &[&h], &["y"]));
    b.add(Node::new("Add", &["y", "y"], &["z"]));
    b.output("y", DataType::Float, &[2, 3]);
    b.output("z", DataType::Float, &[2, 3]);
    let model = b.into_model(17);
    for scope in [Float16Scope::Weights, Float16Scope::WeightsAndCompute] {
        let r = rewrite_and_compare(&model, &convert(scope, &[]), &fp16_bound());
        let g = &r.model.graph;
        assert_eq!(g.inputs, model.graph.inputs, "{scope:?}");
        assert_eq!(g.outputs, model.graph.outputs, "{scope:?}");
        if scope == Float16Scope::WeightsAndCompute {
            // each output is written by a Cast to float32; Add reads Relu's float16 result
            for output in ["y", "z"] {
                let (id, _) = g.producer(output).unwrap();
                let cast = g.node(id).unwrap();
                assert!(cast.is_onnx("Cast") && cast.attr_int("to") == Some(DataType::Float.code() as i64), "{output}: {cast:?}");
                assert_eq!(cast.inputs, [format!("{output}/float16")]);
            }
            let add = g.nodes().find(|n| n.op_type == "Add").unwrap();
            assert_eq!(add.inputs, ["y/float16", "y/float16"]);
        }
        assert!(r.comparison.passed(), "{scope:?}: {:?}", r.comparison);
    }
}

#[test]
fn a_value_beyond_float16_range_is_clamped_and_reported() {
    let mut b = GraphBuilder::new("mask_fill");
    let x = b.input("x", DataType::Float, &[2, 3]);
    let big = b.initializer_f32("big", &[3], &[1.0e6, -7.0e4, 2.0]);
    let tiny = b.initializer_f32("tiny", &[2, 1], &[1.0e-9, 0.25]);
    let y = b.node("Add", &[&x, &big]);
    b.output(&y, DataType::Float, &[2, 3]);
    let z = b.node("Mul", &[&x, &tiny]);
    b.output(&z, DataType::Float, &[2, 3]);
    let model = b.into_model(17);
    let (out, record) = converted(&model, Float16Scope::WeightsAndCompute);
    let values = out.graph.initializer("big").unwrap().to_f32().unwrap();
    assert_eq!(values.iter().copied().collect::<Vec<_>>(), [65504.0, -65504.0, 2.0]);
    let clamp = record.notes.iter().find(|n| n.contains("'big'")).unwrap_or_else(|| panic!("{:?}", record.notes));
    assert!(clamp.contains("2 values beyond +-65504"), "{clamp}");
    let flush = record.notes.iter().find(|n| n.contains("'tiny'")).unwrap_or_else(|| panic!("{:?}", record.notes));
    assert!(flush.contains("1 nonzero values"), "{flush}");
}

/// A float mask made from an integer input: its Cast(to=FLOAT) becomes
/// Cast(to=FLOAT16) when every reader computes in float16; the integer
/// subgraph (Shape, Gather) is untouched.
#[test]
fn a_cast_to_float_inside_becomes_a_cast_to_float16() {
    let mut b = GraphBuilder::new("masked");
    let x = b.input("x", DataType::Float, &[2, 3]);
    let mask = b.input("mask", DataType::Int64, &[2, 3]);
    let shape = b.node("Shape", &[&x]);
    let zero = b.initializer_i64("zero", &[], &[0]);
    let rows = b.node("Gather", &[&shape, &zero]);
    b.output(&rows, DataType::Int64, &[]);
    let m = b.node_with("Cast", &[&mask], vec![("to", AttrValue::Int(DataType::Float.code() as i64))]);
    let y = b.node("Mul", &[&x, &m]);
    b.output(&y, DataType::Float, &[2, 3]);
    let model = b.into_model(17);
    let r = rewrite_and_compare(&model, &convert(Float16Scope::WeightsAndCompute, &[]), &fp16_bound());
    let cast = r.model.graph.nodes().find(|n| n.is_onnx("Cast") && n.inputs == ["mask"]).unwrap();
    assert_eq!(cast.attr_int("to"), Some(DataType::Float16.code() as i64));
    // Shape reads x as it is stored (float32), no Cast in front
    let shape = r.model.graph.nodes().find(|n| n.op_type == "Shape").unwrap();
    assert_eq!(shape.inputs, ["x"]);
    let gather = r.model.graph.nodes().find(|n| n.op_type == "Gather").unwrap();
    assert_eq!(gather, model.graph.nodes().find(|n| n.op_type == "Gather").unwrap());
    assert!(r.comparison.passed(), "{:?}", r.comparison);
}

#[test]
fn a_model_without_float_tensors_is_left_alone() {
    let mut b = GraphBuilder::new("integers");
    let x = b.input("x", DataType::Int64, &[2, 3]);
    let one = b.initializer_i64("one", &[], &[1]);
    let y = b.node("Add", &[&x, &one]);
    b.output(&y, DataType::Int64, &[2, 3]);
    let model = b.into_model(17);
    for scope in [Float16Scope::Weights, Float16Scope::WeightsAndCompute] {
        let (out, record) = converted(&model, scope);
        assert_eq!(record.patches, 0, "{scope:?}");
        assert_eq!(out, model);
    }
    // scalars only: nothing to store in float16 when nothing computes in it
    let mut b = GraphBuilder::new("scalar");
    let x = b.input("x", DataType::Float, &[2]);
    let half = b.initializer_f32("half", &[], &[0.5]);
    let y = b.node("Mul", &[&x, &half]);
    b.output(&y, DataType::Float, &[2]);
    let model = b.into_model(17);
    let (out, record) = converted(&model, Float16Scope::Weights);
    assert_eq!(record.patches, 0);
    assert_eq!(out, model);
}

#[test]
fn a_converted_model_converts_no_further() {
    for scope in [Float16Scope::Weights, Float16Scope::WeightsAndCompute] {
        let (once, _) = converted(&scaled_softmax(), scope);
        let (twice, record) = converted(&once, scope);
        assert_eq!(record.patches, 0, "{scope:?}");
        assert_eq!(twice, once);
    }
}

#[test]
fn kept_nodes_and_stale_value_info() {
    let mut model = scaled_softmax();
    // an exporter's value_info for an intermediate: it would say float32
    model.graph.value_info.push(ValueInfo::tensor("add_2", DataType::Float, vec![Dim::Symbol("d0".into()), Dim::Fixed(8)]));
    model.graph.value_info.push(ValueInfo::tensor("matmul_1", DataType::Float, vec![Dim::Symbol("d0".into()), Dim::Fixed(8)]));
    let r = rewrite_and_compare(&model, &convert(Float16Scope::WeightsAndCompute, &["n1"]), &fp16_bound());
    // n1 (the MatMul) stays float32 and reads w Cast back; its output's entry stays
    let matmul = r.model.graph.nodes().find(|n| n.name == "n1").unwrap();
    assert_eq!(matmul.inputs, ["x", "w/float32"]);
    let names: Vec<&str> = r.model.graph.value_info.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["matmul_1"]);
    assert!(r.comparison.passed(), "{:?}", r.comparison);
}

#[test]
fn a_float_tensor_read_inside_a_subgraph_is_an_error() {
    let mut b = GraphBuilder::new("branch");
    let x = b.input("x", DataType::Float, &[2]);
    let c = b.input("c", DataType::Bool, &[]);
    let mut then = Graph::new("then");
    then.add_node(Node::new("Neg", &[&x], &["t"]));
    then.outputs.push(ValueInfo::tensor("t", DataType::Float, vec![Dim::Fixed(2)]));
    let mut other = Graph::new("else");
    other.add_node(Node::new("Identity", &[&x], &["e"]));
    other.outputs.push(ValueInfo::tensor("e", DataType::Float, vec![Dim::Fixed(2)]));
    b.add(
        Node::new("If", &[&c], &["y"]).with_attr("then_branch", AttrValue::Graph(Box::new(then))).with_attr("else_branch", AttrValue::Graph(Box::new(other))),
    );
    b.output("y", DataType::Float, &[2]);
    let model = b.into_model(17);
    let mut out = model.clone();
    let error = run_pipeline(&mut out, &convert(Float16Scope::Weights, &[]), &DriverOptions::default()).unwrap_err();
    assert!(error.to_string().contains("reads float32 tensor 'x' inside a subgraph"), "{error}");
}

fn quantize_fp16(input: &Path, output: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["--quiet", "quantize", input.to_str().unwrap(), "-o", output.to_str().unwrap(), "--mode", "fp16"];
    args.extend_from_slice(extra);
    run(&args)
}

/// ONNX Runtime (CPU) runs `candidate` and agrees with `reference` to this
/// cosine; onnx's checker accepts it with full type inference. Skips where
/// python3 cannot import onnxruntime.
fn onnxruntime_runs(reference: &Path, candidate: &Path, min_cosine: f64) {
    let Some(cosine) = onnxruntime_cosine(reference, candidate) else { return };
    assert!(cosine >= min_cosine, "{}: cosine {cosine}", candidate.display());
    let checker = "import onnx, sys; onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True)";
    let check = std::process::Command::new("python3").args(["-c", checker]).arg(candidate).output().unwrap();
    assert!(check.status.success(), "onnx.checker: {}", String::from_utf8_lossy(&check.stderr));
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The fused tiny BERT (com.microsoft Attention, SkipLayerNormalization,
/// BiasGelu, EmbedLayerNormalization) converts for every target, passes its
/// tract check and runs in ONNX Runtime.
#[test]
fn the_fused_bert_converts_and_runs_in_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let fused = dir.path().join("bert.ort.onnx");
    let o = run(&["--quiet", "optimize", fixture("bert.ts.onnx").to_str().unwrap(), "-o", fused.to_str().unwrap(), "--target", "ort"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(ops(&onnx::load(&fused).unwrap()).contains(&"com.microsoft.Attention".to_string()));
    for target in ["ort", "portable"] {
        let out = dir.path().join(format!("bert.{target}.fp16.onnx"));
        let report_path = dir.path().join(format!("{target}.json"));
        let o = quantize_fp16(&fused, &out, &["--target", target, "--report", report_path.to_str().unwrap()]);
        assert!(o.status.success(), "{target}: {}", stderr(&o));
        let r = report(&report_path);
        assert_eq!(r["verification"]["outputs"][0]["within_tolerance"], true, "{target}");
        assert!(r["verification"]["outputs"][0]["cosine"].as_f64().unwrap() >= 0.9999, "{target}");
        let model = onnx::load(&out).unwrap();
        // ort: Attention reads its packed weight Cast to float32; portable: the float16 weight itself
        let attention = model.graph.nodes().find(|n| n.op_type == "Attention").unwrap();
        let weight = &attention.inputs[1];
        match target {
            "ort" => assert!(weight.ends_with("/float32"), "{attention:?}"),
            _ => assert_eq!(dtype_of(&model, weight), DataType::Float16, "{attention:?}"),
        }
        onnxruntime_runs(&fixture("bert.ts.onnx"), &out, 0.9999);
    }
}

/// GPT-2's Conv1D layers are Gemms with a bias: float16 compute converts
/// them, tract checks them (lowered) and ONNX Runtime runs them.
#[test]
fn gpt2_gemms_compute_in_float16_and_run_in_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gpt2.fp16.onnx");
    let o = quantize_fp16(&fixture("gpt2.ts.onnx"), &out, &["--target", "portable"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let model = onnx::load(&out).unwrap();
    let gemm = model.graph.nodes().find(|n| n.op_type == "Gemm").unwrap();
    assert_eq!(dtype_of(&model, &gemm.inputs[1]), DataType::Float16);
    onnxruntime_runs(&fixture("gpt2.ts.onnx"), &out, 0.9999);
}

/// Acceptance on all-MiniLM-L6-v2, both exports: half the file, the tract
/// check within the stated bound (cosine 0.9999 and |a - b| <= 2e-2 + 1e-2 |a|),
/// and ONNX Runtime running it. (Sentence-embedding fidelity on dev.txt is
/// measured with ../shared/bench/fidelity.py: README.)
#[test]
fn minilm_fp16_is_half_the_size_and_runs_in_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    for export in ["model.ts.onnx", "model.dynamo.onnx"] {
        let Some(input) = shared_model(export) else { return };
        for target in ["ort", "portable"] {
            let out = dir.path().join(format!("{export}.{target}.fp16.onnx"));
            let report_path = dir.path().join("report.json");
            let o = quantize_fp16(&input, &out, &["--target", target, "--report", report_path.to_str().unwrap()]);
            assert!(o.status.success(), "{export} {target}: {}", stderr(&o));
            let (before, after) = (std::fs::metadata(&input).unwrap().len(), std::fs::metadata(&out).unwrap().len());
            assert!((after as f64) < 0.51 * before as f64, "{export} {target}: {after} of {before} bytes");
            let r = report(&report_path);
            assert_eq!(r["tolerance"]["min_cosine"], 0.9999);
            let atol = r["tolerance"]["atol"].as_f64().unwrap();
            assert!((atol - CHECK_ATOL as f64).abs() < 1e-6, "the report states atol {atol}");
            let output = &r["verification"]["outputs"][0];
            assert_eq!(output["within_tolerance"], true, "{export} {target}: {output}");
            assert!(output["cosine"].as_f64().unwrap() >= 0.9999, "{export} {target}: {output}");
            onnxruntime_runs(&input, &out, 0.9999);
        }
    }
}

#[test]
fn an_unknown_node_to_keep_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = quantize_fp16(&fixture("bert.ts.onnx"), &dir.path().join("out.onnx"), &["--exclude", "no_such_node"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no_such_node"), "{}", stderr(&o));
}

/// For ORT's CUDA provider (`--float16-compute`): the fused Llama decoder's
/// GroupQueryAttention and MatMulNBits compute in float16 (ORT's CUDA
/// GroupQueryAttention has no float32 kernel: a float32 one is placed on the
/// CPU), the caches stay float32 at the graph's edge, and the result checks
/// over the decoder's prefill and decode steps.
#[test]
fn a_fused_decoder_computes_in_float16_for_cuda() {
    use onnxopt::commands::{self, OptimizeRequest, QuantizeMode, QuantizeRequest, Silent};
    use onnxopt::target::Target;
    let original = onnx::load(&fixture("llama-kv.optimum.onnx")).unwrap();
    let fused = commands::optimize(&original, &OptimizeRequest::default(), &Silent).unwrap().model;
    // the embedding table too (GatherBlockQuantized): its output's type is known, so the layers after it convert
    let int4_request = QuantizeRequest { quantize_embeddings: true, ..QuantizeRequest::new(QuantizeMode::Int4Weight, Target::Ort) };
    let int4 = commands::quantize(&fused, &int4_request, &Silent).unwrap().model;
    assert!(int4.graph.nodes().any(|n| n.op_type == "GatherBlockQuantized"));
    for (label, model) in [("fused", &fused), ("int4", &int4)] {
        let request = QuantizeRequest { float16_compute: true, atol: Some(0.1), ..QuantizeRequest::new(QuantizeMode::Fp16, Target::Ort) };
        let outcome = commands::quantize(model, &request, &Silent).unwrap();
        assert!(outcome.rejected.is_none(), "{label}: {:?}", outcome.rejected);
        let types = onnxopt::ir::infer_types(&outcome.model);
        let gqa = outcome.model.graph.nodes().find(|n| n.op_type == "GroupQueryAttention").unwrap();
        assert_eq!(types.elem_type(&gqa.inputs[0]), Some(DataType::Float16), "{label}: {gqa:?}");
        assert_eq!(types.elem_type(&gqa.outputs[1]), Some(DataType::Float16), "{label}: the present key");
        if label == "int4" {
            let nbits = outcome.model.graph.nodes().find(|n| n.op_type == "MatMulNBits").unwrap();
            assert_eq!(types.elem_type(&nbits.outputs[0]), Some(DataType::Float16), "{nbits:?}");
        }
        let inputs_and_outputs = outcome.model.graph.inputs.iter().chain(&outcome.model.graph.outputs);
        assert!(inputs_and_outputs.filter_map(|v| v.tensor_type()?.elem_type).all(|t| t != DataType::Float16), "{label}: float32 at the edge");
        let check = outcome.report.verification.as_ref().unwrap();
        assert!(check.passed() && check.min_cosine() > 0.999, "{label}: {check:?}");
    }
    // the option is for fp16 only, and for ort only
    let refused = QuantizeRequest { float16_compute: true, ..QuantizeRequest::new(QuantizeMode::Int8Dynamic, Target::Ort) };
    assert!(commands::quantize(&fused, &refused, &Silent).unwrap_err().to_string().contains("--float16-compute"));
    let refused = QuantizeRequest { float16_compute: true, ..QuantizeRequest::new(QuantizeMode::Fp16, Target::Portable) };
    assert!(commands::quantize(&fused, &refused, &Silent).unwrap_err().to_string().contains("computes in float16 already"));
}
