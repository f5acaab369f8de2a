"""Graph I/O: everything about (symbol, params) pairs, in one place.

A *pair* is ``PREFIX-symbol.json`` + ``PREFIX-%04d.params``, written by Gluon's ``export()``
(plain names) or by the Module API (``arg:``/``aux:`` names). Every command reads and writes
graphs through this module: load a pair (training heads stripped to logits), check its params
against the graph, build a SymbolBlock, save a pair atomically, count parameters, and time a
callable (:func:`best_of_ms`, the one timing loop every timing site uses).

Ground floor: imports nothing of the project but :mod:`distill.errors`.
"""
import json
import logging
import os
import tempfile
import time
import warnings

import mxnet as mx
import numpy as np
from mxnet import gluon

from .errors import UserError, closest

__all__ = ["SYMBOL_SUFFIX", "symbol_file", "params_file", "pair_files", "pair_exists",
           "HEAD_OPS", "AUX_SUFFIXES", "strip_training_head", "load_pair", "load_symbol_checkpoint",
           "check_params", "make_block", "load_symbol_block", "save_pair", "count_params",
           "count_param_dict", "file_size", "pair_size", "best_of_ms"]
_LOGGER = logging.getLogger(__name__)

SYMBOL_SUFFIX = "-symbol.json"

# Output ops that exist for training only: the logits are their first input.
HEAD_OPS = {"SoftmaxOutput", "Softmax", "SoftmaxActivation", "softmax", "log_softmax",
            "LogisticRegressionOutput", "LinearRegressionOutput", "MAERegressionOutput",
            "SVMOutput", "MakeLoss", "make_loss", "BlockGrad", "stop_gradient"}

# Auxiliary states (BN running statistics): not learnable parameters.
AUX_SUFFIXES = ("running_mean", "running_var", "moving_mean", "moving_var")


def symbol_file(prefix):
    """``PREFIX-symbol.json``."""
    return f"{prefix}{SYMBOL_SUFFIX}"


def params_file(prefix, epoch=0):
    """``PREFIX-%04d.params``."""
    return f"{prefix}-{int(epoch):04d}.params"


def pair_files(prefix, epoch=0):
    """``(PREFIX-symbol.json, PREFIX-%04d.params)``."""
    return symbol_file(prefix), params_file(prefix, epoch)


def pair_exists(prefix, epoch=0):
    """Both files of the pair exist."""
    return all(os.path.isfile(f) for f in pair_files(prefix, epoch))


def strip_prefix(path):
    """``X-symbol.json`` → ``X``; anything else unchanged."""
    return path[:-len(SYMBOL_SUFFIX)] if path.endswith(SYMBOL_SUFFIX) else path


def _op_of_head(sym):
    graph = json.loads(sym.tojson())
    return graph["nodes"][graph["heads"][0][0]]["op"]


def strip_training_head(sym, output=None, where="teacher"):
    """Return the logits of ``sym``: the named internal ``output``, or the graph with its
    training-only head layers (``SoftmaxOutput``, loss layers) removed."""
    if output:
        internals = sym.get_internals()
        names = internals.list_outputs()
        key = output if output in names else output + "_output"
        if key not in names:
            near = closest(output, [n[:-7] if n.endswith("_output") else n for n in names])
            raise UserError(f"{where}: `teacher.output: {output}` is not a layer of the graph. "
                            f"Closest: {', '.join(near) or 'none'}.")
        return internals[key]
    if len(sym.list_outputs()) > 1:
        sym = sym[0]
    while _op_of_head(sym) in HEAD_OPS:
        sym = sym.get_children()[0]
    return sym


def load_pair(prefix, epoch=0, output=None, what="teacher checkpoint", hint=None):
    """Read ``PREFIX-symbol.json`` + ``PREFIX-%04d.params`` → (logits symbol, params dict).

    ``arg:``/``aux:`` prefixes are dropped; parameters of a stripped training head are dropped
    too (any other name the graph does not use is left for :func:`check_params` to report).

    Parameters
    ----------
    what : str
        What the pair is, for the message when a file is missing.
    hint : str, optional
        What to do when a file is missing (default: the prefix/epoch explanation).
    """
    sym_file, par_file = pair_files(prefix, epoch)
    for f in (sym_file, par_file):
        if not os.path.isfile(f):
            raise UserError(f"{what} file {f} does not exist. " + (hint or (
                f"A checkpoint is a prefix: PREFIX{SYMBOL_SUFFIX} and "
                f"{os.path.basename(params_file('PREFIX', epoch))} must exist (check the epoch).")))
    try:
        sym = mx.sym.load(sym_file)
    except mx.base.MXNetError as e:
        raise UserError(f"{sym_file} is not a valid MXNet symbol file: {str(e).splitlines()[0]}") from None
    try:
        raw = mx.nd.load(par_file)
    except mx.base.MXNetError as e:
        raise UserError(f"{par_file} is not a valid MXNet params file: {str(e).splitlines()[0]}") from None
    params = {}
    for k, v in raw.items():
        params[k.split(":", 1)[1] if k.startswith(("arg:", "aux:")) else k] = v
    logits = strip_training_head(sym, output, where=sym_file)
    # parameters of the stripped part (a loss head, layers after `teacher.output`) are expected
    # leftovers; any other name in the file is an error check_params reports
    full = set(sym.list_arguments()) | set(sym.list_auxiliary_states())
    kept = set(logits.list_arguments()) | set(logits.list_auxiliary_states())
    params = {k: v for k, v in params.items() if k in kept or k not in full}
    return logits, params


def load_symbol_checkpoint(prefix, epoch=0, output=None):
    """:func:`load_pair` under its historical name (a Module-API checkpoint or an export)."""
    return load_pair(prefix, epoch, output)


def check_params(sym, params, input_name, input_shape, where):
    """Missing, extra or shape-mismatched parameters → :class:`UserError` naming them.

    Returns the output shape for ``input_shape``."""
    needed = [n for n in sym.list_arguments() if n != input_name] + sym.list_auxiliary_states()
    missing = [n for n in needed if n not in params]
    if missing:
        raise UserError(f"{where}: the graph needs parameters the params file does not have: "
                        f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}. Is the "
                        f"params file from the same model and epoch?")
    extra = sorted(set(params) - set(needed))
    if extra:
        raise UserError(f"{where}: the params file has parameters the graph does not use: "
                        f"{', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}. Is it the params "
                        f"file of another model? Pair PREFIX{SYMBOL_SUFFIX} with its own PREFIX-NNNN.params.")
    try:
        arg_shapes, out_shapes, aux_shapes = sym.infer_shape(**{input_name: input_shape})
    except mx.base.MXNetError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"{where}: the graph does not accept input of shape {input_shape} "
                        f"(channels, size from the data): {first}. Set `data.grayscale`, "
                        f"`data.image_size` so the input matches what the teacher was trained on.") from None
    names = sym.list_arguments() + sym.list_auxiliary_states()
    for n, s in zip(names, list(arg_shapes) + list(aux_shapes)):
        if n == input_name:
            continue
        if tuple(params[n].shape) != tuple(s):
            hint = ""
            if n.endswith("weight") and len(s) == 4 and s[1] != params[n].shape[1]:
                hint = (f" The first convolution expects {params[n].shape[1]} input channels: "
                        f"set `data.grayscale` to match.")
            raise UserError(f"{where}: parameter {n!r} has shape {tuple(params[n].shape)} in the "
                            f"params file but the graph, fed {input_shape}, needs {tuple(s)}.{hint}")
    return tuple(out_shapes[0])


def make_block(symbol, params, input_name="data", trainable=True, hybridize=False):
    """A SymbolBlock over ``symbol`` with (a copy of) ``params``.

    Parameters are loaded the way ``SymbolBlock.imports`` loads a params file (dtype taken from
    the data, so an int8 graph keeps its int8 weights).

    Parameters
    ----------
    trainable : bool
        ``False``: every parameter ``grad_req='null'`` (a frozen teacher, an int8 graph).
    hybridize : bool
        Hybridize with static memory and shapes (inference).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = gluon.SymbolBlock(symbol, mx.sym.var(input_name))
    for name, p in net.collect_params().items():
        if p.shape is None:      # JSON without shapes: _load_init would leave it unset (resume, count_params)
            p.shape = tuple(params[name].shape)
        p._load_init(params[name].copy(), mx.cpu(), cast_dtype=True, dtype_source="saved")
        if not trainable:
            p.grad_req = "null"
    if hybridize:
        net.hybridize(static_alloc=True, static_shape=True)
    return net


def load_symbol_block(prefix, epoch=0, input_name="data", ctx=None):
    """Load an exported pair as a SymbolBlock (``SymbolBlock.imports``)."""
    ctx = ctx or mx.cpu()
    with warnings.catch_warnings():       # "Cannot decide type for data": harmless, float32
        warnings.simplefilter("ignore")
        return gluon.SymbolBlock.imports(symbol_file(prefix), [input_name],
                                         params_file(prefix, epoch), ctx=ctx)


def save_pair(prefix, symbol, params, epoch=0):
    """Write ``PREFIX-symbol.json`` + ``PREFIX-%04d.params`` (``arg:``/``aux:`` names, as
    ``HybridBlock.export`` writes them), each atomically (temp + rename)."""
    folder = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(folder, exist_ok=True)
    sym_path, par_path = pair_files(prefix, epoch)
    fd, tmp_sym = tempfile.mkstemp(prefix=".tmp-", suffix=SYMBOL_SUFFIX, dir=folder)
    os.close(fd)
    fd, tmp_par = tempfile.mkstemp(prefix=".tmp-", suffix=".params", dir=folder)
    os.close(fd)
    try:
        symbol.save(tmp_sym)
        args = set(symbol.list_arguments())
        mx.nd.save(tmp_par, {("arg:" if k in args else "aux:") + k: v for k, v in params.items()})
        os.replace(tmp_par, par_path)
        os.replace(tmp_sym, sym_path)
    finally:
        for t in (tmp_sym, tmp_par):
            if os.path.exists(t):
                os.unlink(t)
    return sym_path, par_path


def count_params(net):
    """Number of learnable parameters of a Gluon block (BN running statistics excluded)."""
    total = 0
    for name, p in net.collect_params().items():
        if name.endswith(AUX_SUFFIXES):
            continue
        total += int(np.prod(p.shape))
    return total


def count_param_dict(params):
    """Number of learnable parameters in a name → array dict (BN running statistics excluded)."""
    return sum(int(np.prod(v.shape)) for k, v in params.items() if not k.endswith(AUX_SUFFIXES))


def file_size(*paths):
    """Total size in bytes of the given files."""
    return sum(os.path.getsize(p) for p in paths)


def pair_size(prefix, epoch=0):
    """Bytes on disk of the pair at ``prefix``."""
    return file_size(*pair_files(prefix, epoch))


def best_of_ms(fn, repeats=20, warmup=5, inner=10, sync=None):
    """Best-of-``repeats`` time of one call of ``fn`` in milliseconds.

    ``warmup`` untimed calls first; each repeat times ``inner`` calls (so that a 0.1 ms model is
    not timed at clock resolution) and divides. ``sync(result)`` runs on the last result of each
    repeat before the clock stops (``lambda y: y.wait_to_read()`` for MXNet's async engine).
    """
    y = None
    for _ in range(warmup):
        y = fn()
        if sync is not None:
            sync(y)
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for _ in range(inner):
            y = fn()
        if sync is not None:
            sync(y)
        best = min(best, (time.perf_counter() - t0) / inner)
    return round(best * 1e3, 4)
