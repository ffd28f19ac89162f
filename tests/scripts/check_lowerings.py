"""Conformance of onnxopt's lowerings against ONNX Runtime's own kernels.

usage: python3 check_lowerings.py FUSED.onnx LOWERED.onnx [FUSED.onnx LOWERED.onnx ...]

Each pair is one op ORT runs with its own kernel (FUSED: a com.microsoft op, or
a standard op tract runs unfaithfully) and the standard-ONNX graph onnxopt's
lower-contrib-ops or lower-standard-ops pass made of it (LOWERED); or a model
and the same model raise-opset converted to a newer opset. Both
run in ONNX Runtime's CPU provider on the same seeded random inputs, valid for
what each input means (token ids below the vocabulary, 1/0 masks with padding,
GQA's seqlens_k with a padded batch entry); every output must agree within
ATOL + RTOL * |expected|. LOWERED must also pass onnx.checker with full shape
inference. Prints one line per pair (the case is the pair's folder name) and a
closing count; exits 1 if any pair fails.

Written by tests/lower_contrib.rs and tests/lower_standard.rs (`ort_conformance`)
and tests/portable.rs, which run it when onnxruntime is importable.
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ATOL = 1e-5
RTOL = 1e-5
BATCH, SEQUENCE = 2, 7
SEED = 0

NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.BOOL: np.bool_,
}


def shape_of(value_info):
    dims = []
    for axis, d in enumerate(value_info.type.tensor_type.shape.dim):
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        else:
            dims.append(BATCH if axis == 0 else SEQUENCE)
    return dims


def table_rows(model, input_name):
    """Rows of the table an integer input indexes (vocabulary, segments, positions)."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        tables = []
        if node.op_type == "Gather" and node.input[1:2] == [input_name]:
            tables = [node.input[0]]
        elif node.op_type == "EmbedLayerNormalization":
            slots = {0: 2, 1: 4, 8: 3}  # ids -> table
            tables = [node.input[t] for i, t in slots.items() if i < len(node.input) and node.input[i] == input_name]
        elif node.op_type == "RotaryEmbedding" and node.domain == "com.microsoft" and node.input[1] == input_name:
            tables = [node.input[2]]
        for t in tables:
            if t in inits:
                return inits[t].dims[0]
    return None


def sequence_of_consumer(model, input_name, shapes):
    """The sequence length (dim 1 of input 0) of the node reading `input_name`."""
    for node in model.graph.node:
        if input_name in node.input and node.input[0] in shapes:
            return shapes[node.input[0]][1]
    return SEQUENCE


def cache_length(model, shapes):
    """P + S of a GroupQueryAttention reading a past_key (P: its dim 2), else None."""
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and len(node.input) > 3 and node.input[3] in shapes:
            return shapes[node.input[3]][2] + shapes[node.input[0]][1]
    return None


def make_inputs(model, rng):
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    shapes = {i.name: shape_of(i) for i in graph_inputs}
    feeds = {}
    for info in graph_inputs:
        name, lower = info.name, info.name.lower()
        shape = shapes[name]
        dtype = NP_TYPES[info.type.tensor_type.elem_type]
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
            continue
        if lower == "seqlens_k" and cache_length(model, shapes):
            # a decode step: one row with the whole cache, one with a shorter one
            # (its new token written inside the past, ORT's layout)
            length = cache_length(model, shapes)
            values = rng.integers(1, length - 1, shape)
            values[0] = length - 1
            feeds[name] = values.astype(dtype)
        elif lower == "seqlens_k":
            length = sequence_of_consumer(model, name, shapes)
            # one unpadded entry; the others padded to under half, so that with a
            # local window some padded query rows see no key at all
            values = rng.integers(0, max(length // 2, 1), shape)
            values[0] = length - 1
            feeds[name] = values.astype(dtype)
        elif lower == "total_sequence_length":
            total = cache_length(model, shapes) or sequence_of_consumer(model, "seqlens_k", shapes)
            feeds[name] = np.array(total, dtype=dtype).reshape(shape)
        elif "mask" in lower and len(shape) == 1:
            keys = sequence_of_consumer(model, name, shapes)
            lengths = rng.integers(1, keys + 1, shape)
            lengths[0] = keys
            feeds[name] = lengths.astype(dtype)
        elif "mask" in lower:
            mask = np.ones(shape, dtype=dtype)
            if len(shape) == 2:
                for row in range(shape[0] // 2, shape[0]):
                    mask[row, rng.integers(1, shape[1]):] = 0
            else:
                mask = rng.integers(0, 2, shape).astype(dtype)
                mask[..., 0] = 1
            feeds[name] = mask
        elif "position" in lower:
            rows = table_rows(model, name) or 64
            length = shape[-1] if len(shape) == 2 else sequence_of_consumer(model, name, shapes)
            offsets = rng.integers(0, max(rows - length, 0) + 1, shape[:1] + [1] * (len(shape) - 1))
            base = np.arange(length) if len(shape) == 2 else 0
            feeds[name] = (offsets + base).astype(dtype)
        else:
            high = table_rows(model, name) or 100
            feeds[name] = rng.integers(0, high, shape).astype(dtype)
    return feeds


def run(path, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in wanted})


def check_pair(fused_path, lowered_path):
    fused = onnx.load(fused_path)
    lowered = onnx.load(lowered_path)
    onnx.checker.check_model(lowered, full_check=True)
    foreign = sorted({n.domain for n in lowered.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        return False, f"lowered model still has nodes of {foreign}"
    feeds = make_inputs(fused, np.random.default_rng(SEED))
    expected = run(fused_path, feeds)
    actual = run(lowered_path, feeds)
    names = [o.name for o in fused.graph.output]
    worst, ok, parts = 0.0, True, []
    for name, want, got in zip(names, expected, actual):
        if want.shape != got.shape:
            return False, f"{name}: shape {got.shape}, ORT's kernel gives {want.shape}"
        diff = np.abs(want.astype(np.float64) - got.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        ok &= bool(np.all(diff <= ATOL + RTOL * np.abs(want.astype(np.float64))))
        worst = max(worst, max_abs)
        parts.append(f"{name} {max_abs:.2e}")
    return ok, f"max_abs {worst:.2e} ({', '.join(parts)})"


def main():
    pairs = sys.argv[1:]
    if not pairs or len(pairs) % 2:
        sys.exit(__doc__)
    failures = 0
    for fused, lowered in zip(pairs[0::2], pairs[1::2]):
        case = os.path.basename(os.path.dirname(os.path.abspath(fused))) or fused
        try:
            ok, detail = check_pair(fused, lowered)
        except Exception as e:  # a model ORT or the checker rejects is a failure of that case
            ok, detail = False, f"{type(e).__name__}: {e}"
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {case}: {detail}")
    print(f"ORT {ort.__version__}: {len(pairs) // 2 - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
