"""Checks raise-opset's table of op changes against the ONNX schemas.

usage: python3 check_opset_table.py TABLE.json

TABLE.json, as tests/portable.rs writes it from `raise_opset::OP_HISTORY`:
  {"from": 17, "to": 23, "ops": {"ReduceMean": [[18, "AxesToInput"]], "Abs": [], ...}}
For every op, against onnx.defs (onnx 1.18 or later, which knows opset 23):
- the versions in (from, to] at which ONNX registers a new schema of the op are
  exactly the table's (a missed change would be converted as "unchanged");
- "Introduced" at v: the op's first schema is v;
- "Types": nothing but type constraints changed (attributes with their
  defaults, inputs and outputs are equal);
- "Extended": attributes, inputs and outputs were only added (the old ones
  kept, with their defaults);
- "AxesToInput": the attribute `axes` became an input `axes`;
- "SplitNumOutputs": the attribute `num_outputs` appeared.
Whether an addition keeps the old meaning (its default) is the table's claim,
from the changelog; this script checks the shape of each change, not its prose.
Prints one line per mismatch and a closing count; exits 1 on any mismatch.
"""
import json
import sys

import onnx
import onnx.defs as defs


def schema(op, version):
    try:
        return defs.get_schema(op, version, "")
    except defs.SchemaError:
        return None


def signature(s):
    attributes = {name: (a.type, a.default_value.SerializeToString()) for name, a in s.attributes.items()}
    inputs = [(i.name, i.option) for i in s.inputs]
    outputs = [(o.name, o.option) for o in s.outputs]
    return attributes, inputs, outputs


def check_change(op, old, new, kind):
    """Why the change from schema `old` to `new` is not of `kind`, or None."""
    (old_attrs, old_in, old_out), (new_attrs, new_in, new_out) = signature(old), signature(new)
    if kind == "Types":
        if (old_attrs, old_in, old_out) != (new_attrs, new_in, new_out):
            return "more than types changed"
    elif kind == "Extended":
        dropped = [a for a, v in old_attrs.items() if new_attrs.get(a) != v]
        if dropped or new_in[: len(old_in)] != old_in or new_out[: len(old_out)] != old_out:
            return f"something was removed or changed, not only added (attributes {dropped})"
    elif kind == "AxesToInput":
        if "axes" not in old_attrs or "axes" in new_attrs or "axes" not in [n for n, _ in new_in]:
            return "axes did not move from an attribute to an input"
    elif kind == "SplitNumOutputs":
        if "num_outputs" in old_attrs or "num_outputs" not in new_attrs:
            return "num_outputs did not appear"
    else:
        return f"unknown kind {kind}"
    return None


def check_op(op, changes, first, last):
    problems = []
    versions = sorted({s.since_version for v in range(1, last + 1) if (s := schema(op, v)) is not None})
    if not versions:
        return [f"{op}: ONNX has no such op"]
    claimed = {v: kind for v, kind in changes}
    introduced = [v for v, kind in changes if kind == "Introduced"]
    if introduced and versions[0] != introduced[0]:
        problems.append(f"{op}: first schema at {versions[0]}, the table says introduced at {introduced[0]}")
    actual = [v for v in versions if first < v <= last]
    if sorted(claimed) != actual:
        problems.append(f"{op}: ONNX changed it at {actual}, the table says {sorted(claimed)}")
        return problems
    for v in actual:
        kind = claimed[v]
        if kind == "Introduced":
            continue
        old = schema(op, v - 1)
        why = check_change(op, old, schema(op, v), kind)
        if why:
            problems.append(f"{op}-{old.since_version} -> {op}-{v} ({kind}): {why}")
    return problems


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        table = json.load(f)
    first, last = table["from"], table["to"]
    if defs.onnx_opset_version() < last:
        sys.exit(f"onnx {onnx.__version__} knows opsets up to {defs.onnx_opset_version()}, not {last}")
    problems = []
    for op, changes in sorted(table["ops"].items()):
        problems += check_op(op, changes, first, last)
    for p in problems:
        print(p)
    print(f"onnx {onnx.__version__}: {len(table['ops'])} ops, {len(problems)} mismatches")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
