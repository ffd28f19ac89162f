#!/usr/bin/env python3
"""Fusion coverage of onnxopt and its peers over the corpus of ``benches/corpus.py``.

For each model of ``corpus.json`` (status ok or mismatch) four tools run, each in
its own process with a timeout, so that one failure never stops the table:

* onnxopt: ``onnxopt optimize IN -o OUT --target ort --report R.json``.  When it
  fails, again with ``--engine ort``, then with ``--no-verify``; the mode that
  worked is recorded: ``tract`` (verified with tract), ``ort(auto)`` (the
  default engine chose ONNX Runtime itself), ``--engine ort``, ``--no-verify``
  or ``failed``, with the first error line of each failed try;
* onnxscript: ``onnxscript.rewriter.ort_fusions.optimize_for_ort`` (as in
  ``../shared/bench/coverage.py``);
* ort-opt: ``onnxruntime.transformers.optimizer.optimize_model(IN, model_type,
  num_heads=0, hidden_size=0)`` with its default opt_level, model_type from
  ``ORT_MODEL_TYPE`` below (the architecture's own type where ORT has one);
* ort-opt-h: the same with the model's real ``num_heads`` and ``hidden_size``
  (from corpus.json), as ORT's docs tell users to call it: with 0 / 0 it must
  read them off a Reshape's constant shape, which exports of transformers 5
  compute at run time instead ("Failed to detect num_heads and hidden_size").

Then every output is loaded in onnxruntime (CPU, default optimizations) and run
on random inputs (batch 2, sequence 7, token ids < the corpus vocab, the last 2
positions of sequence 0 masked), against the input model run with ORT's graph
optimizations off; the max abs difference over all outputs is recorded.

What is counted (in the graph and its subgraphs):

* attention present in the input = its Softmax nodes, plus attention ops already
  fused by the exporter (ai.onnx ``Attention`` of opset 23, com.microsoft ones);
  attention fused in an output = ``Attention``, ``MultiHeadAttention``,
  ``GroupQueryAttention``, ``PackedMultiHeadAttention``, ``PackedAttention``
  (any domain: an ai.onnx Attention left as it was counts as fused); Softmax left
  = the output's Softmax nodes;
* norm blocks present in the input = its norm ops (``LayerNormalization``,
  ``RMSNormalization``, ``SimplifiedLayerNormalization``, and the com.microsoft
  ones below) plus each decomposed norm, found by its one mean of squares: a
  ``ReduceMean`` whose input (through ``Cast``s) is ``Pow(x, 2)`` or ``Mul(x, x)``
  -- a decomposed LayerNorm (the variance) and a decomposed RMSNorm have exactly
  one each; norms in an output = ``LayerNormalization``,
  ``SkipLayerNormalization``, ``SimplifiedLayerNormalization``,
  ``SkipSimplifiedLayerNormalization``, ``RMSNormalization``,
  ``EmbedLayerNormalization`` (one block each); "skip" = those of them that also
  fused the residual Add (the Skip* ones and EmbedLayerNormalization);
* GELU present in the input = ``Erf`` (exact GELU) + ``Tanh`` (tanh
  approximation) + ai.onnx ``Gelu`` + ``Sigmoid(Mul(x, 1.702))`` (QuickGELU);
  GELU in an output = ``Gelu``, ``FastGelu``, ``BiasGelu``, ``QuickGelu``,
  ``GemmFastGelu``, ``BiasSplitGelu`` (a QuickGelu with alpha 1 is SiLU, not counted);
* rotary = ``RotaryEmbedding`` nodes (any domain); nodes = node count of the
  main graph.

Then totals per tool, the models where a peer fuses more than onnxopt (attention,
norms, skip-norms, GELU, rotary), and onnxopt's failures and fallbacks with their
error lines.

Usage:  python benches/coverage.py [--corpus DIR] [--onnxopt PATH] [--only SUBSTR]
                                   [--markdown OUT.md] [--json OUT.json] [--work DIR]
Needs the corpus venv of benches/corpus.py (onnx, onnxruntime, onnxscript, onnx-ir,
numpy; no torch), e.g. ``~/.cache/onnxopt/corpus/venv/bin/python benches/coverage.py``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CORPUS = Path.home() / ".cache" / "onnxopt" / "corpus"
REPO = Path(__file__).resolve().parent.parent
TOOLS = ("onnxopt", "onnxscript", "ort-opt", "ort-opt-h")
PEERS = TOOLS[1:]
TIMEOUT_S = 300  # one tool on one model
DIFF_FLAG = 1e-3  # an output further than this from its input is flagged in the table
BATCH, SEQ = 2, 7  # sizes of the random inputs for dynamic dims
PADDED = 2

ATTN = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedMultiHeadAttention", "PackedAttention")
NORM = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization", "RMSNormalization", "EmbedLayerNormalization")
SKIP_NORM = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization")
GELU = ("Gelu", "FastGelu", "BiasGelu", "QuickGelu", "GemmFastGelu", "BiasSplitGelu")

# ORT transformers optimizer model_type per corpus architecture: the architecture's own type
# where ORT has one (bart also serves Whisper, as ORT's Whisper export does; clip is CLIP's
# text and vision towers), else bert for encoders and gpt2 for decoders.  For the RoPE
# decoders (Llama, Qwen, Phi-3, Mistral, Gemma) ORT also has "qwen3"; on this corpus it fuses
# exactly what "gpt2" fuses, but with opt_level 0 it leaves more nodes, so gpt2 is used.
ORT_MODEL_TYPE = {
    "vit": "vit", "deit": "vit", "swin": "swin", "clip-text": "clip", "clip-vision": "clip",
    "whisper-encoder": "bart", "whisper": "bart", "bart": "bart", "t5": "t5",
    "gpt2": "gpt2", "gpt-neox": "gpt_neox",
}
ORT_MODEL_TYPE_BY_FAMILY = {"encoder": "bert", "vision": "vit", "audio": "bert", "seq2seq": "bart", "decoder": "gpt2"}


# ---------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------


def all_nodes(graph):
    """The nodes of a graph and of every subgraph (If / Loop / Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                yield from all_nodes(attr.g)
            for g in attr.graphs:
                yield from all_nodes(g)


def constant_values(model) -> dict:
    """Small constant tensors by name (initializers and Constant nodes), as numpy arrays."""
    from onnx import numpy_helper
    values = {}
    for t in model.graph.initializer:
        if len(t.dims) <= 1 and (not t.dims or t.dims[0] <= 4):
            values[t.name] = numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    values[n.output[0]] = numpy_helper.to_array(a.t)
                elif a.name in ("value_float", "value_int"):
                    values[n.output[0]] = a.f if a.name == "value_float" else a.i
    return values


def is_const(values: dict, name: str, want: float, tol: float = 1e-3) -> bool:
    import numpy as np
    if name not in values:
        return False
    v = np.asarray(values[name], dtype=np.float64)
    return v.size == 1 and abs(float(v.reshape(-1)[0]) - want) <= tol


def count(model) -> dict:
    """Op counts of one model (see the module docstring for the rules)."""
    nodes = list(all_nodes(model.graph))
    ops = collections.Counter(n.op_type for n in nodes)
    c = lambda names: sum(ops[k] for k in names)  # noqa: E731
    producer = {o: n for n in model.graph.node for o in n.output}
    values = constant_values(model)

    def source(name):  # the node producing `name`, looking through Casts
        node = producer.get(name)
        while node is not None and node.op_type == "Cast":
            node = producer.get(node.input[0])
        return node

    squares = 0  # ReduceMean(Pow(x, 2)) / ReduceMean(Mul(x, x)): one per decomposed norm
    for n in model.graph.node:
        if n.op_type == "ReduceMean":
            src = source(n.input[0])
            if src is not None and ((src.op_type == "Pow" and is_const(values, src.input[1], 2.0))
                                    or (src.op_type == "Mul" and src.input[0] == src.input[1])):
                squares += 1
    quick = 0  # Sigmoid(Mul(x, 1.702))
    for n in model.graph.node:
        if n.op_type == "Sigmoid":
            src = producer.get(n.input[0])
            if src is not None and src.op_type == "Mul" and any(is_const(values, i, 1.702) for i in src.input):
                quick += 1
    # QuickGelu with alpha 1 is SiLU (x * sigmoid(x), Llama's MLP), which onnxopt fuses as
    # QuickGelu too: not a GELU block
    silu = sum(1 for n in nodes if n.op_type == "QuickGelu"
               and any(a.name == "alpha" and abs(a.f - 1.0) < 1e-6 for a in n.attribute))
    return {
        "attention": c(ATTN), "softmax": ops["Softmax"],
        "attention_present": ops["Softmax"] + c(ATTN),
        "norms": c(NORM), "skip_norms": c(SKIP_NORM), "norms_present": c(NORM) + squares,
        "gelu": c(GELU) - silu, "silu_fused": silu, "gelu_present": ops["Erf"] + ops["Tanh"] + ops["Gelu"] + quick,
        "rotary": ops["RotaryEmbedding"], "nodes": len(model.graph.node),
    }


# ---------------------------------------------------------------------------
# Workers (each runs in its own process: python coverage.py --worker ...)
# ---------------------------------------------------------------------------


def worker_onnxscript(src: str, dst: str) -> dict:
    import onnx
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    model = ir.from_proto(onnx.load(src))
    model, stats = optimize_for_ort(model)
    onnx.save(ir.to_proto(model), dst)
    return {"fusions": {k: v for k, v in stats.items() if v}}


def worker_ortopt(src: str, dst: str, model_type: str, heads: int, hidden: int) -> dict:
    from onnxruntime.transformers.optimizer import optimize_model
    model = optimize_model(src, model_type=model_type, num_heads=heads, hidden_size=hidden)
    model.save_model_to_file(dst)
    return {"fusions": {k: v for k, v in model.get_fused_operator_statistics().items() if v}}


def random_feeds(model, vocab: int) -> dict:
    """Random inputs for the model's graph inputs: dynamic dims take BATCH (a dim named *batch*)
    or SEQ; int64 ids below `vocab`, token types in {0, 1}, masks with padding; floats normal."""
    import numpy as np
    from onnx import helper
    rng = np.random.default_rng(1234)
    feeds = {}
    for inp in model.graph.input:
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (BATCH if "batch" in d.dim_param.lower() or i == 0 else SEQ)
                 for i, d in enumerate(t.shape.dim)]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        name = inp.name
        if "mask" in name:
            a = np.ones(shape, dtype=dtype)
            if a.ndim == 2 and shape[1] > PADDED:
                a[0, -PADDED:] = 0
        elif "token_type" in name:
            a = rng.integers(0, 2, shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            a = rng.integers(3, vocab, shape).astype(dtype)
        else:
            a = rng.standard_normal(shape).astype(dtype)
        feeds[name] = a
    return feeds


def worker_verify(src: str, dst: str, vocab: int) -> dict:
    """Run the input (ORT optimizations off) and a tool's output (ORT defaults) on the same random
    inputs; max abs difference over the outputs, matched by name, else by position."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    def session(path, level):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    feeds = random_feeds(onnx.load(src, load_external_data=False), vocab)
    ref = session(src, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    want = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, feeds)))
    cand = session(dst, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    cand_feeds = {}
    for i in cand.get_inputs():  # a tool may drop an unused input, or retype one
        a = feeds[i.name]
        ty = {"tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(float)": np.float32}.get(i.type)
        cand_feeds[i.name] = a.astype(ty) if ty is not None else a
    names = [o.name for o in cand.get_outputs()]
    got = cand.run(None, cand_feeds)
    worst = 0.0
    for k, (name, value) in enumerate(zip(names, got)):
        ref_value = want.get(name, list(want.values())[k] if k < len(want) else None)
        if ref_value is None:
            continue
        if np.shape(value) != np.shape(ref_value):
            raise AssertionError(f"output {name}: shape {np.shape(value)} != input model's {np.shape(ref_value)}")
        worst = max(worst, float(np.abs(np.asarray(value, np.float64) - np.asarray(ref_value, np.float64)).max()))
    return {"max_abs": worst}


def worker_main(args) -> int:
    """One tool (or one verification) on one model; prints one JSON line."""
    start = time.perf_counter()
    try:
        if args.worker == "onnxscript":
            result = worker_onnxscript(args.src, args.dst)
        elif args.worker == "ort-opt":
            result = worker_ortopt(args.src, args.dst, args.model_type, args.heads, args.hidden)
        elif args.worker == "verify":
            result = worker_verify(args.src, args.dst, args.vocab)
        else:
            raise ValueError(f"unknown worker {args.worker}")
        result["ok"] = True
    except Exception as e:  # noqa: BLE001 -- reported to the parent
        import traceback
        traceback.print_exc()
        result = {"ok": False, "error": first_line(f"{type(e).__name__}: {e}")}
    result["seconds"] = round(time.perf_counter() - start, 2)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------
# Parent: run the tools on each model
# ---------------------------------------------------------------------------


def first_line(text: str) -> str:
    lines = [l.strip() for l in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if l.strip()]
    return lines[0][:400] if lines else ""


def error_line(stderr: str) -> str:
    """The first line of onnxopt's error message ("error: ..."), else its last line."""
    lines = [l.strip() for l in stderr.splitlines() if l.strip()]
    for l in lines:
        if l.lower().startswith("error"):
            return l[:400]
    return lines[-1][:400] if lines else ""


def run_worker(kind: str, src: Path, dst: Path, log: Path, timeout: int, **extra) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--src", str(src), "--dst", str(dst)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    start = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s", "seconds": timeout}
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}\n")
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"ok": False, "error": f"worker died (exit {p.returncode}): {error_line(p.stderr)}",
            "seconds": round(time.perf_counter() - start, 2)}


def run_onnxopt(binary: str, src: Path, dst: Path, report: Path, log: Path, timeout: int) -> dict:
    """Default engine first, then --engine ort, then --no-verify; the first that works counts."""
    tries = [("default", []), ("--engine ort", ["--engine", "ort"]), ("--no-verify", ["--no-verify"])]
    errors = {}
    start = time.perf_counter()
    for label, extra in tries:
        dst.unlink(missing_ok=True)
        report.unlink(missing_ok=True)
        cmd = [binary, "-q", "optimize", str(src), "-o", str(dst), "--target", "ort", "--report", str(report), *extra]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            rc, stderr = p.returncode, p.stderr
        except subprocess.TimeoutExpired:
            rc, stderr = -1, f"error: timed out after {timeout} s"
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\nexit {rc}\n{stderr}\n")
        if rc == 0 and dst.exists():
            mode = label
            if label == "default":
                try:
                    engine = json.loads(report.read_text()).get("verification", {}).get("engine")
                except Exception:  # noqa: BLE001
                    engine = None
                mode = "tract" if engine == "tract" else f"{engine or '?'}(auto)"
            return {"ok": True, "mode": mode, "errors": errors, "seconds": round(time.perf_counter() - start, 2)}
        errors[label] = f"exit {rc}: {error_line(stderr)}"
    return {"ok": False, "mode": "failed", "errors": errors, "error": errors.get("default", ""),
            "seconds": round(time.perf_counter() - start, 2)}


def find_onnxopt(given: str | None) -> str:
    for cand in (given, os.environ.get("ONNXOPT"), REPO / "target" / "release" / "onnxopt",
                 REPO / "target" / "debug" / "onnxopt", shutil.which("onnxopt")):
        if cand and Path(cand).exists():
            return str(cand)
    raise SystemExit("no onnxopt binary: pass --onnxopt PATH (or build it: cargo build --release)")


def ort_dylib() -> str | None:
    """The libonnxruntime.so of this interpreter's onnxruntime wheel, for onnxopt --engine ort
    (so that onnxopt and the checks here use one ORT)."""
    try:
        import onnxruntime
        capi = Path(onnxruntime.__file__).parent / "capi"
        libs = sorted(capi.glob("libonnxruntime.so*"))
        return str(libs[0]) if libs else None
    except Exception:  # noqa: BLE001
        return None


def evaluate(entry: dict, corpus: Path, work: Path, binary: str, vocab: int, timeout: int) -> dict:
    """All tools on one corpus model: counts, statuses, diffs."""
    import onnx
    src = corpus / entry["file"]
    stem = entry["file"][: -len(".onnx")]
    log = work / f"{stem}.log"
    log.unlink(missing_ok=True)
    row = {"file": entry["file"], "arch": entry["arch"], "family": entry["family"],
           "input": count(onnx.load(str(src))), "tools": {}}
    model_type = ORT_MODEL_TYPE.get(entry["arch"], ORT_MODEL_TYPE_BY_FAMILY.get(entry["family"], "bert"))
    row["ort_model_type"] = model_type
    for tool in TOOLS:
        dst = work / f"{stem}.{tool}.onnx"
        dst.unlink(missing_ok=True)
        if tool == "onnxopt":
            res = run_onnxopt(binary, src, dst, work / f"{stem}.onnxopt.report.json", log, timeout)
        elif tool == "ort-opt":
            res = run_worker(tool, src, dst, log, timeout, model_type=model_type, heads=0, hidden=0)
        elif tool == "ort-opt-h":
            res = run_worker("ort-opt", src, dst, log, timeout, model_type=model_type,
                             heads=entry.get("num_heads", 0), hidden=entry.get("hidden_size", 0))
        else:
            res = run_worker(tool, src, dst, log, timeout)
        if res.get("ok") and dst.exists():
            try:
                res["counts"] = count(onnx.load(str(dst)))
            except Exception as e:  # noqa: BLE001
                res["ok"], res["error"] = False, first_line(f"output unreadable: {type(e).__name__}: {e}")
        if res.get("ok") and dst.exists():
            v = run_worker("verify", src, dst, log, timeout, vocab=vocab)
            res["ort_ok"] = v.get("ok", False)
            res["max_abs"] = v.get("max_abs")
            if not v.get("ok"):
                res["ort_error"] = v.get("error", "")
        row["tools"][tool] = res
    return row


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def status(res: dict, tool: str) -> str:
    if not res.get("ok"):
        return "FAILED"
    s = res.get("mode", "ok") if tool == "onnxopt" else "ok"
    if not res.get("ort_ok"):
        s += ", ORT run FAILED"
    elif res.get("max_abs") is not None and res["max_abs"] > DIFF_FLAG:
        s += ", DIFF"
    return s


def cell(row: dict, key: str) -> str:
    """`onnxopt / onnxscript / ort-opt / ort-opt-h` values of one count ('-' where the tool failed)."""
    vals = []
    for t in TOOLS:
        c = row["tools"][t].get("counts")
        vals.append(str(c[key]) if c else "-")
    return " / ".join(vals)


def diff_cell(row: dict) -> str:
    out = []
    for t in TOOLS:
        r = row["tools"][t]
        out.append(f"{r['max_abs']:.0e}" if r.get("max_abs") is not None else "-")
    return " / ".join(out)


def totals(rows: list[dict]) -> dict:
    out = {}
    for t in TOOLS:
        tot = collections.Counter()
        for row in rows:
            res = row["tools"][t]
            tot["models"] += 1
            tot["attention_present"] += row["input"]["attention_present"]
            tot["norms_present"] += row["input"]["norms_present"]
            tot["gelu_present"] += row["input"]["gelu_present"]
            if not res.get("ok"):
                tot["failed"] += 1
                continue
            for k in ("attention", "softmax", "norms", "skip_norms", "gelu", "rotary", "nodes"):
                tot[k] += res["counts"][k]
            if not res.get("ort_ok"):
                tot["ort_failed"] += 1
            elif res.get("max_abs") is not None and res["max_abs"] > DIFF_FLAG:
                tot["diff"] += 1
            if t == "onnxopt":
                tot[f"mode {res['mode']}"] += 1
        out[t] = dict(tot)
    return out


COMPARED = (("attention", "attention"), ("norms", "norms"), ("skip_norms", "skip-norms"), ("gelu", "GELU"),
            ("rotary", "rotary"))


def peers_ahead(rows: list[dict]) -> list[tuple[str, str, int, dict]]:
    """(file, what, onnxopt's count, {peer: count}) where a peer's count is above onnxopt's."""
    out = []
    for row in rows:
        mine = row["tools"]["onnxopt"].get("counts")
        for key, label in COMPARED:
            m = mine[key] if mine else 0
            better = {p: row["tools"][p]["counts"][key] for p in PEERS
                      if row["tools"][p].get("counts") and row["tools"][p]["counts"][key] > m}
            if better:
                out.append((row["file"], label, m, better))
    return out


def render(rows: list[dict], corpus_meta: dict, binary: str, seconds: float) -> list[str]:
    """The report as markdown lines (also printed to the terminal)."""
    L = []
    v = corpus_meta.get("versions", {})
    L += ["# Fusion coverage: onnxopt vs onnxscript optimize_for_ort vs ORT transformers optimizer", "",
          f"{len(rows)} models of the corpus made by `benches/corpus.py`; onnxopt `{binary}`; "
          f"onnxruntime {v.get('onnxruntime', '?')}, onnxscript {v.get('onnxscript', '?')}, "
          f"onnx {v.get('onnx', '?')}; {seconds:.0f} s.", "",
          "Cells are `onnxopt / onnxscript / ort-opt / ort-opt-h` (ort-opt: num_heads = hidden_size = 0; "
          "ort-opt-h: the model's real ones). Attention and norms: fused / present in the input "
          "(present = Softmax + already fused attention; norms present = norm ops + decomposed norms, one "
          "`ReduceMean(x^2)` each; see the docstring of `benches/coverage.py`). `skip` = norms that also fused "
          "the residual Add (Skip*, EmbedLayerNormalization). Max diff: each output against the input, in "
          f"ORT, batch {BATCH} / sequence {SEQ}.", "",
          "| model | ort model_type | attn present | attention | softmax left | norms present | norms | skip | "
          "gelu present | gelu | rotary | nodes in | nodes | status | max diff |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        i = row["input"]
        st = " / ".join(status(row["tools"][t], t) for t in TOOLS)
        L.append(f"| `{row['file']}` | {row['ort_model_type']} | {i['attention_present']} | {cell(row, 'attention')} "
                 f"| {cell(row, 'softmax')} | {i['norms_present']} | {cell(row, 'norms')} | {cell(row, 'skip_norms')} "
                 f"| {i['gelu_present']} | {cell(row, 'gelu')} | {cell(row, 'rotary')} | {i['nodes']} "
                 f"| {cell(row, 'nodes')} | {st} | {diff_cell(row)} |")

    L += ["", "## Totals", "",
          "| tool | attention fused / present | softmax left | norms / present | skip | gelu / present | rotary "
          "| nodes | tool failed | ORT run failed | diff > 1e-3 | onnxopt modes |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t, tot in totals(rows).items():
        modes = ", ".join(f"{k[5:]} {n}" for k, n in sorted(tot.items()) if k.startswith("mode ")) or ""
        L.append(f"| {t} | {tot.get('attention', 0)} / {tot.get('attention_present', 0)} | {tot.get('softmax', 0)} "
                 f"| {tot.get('norms', 0)} / {tot.get('norms_present', 0)} | {tot.get('skip_norms', 0)} "
                 f"| {tot.get('gelu', 0)} / {tot.get('gelu_present', 0)} | {tot.get('rotary', 0)} | {tot.get('nodes', 0)} "
                 f"| {tot.get('failed', 0)} | {tot.get('ort_failed', 0)} | {tot.get('diff', 0)} | {modes} |")

    ahead = peers_ahead(rows)
    L += ["", "## Where a peer fuses more than onnxopt", ""]
    if ahead:
        L += ["| model | what | onnxopt | peers ahead |", "| --- | --- | --- | --- |"]
        L += [f"| `{f}` | {what} | {m} | {', '.join(f'{p} {n}' for p, n in better.items())} |"
              for f, what, m, better in ahead]
    else:
        L.append("None.")

    L += ["", "## onnxopt failures and fallbacks", ""]
    bad = [r for r in rows if r["tools"]["onnxopt"].get("mode") != "tract"]
    if bad:
        L += ["| model | mode | error of each failed try (first line) |", "| --- | --- | --- |"]
        for r in bad:
            res = r["tools"]["onnxopt"]
            errs = "<br>".join(f"{k}: `{e}`" for k, e in res.get("errors", {}).items()) or "-"
            L.append(f"| `{r['file']}` | {res.get('mode')} | {errs} |")
    else:
        L.append("None: every model verified with tract.")

    L += ["", "## Peer failures and wrong outputs", ""]
    probs = []
    for r in rows:
        for t in TOOLS:
            res = r["tools"][t]
            if not res.get("ok"):
                probs.append(f"- `{r['file']}` {t}: FAILED `{res.get('error', '')}`")
            elif not res.get("ort_ok"):
                probs.append(f"- `{r['file']}` {t}: output does not run in ORT: `{res.get('ort_error', '')}`")
            elif res.get("max_abs") is not None and res["max_abs"] > DIFF_FLAG:
                probs.append(f"- `{r['file']}` {t}: max abs diff {res['max_abs']:.2e} from the input")
    L += probs or ["None."]
    return L


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help=f"corpus folder (default {DEFAULT_CORPUS})")
    parser.add_argument("--onnxopt", help="onnxopt binary (default $ONNXOPT, target/release, target/debug, PATH)")
    parser.add_argument("--only", action="append", metavar="SUBSTR", help="models whose file name contains SUBSTR")
    parser.add_argument("--markdown", type=Path, help="write the report as markdown here")
    parser.add_argument("--json", type=Path, help="write every measurement as JSON here")
    parser.add_argument("--work", type=Path, default=Path("/tmp/onnxopt-coverage"),
                        help="where the tools' outputs and logs go (default /tmp/onnxopt-coverage)")
    parser.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per tool per model")
    # internal: one worker process
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--dst", help=argparse.SUPPRESS)
    parser.add_argument("--model-type", help=argparse.SUPPRESS)
    parser.add_argument("--heads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args)

    corpus = args.corpus.expanduser().resolve()
    meta = json.loads((corpus / "corpus.json").read_text())
    entries = [e for e in meta["models"] if e["status"] in ("ok", "mismatch") and (corpus / e["file"]).exists()
               and (not args.only or any(s in e["file"] for s in args.only))]
    binary = find_onnxopt(args.onnxopt)
    if "ORT_DYLIB_PATH" not in os.environ and ort_dylib():
        os.environ["ORT_DYLIB_PATH"] = ort_dylib()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"{len(entries)} models from {corpus}, onnxopt {binary}, outputs in {work}", flush=True)

    start = time.perf_counter()
    rows = []
    for k, e in enumerate(entries, 1):
        t0 = time.perf_counter()
        try:
            row = evaluate(e, corpus, work, binary, meta.get("vocab", args.vocab), args.timeout)
        except Exception as ex:  # noqa: BLE001 -- e.g. the input itself unreadable: skip it, say so
            print(f"[{k}/{len(entries)}] {e['file']}: SKIPPED {type(ex).__name__}: {first_line(str(ex))}", flush=True)
            continue
        rows.append(row)
        i = row["input"]
        print(f"[{k}/{len(entries)}] {e['file']:<42} attn {i['attention_present']} -> {cell(row, 'attention'):<11} "
              f"norms {i['norms_present']} -> {cell(row, 'norms'):<11} gelu {i['gelu_present']} -> {cell(row, 'gelu'):<9} "
              f"rot {cell(row, 'rotary'):<9} | {' / '.join(status(row['tools'][t], t) for t in TOOLS)} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - start

    lines = render(rows, meta, binary, seconds)
    print()
    print("\n".join(lines[lines.index("## Totals"):]))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
        print(f"\nwrote {args.markdown}")
    if args.json:
        args.json.write_text(json.dumps({"onnxopt": binary, "seconds": round(seconds, 1), "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
