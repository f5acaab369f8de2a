"""A per-layer latency model of a channel-pruned network: each layer timed alone at its kept widths.

Measuring every candidate allocation as a whole graph is too slow (and, on a busy machine, too
noisy) for a search over per-group ratios. Instead, each weight layer (conv + BatchNorm +
activation, oneDNN-fused as deployed) is rebuilt as a one-layer graph at the input and output
widths a plan leaves it, and timed alone with the per-layer timer of ``distill quantize``
(:func:`distill.quantize.layer_speed._profile`: MXNet's profiler, best of ``repeats``). A
network's predicted time is affine in the sum over its layers, ``a · Σ + c``, fitted to two
measured whole graphs (the unpruned network and one variant, timed in alternation):
``c`` is the rest that does not shrink with the layers (the engine's per-op overhead, pooling;
negative when the layers timed alone carry a fixed per-call cost the deployed graph does not),
``a`` absorbs the gap between the profiler's best per-op times and wall-clock timings on a busy
machine (or another runtime's, for ncnn). With one point only, ``a`` scales the sum alone.
:meth:`LayerLatencyModel.coverage` says how much of the measured graph the layers' own sum
explains; callers check the model against a *third*, measured proposal.

Every width is timed in alternation with the layer's full width and both keep their best, and a
narrower layer is never taken as slower than the full one: a variant cannot come out slower than
the unpruned network through timer noise alone.
"""
import json
import logging

import mxnet as mx
import numpy as np

from ..quantize.layer_speed import _profile
from .apply import param_keeps

__all__ = ["LayerLatencyModel", "layer_specs"]
_LOGGER = logging.getLogger(__name__)

_FUSED_ACTS = ("Activation", "relu", "clip", "LeakyReLU")


def layer_specs(symbol, input_shape, input_name="data"):
    """Per conv/dense layer, what its one-layer graph needs.

    Returns
    -------
    dict
        layer name → ``{"op", "attrs", "weight", "in_shape" (batch 1), "out": channels,
        "in": channels, "bn": bool, "act": (op, attrs) or None}``.
    """
    graph = json.loads(symbol.tojson())
    nodes = graph["nodes"]
    internals = symbol.get_internals()
    _, out_shapes, _ = internals.infer_shape(**{input_name: tuple(input_shape)})
    shape_of = dict(zip(internals.list_outputs(), out_shapes))
    consumers = {}
    for i, n in enumerate(nodes):
        for src, _, _ in n["inputs"]:
            consumers.setdefault(src, []).append(i)
    specs = {}
    for i, n in enumerate(nodes):
        if n["op"] not in ("Convolution", "FullyConnected") or len(n["inputs"]) < 2:
            continue
        src = nodes[n["inputs"][0][0]]
        src_name = src["name"] if src["op"] == "null" else f"{src['name']}_output"
        in_shape = tuple(shape_of.get(src_name, ()))
        w = nodes[n["inputs"][1][0]]
        if not in_shape or w["op"] != "null":
            continue
        out = tuple(shape_of[f"{n['name']}_output"])
        bn, act, cur = False, None, i
        nxt = consumers.get(cur, [])
        if len(nxt) == 1 and nodes[nxt[0]]["op"] == "BatchNorm":
            bn, cur = True, nxt[0]
            nxt = consumers.get(cur, [])
        if len(nxt) == 1 and nodes[nxt[0]]["op"] in _FUSED_ACTS:
            a = nodes[nxt[0]]
            act = (a["op"], dict(a.get("attrs", {})))
        specs[n["name"]] = {"op": n["op"], "attrs": dict(n.get("attrs", {})), "weight": w["name"],
                            "in_shape": in_shape, "in": in_shape[1], "out": out[1], "bn": bn,
                            "act": act}
    return specs


def _one_layer(spec, cin, cout, batch):
    """``(symbol, shapes)`` of ``spec``'s layer alone at widths ``cin`` → ``cout``."""
    attrs = dict(spec["attrs"])
    shape = (batch,) + tuple(spec["in_shape"][1:])
    if spec["op"] == "Convolution":
        groups = int(attrs.get("num_group", 1))
        if groups > 1 and groups == spec["in"] and groups == spec["out"]:   # depthwise
            attrs["num_group"] = str(cout)
            cin = cout
        attrs["num_filter"] = str(cout)
        shape = (batch, cin) + shape[2:]
    else:
        attrs["num_hidden"] = str(cout)
        # a flattening dense layer reads C·H·W values: the kept fraction of its channels
        rest = int(np.prod(shape[1:])) // max(spec["in"], 1)
        shape = (batch, cin * rest) if len(shape) == 2 else (batch, cin) + shape[2:]
    data = mx.sym.var("data")
    op = getattr(mx.sym, spec["op"])
    y = op(data, name="layer", **attrs)
    if spec["bn"]:
        y = mx.sym.BatchNorm(y, name="layer_bn")
    if spec["act"] is not None:
        y = getattr(mx.sym, spec["act"][0])(y, **spec["act"][1])
    return y.get_backend_symbol("MKLDNN_QUANTIZE"), {"data": shape}


def _random_params(sym, shapes):
    args, _, auxs = sym.infer_shape(**shapes)
    rng = np.random.RandomState(0)
    out = {}
    for name, s in list(zip(sym.list_arguments(), args)) + list(zip(sym.list_auxiliary_states(), auxs)):
        if name not in shapes:
            v = rng.uniform(0.5, 1.0, size=s) if name.endswith("_var") else rng.normal(0, 0.1, size=s)
            out[name] = mx.nd.array(v.astype("float32"))
    return out


class LayerLatencyModel:
    """Predicted latency (ms) of channel-pruned variants of one network, layer by layer.

    Parameters
    ----------
    graph : ChannelGraph
        The dependency analysis of the network (units → parameter slices).
    symbol : mx.sym.Symbol
        The unpruned network.
    input_shape : tuple
        ``(1, C, H, W)``.
    input_name : str
    batch : int
        Batch size of the timings.
    repeats, warmup : int
        Per-layer timing: best of ``repeats`` profiled runs after ``warmup``.
    rounds : int
        Alternating rounds of (full width, this width) per new width.
    timer : callable, optional
        ``timer(spec, cin, cout, batch) -> ms`` instead of MXNet's profiler (tests inject one).
    """

    def __init__(self, graph, symbol, input_shape, input_name="data", batch=32, repeats=10,
                 warmup=3, rounds=2, timer=None):
        self.graph, self.batch = graph, batch
        self.repeats, self.warmup, self.rounds = repeats, warmup, rounds
        self.specs = layer_specs(symbol, input_shape, input_name)
        self.timer = timer or self._profile
        self.times = {}                   # (layer, cin, cout) -> best ms so far
        self._sums = {}                   # frozenset(removed) -> Σ layers
        self.scale, self.offset = 1.0, 0.0
        self.base_layers_ms = self.measured_base_ms = None
        self.timings = 0

    def _profile(self, spec, cin, cout, batch):
        sym, shapes = _one_layer(spec, cin, cout, batch)
        return sum(_profile(sym, _random_params(sym, shapes), shapes, self.repeats, self.warmup).values())

    def widths(self, removed):
        """layer → ``(cin, cout)`` once the units ``removed`` are cut out."""
        keeps = param_keeps(self.graph, removed)
        out = {}
        for layer, spec in self.specs.items():
            cin, cout = spec["in"], spec["out"]
            for axis, keep in keeps.get(spec["weight"], []):
                if axis == 0:
                    cout = int(keep.sum())
                elif axis == 1:
                    groups = int(spec["attrs"].get("num_group", 1))
                    cin = int(keep.sum()) * groups
            out[layer] = (cin, cout)
        return out

    def layer_ms(self, layer, cin, cout):
        """Best time of ``layer`` at ``cin`` → ``cout``, timed (alternating with its full width)
        on first use; never above the full width's."""
        spec = self.specs[layer]
        full = (layer, spec["in"], spec["out"])
        key = (layer, cin, cout)
        if key not in self.times:
            for _ in range(self.rounds):
                for k in ((full, key) if key != full else (full,)):
                    t = float(self.timer(spec, k[1], k[2], self.batch))
                    self.times[k] = min(self.times.get(k, float("inf")), t)
                    self.timings += 1
        return min(self.times[key], self.times[full])

    def layers_ms(self, removed=()):
        """Sum of the layers' own times, remembered per set of removed units (a full width's
        best time can still fall a little as later widths alternate with it: a sum keeps the
        times it was made with)."""
        key = frozenset(removed)
        if key not in self._sums:
            self._sums[key] = sum(self.layer_ms(l, ci, co) for l, (ci, co) in self.widths(key).items())
        return self._sums[key]

    def calibrate(self, measured_ms, variant=None):
        """Fit ``a · Σ layers + c`` to the measured unpruned whole graph (and ``variant``:
        ``(removed units, measured ms)``, timed in alternation with it); returns ``(a, c)``."""
        self.base_layers_ms = self.layers_ms(set())
        self.measured_base_ms = float(measured_ms)
        self.scale = self.measured_base_ms / max(self.base_layers_ms, 1e-12)
        self.offset = 0.0
        if variant is not None:
            lv, mv = self.layers_ms(variant[0]), float(variant[1])
            if self.base_layers_ms - lv > 1e-9:
                a = (self.measured_base_ms - mv) / (self.base_layers_ms - lv)
                c = self.measured_base_ms - a * self.base_layers_ms
                # c < 0: the timed layers carry a fixed cost per call that the deployed graph
                # does not (MXNet's per-op overhead at batch 1 against ncnn); a line that
                # does not rise with the layers is noise: scale alone
                if a > 0 and abs(c) < self.measured_base_ms:
                    self.scale, self.offset = a, c
        return self.scale, self.offset

    def refit(self, points):
        """Least-squares ``a · Σ layers + c`` through the unpruned graph and every measured variant
        in ``points`` (``[(removed units, fraction of the unpruned graph's time)]``, each timed in
        alternation with it); a line that does not rise with the layers keeps the current fit.
        Returns ``(a, c)``."""
        if self.measured_base_ms is None or not points:
            return self.scale, self.offset
        xs = [self.base_layers_ms] + [self.layers_ms(r) for r, _ in points]
        ys = [self.measured_base_ms] + [float(f) * self.measured_base_ms for _, f in points]
        if np.ptp(xs) > 1e-9:
            a, c = np.polyfit(xs, ys, 1)
            if a > 0 and abs(c) < self.measured_base_ms:
                self.scale, self.offset = float(a), float(c)
        return self.scale, self.offset

    def coverage(self):
        """Σ layers alone / measured unpruned graph (1 = the layers explain all of it)."""
        return self.base_layers_ms / max(self.measured_base_ms, 1e-9)

    def predict(self, removed):
        """Predicted ms of the network without the units ``removed``."""
        # a line fitted through two points may extrapolate below zero for deeper cuts
        return max(self.layers_ms(removed) * self.scale + self.offset, 0.01 * self.measured_base_ms
                   if self.measured_base_ms else 0.0)
