//! lower-standard-ops: the opset-23 ops tract runs unfaithfully (Attention,
//! RMSNormalization), lowered to ops it runs. Per case: neither op remains, the
//! graph validates, tract runs it, and the lowered graph matches its snapshot.
//! `tract_agrees_where_it_is_faithful` compares with tract's own kernels in the
//! forms tract gets right; `ort_conformance` compares every case with ONNX
//! Runtime's kernels (when onnxruntime is importable). Refusals at the end.

mod common;

use onnxopt::ir::{AttrValue, DataType, GraphBuilder, Model, Node, Tensor};
use onnxopt::passes::lower_standard::{lower_standard_ops, LowerStandardOps};
use onnxopt::passes::{DriverOptions, Pass, PassError};
use onnxopt::verify::{self, DimSizes, VerifyOptions};
use std::collections::HashSet;

const B: i64 = 2;

fn values(count: usize, seed: u64) -> Vec<f32> {
    let mut rng = verify::SeededRng::new(seed);
    (0..count).map(|_| rng.uniform() as f32 * 2.0 - 1.0).collect()
}

fn int(v: i64) -> AttrValue {
    AttrValue::Int(v)
}

fn float(v: f32) -> AttrValue {
    AttrValue::Float(v)
}

/// One Attention-23 node; `inputs` are (name, shape) graph inputs in order
/// (an empty name leaves the optional input out), `extra` initializers given
/// by name in `inputs` stay initializers.
fn attention(name: &str, inputs: &[(&str, &[i64])], outputs: &[(&str, &[i64])], attrs: Vec<(&str, AttrValue)>, extra: Vec<Tensor>) -> Model {
    let mut b = GraphBuilder::new(name);
    let constants: HashSet<String> = extra.iter().map(|t| t.name.clone()).collect();
    for t in extra {
        b.initializer(t);
    }
    let mut names = Vec::new();
    for (input, shape) in inputs {
        if !input.is_empty() && !constants.contains(*input) {
            let dtype = if input.ends_with("bool_mask") { DataType::Bool } else { DataType::Float };
            b.input(input, dtype, shape);
        }
        names.push(*input);
    }
    let output_names: Vec<&str> = outputs.iter().map(|(n, _)| *n).collect();
    let mut node = Node::new("Attention", &names, &output_names).with_name("attention");
    for (k, v) in attrs {
        node = node.with_attr(k, v);
    }
    b.add(node);
    for (output, shape) in outputs {
        b.output(output, DataType::Float, shape);
    }
    b.into_model(23)
}

/// A float32 [3, 5] mask whose row 1 is lowest() throughout (every key hidden,
/// as torch writes masks) and row 2 hides two keys with -inf.
fn float_mask_with_empty_row() -> Tensor {
    let mut v = [0f32; 15];
    v[5..10].fill(f32::MIN);
    v[11] = f32::NEG_INFINITY;
    v[12] = f32::NEG_INFINITY;
    Tensor::from_raw("float_mask", DataType::Float, vec![3, 5], v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into())
}

/// A bool [3, 5] mask whose row 1 is false throughout.
fn bool_mask_with_empty_row() -> Tensor {
    let v: Vec<u8> = (0..15).map(|i| u8::from(!(5..10).contains(&i) && i != 13)).collect();
    Tensor::from_raw("const_bool_mask", DataType::Bool, vec![3, 5], v.into())
}

fn rms_norm(name: &str, dtype: DataType, axis: i64, stash: Option<DataType>) -> Model {
    let mut b = GraphBuilder::new(name);
    let x = b.input("x", dtype, &[B, 3, 8]);
    let scale_dims: Vec<i64> = if axis == 1 { vec![3, 8] } else { vec![8] };
    let scale = values(scale_dims.iter().product::<i64>() as usize, 3);
    let raw: Vec<u8> = match dtype {
        DataType::Double => scale.iter().flat_map(|&v| f64::from(v).to_le_bytes()).collect(),
        _ => scale.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let scale = b.initializer(Tensor::from_raw("scale", dtype, scale_dims, raw.into()));
    let mut node = Node::new("RMSNormalization", &[&x, &scale], &["y"]).with_name("rms").with_attr("axis", int(axis)).with_attr("epsilon", float(1e-6));
    if let Some(stash) = stash {
        node = node.with_attr("stash_type", int(stash.code() as i64));
    }
    b.add(node);
    b.output("y", dtype, &[B, 3, 8]);
    b.into_model(23)
}

struct Case {
    name: &'static str,
    model: Model,
}

fn cases() -> Vec<Case> {
    let qkv4: &[(&str, &[i64])] = &[("query", &[B, 2, 3, 4]), ("key", &[B, 2, 5, 4]), ("value", &[B, 2, 5, 6])];
    let y4: &[(&str, &[i64])] = &[("y", &[B, 2, 3, 6])];
    vec![
        Case { name: "attention_4d", model: attention("attention_4d", qkv4, y4, vec![], vec![]) },
        Case {
            name: "attention_3d_gqa",
            model: attention(
                "attention_3d_gqa",
                &[("query", &[B, 3, 16]), ("key", &[B, 5, 8]), ("value", &[B, 5, 8])],
                &[("y", &[B, 3, 16])],
                vec![("q_num_heads", int(4)), ("kv_num_heads", int(2))],
                vec![],
            ),
        },
        Case {
            // tract aligns this causal mask top-left; ONNX and ORT bottom-right
            name: "attention_causal_past",
            model: attention(
                "attention_causal_past",
                &[
                    ("query", &[B, 2, 3, 4]),
                    ("key", &[B, 2, 3, 4]),
                    ("value", &[B, 2, 3, 4]),
                    ("", &[]),
                    ("past_key", &[B, 2, 2, 4]),
                    ("past_value", &[B, 2, 2, 4]),
                ],
                &[("y", &[B, 2, 3, 4]), ("present_key", &[B, 2, 5, 4]), ("present_value", &[B, 2, 5, 4])],
                vec![("is_causal", int(1))],
                vec![],
            ),
        },
        Case {
            name: "attention_bool_mask_causal",
            model: attention(
                "attention_bool_mask_causal",
                &[("query", &[B, 2, 4, 4]), ("key", &[B, 2, 4, 4]), ("value", &[B, 2, 4, 4]), ("attn_bool_mask", &[B, 1, 4, 4])],
                &[("y", &[B, 2, 4, 4])],
                vec![("is_causal", int(1))],
                vec![],
            ),
        },
        Case {
            name: "attention_3d_float_mask_softcap_scale",
            model: attention(
                "attention_3d_float_mask_softcap_scale",
                &[("query", &[B, 3, 8]), ("key", &[B, 5, 8]), ("value", &[B, 5, 8]), ("attn_mask", &[B, 1, 3, 5])],
                &[("y", &[B, 3, 8])],
                vec![("q_num_heads", int(2)), ("kv_num_heads", int(2)), ("softcap", float(2.0)), ("scale", float(0.3))],
                vec![],
            ),
        },
        Case {
            name: "attention_float_mask_empty_row",
            model: attention(
                "attention_float_mask_empty_row",
                &[qkv4[0], qkv4[1], qkv4[2], ("float_mask", &[])],
                y4,
                vec![],
                vec![float_mask_with_empty_row()],
            ),
        },
        Case {
            name: "attention_bool_mask_empty_row",
            model: attention(
                "attention_bool_mask_empty_row",
                &[qkv4[0], qkv4[1], qkv4[2], ("const_bool_mask", &[])],
                y4,
                vec![],
                vec![bool_mask_with_empty_row()],
            ),
        },
        Case { name: "rms_norm_axis1", model: rms_norm("rms_norm_axis1", DataType::Float, 1, None) },
        // tract computes these in float32 whatever stash_type says
        Case { name: "rms_norm_double_stash_double", model: rms_norm("rms_norm_double_stash_double", DataType::Double, -1, Some(DataType::Double)) },
        Case { name: "rms_norm_double_stash_float", model: rms_norm("rms_norm_double_stash_float", DataType::Double, -1, None) },
    ]
}

fn lower(model: &Model) -> Result<Model, String> {
    let mut lowered = model.clone();
    let options = DriverOptions { validate: true, ..DriverOptions::default() };
    let record = lower_standard_ops(&mut lowered, &options).map_err(|e| match e {
        PassError::Failed { message, .. } => message,
        other => panic!("not a refusal: {other}"),
    })?;
    assert!(record.patches >= 1, "the pass fired");
    Ok(lowered)
}

#[test]
fn every_case_lowers_to_ops_that_tract_runs() {
    for Case { name, model } in cases() {
        let lowered = lower(&model).unwrap_or_else(|e| panic!("{name}: {e}"));
        let left: Vec<&str> =
            lowered.graph.nodes().filter(|n| matches!(n.op_type.as_str(), "Attention" | "RMSNormalization")).map(|n| n.op_type.as_str()).collect();
        assert!(left.is_empty(), "{name}: left {left:?}");
        lowered.graph.validate(&HashSet::new()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(lowered.graph.inputs, model.graph.inputs, "{name}: the interface changed");
        assert_eq!(lowered.graph.outputs, model.graph.outputs, "{name}: the interface changed");
        let inputs = verify::random_inputs(&lowered, 0, DimSizes::default()).unwrap();
        let outputs = verify::run(&lowered, name, &inputs).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (output, value) in &outputs {
            let as_f64 = value.cast_to::<f64>().unwrap();
            let finite = as_f64.to_plain_array_view::<f64>().unwrap().iter().all(|x| x.is_finite());
            assert!(finite, "{name}: {output} has non-finite values");
        }
        insta::assert_snapshot!(name, format!("before:\n{model}\nafter:\n{lowered}"));
    }
}

/// Where tract's own kernels are right (measured against ORT), the lowering
/// gives what they give: a check that holds without onnxruntime.
#[test]
fn tract_agrees_where_it_is_faithful() {
    let faithful = ["attention_4d", "attention_3d_gqa", "rms_norm_axis1"];
    for Case { name, model } in cases().into_iter().filter(|c| faithful.contains(&c.name)) {
        let lowered = lower(&model).unwrap();
        let options = VerifyOptions { atol: 1e-6, rtol: 1e-5, ..VerifyOptions::default() };
        let comparison = verify::compare(&model, &lowered, &options).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(comparison.passed(), "{name}: {comparison:?}");
    }
}

/// Each lowering against ONNX Runtime's kernels (max abs per case printed).
#[test]
fn ort_conformance() {
    common::onnxruntime_agrees(cases().into_iter().map(|Case { name, model }| {
        let lowered = lower(&model).unwrap_or_else(|e| panic!("{name}: {e}"));
        (name, model, lowered)
    }));
}

#[test]
fn other_standard_ops_and_older_opsets_are_left_alone() {
    let mut b = GraphBuilder::new("gelu");
    let x = b.input("x", DataType::Float, &[2, 4]);
    let y = b.node("Gelu", &[&x]);
    b.output(&y, DataType::Float, &[2, 4]);
    assert!(LowerStandardOps.propose(&b.into_model(23)).unwrap().is_empty());
    // before opset 23 a default-domain Attention is no ONNX op: not ours to read
    let mut model = cases().remove(0).model;
    model.opset_imports[0].version = 22;
    assert!(LowerStandardOps.propose(&model).unwrap().is_empty());
}

fn refusal(model: &Model) -> String {
    match lower(model) {
        Err(message) => message,
        Ok(_) => panic!("expected a refusal"),
    }
}

#[test]
fn refuses_what_it_cannot_lower_exactly() {
    let qkv: &[(&str, &[i64])] = &[("query", &[B, 2, 3, 4]), ("key", &[B, 2, 5, 4]), ("value", &[B, 2, 5, 4])];
    // the scores output
    let outputs: &[(&str, &[i64])] = &[("y", &[B, 2, 3, 4]), ("", &[]), ("", &[]), ("qk", &[B, 2, 3, 5])];
    let message = refusal(&attention("qk_output", qkv, outputs, vec![], vec![]));
    assert!(message.contains("'attention'") && message.contains("qk_matmul_output"), "{message}");
    // float16: ORT computes parts of it in float32
    let mut model = attention("half", qkv, &[("y", &[B, 2, 3, 4])], vec![], vec![]);
    for input in &mut model.graph.inputs {
        *input = onnxopt::ir::ValueInfo::tensor(input.name.clone(), DataType::Float16, input.tensor_type().unwrap().shape.clone().unwrap());
    }
    assert!(refusal(&model).contains("float16 attention is not lowered"));
    // an integer mask: neither ONNX's boolean nor its additive form
    let mask = Tensor::from_i64("int_mask", vec![3, 5], &[1; 15]);
    let model = attention("int_mask", &[qkv[0], qkv[1], qkv[2], ("int_mask", &[])], &[("y", &[B, 2, 3, 4])], vec![], vec![mask]);
    assert!(refusal(&model).contains("int64 mask is not supported"), "{}", refusal(&model));
    // RMSNormalization's scale of another type than x
    let mut model = rms_norm("mixed", DataType::Double, -1, None);
    model.graph.inputs[0] = onnxopt::ir::ValueInfo::tensor("x", DataType::Float, model.graph.inputs[0].tensor_type().unwrap().shape.clone().unwrap());
    assert!(refusal(&model).contains("scale is float64 and X float32"), "{}", refusal(&model));
}
