"""Encodes calibration sentences into an .npz for `onnxopt --calib`, the way
../shared/bench/fidelity.py feeds the model it measures.

usage: python3 benches/calibration_npz.py TOKENIZER.json SENTENCES.txt OUT.npz [COUNT]

fidelity.py encodes with the tokenizer.json as it is, whose padding is fixed
at 128, and sets attention_mask to 1 on every position, padding included:
the model attends to about 100 [PAD] tokens per sentence and the embedding
mean-pools them. `--calib-text` masks padding (what a deployment that passes
the tokenizer's mask does), so methods fitted on it (GPTQ, the pruning
re-fits) are fitted to inputs that script never feeds. Calibrating on this
npz fits what it does feed. The README's figures say which was used.
"""
import sys

import numpy as np
from tokenizers import Tokenizer


def main():
    tokenizer_path, sentences_path, out_path = sys.argv[1:4]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else None
    tokenizer = Tokenizer.from_file(tokenizer_path)
    tokenizer.enable_truncation(128)
    sentences = [s for s in open(sentences_path, encoding="utf-8").read().splitlines() if s][:count]
    ids = np.array([e.ids for e in tokenizer.encode_batch(sentences)], np.int64)
    np.savez(out_path, input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids))
    print(f"{out_path}: {ids.shape[0]} sentences x {ids.shape[1]} tokens")


if __name__ == "__main__":
    main()
