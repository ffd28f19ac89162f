#!/usr/bin/env python3
"""Build a corpus of tiny random-init transformer models exported to ONNX, for
``benches/coverage.py`` (fusion coverage of onnxopt and its peers).

Every model is built from a transformers ``*Config`` with random weights (fixed
seed; nothing is downloaded: no ``from_pretrained``, no hub, HF_HUB_OFFLINE=1;
every parameter jittered so that no norm is the identity and no bias zero),
wrapped so that its one output is ``last_hidden_state`` (encoders, vision and
audio encoders, encoder-decoders: the decoder's) or ``logits`` (decoder LLMs,
no KV cache), and exported with dynamic batch and sequence axes in several
variants:

* exporter: TorchScript (``torch.onnx.export(dynamo=False)``, opsets 14 and 17)
  and dynamo (``torch.onnx.export(dynamo=True)``, opsets 18 and 23);
* attention: ``attn_implementation="sdpa"`` and ``"eager"`` where the model
  has both (DeBERTa-v2 and MPNet have eager only);
* quantized by ONNX Runtime's own tool, from some fp32 exports:
  ``quantize_dynamic`` (``*.int8-dynamic.onnx``) and a static QDQ
  ``quantize_static`` calibrated on random batches (``*.qdq.onnx``).

Not every combination is made: ``ARCHS`` below lists, per architecture, the
variants exported and the ones quantized.  Each file is checked with
``onnx.checker`` (full check) and with onnxruntime on inputs of another batch
and sequence size than the export example, against PyTorch (max abs diff
recorded).  A variant that fails to export or check is recorded with its error
and the script goes on; each architecture runs in its own child process (with a
timeout), so not even a crash of an exporter stops the run.

Output (default ``~/.cache/onnxopt/corpus``): ``<arch>.<exporter><opset>.<attn>[.<quant>].onnx``
files, ``corpus.json`` (one entry per variant: file, architecture, family,
exporter, opset, attention implementation, quantized variant, status, error,
max abs diff, ...), and ``logs/<arch>.log`` (each child's full output).
With ``--only``, only those architectures are rebuilt and their entries of an
existing ``corpus.json`` are replaced; the others are kept.

Usage:  python benches/corpus.py [--out DIR] [--only NAME ...] [--list]

Environment (one command; torch, transformers, onnx, onnxscript and
onnxruntime in a dedicated venv beside the corpus):

    python3 -m venv ~/.cache/onnxopt/corpus/venv && ~/.cache/onnxopt/corpus/venv/bin/pip install torch transformers onnx==1.23.2 onnxruntime==1.32.0 onnxscript onnx-ir sentencepiece numpy

then run this script (and coverage.py) with ``~/.cache/onnxopt/corpus/venv/bin/python``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

# Nothing is fetched at run time: every model is built from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_OUT = Path.home() / ".cache" / "onnxopt" / "corpus"
SEED = 0
EXPORT_SHAPE = (3, 5)  # (batch, seq) of the example inputs used for tracing / export
CHECK_SHAPE = (2, 7)  # (batch, seq) of the inputs that compare ORT to torch: other sizes
MAX_ABS_DIFF = 1e-4  # an fp32 export further than this from torch is recorded as "mismatch"
JITTER = 0.02  # std of the noise added to every parameter after init (see jitter())
VOCAB = 1000
MAX_POS = 64  # learned position embeddings / rotary tables
IMAGE = 32  # image side in pixels (ViT, DeiT, CLIP vision, Swin)
PATCH = 8  # patch side: (32 / 8)^2 = 16 patches
MEL_BINS = 16  # Whisper: mel bins of input_features
AUDIO_POS = 16  # Whisper: max_source_positions; input_features has 2 * 16 frames (fixed)
PADDED = 2  # trailing positions of sequence 0 that the attention mask pads out
CHILD_TIMEOUT_S = 20 * 60  # one architecture, all its variants


# ---------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------
#
# A variant name is "<exporter><opset>-<attn>": e.g. "ts17-sdpa", "dynamo23-eager".
# `quantize` names the fp32 variants that are also quantized (dynamic and QDQ).

TS_SDPA = ("ts17-sdpa", "ts17-eager", "dynamo18-sdpa")  # default for models with SDPA
EAGER_ONLY = ("ts17-eager", "dynamo18-eager")  # models without an SDPA implementation


@dataclass(frozen=True)
class Arch:
    name: str  # file stem prefix, and the name --only takes
    family: str  # encoder | vision | audio | seq2seq | decoder (coverage.py picks peers' model types by it)
    summary: str  # model class + config, for humans
    build: Callable[[str], "object"]  # attn_implementation -> random-init nn.Module
    inputs: tuple[str, ...]  # forward() keyword arguments, in ONNX input order
    output: str  # "last_hidden_state" or "logits"
    variants: tuple[str, ...] = TS_SDPA
    quantize: tuple[str, ...] = ()
    max_seq: int | None = MAX_POS  # bound of the dynamo sequence Dims (learned positions need one)
    num_heads: int = 4  # attention heads and hidden size, recorded for peers that take them
    hidden_size: int = 32  # (ORT's transformers optimizer); 0 = not one value (Swin's stages)


def _text_encoder(config_cls: str, model_cls: str, pool: bool = True, **kw):
    """A BERT-like text encoder: hidden 32, 2 layers, 4 heads, ffn 64, vocab 1000."""
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=MAX_POS)
    common.update(kw)

    def build(attn: str):
        import transformers  # imported here: the parent process never imports torch
        cfg = getattr(transformers, config_cls)(**common, attn_implementation=attn)
        cls = getattr(transformers, model_cls)
        return cls(cfg, add_pooling_layer=False) if pool else cls(cfg)
    return build


def _config_model(config_cls: str, model_cls: str, common: dict, child: Callable | None = None):
    """Build `model_cls(config_cls(**common, attn_implementation=attn))`; `child` picks a submodule."""
    def build(attn: str):
        import transformers
        cfg = getattr(transformers, config_cls)(**common, attn_implementation=attn)
        model = getattr(transformers, model_cls)(cfg)
        return child(model) if child else model
    return build


def _decoder(config_cls: str, model_cls: str, **kw):
    """A decoder LLM: hidden 64, 2 layers, 4 heads / 2 KV heads, ffn 128, vocab 1000, no cache."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=MAX_POS, use_cache=False)
    common.update(kw)
    return _config_model(config_cls, model_cls, common)


def _vision(config_cls: str, model_cls: str, pool: bool, **kw):
    """A ViT-like image encoder: image 32x32, patch 8, hidden 32, 2 layers, 4 heads, ffn 64."""
    def build(attn: str):
        import transformers
        cfg = getattr(transformers, config_cls)(
            image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, attn_implementation=attn, **kw)
        cls = getattr(transformers, model_cls)
        return cls(cfg, add_pooling_layer=False) if pool else cls(cfg)
    return build


WHISPER = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=MEL_BINS,
               max_source_positions=AUDIO_POS, max_target_positions=MAX_POS, use_cache=False,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
ENC_MASK = ("input_ids", "attention_mask")
ENC_TYPES = ("input_ids", "attention_mask", "token_type_ids")
SEQ2SEQ = ("input_ids", "attention_mask", "decoder_input_ids")
DEC = ("input_ids", "attention_mask")

ARCHS = [
    # --- text encoders -----------------------------------------------------------------------------
    Arch("bert", "encoder", "BertModel, hidden 32, 2 layers, 4 heads, ffn 64, GELU (erf), no pooler",
         _text_encoder("BertConfig", "BertModel", type_vocab_size=2), ENC_TYPES, "last_hidden_state",
         TS_SDPA + ("ts14-sdpa", "ts14-eager", "dynamo23-sdpa"), quantize=("ts17-sdpa", "dynamo18-sdpa")),
    Arch("roberta", "encoder", "RobertaModel (positions from non-pad tokens), as bert, no token types",
         _text_encoder("RobertaConfig", "RobertaModel", type_vocab_size=1, pad_token_id=1,
                       max_position_embeddings=MAX_POS + 2), ENC_MASK, "last_hidden_state",
         quantize=("dynamo18-sdpa",)),
    Arch("distilbert", "encoder", "DistilBertModel, dim 32, 2 layers, 4 heads, ffn 64",
         _config_model("DistilBertConfig", "DistilBertModel", dict(
             vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=MAX_POS)),
         ENC_MASK, "last_hidden_state", TS_SDPA + ("ts14-sdpa",), quantize=("ts17-sdpa",)),
    Arch("albert", "encoder", "AlbertModel, embedding 16, hidden 32, 2 layers (shared), 4 heads, ffn 64, gelu_new",
         _text_encoder("AlbertConfig", "AlbertModel", embedding_size=16, type_vocab_size=2),
         ENC_TYPES, "last_hidden_state", TS_SDPA + ("ts14-sdpa",)),
    Arch("deberta-v2", "encoder", "DebertaV2Model as DeBERTa-v3 (relative c2p/p2c attention, 32 buckets, "
         "no absolute positions), hidden 32, 2 layers, 4 heads, ffn 64",
         _text_encoder("DebertaV2Config", "DebertaV2Model", pool=False, type_vocab_size=0,
                       relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=32,
                       max_relative_positions=-1, position_biased_input=False, norm_rel_ebd="layer_norm",
                       share_att_key=True),
         ENC_MASK, "last_hidden_state", EAGER_ONLY),
    Arch("electra", "encoder", "ElectraModel (discriminator), embedding 16, hidden 32, 2 layers, 4 heads, ffn 64",
         _text_encoder("ElectraConfig", "ElectraModel", pool=False, embedding_size=16, type_vocab_size=2),
         ENC_TYPES, "last_hidden_state"),
    Arch("mpnet", "encoder", "MPNetModel (relative position buckets), hidden 32, 2 layers, 4 heads, ffn 64",
         _text_encoder("MPNetConfig", "MPNetModel", relative_attention_num_buckets=32,
                       max_position_embeddings=MAX_POS + 2),
         ENC_MASK, "last_hidden_state", EAGER_ONLY),
    Arch("xlm-roberta", "encoder", "XLMRobertaModel, as roberta",
         _text_encoder("XLMRobertaConfig", "XLMRobertaModel", type_vocab_size=1, pad_token_id=1,
                       max_position_embeddings=MAX_POS + 2), ENC_MASK, "last_hidden_state"),
    Arch("clip-text", "encoder", "CLIPTextModel (causal + padding mask, quick_gelu), hidden 32, 2 layers, 4 heads, ffn 64",
         _config_model("CLIPTextConfig", "CLIPTextModel", dict(
             vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=MAX_POS, projection_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
         ENC_MASK, "last_hidden_state", TS_SDPA + ("ts14-sdpa",)),
    # --- vision / audio encoders (batch is dynamic, the image / frames are not) ---------------------
    Arch("vit", "vision", "ViTModel, image 32, patch 8, hidden 32, 2 layers, 4 heads, ffn 64, no pooler",
         _vision("ViTConfig", "ViTModel", True), ("pixel_values",), "last_hidden_state",
         TS_SDPA + ("ts14-sdpa", "dynamo23-sdpa"), quantize=("ts17-sdpa",), max_seq=None),
    Arch("deit", "vision", "DeiTModel (CLS + distillation tokens), as vit",
         _vision("DeiTConfig", "DeiTModel", True), ("pixel_values",), "last_hidden_state", max_seq=None),
    Arch("swin", "vision", "SwinModel, image 32, patch 2, window 4, embed 16, depths [2, 2], heads [2, 4] "
         "(shifted windows, relative position bias), no pooler",
         _config_model("SwinConfig", "SwinModel", dict(
             image_size=IMAGE, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
             window_size=4, mlp_ratio=2.0), child=None),
         ("pixel_values",), "last_hidden_state", max_seq=None, num_heads=0, hidden_size=0),
    Arch("clip-vision", "vision", "CLIPVisionModel (quick_gelu, pre-LN), as vit",
         _config_model("CLIPVisionConfig", "CLIPVisionModel", dict(
             image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, projection_dim=32)),
         ("pixel_values",), "last_hidden_state", max_seq=None),
    Arch("whisper-encoder", "audio", f"WhisperEncoder, {MEL_BINS} mel bins x {2 * AUDIO_POS} frames, d_model 32, "
         "2 layers, 4 heads, ffn 64",
         _config_model("WhisperConfig", "WhisperModel", WHISPER, child=lambda m: m.get_encoder()),
         ("input_features",), "last_hidden_state", TS_SDPA + ("ts14-sdpa", "dynamo23-sdpa"),
         quantize=("ts17-sdpa",), max_seq=None),
    # --- encoder-decoders: output = the decoder's last_hidden_state -------------------------------
    Arch("whisper", "seq2seq", "WhisperModel (encoder + decoder with cross-attention), as whisper-encoder, "
         "2 decoder layers",
         _config_model("WhisperConfig", "WhisperModel", WHISPER), ("input_features", "decoder_input_ids"),
         "last_hidden_state"),
    Arch("bart", "seq2seq", "BartModel, d_model 32, 2+2 layers, 4 heads, ffn 64, vocab 1000",
         _config_model("BartConfig", "BartModel", dict(
             vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=MAX_POS,
             use_cache=False, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)),
         SEQ2SEQ, "last_hidden_state", TS_SDPA + ("ts14-sdpa",)),
    Arch("t5", "seq2seq", "T5Model, d_model 32, 2+2 layers, 4 heads x 8, ffn 64 (relu), relative buckets 16, vocab 1000",
         _config_model("T5Config", "T5Model", dict(
             vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
             relative_attention_num_buckets=16, relative_attention_max_distance=32, use_cache=False,
             decoder_start_token_id=0)),
         SEQ2SEQ, "last_hidden_state", TS_SDPA + ("ts14-sdpa", "dynamo23-sdpa"), quantize=("ts17-sdpa",),
         max_seq=None),
    # --- decoder LLMs: output = logits, no KV cache -----------------------------------------------
    Arch("gpt2", "decoder", "GPT2LMHeadModel, hidden 32, 2 layers, 4 heads, gelu_new, vocab 1000",
         _config_model("GPT2Config", "GPT2LMHeadModel", dict(
             vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=MAX_POS, use_cache=False,
             bos_token_id=0, eos_token_id=0)),
         DEC, "logits", TS_SDPA + ("ts14-sdpa", "dynamo23-sdpa"), quantize=("ts17-sdpa",)),
    Arch("gpt-neox", "decoder", "GPTNeoXForCausalLM, hidden 64, 2 layers, 4 heads, partial rotary (0.25), "
         "parallel residual, vocab 1000",
         _config_model("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
             vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=MAX_POS, use_cache=False, bos_token_id=0, eos_token_id=0)),
         DEC, "logits", hidden_size=64),
    Arch("llama", "decoder", "LlamaForCausalLM, hidden 64, 2 layers, 4 heads / 2 KV heads, ffn 128, RMSNorm, rotary",
         _decoder("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2),
         DEC, "logits", TS_SDPA + ("ts14-sdpa", "dynamo23-sdpa"), quantize=("dynamo18-sdpa",), hidden_size=64),
    Arch("qwen2", "decoder", "Qwen2ForCausalLM (Q/K/V biases), as llama, tied embeddings",
         _decoder("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2, tie_word_embeddings=True),
         DEC, "logits", TS_SDPA + ("dynamo23-sdpa",), quantize=("ts17-sdpa",), hidden_size=64),
    Arch("qwen3", "decoder", "Qwen3ForCausalLM (RMSNorm on Q and K heads), as llama, head_dim 16",
         _decoder("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
         DEC, "logits", hidden_size=64),
    Arch("phi3", "decoder", "Phi3ForCausalLM (packed qkv_proj and gate_up_proj), as llama",
         _decoder("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, pad_token_id=0),
         DEC, "logits", hidden_size=64),
    Arch("mistral", "decoder", "MistralForCausalLM, as llama, head_dim 16, no sliding window",
         _decoder("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, head_dim=16, sliding_window=None),
         DEC, "logits", hidden_size=64),
    Arch("gemma", "decoder", "GemmaForCausalLM (RMSNorm with 1 + w, gelu_pytorch_tanh GeGLU, scaled embeddings), "
         "as llama, head_dim 16",
         _decoder("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=2, head_dim=16,
                  hidden_activation="gelu_pytorch_tanh"),
         DEC, "logits", TS_SDPA + ("dynamo23-sdpa",), hidden_size=64),
]
ARCH_BY_NAME = {a.name: a for a in ARCHS}


# ---------------------------------------------------------------------------
# Records (one per corpus file, written to corpus.json)
# ---------------------------------------------------------------------------


@dataclass
class Entry:
    file: str
    arch: str
    family: str
    exporter: str  # "torchscript" | "dynamo"
    opset: int  # the opset asked for (the file's own ai.onnx opset is `file_opset`)
    attention: str  # attn_implementation: "sdpa" | "eager"
    quantized: str | None  # None | "int8-dynamic" | "qdq"
    source: str | None  # the fp32 file a quantized one was made from
    inputs: list[str]
    output: str
    num_heads: int = 0
    hidden_size: int = 0
    status: str = "pending"  # ok | mismatch (exported, but further than MAX_ABS_DIFF from torch) |
    #                          export-failed | check-failed | skipped
    error: str = ""
    max_abs_diff: float | None = None  # ORT vs torch, CHECK_SHAPE inputs
    file_opset: int | None = None
    nodes: int | None = None
    size: int | None = None
    seconds: float | None = None  # export + check
    summary: str = ""
    ops: dict = field(default_factory=dict)  # op_type histogram of the file


def new_entry(arch: Arch, variant: str, quant: str | None = None, **fields) -> Entry:
    """The record of one file: variant `variant` of `arch`, quantized as `quant` (or fp32)."""
    exporter, opset, attn = parse_variant(variant)
    return Entry(file_name(arch.name, variant, quant), arch.name, arch.family, exporter, opset, attn, quant,
                 file_name(arch.name, variant) if quant else None, list(arch.inputs), arch.output,
                 arch.num_heads, arch.hidden_size, summary=arch.summary, **fields)


def parse_variant(variant: str) -> tuple[str, int, str]:
    m = re.fullmatch(r"(ts|dynamo)(\d+)-(sdpa|eager)", variant)
    if not m:
        raise ValueError(f"bad variant {variant!r}")
    return ("torchscript" if m[1] == "ts" else "dynamo"), int(m[2]), m[3]


def file_name(arch: str, variant: str, quant: str | None = None) -> str:
    exporter, opset, attn = parse_variant(variant)
    stem = f"{arch}.{'ts' if exporter == 'torchscript' else 'dynamo'}{opset}.{attn}"
    return f"{stem}.{quant}.onnx" if quant else f"{stem}.onnx"


def describe(e: BaseException) -> str:
    """`Type: first line` of the exception and of its root cause (exporters wrap errors)."""
    def one(x: BaseException) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(x))  # drop ANSI colours
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return f"{type(x).__name__}: {lines[0][:300] if lines else ''}"

    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return one(e) if root is e else f"{one(e)} <- {one(root)}"


# ---------------------------------------------------------------------------
# Child process: build, export and check every variant of one architecture
# ---------------------------------------------------------------------------


def make_inputs(arch: Arch, batch: int, seq: int, seed: int):
    """Random numpy inputs: token ids in [0, VOCAB), token types in {0, 1}, an attention
    mask that pads the last PADDED positions of sequence 0, float images / mel frames."""
    import numpy as np
    rng = np.random.default_rng(seed)
    out = []
    for name in arch.inputs:
        if name in ("input_ids", "decoder_input_ids"):
            # Avoid ids 0..2 (pad / bos / eos in some configs), so no sequence is "all padding".
            out.append(rng.integers(3, VOCAB, (batch, seq), dtype=np.int64))
        elif name == "token_type_ids":
            out.append(rng.integers(0, 2, (batch, seq), dtype=np.int64))
        elif name == "attention_mask":
            mask = np.ones((batch, seq), dtype=np.int64)
            mask[0, seq - PADDED:] = 0  # right padding on the first sequence
            out.append(mask)
        elif name == "pixel_values":
            out.append(rng.standard_normal((batch, 3, IMAGE, IMAGE), dtype=np.float32))
        elif name == "input_features":
            out.append(rng.standard_normal((batch, MEL_BINS, 2 * AUDIO_POS), dtype=np.float32))
        else:
            raise ValueError(f"unknown input {name!r}")
    return out


def dim_names(name: str) -> dict[int, str]:
    """Dynamic axes of an input and their symbolic names (images and mel frames: batch only)."""
    if name in ("pixel_values", "input_features"):
        return {0: "batch"}
    if name == "decoder_input_ids":
        return {0: "batch", 1: "decoder_sequence"}
    return {0: "batch", 1: "sequence"}


def output_dims(arch: Arch) -> dict[int, str]:
    """The output follows the decoder input if there is one, else the first input."""
    if "decoder_input_ids" in arch.inputs:
        return dim_names("decoder_input_ids")
    if arch.inputs[0] in ("pixel_values", "input_features"):
        return {0: "batch"}
    return {0: "batch", 1: "sequence"}


def jitter(model) -> None:
    """Add N(0, JITTER^2) noise to every parameter.  transformers' init leaves norm weights at 1
    and biases at 0: such a model has identity norms and no-op bias Adds that an optimizer may
    drop (or an exporter's CSE merge: GPT-NeoX's two LayerNorms of one input), which a trained
    model never has; the noise makes every weight distinct and non-trivial, as in real models."""
    import torch
    gen = torch.Generator().manual_seed(SEED + 7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * JITTER)


def make_wrapper(model, input_names: tuple[str, ...]):
    import torch

    class FirstOutput(torch.nn.Module):
        """Calls the model with keyword inputs; returns its first output (last_hidden_state or
        logits: no loss without labels, no cache with use_cache=False)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            kwargs = dict(zip(input_names, args))
            return self.model(**kwargs, return_dict=False)[0]

    return FirstOutput().eval()


def export_torchscript(module, arch: Arch, args, path: Path, opset: int) -> None:
    import onnx
    import torch
    axes = {name: dim_names(name) for name in arch.inputs}
    axes[arch.output] = output_dims(arch)
    torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                      input_names=list(arch.inputs), output_names=[arch.output],
                      dynamic_axes=axes, do_constant_folding=True)
    # Its shape inference can leave static output dims symbolic (e.g. the hidden size as
    # "LayerNormalization_dim_2"): declare their sizes.  Load + save also inlines any
    # external data the exporter wrote.
    model = onnx.load(str(path))
    with torch.no_grad():
        static = tuple(module(*args).shape)
    for axis, dim in enumerate(model.graph.output[0].type.tensor_type.shape.dim):
        if axis not in axes[arch.output]:
            dim.dim_value = static[axis]
    save_inline(model, path)


def export_dynamo(module, arch: Arch, args, path: Path, opset: int) -> None:
    from torch.export import Dim
    import torch
    # Named Dims shared between inputs become the ONNX dim_params; a sequence that indexes
    # learned position embeddings is bounded by their count (torch.export rejects an
    # unbounded Dim there).
    dims = {"batch": Dim("batch"), "sequence": Dim("sequence", max=arch.max_seq),
            "decoder_sequence": Dim("decoder_sequence", max=arch.max_seq)}
    # forward(*args) has one (variadic) parameter, so its shapes are one tuple.
    shapes = (tuple({axis: dims[d] for axis, d in dim_names(name).items()} for name in arch.inputs),)
    program = torch.onnx.export(module, tuple(args), dynamo=True, opset_version=opset,
                                input_names=list(arch.inputs), output_names=[arch.output],
                                dynamic_shapes=shapes, optimize=True, verbose=False)
    model = program.model_proto
    # Source stack traces hold this machine's absolute paths: drop them (reproducible files).
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    save_inline(model, path)


def save_inline(model, path: Path) -> None:
    """One self-contained file: every tensor inline, no stray external-data file beside it."""
    import onnx
    onnx.save(model, str(path), save_as_external_data=False)
    for stray in (path.with_name(path.name + ".data"), path.with_suffix(".onnx_data")):
        stray.unlink(missing_ok=True)


def ort_session(path: Path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # polite on a shared 2-core machine; deterministic too
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def inspect_file(path: Path, entry: Entry) -> None:
    import collections
    import onnx
    model = onnx.load(str(path))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer), "external data"
    onnx.checker.check_model(model, full_check=True)
    entry.file_opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    entry.nodes = len(model.graph.node)
    entry.size = path.stat().st_size
    entry.ops = dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))
    names = [i.name for i in model.graph.input]
    assert names == list(entry.inputs), f"ONNX inputs {names} != {list(entry.inputs)}"


def compare_to_torch(path: Path, expected, feeds: dict) -> float:
    import numpy as np
    (actual,) = ort_session(path).run(None, feeds)
    assert actual.shape == expected.shape, f"ORT shape {actual.shape} != torch {expected.shape}"
    return float(np.abs(actual - expected).max())


def quantize(arch: Arch, src: Path, dst: Path, kind: str) -> None:
    """ORT's own quantization, as users call it (the same settings as fixtures/quantized.py)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    class RandomBatches(CalibrationDataReader):
        """Calibration data: 8 seeded random batches of CHECK_SHAPE."""

        def __init__(self):
            self.batches = [dict(zip(arch.inputs, make_inputs(arch, *CHECK_SHAPE, seed=100 + i))) for i in range(8)]

        def get_next(self):
            return self.batches.pop() if self.batches else None

    if kind == "int8-dynamic":
        # Per tensor, QUInt8 weights: MatMulInteger + DynamicQuantizeLinear.
        quantize_dynamic(src, dst, weight_type=QuantType.QUInt8)
    else:
        # QDQ around every MatMul, MinMax calibration.
        reader = RandomBatches()
        quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def make_and_check(entry: Entry, path: Path, make: Callable[[], None], expected: Callable, feeds: dict, bound: float | None) -> None:
    """Writes one file with `make`, then checks it: onnx.checker, and ORT against torch's outputs
    (`expected()`, ready once `make` ran), held to `bound` (None: the difference is recorded, not held to anything: int8).  Every
    failure is recorded in `entry` (status and error), never raised; the time taken too."""
    start = time.perf_counter()
    try:
        make()
    except Exception as e:  # noqa: BLE001 -- an exporter failing is a result, not a crash
        traceback.print_exc()
        entry.status, entry.error = "export-failed", describe(e)
        path.unlink(missing_ok=True)
    else:
        try:
            inspect_file(path, entry)
            entry.max_abs_diff = compare_to_torch(path, expected(), feeds)
            entry.status = "ok" if bound is None or entry.max_abs_diff < bound else "mismatch"
            if entry.status == "mismatch":
                entry.error = f"max abs diff {entry.max_abs_diff:.3g} >= {bound:g} (file kept)"
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            # The file is kept (for a look at it), but coverage.py skips check-failed entries.
            entry.status, entry.error = "check-failed", describe(e)
    entry.seconds = round(time.perf_counter() - start, 2)
    print(f"    {entry.status} {entry.error} ({entry.seconds} s)", flush=True)


def run_arch(arch: Arch, out: Path) -> list[Entry]:
    """Every variant of one architecture (in the child process)."""
    import logging
    import warnings
    import torch
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    torch.set_num_threads(1)

    entries: list[Entry] = []
    modules = {}  # attn -> wrapped module (same seed: same weights for eager and sdpa)
    example_np = make_inputs(arch, *EXPORT_SHAPE, seed=SEED)
    check_np = make_inputs(arch, *CHECK_SHAPE, seed=SEED + 1)
    feeds = dict(zip(arch.inputs, check_np))
    expected = {}

    def export(exporter: str, opset: int, attn: str, path: Path) -> None:
        if attn not in modules:
            torch.manual_seed(SEED)
            model = arch.build(attn).eval()
            jitter(model)
            modules[attn] = make_wrapper(model, arch.inputs)
            with torch.no_grad():
                expected[attn] = modules[attn](*[torch.from_numpy(a) for a in check_np]).numpy()
        args = tuple(torch.from_numpy(a) for a in example_np)
        with torch.no_grad():
            (export_torchscript if exporter == "torchscript" else export_dynamo)(modules[attn], arch, args, path, opset)

    for variant in arch.variants:
        exporter, opset, attn = parse_variant(variant)
        entry = new_entry(arch, variant)
        entries.append(entry)
        path = out / entry.file
        path.unlink(missing_ok=True)
        print(f"--- {entry.file}", flush=True)
        make_and_check(entry, path, lambda: export(exporter, opset, attn, path), lambda: expected[attn], feeds, MAX_ABS_DIFF)

    # Quantized variants, from the fp32 files that exported and checked.
    for variant in arch.quantize:
        source = next((e for e in entries if e.file == file_name(arch.name, variant)), None)
        _, _, attn = parse_variant(variant)
        for kind in ("int8-dynamic", "qdq"):
            entry = new_entry(arch, variant, kind)
            entries.append(entry)
            path = out / entry.file
            path.unlink(missing_ok=True)
            print(f"--- {entry.file}", flush=True)
            if source is None or source.status not in ("ok", "mismatch"):
                entry.status, entry.error = "skipped", f"source {entry.source} was not exported"
                continue
            # quantization error, recorded for information: int8 is not held to MAX_ABS_DIFF
            make_and_check(entry, path, lambda: quantize(arch, out / source.file, path, kind), lambda: expected[attn], feeds, None)
    return entries


def child_main(arch_name: str, out: Path, result: Path) -> int:
    entries = run_arch(ARCH_BY_NAME[arch_name], out)
    result.write_text(json.dumps([asdict(e) for e in entries], indent=1))
    return 0


# ---------------------------------------------------------------------------
# Parent process: one child per architecture, then corpus.json
# ---------------------------------------------------------------------------


def versions(python: str) -> dict[str, str]:
    code = ("import sys, json, torch, transformers, onnx, onnxruntime, onnxscript; "
            "print(json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__, "
            "'transformers': transformers.__version__, 'onnx': onnx.__version__, "
            "'onnxscript': onnxscript.__version__, 'onnxruntime': onnxruntime.__version__}))")
    try:
        return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300).stdout)
    except Exception as e:  # noqa: BLE001
        return {"error": describe(e)}


def failed_entries(arch: Arch, status: str, error: str) -> list[Entry]:
    """Placeholder entries for every file of an architecture whose child died."""
    out = [new_entry(arch, variant, status=status, error=error) for variant in arch.variants]
    out += [new_entry(arch, variant, kind, status=status, error=error)
            for variant in arch.quantize for kind in ("int8-dynamic", "qdq")]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="architectures to (re)build; others are kept")
    parser.add_argument("--list", action="store_true", help="list the architectures and their variants, then exit")
    parser.add_argument("--timeout", type=int, default=CHILD_TIMEOUT_S, help="seconds per architecture")
    parser.add_argument("--child", metavar="NAME", help=argparse.SUPPRESS)  # internal: one architecture
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out: Path = args.out.expanduser().resolve()

    if args.child:
        return child_main(args.child, out, args.result)
    if args.list:
        for a in ARCHS:
            print(f"{a.name:<16} {a.family:<8} {' '.join(a.variants)}"
                  + (f"  quantized: {' '.join(a.quantize)}" if a.quantize else ""))
        return 0
    unknown = [n for n in args.only or [] if n not in ARCH_BY_NAME]
    if unknown:
        print(f"unknown architecture(s) {unknown}; known: {list(ARCH_BY_NAME)}", file=sys.stderr)
        return 2
    archs = [a for a in ARCHS if not args.only or a.name in args.only]

    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    index_path = out / "corpus.json"
    index = json.loads(index_path.read_text()) if index_path.exists() and args.only else {}
    kept = [e for e in index.get("models", []) if e["arch"] not in {a.name for a in archs}]

    start = time.perf_counter()
    new: list[dict] = []
    for arch in archs:
        t0 = time.perf_counter()
        result = out / "logs" / f"{arch.name}.json"
        result.unlink(missing_ok=True)
        log = out / "logs" / f"{arch.name}.log"
        print(f"=== {arch.name} ({len(arch.variants)} exports, {2 * len(arch.quantize)} quantized)", flush=True)
        try:
            with open(log, "w") as f:
                proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--child", arch.name,
                                       "--result", str(result)], stdout=f, stderr=subprocess.STDOUT,
                                      timeout=args.timeout)
            if proc.returncode != 0 or not result.exists():
                tail = [l for l in log.read_text(errors="replace").splitlines() if l.strip()][-1:] or [""]
                entries = [asdict(e) for e in failed_entries(
                    arch, "export-failed", f"child exited with {proc.returncode}: {tail[0][:300]}")]
            else:
                entries = json.loads(result.read_text())
        except subprocess.TimeoutExpired:
            entries = [asdict(e) for e in failed_entries(arch, "export-failed", f"timed out after {args.timeout} s")]
        new += entries
        for e in entries:
            diff = f"{e['max_abs_diff']:.1e}" if e["max_abs_diff"] is not None else "-"
            print(f"    {e['file']:<42} {e['status']:<13} {diff:>8}  {e['error'][:150]}", flush=True)
        print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)

    order = {a.name: i for i, a in enumerate(ARCHS)}
    models = sorted(kept + new, key=lambda e: order.get(e["arch"], len(order)))  # stable: keeps variant order
    index = {
        "description": "Tiny random-init transformer models exported to ONNX by benches/corpus.py",
        "seed": SEED, "vocab": VOCAB, "export_shape": EXPORT_SHAPE, "check_shape": CHECK_SHAPE,
        "padded": PADDED, "max_abs_diff": MAX_ABS_DIFF,
        "versions": versions(sys.executable),
        "seconds": round(time.perf_counter() - start, 1) if not args.only else index.get("seconds"),
        "models": models,
    }
    index_path.write_text(json.dumps(index, indent=1) + "\n")

    counts: dict[str, int] = {}
    for e in models:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    print(f"\nwrote {index_path}: {len(models)} entries {counts} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
