"""ncnn's ``.param``/``.bin`` as data: parse, walk, write int8 weights, write ``model.table``.

Pure functions over text, bytes and NumPy arrays (no ncnn import, no file I/O), written from
ncnn's own readers (Tencent/ncnn: ``src/paramdict.cpp``, ``src/modelbin.cpp``,
``src/layer/convolution.cpp``, ``convolutiondepthwise.cpp``, ``innerproduct.cpp`` and the other
layers' ``load_model``; ``tools/quantize/ncnn2table.cpp``, ``ncnn2int8.cpp``):

* ``.param``: ``7767517``, ``LAYERS BLOBS``, then one line per layer
  ``Type name n_bottom n_top bottoms... tops... k=v ...`` (``-233xx=N,a,b,...`` is an array).
* ``.bin``: each layer's ``load_model`` reads, in order, *tagged* arrays (``mb.load(n, 0)``:
  a 4-byte tag, then fp32 (tag 0), fp16 (``0x01306B47``, padded to 4 bytes), int8
  (``0x000D4B38``, padded to 4 bytes), ...) and *raw* fp32 arrays (``mb.load(n, 1)``, no tag).
  Nothing says where a layer's bytes end, so every weighted layer type has its sizes here
  (:func:`layer_segments`); an unknown type stops the walk, and the walk must end exactly at
  the end of the file.
* int8 (Convolution, ConvolutionDepthWise, InnerProduct): ``8=`` int8_scale_term in the param
  line (2 for Convolution/InnerProduct, 1 for ConvolutionDepthWise: one scale per group); the
  weight int8 (tagged), the bias raw fp32, then raw ``weight_data_int8_scales`` (``num_output``
  values; depthwise: ``group``), then raw ``bottom_blob_int8_scales`` (1 value); ``8=10x``
  (requantize fusion, an int8 convolution feeding int8 convolutions: its output stays int8)
  appends ``top_blob_int8_scales`` (1 value, the next layer's input scale).

A scale ``s`` maps ``x`` to ``round(x * s)`` (half away from zero) clamped to ±127.
"""
import logging
import struct
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

from ..errors import UserError

__all__ = ["Layer", "Segment", "NcnnModel", "parse_param", "write_param", "layer_segments",
           "read_bin", "requantize_pairs", "quantize_int8", "dequantize_int8", "weight_scales", "write_int8",
           "write_table", "read_table", "INT8_TYPES", "KNOWN_WEIGHTED", "TAG_FP32", "TAG_FP16", "TAG_INT8"]
_LOGGER = logging.getLogger(__name__)

MAGIC = 7767517
TAG_FP32, TAG_FP16, TAG_INT8, TAG_RAW_SCALED = 0x00000000, 0x01306B47, 0x000D4B38, 0x0002C056
INT8_TYPES = ("Convolution", "ConvolutionDepthWise", "InnerProduct")

# Every layer type ncnn registers (src/CMakeLists.txt, ncnn_add_layer) whose source has no
# load_model: nothing of theirs is in the .bin.
WEIGHTLESS = frozenset("""
AbsVal ArgMax BNLL Concat Crop Dropout Eltwise ELU Exp Flatten Input Log LRN MVN Pooling Power
Proposal Reduction ReLU Reshape ROIPooling Sigmoid Slice Softmax Split SPP TanH Threshold Tile
BinaryOp UnaryOp Squeeze ExpandDims Permute PriorBox DetectionOutput Interp ShuffleChannel Clip
Reorg YoloDetectionOutput Yolov3DetectionOutput PSROIPooling ROIAlign Packing Cast HardSigmoid
SELU HardSwish Noop PixelShuffle DeepCopy Mish StatisticsPooling Swish Softplus GELU Pooling1D
Pooling3D MatMul Einsum GLU Fold Unfold GridSample CumulativeSum CopyTo Erf Diag CELU Shrink
Spectrogram InverseSpectrogram Flip SDPA RotaryEmbed
""".split())


# The weighted types :func:`layer_segments` has byte sizes for (each from its load_model).
KNOWN_WEIGHTED = ("Convolution", "ConvolutionDepthWise", "InnerProduct", "Deconvolution",
                  "DeconvolutionDepthWise", "BatchNorm", "Bias", "Scale", "PReLU", "Normalize",
                  "Padding", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm", "MemoryData",
                  "Embed", "Gemm")


@dataclass
class Layer:
    """One ``.param`` line. ``params`` keeps ncnn's keys and the value text as written."""
    type: str
    name: str
    bottoms: List[str]
    tops: List[str]
    params: Dict[str, str] = field(default_factory=dict)

    def get(self, key, default=0):
        """Integer value of param ``key`` (ncnn's ``pd.get(key, default)``)."""
        v = self.params.get(str(key))
        if v is None:
            return default
        return int(float(v)) if ("." in v or "e" in v.lower()) else int(v)


@dataclass
class Segment:
    """One ``mb.load``: ``name``, element ``count``, ``tagged`` (type 0) or raw fp32 (type 1)."""
    name: str
    count: int
    tagged: bool


@dataclass
class NcnnModel:
    """A parsed ``.param`` (``layers``, ``blob_count``)."""
    layers: List[Layer]
    blob_count: int

    def layer(self, name):
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)


def parse_param(text, where="model.ncnn.param"):
    """Parse ncnn ``.param`` text.

    Raises
    ------
    UserError
        Not an ncnn param file (bad magic or a short line).
    """
    lines = [l for l in text.splitlines() if l.strip()]
    if not lines or lines[0].strip() != str(MAGIC):
        raise UserError(f"{where}: not an ncnn param file (first line is not {MAGIC})")
    n_layers, n_blobs = (int(v) for v in lines[1].split())
    layers = []
    for i, line in enumerate(lines[2:], start=3):
        tok = line.split()
        try:
            nb, nt = int(tok[2]), int(tok[3])
            bottoms, tops = tok[4:4 + nb], tok[4 + nb:4 + nb + nt]
            rest = tok[4 + nb + nt:]
            if len(bottoms) != nb or len(tops) != nt:
                raise ValueError
            params = dict(kv.split("=", 1) for kv in rest)
        except (IndexError, ValueError):
            raise UserError(f"{where} line {i}: cannot read this layer line: {line.strip()!r}") from None
        layers.append(Layer(tok[0], tok[1], bottoms, tops, params))
    if len(layers) != n_layers:
        raise UserError(f"{where}: header says {n_layers} layers, the file has {len(layers)}")
    return NcnnModel(layers, n_blobs)


def write_param(model):
    """``.param`` text of ``model`` (the layout pnnx writes)."""
    out = [str(MAGIC), f"{len(model.layers)} {model.blob_count}"]
    for l in model.layers:
        head = f"{l.type:<24} {l.name:<24} {len(l.bottoms)} {len(l.tops)}"
        rest = " ".join(l.bottoms + l.tops + [f"{k}={v}" for k, v in l.params.items()])
        out.append(f"{head} {rest}".rstrip())
    return "\n".join(out) + "\n"


def _conv_int8_segments(layer, n_weight_scales):
    term = layer.get(8, 0)
    segs = []
    if term:
        segs += [Segment("weight_data_int8_scales", n_weight_scales, False),
                 Segment("bottom_blob_int8_scales", 1, False)]
    if term > 100:
        segs.append(Segment("top_blob_int8_scales", 1, False))
    return segs


def layer_segments(layer):
    """The arrays ``layer.load_model`` reads from the ``.bin``, in order.

    Raises
    ------
    UserError
        A layer type this walker does not know (naming the layer and its type).
    """
    t, g = layer.type, layer.get
    if t in WEIGHTLESS:
        return []
    if t in ("Convolution", "ConvolutionDepthWise"):
        if g(19, 0):                                  # dynamic weight: a second input, no data
            return []
        segs = [Segment("weight_data", g(6), True)]
        if g(5, 0):
            segs.append(Segment("bias_data", g(0), False))
        if t == "Convolution":
            return segs + _conv_int8_segments(layer, g(0))
        term = g(8, 0)
        return segs + _conv_int8_segments(layer, g(7, 1) if term in (1, 101) else 1)
    if t == "InnerProduct":
        segs = [Segment("weight_data", g(2), True)]
        if g(1, 0):
            segs.append(Segment("bias_data", g(0), False))
        if g(8, 0):
            segs += [Segment("weight_data_int8_scales", g(0), False),
                     Segment("bottom_blob_int8_scales", 1, False)]
        return segs
    if t in ("Deconvolution", "DeconvolutionDepthWise"):
        if g(28, 0):
            return []
        segs = [Segment("weight_data", g(6), True)]
        return segs + ([Segment("bias_data", g(0), False)] if g(5, 0) else [])
    if t == "BatchNorm":
        return [Segment(n, g(0), False) for n in ("slope_data", "mean_data", "var_data", "bias_data")]
    if t == "Bias":
        return [Segment("bias_data", g(0), False)]
    if t == "Scale":
        if g(0) == -233:
            return []
        return [Segment("scale_data", g(0), False)] + ([Segment("bias_data", g(0), False)] if g(1, 0) else [])
    if t == "PReLU":
        return [Segment("slope_data", g(0), False)]
    if t == "Normalize":
        return [Segment("scale_data", g(3), False)]
    if t == "Padding":
        return [Segment("per_channel_pad_data", g(6), False)] if g(6, 0) else []
    if t in ("LayerNorm", "RMSNorm"):
        if not g(2, 1):
            return []
        return [Segment("gamma_data", g(0), False)] + ([Segment("beta_data", g(0), False)] if t == "LayerNorm" else [])
    if t == "GroupNorm":
        return [Segment(n, g(1), False) for n in ("gamma_data", "beta_data")] if g(3, 1) else []
    if t == "InstanceNorm":
        return [Segment(n, g(0), False) for n in ("gamma_data", "beta_data")] if g(2, 1) else []
    if t == "MemoryData":
        dims = [d for d in (g(0), g(1), g(11), g(2)) if d]
        if not dims:
            return []
        return [Segment("data", int(np.prod(dims)), g(21, 1) == 0)]
    if t == "Embed":
        segs = [Segment("weight_data", g(3), True)]
        if g(2, 0):
            segs.append(Segment("bias_data", g(0), False))
        return segs + ([Segment("weight_data_int8_scale", 1, False)] if g(18, 0) else [])
    if t == "Gemm" and not g(18, 0):
        m, n, k = g(7), g(8), g(9)
        segs = []
        if g(4, 0):
            segs.append(Segment("A_data", m * k, True))
        if g(5, 0):
            segs.append(Segment("B_data", n * k, True))
        bc = g(10, 0)
        if g(6, 0) and bc != -1:
            sizes = {0: 1, 1: m, 2: m, 3: n * m, 4: n}
            if bc not in sizes:
                raise UserError(f"ncnn layer {layer.name} (Gemm): constant_broadcast_type_C={bc} "
                                f"is not one ncnn defines")
            segs.append(Segment("C_data", sizes[bc], True))
        return segs
    raise UserError(f"ncnn layer {layer.name!r} has type {t!r}, whose weights the ncnn int8 writer "
                    f"cannot walk (it knows {', '.join(sorted(KNOWN_WEIGHTED))} and the layers "
                    f"without weights); the fp32 model.ncnn.* files are unchanged. Export without "
                    f"ncnn-int8, or make int8 with ncnn's own ncnn2table/ncnn2int8.")


def _align4(n):
    return (n + 3) // 4 * 4


@dataclass
class Array:
    """One array read from the ``.bin``: ``values`` (float32, or int8 for int8 data), ``tag``
    (``None`` for raw), and its ``start``/``end`` byte offsets."""
    values: np.ndarray
    tag: object
    start: int
    end: int


def _read_tagged(data, pos, count, where):
    if pos + 4 > len(data):
        raise UserError(f"{where}: the .bin ends before this array's tag (offset {pos})")
    tag = struct.unpack_from("<I", data, pos)[0]
    pos += 4
    if tag == TAG_FP16:
        size = _align4(2 * count)
        vals = np.frombuffer(data, "<f2", count, pos).astype(np.float32)
    elif tag == TAG_INT8:
        size = _align4(count)
        vals = np.frombuffer(data, np.int8, count, pos).copy()
    elif tag in (TAG_FP32, TAG_RAW_SCALED):
        size = 4 * count
        vals = np.frombuffer(data, "<f4", count, pos).copy()
    elif sum(data[pos - 4:pos]) != 0:          # ncnn: any other non-zero tag is a 256-value codebook
        table = np.frombuffer(data, "<f4", 256, pos)
        idx = np.frombuffer(data, np.uint8, count, pos + 1024)
        size = 1024 + _align4(count)
        vals = table[idx].astype(np.float32)
    else:
        size, vals = 4 * count, np.frombuffer(data, "<f4", count, pos).copy()
    if pos + size > len(data):
        raise UserError(f"{where}: the .bin ends inside this array ({count} values at offset {pos})")
    return vals, tag, pos + size


def read_bin(model, data, where="model.ncnn.bin"):
    """Walk ``data`` (the ``.bin`` bytes) layer by layer.

    Returns
    -------
    dict
        Layer name → {segment name → :class:`Array`}, for layers with weights.

    Raises
    ------
    UserError
        An unknown weighted layer type, or the walk does not end at the end of the file.
    """
    pos, out = 0, {}
    for layer in model.layers:
        segs = layer_segments(layer)
        if not segs:
            continue
        arrays = {}
        for s in segs:
            here = f"{where}, layer {layer.name} ({layer.type}) {s.name}"
            start = pos
            if s.tagged:
                vals, tag, pos = _read_tagged(data, pos, s.count, here)
            else:
                if pos + 4 * s.count > len(data):
                    raise UserError(f"{here}: the .bin ends inside this array")
                vals, tag = np.frombuffer(data, "<f4", s.count, pos).copy(), None
                pos += 4 * s.count
            arrays[s.name] = Array(vals, tag, start, pos)
        out[layer.name] = arrays
    if pos != len(data):
        raise UserError(f"{where}: walking the layers' weights ends at byte {pos}, the file has "
                        f"{len(data)}: the .param and .bin do not belong together")
    return out


def _round_half_away(x):
    x = np.asarray(x, np.float64)
    return np.where(x >= 0, np.floor(x + 0.5), np.ceil(x - 0.5))


def quantize_int8(values, scales):
    """ncnn's ``quantize_to_int8`` row by row: ``values`` ``(R, K)`` float, ``scales`` ``(R,)``
    → int8 ``(R, K)`` = round(value × scale) half away from zero, clamped to ±127."""
    prod = np.asarray(values, np.float32) * np.asarray(scales, np.float32).reshape(-1, 1)
    return np.clip(_round_half_away(prod), -127, 127).astype(np.int8)


def dequantize_int8(q, scales):
    """Inverse of :func:`quantize_int8`: ``q / scale`` per row (a zero scale gives zeros)."""
    s = np.asarray(scales, np.float32).reshape(-1, 1)
    return np.where(s == 0, 0.0, q.astype(np.float32) / np.where(s == 0, 1, s)).astype(np.float32)


def weight_rows(layer):
    """How many rows (each with its own weight scale) the layer's weight has: output channels
    for Convolution and InnerProduct, groups for ConvolutionDepthWise."""
    return layer.get(7, 1) if layer.type == "ConvolutionDepthWise" else layer.get(0)


def weight_scales(layer, weight):
    """Per-row weight scales as ``ncnn2table`` computes them: 127 / absmax; 31 / absmax (6 bits)
    for 3×3, stride-1, dilation-1 Convolution (ncnn's int8 winograd F(4,3) path needs the
    headroom). An all-zero row (a pruned channel) gets scale 1 (ncnn2table would divide by
    zero): its int8 weights are zeros either way.

    Parameters
    ----------
    layer : Layer
    weight : np.ndarray
        The float weights, flat, in ncnn order.

    Returns
    -------
    np.ndarray
        float32 ``(rows,)``.
    """
    rows = weight_rows(layer)
    w = np.asarray(weight, np.float32).reshape(rows, -1)
    absmax = np.abs(w).max(axis=1)
    levels = 127.0
    if layer.type == "Convolution":
        kw = layer.get(1)
        kh, dw, sw = layer.get(11, kw), layer.get(2, 1), layer.get(3, 1)
        dh, sh = layer.get(12, dw), layer.get(13, sw)
        if (kw, kh, dw, dh, sw, sh) == (3, 3, 1, 1, 1, 1):
            levels = 31.0
    with np.errstate(divide="ignore"):
        s = np.where(absmax > 0, levels / np.where(absmax > 0, absmax, 1), 1.0)
    return s.astype(np.float32)


def _raw(values):
    return np.asarray(values, "<f4").tobytes()


def _quantizable(layer, segs, blob_scales):
    return (layer.type in INT8_TYPES and blob_scales.get(layer.name) is not None and bool(segs)
            and "weight_data" in segs and segs["weight_data"].tag != TAG_INT8 and not layer.get(8, 0))


def requantize_pairs(model, int8):
    """ncnn2int8's ``fuse_requantize``: int8 convolution → the int8 convolution that reads its
    output (directly, or through a Split whose every output feeds an int8 convolution). The
    first layer then writes int8 with the second's input scale (``8=`` + 100, one more scale).

    Returns
    -------
    dict
        Layer name → the name of the layer whose input scale it requantizes to.
    """
    convs = ("Convolution", "ConvolutionDepthWise")
    layers = model.layers

    def reader(blob, start):
        for k in range(start, len(layers)):
            l = layers[k]
            if l.type in convs and len(l.bottoms) == 1 and l.bottoms[0] == blob:
                return k
        return None

    out = {}
    for i, l in enumerate(layers):
        if l.type not in convs or l.name not in int8:
            continue
        j = reader(l.tops[0], i + 1)
        if j is not None:
            if layers[j].name in int8:
                out[l.name] = layers[j].name
            continue
        split = next((k for k in range(i + 1, len(layers)) if layers[k].type == "Split"
                      and len(layers[k].bottoms) == 1 and layers[k].bottoms[0] == l.tops[0]), None)
        if split is None:
            continue
        readers = [reader(t, split + 1) for t in layers[split].tops]
        if all(k is not None and layers[k].name in int8 for k in readers):
            out[l.name] = layers[readers[0]].name
    return out


def write_int8(model, data, blob_scales, where="model.ncnn.bin", requantize=True):
    """The int8 model: Convolution, ConvolutionDepthWise and InnerProduct layers that have a
    bottom blob scale in ``blob_scales`` get int8 weights; everything else is copied.

    Parameters
    ----------
    model : NcnnModel
        The fp32 model (not modified).
    data : bytes
        Its ``.bin``.
    blob_scales : dict
        Layer name → the scale of its input blob (127 / threshold). Layers without one stay
        fp32 (ncnn quantizes a layer only when it has both scales).
    requantize : bool
        Fuse int8 → int8 convolution pairs as ``ncnn2int8`` does (:func:`requantize_pairs`).

    Returns
    -------
    (NcnnModel, bytes, dict)
        The int8 model's layers, its ``.bin``, and layer name → weight scales of each int8 layer.
    """
    arrays = read_bin(model, data, where)
    int8 = {l.name for l in model.layers if _quantizable(l, arrays.get(l.name), blob_scales)}
    fused = requantize_pairs(model, int8) if requantize else {}
    layers, chunks, wscales, pos = [], [], {}, 0
    for layer in model.layers:
        new = Layer(layer.type, layer.name, list(layer.bottoms), list(layer.tops), dict(layer.params))
        layers.append(new)
        segs = arrays.get(layer.name)
        if not segs:
            continue
        start = min(a.start for a in segs.values())
        end = max(a.end for a in segs.values())
        assert start == pos, (layer.name, start, pos)
        pos = end
        if layer.name not in int8:
            chunks.append(data[start:end])
            continue
        scale = blob_scales[layer.name]
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"layer {layer.name}: bottom blob scale {scale} is not a positive number")
        w = segs["weight_data"].values
        ws = weight_scales(layer, w)
        q = quantize_int8(w.reshape(len(ws), -1), ws).reshape(-1)
        body = struct.pack("<I", TAG_INT8) + q.tobytes() + b"\0" * (_align4(q.size) - q.size)
        if "bias_data" in segs:
            body += _raw(segs["bias_data"].values)
        body += _raw(ws) + _raw([scale])
        term = 1 if layer.type == "ConvolutionDepthWise" else 2
        if layer.name in fused:
            body += _raw([blob_scales[fused[layer.name]]])
            term += 100
        chunks.append(body)
        new.params["8"] = str(term)
        wscales[layer.name] = ws
    assert pos == len(data)
    out = b"".join(chunks)
    int8_model = NcnnModel(layers, model.blob_count)
    read_bin(int8_model, out, "the int8 .bin just written")      # walks to the exact end
    return int8_model, out, wscales


def _fmt(v):
    return f"{float(np.float32(v)):.9g}"      # 9 significant digits: the float32 back exactly


def write_table(wscales, blob_scales):
    """``model.table`` as ``ncnn2table`` writes it (``ncnn2int8`` reads it): the weight lines
    ``LAYER_param_0 s0 s1 ...``, then the input blob lines ``LAYER s``, for the int8 layers."""
    lines = [f"{name}_param_0 " + " ".join(_fmt(s) for s in ws) for name, ws in wscales.items()]
    lines += [f"{name} {_fmt(blob_scales[name])}" for name in wscales]
    return "\n".join(lines) + "\n"


def read_table(text):
    """``(weight scales, blob scales)`` from ``model.table`` text, keyed by layer name."""
    weights, blobs = {}, {}
    for line in text.splitlines():
        tok = line.split()
        if not tok:
            continue
        vals = np.array([float(v) for v in tok[1:]], np.float32)
        if "_param_" in tok[0]:
            weights[tok[0].rsplit("_param_", 1)[0]] = vals
        else:
            blobs[tok[0]] = float(vals[0])
    return weights, blobs
