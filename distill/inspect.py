"""``distill inspect MODEL``: every layer of a model with its op, output shape, parameters,
MACs and whether it can serve as a feature tap, then the totals.

``MODEL`` is a checkpoint prefix (Module-API ``PREFIX-symbol.json`` + ``PREFIX-0000.params``
or a Gluon ``export()`` pair), a run folder (its exported student), or a registered model
name (built randomly initialized). ``--json`` prints the same data as JSON.

Without ``--input-shape`` the input is never guessed: the channels come from the first layer's
weights, the size from layers whose parameters pin it (a FullyConnected on a flattened map, a
GDC head); when the graph does not pin it, the command says so and asks for the shape. A shape
the parameters contradict is an error naming the parameter. Notes after the table say how the
graph was normalised on load and whether it normalises its input itself.
"""
import json
import logging
import os
import sys

import mxnet as mx

from .errors import UserError
from .graphio import check_params, load_pair, mxnet_reason, symbol_file
from .graphnorm import describe_shape, input_channels, input_normalisation, pinned_size
from .report import format_table, human
from .runfolder import RunFolder

__all__ = ["inspect_model", "infer_input_shape", "add_arguments", "main"]
_LOGGER = logging.getLogger(__name__)


def _parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"--input-shape {text!r}: expected C,H,W, e.g. 1,28,28 or 3,224,224")
    return shape


def _load(model, epoch, input_shape, classes, notes):
    """→ (logits symbol, params or None, input shape (C, H, W) or None, description)."""
    if os.path.isdir(model):
        folder = RunFolder(model)
        prefix = folder.model_prefix
        if not os.path.isfile(symbol_file(prefix)):
            raise UserError(f"{model} is a folder without {os.path.basename(symbol_file(prefix))}: "
                            f"pass a run folder, a checkpoint prefix or a model name.")
        if input_shape is None:
            shape = folder.read_metrics().get("data", {}).get("input_shape")
            input_shape = tuple(shape) if shape else None
            if input_shape:
                notes.append(f"input {describe_shape(input_shape)}: the run's data (metrics file)")
        sym, params = load_pair(prefix, 0, what="model", notes=notes)
        return sym, params, input_shape, f"run folder {model}"
    if os.path.isfile(symbol_file(model)):
        sym, params = load_pair(model, epoch, what="checkpoint", notes=notes)
        return sym, params, input_shape, f"checkpoint {model} (epoch {epoch})"
    from students import STUDENTS, build_student
    if model in STUDENTS:
        shape = input_shape or (3, 224, 224)
        if input_shape is None:
            notes.append(f"input {describe_shape(shape)}: the default for a model name "
                         f"(--input-shape C,H,W builds it for another)")
        net = build_student(model, shape[0], classes, shape[1:], seed=0)
        net.hybridize()
        return net(mx.sym.var("data")), None, shape, f"model {model} (random weights)"
    raise UserError(f"{model!r} is neither a checkpoint prefix ({symbol_file(model)} does not exist), "
                    f"a run folder, nor a registered model (`distill list` shows them).")


def inspect_model(model, epoch=0, input_shape=None, classes=10):
    """Rows (one per operator), totals and notes for ``model``; see the module docstring.

    Raises
    ------
    UserError
        The input shape cannot be inferred (and none was given), or the params contradict it.
    """
    from .modelinfo import layer_table
    from .taps import tap_names
    notes = []
    sym, params, shape, desc = _load(model, epoch, input_shape, classes, notes)
    if params is not None:
        if shape is None:
            shape = infer_input_shape(sym, params, desc, notes)
        # a shape the params contradict is an error naming the parameter, never a described model
        check_params(sym, params, "data", (1,) + tuple(shape), where=desc, option="--input-shape")
        norm = input_normalisation(sym, params)
        if norm is not None:
            notes.append(norm.advice())
    try:
        rows = layer_table(sym, (1,) + tuple(shape))
    except mx.base.MXNetError as e:
        raise UserError(f"{desc}: cannot infer shapes for input (1, {', '.join(map(str, shape))}): "
                        f"{mxnet_reason(e)}. Pass --input-shape C,H,W.") from None
    taps = set(tap_names(sym))
    for r in rows:
        r["tap"] = r["name"] in taps
        r.pop("attrs", None)
    totals = {"layers": len(rows), "params": sum(r["params"] for r in rows),
              "macs": sum(r["macs"] for r in rows), "input_shape": list(shape),
              "output_shape": list(rows[-1]["shape"]) if rows else []}
    return {"model": desc, "rows": rows, "totals": totals, "notes": notes}


def infer_input_shape(sym, params, desc, notes=None):
    """``(C, H, W)`` from the parameters: the channels from the first layer's weights, the size
    from layers that pin it (a FullyConnected on a flattened map, a GDC head).

    Raises
    ------
    UserError
        When the parameters do not tell (asks for ``--input-shape``).
    """
    first = input_channels(sym, params)
    if first is None:
        raise UserError(f"{desc}: the input channels cannot be read from the parameters (no "
                        f"convolution, BatchNorm or PReLU reads the input): pass --input-shape C,H,W.")
    channels, layer, pname, pshape = first
    pinned = pinned_size(sym, params, channels)
    if pinned is None:
        raise UserError(f"{desc}: the input has {channels} channel{'s' if channels > 1 else ''} "
                        f"(parameter {pname!r} {pshape} of the first layer {layer!r}), but the "
                        f"parameters do not fix its size (a fully convolutional graph with global "
                        f"pooling runs at any size): pass --input-shape {channels},H,W with the "
                        f"size it was trained on.")
    size, lo, hi = pinned
    if notes is not None:
        run = f"only {lo}..{hi} fit the parameters; {size} is the one the strides divide" \
            if lo != hi else "the only size the parameters fit"
        notes.append(f"input {channels}×{size}×{size} inferred: {channels} channel"
                     f"{'s' if channels != 1 else ''} from {pname} "
                     f"{pshape} (first layer {layer}), {size}×{size} pinned by the graph ({run}); "
                     f"--input-shape overrides")
    return channels, size, size


def add_arguments(p):
    p.add_argument("model", help="checkpoint prefix, run folder, or registered model name")
    p.add_argument("--epoch", type=int, default=0, help="checkpoint epoch (PREFIX-%%04d.params)")
    p.add_argument("--input-shape", default=None, help="C,H,W of one input (default: from the run "
                   "folder, else read from the parameters where they fix it)")
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
    for note in info["notes"]:
        print(f"note: {note}.")
    return 0
