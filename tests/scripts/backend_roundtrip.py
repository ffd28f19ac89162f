"""Lossless round trip over the ONNX backend node tests.

usage: python backend_roundtrip.py ONNXOPT_BINARY [MODEL.onnx ...]

Writes every model of `onnx.backend.test.case.node.collect_testcases(None)`
(plus any MODEL.onnx given) to a temporary folder, runs `onnxopt convert` on
each, and checks `onnx.load(original) == onnx.load(converted)` (the issue's
criterion) and byte identity. Prints the counts; exits 1 if any model fails.
"""
import os
import warnings
import subprocess
import sys
import tempfile

import onnx
from onnx.backend.test.case.node import collect_testcases


def main():
    warnings.simplefilter("ignore")  # the onnx test generators warn about their own numpy casts
    binary = sys.argv[1]
    extra = sys.argv[2:]
    cases = collect_testcases(None)
    failures = []
    identical = equal = 0
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for i, case in enumerate(cases):
            path = os.path.join(tmp, f"{i:04d}_{case.name}.onnx")
            with open(path, "wb") as f:
                f.write(case.model.SerializeToString())
            jobs.append((case.name, path))
        jobs.extend((os.path.basename(p), p) for p in extra)
        for name, path in jobs:
            out = os.path.join(tmp, "out.onnx")
            run = subprocess.run([binary, "--quiet", "convert", path, "-o", out], capture_output=True, text=True)
            if run.returncode != 0:
                failures.append(f"{name}: exit {run.returncode}: {run.stderr.strip()}")
                continue
            if onnx.load(path) == onnx.load(out):
                equal += 1
            else:
                failures.append(f"{name}: onnx.load() differs after the round trip")
            with open(path, "rb") as a, open(out, "rb") as b:
                identical += a.read() == b.read()
            os.remove(out)
    total = len(jobs)
    for f in failures[:20]:
        print("FAIL", f)
    print(f"backend node test models: {len(cases)}; extra models: {len(extra)}")
    print(f"round trip equal (onnx.load): {equal}/{total}; byte-identical: {identical}/{total}")
    print(f"{equal} passed, {total - equal} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
