//! Criterion benchmarks of the tool itself on committed fixtures (the BERT-base
//! figures in the README come from `benches/io.sh` and `benches/optimize.sh`,
//! which need a 435 MB model the repository does not hold).
//!   cargo bench --bench pipeline

use criterion::{criterion_group, criterion_main, Criterion};
use onnxopt::passes::pipeline::{optimization_passes, PipelineOptions, Target};
use onnxopt::passes::{run_pipeline, DriverOptions};
use std::path::Path;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

fn load_and_encode(c: &mut Criterion) {
    let path = fixture("llama.dynamo.onnx");
    c.bench_function("load llama.dynamo.onnx", |b| b.iter(|| onnxopt::onnx::load(&path).unwrap()));
    let model = onnxopt::onnx::load(&path).unwrap();
    c.bench_function("encode llama.dynamo.onnx", |b| b.iter(|| onnxopt::onnx::to_bytes(&model)));
}

fn optimize(c: &mut Criterion) {
    for name in ["bert.ts.onnx", "bert.dynamo.onnx"] {
        let model = onnxopt::onnx::load(&fixture(name)).unwrap();
        let passes = optimization_passes(Target::Ort, &PipelineOptions::default());
        c.bench_function(&format!("optimize --target ort {name}"), |b| {
            b.iter(|| {
                let mut m = model.clone();
                run_pipeline(&mut m, &passes, &DriverOptions::default()).unwrap()
            })
        });
    }
}

fn shape_inference(c: &mut Criterion) {
    let model = onnxopt::onnx::load(&fixture("bert.ts.onnx")).unwrap();
    c.bench_function("infer_types bert.ts.onnx", |b| b.iter(|| onnxopt::ir::infer_types(&model)));
}

criterion_group!(benches, load_and_encode, optimize, shape_inference);
criterion_main!(benches);
