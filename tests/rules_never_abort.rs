//! No rule aborts a run: every rule, for every target, over every committed
//! fixture (both torch exporters, Optimum's KV-cache decoders, and ORT's own
//! int8 models: quantize_dynamic and static QDQ, `fixtures/quantized.py`). A
//! rule that meets what its conditions did not expect does not match; the
//! result still agrees with the input.

mod common;

use common::*;
use onnxopt::passes::pipeline::{optimization_passes, PipelineOptions, Target};
use onnxopt::passes::{run_pipeline, verify_rewrite, DriverOptions};
use onnxopt::verify::VerifyOptions;

#[test]
fn every_rule_over_every_fixture() {
    let mut files: Vec<_> = std::fs::read_dir(fixture("")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "onnx")).collect();
    files.sort();
    assert!(files.len() >= 21, "{files:?}");
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let model = onnxopt::onnx::load(path).unwrap();
        for target in [Target::Ort, Target::Portable, Target::TensorRt] {
            let mut optimized = model.clone();
            let driver = DriverOptions { validate: true, ..DriverOptions::default() };
            run_pipeline(&mut optimized, &optimization_passes(target, &PipelineOptions::default()), &driver)
                .unwrap_or_else(|e| panic!("{name} for {target}: {e}"));
            let comparison = verify_rewrite(&model, &optimized, &VerifyOptions::default()).unwrap_or_else(|e| panic!("{name} for {target}: {e}"));
            assert!(comparison.passed(), "{name} for {target}: {comparison:?}");
        }
    }
}
