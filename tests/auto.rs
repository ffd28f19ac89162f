//! `auto`: the presets, and the search that keeps the fastest trial within the
//! budget, measured on held-back calibration batches.

mod common;

use common::*;
use onnxopt::calibrate::CalibrationSource;
use onnxopt::commands::{self, AutoRequest, Budget, Preset, Silent};
use onnxopt::ir::{Dim, Model};
use onnxopt::onnx;
use onnxopt::target::Target;
use onnxopt::verify::{random_inputs, DimSizes, NamedInput};
use std::sync::Arc;
use tract_onnx::prelude::{IntoTensor, Tensor};
use tract_onnx::tract_core::ndarray::{Array2, ArrayD, IxDyn};

fn count(model: &Model, op: &str) -> usize {
    model.graph.nodes().filter(|n| n.qualified_op() == op).count()
}

/// `n` batches of seeded random inputs (token ids, a mask of ones).
fn random_batches(model: &Model, n: usize) -> CalibrationSource {
    let batches = (0..n).map(|i| random_inputs(model, 100 + i as u64, DimSizes { batch: 4, sequence: 12 }).unwrap()).collect();
    CalibrationSource::Batches(Arc::new(batches))
}

#[test]
fn presets_are_fixed_recipes() {
    let original = onnx::load(&fixture("bert.ts.onnx")).unwrap();
    let run = |preset| commands::auto(&original, &AutoRequest { preset: Some(preset), ..AutoRequest::new(Target::Ort) }, &Silent).unwrap();
    let o1 = run(Preset::O1);
    assert!(o1.rejected.is_none());
    assert_eq!(count(&o1.model, "com.microsoft.Attention"), 0, "-O1 cleans up only");
    assert!(o1.model.graph.node_count() < original.graph.node_count());
    let o2 = run(Preset::O2);
    assert_eq!(count(&o2.model, "com.microsoft.Attention") + count(&o2.model, "com.microsoft.MultiHeadAttention"), 2);
    assert!(o2.report.optimize.as_ref().unwrap().verification.as_ref().unwrap().passed());
    let o3 = run(Preset::O3);
    assert!(o3.rejected.is_none(), "{:?}", o3.rejected);
    assert_eq!(count(&o3.model, "com.microsoft.FastGelu"), 2, "GELU in its tanh form");
    let o4 = run(Preset::O4);
    assert!(o4.rejected.is_none(), "{:?}", o4.rejected);
    let half = o4.model.graph.initializers.iter().filter(|t| t.dtype == onnxopt::ir::DataType::Float16).count();
    assert!(half > 0, "float16 weights");

    let with_budget = AutoRequest { preset: Some(Preset::O2), budget: Some(Budget::MinCosine(0.99)), ..AutoRequest::new(Target::Ort) };
    let e = commands::auto(&original, &with_budget, &Silent).unwrap_err();
    assert!(e.to_string().contains("fixed recipe"), "{e}");
}

/// -O3 and -O4 on all-MiniLM-L6-v2: the tanh GELU moves the outputs by about
/// 5e-3 after six layers, within -O3's cosine bound.
#[test]
fn minilm_presets_o3_and_o4() {
    let Some(path) = shared_model("model.ts.onnx") else { return };
    let original = onnx::load(&path).unwrap();
    for preset in [Preset::O3, Preset::O4] {
        let outcome = commands::auto(&original, &AutoRequest { preset: Some(preset), ..AutoRequest::new(Target::Ort) }, &Silent).unwrap();
        assert!(outcome.rejected.is_none(), "{preset:?}: {:?}", outcome.rejected);
        assert_eq!(count(&outcome.model, "com.microsoft.FastGelu"), 6, "{preset:?}");
    }
}

#[test]
fn the_search_keeps_the_fastest_trial_within_the_budget() {
    let original = onnx::load(&fixture("bert.ts.onnx")).unwrap();
    // in the search's own order
    let recipes = ["fuse", "int8-dynamic", "int4-b64", "fp16"].map(String::from).to_vec();
    let request = AutoRequest {
        calibration: Some(random_batches(&original, 5)),
        budget: Some(Budget::MinCosine(0.999)),
        recipes: Some(recipes.clone()),
        ..AutoRequest::new(Target::Ort)
    };
    let outcome = commands::auto(&original, &request, &Silent).unwrap();
    let report = &outcome.report;
    for t in &report.trials {
        eprintln!("{}", t.line());
    }
    assert_eq!(report.held_back_batches, 1);
    assert_eq!(report.trials.iter().map(|t| t.recipe.clone()).collect::<Vec<_>>(), recipes);
    for t in &report.trials {
        assert!(t.error.is_none(), "{}", t.line());
        let fidelity = t.fidelity.unwrap();
        assert_eq!(t.within_budget, fidelity >= 0.999, "{}", t.line());
        assert!(t.latency_ratio.unwrap() > 0.0);
    }
    let fuse = &report.trials[0];
    assert!(fuse.fidelity.unwrap() > 0.99999, "fusion is exact: {}", fuse.line());
    let int4 = &report.trials[2];
    assert!(int4.fidelity.unwrap() < fuse.fidelity.unwrap(), "int4 loses more than fusion: {}", int4.line());
    let best =
        report.trials.iter().filter(|t| t.within_budget).min_by(|a, b| a.latency_ratio.unwrap().total_cmp(&b.latency_ratio.unwrap())).map(|t| t.recipe.clone());
    assert_eq!(report.chosen, best);
    assert!(outcome.rejected.is_none());

    // the page plots every measured trial and marks the front and the choice
    let html = report.html();
    assert_eq!(html.matches(r#"<circle class="trial""#).count(), 4);
    assert_eq!(html.matches(r#"class="chosen""#).count(), 1);
    assert!(html.contains(r#"class="pareto""#) && html.contains(r#"class="budget""#));
    if let Some((dom, screenshot_bytes)) = rendered_in_chromium(&html) {
        assert_eq!(dom.matches(r#"class="trial""#).count(), 4, "the browser's DOM holds every trial");
        assert!(dom.contains("</svg>") && dom.contains(r#"id="trials""#));
        assert!(screenshot_bytes > 10_000, "a screenshot of the page: {screenshot_bytes} bytes");
    }

    // a budget no trial meets: nothing to write, and the reason
    let strict = AutoRequest { budget: Some(Budget::MinCosine(1.5)), recipes: Some(vec!["fuse".into()]), ..request.clone() };
    let outcome = commands::auto(&original, &strict, &Silent).unwrap();
    assert!(outcome.report.chosen.is_none());
    assert!(outcome.rejected.unwrap().contains("no trial stayed within the budget"));
}

/// The page as headless Chromium parses it (its DOM) and the size of its
/// screenshot; `None`, with a message, where no Chromium is installed.
fn rendered_in_chromium(html: &str) -> Option<(String, u64)> {
    let Some(browser) = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| std::process::Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
    else {
        eprintln!("skipping the headless-Chromium check of the page: no chromium here (.ci/run installs it where apt-get can)");
        return None;
    };
    let dir = std::env::temp_dir().join(format!("onnxopt-auto-page-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("auto.html");
    std::fs::write(&page, html).unwrap();
    let url = format!("file://{}", page.display());
    let headless = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"];
    let dom = std::process::Command::new(browser).args(headless).arg("--dump-dom").arg(&url).output().unwrap();
    assert!(dom.status.success(), "{browser} --dump-dom: {}", String::from_utf8_lossy(&dom.stderr));
    let png = dir.join("auto.png");
    let shot = std::process::Command::new(browser)
        .args(headless)
        .arg(format!("--screenshot={}", png.display()))
        .arg("--window-size=900,800")
        .arg(&url)
        .output()
        .unwrap();
    assert!(shot.status.success(), "{browser} --screenshot: {}", String::from_utf8_lossy(&shot.stderr));
    let bytes = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    std::fs::remove_dir_all(&dir).unwrap();
    Some((String::from_utf8_lossy(&dom.stdout).into_owned(), bytes))
}

#[test]
fn the_search_refuses_what_it_cannot_measure() {
    let original = onnx::load(&fixture("bert.ts.onnx")).unwrap();
    let refused = [
        (AutoRequest::new(Target::Ort), "held-back calibration data"),
        (AutoRequest { calibration: Some(random_batches(&original, 1)), ..AutoRequest::new(Target::Ort) }, "at least 2"),
        (
            AutoRequest { calibration: Some(random_batches(&original, 3)), budget: Some(Budget::MaxPerplexityRatio(1.1)), ..AutoRequest::new(Target::Ort) },
            "needs a decoder",
        ),
        (
            AutoRequest { calibration: Some(random_batches(&original, 3)), recipes: Some(vec!["int3".into()]), ..AutoRequest::new(Target::Ort) },
            "unknown recipe 'int3'",
        ),
    ];
    for (request, expected) in refused {
        let e = commands::auto(&original, &request, &Silent).unwrap_err();
        assert!(e.to_string().contains(expected), "{e}");
    }
}

/// A prompt batch for a KV-cache decoder: token ids, a mask of ones,
/// positions, and every past empty (length 0).
fn prompt_batch(model: &Model, seed: u64) -> Vec<NamedInput> {
    let (batch, seq) = (2usize, 10usize);
    model
        .graph
        .inputs
        .iter()
        .map(|input| {
            let ty = input.tensor_type().unwrap();
            let dims = ty.shape.as_ref().unwrap();
            let value: Tensor = match input.name.as_str() {
                "input_ids" => Array2::from_shape_fn((batch, seq), |(b, t)| ((b * 31 + t * 17 + seed as usize * 7) % 90 + 3) as i64).into_tensor(),
                "attention_mask" => Array2::<i64>::ones((batch, seq)).into_tensor(),
                "position_ids" => Array2::from_shape_fn((batch, seq), |(_, t)| t as i64).into_tensor(),
                _ => {
                    let shape: Vec<usize> = dims
                        .iter()
                        .enumerate()
                        .map(|(axis, d)| match d {
                            Dim::Fixed(v) => *v as usize,
                            _ if axis == 0 => batch,
                            _ => 0,
                        })
                        .collect();
                    ArrayD::<f32>::zeros(IxDyn(&shape)).into_tensor()
                }
            };
            NamedInput { name: input.name.clone(), value }
        })
        .collect()
}

#[test]
fn the_search_bounds_a_decoders_perplexity() {
    let original = onnx::load(&fixture("llama-kv.optimum.onnx")).unwrap();
    let batches = (0..5).map(|i| prompt_batch(&original, i)).collect();
    let request = AutoRequest {
        calibration: Some(CalibrationSource::Batches(Arc::new(batches))),
        recipes: Some(["fuse", "int4-b32"].map(String::from).to_vec()),
        ..AutoRequest::new(Target::Ort)
    };
    let outcome = commands::auto(&original, &request, &Silent).unwrap();
    let report = &outcome.report;
    assert_eq!(report.budget, Some(Budget::MaxPerplexityRatio(commands::auto::DEFAULT_MAX_PERPLEXITY_RATIO)));
    for t in &report.trials {
        eprintln!("{}", t.line());
    }
    assert!(report.reference_perplexity.unwrap() > 1.0);
    let fuse = &report.trials[0];
    assert!(fuse.error.is_none(), "{}", fuse.line());
    assert!((fuse.fidelity.unwrap() - 1.0).abs() < 1e-3, "fusion keeps the perplexity: {}", fuse.line());
    assert!(fuse.prefill_ratio.is_some(), "a decoder's prefill is timed beside its decode step");
    assert!(report.trials[1].error.is_none(), "{}", report.trials[1].line());
    assert!(report.chosen.is_some());
}

#[test]
fn cli_auto_writes_a_preset_and_refuses_a_search_without_data() {
    let dir = std::env::temp_dir().join(format!("onnxopt-auto-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("bert.o2.onnx");
    let o = run_command("auto", &fixture("bert.ts.onnx"), &out, &["-O2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let model = onnx::load(&out).unwrap();
    assert_eq!(count(&model, "com.microsoft.Attention") + count(&model, "com.microsoft.MultiHeadAttention"), 2);
    // the search without calibration data: a usage error naming the input, nothing written
    let searched = dir.join("bert.auto.onnx");
    let o = run_command("auto", &fixture("bert.ts.onnx"), &searched, &["--min-cosine", "0.99"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("bert.ts.onnx") && stderr(&o).contains("held-back calibration data"), "{}", stderr(&o));
    assert!(!searched.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
