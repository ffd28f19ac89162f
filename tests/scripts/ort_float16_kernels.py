"""Which ops ONNX Runtime's CPU provider runs in float16 itself, and which it
wraps in Casts to float32 and back (its InsertCastTransformer does so at
session creation for every node without a float16 kernel, so a float16 model
never fails with "Could not find an implementation": it silently computes in
float32 with extra conversions).

usage: python3 ort_float16_kernels.py

Builds a one-node float16 model per op, lets ORT save the model it optimized,
and prints `native` or `between Casts` per op. The evidence behind
src/passes/quantize_fp16.rs's choice of float32 compute for `--target ort`.
Measured with ORT 1.32 on x86-64 (AVX2, F16C, no AVX512-FP16): native for data
movement, Max, Min, Clip and the layer norms only; MatMul, Gemm, Add, Mul, Erf,
Softmax, com.microsoft Attention and BiasGelu between Casts.
"""
import os
import tempfile

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

F16, I64, BOOL = TensorProto.FLOAT16, TensorProto.INT64, TensorProto.BOOL
MS = "com.microsoft"

# (op, input types, attributes, domain)
CASES = [
    ("MatMul", [F16, F16], {}, ""),
    ("Gemm", [F16, F16], {}, ""),
    ("Add", [F16, F16], {}, ""),
    ("Mul", [F16, F16], {}, ""),
    ("Div", [F16, F16], {}, ""),
    ("Erf", [F16], {}, ""),
    ("Where", [BOOL, F16, F16], {}, ""),
    ("Softmax", [F16], {}, ""),
    ("LayerNormalization", [F16, F16, F16], {}, ""),
    ("Pow", [F16, F16], {}, ""),
    ("ReduceMean", [F16], {}, ""),
    ("Sqrt", [F16], {}, ""),
    ("Max", [F16, F16], {}, ""),
    ("Clip", [F16], {}, ""),
    ("Transpose", [F16], {}, ""),
    ("Reshape", [F16, I64], {}, ""),
    ("Gather", [F16, I64], {}, ""),
    ("Concat", [F16, F16], {"axis": 0}, ""),
    ("Attention", [F16, F16, F16], {"num_heads": 2}, MS),
    ("BiasGelu", [F16, F16], {}, MS),
    ("SkipLayerNormalization", [F16, F16, F16], {}, MS),
]


def optimized_ops(op, types, attrs, domain, folder):
    inputs = [helper.make_tensor_value_info(f"i{k}", t, None) for k, t in enumerate(types)]
    node = helper.make_node(op, [i.name for i in inputs], ["y"], domain=domain, **attrs)
    graph = helper.make_graph([node], op, inputs, [helper.make_tensor_value_info("y", F16, None)])
    imports = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=imports, ir_version=9)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = os.path.join(folder, op + ".onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def main():
    print("onnxruntime", ort.__version__)
    with tempfile.TemporaryDirectory() as folder:
        for op, types, attrs, domain in CASES:
            ops = optimized_ops(op, types, attrs, domain, folder)
            verdict = "between Casts" if "Cast" in ops else "native"
            print(f"{(domain + '.' if domain else '') + op:40} {verdict:14} {' '.join(ops)}")


if __name__ == "__main__":
    main()
