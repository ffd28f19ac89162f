//! `onnxopt check --target tensorrt`: a clean QDQ model passes (exit 0), each
//! rule fires on a hand-made model that breaks it (exit 1, the node and the
//! rule named), an unreadable file is exit 2.

mod common;

use bytes::Bytes;
use common::*;
use onnxopt::ir::{AttrValue, DataType, GraphBuilder, Model, Node, Tensor};
use onnxopt::lint::tensorrt::check;

fn scalar_f32(name: &str, v: f32) -> Tensor {
    Tensor::from_raw(name, DataType::Float, vec![], Bytes::from(v.to_le_bytes().to_vec()))
}

fn f32s(name: &str, values: &[f32]) -> Tensor {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::from_raw(name, DataType::Float, vec![values.len() as i64], Bytes::from(bytes))
}

fn int8s(name: &str, dims: Vec<i64>, values: &[i8]) -> Tensor {
    Tensor::from_raw(name, DataType::Int8, dims, Bytes::from(values.iter().map(|&v| v as u8).collect::<Vec<u8>>()))
}

/// What a model may get wrong; `Clean` is TensorRT's form:
/// y = MatMul(DQ(Q(x)), DQ(w_q) {axis=1}) with int8, zero points 0.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    Clean,
    Uint8Activation,
    NonZeroZeroPoint,
    PerChannelActivation,
    WrongWeightAxis,
    OldOpset,
    MismatchedScale,
    QReadByRelu,
    FloatWeight,
    QuantizedOutput,
}

fn model(fault: Fault) -> Model {
    let mut b = GraphBuilder::new("qdq");
    b.input("x", DataType::Float, &[-1, 4]);
    b.initializer(scalar_f32("x_scale", 0.02));
    let zero = match fault {
        Fault::Uint8Activation => Tensor::from_raw("x_zero", DataType::Uint8, vec![], Bytes::from(vec![128u8])),
        Fault::NonZeroZeroPoint => int8s("x_zero", vec![], &[3]),
        _ => int8s("x_zero", vec![], &[0]),
    };
    b.initializer(zero);
    if fault == Fault::PerChannelActivation {
        b.initializer(f32s("x_channel_scale", &[0.02; 4]));
        b.initializer(int8s("x_channel_zero", vec![4], &[0; 4]));
        b.add(Node::new("QuantizeLinear", &["x", "x_channel_scale", "x_channel_zero"], &["xq"]).with_name("q_x"));
    } else {
        b.add(Node::new("QuantizeLinear", &["x", "x_scale", "x_zero"], &["xq"]).with_name("q_x"));
    }
    let dq_scale = if fault == Fault::MismatchedScale {
        b.initializer(scalar_f32("other_scale", 0.05));
        "other_scale"
    } else if fault == Fault::PerChannelActivation {
        "x_channel_scale"
    } else {
        "x_scale"
    };
    let dq_zero = if fault == Fault::PerChannelActivation { "x_channel_zero" } else { "x_zero" };
    b.add(Node::new("DequantizeLinear", &["xq", dq_scale, dq_zero], &["xd"]).with_name("dq_x"));
    if fault == Fault::QReadByRelu {
        b.add(Node::new("Relu", &["xq"], &["xr"]).with_name("relu"));
        b.output("xr", DataType::Int8, &[-1, 4]);
    }
    // w: [K=4, N=3], per output column (axis 1)
    b.initializer(int8s("w_q", vec![4, 3], &[1, -2, 3, 4, -5, 6, 7, -8, 9, 10, -11, 12]));
    let axis = if fault == Fault::WrongWeightAxis { 0 } else { 1 };
    let channels = if fault == Fault::WrongWeightAxis { 4 } else { 3 };
    b.initializer(f32s("w_scale", &vec![0.01; channels]));
    b.initializer(int8s("w_zero", vec![channels as i64], &vec![0; channels]));
    b.add(Node::new("DequantizeLinear", &["w_q", "w_scale", "w_zero"], &["wd"]).with_name("dq_w").with_attr("axis", AttrValue::Int(axis)));
    if fault == Fault::FloatWeight {
        b.initializer_f32("w_float", &[4, 3], &[0.5; 12]);
        b.add(Node::new("MatMul", &["xd", "w_float"], &["y"]).with_name("matmul"));
        b.add(Node::new("Relu", &["wd"], &["unused"]).with_name("keep_wd"));
        b.output("unused", DataType::Float, &[4, 3]);
    } else {
        b.add(Node::new("MatMul", &["xd", "wd"], &["y"]).with_name("matmul"));
    }
    if fault == Fault::QuantizedOutput {
        b.add(Node::new("QuantizeLinear", &["y", "x_scale", "x_zero"], &["yq"]).with_name("q_y"));
        b.add(Node::new("DequantizeLinear", &["yq", "x_scale", "x_zero"], &["yd"]).with_name("dq_y"));
        b.output("yd", DataType::Float, &[-1, 3]);
    } else {
        b.output("y", DataType::Float, &[-1, 3]);
    }
    b.into_model(if fault == Fault::OldOpset { 12 } else { 17 })
}

/// (node, rule) of every violation.
fn found(model: &Model) -> Vec<(String, &'static str)> {
    check(model).into_iter().map(|v| (v.node, v.rule)).collect()
}

#[test]
fn each_rule_fires_where_it_is_broken() {
    assert_eq!(found(&model(Fault::Clean)), Vec::<(String, &str)>::new());
    let cases: [(Fault, &str, &str); 9] = [
        (Fault::Uint8Activation, "q_x", "int8-only"),
        (Fault::NonZeroZeroPoint, "dq_x", "zero-point-zero"),
        (Fault::PerChannelActivation, "q_x", "scale-shape"),
        (Fault::WrongWeightAxis, "dq_w", "weight-axis"),
        (Fault::OldOpset, "dq_w", "opset-per-channel"),
        (Fault::MismatchedScale, "q_x", "qdq-pair"),
        (Fault::QReadByRelu, "q_x", "qdq-pair"),
        (Fault::FloatWeight, "matmul", "weighted-op-inputs"),
        (Fault::QuantizedOutput, "dq_y", "no-output-qdq"),
    ];
    for (fault, node, rule) in cases {
        let violations = found(&model(fault));
        assert!(violations.contains(&(node.to_string(), rule)), "{rule} at {node}: {violations:?}");
    }
}

#[test]
fn violations_cite_their_source() {
    for v in check(&model(Fault::WrongWeightAxis)) {
        assert!(v.citation.contains("TensorRT") || v.citation.contains("ONNX"), "{v}");
        assert!(v.to_string().contains(&v.node) && v.to_string().contains(v.rule), "{v}");
    }
}

#[test]
fn cli_exit_codes_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.onnx");
    let bad = dir.path().join("bad.onnx");
    onnxopt::onnx::save(&model(Fault::Clean), &clean, &Default::default()).unwrap();
    onnxopt::onnx::save(&model(Fault::NonZeroZeroPoint), &bad, &Default::default()).unwrap();
    let o = run(&["check", "--target", "tensorrt", clean.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("0 violation"), "{}", stderr(&o));

    let o = run(&["check", "--target", "tensorrt", bad.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rules: Vec<&str> = json.as_array().unwrap().iter().map(|v| v["rule"].as_str().unwrap()).collect();
    assert!(rules.contains(&"zero-point-zero"), "{json}");
    assert!(json[0]["node"].is_string() && json[0]["citation"].is_string(), "{json}");

    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"not a model").unwrap();
    let o = run(&["check", "--target", "tensorrt", garbage.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("garbage.onnx"), "{}", stderr(&o));

    let o = run(&["check", "--target", "ort", clean.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// The tensorrt output of `quantize --mode int8-static` on the tiny BERT
/// fixture is clean; the ort output is not (uint8 activations, zero points).
#[test]
fn quantize_static_output_is_clean_for_tensorrt_only() {
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("calib.npz");
    let ids = ndarray::Array2::from_shape_fn((4, 8), |(r, c)| ((r * 13 + c * 7) % 90 + 1) as i64);
    let mut writer = ndarray_npy::NpzWriter::new(std::fs::File::create(&npz).unwrap());
    writer.add_array("input_ids", &ids).unwrap();
    writer.add_array("attention_mask", &ndarray::Array2::<i64>::ones((4, 8))).unwrap();
    writer.add_array("token_type_ids", &ndarray::Array2::<i64>::zeros((4, 8))).unwrap();
    writer.finish().unwrap();
    let bert = fixture("bert.ts.onnx");
    for (target, clean) in [("tensorrt", true), ("ort", false)] {
        let out = dir.path().join(format!("bert.{target}.onnx"));
        let args = [
            "--quiet",
            "quantize",
            bert.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--mode",
            "int8-static",
            "--target",
            target,
            "--calib",
            npz.to_str().unwrap(),
            "--min-cosine",
            "0.9",
        ];
        let o = run(&args);
        assert!(o.status.success(), "{target}: {}", stderr(&o));
        let model = onnxopt::onnx::load(&out).unwrap();
        let violations = check(&model);
        assert_eq!(violations.is_empty(), clean, "{target}: {:?}", violations.iter().take(3).map(|v| v.to_string()).collect::<Vec<_>>());
    }
}
