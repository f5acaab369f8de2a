"""A per-layer latency model of a channel-pruned network: each layer timed alone at its kept widths.

Measuring every candidate allocation as a whole graph is too slow (and, on a busy machine, too
noisy) for a search over per-group ratios. Instead, each weight layer (conv + BatchNorm +
activation, oneDNN-fused as deployed) is rebuilt as a one-layer graph at the input and output
widths a plan leaves it, and timed alone with the per-layer timer of ``distill quantize``
(:func:`distill.quantize.layer_speed._profile`: MXNet's profiler, best of ``repeats``), or, for
a network deployed with ncnn, as a one-layer ncnn net in ncnn's runtime (:class:`NcnnLayerTimer`:
ncnn's fixed per-layer costs, large on small inputs, are not MXNet's). A
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

__all__ = ["LayerLatencyModel", "NcnnLayerTimer", "layer_specs", "ncnn_layer_param"]
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


def _ints(attrs, key, default, n=2):
    """An MXNet tuple attribute (``"(3, 3)"``) as ``n`` ints."""
    v = attrs.get(key)
    if v in (None, "", "()", "None"):
        return (default,) * n
    vals = [int(x) for x in str(v).strip("()[] ").replace(",", " ").split()]
    return tuple(vals * n)[:n] if len(vals) == 1 else tuple(vals)


def _ncnn_act(act):
    """``(fused params, extra layer)`` of an activation after a conv/dense layer, as ncnn's
    converter leaves it: ReLU, leaky ReLU, clip (ReLU6) and sigmoid fused into the layer
    (``9=activation_type``, ``10=activation_params``), PReLU as a layer of its own; other
    activations are not modelled (their cost stays in the fitted constant)."""
    if act is None:
        return "", None
    op, a = act
    kind = a.get("act_type", "relu" if op in ("relu", "Activation") else "leaky")
    if op == "relu" or (op == "Activation" and kind == "relu"):
        return " 9=1", None
    if op == "Activation" and kind == "sigmoid":
        return " 9=4", None
    if op == "clip":
        return f" 9=3 -23310=2,{float(a.get('a_min', 0)):e},{float(a.get('a_max', 6)):e}", None
    if op == "LeakyReLU" and kind == "leaky":
        return f" 9=2 -23310=1,{float(a.get('slope', 0.25)):e}", None
    if op == "LeakyReLU" and kind == "prelu":
        return "", "PReLU"
    return "", None


def _ncnn_input(shape):
    """The ``Input`` line of a one-layer net whose input is ncnn's ``(C, H, W)`` ``shape``
    (``0=w 1=h 2=c``)."""
    return "Input input 0 1 data " + " ".join(f"{k}={v}" for k, v in zip((0, 1, 2), reversed(shape)))


def ncnn_layer_param(spec, cin, cout):
    """``(param text, input shape)`` of ``spec``'s layer alone in ncnn at widths ``cin`` →
    ``cout``: an ``Input`` and the layer as ncnn's converter writes it (BatchNorm folded into
    the bias, the activation fused where ncnn fuses it). The weights are loaded empty
    (``ncnn.DataReaderFromEmpty``): only the time is wanted.

    The input shape is ncnn's ``(C, H, W)`` (``(N,)`` for a dense layer on a vector)."""
    attrs = spec["attrs"]
    in_shape = tuple(spec["in_shape"][1:])
    fused, extra = _ncnn_act(spec["act"])
    if spec["op"] == "Convolution":
        groups = int(attrs.get("num_group", 1))
        if groups > 1 and groups == spec["in"] and groups == spec["out"]:   # depthwise
            groups = cin = cout
        kh, kw = _ints(attrs, "kernel", 1)
        sh, sw = _ints(attrs, "stride", 1)
        dh, dw = _ints(attrs, "dilate", 1)
        ph, pw = _ints(attrs, "pad", 0)
        shape = (cin,) + in_shape[1:]
        kind = "Convolution" if groups == 1 else "ConvolutionDepthWise"
        layer = (f"{kind} layer 1 1 data out 0={cout} 1={kw} 11={kh} 2={dw} 12={dh} 3={sw} 13={sh} "
                 f"4={pw} 14={ph} 5=1 6={cout * (cin // groups) * kh * kw}"
                 + (f" 7={groups}" if groups > 1 else "") + fused)
    else:
        rest = int(np.prod(in_shape)) // max(spec["in"], 1)
        shape = (cin,) + in_shape[1:] if len(in_shape) > 1 else (cin * rest,)
        layer = f"InnerProduct layer 1 1 data out 0={cout} 1=1 2={cout * cin * rest}" + fused
    lines = [_ncnn_input(shape), layer]
    if extra == "PReLU":
        lines[-1] = lines[-1].replace(" data out ", " data pre ")
        lines.append(f"PReLU prelu 1 1 pre out 0={cout}")
    return "7767517\n{} {}\n{}\n".format(len(lines), len(lines) + (extra is not None), "\n".join(lines)), shape


def ncnn_empty_param(shape):
    """``(param text, shape)`` of a net that does nothing on an input of ``shape``: its time is
    the per-call cost every one-layer timing carries."""
    return f"7767517\n2 2\n{_ncnn_input(shape)}\nNoop noop 1 1 data out\n", tuple(shape)


class NcnnLayerTimer:
    """Each layer alone in ncnn's runtime (one thread), as :class:`LayerLatencyModel`'s timer.

    All the widths asked for at once (:meth:`many`) are timed in one child process
    (:func:`distill.export.ncnn_worker.run_tasks`: a crash in ncnn cannot kill this process), in
    alternating rounds, best of ``repeats`` each; the time of an empty net on the same input
    (the call itself: extractor, input, output) is taken off every layer's.

    Parameters
    ----------
    work_dir : str
        Where the exchange files go.
    repeats : int
    threads : int
    """

    def __init__(self, work_dir, repeats=10, threads=1):
        self.work_dir, self.repeats, self.threads = work_dir, repeats, threads
        self.calls = 0
        self.shapes = []            # output shapes of the last call's nets (ncnn's, unpacked)

    def __call__(self, spec, cin, cout, batch=1):
        return self.many([(spec, cin, cout)])[0]

    def many(self, items, rounds=2):
        """ms of each ``(spec, cin, cout)`` in ``items``, less the empty net's on its input."""
        from ..errors import UserError
        from ..export.ncnn_worker import NcnnWorkerError, run_tasks    # lazy: the child's route
        nets = [ncnn_layer_param(spec, cin, cout) for spec, cin, cout in items]
        shapes = sorted({s for _, s in nets})
        empties = [ncnn_empty_param(s) for s in shapes]
        task = {"task": "layers", "nets": [{"param": p, "shape": list(s)} for p, s in nets + empties],
                "rounds": int(rounds), "repeats": int(self.repeats), "threads": int(self.threads)}
        try:
            res = run_tasks([task], {}, self.work_dir)
        except NcnnWorkerError as e:
            raise UserError(f"--backend ncnn: ncnn's runtime failed timing {len(items)} one-layer nets "
                            f"(each layer alone, for the latency model): {e}. Use --backend mxnet, or export the "
                            f"model (`distill export --format ncnn`) to see the failing layer.") from None
        self.calls += 1
        ms = res[0]["meta"]["ms"]
        self.shapes = [tuple(s) for s in res[0]["meta"]["shapes"][:len(nets)]]
        empty = dict(zip(shapes, ms[len(nets):]))
        return [max(t - empty[s], 0.0) for t, (_, s) in zip(ms[:len(nets)], nets)]


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
            self._time([key])
        return min(self.times[key], self.times[full])

    def _time(self, keys):
        """Time the ``(layer, cin, cout)`` in ``keys`` and their layers' full widths, in
        alternating rounds (all at once when the timer has ``many``)."""
        todo = []
        for layer, cin, cout in keys:
            spec = self.specs[layer]
            for k in ((layer, spec["in"], spec["out"]), (layer, cin, cout)):
                if k not in todo:
                    todo.append(k)
        if hasattr(self.timer, "many"):
            ms = self.timer.many([(self.specs[k[0]], k[1], k[2]) for k in todo], rounds=self.rounds)
            for k, t in zip(todo, ms):
                self.times[k] = min(self.times.get(k, float("inf")), float(t))
            self.timings += len(todo) * self.rounds
            return
        for _ in range(self.rounds):
            for k in todo:
                t = float(self.timer(self.specs[k[0]], k[1], k[2], self.batch))
                self.times[k] = min(self.times.get(k, float("inf")), t)
                self.timings += 1

    def prefetch(self, removals):
        """Time, at once, every width a layer can take when the groups are cut as in any of
        ``removals`` (sets of removed units; each group alone at each of its levels, say), in
        every combination of its input and output widths: one run of a timer with ``many``
        (ncnn's child process) instead of one per width. Returns the number of widths timed."""
        cins, couts = {}, {}
        for removed in list(removals) + [set()]:
            for layer, (ci, co) in self.widths(removed).items():
                cins.setdefault(layer, set()).add(ci)
                couts.setdefault(layer, set()).add(co)
        keys = [(l, ci, co) for l in self.specs for ci in sorted(cins[l]) for co in sorted(couts[l])
                if (l, ci, co) not in self.times]
        if keys:
            self._time(keys)
        return len(keys)

    def layers_ms(self, removed=()):
        """Sum of the layers' own times, remembered per set of removed units (a full width's
        best time can still fall a little as later widths alternate with it: a sum keeps the
        times it was made with)."""
        key = frozenset(removed)
        if key not in self._sums:
            widths = self.widths(key)
            new = [(l, ci, co) for l, (ci, co) in widths.items() if (l, ci, co) not in self.times]
            if new:                 # all at once: one child process for ncnn's timer
                self._time(new)
            self._sums[key] = sum(self.layer_ms(l, ci, co) for l, (ci, co) in widths.items())
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
