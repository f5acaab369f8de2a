"""Adapt a stock ImageNet/CIFAR network to small inputs by removing its earliest downsampling.

A stock MobileNet downsamples 32x, which turns a 28x28 digit into a 1x1 map before the second
stage: measured, stock ``mobilenetv2_0.5`` stayed at 10-14% on 28x28 MNIST while the same net with
its stem at stride 1 reached 98.4%. The rule used here:

* target total stride ``S`` = the largest power of two strictly less than ``min(H, W)``, capped at
  the net's native stride and at ``max_stride`` (28 -> 16, 8 -> 4, 32 -> 16, 224 -> 32);
* remove downsampling *events* earliest first (stem conv, stem pool, first stage, ...) until the
  remaining total stride is at most ``S``.

An event is every strided layer that sees the same input resolution: a residual block's body conv
and its shortcut conv, both branches of a ShuffleNetV2 down unit. They change together or the
shapes no longer add/concatenate. Events are found by one probe forward pass with forward hooks
(analyse), turned into a list of layers to set to stride 1 (plan), then applied and checked by a
second forward pass (apply). Only ``Conv2D``, ``MaxPool2D`` and ``AvgPool2D`` layers are seen, so
a family that strides inside ``hybrid_forward`` (ShuffleNetV1's shortcut pooling) must expose that
op as a layer in its builder first (see :mod:`students.shufflenet`).
"""
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import mxnet as mx
from mxnet.gluon import nn

from distill.errors import UserError

__all__ = ["DownsampleEvent", "target_stride", "find_events", "adapt_strides", "walk",
           "unfreeze_input_batchnorm", "zero_init_gamma"]

_LOGGER = logging.getLogger(__name__)

# Layers whose ``_kwargs['stride']`` downsamples. Conv2DTranspose subclasses _Conv but upsamples.
_STRIDED_TYPES = (nn.Conv2D, nn.MaxPool2D, nn.AvgPool2D)
_PROBE_SIZES = (32, 64, 128, 256, 512, 1024)


@dataclass
class DownsampleEvent:
    """One downsampling step of a network: every strided layer that sees one input resolution.

    Attributes
    ----------
    input_size : tuple of int
        ``(h, w)`` of the layers' input during the probe pass.
    factor : int
        How much the step divides the spatial size (2 for every family registered here).
    layers : list of (str, Block)
        ``(path, layer)``; the path is the attribute path from the net (``"features.0"``), which
        is stable across processes unlike Gluon's counter-based prefixes.
    """

    input_size: Tuple[int, int]
    factor: int
    layers: List[Tuple[str, nn.HybridBlock]] = field(default_factory=list)


def walk(block, prefix=""):
    """Yield ``(path, block)`` for ``block`` and all its descendants, each block once.

    Parameters
    ----------
    block : mxnet.gluon.Block
        The root.
    prefix : str
        Path of ``block`` itself ("" for the root).
    """
    seen = set()
    stack = [(prefix, block)]
    while stack:
        path, blk = stack.pop()
        if id(blk) in seen:
            continue
        seen.add(id(blk))
        yield path, blk
        children = list(blk._children.items())
        for name, child in reversed(children):
            stack.append((f"{path}.{name}" if path else name, child))


def _is_strided(layer):
    if not isinstance(layer, _STRIDED_TYPES) or isinstance(layer, nn.Conv2DTranspose):
        return False
    if layer._kwargs.get("global_pool", False):
        return False
    return max(layer._kwargs["stride"]) > 1


def _is_global_pool(layer):
    return isinstance(layer, (nn.MaxPool2D, nn.AvgPool2D, nn.GlobalAvgPool2D, nn.GlobalMaxPool2D)) \
        and bool(layer._kwargs.get("global_pool", False))


def _forward_with_hooks(net, layers, x):
    """Run ``net(x)`` and return ``(out, {id(layer): (in_hw, out_hw)}, last_global_pool_in_hw)``."""
    record = {}
    pools = []

    def on_layer(block, inputs, output):
        record[id(block)] = (tuple(inputs[0].shape[2:]), tuple(output.shape[2:]))

    def on_pool(block, inputs, output):
        pools.append(tuple(inputs[0].shape[2:]))

    handles = [layer.register_forward_hook(on_layer) for layer in layers]
    handles += [blk.register_forward_hook(on_pool) for _, blk in walk(net) if _is_global_pool(blk)]
    try:
        out = net(x)
        mx.nd.waitall()
    finally:
        for handle in handles:
            handle.detach()
    # The head's global pool is the last one called (SE blocks pool earlier, inside the body).
    return out, record, (pools[-1] if pools else tuple(out.shape[2:]))


def find_events(net, channels, ctx=mx.cpu()):
    """Find the downsampling events of an initialized, not hybridized ``net``.

    The probe input is square and a multiple of the native stride, so every strided layer divides
    its input exactly and no two events share an input size (at 8x8 a stride-32 net would run two
    layers at 1x1 -> 1x1, which could not be told apart). The size is raised until that holds.

    Parameters
    ----------
    net : mxnet.gluon.HybridBlock
        Initialized (deferred init is fine) and not hybridized: hooks need imperative calls.
    channels : int
        Input channels of the probe batch ``(1, channels, P, P)``.
    ctx : mxnet.Context
        Where the net's parameters live.

    Returns
    -------
    list of DownsampleEvent
        Earliest (largest input) first.
    """
    strided = [(path, layer) for path, layer in walk(net) if _is_strided(layer)]
    for size in _PROBE_SIZES:
        x = mx.nd.zeros((1, channels, size, size), ctx=ctx)
        _, record, _ = _forward_with_hooks(net, [layer for _, layer in strided], x)
        exact = True
        by_size: Dict[Tuple[int, int], DownsampleEvent] = {}
        for path, layer in strided:
            if id(layer) not in record:  # defined but never called in forward
                continue
            (h_in, w_in), (h_out, w_out) = record[id(layer)]
            stride = layer._kwargs["stride"]
            if h_out * stride[0] != h_in or w_out * stride[1] != w_in:
                exact = False
                break
            event = by_size.setdefault((h_in, w_in),
                                       DownsampleEvent((h_in, w_in), h_in // h_out))
            if h_in // h_out != event.factor:
                raise RuntimeError(f"layers at input {h_in}x{w_in} stride by different factors: "
                                   f"{path} by {h_in // h_out}, others by {event.factor}")
            event.layers.append((path, layer))
        if exact:
            return sorted(by_size.values(), key=lambda e: -e.input_size[0] * e.input_size[1])
    raise RuntimeError(f"no probe size in {_PROBE_SIZES} is divided exactly by the net")


def target_stride(image_size, native_stride, max_stride=None):
    """Total stride a net should keep for ``image_size``.

    Parameters
    ----------
    image_size : (int, int)
        ``(H, W)`` of the input.
    native_stride : int
        The stock net's total stride (32 for MobileNets, 4 for CIFAR ResNets).
    max_stride : int, optional
        A further cap; rounded down to a power of two.

    Returns
    -------
    int
        The largest power of two strictly less than ``min(H, W)`` (at least 1), capped as above.

    Examples
    --------
    >>> target_stride((28, 28), 32), target_stride((8, 8), 32), target_stride((224, 224), 32)
    (16, 4, 32)
    """
    smallest = min(image_size)
    stride = 1
    while stride * 2 < smallest:
        stride *= 2
    if max_stride is not None:
        cap = 1
        while cap * 2 <= max_stride:
            cap *= 2
        stride = min(stride, cap)
    return min(stride, native_stride)


def _check_size(image_size, channels, max_stride):
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise UserError(
            f"student: image_size must be (height, width), got {image_size!r}.") from None
    if h < 1 or w < 1:
        raise UserError(f"student: image_size must be positive, got {image_size!r}.")
    if int(channels) < 1:
        raise UserError(f"student: channels must be >= 1, got {channels!r}.")
    if max_stride is not None and int(max_stride) < 1:
        raise UserError(
            f"student.max_stride must be >= 1 (1 = no downsampling), got {max_stride!r}.")
    return h, w


def adapt_strides(net, channels, image_size, num_classes, max_stride=None, ctx=mx.cpu()):
    """Set the earliest downsampling events of ``net`` to stride 1, in place (analyse, plan, apply).

    Parameters
    ----------
    net : mxnet.gluon.HybridBlock
        Initialized, not hybridized; every downsampling op must be a ``Conv2D``/``MaxPool2D``/
        ``AvgPool2D`` layer (3x3/pad 1, 5x5/pad 2, 1x1/pad 0 keep the size at stride 1).
    channels : int
        Input channels.
    image_size : (int, int)
        ``(H, W)`` the net will see.
    num_classes : int
        Expected width of the output, checked by the verification pass.
    max_stride : int, optional
        Cap on the total stride (see :func:`target_stride`).
    ctx : mxnet.Context
        Where the net's parameters live.

    Returns
    -------
    dict
        ``native_stride``, ``target_stride``, ``stride`` (kept), ``changed`` (paths set to
        stride 1), ``changed_names`` (their Gluon names, as in an exported symbol),
        ``feature_size`` (``(h, w)`` of the map entering global pooling at ``image_size``) and
        ``events`` (per event: input size at the probe, factor, layer paths, whether removed).
    """
    h, w = _check_size(image_size, channels, max_stride)
    events = find_events(net, channels, ctx)
    native = 1
    for event in events:
        native *= event.factor
    target = target_stride((h, w), native, max_stride)

    # Plan: drop events earliest first until what remains is within the target.
    remaining, n_removed = native, 0
    for event in events:
        if remaining <= target:
            break
        n_removed += 1
        remaining //= event.factor

    changed = [(path, layer) for event in events[:n_removed] for path, layer in event.layers]
    for _, layer in changed:
        layer._kwargs["stride"] = (1,) * len(layer._kwargs["stride"])

    out, record, feature = _forward_with_hooks(net, [layer for _, layer in changed],
                                               mx.nd.zeros((2, channels, h, w), ctx=ctx))
    for path, layer in changed:
        size_in, size_out = record[id(layer)]
        if size_in != size_out:
            raise RuntimeError(f"{path} changes the size at stride 1 ({size_in} -> {size_out}): "
                               "its padding does not keep the size")
    if out.shape != (2, num_classes):
        raise RuntimeError(f"adapted net maps (2, {channels}, {h}, {w}) to {out.shape}, "
                           f"expected (2, {num_classes})")
    _LOGGER.info("stride %d -> %d for %dx%d input (%d layers set to stride 1), features %s",
                 native, remaining, h, w, len(changed), feature)
    return {
        "native_stride": native,
        "target_stride": target,
        "stride": remaining,
        "changed": [path for path, _ in changed],
        "changed_names": [layer.name for _, layer in changed],
        "feature_size": tuple(feature),
        "events": [{"input_size": e.input_size, "factor": e.factor,
                    "layers": [p for p, _ in e.layers], "removed": i < n_removed}
                   for i, e in enumerate(events)],
    }


def unfreeze_input_batchnorm(net):
    """Replace each BatchNorm with neither scale nor center by one with a learnable shift, in place.

    MXNet updates a BatchNorm's running mean/var in its backward pass. A BatchNorm with
    ``scale=False, center=False`` applied to the input data (CIFAR ResNet v2's first layer) has
    nothing to differentiate, so its backward never runs and its running stats stay at (0, 1):
    training normalizes the input by batch statistics while inference only divides by 1. On
    digits scaled to [0, 1] that cost CIFAR ResNet v2 half its accuracy. A learnable shift
    (``center=True``, starting at 0, so the initial function is unchanged) makes the backward run.

    Parameters
    ----------
    net : mxnet.gluon.Block
        Before initialization.

    Returns
    -------
    list of str
        Paths of the replaced layers.
    """
    replaced = []
    for path, parent in list(walk(net)):
        for key, child in list(parent._children.items()):
            if not (isinstance(child, nn.BatchNorm) and child.gamma.grad_req == "null"
                    and child.beta.grad_req == "null"):
                continue
            kw = child._kwargs
            with parent.name_scope():
                new = nn.BatchNorm(axis=kw["axis"], momentum=kw["momentum"], epsilon=kw["eps"],
                                   center=True, scale=False,
                                   use_global_stats=kw["use_global_stats"],
                                   in_channels=child.running_mean.shape[0])
            if getattr(parent, key, None) is child:
                setattr(parent, key, new)
            else:  # a Sequential's numbered child
                parent._children[key] = new
            replaced.append(f"{path}.{key}" if path else key)
    return replaced


def zero_init_gamma(batchnorms):
    """Start each BatchNorm with ``gamma = 0`` (set as its initializer, so call before initialize).

    Applied to the last BatchNorm of every residual branch, each block starts as the identity
    (Goyal et al., 2017, "Accurate, Large Minibatch SGD"; GluonCV's ``last_gamma``). Measured on
    digits (5 epochs): ``cifar_resnet56_v1`` with gamma = 1 diverged at lr 0.05 without warmup
    (loss 5.5 at step 1, 27% test accuracy); with gamma = 0 it reached 98.6%.

    Parameters
    ----------
    batchnorms : iterable of mxnet.gluon.nn.BatchNorm
        Not yet initialized.

    Returns
    -------
    int
        How many were set.
    """
    count = 0
    for bn in batchnorms:
        bn.gamma.init = mx.init.Zero()
        count += 1
    return count
