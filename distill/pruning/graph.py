"""Analyse: the channel dependency graph of any MXNet symbol (Torch-Pruning's route, on JSON).

Every tensor of the graph gets, along its channel axes, an array of *element* ids; operators
relate them: a convolution creates fresh ids for its filters, BatchNorm and ReLU pass them
through, an elementwise add makes its two inputs' ids equal (union-find), concat lays them side
by side, a channel shuffle permutes them, Flatten repeats them over the spatial positions a
FullyConnected layer reads. After one pass over the graph, each union-find class is one
*prunable unit*: a set of channels, in several tensors, that must be removed together. Every
parameter slice that belongs to a unit (a filter, a BatchNorm scale, an input column of the next
layer) is recorded as a :class:`ParamSlice`, so masking and shrinking are the same operation
along the same axes.

Operators the table in :mod:`distill.pruning.ops` does not know, and operators that mix channels
(softmax over channels, LRN, a reduction over channels), *freeze* the units they touch: those
channels are never removed, and the layers producing them are listed with the reason
(:attr:`ChannelGraph.intact`). Units of the network input and output are frozen too.

Units that live in exactly the same tensors form a *coupled group* (every conv feeding one
residual sum; the inner channels of one block). A plan chooses, per group, which channels stay.

Example
-------
>>> g = analyze(sym, (1, 3, 32, 32))                       # doctest: +SKIP
>>> [(grp.name, grp.channels) for grp in g.groups]         # doctest: +SKIP
[('resnetv10_conv0_fwd', 16), ('resnetv10_stage1_conv0_fwd', 16), ...]
"""
import json
import logging
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import UserError
from .ops import handle
from .tensor import Tensor

__all__ = ["analyze", "ChannelGraph", "Group", "ParamSlice", "Tensor", "PruningGraphError"]
_LOGGER = logging.getLogger(__name__)


class PruningGraphError(UserError, RuntimeError):
    """A plan would produce a broken graph, or the shrunk graph does not compute what the masked
    one does: raised, never emitted. A :class:`~distill.errors.UserError` so that the command
    line prints it as one paragraph (it names the layer), not as a traceback."""


class _UnionFind:
    """Union-find over integer element ids, with path halving."""

    def __init__(self):
        self.parent = []

    def new(self, n):
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x):
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            if ra < rb:                 # the older element stays root: stable class ids
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def union_arrays(self, a, b):
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        for x, y in zip(a.ravel().tolist(), b.ravel().tolist()):
            self.union(x, y)

    def roots(self):
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


@dataclass(eq=False)
class ParamSlice:
    """The slices of parameter ``param`` along ``axis`` that belong to the units ``ids``.

    ``role`` is ``out`` (a filter / output row), ``in`` (an input column of a consumer),
    ``bias``, ``scale`` (a normalisation's gamma), ``shift`` (beta), ``stat`` (running
    mean/var) or ``other`` (a broadcast per-channel parameter). ``layer`` is the node name.
    """
    param: str
    axis: int
    ids: np.ndarray
    role: str
    layer: str
    classes: Optional[np.ndarray] = None    # ids resolved to unit roots (after the analysis)


@dataclass(eq=False)
class Group:
    """A coupled group: the units that the same layers produce (every conv feeding one residual
    sum; the inner channels of one block; a ShuffleNet stage's shuffled chain).

    Attributes
    ----------
    id : str
        ``g0``, ``g1``, ... in graph order.
    name : str
        The layer producing the anchor tensor (the first tensor holding all the group's units).
    anchor : tuple
        ``(node index, output index)`` of the anchor tensor.
    units : ndarray
        Unit ids in canonical order: by their first channel position in the anchor. A plan's
        ``keep`` lists indices into this array; for most groups (one unit per channel) index i is
        channel i of the anchor layer.
    channels : int
        Channels of the anchor that belong to the group.
    layers : list of str
        Layers with parameters sliced by the group (producers, norms, consumers).
    producers : list of str
        Layers whose output channels (filters) are the group's, depthwise convs included.
    """
    id: str
    name: str
    anchor: Tuple[int, int]
    units: np.ndarray
    channels: int
    layers: List[str] = field(default_factory=list)
    producers: List[str] = field(default_factory=list)

    @property
    def unit_ids(self):
        return self.units

    @property
    def multiplicity(self):
        """Anchor channels per unit (1 unless grouped convs or shuffles tie channels together)."""
        return max(1, self.channels // max(1, len(self.units)))


class ChannelGraph:
    """The result of :func:`analyze`: tensors, parameter slices, units, groups, intact layers."""

    def __init__(self, graph_json, input_name, input_shape):
        self.json = graph_json
        self.nodes = graph_json["nodes"]
        self.input_name = input_name
        self.input_shape = tuple(input_shape)
        self.uf = _UnionFind()
        self.tensors: Dict[Tuple[int, int], Tensor] = OrderedDict()
        self.slices: List[ParamSlice] = []
        self._slice_index: Dict[Tuple[str, int], ParamSlice] = {}
        self.param_shapes: Dict[str, Tuple[int, ...]] = {}
        self.frozen_elems: Dict[int, str] = {}
        self.unsafe: List[dict] = []
        self.layer_kind: Dict[int, str] = {}        # node index -> conv | depthwise | grouped | fc
        self.rewrites: Dict[int, dict] = {}          # node index -> what apply must recompute
        self.root = None
        self.frozen: Dict[int, str] = {}
        self.groups: List[Group] = []
        self.intact: List[dict] = []

    # -- helpers used by the op handlers ---------------------------------------------------------
    def node_input(self, i, k):
        """``(kind, value)`` of input ``k`` of node ``i``: ``("tensor", Tensor)``,
        ``("param", name)`` or ``(None, None)`` when the node has fewer inputs."""
        inputs = self.nodes[i]["inputs"]
        if k >= len(inputs):
            return None, None
        src, out = inputs[k][0], inputs[k][1]
        node = self.nodes[src]
        if node["op"] == "null" and node["name"] in self.param_shapes:
            return "param", node["name"]
        return "tensor", self.tensors[(src, out)]

    def fresh(self, n):
        return self.uf.new(int(n))

    def freeze(self, ids, reason):
        if ids is None:
            return
        for e in np.asarray(ids).ravel().tolist():
            self.frozen_elems.setdefault(e, reason)

    def union(self, a, b):
        self.uf.union_arrays(a, b)

    def union_along_first(self, ids2d):
        """Make every row of ``ids2d`` equal to the first (offset coupling across groups)."""
        for j in range(1, ids2d.shape[0]):
            self.union(ids2d[0], ids2d[j])

    def add_slice(self, param, axis, ids, role, layer):
        key = (param, axis)
        ids = np.asarray(ids).ravel()
        if key in self._slice_index:                 # a shared (tied) parameter couples its users
            old = self._slice_index[key]
            if old.ids.shape != ids.shape:
                raise PruningGraphError(f"parameter {param} is used with different shapes")
            self.union(old.ids, ids)
            return
        s = ParamSlice(param, axis, ids, role, layer)
        self._slice_index[key] = s
        self.slices.append(s)

    def mark_unsafe(self, i, reason, outputs=None):
        """Leave node ``i`` intact: freeze its inputs and give its outputs fresh frozen ids."""
        node = self.nodes[i]
        why = f"{node['name']} ({node['op']}): {reason}"
        self.unsafe.append({"layer": node["name"], "op": node["op"], "reason": reason})
        for k in range(len(node["inputs"])):
            kind, t = self.node_input(i, k)
            if kind == "tensor":
                self.freeze(t.ids, f"coupled to {why}")
        for k, shape in enumerate(outputs or []):
            ids = self.fresh(shape[1]) if len(shape) >= 2 else None
            self.freeze(ids, f"produced by {why}")
            self.tensors[(i, k)] = Tensor(tuple(shape), ids)

    # -- results -------------------------------------------------------------------------------
    def keep_mask(self, ids, removed):
        """Boolean array shaped like ``ids``: True where the unit is not in ``removed``."""
        if not removed:
            return np.ones(np.shape(ids), dtype=bool)
        return ~np.isin(self.root[np.asarray(ids)], np.fromiter(removed, dtype=np.int64))

    def group(self, gid):
        for g in self.groups:
            if g.id == gid:
                return g
        raise KeyError(gid)

    def prunable_units(self):
        return {int(u) for g in self.groups for u in g.unit_ids}

    def layer_names(self, ops=("Convolution", "FullyConnected", "Deconvolution")):
        return [n["name"] for n in self.nodes if n["op"] in ops]

    def summary(self):
        """Plain data describing the analysis (for the plan file and reports)."""
        return {"groups": [{"id": g.id, "name": g.name, "channels": g.channels,
                            "units": int(len(g.unit_ids)), "producers": g.producers,
                            "layers": g.layers} for g in self.groups],
                "intact": self.intact, "unsafe": self.unsafe}


def _infer_shapes(symbol, input_name, input_shape):
    internals = symbol.get_internals()
    arg_shapes, out_shapes, aux_shapes = internals.infer_shape(**{input_name: tuple(input_shape)})
    if out_shapes is None:
        raise PruningGraphError(f"cannot infer the shapes of the graph for input {input_shape}")
    names = internals.list_outputs()
    by_name = {n: tuple(s) for n, s in zip(names, out_shapes)}
    params = {n: tuple(s) for n, s in zip(internals.list_arguments(), arg_shapes)}
    params.update({n: tuple(s) for n, s in zip(internals.list_auxiliary_states(), aux_shapes)})
    params.pop(input_name, None)
    return by_name, params


def _node_out_shapes(name, by_name):
    if name + "_output" in by_name:
        return [by_name[name + "_output"]]
    out, k = [], 0
    while f"{name}_output{k}" in by_name:
        out.append(by_name[f"{name}_output{k}"])
        k += 1
    return out


def analyze(symbol, input_shape, input_name="data"):
    """Build the :class:`ChannelGraph` of ``symbol`` (analyse, step 1 of analyse-plan-apply).

    Parameters
    ----------
    symbol : mx.sym.Symbol
        An inference graph (as from ``net(mx.sym.var('data'))``, ``net.export`` or a Module-API
        checkpoint with its training head stripped).
    input_shape : tuple
        ``(N, C, H, W)`` of the input (the batch size is irrelevant; 2 is used to tell the batch
        axis from literal ones in reshapes).
    input_name : str
        The input variable.

    Returns
    -------
    ChannelGraph
    """
    input_shape = (2,) + tuple(input_shape[1:])
    graph_json = json.loads(symbol.tojson())
    by_name, param_shapes = _infer_shapes(symbol, input_name, input_shape)
    g = ChannelGraph(graph_json, input_name, input_shape)
    g.param_shapes = param_shapes
    for i, node in enumerate(g.nodes):
        if node["op"] == "null":
            if node["name"] in param_shapes:
                continue
            shape = by_name.get(node["name"], input_shape if node["name"] == input_name else ())
            ids = g.fresh(shape[1]) if len(shape) >= 2 else None
            g.freeze(ids, "the network input" if node["name"] == input_name
                     else f"the graph input {node['name']}")
            g.tensors[(i, 0)] = Tensor(tuple(shape), ids)
            continue
        outs = _node_out_shapes(node["name"], by_name)
        handle(g, i, node, outs)
        for k, shape in enumerate(outs):           # every output must be described
            if (i, k) not in g.tensors:
                ids = g.fresh(shape[1]) if len(shape) >= 2 else None
                g.freeze(ids, f"output {k} of {node['name']} ({node['op']}) is not analysed")
                g.tensors[(i, k)] = Tensor(tuple(shape), ids)
    for head in graph_json["heads"]:
        t = g.tensors[(head[0], head[1])]
        g.freeze(t.ids, "the network output")
    _finish(g)
    return g


def _finish(g):
    """Resolve unit roots, frozen units, groups and the list of intact layers."""
    g.root = g.uf.roots()
    for e, reason in g.frozen_elems.items():
        g.frozen.setdefault(int(g.root[e]), reason)
    for s in g.slices:
        s.classes = g.root[s.ids]
    # which units each tensor holds: a plan must leave every tensor at least one channel
    g.tensor_units = {}
    g.unit_tensors = defaultdict(list)
    for key, t in g.tensors.items():
        if t.ids is None or t.derived or t.ids.size == 0:
            continue
        units = set(np.unique(g.root[t.ids.ravel()]).tolist())
        g.tensor_units[key] = units
        for u in units:
            g.unit_tensors[u].append(key)
    # groups: units produced by the same layers (connected through shared "out" slices)
    live = sorted({int(c) for s in g.slices if s.role == "out" for c in s.classes.tolist()}
                  - set(g.frozen))
    comp = _UnionFind()
    comp.new(len(live))
    index = {u: n for n, u in enumerate(live)}
    for s in g.slices:
        if s.role == "out":
            members = [index[c] for c in np.unique(s.classes).tolist() if c in index]
            for m in members[1:]:
                comp.union(members[0], m)
    roots = comp.roots() if live else np.zeros(0, np.int64)
    members = OrderedDict()
    for u, r in zip(live, roots.tolist()):
        members.setdefault(r, set()).add(u)
    # anchor of each group: the tensor holding most of its units (earliest on ties)
    best = {}
    for key, present in g.tensor_units.items():
        for r, units in members.items():
            n = len(units & present)
            if n and (r not in best or n > best[r][0]):
                best[r] = (n, key)
    groups = []
    for r, units in members.items():
        anchor = best[r][1]
        roots_a = g.root[g.tensors[anchor].ids.ravel()]
        in_anchor = np.isin(roots_a, list(units))
        order, seen = [], set()
        for u in roots_a[in_anchor].tolist():
            if u not in seen:
                seen.add(u)
                order.append(u)
        order += sorted(units - seen)
        groups.append((anchor, int(np.argmax(in_anchor)), np.array(order, np.int64),
                       int(in_anchor.sum())))
    groups.sort(key=lambda x: (x[0], x[1]))
    for n, (anchor, _, units, channels) in enumerate(groups):
        unit_set = set(units.tolist())
        layers, producers = [], []
        for s in g.slices:
            if unit_set.intersection(s.classes.tolist()):
                if s.layer not in layers:
                    layers.append(s.layer)
                if s.role == "out" and s.layer not in producers:
                    producers.append(s.layer)
        g.groups.append(Group(f"g{n}", g.nodes[anchor[0]]["name"], anchor, units, channels,
                              layers, producers))
    # layers whose filters can not be removed, with the reason
    seen = set()
    for s in g.slices:
        if s.role != "out" or s.layer in seen:
            continue
        reasons = [g.frozen[c] for c in np.unique(s.classes).tolist() if c in g.frozen]
        if len(reasons) == len(np.unique(s.classes)):
            seen.add(s.layer)
            g.intact.append({"layer": s.layer, "reason": reasons[0]})
