"""Graph I/O: everything about (symbol, params) pairs, in one place.

A *pair* is ``PREFIX-symbol.json`` + ``PREFIX-%04d.params``, written by Gluon's ``export()``
(plain names) or by the Module API (``arg:``/``aux:`` names). Every command reads and writes
graphs through this module: load a pair (training heads stripped to logits), check its params
against the graph, build a SymbolBlock, save a pair atomically, count parameters, and time a
callable (:func:`best_of_ms`, the one timing loop every timing site uses; it lives in
:mod:`distill.timing`, which needs no MXNet, and is re-exported here).

Ground floor: imports nothing of the project but :mod:`distill.errors`, :mod:`distill.timing`
and :mod:`distill.graphnorm` (the normalisation every loaded pair gets).
"""
import json
import logging
import os
import tempfile
import warnings

import mxnet as mx
import numpy as np
from mxnet import gluon

from .errors import UserError, closest
from .graphnorm import infer_shape_quiet, input_channels, normalise, pinned_size
from .timing import best_of_ms  # noqa: F401  (re-exported: timing sites import it from here)

__all__ = ["SYMBOL_SUFFIX", "symbol_file", "params_file", "pair_files", "pair_exists",
           "HEAD_OPS", "AUX_SUFFIXES", "mxnet_reason", "strip_training_head", "load_pair",
           "load_symbol_checkpoint", "check_params", "make_block", "load_symbol_block", "save_pair",
           "count_params", "count_param_dict", "file_size", "pair_size", "best_of_ms"]
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


def mxnet_reason(err):
    """The line of an MXNetError that says what went wrong (its first line is
    ``Traceback (most recent call last):``)."""
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    said = [l for l in lines if l.startswith("MXNetError:")] or lines[-1:] or ["(no message)"]
    return said[-1].replace("MXNetError: ", "", 1)


# The first 8 bytes of every file mx.nd.save writes (kMXAPINDArrayListMagic, little-endian).
_NDARRAY_LIST_MAGIC = 0x112


def _unreadable_params(path, err):
    """A UserError saying whether ``path`` is empty, not a params file, or truncated."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if size == 0:
        what = "is empty (0 bytes)"
    elif len(head) < 8 or int.from_bytes(head, "little") != _NDARRAY_LIST_MAGIC:
        what = (f"is not an MXNet params file ({size:,} bytes that do not start with the header "
                f"mx.nd.save writes)")
    else:
        what = (f"is truncated or corrupt ({size:,} bytes: the MXNet header is there but the "
                f"arrays cannot be read; an interrupted copy or download leaves this)")
    return UserError(f"{path} {what}. MXNet says: {mxnet_reason(err)}. Copy the file again, or "
                     f"give the PREFIX-NNNN.params written with PREFIX{SYMBOL_SUFFIX}.")


def _read_pair(prefix, epoch, what, hint):
    """→ (symbol as saved, params with ``arg:``/``aux:`` dropped); missing or unreadable files
    are a UserError."""
    sym_file, par_file = pair_files(prefix, epoch)
    for f in (sym_file, par_file):
        if not os.path.isfile(f):
            raise UserError(f"{what} file {f} does not exist. " + (hint or (
                f"A checkpoint is a prefix: PREFIX{SYMBOL_SUFFIX} and "
                f"{os.path.basename(params_file('PREFIX', epoch))} must exist (check the epoch).")))
    try:
        sym = mx.sym.load(sym_file)
    except mx.base.MXNetError as e:
        raise UserError(f"{sym_file} is not a valid MXNet symbol file "
                        f"({os.path.getsize(sym_file):,} bytes): {mxnet_reason(e)}") from None
    try:
        raw = mx.nd.load(par_file)
    except mx.base.MXNetError as e:
        raise _unreadable_params(par_file, e) from None
    if not isinstance(raw, dict):      # mx.nd.save of a list: no names to match the graph's
        raise UserError(f"{par_file} holds {len(raw)} unnamed arrays, not a name → array params "
                        f"file: save it with names (HybridBlock.export or Module.save_checkpoint).")
    return sym, {k.split(":", 1)[1] if k.startswith(("arg:", "aux:")) else k: v for k, v in raw.items()}


def load_pair(prefix, epoch=0, output=None, what="teacher checkpoint", hint=None,
              input_shape=None, input_name="data", notes=None):
    """Read ``PREFIX-symbol.json`` + ``PREFIX-%04d.params`` → (logits symbol, params dict),
    normalised (:func:`distill.graphnorm.normalise`: fix_gamma gammas set to 1, a Flatten
    before each flattening FullyConnected, and with ``input_shape`` global pool kernels
    fitted).

    ``arg:``/``aux:`` prefixes are dropped; parameters of a stripped training head are dropped
    too (any other name the graph does not use is left for :func:`check_params` to report).

    Parameters
    ----------
    what : str
        What the pair is, for the message when a file is missing.
    hint : str, optional
        What to do when a file is missing (default: the prefix/epoch explanation).
    input_shape : tuple, optional
        ``(N, C, H, W)`` or ``(C, H, W)`` of the input, when known.
    notes : list, optional
        Extended with one sentence per kind of normalisation applied (for ``distill inspect``).
    """
    sym, params = _read_pair(prefix, epoch, what, hint)
    sym_file = symbol_file(prefix)
    logits = strip_training_head(sym, output, where=sym_file)
    # parameters of the stripped part (a loss head, layers after `teacher.output`) are expected
    # leftovers; any other name in the file is an error check_params reports
    full = set(sym.list_arguments()) | set(sym.list_auxiliary_states())
    kept = set(logits.list_arguments()) | set(logits.list_auxiliary_states())
    params = {k: v for k, v in params.items() if k in kept or k not in full}
    logits, params, done = normalise(logits, params, input_shape, input_name, where=sym_file)
    if notes is not None:
        notes.extend(done.notes())
    return logits, params


def load_symbol_checkpoint(prefix, epoch=0, output=None):
    """:func:`load_pair` under its historical name (a Module-API checkpoint or an export)."""
    return load_pair(prefix, epoch, output)


def _channel_fix(channels, option):
    """How to feed ``channels`` input channels: the recipe key, or ``option`` (a CLI flag)."""
    if option:
        return f"Pass {option} {channels},H,W."
    if channels in (1, 3):
        return (f"Set `data.grayscale: {'true' if channels == 1 else 'false'}` so the data has "
                f"{channels} channel{'s' if channels > 1 else ''}.")
    return f"The data must have {channels} channels (`data.grayscale` gives 1 or 3)."


def _size_fix(sym, params, input_name, channels, option):
    """The input size the params pin, as a sentence (``''`` when they pin none)."""
    pinned = pinned_size(sym, params, channels, input_name)
    if not pinned:
        return ""
    size, lo, hi = pinned
    how = f"pass {option} {channels},{size},{size}" if option else f"set `data.image_size: {size}`"
    return (f" The parameters fit inputs of {lo}..{hi} pixels square ({size} most likely): "
            f"{how}.")


def check_params(sym, params, input_name, input_shape, where, option=None):
    """Missing, extra or shape-mismatched parameters → :class:`UserError` naming them.

    A channel count the first layer's weights contradict is reported as such (naming the layer
    and ``data.grayscale``) whichever parameter shape inference would trip on first.

    Parameters
    ----------
    input_shape : tuple
        ``(N, C, H, W)``.
    option : str, optional
        The command-line option that sets the shape (``--input-shape``), named in the fix
        instead of the recipe's ``data.grayscale``/``data.image_size``.

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
    first = input_channels(sym, params, input_name)
    if first and len(input_shape) > 1 and first[0] != input_shape[1]:
        ch, layer, pname, pshape = first
        raise UserError(f"{where}: the graph's first layer {layer!r} takes {ch} input channel"
                        f"{'s' if ch != 1 else ''} (its parameter {pname!r} has shape {pshape}), "
                        f"but the input has {input_shape[1]} (shape {tuple(input_shape)}). "
                        f"{_channel_fix(ch, option)}")
    channels = first[0] if first else input_shape[1]
    try:
        arg_shapes, out_shapes, aux_shapes = infer_shape_quiet(sym, **{input_name: tuple(input_shape)})
    except mx.base.MXNetError as e:
        fix = (f"Pass {option} C,H,W to match what the graph was trained on." if option else
               "Set `data.grayscale`, `data.image_size` so the input matches what the teacher "
               "was trained on.")
        raise UserError(f"{where}: the graph does not accept input of shape {tuple(input_shape)} "
                        f"(channels, size from the data): {mxnet_reason(e)}. {fix}"
                        f"{_size_fix(sym, params, input_name, channels, option)}") from None
    names = sym.list_arguments() + sym.list_auxiliary_states()
    for n, s in zip(names, list(arg_shapes) + list(aux_shapes)):
        if n == input_name:
            continue
        if tuple(params[n].shape) != tuple(s):
            raise UserError(f"{where}: parameter {n!r} has shape {tuple(params[n].shape)} in the "
                            f"params file but the graph, fed {tuple(input_shape)}, needs {tuple(s)}."
                            f"{_size_fix(sym, params, input_name, channels, option)}")
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
    """Load an exported pair (fp32 or int8) as a SymbolBlock, normalised as :func:`load_pair`
    normalises (the graph is kept whole: no training head is stripped)."""
    del ctx                           # make_block loads on the CPU, the only device we run on
    sym, params = _read_pair(prefix, epoch, "model", None)
    sym, params, _ = normalise(sym, params, None, input_name, where=symbol_file(prefix))
    missing = [n for n in sym.list_arguments() + sym.list_auxiliary_states()
               if n != input_name and n not in params]
    if missing:
        raise UserError(f"{params_file(prefix, epoch)} lacks {', '.join(missing[:6])}"
                        f"{' ...' if len(missing) > 6 else ''}, which {symbol_file(prefix)} needs: "
                        f"pair the symbol file with its own params file.")
    return make_block(sym, params, input_name)


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
