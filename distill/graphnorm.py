"""Loaded-graph normalisation: what real-world MXNet checkpoints need before any command uses them.

:func:`normalise` is applied by :func:`distill.graphio.load_pair` to every (symbol, params) pair
a command reads, so training, inspection, export and quantization see the same graph. Each
rewrite leaves the graph's function unchanged and keeps every layer name a recipe can refer to
(taps, ``exclude`` patterns, the classifier); each is idempotent, because our own saved students
are loaded again:

* **fix_gamma BatchNorm** (``fix_gamma=True``, MXNet's symbol default): MXNet ignores gamma
  (treats it as 1) but checkpoints trained with weight decay carry gamma ≠ 1
  (apache/mxnet#9624). The stored gammas are set to 1, so exporters, shrinking and folding all
  read what MXNet computes.
* **Flatten before FullyConnected**: a FullyConnected with ``flatten`` true (MXNet's default)
  on a 4-D input, hybridized with ``backend='MKLDNN'``, fails on its second call in MXNet 1.9.1
  ("We can't generate TBlob for MKLDNN data"). An explicit ``Flatten`` (a no-op on a 2-D
  input, so no shape is needed) avoids it.
* **global pool kernels** (only when the input shape is known, :func:`fit_global_pools`):
  MXNet's quantized pooling checks the stored kernel even with ``global_pool=True``, so a
  kernel larger than the map fails calibration; the kernel is set to the map's size.

The module also reads what a graph says about its input: the channels its first layer takes
(:func:`input_channels`), a size its parameters pin (:func:`pinned_size`), and an in-graph
normalisation (:func:`input_normalisation`) that the data's ``mean``/``std`` must not repeat.

Ground floor: imports nothing of the project.
"""
import contextlib
import io
import json
import logging
from dataclasses import dataclass, field
from typing import List

import mxnet as mx
import numpy as np

__all__ = ["Normalised", "normalise", "unit_fixed_gammas", "flatten_before_fc", "fit_global_pools",
           "fc_on_nd_input", "input_channels", "pinned_size", "input_normalisation",
           "InputNormalisation", "RAW_PIXELS_STD", "describe_shape", "format_values",
           "infer_shape_quiet", "relu_min_for_clip"]
_LOGGER = logging.getLogger(__name__)
_SAID = set()     # (where, note) already logged by this process

BN_OPS = ("BatchNorm", "BatchNorm_v1", "_contrib_SyncBatchNorm")
# Ops whose output has the rank of their (first) input: a 2-D input stays 2-D.
_RANK_KEEPING = {"Activation", "LeakyReLU", "Dropout", "relu", "sigmoid", "tanh", "softsign",
                 "Cast", "cast", "_copy", "identity", "clip", "softmax", "log_softmax",
                 "SoftmaxActivation", "L2Normalization", "_mul_scalar", "_div_scalar",
                 "_plus_scalar", "_minus_scalar", "_rminus_scalar", "_rdiv_scalar",
                 "elemwise_add", "elemwise_sub", "elemwise_mul", "_plus", "_minus", "_mul",
                 "broadcast_add", "broadcast_mul", "broadcast_sub", "add_n", "ElementWiseSum"} \
    | set(BN_OPS)
# Ops between the input and its first weight layer that keep its channels.
_CHANNEL_KEEPING = {"_mul_scalar", "_div_scalar", "_plus_scalar", "_minus_scalar",
                    "_rminus_scalar", "_rdiv_scalar", "Activation", "Dropout", "relu", "Cast",
                    "cast", "_copy", "identity", "clip"}
# 1/255: fed to a graph that expects raw 0..255 pixels, (x - 0) / (1/255) undoes our [0, 1] scaling.
RAW_PIXELS_STD = 1.0 / 255.0


def _parse_bool(value, default):
    if value is None:
        return default
    return str(value).strip().lower() in ("true", "1")


def _parse_tuple(value):
    if value is None or str(value).strip() in ("", "()", "None"):
        return ()
    return tuple(int(v) for v in str(value).strip("()[] ").replace(" ", "").split(",") if v)


def infer_shape_quiet(symbol, **shapes):
    """``symbol.infer_shape(**shapes)`` without the argument dump MXNet prints to stdout on
    failure (a CLI user would see hundreds of lines before our one-paragraph error)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return symbol.infer_shape(**shapes)


def _graph(symbol):
    return json.loads(symbol.tojson())


def _load(graph):
    graph["arg_nodes"] = [i for i, n in enumerate(graph["nodes"]) if n["op"] == "null"]
    graph.pop("node_row_ptr", None)          # recomputed by MXNet from the node list
    return mx.sym.load_json(json.dumps(graph))


@dataclass
class Normalised:
    """What :func:`normalise` changed (layer names), for logs and ``distill inspect``."""
    unit_gammas: List[str] = field(default_factory=list)
    flattened: List[str] = field(default_factory=list)
    pools: List[str] = field(default_factory=list)

    def notes(self):
        """One sentence per kind of change (empty when nothing changed)."""
        out = []
        if self.unit_gammas:
            out.append(f"fix_gamma BatchNorm {', '.join(self.unit_gammas)}: stored gamma set to 1 "
                       f"(MXNet ignores it; exporters and shrinking read it)")
        if self.flattened:
            out.append(f"Flatten inserted before FullyConnected {', '.join(self.flattened)} "
                       f"(same output; avoids MXNet 1.9.1's oneDNN 'TBlob for MKLDNN data' crash)")
        if self.pools:
            out.append(f"global pool {', '.join(self.pools)}: kernel set to its input size "
                       f"(MXNet's int8 pooling checks the stored kernel)")
        return out


def normalise(symbol, params, input_shape=None, input_name="data", where="graph"):
    """The graph as every command should see it (see the module docstring).

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The logits graph.
    params : dict
        name → NDArray; not modified (a new dict is returned).
    input_shape : tuple, optional
        ``(N, C, H, W)`` or ``(C, H, W)`` of the input: global pool kernels are fitted only when
        it is given.
    where : str
        Names the graph in the log lines.

    Returns
    -------
    symbol, params, Normalised
    """
    params, gammas = unit_fixed_gammas(symbol, params)
    symbol, flat = flatten_before_fc(symbol)
    pools = []
    if input_shape is not None:
        symbol, pools = fit_global_pools(symbol, input_shape, input_name)
    done = Normalised(gammas, flat, pools)
    for note in done.notes():
        # the same file is normalised on every load (training, int8, export): said once
        if (where, note) not in _SAID:
            _SAID.add((where, note))
            _LOGGER.info("%s: %s", where, note)
    return symbol, params, done


def unit_fixed_gammas(symbol, params):
    """``params`` with the gamma of every ``fix_gamma=True`` BatchNorm set to 1.

    Returns
    -------
    params : dict
        A new dict (arrays not changed are shared).
    changed : list of str
        The BatchNorm layers whose stored gamma was not already 1.
    """
    nodes = _graph(symbol)["nodes"]
    out, changed = dict(params), []
    for node in nodes:
        # MXNet's BatchNorm defaults to fix_gamma=True: a symbol-API graph often omits it
        if node["op"] not in BN_OPS or not _parse_bool(node.get("attrs", {}).get("fix_gamma"), True):
            continue
        if len(node["inputs"]) < 2:
            continue
        gamma = nodes[node["inputs"][1][0]]
        name = gamma["name"]
        if gamma["op"] != "null" or name not in out:
            continue
        value = out[name]
        if not bool((value == 1).asnumpy().all()):
            out[name] = mx.nd.ones(value.shape, ctx=value.context, dtype=value.dtype)
            changed.append(node["name"])
    return out, changed


def _known_2d(nodes, entry, memo):
    """Is the output ``entry`` ``[node, index, version]`` known to be 2-D without shapes?"""
    i = entry[0]
    if i in memo:
        return memo[i]
    node = nodes[i]
    op, attrs = node["op"], node.get("attrs", {})
    memo[i] = False                                  # guards against (impossible) cycles
    if op in ("Flatten", "flatten"):
        res = True
    elif op == "FullyConnected":
        res = _parse_bool(attrs.get("flatten"), True) or _known_2d(nodes, node["inputs"][0], memo)
    elif op in ("Reshape", "reshape"):
        shape = _parse_tuple(attrs.get("shape"))
        res = len(shape) == 2 and min(shape) >= -1 and not _parse_bool(attrs.get("reverse"), False)
    elif op in _RANK_KEEPING:
        data_inputs = [e for e in node["inputs"] if nodes[e[0]]["op"] != "null"]
        res = bool(data_inputs) and all(_known_2d(nodes, e, memo) for e in data_inputs)
    else:
        res = False
    memo[i] = res
    return res


def flatten_before_fc(symbol):
    """Insert ``Flatten`` before every FullyConnected that flattens (``flatten`` not false) and
    whose input is not known to be 2-D already.

    The FullyConnected keeps its name, weight and output; the new node is called
    ``<fc>_flatten``. Idempotent: a FullyConnected fed by a Flatten is left alone.

    Returns
    -------
    symbol : mx.sym.Symbol
    changed : list of str
        The FullyConnected layers given a Flatten.
    """
    graph = _graph(symbol)
    nodes = graph["nodes"]
    memo = {}
    targets = [i for i, n in enumerate(nodes) if n["op"] == "FullyConnected"
               and _parse_bool(n.get("attrs", {}).get("flatten"), True)
               and nodes[n["inputs"][0][0]]["op"] != "null"     # an FC on the input: nothing fused before it
               and not _known_2d(nodes, n["inputs"][0], memo)]
    if not targets:
        return symbol, []
    names = {n["name"] for n in nodes}
    new_nodes, new_id = [], {}

    def remap(e):
        return [new_id[e[0]], e[1]] + list(e[2:])

    for i, node in enumerate(nodes):
        node = dict(node, inputs=[remap(e) for e in node["inputs"]])
        if i in targets:
            flat = f"{node['name']}_flatten"
            k = 0
            while flat in names:
                k += 1
                flat = f"{node['name']}_flatten{k}"
            names.add(flat)
            new_nodes.append({"op": "Flatten", "name": flat, "inputs": [node["inputs"][0]]})
            node["inputs"] = [[len(new_nodes) - 1, 0, 0]] + node["inputs"][1:]
        new_id[i] = len(new_nodes)
        new_nodes.append(node)
    graph["nodes"] = new_nodes
    graph["heads"] = [remap(e) for e in graph["heads"]]
    return _load(graph), [nodes[i]["name"] for i in targets]


def _entry_shapes(symbol, input_shape, input_name):
    """``{(node id, output index): shape}`` of every node output for ``input_shape``."""
    nodes = _graph(symbol)["nodes"]
    internals = symbol.get_internals()
    _, out_shapes, _ = infer_shape_quiet(internals, **{input_name: tuple(input_shape)})
    by_name = dict(zip(internals.list_outputs(), out_shapes))
    shapes = {}
    for i, n in enumerate(nodes):
        if n["op"] == "null":
            if n["name"] in by_name:
                shapes[(i, 0)] = tuple(by_name[n["name"]])
            continue
        if f"{n['name']}_output" in by_name:
            shapes[(i, 0)] = tuple(by_name[f"{n['name']}_output"])
        k = 0
        while f"{n['name']}_output{k}" in by_name:
            shapes[(i, k)] = tuple(by_name[f"{n['name']}_output{k}"])
            k += 1
    return shapes


def _full_shape(input_shape):
    shape = tuple(int(s) for s in input_shape)
    return shape if len(shape) == 4 else (1,) + shape


def fit_global_pools(symbol, input_shape, input_name="data"):
    """Set the kernel of every ``global_pool=True`` Pooling whose stored kernel exceeds its
    input (or is missing) to the input's spatial size (stride 1, pad 0): the output is the
    same, and MXNet's quantized pooling, which checks the kernel against the map, accepts it.

    Parameters
    ----------
    input_shape : tuple
        ``(N, C, H, W)`` or ``(C, H, W)``.

    Returns
    -------
    symbol : mx.sym.Symbol
    changed : list of str
        The pooling layers rewritten (each is logged with its old and new kernel).
    """
    graph = _graph(symbol)
    nodes = graph["nodes"]
    pools = [i for i, n in enumerate(nodes) if n["op"] == "Pooling"
             and _parse_bool(n.get("attrs", {}).get("global_pool"), False)
             and n.get("attrs", {}).get("layout") in (None, "None", "NCW", "NCHW", "NCDHW")]
    if not pools:
        return symbol, []
    try:
        shapes = _entry_shapes(symbol, _full_shape(input_shape), input_name)
    except mx.base.MXNetError:       # the shape does not fit the graph: check_params says why
        return symbol, []
    changed = []
    for i in pools:
        attrs = nodes[i].setdefault("attrs", {})
        src = tuple(nodes[i]["inputs"][0][:2])
        if src not in shapes:
            continue
        spatial = tuple(int(s) for s in shapes[src][2:])
        kernel = _parse_tuple(attrs.get("kernel"))
        # only a kernel larger than the map fails MXNet's int8 check; a smaller one (Gluon's
        # GlobalAvgPool2D stores 1×1) is left alone, so ordinary graphs are not rewritten
        if len(kernel) == len(spatial) and all(k <= s for k, s in zip(kernel, spatial)):
            continue
        ones, zeros = (1,) * len(spatial), (0,) * len(spatial)
        attrs.update(kernel=str(spatial), stride=str(ones), pad=str(zeros))
        _LOGGER.info("global pool %s: kernel %s set to its input size %s (stride 1, pad 0): "
                     "MXNet's int8 pooling checks the kernel even with global_pool=True",
                     nodes[i]["name"], kernel or "(none)", spatial)
        changed.append(nodes[i]["name"])
    return (_load(graph) if changed else symbol), changed


def fc_on_nd_input(symbol, input_shape, input_name="data"):
    """Names of the FullyConnected layers whose input has more than two axes (what MXNet
    1.9.1's oneDNN path cannot run twice); ``[]`` when the shape does not fit the graph."""
    nodes = _graph(symbol)["nodes"]
    try:
        shapes = _entry_shapes(symbol, _full_shape(input_shape), input_name)
    except mx.base.MXNetError:
        return []
    return [n["name"] for n in nodes if n["op"] == "FullyConnected"
            and len(shapes.get(tuple(n["inputs"][0][:2]), ())) > 2]


def _consumers(nodes):
    out = {}
    for i, n in enumerate(nodes):
        for e in n["inputs"]:
            out.setdefault(e[0], []).append(i)
    return out


def _input_id(nodes, input_name):
    return next((i for i, n in enumerate(nodes) if n["op"] == "null" and n["name"] == input_name), None)


def _param_shape(nodes, node, k, params):
    if len(node["inputs"]) <= k:
        return None, None
    src = nodes[node["inputs"][k][0]]
    if src["op"] != "null" or src["name"] not in params:
        return None, None
    return src["name"], tuple(int(s) for s in params[src["name"]].shape)


def input_channels(symbol, params, input_name="data"):
    """The input channels the graph's first weight layer takes, from its parameters.

    Follows the input through ops that keep its channels (scalar arithmetic, activations) to
    the first Convolution (``weight.shape[1] × num_group``), Deconvolution (``weight.shape[0]``),
    BatchNorm or PReLU (``gamma.shape[0]``).

    Returns
    -------
    (channels, layer, parameter, parameter shape) or None
        ``None`` when no such layer reads the input (e.g. a FullyConnected on the raw input).
    """
    nodes = _graph(symbol)["nodes"]
    start = _input_id(nodes, input_name)
    if start is None:
        return None
    cons = _consumers(nodes)
    frontier, seen = [start], set()
    while frontier:
        nxt = []
        for i in frontier:
            for j in cons.get(i, []):
                if j in seen:
                    continue
                seen.add(j)
                n = nodes[j]
                op, attrs = n["op"], n.get("attrs", {})
                if n["inputs"][0][0] != i:      # the input reaches it as a parameter? not a layer input
                    continue
                if op == "Convolution":
                    pname, shape = _param_shape(nodes, n, 1, params)
                    if shape:
                        return shape[1] * int(attrs.get("num_group", 1)), n["name"], pname, shape
                elif op == "Deconvolution":
                    pname, shape = _param_shape(nodes, n, 1, params)
                    if shape:
                        return shape[0], n["name"], pname, shape
                elif op in BN_OPS or op == "InstanceNorm" or (
                        op == "LeakyReLU" and attrs.get("act_type") == "prelu"):
                    pname, shape = _param_shape(nodes, n, 1, params)
                    if shape and (op != "LeakyReLU" or shape[0] > 1):
                        return shape[0], n["name"], pname, shape
                    if op == "LeakyReLU":
                        nxt.append(j)
                elif op in _CHANNEL_KEEPING or op == "LeakyReLU":
                    nxt.append(j)
        frontier = nxt
    return None


def _fits(symbol, params, input_name, shape):
    """Does ``shape`` fit the graph with these parameters (shape inference with them fixed)?"""
    arg_shapes = {k: tuple(v.shape) for k, v in params.items()}
    arg_shapes[input_name] = shape
    known = set(symbol.list_arguments()) | set(symbol.list_auxiliary_states())
    try:
        infer_shape_quiet(symbol, **{k: v for k, v in arg_shapes.items() if k in known})
        return True
    except mx.base.MXNetError:
        return False


# Sizes tried first when looking for one the parameters accept (common training sizes).
_COMMON_SIZES = (112, 224, 96, 128, 299, 32, 28, 64, 160, 192, 256, 227, 48, 16, 8, 320, 384, 512)


def _two_adic(n):
    k = 0
    while n % 2 == 0 and n > 0:
        n //= 2
        k += 1
    return k


def pinned_size(symbol, params, channels, input_name="data", largest=1024):
    """The square input size the parameters pin, if they pin one.

    A FullyConnected on a flattened map (its weight holds C×H×W) or a fixed-kernel head such
    as a GDC conv followed by one fixes the map size, so only a short run of input sizes fits
    (97..112 for four stride-2 layers before a 7×7 map). Of that run, the size the strides
    divide best is returned (112 = 7 × 16). A graph that also accepts a size outside the run
    (a fully convolutional graph with global pooling) pins nothing.

    Returns
    -------
    (size, first, last) or None
        The chosen size and the run of sizes that fit.
    """
    def fits(s):
        return _fits(symbol, params, input_name, (1, channels, s, s))

    probes = [s for s in _COMMON_SIZES if s <= largest]
    found = next((s for s in probes if fits(s)), None)
    if found is None:
        found = next((s for s in range(1, largest + 1) if s not in probes and fits(s)), None)
    if found is None:
        return None
    lo = found
    while lo > 1 and fits(lo - 1):
        lo -= 1
    hi = found
    while hi < largest and fits(hi + 1):
        hi += 1
    if hi >= largest:
        return None
    # another fitting size away from the run: the graph does not fix its size
    others = [s for s in probes + [largest, 2 * hi, 2 * lo] if not lo <= s <= hi and s <= largest]
    if any(fits(s) for s in sorted(set(others))):
        return None
    best = max(range(lo, hi + 1), key=lambda s: (_two_adic(s), s))
    return best, lo, hi


@dataclass
class InputNormalisation:
    """A normalisation the graph applies to its input itself.

    Attributes
    ----------
    layers : list of str
        The layers doing it (``_minus_scalar`` 127.5, ``_mul_scalar`` 0.0078125, or a BatchNorm).
    description : str
        What they compute, e.g. ``(x - 127.5) * 0.0078125``.
    raw_pixels : bool
        The graph expects raw 0..255 pixels (else pixels in [0, 1]).
    mean, std : list of float
        The ``data.mean``/``data.std`` that feed it what it expects.
    """
    layers: List[str]
    description: str
    raw_pixels: bool
    mean: List[float]
    std: List[float]

    def advice(self):
        """The recipe lines to use, and why (for a log line or an inspect note)."""
        pixels = "raw 0..255 pixels" if self.raw_pixels else "pixels in [0, 1]"
        # distill.data scales pixels to [0, 1], then (x - mean) / std: mean 0, std 1/255 gives
        # back 0..255; mean 0, std 1 leaves [0, 1]
        return (f"The graph normalises its input itself ({self.description}, layer(s) "
                f"{', '.join(self.layers)}), so it expects {pixels}. The data pipeline scales "
                f"images to [0, 1] and then applies (x - mean) / std: set `data.mean: "
                f"{format_values(self.mean)}` and `data.std: {format_values(self.std)}` so the "
                f"graph gets {pixels}; another mean/std normalises a second time")

    def matches(self, mean, std):
        """Do the data's per-channel ``mean``/``std`` give the graph what it expects?"""
        m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        return bool(np.all(np.abs(m - self.mean[0]) <= 1e-3 * max(1.0, abs(self.mean[0])))
                    and np.all(np.abs(s - self.std[0]) <= 1e-3 * abs(self.std[0])))


_SCALAR_AFFINE = {           # op → (a, b, scalar) → the new (a, b) of a·x + b
    "_minus_scalar": lambda a, b, s: (a, b - s),
    "_plus_scalar": lambda a, b, s: (a, b + s),
    "_mul_scalar": lambda a, b, s: (a * s, b * s),
    "_div_scalar": lambda a, b, s: (a / s, b / s),
    "_rminus_scalar": lambda a, b, s: (-a, s - b),
}
_SPELLED = {"_minus_scalar": "-", "_plus_scalar": "+", "_mul_scalar": "*", "_div_scalar": "/"}


def _spell(text, op, s):
    """The expression ``text`` after ``op`` with ``scalar`` ``s``: ``(x - 127.5) * 0.0078125``."""
    compound = text != "x"
    if op == "_rminus_scalar":
        return f"{s:g} - ({text})" if compound else f"{s:g} - x"
    if compound and op in ("_mul_scalar", "_div_scalar"):
        text = f"({text})"
    return f"{text} {_SPELLED[op]} {s:g}"


def format_values(values):
    """``[0.0, 0.00392...]`` → ``[0, 0.00392156862745098]`` (as a recipe would write them)."""
    return "[" + ", ".join(str(int(v)) if float(v).is_integer() else repr(float(v)) for v in values) + "]"


def input_normalisation(symbol, params, input_name="data"):
    """A leading in-graph normalisation of the input, or ``None``.

    Recognised: a chain of scalar subtract / add / multiply / divide / reverse-subtract ops on
    the input (composed into ``a·x + b``), or a BatchNorm reading the input whose running mean
    is far outside [0, 1] (trained on raw pixels). The graph expects raw 0..255 pixels when
    ``a·x + b`` maps 0..255 into a small range around 0 (within ±4), else pixels in [0, 1].

    Returns
    -------
    InputNormalisation or None
    """
    nodes = _graph(symbol)["nodes"]
    i = _input_id(nodes, input_name)
    if i is None:
        return None
    cons = _consumers(nodes)
    a, b, layers, text = 1.0, 0.0, [], "x"
    while len(cons.get(i, [])) == 1 and nodes[cons[i][0]]["op"] in _SCALAR_AFFINE:
        j = cons[i][0]
        n = nodes[j]
        s = float(n.get("attrs", {}).get("scalar", 0.0))
        a, b = _SCALAR_AFFINE[n["op"]](a, b, s)
        layers.append(n["name"])
        text = _spell(text, n["op"], s)
        i = j
    if layers:
        lo, hi = sorted((b, 255.0 * a + b))
        raw = max(abs(lo), abs(hi)) <= 4.0 and hi - lo >= 0.5
        return InputNormalisation(layers, text, raw, [0.0], [RAW_PIXELS_STD] if raw else [1.0])
    for j in cons.get(i, []):
        n = nodes[j]
        if n["op"] not in BN_OPS or n["inputs"][0][0] != i or len(n["inputs"]) < 4:
            continue
        mname = nodes[n["inputs"][3][0]]["name"]
        if mname not in params:
            continue
        mean = params[mname].asnumpy()
        if float(np.abs(mean).max()) > 2.0:
            return InputNormalisation([n["name"]], f"BatchNorm with running mean "
                                      f"{np.round(mean, 1).tolist()[:4]}", True, [0.0], [RAW_PIXELS_STD])
    return None


def describe_shape(shape):
    """``(3, 112, 112)`` → ``3×112×112``."""
    return "×".join(str(int(s)) for s in shape)



def relu_min_for_clip(sym):
    """``sym`` with every ``clip(x, 0, M)`` (ReLU6, and the clip inside hard-sigmoid/-swish)
    computed as ``minimum(relu(x), M)``, or ``None`` when the graph has no such clip.

    The same values bit for bit (max and min are exact), faster on the CPU: MXNet 1.9.1's
    ``clip`` is a scalar loop (64×12×28×28 floats: 2.7 ms, against 0.28 ms for oneDNN's relu),
    and in a MobileNetV2-0.5 on 28 px inputs clip and its gradient were 30 of 68 ms of a training
    step. The last node keeps the clip's name. For inference views only (``distill.trainer``'s
    evaluation): what is trained, pruned and exported keeps the original ``clip``.
    """
    graph = json.loads(sym.tojson())
    nodes, out, remap, changed = graph["nodes"], [], {}, False
    for i, node in enumerate(nodes):
        node = dict(node, inputs=[[remap[a], b, c] for a, b, c in node["inputs"]])
        attrs = node.get("attrs", {})
        if node["op"] == "clip" and _float_attr(attrs, "a_min") == 0.0 and (_float_attr(attrs, "a_max") or 0) > 0:
            out.append({"op": "Activation", "name": node["name"] + "_relu_part",
                        "attrs": {"act_type": "relu"}, "inputs": node["inputs"]})
            out.append({"op": "_minimum_scalar", "name": node["name"],
                        "attrs": {"scalar": attrs["a_max"]}, "inputs": [[len(out) - 1, 0, 0]]})
            changed = True
        else:
            out.append(node)
        remap[i] = len(out) - 1
    if not changed:
        return None
    new = {"nodes": out, "arg_nodes": [j for j, n in enumerate(out) if n["op"] == "null"],
           "node_row_ptr": list(range(len(out) + 1)),
           "heads": [[remap[a], b, c] for a, b, c in graph["heads"]], "attrs": graph.get("attrs", {})}
    return mx.sym.load_json(json.dumps(new))


def _float_attr(attrs, key):
    try:
        return float(attrs[key])
    except (KeyError, TypeError, ValueError):
        return None
