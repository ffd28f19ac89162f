#!/usr/bin/env bash
# Wall time and peak RSS of `onnxopt convert` and `inspect` on a BERT-base-sized
# model, beside `cp` and Python's onnx.load + onnx.save on the same file.
# usage: benches/io.sh [MODEL.onnx]   (default: makes target/bench-models/bert-base.onnx)
# Needs GNU time (/usr/bin/time), and python3 with torch + transformers to make the model.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-target/bench-models/bert-base.onnx}
if [ ! -f "$model" ]; then
  mkdir -p "$(dirname "$model")"
  python3 benches/make_bert_base.py "$model"
fi
cargo build --quiet
bin=target/debug/onnxopt
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
size=$(stat -c %s "$model")
echo "model: $model ($size bytes)"
measure() { # label, command...
  local label=$1; shift
  for i in 1 2 3 4 5; do
    rm -f "$out"/*
    /usr/bin/time -f "%e %M" -o "$out/time" "$@" >/dev/null
    cat "$out/time"
  done | sort -n | awk -v l="$label" -v s="$size" 'NR==3 { printf "%-22s median %.2f s, peak RSS %.0f MB (%.2fx the file)\n", l, $1, $2/1024, $2*1024/s }'
}
measure "cp" cp "$model" "$out/cp.onnx"
measure "onnxopt convert" "$bin" -q convert "$model" -o "$out/c.onnx"
measure "onnxopt inspect" "$bin" inspect "$model"
measure "python onnx load+save" python3 -c "import onnx,sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])" "$model" "$out/py.onnx"
