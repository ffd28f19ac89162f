"""onnxopt: makes transformer ONNX models smaller and faster, checking every result numerically.

Each function takes a model as an ``onnx.ModelProto``, ``bytes`` or a path and returns
``(result, report)``: the result is the same kind as the model given (with ``output=`` it is
written there and its path returned; a path in needs ``output=``, and models past protobuf's
2 GiB go through paths), the report a dict (what ``onnxopt ... --report`` writes).

    import onnx, onnxopt
    model = onnx.load("model.onnx")
    fused, report = onnxopt.optimize(model, target="ort")
    int8, report = onnxopt.quantize("model.onnx", output="model.int8.onnx", mode="int8",
                                    calib_text="calib.txt", tokenizer="tokenizer.json")

Every result is checked against the input (tract, or ONNX Runtime with ``engine="ort"``);
one beyond the bound raises ``VerificationError`` and nothing is written. Bad input or an
option the mode does not use raises ``OnnxoptError`` with the command line's message.
Options left at ``None`` take the command line's defaults (``onnxopt quantize --help``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence, Tuple, Union

from . import _native
from ._native import OnnxoptError, VerificationError

__all__ = ["optimize", "quantize", "prune", "auto", "verify", "inspect", "OnnxoptError", "VerificationError"]

Model = Union["onnx.ModelProto", bytes, str, "os.PathLike[str]"]  # noqa: F821


def _source(model: Model) -> Tuple[Optional[bytes], Optional[str], str]:
    """(bytes, path, kind) of a model given as ModelProto, bytes or a path."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model), None, "bytes"
    if isinstance(model, (str, os.PathLike)):
        return None, os.fspath(model), "path"
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString(), None, "proto"
    raise TypeError(f"model: an onnx.ModelProto, bytes or a path, not {type(model).__name__}")


def _options(values: dict) -> str:
    """The options given (None: the default), as the JSON the native module reads."""
    return json.dumps({k: v for k, v in values.items() if v is not None})


def _run(command, model: Model, output, options: dict) -> Tuple[Any, dict]:
    data, path, kind = _source(model)
    if kind == "path" and output is None:
        raise ValueError(f"{command.__name__}({path!r}): a path in needs output= (where to write the result)")
    out = os.fspath(output) if output is not None else None
    result, report = command(data, path, out, _options(options))
    if out is not None:
        return out, json.loads(report)
    if kind == "proto":
        import onnx

        return onnx.load_model_from_string(result), json.loads(report)
    return result, json.loads(report)


def optimize(
    model: Model,
    output: Optional[Union[str, "os.PathLike[str]"]] = None,
    *,
    target: str = "ort",
    opset: Optional[int] = None,
    verify: bool = True,
    engine: Optional[str] = None,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    passes: Optional[Sequence[str]] = None,
    skip: Sequence[str] = (),
) -> Tuple[Any, dict]:
    """Fuses and cleans up ``model`` for ``target`` ("ort", "portable", "tensorrt").

    The result is checked against the input (atol 1e-4, rtol 1e-3 by default).
    """
    return _run(
        _native.optimize,
        model,
        output,
        dict(target=target, opset=opset, verify=verify, engine=engine, atol=atol, rtol=rtol, passes=list(passes) if passes else None, skip=list(skip)),
    )


def quantize(
    model: Model,
    output: Optional[Union[str, "os.PathLike[str]"]] = None,
    *,
    mode: str,
    target: str = "ort",
    calib_text: Optional[str] = None,
    tokenizer: Optional[str] = None,
    calib: Optional[str] = None,
    max_len: Optional[int] = None,
    batch: Optional[int] = None,
    **options: Any,
) -> Tuple[Any, dict]:
    """Quantizes ``model``: ``mode`` is "int8", "int8-dynamic", "fp16", "int8-static" or "int4-weight".

    Calibration data: ``calib_text`` (one sentence a line) with ``tokenizer`` (tokenizer.json), or
    ``calib`` (an .npz of inputs). Other options as the command line's flags, with underscores:
    ``block_size``, ``zero_point``, ``rounding`` ("rtn" or "gptq"), ``accuracy_level``,
    ``quantize_embeddings``, ``float16_compute``, ``activations``, ``exclude``, ``max_error``, ``max_error_batches``,
    ``max_opset``, ``smoothquant``, ``calibration_method``, ``percentile``, ``weight_type``,
    ``verify``, ``engine``, ``min_cosine``, ``atol``, ``rtol``.
    """
    values = dict(mode=mode, target=target, calib_text=_path(calib_text), tokenizer=_path(tokenizer), calib=_path(calib), max_len=max_len, batch=batch)
    values.update(options)
    if "exclude" in values and values["exclude"] is not None:
        values["exclude"] = list(values["exclude"])
    return _run(_native.quantize, model, output, values)


def auto(
    model: Model,
    output: Optional[Union[str, "os.PathLike[str]"]] = None,
    *,
    target: str = "ort",
    preset: Optional[str] = None,
    min_cosine: Optional[float] = None,
    max_perplexity_ratio: Optional[float] = None,
    calib_text: Optional[str] = None,
    tokenizer: Optional[str] = None,
    calib: Optional[str] = None,
    max_len: Optional[int] = None,
    batch: Optional[int] = None,
    max_trials: Optional[int] = None,
    time_budget: Optional[float] = None,
    recipes: Optional[Sequence[str]] = None,
) -> Tuple[Any, dict]:
    """A preset (``preset="O1"`` to ``"O4"``), or a search over recipes (fusion, int8, int4,
    fp16, pruning) that keeps the fastest whose fidelity on held-back calibration data stays
    within ``min_cosine`` (encoders, default 0.99) or ``max_perplexity_ratio`` (decoders,
    default 1.10). The report lists every trial (``report["trials"]``) and the one chosen.
    """
    values = dict(
        target=target,
        preset=preset,
        min_cosine=min_cosine,
        max_perplexity_ratio=max_perplexity_ratio,
        calib_text=_path(calib_text),
        tokenizer=_path(tokenizer),
        calib=_path(calib),
        max_len=max_len,
        batch=batch,
        max_trials=max_trials,
        time_budget=time_budget,
        recipes=list(recipes) if recipes else None,
    )
    return _run(_native.auto, model, output, values)


def prune(
    model: Model,
    output: Optional[Union[str, "os.PathLike[str]"]] = None,
    *,
    method: str,
    calib_text: Optional[str] = None,
    tokenizer: Optional[str] = None,
    calib: Optional[str] = None,
    max_len: Optional[int] = None,
    batch: Optional[int] = None,
    sparsity: Optional[Union[float, Sequence[str]]] = None,
    **options: Any,
) -> Tuple[Any, dict]:
    """Prunes ``model``: ``method`` is "unstructured", "nm", "structured" or "layers".

    Other options as the command line's flags: ``keep_flops``, ``drop_layers``, ``nm``,
    ``importance``, ``reconstruct``, ``damping``, ``obs_rounds``, ``verify``, ``engine``,
    ``min_cosine``. ``sparsity`` is a fraction, or a list like ``["0.5", "NODE=0.3"]``.
    """
    if isinstance(sparsity, (int, float)):
        sparsity = [str(sparsity)]
    values = dict(method=method, calib_text=_path(calib_text), tokenizer=_path(tokenizer), calib=_path(calib), max_len=max_len, batch=batch)
    values.update(options, sparsity=list(sparsity) if sparsity is not None else None)
    return _run(_native.prune, model, output, values)


def verify(
    reference: Model,
    candidate: Model,
    *,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    engine: Optional[str] = None,
    seed: Optional[int] = None,
    batch: Optional[int] = None,
    sequence: Optional[int] = None,
) -> dict:
    """Runs both models on the same seeded inputs and compares every output.

    Returns the comparison (``passed``, and per output ``max_abs``, ``cosine``, ...).
    """
    a_data, a_path, _ = _source(reference)
    b_data, b_path, _ = _source(candidate)
    options = _options(dict(atol=atol, rtol=rtol, engine=engine, seed=seed, batch=batch, sequence=sequence))
    return json.loads(_native.verify(a_data, a_path, b_data, b_path, options))


def inspect(model: Model) -> dict:
    """What a model holds: versions, inputs and outputs, ops, parameters, architecture."""
    data, path, _ = _source(model)
    return json.loads(_native.inspect(data, path))


def _path(value):
    return os.fspath(value) if value is not None else None
