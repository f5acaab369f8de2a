"""Feature taps: expose internal outputs of a network next to its logits.

A tap is named by a graph node (``distill inspect`` lists them, e.g.
``mobilenetv20_features_linearbottleneck3_elemwise_add0``). Any network, Gluon zoo student or
loaded Module-API teacher, is turned into a :class:`mxnet.gluon.SymbolBlock` whose outputs are
``[logits, tap_1, tap_2, ...]`` and which *shares* the original parameters: training the tapped
block trains the student, and the plain student (logits only) is what gets exported.
"""
import json
import logging
import warnings

import mxnet as mx
from mxnet import gluon

from .errors import UserError, closest

__all__ = ["graph_of", "tap_names", "tapped_block", "resolve_tap", "retap", "tap_nodes"]
_LOGGER = logging.getLogger(__name__)

# Ops whose output is a feature map worth distilling (not parameters, not shape bookkeeping).
_TAPPABLE_OPS = {"Convolution", "BatchNorm", "Activation", "relu", "LeakyReLU", "elemwise_add",
                 "_Plus", "broadcast_add", "Concat", "concat", "Pooling", "FullyConnected",
                 "clip", "_plus", "Flatten", "flatten", "broadcast_mul", "elemwise_mul", "sigmoid",
                 "hard_sigmoid", "_mul_scalar", "Dropout", "_contrib_BatchNormWithReLU"}


def graph_of(net, input_name="data"):
    """The logits symbol of a Gluon block (HybridBlock or SymbolBlock)."""
    if isinstance(net, gluon.SymbolBlock):
        return net._cached_graph[1] if net._cached_graph else net(mx.sym.var(input_name))
    return net(mx.sym.var(input_name))


def tap_names(symbol):
    """Node names of ``symbol`` that can serve as feature taps, in graph order."""
    nodes = json.loads(symbol.tojson())["nodes"]
    return [n["name"] for n in nodes if n["op"] in _TAPPABLE_OPS]


def resolve_tap(symbol, name, where):
    """The internal output called ``name`` (with or without ``_output``), or a UserError
    naming ``where`` (e.g. ``distillation[1].teacher_layer``) and the closest valid names."""
    internals = symbol.get_internals()
    outputs = internals.list_outputs()
    for key in (name, name + "_output"):
        if key in outputs:
            return internals[key]
    # Gluon prefixes every name with a per-process instance counter ("mobilenetv20_"), so
    # a name written without that prefix is accepted when it matches exactly one node.
    names = tap_names(symbol)
    hits = [n for n in names if n.endswith("_" + name)]
    if len(hits) == 1:
        return internals[hits[0] + "_output"]
    near = hits[:5] if len(hits) > 1 else closest(name, names, n=5)
    raise UserError(f"`{where}: {name}` is not a layer of the network. Closest names: "
                    f"{', '.join(near) or '(none)'}. `distill inspect` lists every layer.")


def tapped_block(net, taps, input_name="data", where="student_layer"):
    """A SymbolBlock over ``net``'s graph with outputs ``[logits] + taps``, sharing params.

    Parameters
    ----------
    net : gluon.HybridBlock
        Initialized network.
    taps : list of str
        Node names to expose.
    """
    sym = graph_of(net, input_name)
    outs = [sym] + [resolve_tap(sym, t, where) for t in taps]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block = gluon.SymbolBlock(mx.sym.Group(outs), mx.sym.var(input_name),
                                  params=net.collect_params())
    block.tap_spec = (list(taps), input_name, where)
    block.tap_node_names = [o.name for o in outs[1:]]
    return block


def retap(train_net, net):
    """The same taps as ``train_net`` (a :func:`tapped_block`) over another network ``net`` (the
    student rebuilt smaller while it trains), hybridized like the first."""
    block = tapped_block(net, *train_net.tap_spec)
    block.hybridize(static_alloc=True, static_shape=True)
    return block


def tap_nodes(train_net):
    """Graph node names of a :func:`tapped_block`'s taps, in output order (after the logits)."""
    return list(getattr(train_net, "tap_node_names", []))
