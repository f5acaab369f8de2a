"""``distill inspect MODEL``: every layer of a model with its op, output shape, parameters,
MACs and whether it can serve as a feature tap, then the totals.

``MODEL`` is a checkpoint prefix (Module-API ``PREFIX-symbol.json`` + ``PREFIX-0000.params``
or a Gluon ``export()`` pair), a run folder (its exported student), or a registered model
name (built randomly initialized). ``--json`` prints the same data as JSON.
"""
import json
import logging
import os
import sys

import mxnet as mx

from .errors import UserError
from .graphio import load_pair, symbol_file
from .report import format_table, human
from .runfolder import RunFolder

__all__ = ["inspect_model", "add_arguments", "main"]
_LOGGER = logging.getLogger(__name__)


def _parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"--input-shape {text!r}: expected C,H,W, e.g. 1,28,28 or 3,224,224")
    return shape


def _load(model, epoch, input_shape, classes):
    """→ (logits symbol, input shape (C, H, W), description)."""
    if os.path.isdir(model):
        folder = RunFolder(model)
        prefix = folder.model_prefix
        if not os.path.isfile(symbol_file(prefix)):
            raise UserError(f"{model} is a folder without {os.path.basename(symbol_file(prefix))}: "
                            f"pass a run folder, a checkpoint prefix or a model name.")
        if input_shape is None:
            shape = folder.read_metrics().get("data", {}).get("input_shape")
            input_shape = tuple(shape) if shape else None
        sym, _ = load_pair(prefix, 0, what="model")
        return sym, input_shape, f"run folder {model}"
    if os.path.isfile(symbol_file(model)):
        sym, _ = load_pair(model, epoch, what="checkpoint")
        return sym, input_shape, f"checkpoint {model} (epoch {epoch})"
    from students import STUDENTS, build_student
    if model in STUDENTS:
        shape = input_shape or (3, 224, 224)
        net = build_student(model, shape[0], classes, shape[1:], seed=0)
        net.hybridize()
        return net(mx.sym.var("data")), shape, f"model {model} (random weights)"
    raise UserError(f"{model!r} is neither a checkpoint prefix ({symbol_file(model)} does not exist), "
                    f"a run folder, nor a registered model (`distill list` shows them).")


def inspect_model(model, epoch=0, input_shape=None, classes=10):
    """Rows (one per operator) and totals for ``model``; see the module docstring."""
    from .modelinfo import layer_table
    from .taps import tap_names
    sym, shape, desc = _load(model, epoch, input_shape, classes)
    if shape is None:
        shape = _guess_shape(sym)
    try:
        rows = layer_table(sym, (1,) + tuple(shape))
    except mx.base.MXNetError as e:
        raise UserError(f"{desc}: cannot infer shapes for input (1, {', '.join(map(str, shape))}): "
                        f"{str(e).splitlines()[0]}. Pass --input-shape C,H,W.") from None
    taps = set(tap_names(sym))
    for r in rows:
        r["tap"] = r["name"] in taps
        r.pop("attrs", None)
    totals = {"layers": len(rows), "params": sum(r["params"] for r in rows),
              "macs": sum(r["macs"] for r in rows), "input_shape": list(shape),
              "output_shape": list(rows[-1]["shape"]) if rows else []}
    return {"model": desc, "rows": rows, "totals": totals}


def _guess_shape(sym):
    """A Module-API graph does not store its input size: take the first conv's channels and
    try common sizes."""
    for size in (224, 32, 28):
        for c in (3, 1):
            try:
                sym.infer_shape(data=(1, c, size, size))
                return (c, size, size)
            except mx.base.MXNetError:
                continue
    raise UserError("cannot guess the input shape of the graph: pass --input-shape C,H,W")


def add_arguments(p):
    p.add_argument("model", help="checkpoint prefix, run folder, or registered model name")
    p.add_argument("--epoch", type=int, default=0, help="checkpoint epoch (PREFIX-%%04d.params)")
    p.add_argument("--input-shape", default=None, help="C,H,W of one input (default: from the run "
                   "folder, else guessed)")
    p.add_argument("--classes", type=int, default=10, help="classes, for a model name")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args):
    shape = _parse_shape(args.input_shape) if args.input_shape else None
    info = inspect_model(args.model, args.epoch, shape, args.classes)
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        print()
        return 0
    rows = [[r["name"], r["op"], "×".join(map(str, r["shape"][1:])), human(r["params"]) if r["params"] else "",
             human(r["macs"]) if r["macs"] else "", "yes" if r["tap"] else ""] for r in info["rows"]]
    t = info["totals"]
    print(format_table(["layer", "op", "output", "params", "MACs", "tap"], rows,
                       title=f"{info['model']}, input {'×'.join(map(str, t['input_shape']))}"))
    print(f"\ntotal: {t['layers']} layers, {human(t['params'])} parameters ({t['params']:,}), "
          f"{human(t['macs'])} MACs per image ({t['macs']:,}), output {t['output_shape']}")
    return 0
