"""Size, cost and speed of a network: parameters, MACs per layer, deployed latency.

Latency is timed on the graph as it is deployed: hybridized with MXNet's oneDNN fusion
(``backend='MKLDNN'``), after warm-up, best of several repeats. An unfused fp32 baseline makes
every speed ratio a false claim (measured: unfused ``mobilenetv2_0.5`` at 28×28, batch 32,
23.7 ms against 7.2 ms fused).
"""
import json
import logging
import time
import warnings

import mxnet as mx
import numpy as np
from mxnet import gluon

__all__ = ["count_params", "layer_table", "total_macs", "measure_latency", "load_symbol_block",
           "file_size"]
_LOGGER = logging.getLogger(__name__)

# Ops whose parameters are weights (the rest of a node's inputs are activations).
_AUX_SUFFIXES = ("running_mean", "running_var", "moving_mean", "moving_var")


def count_params(net):
    """Number of learnable parameters of a Gluon block (BN running statistics excluded)."""
    total = 0
    for name, p in net.collect_params().items():
        if name.endswith(_AUX_SUFFIXES):
            continue
        total += int(np.prod(p.shape))
    return total


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
    arg_shapes, out_shapes, aux_shapes = internals.infer_shape(**{input_name: input_shape})
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
        learn = {k: v for k, v in params.items() if not k.endswith(_AUX_SUFFIXES)}
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


def load_symbol_block(prefix, epoch=0, input_name="data", ctx=None):
    """Load an exported ``PREFIX-symbol.json`` + ``PREFIX-%04d.params`` pair as a SymbolBlock."""
    ctx = ctx or mx.cpu()
    with warnings.catch_warnings():       # "Cannot decide type for data": harmless, float32
        warnings.simplefilter("ignore")
        return gluon.SymbolBlock.imports(f"{prefix}-symbol.json", [input_name],
                                     f"{prefix}-{epoch:04d}.params", ctx=ctx)


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
        net = load_symbol_block(prefix, epoch)
        net.hybridize(backend="MKLDNN", static_alloc=True, static_shape=True)
        x = mx.nd.array(np.random.RandomState(0).uniform(size=(bs,) + tuple(input_shape)).astype("float32"))
        for _ in range(warmup):
            net(x).wait_to_read()
        # Several calls per repeat so that a 0.1 ms model is not timed at clock resolution.
        inner = 10 if bs == 1 else 3
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                y = net(x)
            y.wait_to_read()
            best = min(best, (time.perf_counter() - t0) / inner)
        out[f"b{bs}"] = round(best * 1e3, 4)
    return out


def file_size(*paths):
    """Total size in bytes of the given files."""
    import os
    return sum(os.path.getsize(p) for p in paths)
