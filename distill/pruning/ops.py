"""The op-type → channel-rule table of the dependency analysis (Torch-Pruning's ``function.py``).

Each rule reads the node's input tensors (element ids along their channel axes), sets its output
tensors, couples ids that must be removed together (``g.union``), and records the parameter
slices that follow the channels (``g.add_slice``). An op not in the table, or used in a way the
rule does not cover, is *unsafe*: its inputs are frozen and its outputs get fresh frozen ids, so
its channels are never removed and the graph stays valid.

Adding an op is one function plus one entry in :data:`RULES`.
"""
import ast
import logging

import numpy as np

from .tensor import Tensor

__all__ = ["RULES", "handle", "CHANNEL_LOCAL"]
_LOGGER = logging.getLogger(__name__)

# Ops that act on each channel on its own and keep the shape: output ids = input ids.
CHANNEL_LOCAL = {
    "Activation", "relu", "sigmoid", "tanh", "softrelu", "softsign", "clip", "Dropout", "_copy",
    "identity", "BlockGrad", "stop_gradient", "Cast", "cast", "amp_cast", "_mul_scalar",
    "_div_scalar", "_plus_scalar", "_minus_scalar", "_rminus_scalar", "_rdiv_scalar",
    "_power_scalar", "_rpower_scalar", "_maximum_scalar", "_minimum_scalar", "_PlusScalar",
    "_MulScalar", "_DivScalar", "_MinusScalar", "_RMinusScalar", "_RDivScalar", "_PowerScalar",
    "_MaximumScalar", "_MinimumScalar", "square", "sqrt", "rsqrt", "abs", "exp", "log",
    "negative", "reciprocal", "sign", "round", "floor", "ceil", "hard_sigmoid", "erf",
    "log_sigmoid", "mish",
}
ELEMWISE = {
    "elemwise_add", "elemwise_sub", "elemwise_mul", "elemwise_div", "_plus", "_Plus", "_add",
    "_minus", "_Minus", "_sub", "_mul", "_Mul", "_div", "_Div", "_maximum", "_minimum",
    "_Maximum", "_Minimum", "broadcast_add", "broadcast_plus", "broadcast_sub", "broadcast_minus",
    "broadcast_mul", "broadcast_div", "broadcast_maximum", "broadcast_minimum", "broadcast_power",
    "_power", "_Power", "add_n", "ElementWiseSum", "_grad_add",
}
_CHANNEL_FIRST = (None, "None", "NCHW", "NCW", "NCDHW")


def _attr(node, key, default=None):
    return node.get("attrs", {}).get(key, default)


def _parse(value, default=None):
    """An attribute string (``'(1, 1)'``, ``'True'``, ``'None'``, ``'3'``) as a Python value."""
    if value is None:
        return default
    if value in ("True", "true"):
        return True
    if value in ("False", "false"):
        return False
    if value == "None":
        return None
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _chan_axes(t):
    return range(1, 1 + (t.ids.ndim if t.ids is not None else 0))


def _tensor_inputs(g, i):
    out = []
    for k in range(len(g.nodes[i]["inputs"])):
        kind, v = g.node_input(i, k)
        out.append((kind, v))
    return out


def _passthrough(g, i, node, outs):
    kind, x = g.node_input(i, 0)
    if kind != "tensor" or x.ids is None or not outs:
        return g.mark_unsafe(i, "its input is not an activation with channels", outs)
    k = x.ids.ndim
    if len(outs[0]) < 1 + k or tuple(outs[0][1:1 + k]) != tuple(x.shape[1:1 + k]):
        return g.mark_unsafe(i, "it changes the number of channels", outs)
    for j in range(1, len(node["inputs"])):
        kind2, _ = g.node_input(i, j)
        if kind2 == "param":
            return g.mark_unsafe(i, "it has parameters this analysis does not know how to slice", outs)
    g.tensors[(i, 0)] = Tensor(tuple(outs[0]), x.ids)


def _pooling(g, i, node, outs):
    if _attr(node, "layout") not in _CHANNEL_FIRST:
        return g.mark_unsafe(i, f"layout {_attr(node, 'layout')}: only channel-first is analysed", outs)
    return _passthrough(g, i, node, outs)


def _upsampling(g, i, node, outs):
    if _attr(node, "sample_type", "nearest") != "nearest" or int(_attr(node, "num_args", "1")) != 1:
        return g.mark_unsafe(i, "bilinear or multi-input upsampling", outs)
    return _passthrough(g, i, node, outs)


def _pad(g, i, node, outs):
    pw = _parse(_attr(node, "pad_width"), ())
    if len(pw) < 4 or any(pw[:4]):
        return g.mark_unsafe(i, "it pads the batch or channel axis", outs)
    return _passthrough(g, i, node, outs)


def _leaky(g, i, node, outs):
    if _attr(node, "act_type", "leaky") != "prelu":
        return _passthrough(g, i, node, outs)
    kind, x = g.node_input(i, 0)
    pkind, gamma = g.node_input(i, 1)
    if kind != "tensor" or x.ids is None or x.ids.ndim != 1 or pkind != "param":
        return g.mark_unsafe(i, "PReLU on an input this analysis does not follow", outs)
    n = int(np.prod(g.param_shapes[gamma]))
    if n == x.ids.size:
        g.add_slice(gamma, 0, x.ids, "other", node["name"])
    elif n != 1:
        return g.mark_unsafe(i, f"PReLU gamma of shape {g.param_shapes[gamma]}", outs)
    g.tensors[(i, 0)] = Tensor(tuple(outs[0]), x.ids)


def _conv(g, i, node, outs):
    name = node["name"]
    if _attr(node, "layout") not in _CHANNEL_FIRST:
        return g.mark_unsafe(i, f"layout {_attr(node, 'layout')}: only channel-first is analysed", outs)
    kind, x = g.node_input(i, 0)
    wkind, w = g.node_input(i, 1)
    if kind != "tensor" or x.ids is None or x.ids.ndim != 1 or wkind != "param":
        return g.mark_unsafe(i, "its input or weight is not a plain activation / parameter", outs)
    no_bias = _parse(_attr(node, "no_bias"), False)
    bkind, b = g.node_input(i, 2) if not no_bias else (None, None)
    if not no_bias and bkind != "param":
        return g.mark_unsafe(i, "its bias is not a parameter", outs)
    c_in, c_out = x.ids.size, int(outs[0][1])
    groups = int(_parse(_attr(node, "num_group"), 1))
    out = g.fresh(c_out)
    if groups == 1:
        g.add_slice(w, 1, x.ids, "in", name)
        g.layer_kind[i] = "conv"
    elif groups == c_in:                       # depthwise (channel multiplier c_out / c_in)
        g.union(out.reshape(c_in, c_out // c_in), x.ids[:, None])
        g.layer_kind[i] = "depthwise"
    else:                                      # grouped: prune the same offsets in every group
        if c_in % groups or c_out % groups:
            return g.mark_unsafe(i, "channels not divisible by num_group", outs)
        g.union_along_first(x.ids.reshape(groups, -1))
        g.union_along_first(out.reshape(groups, -1))
        g.add_slice(w, 1, x.ids.reshape(groups, -1)[0], "in", name)
        g.layer_kind[i] = "grouped"
    g.add_slice(w, 0, out, "out", name)
    if b is not None:
        g.add_slice(b, 0, out, "bias", name)
    g.tensors[(i, 0)] = Tensor(tuple(outs[0]), out)


def _fc(g, i, node, outs):
    name = node["name"]
    kind, x = g.node_input(i, 0)
    wkind, w = g.node_input(i, 1)
    if kind != "tensor" or x.ids is None or wkind != "param":
        return g.mark_unsafe(i, "its input or weight is not a plain activation / parameter", outs)
    no_bias = _parse(_attr(node, "no_bias"), False)
    bkind, b = g.node_input(i, 2) if not no_bias else (None, None)
    if not no_bias and bkind != "param":
        return g.mark_unsafe(i, "its bias is not a parameter", outs)
    if _parse(_attr(node, "flatten"), True):
        trailing = int(np.prod(x.shape[1 + x.ids.ndim:], dtype=np.int64))
        cols = np.repeat(x.ids.ravel(), trailing)
    else:
        if len(x.shape) != 2:
            return g.mark_unsafe(i, "flatten=False on an input with more than two axes", outs)
        cols = x.ids
    if cols.size != g.param_shapes[w][1]:
        return g.mark_unsafe(i, "its weight does not match the input width", outs)
    out = g.fresh(int(outs[0][-1]))
    g.add_slice(w, 0, out, "out", name)
    g.add_slice(w, 1, cols, "in", name)
    if b is not None:
        g.add_slice(b, 0, out, "bias", name)
    g.layer_kind[i] = "fc"
    g.tensors[(i, 0)] = Tensor(tuple(outs[0]), out)


def _norm(g, i, node, outs):
    """BatchNorm / InstanceNorm: per-channel parameters follow the channels."""
    name = node["name"]
    kind, x = g.node_input(i, 0)
    if kind != "tensor" or x.ids is None or x.ids.ndim != 1:
        return g.mark_unsafe(i, "its input is not an activation with one channel axis", outs)
    axis = int(_parse(_attr(node, "axis"), 1))
    if axis < 0:
        axis += len(x.shape)
    if node["op"] == "BatchNorm" and axis != 1:
        return g.mark_unsafe(i, f"normalises axis {axis}, not the channel axis", outs)
    roles = ["scale", "shift", "stat", "stat"]
    for k in range(1, len(node["inputs"])):
        pkind, p = g.node_input(i, k)
        if pkind != "param":
            return g.mark_unsafe(i, "a per-channel input is not a parameter", outs)
        if int(np.prod(g.param_shapes[p])) != x.ids.size:
            return g.mark_unsafe(i, f"parameter {p} is not per-channel", outs)
        g.add_slice(p, 0, x.ids, roles[k - 1], name)
    g.tensors[(i, 0)] = Tensor(tuple(outs[0]), x.ids)


def _elemwise(g, i, node, outs):
    out_shape = tuple(outs[0])
    tensors, params = [], []
    for kind, v in _tensor_inputs(g, i):
        if kind == "tensor":
            tensors.append(v)
        elif kind == "param":
            params.append(v)
    ref = None
    for t in tensors:
        if t.ids is not None and len(t.shape) == len(out_shape) and \
                tuple(t.shape[1:1 + t.ids.ndim]) == tuple(out_shape[1:1 + t.ids.ndim]):
            ref = t
            break
    if ref is None:
        return g.mark_unsafe(i, "no input carries the output's channels", outs)
    k = ref.ids.ndim
    for t in tensors:
        if t is ref:
            continue
        if len(t.shape) != len(out_shape):
            return g.mark_unsafe(i, "inputs of different rank", outs)
        dims = tuple(t.shape[1:1 + k])
        if dims == tuple(out_shape[1:1 + k]) and t.ids is not None and t.ids.shape == ref.ids.shape:
            g.union(ref.ids, t.ids)
        elif all(d == 1 for d in dims):
            continue                           # broadcast over channels: does not couple
        else:
            return g.mark_unsafe(i, "inputs with different channel layouts", outs)
    for p in params:
        shape = g.param_shapes[p]
        lead = len(out_shape) - len(shape)       # numpy aligns trailing axes
        chan = [a - lead for a in _chan_axes(ref) if a - lead >= 0]
        sizes = [shape[a] for a in chan]
        if all(s == 1 for s in sizes):
            continue
        if k == 1 and len(chan) == 1 and sizes[0] == ref.ids.size:
            g.add_slice(p, chan[0], ref.ids, "other", node["name"])
        else:
            return g.mark_unsafe(i, f"parameter {p} of shape {shape} does not follow the channels", outs)
    g.tensors[(i, 0)] = Tensor(out_shape, ref.ids)


def _concat(g, i, node, outs):
    ins = _tensor_inputs(g, i)
    if any(kind != "tensor" or v.ids is None for kind, v in ins):
        return g.mark_unsafe(i, "an input is a parameter or has no channel axis", outs)
    ts = [v for _, v in ins]
    ndim = len(outs[0])
    dim = int(_parse(_attr(node, "dim"), 1))
    if dim < 0:
        dim += ndim
    if dim == 1 and all(t.ids.ndim == 1 for t in ts):
        g.tensors[(i, 0)] = Tensor(tuple(outs[0]), np.concatenate([t.ids for t in ts]))
        return
    if dim == 0 or dim > ts[0].ids.ndim:
        if any(t.ids.shape != ts[0].ids.shape for t in ts):
            return g.mark_unsafe(i, "inputs with different channel layouts", outs)
        for t in ts[1:]:
            g.union(ts[0].ids, t.ids)
        g.tensors[(i, 0)] = Tensor(tuple(outs[0]), ts[0].ids)
        return
    return g.mark_unsafe(i, f"concatenates along axis {dim} of a reshaped channel layout", outs)


def _split(g, i, node, outs):
    kind, x = g.node_input(i, 0)
    if kind != "tensor" or x.ids is None:
        return g.mark_unsafe(i, "its input has no channel axis", outs)
    n = int(_parse(_attr(node, "num_outputs"), 1))
    axis = int(_parse(_attr(node, "axis"), 1))
    if axis < 0:
        axis += len(x.shape)
    squeeze = _parse(_attr(node, "squeeze_axis"), False)
    if axis == 0 or axis > x.ids.ndim:
        if squeeze:
            return g.mark_unsafe(i, "squeeze_axis changes the layout", outs)
        for k, shape in enumerate(outs):
            g.tensors[(i, k)] = Tensor(tuple(shape), x.ids)
        return
    if axis != 1 or x.ids.ndim != 1 or squeeze or x.ids.size % n:
        return g.mark_unsafe(i, "splits a reshaped channel layout", outs)
    parts = x.ids.reshape(n, -1)
    g.union_along_first(parts)                 # equal-size outputs: the same offsets go together
    for k, shape in enumerate(outs):
        g.tensors[(i, k)] = Tensor(tuple(shape), parts[k])


def _slice_axis(g, i, node, outs):
    kind, x = g.node_input(i, 0)
    if kind != "tensor" or x.ids is None:
        return g.mark_unsafe(i, "its input has no channel axis", outs)
    axis = int(_parse(_attr(node, "axis"), 0))
    if axis < 0:
        axis += len(x.shape)
    if axis == 0 or axis > x.ids.ndim:
        g.tensors[(i, 0)] = Tensor(tuple(outs[0]), x.ids)
        return
    if axis != 1 or x.ids.ndim != 1:
        return g.mark_unsafe(i, "slices a reshaped channel layout", outs)
    c = x.ids.size
    begin = int(_parse(_attr(node, "begin"), 0))
    end = _parse(_attr(node, "end"), None)
    end = c if end is None else int(end)
    begin, end = begin + c if begin < 0 else begin, end + c if end < 0 else end
    g.rewrites[i] = {"kind": "slice_axis", "input": x.ids, "begin": begin, "end": end}
    g.tensors[(i, 0)] = Tensor(tuple(outs[0]), x.ids[begin:end])


def _slice(g, i, node, outs):
    kind, x = g.node_input(i, 0)
    if kind != "tensor" or x.ids is None:
        return g.mark_unsafe(i, "its input has no channel axis", outs)
    begin = list(_parse(_attr(node, "begin"), ()))
    end = list(_parse(_attr(node, "end"), ()))
    step = list(_parse(_attr(node, "step"), ()) or ())
    k = x.ids.ndim
    touched = [a for a in range(1, 1 + k) if a < len(begin) and
               ((begin[a] not in (None, 0)) or (a < len(end) and end[a] not in (None, x.shape[a])))]
    if any(s not in (None, 1) for s in step):
        return g.mark_unsafe(i, "strided slice", outs)
    if begin and begin[0] not in (None, 0) or end and end[0] not in (None, x.shape[0]):
        return g.mark_unsafe(i, "slices the batch axis", outs)
    if not touched:
        g.tensors[(i, 0)] = Tensor(tuple(outs[0]), x.ids)
        return
    if touched != [1] or k != 1:
        return g.mark_unsafe(i, "slices a reshaped channel layout", outs)
    c = x.ids.size
    b = begin[1] or 0
    e = end[1] if len(end) > 1 and end[1] is not None else c
    b, e = b + c if b < 0 else b, e + c if e < 0 else e
    g.rewrites[i] = {"kind": "slice", "input": x.ids, "begin": b, "end": e}
    g.tensors[(i, 0)] = Tensor(tuple(outs[0]), x.ids[b:e])


def _flatten_ids(x):
    trailing = int(np.prod(x.shape[1 + x.ids.ndim:], dtype=np.int64))
    return np.repeat(x.ids.ravel(), trailing)


def _flatten(g, i, node, outs):
    kind, x = g.node_input(i, 0)
    if kind != "tensor" or x.ids is None:
        return g.mark_unsafe(i, "its input has no channel axis", outs)
    ids = _flatten_ids(x)
    derived = x.ids.ndim == 1 and ids.size != x.ids.size
    if node["op"] in ("Reshape", "reshape"):
        g.rewrites[i] = {"kind": "reshape"}
    g.tensors[(i, 0)] = Tensor(tuple(outs[0]), ids, derived=derived)


def _reshape(g, i, node, outs):
    kind, x = g.node_input(i, 0)
    if kind != "tensor" or x.ids is None:
        return g.mark_unsafe(i, "its input has no channel axis", outs)
    if _parse(_attr(node, "reverse"), False):
        return g.mark_unsafe(i, "reverse=True reshape", outs)
    out = tuple(outs[0])
    k = x.ids.ndim
    chan_in, trail_in = tuple(x.shape[1:1 + k]), tuple(x.shape[1 + k:])
    if out[0] != x.shape[0]:
        return g.mark_unsafe(i, "it reshapes the batch axis", outs)
    if len(out) == 2 and out[1] == int(np.prod(x.shape[1:])) and (trail_in or k > 1):
        return _flatten(g, i, node, outs)
    n_chan = int(np.prod(chan_in))
    for j in range(1, len(out)):
        new_chan, trail_out = out[1:1 + j], out[1 + j:]
        if int(np.prod(new_chan)) != n_chan:
            continue
        if trail_out == trail_in or (int(np.prod(trail_out)) == 1 and int(np.prod(trail_in)) == 1):
            while len(new_chan) > 1 and new_chan[-1] == 1:
                new_chan = new_chan[:-1]
            ids = x.ids.reshape(new_chan)
            if ids.ndim > 1:
                # a channel split (ShuffleNet's (N, g, C/g, H, W)): keep the kept set a product
                # set by pruning the same offsets in every slice of the leading axes
                g.union_along_first(ids.reshape(-1, ids.shape[-1]))
            g.rewrites[i] = {"kind": "reshape"}
            g.tensors[(i, 0)] = Tensor(out, ids)
            return
    return g.mark_unsafe(i, f"reshape {x.shape} -> {out} mixes channel and other axes", outs)


def _swapaxes(g, i, node, outs):
    kind, x = g.node_input(i, 0)
    if kind != "tensor" or x.ids is None:
        return g.mark_unsafe(i, "its input has no channel axis", outs)
    nd = len(x.shape)
    d1, d2 = (int(_parse(_attr(node, a), 0)) for a in ("dim1", "dim2"))
    d1, d2 = d1 + nd if d1 < 0 else d1, d2 + nd if d2 < 0 else d2
    chan = set(_chan_axes(x))
    if {d1, d2} <= chan:
        g.tensors[(i, 0)] = Tensor(tuple(outs[0]), np.swapaxes(x.ids, d1 - 1, d2 - 1))
    elif not ({d1, d2} & chan) and 0 not in (d1, d2):
        g.tensors[(i, 0)] = Tensor(tuple(outs[0]), x.ids)
    else:
        return g.mark_unsafe(i, "it moves the channel axis", outs)


def _transpose(g, i, node, outs):
    kind, x = g.node_input(i, 0)
    if kind != "tensor" or x.ids is None:
        return g.mark_unsafe(i, "its input has no channel axis", outs)
    nd = len(x.shape)
    axes = _parse(_attr(node, "axes"), ()) or tuple(reversed(range(nd)))
    axes = [a + nd if a < 0 else a for a in axes]
    k = x.ids.ndim
    if axes[0] != 0 or sorted(axes[1:1 + k]) != list(range(1, 1 + k)):
        return g.mark_unsafe(i, "it moves the channel axis", outs)
    g.tensors[(i, 0)] = Tensor(tuple(outs[0]), np.transpose(x.ids, [a - 1 for a in axes[1:1 + k]]))


def _reduce(g, i, node, outs):
    kind, x = g.node_input(i, 0)
    if kind != "tensor" or x.ids is None:
        return g.mark_unsafe(i, "its input has no channel axis", outs)
    nd = len(x.shape)
    axis = _parse(_attr(node, "axis"), None)
    if _parse(_attr(node, "exclude"), False) or axis in (None, ()):
        return g.mark_unsafe(i, "it reduces over the channels", outs)
    axes = {a + nd if a < 0 else a for a in ((axis,) if isinstance(axis, int) else axis)}
    if axes & set(_chan_axes(x)) or 0 in axes:
        return g.mark_unsafe(i, "it reduces over the channels or the batch", outs)
    g.tensors[(i, 0)] = Tensor(tuple(outs[0]), x.ids)


def _softmax(g, i, node, outs):
    kind, x = g.node_input(i, 0)
    if kind != "tensor" or x.ids is None:
        return g.mark_unsafe(i, "its input has no channel axis", outs)
    nd = len(x.shape)
    if node["op"] == "SoftmaxActivation":
        axes = {1} if _attr(node, "mode", "instance") == "channel" else set(range(1, nd))
    else:
        a = int(_parse(_attr(node, "axis"), -1))
        axes = {a + nd if a < 0 else a}
    if axes & set(_chan_axes(x)):
        return g.mark_unsafe(i, "it normalises across channels", outs)
    g.tensors[(i, 0)] = Tensor(tuple(outs[0]), x.ids)


def _expand_dims(g, i, node, outs):
    kind, x = g.node_input(i, 0)
    if kind != "tensor" or x.ids is None:
        return g.mark_unsafe(i, "its input has no channel axis", outs)
    axis = int(_parse(_attr(node, "axis"), 0))
    if axis < 0:
        axis += len(outs[0])
    if axis <= x.ids.ndim:
        return g.mark_unsafe(i, "it inserts an axis before the channels", outs)
    g.tensors[(i, 0)] = Tensor(tuple(outs[0]), x.ids)


def _l2norm(g, i, node, outs):
    if _attr(node, "mode", "instance") == "spatial":
        return _passthrough(g, i, node, outs)
    return g.mark_unsafe(i, "it normalises across channels", outs)


RULES = {
    "Convolution": _conv,
    "FullyConnected": _fc,
    "BatchNorm": _norm,
    "InstanceNorm": _norm,
    "LeakyReLU": _leaky,
    "Pooling": _pooling,
    "UpSampling": _upsampling,
    "Pad": _pad, "pad": _pad,
    "Concat": _concat, "concat": _concat,
    "SliceChannel": _split, "split": _split,
    "slice_axis": _slice_axis,
    "slice": _slice, "crop": _slice,
    "Flatten": _flatten, "flatten": _flatten,
    "Reshape": _reshape, "reshape": _reshape,
    "SwapAxis": _swapaxes, "swapaxes": _swapaxes,
    "transpose": _transpose,
    "sum": _reduce, "mean": _reduce, "max": _reduce, "min": _reduce, "nansum": _reduce,
    "softmax": _softmax, "log_softmax": _softmax, "SoftmaxActivation": _softmax,
    "expand_dims": _expand_dims,
    "L2Normalization": _l2norm,
}
RULES.update({op: _passthrough for op in CHANNEL_LOCAL})
RULES.update({op: _elemwise for op in ELEMWISE})
_WHY = {
    "LRN": "it mixes neighbouring channels",
    "LayerNorm": "it normalises across channels",
    "GroupNorm": "its groups tie channels together",
    "Deconvolution": "transposed convolution is not analysed",
}


def handle(g, i, node, outs):
    """Apply the rule for ``node`` (index ``i``, output shapes ``outs``) to the graph ``g``."""
    rule = RULES.get(node["op"])
    if rule is None:
        return g.mark_unsafe(i, _WHY.get(node["op"], "operator not in the channel-rule table"), outs)
    return rule(g, i, node, outs)
