"""Per-layer latency, fused fp32 vs int8: which layers int8 makes slower.

A whole-model ratio hides layers that int8 slows down (the ResNet-20 teacher's 64→10 FC is 3×
slower in int8) and the few layers that make most of its speed-up. Users of other tools find
them only on the device. Here each weight layer's oneDNN-fused node (conv + BN + activation
[+ residual add], as deployed) is cut out of the fused graph into a one-node graph with its
real input shapes, then timed twice in the same process:

- **fp32**: the fused node as it runs in the fused fp32 graph;
- **int8**: the same node after MXNet's quantization pass with the run's calibration
  thresholds (so it gets uint8 input where the real graph does, and requantizes in place).

MXNet's profiler times each operator of the one-node graph (operator bulking is switched off
while the graphs are bound, so each op is its own event); a layer's time is the sum of its
ops' best-of-``repeats`` times. The ``quantize_v2``/``dequantize`` around the int8 node are
reported apart as ``boundary_ms``: a chain of int8 layers does not pay them, while a layer
kept in fp32 between int8 neighbours pays one of each. Checked on the quickstart student:
the per-node fp32 times match the same nodes profiled inside the whole fused graph (e.g. the two
1×1 expansions with 12 input channels, 2.65 ms each at batch 32 in both).
"""
import atexit
import json
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from types import SimpleNamespace

import mxnet as mx
import numpy as np

from .graph import quantize

__all__ = ["layer_latency", "slower_layers", "qgraph_is_int8", "SLOWER_MARGIN"]
_LOGGER = logging.getLogger(__name__)

#: int8 counts as slower when it takes this factor longer than fp32 (timer noise on a
#: ~10 µs kernel is a few percent).
SLOWER_MARGIN = 1.05
_BOUNDARY = {"_contrib_quantize_v2", "_contrib_dequantize"}
_BOOKKEEPING = {"WaitForVar", "CopyCPU2CPU", "DeleteVariable", "_ones", "_zeros", "_random_uniform"}


@contextmanager
def _unbulked():
    """Bind executors with one engine op per graph node, so the profiler sees each one.

    MXNet reads ``MXNET_EXEC_BULK_EXEC_INFERENCE`` when a graph is bound; the old value is
    restored afterwards so later (deployment-style) timings keep bulking on.
    """
    key = "MXNET_EXEC_BULK_EXEC_INFERENCE"
    old = os.environ.get(key)
    os.environ[key] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _output_name(node, index):
    """MXNet's name for output ``index`` of ``node``: ``x_output``, or ``x_output1`` for a split."""
    if node["op"] == "SliceChannel":
        return f"{node['name']}_output{index}"
    return f"{node['name']}_output"


def _split_params(symbol, params):
    """``(arg_params, aux_params)`` of ``symbol`` out of a merged name → NDArray dict."""
    args, auxs = set(symbol.list_arguments()), set(symbol.list_auxiliary_states())
    return ({k: v for k, v in params.items() if k in args},
            {k: v for k, v in params.items() if k in auxs})


def _one_node_graph(graph_json, node_index, params):
    """The fused node ``node_index`` of ``graph_json`` alone, fed by variables.

    Returns
    -------
    (mx.sym.Symbol, list of str)
        The graph and the names of its data inputs (the producers' output names, which are
        also the calibration thresholds' keys).
    """
    nodes = graph_json["nodes"]
    node = nodes[node_index]
    new, data_inputs, inputs = [], [], []
    for src, out_index, _ in node["inputs"]:
        producer = nodes[src]
        name = producer["name"] if producer["op"] == "null" else _output_name(producer, out_index)
        if name not in params:
            data_inputs.append(name)
        new.append({"op": "null", "name": name, "inputs": []})
        inputs.append([len(new) - 1, 0, 0])
    new.append(dict(node, inputs=inputs))
    g = {"nodes": new, "arg_nodes": list(range(len(new) - 1)),
         "node_row_ptr": list(range(len(new) + 1)), "heads": [[len(new) - 1, 0, 0]],
         "attrs": graph_json.get("attrs", {})}
    return mx.sym.load_json(json.dumps(g)), data_inputs


def _profile(symbol, params, shapes, repeats, warmup):
    """Best-of-``repeats`` time in ms per operator type of one bound graph."""
    with _unbulked(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = symbol.simple_bind(mx.cpu(), grad_req="null", **shapes)
    ex.copy_params_from(*_split_params(symbol, params), allow_extra_params=True)
    rng = np.random.RandomState(0)
    feed = {k: mx.nd.array(rng.uniform(size=s).astype("float32")) for k, s in shapes.items()}
    for _ in range(warmup):
        ex.forward(is_train=False, **feed)[0].wait_to_read()
    # MXNet's profiler writes its trace by *replacing* the file it is given (as root, pointing it
    # at os.devnull turned /dev/null into a regular file): it gets a file of its own in a
    # temporary folder, removed afterwards. A dump at process exit into the removed folder fails
    # quietly (checked), so nothing is written outside the system temp folder.
    # MXNet may still be writing it while the folder goes (seen: "Directory not empty"), so the
    # removal ignores errors and is tried again at exit.
    tmp = tempfile.mkdtemp(prefix="distill-profile-")
    try:
        mx.profiler.set_config(profile_all=True, aggregate_stats=True,
                               filename=os.path.join(tmp, "profile.json"))
        mx.profiler.dumps(reset=True)
        mx.profiler.set_state("run")
        try:
            for _ in range(repeats):
                ex.forward(is_train=False, **feed)[0].wait_to_read()
        finally:
            mx.profiler.set_state("stop")
        stats = json.loads(mx.profiler.dumps(reset=True, format="json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(tmp):
            atexit.register(shutil.rmtree, tmp, True)
    ops = stats.get("Time", {}).get("operator", {})
    return {k: float(v["Min"]) for k, v in ops.items() if k not in _BOOKKEEPING}


class _OneNode(SimpleNamespace):
    """The few attributes of :class:`~distill.quantize.graph.FloatModel` that
    :func:`~distill.quantize.graph.quantize` reads."""


def layer_latency(model, thresholds, granularity="channel-wise", batch_sizes=(1, 32),
                  repeats=20, warmup=5):
    """Per weight layer, its fused node's latency in fp32 and in int8.

    Parameters
    ----------
    model : FloatModel
    thresholds : dict
        The calibration table (the same one the exported int8 model was built from).
    granularity : str
        Weight scales, as in the export.
    batch_sizes : tuple of int
    repeats, warmup : int
        Profiled runs (best of) and untimed runs before them.

    Returns
    -------
    list of dict
        In graph order: ``layer``, ``op``, ``fused``, ``macs`` and, per batch size key
        (``b1``, ``b32``), ``fp32_ms``, ``int8_ms`` (``None`` when MXNet leaves the node in
        fp32), ``boundary_ms`` and ``speedup`` (fp32 / int8); or ``error`` when the node could
        not be timed alone (logged; the row stays so the table shows every layer).
    """
    graph = json.loads(model.fused.tojson())
    index = {n["name"]: i for i, n in enumerate(graph["nodes"])}
    internals = model.fused.get_internals()
    params = model.params
    rows = []
    for layer in (l for l in model.layers if l.fused in index):
        row = {"layer": layer.name, "op": layer.op, "fused": layer.fused, "macs": layer.macs}
        try:
            row.update(_time_layer(model, graph, index[layer.fused], params, internals, thresholds,
                                   granularity, batch_sizes, repeats, warmup))
        except Exception as e:          # a report column must not sink the int8 export
            _LOGGER.warning("per-layer latency: %s (%s) could not be timed alone: %s: %s",
                            layer.name, layer.fused, type(e).__name__, str(e).splitlines()[0][:200])
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
    return rows


def _time_layer(model, graph, node_index, params, internals, thresholds, granularity, batch_sizes,
                repeats, warmup):
    """``{"b1": {...}, "b32": {...}}`` for the fused node ``node_index`` timed alone."""
    sym, data_inputs = _one_node_graph(graph, node_index, params)
    arg_params, aux_params = _split_params(sym, params)
    # a layer this CPU keeps fp32 (FloatModel.host_fp32) is timed as deployed: fp32 both times
    one = _OneNode(fused=sym, arg_params=arg_params, aux_params=aux_params,
                   host_fp32=list(getattr(model, "host_fp32", ())))
    # Inputs the table lacks (a split's second output, say) only decide int8 vs uint8
    # input: the kernel's speed does not depend on the range.
    table = dict(thresholds)
    for name in data_inputs:
        table.setdefault(name, (-1.0, 1.0))
    qgraph = quantize(one, table, granularity=granularity)
    is_int8 = qgraph_is_int8(qgraph)
    out = {}
    for bs in batch_sizes:
        full = {model.input_name: (bs,) + model.input_shape}
        shapes = {name: (tuple(internals[name].infer_shape(**full)[1][0])
                         if name != model.input_name else full[name]) for name in data_inputs}
        f = _profile(sym, params, shapes, repeats, warmup)
        q = _profile(qgraph.symbol, qgraph.params, shapes, repeats, warmup)
        fp32_ms = sum(f.values())
        int8_ms = sum(v for k, v in q.items() if k not in _BOUNDARY) if is_int8 else None
        out[f"b{bs}"] = {"fp32_ms": round(fp32_ms, 4),
                         "int8_ms": None if int8_ms is None else round(int8_ms, 4),
                         "boundary_ms": round(sum(v for k, v in q.items() if k in _BOUNDARY), 4),
                         "speedup": (round(fp32_ms / int8_ms, 3) if int8_ms else None)}
    return out


def qgraph_is_int8(qgraph):
    """True when the quantization pass turned the node into an int8 one (some layers, e.g. a
    convolution with an unsupported attribute, stay fp32 whatever the policy)."""
    for node in json.loads(qgraph.symbol.tojson())["nodes"]:
        if node["op"].startswith("_contrib_quantized") or \
                str(node.get("attrs", {}).get("quantized", "")).lower() == "true":
            return True
    return False


def slower_layers(rows, margin=SLOWER_MARGIN):
    """Per batch size key, ``[(layer, fp32_ms, int8_ms)]`` where int8 takes more than
    ``margin`` × the fp32 time."""
    out = {}
    for row in rows:
        for key, t in row.items():
            if not (isinstance(t, dict) and t.get("int8_ms")):
                continue
            if t["int8_ms"] > margin * t["fp32_ms"]:
                out.setdefault(key, []).append((row["layer"], t["fp32_ms"], t["int8_ms"]))
    return out
