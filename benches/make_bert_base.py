"""Exports a random-init BERT-base (transformers' default BertConfig: 12 layers,
hidden 768, 110 M parameters, ~440 MB) for the speed and memory benchmarks.

usage: python benches/make_bert_base.py OUT.onnx
Not committed (too large): the benchmarks make it under target/bench-models/.
"""
import sys

import torch
from transformers import BertConfig, BertModel


class LastHidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state


def main():
    out = sys.argv[1]
    torch.manual_seed(0)
    model = LastHidden(BertModel(BertConfig())).eval()
    ids = torch.randint(0, 30522, (2, 16))
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    torch.onnx.export(model, args, out, input_names=names, output_names=["last_hidden_state"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)


if __name__ == "__main__":
    main()
