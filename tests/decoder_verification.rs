//! Verification of decoders with a KV cache (Optimum's text-generation-with-past
//! exports of a tiny Llama and GPT-2): a prefill with an empty past, then decode
//! steps fed the reference's presents, with inputs consistent with the cache.

mod common;

use common::*;
use onnxopt::onnx;
use onnxopt::verify::{self, decoder::CacheLayout, Engine, VerifyOptions};

const DECODERS: [&str; 2] = ["llama-kv.optimum.onnx", "gpt2-kv.optimum.onnx"];

fn values(step: &verify::Step, name: &str) -> (Vec<usize>, Vec<i64>) {
    let input = step.inputs.iter().find(|i| i.name == name).unwrap_or_else(|| panic!("no input {name}"));
    let cast = input.value.cast_to::<i64>().unwrap();
    (input.value.shape().to_vec(), cast.to_plain_array_view::<i64>().unwrap().iter().copied().collect())
}

fn shape(step: &verify::Step, name: &str) -> Vec<usize> {
    step.inputs.iter().find(|i| i.name == name).unwrap().value.shape().to_vec()
}

/// Prefill of 16 with an empty past, then two steps of one token: the past
/// grows 0 -> 16 -> 17, the mask covers past + new, positions continue the
/// mask's count, and each past is the previous step's present.
#[test]
fn steps_are_consistent_with_the_cache() {
    let model = onnx::load(&fixture("llama-kv.optimum.onnx")).unwrap();
    assert!(CacheLayout::detect(&model).is_some());
    let reference = verify::Reference::run(&model, Engine::Tract, &VerifyOptions::default()).unwrap();
    let steps = &reference.steps;
    assert_eq!(steps.len(), 3);
    let pasts: Vec<usize> = steps.iter().map(|s| shape(s, "past_key_values.0.key")[2]).collect();
    assert_eq!(pasts, vec![0, 16, 17]);
    let news: Vec<usize> = steps.iter().map(|s| shape(s, "input_ids")[1]).collect();
    assert_eq!(news, vec![16, 1, 1]);
    for (step, total) in steps.iter().zip([16, 17, 18]) {
        let (mask_shape, mask) = values(step, "attention_mask");
        assert_eq!(mask_shape, vec![2, total]);
        // row 0 unpadded, row 1 left-padded by the same amount at every step
        assert!(mask[..total].iter().all(|&m| m == 1));
        let padding = mask[total..].iter().take_while(|&&m| m == 0).count();
        assert!((1..=8).contains(&padding), "{mask:?}");
        assert!(mask[total + padding..].iter().all(|&m| m == 1));
        let (_, positions) = values(step, "position_ids");
        let new = positions.len() / 2;
        assert_eq!(positions[new - 1], total as i64 - 1, "row 0 counts every token");
        assert_eq!(positions[2 * new - 1], (total - padding) as i64 - 1, "row 1 skips its padding");
    }
    let (_, pad1) = values(&steps[1], "attention_mask");
    let (_, pad2) = values(&steps[2], "attention_mask");
    assert_eq!(pad1[17..].iter().take_while(|&&m| m == 0).count(), pad2[18..].iter().take_while(|&&m| m == 0).count());
    // the decode step's past is the prefill's present
    let present = &steps[0].outputs.iter().find(|(n, _)| n == "present.1.value").unwrap().1;
    let past = &steps[1].inputs.iter().find(|i| i.name == "past_key_values.1.value").unwrap().value;
    assert_eq!(present, past);
}

/// `verify` compares logits and presents at each step, labelled.
#[test]
fn verify_reports_every_step() {
    for file in DECODERS {
        let path = fixture(file);
        let o = run(&["--quiet", "verify", path.to_str().unwrap(), path.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{file}: {}", stderr(&o));
        let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let names: Vec<&str> = json["outputs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
        assert_eq!(names.len(), 3 * 5, "{file}: {names:?}");
        assert!(names.contains(&"logits [prefill, 16 tokens]"), "{names:?}");
        assert!(names.contains(&"logits [decode 2, past 17]"), "{names:?}");
        assert!(names.contains(&"present.1.value [decode 1, past 16]"), "{names:?}");
    }
}

/// `optimize --target ort` on decoders succeeds with verification on (it used
/// to fail: random inputs that ignored the cache made tract index past the
/// rotary table), keeping the model's input and output names.
#[test]
fn optimize_verifies_decoders() {
    for file in DECODERS {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.onnx");
        let report = dir.path().join("report.json");
        let o = run_command("optimize", &fixture(file), &out, &["--target", "ort", "--report", report.to_str().unwrap()]);
        assert!(o.status.success(), "{file}: {}", stderr(&o));
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let outputs = report["verification"]["outputs"].as_array().unwrap();
        assert_eq!(outputs.len(), 15, "{file}");
        assert!(outputs.iter().all(|o| o["within_tolerance"] == true && o["max_abs"].as_f64().unwrap() < 1e-4), "{file}: {outputs:?}");
        let (before, after) = (onnx::load(&fixture(file)).unwrap(), onnx::load(&out).unwrap());
        let names = |m: &onnxopt::ir::Model| {
            (m.graph.inputs.iter().map(|i| i.name.clone()).collect::<Vec<_>>(), m.graph.outputs.iter().map(|o| o.name.clone()).collect::<Vec<_>>())
        };
        assert_eq!(names(&before), names(&after), "{file}");
    }
}

/// A candidate that computes the same prefill but mishandles the past is
/// caught at the decode steps: here every past key is scaled by 2 before use.
#[test]
fn a_wrong_cache_path_is_caught_at_decode() {
    let reference = onnx::load(&fixture("llama-kv.optimum.onnx")).unwrap();
    let mut candidate = reference.clone();
    candidate.graph.replace_uses("past_key_values.0.key", "scaled_past");
    let mut patch = onnxopt::ir::Patch::new("test");
    patch.add_initializer(onnxopt::ir::Tensor::from_f32("two", &ndarray::arr0(2f32).into_dyn()));
    patch.add_node(onnxopt::ir::Node::new("Mul", &["past_key_values.0.key", "two"], &["scaled_past"]));
    candidate.graph.apply(patch, true).unwrap();
    let c = verify::compare(&reference, &candidate, &VerifyOptions { engine: Engine::Tract, ..Default::default() }).unwrap();
    let failed: Vec<&str> = c.outputs.iter().filter(|o| !o.within_tolerance).map(|o| o.name.as_str()).collect();
    assert!(!failed.is_empty());
    assert!(failed.iter().all(|n| n.contains("decode")), "{failed:?}");
}

/// A dynamo-style export gives the mask a symbol of its own (`s2`, not
/// `past + sequence`): it is bound to past + new at each step.
#[test]
fn a_mask_with_a_symbol_of_its_own_covers_the_past() {
    use onnxopt::ir::{DataType, Dim, GraphBuilder};
    let sym = |s: &str| Dim::Symbol(s.into());
    let mut b = GraphBuilder::new("decoder");
    b.input_symbolic("input_ids", DataType::Int64, vec![sym("s0"), sym("s1")]);
    let mask = b.input_symbolic("attention_mask", DataType::Int64, vec![sym("s0"), sym("s2")]);
    let past = b.input_symbolic("past_key_values.0.key", DataType::Float, vec![sym("s0"), Dim::Fixed(2), sym("s3"), Dim::Fixed(4)]);
    let logits = b.node_with("Cast", &[&mask], vec![("to", onnxopt::ir::AttrValue::Int(1))]);
    b.output(&logits, DataType::Float, &[-1, -1]);
    b.add(onnxopt::ir::Node::new("Identity", &[&past], &["present.0.key"]));
    b.output("present.0.key", DataType::Float, &[-1, 2, -1, 4]);
    let model = b.into_model(17);
    let reference =
        verify::Reference::run(&model, Engine::Tract, &VerifyOptions { sizes: verify::DimSizes { batch: 2, sequence: 6 }, ..Default::default() }).unwrap();
    let masks: Vec<usize> = reference.steps.iter().map(|s| shape(s, "attention_mask")[1]).collect();
    assert_eq!(masks, vec![6, 7, 8]);
    assert_eq!(shape(&reference.steps[0], "past_key_values.0.key"), vec![2, 2, 0, 4]);
}
