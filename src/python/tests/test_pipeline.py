"""An export pipeline through the Python package: torch.onnx.export of a small transformer
block -> onnxopt.optimize / quantize -> onnxruntime.InferenceSession, outputs compared.

Run: pip install ./src/python[test] && pytest src/python/tests
"""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import onnxopt

HIDDEN, HEADS, FFN = 32, 4, 64


class Block(nn.Module):
    """One pre-norm transformer encoder block, as a user would write it."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.out = nn.Linear(HIDDEN, HIDDEN)
        self.up, self.down = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)

    def forward(self, x, mask):
        b, s, _ = x.shape
        h = self.norm1(x)
        split = lambda t: t.view(b, s, HEADS, HIDDEN // HEADS).transpose(1, 2)
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS)
        scores = scores + (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, HIDDEN)
        x = x + self.out(context)
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


def inputs(batch=2, sequence=7, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, sequence, HIDDEN)).astype(np.float32)
    mask = np.ones((batch, sequence), np.float32)
    mask[0, -2:] = 0.0
    return {"x": x, "mask": mask}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = Block().eval()
    path = tmp_path_factory.mktemp("export") / "block.onnx"
    example = {k: torch.from_numpy(v) for k, v in inputs(batch=3, sequence=5).items()}
    axes = {"x": {0: "batch", 1: "sequence"}, "mask": {0: "batch", 1: "sequence"}, "y": {0: "batch", 1: "sequence"}}
    torch.onnx.export(model, (example["x"], example["mask"]), str(path), input_names=["x", "mask"], output_names=["y"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


def run(model_bytes, feeds):
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_export_optimize_onnxruntime(exported):
    model = onnx.load(exported)
    optimized, report = onnxopt.optimize(model, target="ort")
    assert isinstance(optimized, onnx.ModelProto)
    assert report["nodes_after"] < report["nodes_before"], report
    assert report["verification"]["outputs"][0]["within_tolerance"]
    fused = {n.op_type for n in optimized.graph.node if n.domain == "com.microsoft"}
    assert fused, "nothing fused for ORT"
    feeds = inputs()
    expected = run(model.SerializeToString(), feeds)
    got = run(optimized.SerializeToString(), feeds)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_bytes_in_bytes_out_and_paths(exported, tmp_path):
    data = exported.read_bytes()
    optimized, _ = onnxopt.optimize(data, target="portable")
    assert isinstance(optimized, bytes)
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load_model_from_string(optimized).graph.node)
    out = tmp_path / "block.int8.onnx"
    written, report = onnxopt.quantize(exported, output=out, mode="int8-dynamic")
    assert written == str(out) and out.exists()
    assert report["mode"] == "int8-dynamic" and report["verification"]["outputs"][0]["cosine"] > 0.98
    with pytest.raises(ValueError, match="output="):
        onnxopt.optimize(exported)
    comparison = onnxopt.verify(exported, out, atol=1.0)
    assert comparison["passed"] and comparison["engine"] in ("tract", "onnxruntime")
    assert onnxopt.inspect(data)["parameters"] > 0


def test_errors_carry_the_command_lines_messages(exported):
    with pytest.raises(onnxopt.OnnxoptError, match="protobuf|not an ONNX model|empty"):
        onnxopt.optimize(b"\x08\x07garbage")
    with pytest.raises(onnxopt.OnnxoptError, match="--smoothquant"):
        onnxopt.quantize(exported.read_bytes(), mode="int4-weight", smoothquant=0.5)
    with pytest.raises(onnxopt.OnnxoptError, match="unknown field"):
        onnxopt.quantize(exported.read_bytes(), mode="int8-dynamic", no_such_option=1)
    # a bound no int8 result meets: rejected, nothing returned
    with pytest.raises(onnxopt.VerificationError, match="beyond tolerance"):
        onnxopt.quantize(exported.read_bytes(), mode="int8-dynamic", min_cosine=1.0000001)


def test_auto_preset_and_search(exported, tmp_path):
    fused, report = onnxopt.auto(exported.read_bytes(), preset="O2")
    assert report["preset"] == "O2" and report["optimize"]["verification"]["outputs"][0]["within_tolerance"]
    assert any(n.domain == "com.microsoft" for n in onnx.load_model_from_string(fused).graph.node)
    calib = tmp_path / "calib.npz"
    rows = [inputs(batch=2, sequence=7, seed=s) for s in range(5)]
    np.savez(calib, x=np.concatenate([r["x"] for r in rows]), mask=np.concatenate([r["mask"] for r in rows]))
    chosen, report = onnxopt.auto(exported.read_bytes(), calib=calib, batch=2, min_cosine=0.99, recipes=["fuse", "int8-dynamic"])
    assert [t["recipe"] for t in report["trials"]] == ["fuse", "int8-dynamic"]
    assert report["chosen"] in ("fuse", "int8-dynamic")
    assert all(t["fidelity"] is not None for t in report["trials"]), report["trials"]
    feeds = inputs()
    expected = run(exported.read_bytes(), feeds)
    got = run(chosen, feeds)
    cosine = float((got * expected).sum() / np.linalg.norm(got) / np.linalg.norm(expected))
    assert cosine > 0.99
    with pytest.raises(onnxopt.OnnxoptError, match="fixed recipe"):
        onnxopt.auto(exported.read_bytes(), preset="O2", min_cosine=0.99)
