"""Runs two models in ONNX Runtime's CPU provider on the same seeded inputs and
prints the first output's max abs difference and cosine (last on the line).

usage: python3 compare_in_ort.py REFERENCE.onnx CANDIDATE.onnx

Inputs: batch 2, other open dims 16; token ids below 100, masks of ones (an
int32 2-D mask, ORT's mask_index, pads the second row's last quarter), token
type ids zero, floats N(0, 1). Written for tests/quantize.rs.
"""
import sys

import numpy as np
import onnxruntime as ort

BATCH, SEQUENCE, SEED = 2, 16, 0


def feeds_for(session):
    rng = np.random.default_rng(SEED)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else (BATCH if k == 0 else SEQUENCE) for k, d in enumerate(i.shape)]
        if "int32" in i.type and "mask" in i.name:
            # ORT's mask_index / key_padding_mask: the second sequence right-padded
            mask = np.ones(shape, np.int32)
            if len(shape) == 2 and shape[0] > 1:
                mask[1, shape[1] * 3 // 4:] = 0
            feeds[i.name] = mask
        elif "int64" in i.type:
            if "mask" in i.name:
                feeds[i.name] = np.ones(shape, np.int64)
            elif "type" in i.name:
                feeds[i.name] = np.zeros(shape, np.int64)
            else:
                feeds[i.name] = rng.integers(0, 100, shape).astype(np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def main():
    reference, candidate = (ort.InferenceSession(p, providers=["CPUExecutionProvider"]) for p in sys.argv[1:3])
    feeds = feeds_for(reference)
    x = reference.run(None, feeds)[0].astype(np.float64).ravel()
    y = candidate.run(None, feeds)[0].astype(np.float64).ravel()
    cosine = x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
    print("max abs %.3e cosine %.6f" % (np.abs(x - y).max(), cosine))


if __name__ == "__main__":
    main()
