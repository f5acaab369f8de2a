"""Apply: a channel plan turned into masks, or into a physically smaller (symbol, params).

Both use the same :class:`~distill.pruning.graph.ParamSlice` records, so a masked network (the
removed channels' filters, norms and input columns set to zero, shapes unchanged) and the shrunk
network (those slices cut out, ``num_filter``/``num_group``/``num_hidden`` and channel slices
rewritten in the JSON) compute the same function. The shrunk graph is checked before it is
returned: every parameter and every tensor must have the shape the plan predicts, else
:class:`~distill.pruning.graph.PruningGraphError` is raised; a broken graph is never emitted.
"""
import copy
import json
import logging
import warnings

import mxnet as mx
import numpy as np

from ..graphio import make_block
from .graph import PruningGraphError, _infer_shapes, _node_out_shapes
from .ops import _parse

__all__ = ["param_keeps", "channel_masks", "mask_params", "shrink", "tensor_new_shape",
           "shrunk_block", "first_divergence", "cut_array", "expand_array", "axis_keeps",
           "relative_keeps"]
_LOGGER = logging.getLogger(__name__)


def param_keeps(graph, removed):
    """``{param: [(axis, keep 1-D bool array), ...]}`` for the units in ``removed``."""
    rem = np.fromiter((int(u) for u in removed), dtype=np.int64)
    top = getattr(graph, "_top_class", None)
    if top is None:         # unit ids are union-find roots, ≥ 0: a mask indexed by them
        top = graph._top_class = max((int(s.classes.max()) for s in graph.slices if len(s.classes)),
                                     default=-1)
    gone = np.zeros(max(top, int(rem.max()) if len(rem) else -1) + 1, dtype=bool)
    gone[rem] = True
    out = {}
    for s in graph.slices:
        keep = ~gone[s.classes]
        out.setdefault(s.param, []).append((s.axis, keep))
    return out


def axis_keeps(keeps):
    """``[(axis, keep)]`` with one entry per axis (several slices on one axis: all must keep)."""
    by_axis = {}
    for axis, keep in keeps:
        by_axis[axis] = keep if axis not in by_axis else by_axis[axis] & keep
    return sorted(by_axis.items())


def cut_array(a, keeps):
    """``a`` (numpy) with the indices not kept cut out, axis by axis (``keeps``: ``[(axis,
    keep 1-D bool)]``, each as long as ``a`` along its axis)."""
    for axis, keep in axis_keeps(keeps):
        a = np.compress(keep, a, axis=axis)
    return a


def expand_array(a, keeps, shape):
    """The inverse of :func:`cut_array`: ``a`` scattered into zeros of the full ``shape``."""
    out = np.zeros(shape, dtype=a.dtype)
    index = [slice(None)] * len(shape)
    for axis, keep in axis_keeps(keeps):
        index[axis] = np.flatnonzero(keep)
    out[np.ix_(*[np.arange(n) if isinstance(i, slice) else i for n, i in zip(shape, index)])] = a
    return out


def relative_keeps(old, new):
    """Keeps of ``new`` (units removed now) relative to an array already cut by ``old``:
    ``{param: [(axis, keep over the indices ``old`` kept)]}``, only where something goes."""
    out = {}
    for name, keeps in new.items():
        before = dict(axis_keeps(old.get(name, [])))
        rel = []
        for axis, keep in axis_keeps(keeps):
            r = keep[before[axis]] if axis in before else keep
            if not r.all():
                rel.append((axis, r))
        if rel:
            out[name] = rel
    return out


def _full_mask(shape, keeps):
    m = np.ones(shape, dtype=bool)
    for axis, keep in keeps:
        view = [1] * len(shape)
        view[axis] = len(keep)
        m &= keep.reshape(view)
    return m


def channel_masks(graph, removed, roles=("out", "in", "bias", "scale", "shift", "other")):
    """Elementwise masks ``{param: bool array}`` that zero the slices of the removed units.

    Only parameters with at least one removed slice in ``roles`` are returned (running
    statistics, role ``stat``, are left out by default: they are not trained)."""
    removed = set(int(u) for u in removed)
    by_param = {}
    for s in graph.slices:
        if s.role not in roles:
            continue
        keep = ~np.isin(s.classes, list(removed)) if removed else np.ones(len(s.classes), bool)
        if not keep.all():
            by_param.setdefault(s.param, []).append((s.axis, keep))
    return {p: _full_mask(graph.param_shapes[p], k) for p, k in by_param.items()}


def _np(a):
    return a.asnumpy() if hasattr(a, "asnumpy") else np.asarray(a)


def mask_params(graph, params, removed):
    """A copy of ``params`` with every slice of the removed units set to zero (as NDArrays)."""
    masks = channel_masks(graph, removed, roles=("out", "in", "bias", "scale", "shift", "other", "stat"))
    out = {}
    for name, arr in params.items():
        a = _np(arr)
        if name in masks:
            a = a * masks[name]
        out[name] = mx.nd.array(a, dtype=a.dtype)
    return out


def _rect_counts(keep):
    """Kept size along each axis of a multi-axis keep mask, which must be a product set."""
    if keep.ndim == 1:
        return (int(keep.sum()),)
    counts, proj = [], []
    for ax in range(keep.ndim):
        other = tuple(a for a in range(keep.ndim) if a != ax)
        p = keep.any(axis=other)
        proj.append(p)
        counts.append(int(p.sum()))
    outer = proj[0]
    for p in proj[1:]:
        outer = np.multiply.outer(outer, p)
    if not np.array_equal(outer, keep):
        raise PruningGraphError("a channel split would keep a non-rectangular set of channels")
    return tuple(counts)


def tensor_new_shape(graph, t, removed):
    """Shape of tensor ``t`` once the units in ``removed`` are cut out."""
    if t.ids is None:
        return tuple(t.shape)
    counts = _rect_counts(graph.keep_mask(t.ids, removed))
    k = t.ids.ndim
    return (t.shape[0],) + counts + tuple(t.shape[1 + k:])


def _count_before(keep, pos):
    return int(keep[:pos].sum())


def _reshape_attr(attrs, in_shape, out_shape):
    """The ``shape`` attribute that maps ``in_shape`` to ``out_shape``: the original one when it
    still does (``(0, -4, 2, -1, -2)`` usually does), else explicit dimensions."""
    kw = {k: v for k, v in attrs.items() if k in ("shape", "reverse")}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, outs, _ = mx.sym.reshape(mx.sym.var("x"), **kw).infer_shape(x=in_shape)
        if outs and tuple(outs[0]) == tuple(out_shape):
            return attrs
    except mx.base.MXNetError:
        pass
    new = dict(attrs)
    new["shape"] = str((0,) + tuple(int(d) for d in out_shape[1:]))
    new.pop("reverse", None)
    return new


def shrink(graph, params, removed):
    """Cut the units in ``removed`` out of the graph: a new (symbol, params).

    Parameters
    ----------
    graph : ChannelGraph
        From :func:`~distill.pruning.graph.analyze` on the network that ``params`` belong to.
    params : dict
        name → NDArray or ndarray, every parameter of the graph (``arg`` and ``aux`` merged).
    removed : set of int
        Unit ids (see :func:`~distill.pruning.plan.removed_units`).

    Returns
    -------
    (mx.sym.Symbol, dict)
        The smaller graph and its parameters (NDArrays), checked shape by shape.
    """
    removed = set(int(u) for u in removed)
    frozen = removed & set(graph.frozen)
    if frozen:
        raise PruningGraphError(f"{len(frozen)} removed units are frozen ({graph.frozen[next(iter(frozen))]})")
    keeps = param_keeps(graph, removed)
    new_params = {}
    for name in graph.param_shapes:
        if name not in params:
            raise PruningGraphError(f"parameter {name} is missing")
        new_params[name] = cut_array(_np(params[name]), keeps.get(name, []))
    gj = copy.deepcopy(graph.json)
    nodes = gj["nodes"]
    expected = {key: tensor_new_shape(graph, t, removed) for key, t in graph.tensors.items()}
    for i, node in enumerate(nodes):
        attrs = node.setdefault("attrs", {})
        if node["op"] == "null":
            if node["name"] in new_params and "__shape__" in attrs:
                attrs["__shape__"] = str(tuple(new_params[node["name"]].shape))
            continue
        kind = graph.layer_kind.get(i)
        if kind is not None:
            n_out = expected[(i, 0)][1] if kind != "fc" else expected[(i, 0)][-1]
            if node["op"] == "Convolution":
                attrs["num_filter"] = str(n_out)
                if kind == "depthwise":
                    src = node["inputs"][0]
                    attrs["num_group"] = str(expected[(src[0], src[1])][1])
            else:
                attrs["num_hidden"] = str(n_out)
        rw = graph.rewrites.get(i)
        if rw is None:
            continue
        if rw["kind"] in ("slice_axis", "slice"):
            keep = graph.keep_mask(rw["input"], removed)
            b = _count_before(keep, rw["begin"])
            e = b + int(keep[rw["begin"]:rw["end"]].sum())
            if rw["kind"] == "slice_axis":
                attrs["begin"], attrs["end"] = str(b), str(e)
            else:
                begin = list(_parse(attrs.get("begin"), ()))
                end = list(_parse(attrs.get("end"), ()))
                while len(end) < 2:
                    end.append(None)
                begin[1], end[1] = b, e
                attrs["begin"], attrs["end"] = str(tuple(begin)), str(tuple(end))
        elif rw["kind"] == "reshape":
            src = node["inputs"][0]
            node["attrs"] = _reshape_attr(attrs, expected[(src[0], src[1])], expected[(i, 0)])
    sym = mx.sym.load_json(json.dumps(gj))
    _verify(graph, sym, new_params, expected)
    return sym, {k: mx.nd.array(v, dtype=v.dtype) for k, v in new_params.items()}


def _verify(graph, sym, new_params, expected):
    try:
        by_name, pshapes = _infer_shapes(sym, graph.input_name, graph.input_shape)
    except mx.base.MXNetError as e:
        raise PruningGraphError(f"the shrunk graph does not infer: {str(e).splitlines()[0]}") from None
    for name, a in new_params.items():
        if name in pshapes and tuple(pshapes[name]) != tuple(a.shape):
            raise PruningGraphError(f"parameter {name}: graph expects {pshapes[name]}, sliced to {a.shape}")
    for (i, k), shape in expected.items():
        node = graph.nodes[i]
        if node["op"] == "null":
            continue
        outs = _node_out_shapes(node["name"], by_name)
        if k < len(outs) and tuple(outs[k]) != tuple(shape):
            raise PruningGraphError(f"{node['name']} ({node['op']}): shrunk output {outs[k]}, "
                                    f"plan predicts {shape}")


def shrunk_block(sym, params, input_name="data"):
    """A trainable, hybridized SymbolBlock over the shrunk ``(sym, params)``."""
    net = make_block(sym, params, input_name, trainable=True)
    for name, p in net.collect_params().items():
        if p.shape is None or 0 in p.shape:      # _load_init leaves a SymbolBlock's shapes unset
            p.shape = tuple(params[name].shape)
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def internal_outputs(sym, params, input_name, names, x, train_mode=False):
    """The internal outputs ``names`` of ``sym`` on ``x``, as numpy arrays (``train_mode``:
    BatchNorm on the statistics of its own input)."""
    internals = sym.get_internals()
    group = mx.sym.Group([internals[n] for n in names])
    used = set(group.list_arguments()) | set(group.list_auxiliary_states())
    net = make_block(group, {k: mx.nd.array(_np(v)) for k, v in params.items() if k in used},
                     input_name, trainable=False)
    with mx.autograd.train_mode() if train_mode else mx.autograd.predict_mode():
        outs = net(mx.nd.array(x) if not isinstance(x, mx.nd.NDArray) else x)
    return [o.asnumpy() for o in (outs if isinstance(outs, (list, tuple)) else [outs])]


def first_divergence(graph, sym, params, small_sym, small_params, x, removed, rtol=1e-4):
    """The first layer, in graph order, whose shrunk output differs from the masked one.

    Each layer's masked output, with the removed channels cut out, is compared with the shrunk
    graph's: ``max |Δ| > rtol · max(1, max |masked|)`` is a difference.

    Parameters
    ----------
    sym, params : mx.sym.Symbol, dict
        The masked network (name → NDArray or ndarray).
    small_sym, small_params :
        The shrunk network (:func:`shrink`).
    x : NDArray
        ``(N, C, H, W)`` input.

    Returns
    -------
    (str, float, float) or None
        ``(layer, max |Δ|, scale)``; ``None`` when every layer output agrees.
    """
    small_names = set(small_sym.get_internals().list_outputs())
    keys = []
    for (i, k), t in graph.tensors.items():
        node = graph.nodes[i]
        if k != 0 or node["op"] == "null" or t.ids is None or t.ids.ndim != 1:
            continue
        if node["name"] + "_output" in small_names:
            keys.append((i, node["name"] + "_output", t))
    if not keys:
        return None
    names = [n for _, n, _ in keys]
    big = internal_outputs(sym, params, graph.input_name, names, x)
    small = internal_outputs(small_sym, small_params, graph.input_name, names, x)
    for (i, _, t), a, b in zip(keys, big, small):
        keep = graph.keep_mask(t.ids, removed)
        a = np.compress(keep, a, axis=1)
        if a.shape != b.shape:
            return graph.nodes[i]["name"], float("inf"), 1.0
        scale = max(1.0, float(np.abs(a).max(initial=0.0)))
        diff = float(np.abs(a - b).max(initial=0.0))
        if not diff <= rtol * scale:
            return graph.nodes[i]["name"], diff, scale
    return None
