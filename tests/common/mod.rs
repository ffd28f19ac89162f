//! Shared by the integration tests: small models built in code, the CLI binary,
//! and the optional real models under ../shared.
#![allow(dead_code)]

pub mod fusion;

use onnxopt::ir::{DataType, GraphBuilder, Model};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// y = Relu(x @ w + b) with x: float32[batch, 4].
pub fn small_mlp() -> Model {
    let mut b = GraphBuilder::new("mlp");
    let x = b.input("x", DataType::Float, &[-1, 4]);
    let w: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) / 10.0).collect();
    let w = b.initializer_f32("w", &[4, 8], &w);
    let bias = b.initializer_f32("b", &[8], &[0.1; 8]);
    let h = b.node("MatMul", &[&x, &w]);
    let h = b.node("Add", &[&h, &bias]);
    let y = b.node("Relu", &[&h]);
    b.output(&y, DataType::Float, &[-1, 8]);
    b.into_model(17)
}

pub fn onnxopt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_onnxopt"))
}

/// Runs the CLI and returns its output.
pub fn run(args: &[&str]) -> Output {
    onnxopt().args(args).output().expect("onnxopt runs")
}

/// `onnxopt --quiet COMMAND INPUT -o OUTPUT EXTRA...`.
pub fn run_command(command: &str, input: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--quiet", command, input.to_str().unwrap(), "-o", output.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args)
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `../shared/models/minilm-l6-v2/<file>` when present; otherwise prints why the
/// caller skips and returns `None`.
pub fn shared_model(file: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/minilm-l6-v2").join(file);
    if path.exists() {
        Some(path)
    } else {
        eprintln!("skipping: {} not present (../shared is only on development machines)", path.display());
        None
    }
}

pub fn fixture(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(file)
}

/// Files in a folder (to check that a failed command left nothing behind).
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Checks in ONNX Runtime that each lowered model computes what its original
/// does (`tests/scripts/check_lowerings.py`, max abs per case printed). Skips
/// with a message where python3 cannot import onnxruntime (.ci/run installs it).
pub fn onnxruntime_agrees(cases: impl IntoIterator<Item = (&'static str, Model, Model)>) {
    let probe = Command::new("python3").args(["-c", "import onnxruntime"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipping: python3 cannot import onnxruntime (pip install onnxruntime; .ci/run does)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/check_lowerings.py")];
    for (name, original, lowered) in cases {
        let case_dir = dir.path().join(name);
        std::fs::create_dir(&case_dir).unwrap();
        for (file, m) in [("fused.onnx", &original), ("lowered.onnx", &lowered)] {
            onnxopt::onnx::save(m, &case_dir.join(file), &Default::default()).unwrap();
            args.push(case_dir.join(file));
        }
    }
    let run = Command::new("python3").args(&args).output().unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "ONNX Runtime disagrees with a lowering:\n{report}");
}

/// The cosine ONNX Runtime (CPU) gives between the outputs of `reference` and
/// `candidate` on the same inputs (`tests/scripts/compare_in_ort.py`); `None`,
/// with a message, where python3 cannot import onnxruntime. Fails the test if
/// ONNX Runtime cannot run either model.
pub fn onnxruntime_cosine(reference: &Path, candidate: &Path) -> Option<f64> {
    let probe = Command::new("python3").args(["-c", "import onnxruntime"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipping the ONNX Runtime run: python3 cannot import onnxruntime");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/compare_in_ort.py");
    let run = Command::new("python3").arg(script).arg(reference).arg(candidate).output().unwrap();
    let text = String::from_utf8_lossy(&run.stdout).into_owned();
    eprintln!("{}: {text}{}", candidate.display(), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "ONNX Runtime could not run {}", candidate.display());
    Some(text.split_whitespace().last().unwrap().parse().unwrap())
}
