//! Numerical verification in tract: equal models pass, a perturbed one fails,
//! tract's failures (even panics) come back as errors.

mod common;

use common::*;
use onnxopt::ir::{DataType, Graph, GraphBuilder, Node, Tensor, TensorData};
use onnxopt::onnx;
use onnxopt::verify::{self, VerifyError, VerifyOptions};

fn perturb_weight(model: &mut onnxopt::ir::Model, name: &str, delta: f32) {
    let g: &mut Graph = &mut model.graph;
    let t = g.initializers.iter_mut().find(|t| t.name == name).unwrap();
    let mut values = t.to_f32().unwrap();
    values[[0, 0]] += delta;
    *t = Tensor::from_f32(name, &values);
}

#[test]
fn a_model_matches_itself() {
    let model = small_mlp();
    let c = verify::compare(&model, &model, &VerifyOptions::default()).unwrap();
    assert!(c.passed());
    assert_eq!(c.outputs.len(), 1);
    assert_eq!(c.outputs[0].max_abs, 0.0);
    assert_eq!(c.outputs[0].shape, vec![2, 8]);
}

#[test]
fn a_perturbed_weight_is_caught() {
    let reference = small_mlp();
    let mut candidate = reference.clone();
    perturb_weight(&mut candidate, "w", 0.5);
    let c = verify::compare(&reference, &candidate, &VerifyOptions::default()).unwrap();
    assert!(!c.passed());
    assert!(c.max_abs() > 1e-3, "{c:?}");
    assert!(c.outputs[0].max_rel > 0.0);

    // within a loose enough tolerance it passes
    let loose = VerifyOptions { atol: 10.0, ..VerifyOptions::default() };
    assert!(verify::compare(&reference, &candidate, &loose).unwrap().passed());
}

#[test]
fn cli_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.onnx");
    let b = dir.path().join("b.onnx");
    let reference = small_mlp();
    let mut candidate = reference.clone();
    perturb_weight(&mut candidate, "w", 0.5);
    std::fs::write(&a, onnx::to_bytes(&reference)).unwrap();
    std::fs::write(&b, onnx::to_bytes(&candidate)).unwrap();
    let same = run(&["--quiet", "verify", a.to_str().unwrap(), a.to_str().unwrap()]);
    assert_eq!(same.status.code(), Some(0), "{}", stderr(&same));
    let differ = run(&["--quiet", "verify", a.to_str().unwrap(), b.to_str().unwrap(), "--json"]);
    assert_eq!(differ.status.code(), Some(1), "{}", stderr(&differ));
    let report: serde_json::Value = serde_json::from_slice(&differ.stdout).unwrap();
    assert_eq!(report["outputs"][0]["within_tolerance"], false);
}

#[test]
fn inputs_from_npz() {
    use ndarray_npy::NpzWriter;
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("inputs.npz");
    let mut w = NpzWriter::new(std::fs::File::create(&npz).unwrap());
    let x = ndarray::Array2::<f32>::from_shape_fn((3, 4), |(i, j)| (i * 4 + j) as f32);
    w.add_array("x", &x).unwrap();
    w.finish().unwrap();
    let inputs = verify::read_npz(&npz).unwrap();
    assert_eq!(inputs[0].name, "x");
    let model = small_mlp();
    let c = verify::compare(&model, &model, &VerifyOptions { inputs: Some(inputs), ..Default::default() }).unwrap();
    assert_eq!(c.outputs[0].shape, vec![3, 8]);
    // the tract result is the float32 arithmetic of Relu(x @ w + b)
    let out = verify::run(&model, "m", &verify::read_npz(&npz).unwrap()).unwrap();
    let y = out[0].1.to_plain_array_view::<f32>().unwrap();
    let w = model.graph.initializer("w").unwrap().to_f32().unwrap();
    let expected: f32 = (0..4).map(|k| x[[2, k]] * w[[k, 5]]).sum::<f32>() + 0.1;
    assert!((y[[2, 5]] - expected.max(0.0)).abs() < 1e-5);
}

/// tract-onnx 0.23.9 reads a com.microsoft Attention as ONNX's own Attention and
/// fails (or panics) on it: verification must report an error, not crash.
#[test]
fn tract_failures_are_errors_not_crashes() {
    let mut b = GraphBuilder::new("contrib");
    let x = b.input("x", DataType::Float, &[1, 4, 8]);
    let w = b.initializer_f32("w", &[8, 24], &[0.01; 192]);
    let bias = b.initializer_f32("bias", &[24], &[0.0; 24]);
    b.add(Node::new("Attention", &[&x, &w, &bias], &["y"]).with_domain("com.microsoft").with_attr("num_heads", onnxopt::ir::AttrValue::Int(2)));
    b.output("y", DataType::Float, &[1, 4, 8]);
    let mut model = b.into_model(17);
    model.opset_imports.push(onnxopt::ir::OpsetImport { domain: "com.microsoft".into(), version: 1, extras: Default::default() });
    let err = verify::compare(&model, &model, &VerifyOptions::default()).unwrap_err();
    assert!(matches!(err, VerifyError::Tract { .. } | VerifyError::Panic { .. }), "{err}");
    assert!(err.to_string().contains("reference"), "{err}");
}

#[test]
fn token_ids_stay_below_the_vocabulary() {
    let Some(path) = shared_model("model.ts.onnx") else { return };
    let model = onnx::load(&path).unwrap();
    let inputs = verify::random_inputs(&model, 3, verify::DimSizes { batch: 4, sequence: 32 }).unwrap();
    let ids = inputs.iter().find(|i| i.name == "input_ids").unwrap().value.to_plain_array_view::<i64>().unwrap().to_owned();
    assert!(ids.iter().all(|&t| (0..30522).contains(&t)));
    assert!(ids.iter().any(|&t| t > 1000), "ids spread over the vocabulary");
    let mask = inputs.iter().find(|i| i.name == "attention_mask").unwrap().value.to_plain_array_view::<i64>().unwrap().to_owned();
    assert!(mask.index_axis(ndarray::Axis(0), 0).iter().all(|&m| m == 1));
    assert!(mask.iter().any(|&m| m == 0), "later rows are padded");
}

/// The two shared exports are the same network: tract agrees within 1e-4.
#[test]
fn shared_exports_agree() {
    let (Some(ts), Some(dynamo)) = (shared_model("model.ts.onnx"), shared_model("model.dynamo.onnx")) else { return };
    let a = onnx::load(&ts).unwrap();
    let b = onnx::load(&dynamo).unwrap();
    let c = verify::compare(&a, &b, &VerifyOptions::default()).unwrap();
    assert!(c.passed(), "{c:?}");
    assert_eq!(c.outputs[0].shape, vec![2, 16, 384]);
    // and a change of one embedding row shows up
    let mut changed = a.clone();
    let t = changed.graph.initializers.iter_mut().find(|t| t.dims == vec![30522, 384]).unwrap();
    let TensorData::Raw(_) = &t.data else { panic!("raw weights") };
    let mut values = t.to_f32().unwrap();
    values.index_axis_mut(ndarray::Axis(0), 0).fill(0.0);
    values.index_axis_mut(ndarray::Axis(0), 101).fill(3.0);
    let name = t.name.clone();
    *t = Tensor::from_f32(name, &values);
    let options = VerifyOptions {
        inputs: Some(vec![
            verify::NamedInput { name: "input_ids".into(), value: ndarray::arr2(&[[101i64, 7592, 102]]).into_dyn().into() },
            verify::NamedInput { name: "attention_mask".into(), value: ndarray::arr2(&[[1i64, 1, 1]]).into_dyn().into() },
            verify::NamedInput { name: "token_type_ids".into(), value: ndarray::arr2(&[[0i64, 0, 0]]).into_dyn().into() },
        ]),
        ..Default::default()
    };
    assert!(!verify::compare(&a, &changed, &options).unwrap().passed());
}
