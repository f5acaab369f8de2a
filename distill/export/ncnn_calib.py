"""ncnn blob scales: MXNet's calibration mapped onto ncnn's blobs, or ncnn's own KL method.

pnnx renames every blob (``in0``, ``1``, ``2``, ...) and layer (``convrelu_0``), so names cannot
say which ncnn blob is which MXNet tensor. Values can: both graphs run on the same calibration
images and each ncnn blob is matched with the MXNet tensor of the same size whose values it
equals (:func:`match_tensors`). A fused conv + BN + activation output in MXNet's oneDNN graph
is the activation blob in ncnn, so the thresholds ``distill quantize`` and ``onnx-int8`` use
carry over; a blob that matches nothing is calibrated on ncnn's own blobs by the same method.
The same matching on the layers' *output* blobs tells which MXNet weight layer an ncnn layer
is (for ``int8.excluded`` and ``--int8-exclude``).

:func:`ncnn_kl_threshold` is ``ncnn2table``'s ``method=kl``: a 2048-bin histogram of ``|x|``
over ``[0, absmax]`` with exact zeros skipped, the threshold bin (128..2047) whose clipped
distribution, merged into 128 bins and expanded back, has the smallest KL divergence; the
threshold is ``(bin + 0.5) × absmax / 2048``.
"""
import json
import logging
import os

import numpy as np

from ..quiet import native_stderr

__all__ = ["NUM_BINS", "TARGET_BINS", "abs_histogram", "ncnn_kl_threshold", "match_tensors",
           "mxnet_tensors", "tensor_layers", "blob_scale"]
_LOGGER = logging.getLogger(__name__)

NUM_BINS, TARGET_BINS = 2048, 128
# Ops whose output is still "that weight layer's output" as ncnn sees it: ncnn folds BatchNorm
# and fuses the activation into the convolution (a residual add stays a separate BinaryOp).
_PASS_OPS = ("BatchNorm", "Activation", "clip", "LeakyReLU", "relu", "sigmoid", "Dropout",
             "_copy", "identity", "Flatten", "flatten")


def abs_histogram(values, absmax, bins=NUM_BINS):
    """ncnn2table's histogram of one blob: ``|x| / absmax × bins``, floored, exact zeros skipped,
    the last bin holds everything beyond. ``values``: any shape. Returns int64 ``(bins,)``."""
    v = np.abs(np.asarray(values, np.float32).reshape(-1))
    v = v[v != 0]
    if absmax <= 0 or not v.size:
        return np.zeros(bins, np.int64)
    idx = np.minimum((v / np.float32(absmax) * bins).astype(np.int64), bins - 1)
    return np.bincount(idx, minlength=bins).astype(np.int64)


def _bin_edges(threshold, target):
    """Per target bin ``j``: first whole source bin ``lo``, end ``hi``, and the fractions ``ls``
    of bin ``lo - 1`` and ``rs`` of bin ``hi`` it also covers (ncnn2table's loops, vectorized)."""
    npb = threshold / target
    j = np.arange(target)
    start, end = j * npb, (j + 1) * npb
    lo = np.ceil(start).astype(np.int64)
    hi = np.floor(end).astype(np.int64)
    lo[0], hi[-1] = 0, threshold
    ls, rs = lo - start, end - hi
    ls[0], rs[-1] = 0.0, 0.0
    return lo, hi, ls, rs


def _merge(h, csum, lo, hi, ls, rs):
    """ncnn's ``quantize_distribution``: each target bin is the mean of the source bins it spans."""
    s = csum[hi] - csum[lo] + ls * h[np.maximum(lo - 1, 0)] + rs * h[np.minimum(hi, len(h) - 1)]
    return s / ((hi - lo) + ls + rs)


def _expand(q, threshold, lo, hi, ls, rs, eps):
    """ncnn's ``expand_distribution``: each merged bin spread back over the bins it spans."""
    d = np.zeros(threshold + 1, np.float64)
    np.add.at(d, lo, q)
    np.add.at(d, hi, -q)
    e = np.cumsum(d)[:threshold] + eps
    m = ls > 0
    np.add.at(e, lo[m] - 1, ls[m] * q[m])
    m = rs > 0
    np.add.at(e, hi[m], rs[m] * q[m])
    return e


def ncnn_kl_threshold(hist, absmax, target=TARGET_BINS, eps=1e-4):
    """The KL threshold of ``ncnn2table`` (``method=kl``) for one blob.

    Parameters
    ----------
    hist : np.ndarray
        ``(2048,)`` counts from :func:`abs_histogram`, summed over the calibration images.
    absmax : float
        Largest ``|x|`` of the blob over the same images.

    Returns
    -------
    float
        The threshold (the blob's scale is ``127 / threshold``).
    """
    hist = np.asarray(hist, np.float64)
    bins = len(hist)
    total = hist.sum()
    if total <= 0 or absmax <= 0:
        return float(absmax) if absmax > 0 else 1e-8
    h = hist / total
    csum = np.concatenate([[0.0], np.cumsum(h)])                  # csum[k] = sum(h[:k])
    tail = csum[-1] - csum                                          # tail[t] = sum(h[t:])
    best, best_kl = target, np.inf
    for threshold in range(target, bins):
        clip = h[:threshold] + eps
        clip[threshold - 1] += tail[threshold]
        lo, hi, ls, rs = _bin_edges(threshold, target)
        q = _merge(h, csum, lo, hi, ls, rs)
        e = _expand(q, threshold, lo, hi, ls, rs, eps)
        kl = float(np.sum(clip * np.log(clip / e)))
        if kl < best_kl:
            best_kl, best = kl, threshold
    return float((best + 0.5) * absmax / bins)


def match_tensors(blobs, tensors, rtol=1e-3):
    """For each ncnn blob, the MXNet tensor with the same values on the same images.

    Parameters
    ----------
    blobs : dict
        ncnn blob name → ``(N, size)`` float values on N images.
    tensors : dict
        MXNet tensor name → ``(N, size)`` values on the same images, same order.
    rtol : float
        Largest ``max |a - b| / max |b|`` that still counts as equal.

    Returns
    -------
    dict
        blob → tensor name, or ``None`` when nothing matches (ties: the first closest).
    """
    by_size = {}
    for name, t in tensors.items():
        by_size.setdefault(t.shape[1:], []).append(name)
    out = {}
    for blob, b in blobs.items():
        best, best_err = None, rtol
        for name in by_size.get(b.shape[1:], []):
            t = tensors[name]
            err = float(np.abs(b - t).max() / max(float(np.abs(t).max()), 1e-6))
            if err <= best_err:
                if err < best_err or best is None:
                    best, best_err = name, err
        out[blob] = best
    return out


def mxnet_tensors(model, x, names=None, fused=True):
    """Values of the graph's node outputs on the images ``x`` ``(N, C, H, W)``, flattened per image.

    ``fused``: the oneDNN-fused fp32 graph (whose outputs carry the calibration thresholds),
    else the original graph (whose nodes name the weight layers).

    Returns
    -------
    dict
        Output name → float32 ``(N, size)``.
    """
    import mxnet as mx
    sym = model.fused if fused else model.symbol
    internals = sym.get_internals()
    params = set(model.arg_params) | set(model.aux_params)
    names = names or [n for n in internals.list_outputs()
                      if n == model.input_name or (n.endswith("_output") and n not in params)]
    group = mx.sym.Group([internals[n] for n in names])
    # Binding partitions the graph for oneDNN by default, which fails on a group of the original
    # graph's internals (a fused node would swallow a requested output): bind it as written.
    # (MXNet logs "MXNET_SUBGRAPH_BACKEND=NONE is detected" on each such bind: kept off the log)
    old = os.environ.get("MXNET_SUBGRAPH_BACKEND")
    os.environ["MXNET_SUBGRAPH_BACKEND"] = "NONE"
    try:
        with native_stderr():
            ex = group.simple_bind(mx.cpu(), grad_req="null", **{model.input_name: x.shape})
    finally:
        if old is None:
            del os.environ["MXNET_SUBGRAPH_BACKEND"]
        else:
            os.environ["MXNET_SUBGRAPH_BACKEND"] = old
    ex.copy_params_from(model.arg_params, model.aux_params, allow_extra_params=True)
    outs = ex.forward(is_train=False, **{model.input_name: mx.nd.array(x)})
    return {n: o.asnumpy().reshape(len(x), -1) for n, o in zip(names, outs)}


def tensor_layers(model):
    """Original-graph output name → the weight layer whose output it is (through BatchNorm,
    activations and other element-wise ops that follow it), and fused node output → the first
    weight layer inside it."""
    from ..quantize.graph import WEIGHT_OPS
    nodes = json.loads(model.symbol.tojson())["nodes"]
    owner = {}
    for i, n in enumerate(nodes):
        if n["op"] in WEIGHT_OPS:
            owner[i] = n["name"]
        elif n["op"] in _PASS_OPS and n["inputs"] and n["inputs"][0][0] in owner:
            owner[i] = owner[n["inputs"][0][0]]
    out = {nodes[i]["name"] + "_output": layer for i, layer in owner.items()}
    for l in model.layers:
        out.setdefault(l.fused + "_output", l.name)
    return out


def blob_scale(threshold):
    """ncnn's blob scale for a symmetric range ``[-t, t]`` (or an MXNet ``(min, max)``)."""
    if isinstance(threshold, (tuple, list)):
        threshold = max(abs(float(threshold[0])), abs(float(threshold[1])))
    return float(np.float32(127.0 / max(float(threshold), 1e-8)))
