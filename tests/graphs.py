"""Test graphs with the features of real-world MXNet checkpoints (issue 17), as Module-API pairs.

Each builder writes ``PREFIX-symbol.json`` + ``PREFIX-0000.params`` the way a Module-API
training run leaves them (``arg:``/``aux:`` names, a ``SoftmaxOutput`` head) for a symbol
written here with ``mx.sym``, small enough for tests (16×16 inputs, a few thousand parameters):

* ``mobileface``: PReLU, depthwise convolutions and a GDC head (a global depthwise convolution
  whose kernel is the final map size, no padding), then FC (on the 4-D 1×1 map, as insightface
  writes it) → embedding → BN → FC to classes.
* ``resnext``: a 32-group bottleneck (64 channels: groups of 2) after a ``fix_gamma=True``
  BatchNorm on the input whose stored gamma is not 1 (MXNet ignores it; a checkpoint trained
  with weight decay carries it anyway, apache/mxnet#9624).
* ``convfc``: conv + BN feeding a FullyConnected directly on the 4-D map (no Flatten, no
  ``flatten`` attribute: MXNet's default flattens); a 1-channel input.
* ``innorm``: in-graph normalisation ``(data - 127.5) * 0.0078125`` (``_minus_scalar`` then
  ``_mul_scalar``), a residual PReLU block and a BN-Dropout-FC-BN embedding head (the FC on the
  4-D map); its data are raw 0..255 pixels (``data.mean: 0``, ``data.std: 1/255``).
* ``gpool7``: a ``global_pool=True`` average pool whose stored kernel (7×7) is larger than its
  2×2 input.

The weights are random, not trained: BatchNorm running statistics are measured layer by layer
on the graph's own data so activations stay near unit scale, gammas are drawn away from 1, and
the classifier is scaled so the logits have a standard deviation of about 2.

Registry-driven, like timm's ``list_models()``: :data:`GRAPHS` holds one :class:`GraphSpec`
factory per name, and :func:`build_graph` writes one.
"""
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import mxnet as mx
import numpy as np

from distill.data.synthetic import make_synthetic
from distill.registry import Registry

__all__ = ["GRAPHS", "GraphSpec", "build_graph", "graph_data"]
_LOGGER = logging.getLogger(__name__)

GRAPHS = Registry("test graph")
_LOGIT_STD = 2.0          # "moderate scale": a few units, as a trained classifier's logits
_CALIB_IMAGES = 64


@dataclass
class GraphSpec:
    """What a test needs to know about one built graph.

    Attributes
    ----------
    name : str
        Registry name.
    symbol : mx.sym.Symbol
        The training graph (``SoftmaxOutput`` head named ``softmax``).
    input_shape : tuple of int
        ``(C, H, W)`` of one input.
    num_classes : int
    classifier : str
        The last FullyConnected (``exclude: [last]`` keeps its input and output widths).
    wrong_shapes : dict
        Input shape ``(C, H, W)`` the params contradict → the layer whose parameters contradict
        it (what ``distill inspect --input-shape`` must name).
    data : dict
        The recipe's ``data:`` section that feeds this graph (synthetic images).
    features : list of str
        The issue-17 features the graph carries.
    fix_gamma_bn : dict
        Name → stored gamma value of ``fix_gamma=True`` BatchNorms (gamma ≠ 1 on purpose).
    size_pinned : bool
        A fixed-size layer (GDC kernel, FC on a 4-D map) determines the input's H×W.
    prefix : str
        Checkpoint prefix, once written by :func:`build_graph`.
    """

    name: str
    symbol: mx.sym.Symbol
    input_shape: Tuple[int, int, int]
    num_classes: int
    classifier: str
    wrong_shapes: Dict[Tuple[int, int, int], str]
    data: Dict
    features: List[str] = field(default_factory=list)
    fix_gamma_bn: Dict[str, float] = field(default_factory=dict)
    size_pinned: bool = False
    prefix: str = ""


def _data_section(channels, classes, raw_pixels=False):
    d = {"name": "synthetic", "num_samples": 128, "num_classes": classes, "channels": channels,
         "image_size": 16, "val_split": 0.25}
    if raw_pixels:              # the graph normalises itself: feed it 0..255
        d.update(mean=[0.0], std=[1.0 / 255.0])
    else:
        d.update(mean=[0.5], std=[0.25])
    return d


def _conv_bn(x, name, filters, kernel=3, stride=1, pad=None, groups=1, act="relu"):
    pad = kernel // 2 if pad is None else pad
    x = mx.sym.Convolution(x, num_filter=filters, kernel=(kernel, kernel), stride=(stride, stride),
                           pad=(pad, pad), num_group=groups, no_bias=True, name=f"{name}_conv")
    x = mx.sym.BatchNorm(x, fix_gamma=False, eps=2e-5, name=f"{name}_bn")
    if act == "relu":
        x = mx.sym.Activation(x, act_type="relu", name=f"{name}_relu")
    elif act == "prelu":
        x = mx.sym.LeakyReLU(x, act_type="prelu", name=f"{name}_prelu")
    return x


@GRAPHS.register("mobileface")
def mobileface(classes=4):
    """MobileFaceNet in miniature: PReLU, depthwise separable blocks, a GDC head."""
    data = mx.sym.var("data")
    x = _conv_bn(data, "conv1", 16, stride=2, act="prelu")                      # 16×8×8
    x = _conv_bn(x, "dw1", 16, groups=16, act="prelu")
    x = _conv_bn(x, "pw1", 24, kernel=1, act="prelu")
    x = _conv_bn(x, "dw2", 24, stride=2, groups=24, act="prelu")                # 24×4×4
    x = _conv_bn(x, "pw2", 32, kernel=1, act="prelu")
    # GDC: a global depthwise conv, kernel = the 4×4 map, no padding → 32×1×1
    x = _conv_bn(x, "gdc", 32, kernel=4, pad=0, groups=32, act=None)
    # insightface's head: FC straight on the (N, 32, 1, 1) map, no Flatten, no `flatten` attribute
    x = mx.sym.FullyConnected(x, num_hidden=16, name="embedding")
    x = mx.sym.BatchNorm(x, fix_gamma=False, name="embedding_bn")
    x = mx.sym.FullyConnected(x, num_hidden=classes, name="fc_cls")
    sym = mx.sym.SoftmaxOutput(x, name="softmax")
    return GraphSpec("mobileface", sym, (3, 16, 16), classes, "fc_cls",
                     {(1, 16, 16): "conv1_conv", (3, 32, 32): "embedding"},
                     _data_section(3, classes), ["prelu", "depthwise", "gdc"],
                     size_pinned=True)


@GRAPHS.register("resnext")
def resnext(classes=4):
    """A ResNeXt stage: ``fix_gamma`` input BN (gamma stored ≠ 1), 32-group bottleneck."""
    data = mx.sym.var("data")
    x = mx.sym.BatchNorm(data, fix_gamma=True, eps=2e-5, name="bn_data")
    x = _conv_bn(x, "stem", 64, stride=2)                                       # 64×8×8
    y = _conv_bn(x, "unit1_a", 64, kernel=1)
    y = _conv_bn(y, "unit1_b", 64, groups=32)                                  # groups of 2
    y = _conv_bn(y, "unit1_c", 64, kernel=1, act=None)
    x = mx.sym.Activation(mx.sym.elemwise_add(x, y, name="unit1_add"), act_type="relu", name="unit1_relu")
    x = mx.sym.Pooling(x, global_pool=True, kernel=(1, 1), pool_type="avg", name="pool")
    x = mx.sym.FullyConnected(mx.sym.Flatten(x, name="flatten"), num_hidden=classes, name="fc1")
    sym = mx.sym.SoftmaxOutput(x, name="softmax")
    return GraphSpec("resnext", sym, (3, 16, 16), classes, "fc1", {(1, 16, 16): "bn_data"},
                     _data_section(3, classes), ["fix_gamma_input_bn", "groups32"],
                     fix_gamma_bn={"bn_data": 1.7})


@GRAPHS.register("convfc")
def convfc(classes=4):
    """Conv + BN straight into a FullyConnected on the 4-D map (no Flatten); grayscale input.

    The map is 32×1×1: with 16 or more channels at 1×1, MXNet 1.9.1's oneDNN path fails on
    the second call of the fused graph ("We can't generate TBlob for MKLDNN data"); larger maps
    run, so this is the shape that shows the failure.
    """
    data = mx.sym.var("data")
    x = _conv_bn(data, "conv1", 8, stride=2)                                    # 8×8×8
    x = _conv_bn(x, "conv2", 16, stride=2)                                      # 16×4×4
    x = _conv_bn(x, "conv3", 32, kernel=4, pad=0, act=None)                     # 32×1×1, conv + BN
    x = mx.sym.FullyConnected(x, num_hidden=24, name="fc_hidden")               # on (N, 32, 1, 1)
    x = mx.sym.Activation(x, act_type="relu", name="fc_hidden_relu")
    x = mx.sym.FullyConnected(x, num_hidden=classes, name="fc_out")
    sym = mx.sym.SoftmaxOutput(x, name="softmax")
    return GraphSpec("convfc", sym, (1, 16, 16), classes, "fc_out",
                     {(3, 16, 16): "conv1_conv", (1, 32, 32): "fc_hidden"},
                     _data_section(1, classes), ["fc_on_4d"], size_pinned=True)


@GRAPHS.register("innorm")
def innorm(classes=4):
    """In-graph ``(x - 127.5) / 128``, a PReLU residual block, BN-Dropout-FC-BN embedding head."""
    data = mx.sym.var("data")
    x = (data - 127.5) * 0.0078125                          # _minus_scalar, _mul_scalar
    x = _conv_bn(x, "conv0", 16, act="prelu")                                   # 16×16×16
    y = _conv_bn(x, "res1_a", 16, act="prelu")
    y = _conv_bn(y, "res1_b", 16, act=None)
    x = mx.sym.elemwise_add(x, y, name="res1_add")
    x = _conv_bn(x, "down", 24, stride=2, act="prelu")                          # 24×8×8
    x = mx.sym.Pooling(x, kernel=(2, 2), stride=(2, 2), pool_type="max", name="pool")  # 24×4×4
    x = mx.sym.BatchNorm(x, fix_gamma=False, name="bn_head")
    x = mx.sym.Dropout(x, p=0.4, name="dropout")
    x = mx.sym.FullyConnected(x, num_hidden=16, name="pre_fc1")     # on (N, 24, 4, 4), as insightface
    x = mx.sym.BatchNorm(x, fix_gamma=True, name="fc1")     # insightface's embedding BN
    x = mx.sym.FullyConnected(x, num_hidden=classes, name="fc_cls")
    sym = mx.sym.SoftmaxOutput(x, name="softmax")
    return GraphSpec("innorm", sym, (3, 16, 16), classes, "fc_cls", {(1, 16, 16): "conv0_conv"},
                     _data_section(3, classes, raw_pixels=True),
                     ["in_graph_norm", "prelu", "dropout", "fc_on_4d"],
                     fix_gamma_bn={"fc1": 0.6}, size_pinned=True)


@GRAPHS.register("gpool7")
def gpool7(classes=4):
    """Three stride-2 convs to 2×2, then a global pool that keeps its stored 7×7 kernel."""
    data = mx.sym.var("data")
    x = _conv_bn(data, "conv1", 16, stride=2)                                   # 8×8
    x = _conv_bn(x, "conv2", 24, stride=2)                                      # 4×4
    x = _conv_bn(x, "conv3", 32, stride=2)                                      # 2×2
    x = mx.sym.Pooling(x, global_pool=True, kernel=(7, 7), pool_type="avg", name="pool")
    x = mx.sym.FullyConnected(mx.sym.Flatten(x, name="flatten"), num_hidden=classes, name="fc1")
    sym = mx.sym.SoftmaxOutput(x, name="softmax")
    return GraphSpec("gpool7", sym, (3, 16, 16), classes, "fc1", {(1, 16, 16): "conv1_conv"},
                     _data_section(3, classes), ["global_pool_kernel_7"])


def graph_data(spec, n=_CALIB_IMAGES, seed=0):
    """``n`` images as the recipe's data section gives them to the graph (normalised)."""
    d = spec.data
    x, _ = make_synthetic(n, d["num_classes"], d["channels"], spec.input_shape[1:], seed)
    mean = np.float32(d["mean"][0])
    std = np.float32(d["std"][0])
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def _forward(sym, args, aux, x):
    exe = sym.bind(mx.cpu(), {**args, "data": mx.nd.array(x)}, aux_states=aux, grad_req="null")
    return exe.forward(is_train=False)[0].asnumpy()


def _init_params(spec, rng):
    """Random weights: He-scaled convs/FCs, gammas away from 1, small betas, PReLU slopes ~0.25."""
    sym = spec.symbol
    shapes, _, aux_shapes = sym.infer_shape(data=(1,) + spec.input_shape)
    args, aux = {}, {}
    for name, shape in zip(sym.list_arguments(), shapes):
        if name in ("data", "softmax_label"):
            continue
        if name.endswith("_weight"):
            fan_in = int(np.prod(shape[1:]))
            v = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
        elif name.endswith("_gamma") and "prelu" in name:
            v = rng.uniform(0.1, 0.4, size=shape)
        elif name.endswith("_gamma"):
            v = rng.uniform(0.6, 1.4, size=shape)
        elif name.endswith("_beta"):
            v = rng.uniform(-0.2, 0.2, size=shape)
        elif name.endswith("_bias"):
            v = rng.uniform(-0.1, 0.1, size=shape)
        else:
            raise ValueError(f"{spec.name}: no initializer for {name}")
        args[name] = mx.nd.array(v.astype(np.float32))
    for name, shape in zip(sym.list_auxiliary_states(), aux_shapes):
        init = np.zeros(shape) if name.endswith("moving_mean") else np.ones(shape)
        aux[name] = mx.nd.array(init.astype(np.float32))
    for bn, gamma in spec.fix_gamma_bn.items():    # stored, ignored by MXNet (fix_gamma=True)
        args[f"{bn}_gamma"] = mx.nd.full(args[f"{bn}_gamma"].shape, gamma)
    return args, aux


def _calibrate_bn(sym, args, aux, x):
    """Set each BatchNorm's running statistics to its input's batch statistics, in graph order,
    so every BN normalises what it really receives (no exploding activations)."""
    internals = sym.get_internals()
    nodes = json.loads(sym.tojson())["nodes"]
    for node in nodes:
        if node["op"] != "BatchNorm":
            continue
        src = nodes[node["inputs"][0][0]]
        if src["op"] == "null":
            v = x
        else:
            part = internals[f"{src['name']}_output"]
            v = _forward(part, {k: a for k, a in args.items() if k in part.list_arguments()},
                         {k: a for k, a in aux.items() if k in part.list_auxiliary_states()}, x)
        axes = (0,) + tuple(range(2, v.ndim))
        aux[f"{node['name']}_moving_mean"] = mx.nd.array(v.mean(axis=axes))
        aux[f"{node['name']}_moving_var"] = mx.nd.array(v.var(axis=axes) + 1e-3)
    return aux


def build_graph(name, folder, seed=0):
    """Write the graph ``name`` as a Module-API checkpoint into ``folder``.

    Parameters
    ----------
    name : str
        A name in :data:`GRAPHS`.
    folder : str
        Where ``NAME-symbol.json`` and ``NAME-0000.params`` go.
    seed : int
        Same seed, same weights.

    Returns
    -------
    GraphSpec
        With ``prefix`` set.
    """
    spec = GRAPHS.get(name)()
    rng = np.random.RandomState(seed)
    args, aux = _init_params(spec, rng)
    x = graph_data(spec, seed=seed + 1)
    aux = _calibrate_bn(spec.symbol, args, aux, x)
    logits_sym = spec.symbol.get_internals()[f"{spec.classifier}_output"]
    logits = _forward(logits_sym, {k: v for k, v in args.items() if k in logits_sym.list_arguments()},
                      aux, x)
    # scale to a classifier's range, and centre each class so no class wins every image
    scale = _LOGIT_STD / max(float(logits.std()), 1e-6)
    w, b = f"{spec.classifier}_weight", f"{spec.classifier}_bias"
    args[w] = args[w] * scale
    args[b] = (args[b] - mx.nd.array(logits.mean(axis=0))) * scale
    spec.prefix = os.path.join(str(folder), name)
    os.makedirs(str(folder), exist_ok=True)
    # what Module.save_checkpoint writes: arg:/aux: names, the SoftmaxOutput head kept
    mx.model.save_checkpoint(spec.prefix, 0, spec.symbol, args, aux)
    _LOGGER.info("test graph %s: %s (logit scale ×%.3g)", name, spec.prefix, scale)
    return spec
