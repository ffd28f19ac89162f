//! The library's command calls (`onnxopt::commands`): the same results as the
//! CLI, without a process or a file; options a mode does not use are refused.

mod common;

use common::*;
use onnxopt::commands::{self, CommandError, OptimizeRequest, PruneRequest, Pruning, QuantizeMode, QuantizeRequest, Silent};
use onnxopt::onnx;
use onnxopt::target::Target;

fn count(model: &onnxopt::ir::Model, op: &str) -> usize {
    model.graph.nodes().filter(|n| n.qualified_op() == op).count()
}

#[test]
fn optimize_fuses_and_checks_in_memory() {
    let original = onnx::load(&fixture("bert.ts.onnx")).unwrap();
    let outcome = commands::optimize(&original, &OptimizeRequest::default(), &Silent).unwrap();
    assert!(outcome.rejected.is_none());
    assert_eq!(count(&outcome.model, "com.microsoft.Attention") + count(&outcome.model, "com.microsoft.MultiHeadAttention"), 2);
    let check = outcome.report.verification.as_ref().expect("checked by default");
    assert!(check.passed() && check.max_abs() < 1e-4, "{check:?}");
    assert_eq!(outcome.report.nodes_before, original.graph.node_count());
    assert!(outcome.report.nodes_after < outcome.report.nodes_before);

    let unchecked = OptimizeRequest { verify: None, target: Target::Portable, ..OptimizeRequest::default() };
    let outcome = commands::optimize(&original, &unchecked, &Silent).unwrap();
    assert!(outcome.report.verification.is_none());
    assert!(outcome.model.graph.nodes().all(|n| n.domain.is_empty()), "portable: standard ops only");
}

#[test]
fn quantize_int4_in_memory_reports_what_it_chose() {
    let original = onnx::load(&fixture("bert.ts.onnx")).unwrap();
    let outcome = commands::quantize(&original, &QuantizeRequest::new(QuantizeMode::Int4Weight, Target::Ort), &Silent).unwrap();
    assert!(outcome.rejected.is_none());
    assert_eq!(count(&outcome.model, "com.microsoft.MatMulNBits"), 12);
    let int4 = outcome.report.int4.as_ref().unwrap();
    assert_eq!((int4.block_size, int4.rounding, int4.accuracy_level), (32, "rtn", Some(4)));
    assert!(outcome.report.verification.as_ref().unwrap().min_cosine() >= 0.9);
}

/// A bound the result cannot meet: the model comes back with the reason it
/// must not be written.
#[test]
fn a_result_beyond_the_bound_is_rejected_not_an_error() {
    let original = onnx::load(&fixture("bert.ts.onnx")).unwrap();
    let request = QuantizeRequest { min_cosine: Some(1.0 + 1e-9), ..QuantizeRequest::new(QuantizeMode::Int8Dynamic, Target::Ort) };
    let outcome = commands::quantize(&original, &request, &Silent).unwrap();
    let why = outcome.rejected.expect("rejected");
    assert!(why.contains("--min-cosine") && why.contains("nothing written"), "{why}");
}

#[test]
fn options_a_mode_does_not_use_are_refused() {
    let original = onnx::load(&fixture("bert.ts.onnx")).unwrap();
    let int4 = || QuantizeRequest::new(QuantizeMode::Int4Weight, Target::Ort);
    let int8 = || QuantizeRequest::new(QuantizeMode::Int8Dynamic, Target::Ort);
    let refused = [
        (QuantizeRequest { smoothquant: Some(0.5), ..int4() }, "--smoothquant"),
        (QuantizeRequest { block_size: Some(64), ..int8() }, "--block-size"),
        (QuantizeRequest { zero_point: true, ..int8() }, "--zero-point"),
        (QuantizeRequest { max_error: Some(0.01), ..QuantizeRequest::new(QuantizeMode::Fp16, Target::Ort) }, "--max-error"),
        (QuantizeRequest { max_error_batches: Some(2), ..int8() }, "--max-error-batches"),
        (QuantizeRequest { weight_type: Some(onnxopt::passes::quantize_static::WeightType::Int8), ..int8() }, "--weight-type"),
        (QuantizeRequest { activations: Some(onnxopt::passes::quantize_dynamic::ActivationScale::PerToken), ..int4() }, "--activations"),
        (QuantizeRequest { accuracy_level: Some(4), ..int8() }, "--accuracy-level is for --mode int4-weight"),
    ];
    for (request, option) in refused {
        match commands::quantize(&original, &request, &Silent) {
            Err(CommandError::Request(why)) => assert!(why.contains(option), "{option}: {why}"),
            other => panic!("{option}: not refused: {:?}", other.map(|o| o.report.mode)),
        }
    }
    let structured = || PruneRequest::new(Pruning::Structured);
    for (request, option) in [
        (PruneRequest { min_cosine: Some(0.9), ..structured() }, "--min-cosine"),
        (PruneRequest { sparsity: Some(vec!["0.3".into()]), ..structured() }, "--sparsity"),
        (PruneRequest { keep_flops: Some(0.5), ..PruneRequest::new(Pruning::Unstructured) }, "--keep-flops"),
        (PruneRequest { drop_layers: Some(1), ..structured() }, "--drop-layers"),
        (PruneRequest { n_of_m: Some("2:4".into()), ..PruneRequest::new(Pruning::Unstructured) }, "--nm"),
    ] {
        match commands::prune(&original, &request, &Silent) {
            Err(CommandError::Request(why)) => assert!(why.contains(option), "{option}: {why}"),
            other => panic!("{option}: not refused: {}", other.is_ok()),
        }
    }
}

/// The examples of flags that used to be ignored, through the CLI:
/// exit 2, the flag named, nothing written.
#[test]
fn cli_refuses_flags_the_mode_ignores() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let bert = fixture("bert.ts.onnx");
    for (command, args, says) in [
        ("quantize", &["--mode", "int4-weight", "--smoothquant", "0.5"][..], "--smoothquant"),
        ("quantize", &["--mode", "int8-static", "--percentile", "99.9", "--calibration-method", "minmax"][..], "--percentile"),
        ("prune", &["--method", "structured", "--min-cosine", "0.9"][..], "--min-cosine"),
    ] {
        let o = run_command(command, &bert, &out, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
        assert!(files_in(dir.path()).is_empty());
    }
}
