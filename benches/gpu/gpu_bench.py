#!/usr/bin/env python3
"""Latency and fidelity of ONNX models in ONNX Runtime's CUDA execution provider.

usage:
  python3 gpu_bench.py encoder REF.onnx CAND.onnx [...] [--batches 1,8,64] [--seqs 128,512]
  python3 gpu_bench.py decoder REF.onnx CAND.onnx [...] [--prefill 128,1024]
common options: --provider cuda|cpu (cpu: only to try the script without a GPU), --reps N (timed runs
  per model and shape, default 30), --warmup N (default 5), --names a,b,... (labels for the table),
  --no-placement (skip the profiling run that says which provider ran each node).

Both print markdown tables on stdout (and the ORT version, providers, GPU) and take the models in
the order given; the first is the reference that ratios and fidelity are measured against.

How it measures (both commands):
- IO binding: inputs are copied to the GPU once, outside the timed region; outputs are bound to the
  GPU (allocated by ORT, never copied back while timing). A timed run is session.run_with_iobinding,
  which returns after ORT synchronises the CUDA stream, so the wall-clock time covers the GPU work.
- Every model gets --warmup untimed runs at each shape, then --reps rounds; in each round every model
  runs once (decoder: one prefill and 4 decode steps), the order of the models rotating from round
  to round, so that clock and thermal drift hit all alike. The tables give medians.
- Placement: one profiled run per model (batch 1 / prefill 128): nodes per execution provider and
  the op types that ran on the CPU (ORT puts small shape computations there on purpose).

encoder: inputs input_ids (random ids in [1, 30000)), attention_mask (ones; the second half of the
  batch, rows ceil(B/2)..B-1, right-padded: mask 0 and id 0 on the last S/2 positions),
  token_type_ids (zeros) if the model has it. Fidelity: the first output vs the reference's on the
  same inputs: cosine over the whole tensor, the smallest cosine of one unpadded token's vector,
  and the largest absolute difference.

decoder (batch 1, KV cache): inputs matched by name, as in shared/bench/decoder_bench.py:
  input_ids, attention_mask (past + new ones), position_ids (past .. past+new-1, only if the model
  has it), past_key_values.N.key|value (empty past for a prefill: its symbolic dims are 1 for batch,
  0 for a past length, --head-dim for others such as ORT GenAI's kv_cache_dim; float16 or float32
  as declared). A decode step feeds one token with the model's own present.* from the prefill, left
  on the GPU, as past_key_values.*. Fidelity vs the reference: cosine of the last prefill
  position's logits and of the decode step's logits, and the share of prefill positions whose
  arg-max token agrees.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort


def providers_for(kind):
    if kind == "cuda":
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"], "cuda"
    return ["CPUExecutionProvider"], "cpu"


def make_session(path, kind, profile=False):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = "/tmp/gpu_bench_prof"
    provs, _ = providers_for(kind)
    s = ort.InferenceSession(path, so, providers=provs)
    if kind == "cuda" and s.get_providers()[0] != "CUDAExecutionProvider":
        raise SystemExit(f"{path}: CUDAExecutionProvider not in use (got {s.get_providers()})")
    return s


def placement(path, kind, feed):
    """Run once with profiling; count nodes per provider, list op types not on the first provider."""
    s = make_session(path, kind, profile=True)
    s.run(None, feed)
    prof = s.end_profiling()
    events = json.load(open(prof))
    os.remove(prof)
    per, off = {}, {}
    seen = set()
    for e in events:
        if e.get("cat") != "Node" or "args" not in e or "provider" not in e["args"]:
            continue
        name = e["name"].rsplit("_kernel_time", 1)[0]
        if not e["name"].endswith("_kernel_time") or name in seen:
            continue
        seen.add(name)
        p = e["args"]["provider"]
        per[p] = per.get(p, 0) + 1
        if p == "CPUExecutionProvider" and kind == "cuda":
            op = e["args"].get("op_name", "?")
            off[op] = off.get(op, 0) + 1
    short = {k.replace("ExecutionProvider", ""): v for k, v in per.items()}
    return short, off


def sync_binding(b):
    b.synchronize_outputs()


def ortvalue(x, dev):
    if dev == "cpu" or x.size == 0:
        return None
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), "cuda", 0)


def bind_inputs(b, feed, dev, keep):
    for n, x in feed.items():
        if isinstance(x, ort.OrtValue):
            b.bind_ortvalue_input(n, x)
            continue
        v = ortvalue(x, dev)
        if v is None:
            b.bind_cpu_input(n, np.ascontiguousarray(x))
        else:
            keep.append(v)
            b.bind_ortvalue_input(n, v)


def bind_outputs(b, sess, dev):
    for o in sess.get_outputs():
        if dev == "cuda":
            b.bind_output(o.name, "cuda", 0)
        else:
            b.bind_output(o.name)


def timed(sess, b):
    t0 = time.perf_counter()
    sess.run_with_iobinding(b)
    b.synchronize_outputs()
    return (time.perf_counter() - t0) * 1e3


def env_header(kind):
    print(f"- onnxruntime {ort.__version__} from {os.path.dirname(ort.__file__)}")
    print(f"- available providers: {ort.get_available_providers()}")
    if kind == "cuda":
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            print(f"- GPU: {gpu}")
        except Exception as e:  # noqa: BLE001
            print(f"- GPU: nvidia-smi failed ({e})")
    print()


def labels(args):
    if args.names:
        return args.names.split(",")
    return [os.path.basename(p) for p in args.models]


def cosine(a, b):
    a = a.astype(np.float64).ravel(); b = b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------- encoder
def encoder_feed(sess, B, S, rng):
    names = {i.name for i in sess.get_inputs()}
    ids = rng.integers(1, 30000, (B, S)).astype(np.int64)
    mask = np.ones((B, S), np.int64)
    for r in range((B + 1) // 2, B):
        mask[r, S // 2:] = 0
        ids[r, S // 2:] = 0
    feed = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros((B, S), np.int64)
    return {k: v for k, v in feed.items() if k in names}


def run_encoder(args):
    kind = args.provider
    _, dev = providers_for(kind)
    env_header(kind)
    names = labels(args)
    t0 = time.perf_counter()
    sessions = [make_session(p, kind) for p in args.models]
    print(f"sessions created in {time.perf_counter() - t0:.1f} s; "
          f"provider options (first model): {sessions[0].get_provider_options().get('CUDAExecutionProvider', {})}\n")
    if not args.no_placement:
        print("| model | nodes per provider | op types on CPU |\n| --- | --- | --- |")
        for n, p, s in zip(names, args.models, sessions):
            feed = encoder_feed(s, 1, 128, np.random.default_rng(0))
            try:
                per, off = placement(p, kind, feed)
                print(f"| {n} | {per} | {off or '-'} |")
            except Exception as e:  # noqa: BLE001
                print(f"| {n} | profiling failed: {e} | |")
        print()
        sys.stdout.flush()
    rows = []
    batches = [int(x) for x in args.batches.split(",")]
    seqs = [int(x) for x in args.seqs.split(",")]
    print("| batch | seq | model | median ms | p10-p90 ms | x fp32 ref | cosine | min token cos | max abs |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for B in batches:
        for S in seqs:
            feed = encoder_feed(sessions[0], B, S, np.random.default_rng(B * 1000 + S))
            binds, keep = [], []
            for s in sessions:
                f = {k: v for k, v in feed.items() if k in {i.name for i in s.get_inputs()}}
                b = s.io_binding()
                bind_inputs(b, f, dev, keep)
                bind_outputs(b, s, dev)
                binds.append(b)
            outs = []
            for s, b in zip(sessions, binds):
                for _ in range(args.warmup):
                    timed(s, b)
                outs.append(b.copy_outputs_to_cpu()[0])
            times = [[] for _ in sessions]
            for r in range(args.reps):
                for j in range(len(sessions)):
                    k = (j + r) % len(sessions)
                    times[k].append(timed(sessions[k], binds[k]))
            ref = outs[0].astype(np.float64)
            valid = feed["attention_mask"].astype(bool)
            med0 = statistics.median(times[0])
            for n, t, o in zip(names, times, outs):
                med = statistics.median(t)
                q = np.percentile(t, [10, 90])
                o = o.astype(np.float64)
                c = cosine(ref, o)
                a, bb = ref[valid], o[valid]
                tok = (a * bb).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(bb, axis=-1))
                mx = float(np.abs(ref - o).max())
                print(f"| {B} | {S} | {n} | {med:.3f} | {q[0]:.3f}-{q[1]:.3f} | {med / med0:.3f} | {c:.6f} | "
                      f"{tok.min():.6f} | {mx:.3e} |")
                rows.append((B, S, n, med, med / med0, c))
            sys.stdout.flush()
            del binds, keep
    print()


# ---------------------------------------------------------------- decoder
class Decoder:
    def __init__(self, path, kind, head_dim):
        self.path, self.kind = path, kind
        self.s = make_session(path, kind)
        self.dev = providers_for(kind)[1]
        self.inputs = {i.name: i for i in self.s.get_inputs()}
        self.outputs = [o.name for o in self.s.get_outputs()]
        self.past = [n for n in self.inputs if n.startswith("past_key_values")]
        self.head_dim = head_dim

    def empty_past(self):
        feed = {}
        for n in self.past:
            i = self.inputs[n]
            shape = []
            for k, d in enumerate(i.shape):
                if isinstance(d, int):
                    shape.append(d)
                elif k == 0:
                    shape.append(1)
                elif "past" in d or "seq" in d:
                    shape.append(0)
                else:  # ORT GenAI's kv_cache_dim: the head size
                    shape.append(self.head_dim)
            dtype = np.float16 if "float16" in i.type else np.float32
            feed[n] = np.zeros(shape, dtype)
        return feed

    def feed(self, ids, past, total):
        f = {"input_ids": ids.astype(np.int64)}
        if "attention_mask" in self.inputs:
            f["attention_mask"] = np.ones((1, total), np.int64)
        if "position_ids" in self.inputs:
            f["position_ids"] = np.arange(total - ids.shape[1], total, dtype=np.int64)[None]
        f.update(past)
        return f

    def binding(self, feed):
        b = self.s.io_binding()
        keep = []
        bind_inputs(b, feed, self.dev, keep)
        bind_outputs(b, self.s, self.dev)
        b._keep = keep  # keep the device inputs alive with the binding
        return b

    def presents(self, b):
        outs = dict(zip(self.outputs, b.get_outputs()))
        return {n: outs[n.replace("past_key_values", "present")] for n in self.past}

    def logits(self, b):
        return b.get_outputs()[self.outputs.index("logits")].numpy()


def run_decoder(args):
    kind = args.provider
    env_header(kind)
    names = labels(args)
    t0 = time.perf_counter()
    models = [Decoder(p, kind, args.head_dim) for p in args.models]
    print(f"sessions created in {time.perf_counter() - t0:.1f} s; "
          f"provider options (first model): {models[0].s.get_provider_options().get('CUDAExecutionProvider', {})}\n")
    print("| model | inputs |\n| --- | --- |")
    for n, m in zip(names, models):
        ins = [f"{i.name} {i.type} {i.shape}" for i in m.s.get_inputs() if not i.name.startswith("past_key_values.") or
               i.name.startswith("past_key_values.0.")]
        print(f"| {n} | {'; '.join(ins)} (+ {len(m.past)} past_key_values.* in all) |")
    print()
    rng = np.random.default_rng(0)
    vocab = args.vocab
    prefills = [int(x) for x in args.prefill.split(",")]
    if not args.no_placement:
        print("| model | nodes per provider (prefill 128) | op types on CPU |\n| --- | --- | --- |")
        ids = rng.integers(10, vocab - 10, (1, 128))
        for n, m in zip(names, models):
            try:
                per, off = placement(m.path, kind, m.feed(ids, m.empty_past(), 128))
                print(f"| {n} | {per} | {off or '-'} |")
            except Exception as e:  # noqa: BLE001
                print(f"| {n} | profiling failed: {e} | |")
        print()
        sys.stdout.flush()
    print("| prefill | model | prefill median ms | x ref | decode step median ms (past = prefill) | x ref | "
          "logits cos vs ref (last prefill pos / decode) | prefill top-1 agree |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for P in prefills:
        prompt = rng.integers(10, vocab - 10, (1, P))
        tok = prompt[:, :1]
        pre_b, dec_b, lg_pre, lg_dec = [], [], [], []
        for m in models:
            b = m.binding(m.feed(prompt, m.empty_past(), P))
            for _ in range(args.warmup):
                timed(m.s, b)
            lg_pre.append(m.logits(b)[0].astype(np.float64))
            past = m.presents(b)
            d = m.binding(m.feed(tok, past, P + 1))
            d._past = past
            for _ in range(args.warmup):
                timed(m.s, d)
            lg_dec.append(m.logits(d)[0, -1].astype(np.float64))
            pre_b.append(b); dec_b.append(d)
        tp = [[] for _ in models]; td = [[] for _ in models]
        for r in range(args.reps):
            for j in range(len(models)):
                k = (j + r) % len(models)
                tp[k].append(timed(models[k].s, pre_b[k]))
                for _ in range(4):
                    td[k].append(timed(models[k].s, dec_b[k]))
        p0, d0 = statistics.median(tp[0]), statistics.median(td[0])
        for k, n in enumerate(names):
            mp, md = statistics.median(tp[k]), statistics.median(td[k])
            c1 = cosine(lg_pre[0][-1], lg_pre[k][-1]); c2 = cosine(lg_dec[0], lg_dec[k])
            top = float((lg_pre[0].argmax(-1) == lg_pre[k].argmax(-1)).mean())
            print(f"| {P} | {n} | {mp:.3f} | {mp / p0:.3f} | {md:.3f} | {md / d0:.3f} | {c1:.5f} / {c2:.5f} | {top:.3f} |")
        sys.stdout.flush()
        del pre_b, dec_b
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["encoder", "decoder"])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--provider", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--names")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--seqs", default="128,512")
    ap.add_argument("--prefill", default="128,1024")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--no-placement", action="store_true")
    args = ap.parse_args()
    print(f"`{' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}`\n")
    if args.command == "encoder":
        run_encoder(args)
    else:
        run_decoder(args)


if __name__ == "__main__":
    main()
