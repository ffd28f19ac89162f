//! A run killed while it writes its output leaves nothing behind: outputs are
//! unnamed files (`O_TMPFILE`) until complete. `convert` of a 256 MB model is
//! sent SIGTERM or SIGKILL at several points of its run; afterwards the folder
//! holds the input and, if the run got that far, a complete output, never a
//! partial file.

mod common;

use common::onnxopt;
use onnxopt::ir::{DataType, GraphBuilder};
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

/// y = x + w with w a 64 M-element float initializer (256 MB).
fn large_model(path: &Path) {
    let mut b = GraphBuilder::new("large");
    let x = b.input("x", DataType::Float, &[1 << 26]);
    let values: Vec<f32> = (0..1usize << 26).map(|i| (i % 1000) as f32).collect();
    let w = b.initializer_f32("w", &[1 << 26], &values);
    let y = b.node("Add", &[&x, &w]);
    b.output(&y, DataType::Float, &[1 << 26]);
    onnxopt::onnx::save(&b.into_model(17), path, &Default::default()).unwrap();
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn a_killed_convert_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.onnx");
    let output = dir.path().join("out.onnx");
    large_model(&input);
    let convert = |output: &Path| onnxopt().args(["--quiet", "convert"]).arg(&input).arg("-o").arg(output).stderr(Stdio::null()).spawn().unwrap();
    // how long a whole run takes here (the second of two: the page cache warm)
    let mut whole = std::time::Duration::ZERO;
    for _ in 0..2 {
        let started = Instant::now();
        assert!(convert(&output).wait().unwrap().success());
        whole = started.elapsed();
        std::fs::remove_file(&output).unwrap();
    }
    let mut killed_mid_run = 0;
    for signal in ["TERM", "KILL"] {
        for fraction in [0.1, 0.3, 0.5, 0.7, 0.9] {
            let mut child = convert(&output);
            std::thread::sleep(whole.mul_f64(fraction));
            let sent = std::process::Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().unwrap();
            let status = child.wait().unwrap();
            killed_mid_run += usize::from(sent.success() && !status.success());
            let names = names_in(dir.path());
            assert!(names.iter().all(|n| n == "in.onnx" || n == "out.onnx"), "SIGTERM/KILL {signal} at {fraction}: {names:?}");
            if names.contains(&"out.onnx".to_string()) {
                // only ever the complete file
                onnxopt::onnx::load(&output).unwrap_or_else(|e| panic!("{signal} at {fraction}: the output is not complete: {e}"));
                std::fs::remove_file(&output).unwrap();
            }
        }
    }
    assert!(killed_mid_run > 0, "no run was killed before it finished ({whole:?} a run): the test proved nothing");
}
