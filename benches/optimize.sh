#!/usr/bin/env bash
# Wall time and peak RSS of `onnxopt optimize --target ort --no-verify` on a
# BERT-base-sized model, and the ORT-CPU latency of its output against the input
# and against ONNX Runtime's own transformers optimizer, at sequence 128 and 512.
# usage: benches/optimize.sh [MODEL.onnx ...]   (default: the shared MiniLM exports)
# Needs python3 with onnxruntime (and torch + transformers to make BERT-base).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet
bin=$PWD/target/debug/onnxopt
bench=${SHARED:-$PWD/../shared}/bench
base=target/bench-models/bert-base.onnx
[ -f "$base" ] || python3 benches/make_bert_base.py "$base"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for i in 1 2 3; do
  /usr/bin/time -f "optimize bert-base: %e s, peak RSS %M KB" "$bin" -q optimize "$base" -o "$out/bb.onnx" --no-verify
done
models=("$@")
[ ${#models[@]} -gt 0 ] || models=("$bench/../models/minilm-l6-v2/model.ts.onnx" "$bench/../models/minilm-l6-v2/model.dynamo.onnx")
for m in "${models[@]}"; do
  name=$(basename "$m" .onnx)
  "$bin" -q optimize "$m" -o "$out/$name.onnxopt.onnx" --target ort
  python3 "$bench/peer_tool.py" ortopt "$m" "$out/$name.ortopt.onnx" bert 12 384 >/dev/null 2>&1
  for seq in 128 512; do
    echo "== $name, sequence $seq (reference: the input)"
    (cd "$out" && SEQ=$seq python3 "$bench/ort_latency.py" "$m" "$out/$name.onnxopt.onnx" "$out/$name.ortopt.onnx" 2>&1 | grep '^batch')
  done
done
