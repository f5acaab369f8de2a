"""The fake-quantized twin of MXNet's oneDNN int8 graph: where it quantizes, and the fp32 graph
that rounds there.

Analyse, plan, apply. :func:`quant_plan` reads the real int8 graph that
:func:`distill.quantize.graph.quantize` builds (so it is MXNet that decides, not a copy of its
rules): every tensor the int8 graph holds in 8 bits (``collector.include_layer``: the input and
each fused conv + BN + act (+ add) node's output), whether MXNet stores it as uint8 or int8 (the
dtype the int8 graph infers: uint8 after a fused ReLU/ReLU6, int8 otherwise; the input by the
sign of its range), which weight layers run in int8, and which average poolings re-round.
:func:`fake_quant_symbol` then rebuilds the *original* fp32 graph node by node with

* the input and each quantized tensor through a learned-step quantizer (LSQ, Esser et al. 2020)
  ``clip(round_ste(x / s), lo, hi) * s`` (``[-128, 127]`` int8, ``[0, 255]`` uint8; MXNet's
  step is the range over 127.5 or 255.5, ``quantization_utils.h``), ``s``
  trained with the weights (``mx.sym.contrib.round_ste``: straight-through gradient);
* each int8 weight layer's weights folded with its BatchNorm (``W·γ/√(σ²+ε)``, what oneDNN's
  fusion computes) and quantized per output channel, symmetric, with MXNet's own scale
  ``max|W_c| / 127.5``; the convolution's output is divided back by the BN scale and the BN node
  kept (Krishnamoorthi 2018, §3.2): with batch statistics while they train, and with frozen
  running statistics the product is exactly the folded conv MXNet deploys.

Thresholds go back as ``{fused output name: (min, max)}`` (:meth:`QuantPlan.thresholds`), the
table :func:`~distill.quantize.graph.quantize` calibrates with, so the exported int8 graph is the
trained one.
"""
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import mxnet as mx
import numpy as np

from ..graph import quantize

__all__ = ["QuantPoint", "WeightQuant", "QuantPlan", "quant_plan", "fake_quant_symbol",
           "SCALE_SUFFIX", "fq_weight_nd"]
_LOGGER = logging.getLogger(__name__)

SCALE_SUFFIX = "_qscale"
_INT8_RANGE = 127.5      # MXNet's kInt8Range: weight step max|W_c| / 127.5
_PASS = ("Flatten", "Reshape", "flatten", "reshape", "Dropout", "transpose", "expand_dims")


@dataclass
class QuantPoint:
    """One tensor the int8 graph holds in 8 bits.

    Attributes
    ----------
    node : str
        Node of the original graph whose (first) output it is; the input variable for ``data``.
    fused : str
        Its name in the thresholds table (``sg_mkldnn_conv_bn_act_3_output``, ``data``).
    unsigned : bool
        uint8 (``[0, 255]``) as MXNet stores it, else int8 (``[-128, 127]``).
    threshold : float
        The range's end ``max(|min|, |max|)`` the quantizer starts from (the PTQ calibration).
    cap : float or None
        The ``a_max`` of a fused ReLU6-style ``clip``: oneDNN drops that activation and lets the
        uint8 saturation cut, so the range must not grow past it.
    """
    node: str
    fused: str
    unsigned: bool
    threshold: float
    cap: Optional[float] = None

    @property
    def levels(self):
        """MXNet's ``kUint8Range`` / ``kInt8Range`` (``quantization_utils.h``): the step is
        ``threshold / 255.5`` or ``threshold / 127.5``, the codes saturate at 255 or ±127/-128."""
        return 255.5 if self.unsigned else 127.5

    @property
    def bounds(self):
        return (0.0, 255.0) if self.unsigned else (-128.0, 127.0)

    @property
    def scale_name(self):
        return self.node + SCALE_SUFFIX


@dataclass
class WeightQuant:
    """An int8 weight layer: ``node`` (Convolution / FullyConnected), the BatchNorm folded into it
    (``bn``, or None) and whether its scales are per output channel."""
    node: str
    bn: Optional[str]
    channelwise: bool


@dataclass
class QuantPlan:
    """Where the fake-quantized graph rounds (plain data; see the module docstring)."""
    points: Dict[str, QuantPoint]
    weights: Dict[str, WeightQuant]
    avg_pools: List[str] = field(default_factory=list)
    excluded: List[str] = field(default_factory=list)

    def initial_scales(self):
        """``{scale parameter name: np.ndarray (1,)}``: step ``threshold / levels``."""
        return {p.scale_name: np.array([max(p.threshold, 1e-8) / p.levels], np.float32)
                for p in self.points.values()}

    def thresholds(self, scales):
        """The calibration table of the learned steps ``scales`` (name → NDArray or array)."""
        out = {}
        for p in self.points.values():
            s = scales[p.scale_name]
            s = float(abs(np.asarray(s.asnumpy() if hasattr(s, "asnumpy") else s).reshape(-1)[0]))
            th = max(s, 1e-12) * p.levels
            th = min(th, p.cap) if p.cap else th
            out[p.fused] = (0.0, th) if p.unsigned else (-th, th)
        return out

    def to_dict(self):
        return {"points": [vars(p) for p in self.points.values()],
                "weights": [vars(w) for w in self.weights.values()],
                "avg_pools": list(self.avg_pools), "excluded": list(self.excluded)}


def _inner_ops(fused_json):
    """fused node name → its subgraph's op nodes, in order (empty for an unfused node)."""
    out = {}
    for node in fused_json["nodes"]:
        if node["op"] == "null":
            continue
        subs = node.get("subgraphs") or []
        out[node["name"]] = [n for n in subs[0]["nodes"] if n["op"] != "null"] if subs else []
    return out


def _int8_dtypes(qsym, input_name, input_shape):
    """Output name → numpy dtype of every internal output of the int8 graph."""
    internals = qsym.get_internals()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, out_types, _ = internals.infer_type(**{input_name: np.float32})
    return dict(zip(internals.list_outputs(), out_types))


def quant_plan(model, thresholds, excluded=(), granularity="channel-wise"):
    """Read the int8 graph MXNet builds for ``model`` and return where it quantizes.

    Parameters
    ----------
    model : FloatModel
    thresholds : dict
        The PTQ calibration (fused output name → ``(min, max)``): the quantizers' start.
    excluded : iterable of str
        Layers kept fp32 (as :func:`~distill.quantize.graph.quantize` takes them).
    granularity : str
        FullyConnected weight scales (convolutions: per channel, as MXNet 1.9 does).

    Returns
    -------
    QuantPlan
    """
    g = quantize(model, thresholds, excluded, granularity)
    fused = json.loads(model.fused.tojson())
    inner = _inner_ops(fused)
    dtypes = _int8_dtypes(g.symbol, model.input_name, (1,) + model.input_shape)
    qnodes = {n["name"]: n for n in json.loads(g.symbol.tojson())["nodes"] if n["op"] != "null"}
    points = {}
    for name in g.calib_layers:
        lo, hi = thresholds[name]
        th = max(abs(float(lo)), abs(float(hi)))
        if name == model.input_name:
            points[name] = QuantPoint(name, name, float(lo) >= 0.0, th)
            continue
        fname = name[:-len("_output")] if name.endswith("_output") else name
        ops = inner.get(fname)
        node = ops[-1]["name"] if ops else fname
        dt = dtypes.get(f"quantized_{fname}_output")
        # a quantized fused node stores what its dtype says; a tensor entering int8 through
        # quantize_v2 (out_type auto) is uint8 when its range is non-negative
        unsigned = (np.dtype(dt) == np.uint8) if dt is not None else float(lo) >= 0.0
        cap = None
        if ops and ops[-1]["op"] == "clip" and unsigned:
            cap = float(ops[-1].get("attrs", {}).get("a_max", 0)) or None
        points[node] = QuantPoint(node, name, bool(unsigned), th, cap)
    weights, pools = {}, []
    for fname, ops in inner.items():
        if f"quantized_{fname}" not in qnodes:
            continue
        if not ops:                          # an unfused op run in int8
            node = next(n for n in fused["nodes"] if n["name"] == fname)
            if node["op"] == "Pooling" and node.get("attrs", {}).get("pool_type", "max") == "avg":
                pools.append(fname)
            continue
        for k, op in enumerate(ops):
            if op["op"] in ("Convolution", "FullyConnected"):
                nxt = ops[k + 1] if k + 1 < len(ops) else None
                bn = nxt["name"] if nxt is not None and nxt["op"] == "BatchNorm" else None
                cw = op["op"] == "Convolution" or granularity == "channel-wise"
                weights[op["name"]] = WeightQuant(op["name"], bn, cw)
    return QuantPlan(points, weights, pools, list(excluded))


def _quantizer(x, scale, levels_lo, levels_hi, grad_scale):
    """``clip(round_ste(x / s), lo, hi) * s`` with LSQ's step-gradient scale ``grad_scale``."""
    s = mx.sym.abs(scale) + 1e-12
    s = mx.sym.BlockGrad(s - s * grad_scale) + s * grad_scale   # value s, gradient × grad_scale
    q = mx.sym.clip(mx.sym.contrib.round_ste(mx.sym.broadcast_div(x, s)), levels_lo, levels_hi)
    return mx.sym.broadcast_mul(q, s)


def _weight_quantizer(w, channelwise):
    """Symmetric int8 with MXNet's scale ``max|W_c| / 127.5`` (per output channel or tensor).
    The scale is not trained: MXNet recomputes it from the weights it loads."""
    a = mx.sym.abs(w)
    amax = mx.sym.max(a, axis=0, exclude=True, keepdims=True) if channelwise else mx.sym.max(a)
    s = mx.sym.BlockGrad(mx.sym.maximum(amax, 1e-12)) / _INT8_RANGE
    q = mx.sym.clip(mx.sym.contrib.round_ste(mx.sym.broadcast_div(w, s)), -128.0, 127.0)
    return mx.sym.broadcast_mul(q, s)


def fq_weight_nd(w, channelwise=True):
    """The weight quantizer on an NDArray (tests; same arithmetic as the graph's)."""
    a = mx.nd.abs(w)
    amax = mx.nd.max(a, axis=0, exclude=True, keepdims=True) if channelwise else mx.nd.max(a)
    s = mx.nd.maximum(amax, 1e-12) / _INT8_RANGE
    return mx.nd.broadcast_mul(mx.nd.clip(mx.nd.contrib.round_ste(mx.nd.broadcast_div(w, s)), -128, 127), s)


def _op(name):
    fn = getattr(mx.sym, name, None) or getattr(mx.sym._internal, name, None)
    if fn is None:
        fn = getattr(mx.sym.contrib, name.replace("_contrib_", ""), None)
    if fn is None:
        raise RuntimeError(f"fake quantization: no mx.sym operator {name!r}")
    return fn


def _true(v, default):
    return (str(v) if v is not None else default).lower() in ("true", "1")


def fake_quant_symbol(symbol, plan, input_name="data", freeze_bn=False, input_shape=None):
    """The fp32 graph ``symbol`` with the fake quantization of ``plan``.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The original (unfused) fp32 graph: what the student trains as.
    plan : QuantPlan
    freeze_bn : bool
        BatchNorm with its running statistics also in training (``use_global_stats``).
    input_shape : tuple, optional
        ``(C, H, W)``; gives LSQ's per-tensor gradient scale ``1/√(elements × levels)``.

    Returns
    -------
    mx.sym.Symbol
        Same outputs as ``symbol``; new arguments: one ``<node>_qscale`` (shape ``(1,)``) per
        quantized tensor.
    """
    graph = json.loads(symbol.tojson())
    nodes = graph["nodes"]
    sizes = {}
    if input_shape is not None:
        internals = symbol.get_internals()
        _, shapes, _ = internals.infer_shape(**{input_name: (1,) + tuple(input_shape)})
        sizes = {n[:-len("_output")]: int(np.prod(s)) for n, s in zip(internals.list_outputs(), shapes)
                 if n.endswith("_output")}
        sizes[input_name] = int(np.prod(input_shape))
    outs, quant_of = {}, {}

    def fq(sym, point):
        lo, hi = point.bounds
        numel = sizes.get(point.node, 0)
        g = 1.0 / math.sqrt(numel * point.levels) if numel else 1.0
        scale = mx.sym.var(point.scale_name, shape=(1,))
        if point.cap:
            scale = mx.sym.minimum(mx.sym.abs(scale), point.cap / point.levels)
        return _quantizer(sym, scale, lo, hi, g)

    # variables first: a BN's gamma and variance come after the conv they fold into
    variables = {i: mx.sym.var(n["name"]) for i, n in enumerate(nodes) if n["op"] == "null"}
    for i, n in enumerate(nodes):
        name, op, attrs = n["name"], n["op"], dict(n.get("attrs", {}))
        if op == "null":
            s = variables[i]
            if name in plan.points:
                quant_of[name] = plan.points[name]
                s = fq(s, plan.points[name])
            outs[i] = [s]
            continue
        ins = [outs[j][k] for j, k, *_ in n["inputs"]]
        src_quant = quant_of.get(nodes[n["inputs"][0][0]]["name"]) if n["inputs"] else None
        if name in plan.weights:
            wq = plan.weights[name]
            x, w = ins[0], ins[1]
            bias = ins[2] if len(ins) > 2 and not _true(attrs.get("no_bias"), "false") else None
            scale = None
            if wq.bn:
                bn = next(b for b in nodes if b["name"] == wq.bn)
                battrs = bn.get("attrs", {})
                gamma = variables[bn["inputs"][1][0]]
                var = variables[bn["inputs"][4][0]]
                eps = float(battrs.get("eps", 1e-3))
                inv = mx.sym.rsqrt(var + eps)
                scale = inv if _true(battrs.get("fix_gamma"), "true") else gamma * inv
                scale = scale + (scale == 0) * 1e-12        # a dead channel must not divide by 0
            shape = (-1, 1, 1, 1) if op == "Convolution" else (-1, 1)
            wf = mx.sym.broadcast_mul(w, mx.sym.reshape(scale, shape)) if scale is not None else w
            wf = _weight_quantizer(wf, wq.channelwise)
            kw = {k: v for k, v in attrs.items() if k != "no_bias"}
            y = _op(op)(x, wf, name=name, no_bias=True, **kw)
            bshape = (1, -1, 1, 1) if op == "Convolution" else (1, -1)
            if scale is not None:
                y = mx.sym.broadcast_div(y, mx.sym.reshape(scale, bshape))
            if bias is not None:
                y = mx.sym.broadcast_add(y, mx.sym.reshape(bias, bshape))
            outs[i] = [y]
        else:
            if op == "BatchNorm" and freeze_bn:
                attrs["use_global_stats"] = "True"
            s = _op(op)(*ins, name=name, **attrs)
            k = len(s.list_outputs())
            outs[i] = [s[j] for j in range(k)] if k > 1 else [s]
            if op in _PASS and src_quant is not None:
                quant_of[name] = src_quant
            if name in plan.avg_pools and src_quant is not None:
                # MXNet's int8 average pooling keeps its input's range and rounds its output
                outs[i] = [fq(outs[i][0], src_quant)]
                quant_of[name] = src_quant
            elif op == "Pooling" and src_quant is not None:
                quant_of[name] = src_quant
        if name in plan.points:
            quant_of[name] = plan.points[name]
            outs[i] = [fq(outs[i][0], plan.points[name])] + outs[i][1:]
    heads = [outs[j][k] for j, k, *_ in graph["heads"]]
    return heads[0] if len(heads) == 1 else mx.sym.Group(heads)
