"""Size, cost and speed of a network: parameters, MACs per layer, deployed latency.

Latency is timed on the graph as it is deployed: hybridized with MXNet's oneDNN fusion
(``backend='MKLDNN'``), after warm-up, best of several repeats. An unfused fp32 baseline makes
every speed ratio a false claim (measured: unfused ``mobilenetv2_0.5`` at 28×28, batch 32,
23.7 ms against 7.2 ms fused).
"""
import json
import logging

import mxnet as mx
import numpy as np

from .errors import UserError
from .graphio import AUX_SUFFIXES, best_of_ms, load_pair, load_symbol_block, mxnet_reason, symbol_file
from .graphnorm import fc_on_nd_input, infer_shape_quiet

__all__ = ["layer_table", "total_macs", "measure_latency", "timing_error", "random_batch"]
_LOGGER = logging.getLogger(__name__)


def _node_params(node, nodes, arg_shapes):
    n = 0
    for inp in node["inputs"][1:]:
        src = nodes[inp[0]]
        if src["op"] == "null" and src["name"] in arg_shapes:
            n += int(np.prod(arg_shapes[src["name"]]))
    return n


def layer_table(symbol, input_shape, input_name="data"):
    """Every operator of ``symbol`` with its output shape, parameter count and MACs.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The inference graph (logits as the single output).
    input_shape : tuple
        ``(N, C, H, W)`` of the input called ``input_name``.

    Returns
    -------
    list of dict
        ``{"name", "op", "shape", "params", "macs"}`` per operator, in graph order; MACs are
        multiply–accumulates for the whole batch (divide by N for per-image).
    """
    internals = symbol.get_internals()
    arg_shapes, out_shapes, aux_shapes = infer_shape_quiet(internals, **{input_name: input_shape})
    shapes = dict(zip(internals.list_outputs(), out_shapes))
    params = dict(zip(internals.list_arguments(), arg_shapes))
    params.update(zip(internals.list_auxiliary_states(), aux_shapes))
    params.pop(input_name, None)
    graph = json.loads(symbol.tojson())
    nodes = graph["nodes"]
    rows = []
    for node in nodes:
        if node["op"] == "null":
            continue
        name = node["name"]
        shape = shapes.get(name + "_output")
        if shape is None:
            shape = next((s for k, s in shapes.items() if k.startswith(name + "_output")), ())
        attrs = node.get("attrs", {})
        learn = {k: v for k, v in params.items() if not k.endswith(AUX_SUFFIXES)}
        nparams = _node_params(node, nodes, learn)
        macs = 0
        op = node["op"]
        if op in ("Convolution", "Deconvolution"):
            w_name = nodes[node["inputs"][1][0]]["name"]
            w = params[w_name]                      # (O, I/g, kh, kw)
            if op == "Convolution":
                macs = int(np.prod(shape)) * int(np.prod(w[1:]))
            else:                                   # deconv weight: (I, O/g, kh, kw)
                src = nodes[node["inputs"][0][0]]
                in_shape = input_shape if src["op"] == "null" else shapes[src["name"] + "_output"]
                macs = int(np.prod(in_shape)) * int(np.prod(w[1:]))
        elif op == "FullyConnected":
            w_name = nodes[node["inputs"][1][0]]["name"]
            w = params[w_name]                      # (O, I)
            macs = int(shape[0]) * int(w[0]) * int(w[1])
        rows.append({"name": name, "op": op, "shape": tuple(int(s) for s in shape),
                     "params": nparams, "macs": macs, "attrs": attrs})
    return rows


def total_macs(symbol, input_shape, input_name="data"):
    """Multiply–accumulates of one image through ``symbol`` (convolutions and dense layers)."""
    shape = (1,) + tuple(input_shape[1:])
    return sum(r["macs"] for r in layer_table(symbol, shape, input_name))


def measure_latency(prefix, input_shape, batch_sizes=(1, 32), repeats=20, warmup=5, epoch=0):
    """Best-of-``repeats`` forward latency in ms of an exported model, oneDNN-fused.

    Parameters
    ----------
    prefix : str
        Exported model prefix (``PREFIX-symbol.json``, ``PREFIX-0000.params``).
    input_shape : tuple
        ``(C, H, W)`` of one image.

    Returns
    -------
    dict
        ``{"b1": ms, "b32": ms}`` (one key per batch size).
    """
    out = {}
    for bs in batch_sizes:
        net = load_symbol_block(prefix, epoch)       # normalised: a Flatten before each FC
        net.hybridize(backend="MKLDNN", static_alloc=True, static_shape=True)
        x = random_batch(bs, input_shape)
        try:
            # Several calls per repeat so that a 0.1 ms model is not timed at clock resolution.
            out[f"b{bs}"] = best_of_ms(lambda: net(x), repeats, warmup, inner=10 if bs == 1 else 3,
                                       sync=lambda y: y.wait_to_read())
        except mx.base.MXNetError as e:
            raise timing_error(prefix, epoch, (bs,) + tuple(input_shape), e) from None
    return out


def timing_error(prefix, epoch, input_shape, err):
    """A :class:`UserError` for an MXNet failure while running the oneDNN-fused graph at
    ``prefix``: MXNet 1.9.1's "We can't generate TBlob for MKLDNN data" names the
    FullyConnected layers on a 4-D input that cause it."""
    reason = mxnet_reason(err)
    where = f"timing {symbol_file(prefix)} with oneDNN (backend='MKLDNN'), input {tuple(input_shape)}"
    if "TBlob for MKLDNN" in reason:
        sym, _ = load_pair(prefix, epoch, what="model")
        culprits = fc_on_nd_input(sym, input_shape)
        layers = (f"FullyConnected layer(s) {', '.join(culprits)} on a 4-D input" if culprits
                  else "a layer fed by a oneDNN-fused convolution")
        return UserError(f"{where}: MXNet 1.9.1's oneDNN path fails ({reason}) at {layers}, a "
                         f"bug of MXNet's that shows on the second call. Give "
                         f"{culprits[0] if culprits else 'that layer'} a 2-D input in the graph: "
                         f"distill inserts a Flatten before every FullyConnected that flattens, "
                         f"but one with `flatten=False` needs a Reshape to (-1, last axis) before "
                         f"it and back after it, which only the graph's author can write.")
    if "sg_mkldnn_conv" in reason and "Shape inconsistent" in reason:
        # MXNet 1.9.1 binds the wrong weights when it fuses a conv into the sum of two branches
        # that read the same tensor (found on a residual block with a one-conv shortcut)
        return UserError(f"{where}: MXNet 1.9.1's oneDNN conv+sum fusion fails on this graph "
                         f"({reason}): a bug of MXNet's on two convolutions that read the same tensor "
                         f"and are summed. Run with MXNET_DISABLE_MKLDNN_FUSE_CONV_SUM=1 in the "
                         f"environment (that fusion off, the rest fused; same results).")
    return UserError(f"{where}: MXNet failed: {reason}. Does `distill inspect {prefix}` show the "
                     f"graph with this input shape?")


def random_batch(batch_size, input_shape, seed=0):
    """A fixed uniform random batch ``(N, C, H, W)`` for timing."""
    return mx.nd.array(np.random.RandomState(seed).uniform(
        size=(batch_size,) + tuple(input_shape)).astype("float32"))
