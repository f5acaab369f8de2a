"""The fp32 graph, its weight layers, and int8 graphs built from it on MXNet's oneDNN path.

A :class:`FloatModel` is loaded once: the logits symbol, its parameters, the oneDNN-fused fp32
graph (``get_backend_symbol('MKLDNN_QUANTIZE')``: conv + BN + activation fused, as deployed) and
the list of weight layers (``Convolution``, ``FullyConnected``) that exclusion policies choose
from. :func:`quantize` turns it plus a thresholds table into an int8 graph with some layers
left in fp32; it is called many times (one per candidate exclusion set) and is cheap: the
thresholds are collected once (:mod:`distill.quantize.calibrators`).

Layer names are the original graph's (``mobilenetv20_features_conv0_fwd``), as users see them
in ``distill inspect`` and write them in patterns; MXNet's quantization pass accepts them for
the fused nodes that contain them.
"""
import functools
import json
import logging
import warnings
from dataclasses import dataclass
from typing import Dict, List, Tuple

import mxnet as mx
from mxnet.contrib import quantization as mxq

from ..errors import UserError
from ..graphio import check_params, load_pair, make_block
from ..graphnorm import normalise
from ..modelinfo import layer_table

__all__ = ["Layer", "FloatModel", "QuantizedGraph", "quantize", "inference_block", "WEIGHT_OPS",
           "dense_int8_saturates"]
_LOGGER = logging.getLogger(__name__)

WEIGHT_OPS = ("Convolution", "FullyConnected")


@dataclass
class Layer:
    """One weight layer of the fp32 graph.

    Attributes
    ----------
    name : str
        The node name in the original graph (what patterns match).
    op : str
        ``Convolution`` or ``FullyConnected``.
    fused : str
        The oneDNN-fused node that contains it (``sg_mkldnn_conv_bn_act_3``), or ``name``.
    macs : int
        Multiply–accumulates per image.
    shape : tuple
        Output shape for one image ``(1, C, H, W)`` or ``(1, K)``.
    """
    name: str
    op: str
    fused: str
    macs: int
    shape: Tuple[int, ...]


@dataclass
class QuantizedGraph:
    """An int8 graph: ``symbol`` (oneDNN-fused, calibrated) and ``params`` (name → NDArray,
    ``arg`` and ``aux`` merged); ``excluded`` are the weight layers kept in fp32."""
    symbol: mx.sym.Symbol
    params: Dict[str, mx.nd.NDArray]
    excluded: List[str]
    calib_layers: List[str]


class FloatModel:
    """An fp32 inference graph ready to be calibrated and quantized.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        Logits graph (training heads already stripped).
    params : dict
        name → NDArray (``arg``/``aux`` merged).
    input_shape : tuple
        ``(C, H, W)`` of one image.
    input_name : str
        The graph's input variable.
    source : str
        Where it came from, for messages.

    Attributes
    ----------
    fitted_pools : list of str
        Global pools whose stored kernel was larger than their input and was set to its size.
    """

    def __init__(self, symbol, params, input_shape, input_name="data", source="model"):
        self.input_shape = tuple(int(s) for s in input_shape)
        # normalised as load_pair does (idempotent: a loaded pair is unchanged), so a model built
        # from any symbol gets it too: a Flatten before each FC (else oneDNN's "TBlob for MKLDNN
        # data" crash in calibration), fix_gamma gammas at 1, and global pool kernels fitted to
        # their input (MXNet's int8 pooling checks the stored kernel); each change is logged
        symbol, params, done = normalise(symbol, params, (1,) + self.input_shape, input_name,
                                         where=source)
        self.fitted_pools = done.pools
        self.symbol = symbol
        self.input_name = input_name
        self.source = source
        args, auxs = set(symbol.list_arguments()), set(symbol.list_auxiliary_states())
        self.arg_params = {k: v for k, v in params.items() if k in args}
        self.aux_params = {k: v for k, v in params.items() if k in auxs}
        missing = sorted((args | auxs) - set(params) - {input_name})
        if missing:
            raise UserError(f"{source}: the params file lacks {', '.join(missing[:6])}"
                            f"{' ...' if len(missing) > 6 else ''}; is it from the same model?")
        # The graph as oneDNN runs it in fp32; the int8 pass starts from it, and its node outputs
        # are what calibration measures. Node names are numbered per call, so build it once.
        self.fused = symbol.get_backend_symbol("MKLDNN_QUANTIZE")
        self.unfused_adds = mixed_sign_sums(self.fused)
        if self.unfused_adds:
            symbol = keep_adds_unfused(symbol, self.unfused_adds)
            self.symbol = symbol
            self.fused = symbol.get_backend_symbol("MKLDNN_QUANTIZE")
            _LOGGER.info("%s: int8: %d residual add(s) kept out of oneDNN's conv+sum fusion (%s): "
                         "their shortcut and the fused output differ in sign (int8 vs uint8), and "
                         "MXNet 1.9.1's fused int8 conv reads the shortcut's codes as the output's "
                         "type (negative shortcut values turn into large positive ones); the add runs "
                         "as a separate op instead, same values.", source, len(self.unfused_adds),
                         ", ".join(self.unfused_adds[:4]) + (" ..." if len(self.unfused_adds) > 4 else ""))
        self.layers = self._weight_layers()
        if not self.layers:
            raise UserError(f"{source}: the graph has no Convolution or FullyConnected layer: "
                            f"there is nothing for int8 to speed up.")
        # weight layers this CPU cannot run in int8 without overflow: always fp32 (see
        # dense_int8_saturates); listed in the int8 report as `host_fp32`
        self.host_fp32 = [l.name for l in self.layers if l.op == "FullyConnected"] \
            if dense_int8_saturates() else []
        if self.host_fp32:
            _LOGGER.info("%s: int8: %d FullyConnected layer(s) kept fp32 (%s): this CPU's oneDNN "
                         "int8 inner product adds pairs of u8×s8 products in 16 bits and "
                         "saturates (no VNNI, or DNNL_MAX_CPU_ISA below it); measured here by a "
                         "probe.", source, len(self.host_fp32), ", ".join(self.host_fp32[:4]) +
                         (" ..." if len(self.host_fp32) > 4 else ""))
        self.op_names = [n["name"] for n in json.loads(symbol.tojson())["nodes"] if n["op"] != "null"]
        self.fused_op_names = [n["name"] for n in json.loads(self.fused.tojson())["nodes"]
                               if n["op"] != "null"]

    @classmethod
    def from_prefix(cls, prefix, input_shape, epoch=0, input_name="data"):
        """Load ``PREFIX-symbol.json`` + ``PREFIX-%04d.params`` (Gluon export or Module API)."""
        sym, params = load_pair(prefix, epoch, what="model", input_shape=input_shape,
                                input_name=input_name)
        check_params(sym, params, input_name, (1,) + tuple(input_shape), where=prefix)
        return cls(sym, params, input_shape, input_name, source=prefix)

    @property
    def params(self):
        return {**self.arg_params, **self.aux_params}

    @property
    def layer_names(self):
        return [l.name for l in self.layers]

    def _weight_layers(self):
        fused_of = {}
        for node in json.loads(self.fused.tojson())["nodes"]:
            for sub in node.get("subgraphs", []):
                for inner in sub["nodes"]:
                    fused_of[inner["name"]] = node["name"]
        rows = layer_table(self.symbol, (1,) + self.input_shape, self.input_name)
        return [Layer(r["name"], r["op"], fused_of.get(r["name"], r["name"]), int(r["macs"]),
                      tuple(r["shape"])) for r in rows if r["op"] in WEIGHT_OPS]

    def calib_outputs(self):
        """Names of the fused graph's outputs that int8 graphs may need thresholds for.

        Every output of every fused node, plus the input: a superset of the ``calib_layers`` of
        any :func:`quantize` result, whatever is excluded.
        """
        names = self.fused.get_internals().list_outputs()
        params = set(self.arg_params) | set(self.aux_params)
        return [n for n in names if n == self.input_name or (n.endswith("_output") and n not in params)]


_UNSIGNED_ACTS = ("relu", "sigmoid", "softrelu")
_PASS_SIGN = ("Pooling", "Flatten", "Reshape", "flatten", "reshape", "Dropout")


def _ends_unsigned(nodes, i):
    """Whether node ``i`` of a oneDNN-fused fp32 graph is stored as uint8 by the int8 pass:
    a fused conv / FC or an activation ending in ReLU, sigmoid, softrelu or a clip at ≥ 0 (what
    MXNet's ``IsOutputUInt8`` decides by op type), through pooling and reshapes. Anything else
    counts as signed: a tensor entering int8 from fp32 is uint8 only when its calibrated minimum
    is ≥ 0, which the graph alone does not tell."""
    n = nodes[i]
    op, attrs = n["op"], n.get("attrs", {})
    if op in _PASS_SIGN:
        return _ends_unsigned(nodes, n["inputs"][0][0])
    if op.startswith("_sg_mkldnn"):
        inner = [m for m in n["subgraphs"][0]["nodes"] if m["op"] != "null"] if n.get("subgraphs") else []
        if not inner:
            return False
        last = inner[-1]
        n, op, attrs = last, last["op"], last.get("attrs", {})
    if op == "Activation":
        return attrs.get("act_type") in _UNSIGNED_ACTS
    if op in ("relu", "sigmoid"):
        return True
    if op == "clip":
        return float(attrs.get("a_min", -1.0)) >= 0.0
    return False


def mixed_sign_sums(fused):
    """Original names of the ``elemwise_add`` nodes that oneDNN fused into a convolution as its
    ``sum`` post-op where the shortcut and the fused output differ in sign: a signed shortcut
    (a BatchNorm output, e.g. ResNet v1's projection shortcut or GluonCV's stem without ReLU)
    into a conv whose ReLU after the add makes its output uint8, or a uint8 shortcut into a conv
    whose output stays int8. MXNet 1.9.1 adds the shortcut's codes in place, read as the output's
    type: negative int8 codes become large uint8 ones (and uint8 codes > 127 negative)."""
    nodes = json.loads(fused.tojson())["nodes"]
    out = []
    for i, n in enumerate(nodes):
        attrs = n.get("attrs", {})
        if n["op"] != "_sg_mkldnn_conv" or str(attrs.get("with_sum", "false")).lower() != "true":
            continue
        ins = [e for e in n["inputs"] if nodes[e[0]]["op"] != "null"]
        if len(ins) < 2:
            continue
        sum_unsigned = _ends_unsigned(nodes, ins[-1][0])
        out_unsigned = str(attrs.get("with_postsum_act", "false")).lower() == "true" and \
            _ends_unsigned(nodes, i)
        if sum_unsigned != out_unsigned:
            out += [m["name"] for m in n["subgraphs"][0]["nodes"] if m["op"] == "elemwise_add"]
    return out


def keep_adds_unfused(symbol, names):
    """``symbol`` with the ``elemwise_add`` nodes ``names`` as ``broadcast_add`` (same values and
    names; oneDNN's conv+sum fusion only takes ``elemwise_add``, so these stay separate ops)."""
    graph = json.loads(symbol.tojson())
    names = set(names)
    for n in graph["nodes"]:
        if n["name"] in names and n["op"] == "elemwise_add":
            n["op"] = "broadcast_add"
    return mx.sym.load_json(json.dumps(graph))


_PROBE_K = 64


@functools.lru_cache(maxsize=None)
def dense_int8_saturates():
    """Whether MXNet's oneDNN int8 FullyConnected saturates on this CPU (measured once).

    Without VNNI (AVX2 hosts, or an AVX-512 host under ``DNNL_MAX_CPU_ISA=AVX2``) oneDNN's
    ``gemm_s8u8s32`` inner product sums pairs of u8 × s8 products in 16 bits
    (``vpmaddubsw``): 255 × 127 × 2 = 64,770 overflows 32,767. oneDNN's int8 *convolutions*
    halve their weights there (the ``sa0.5`` of ``DNNL_VERBOSE``) and stay exact; the inner
    product does not, and a classifier on full-range input came out 18% (of the logits' scale)
    off fp32. Rather than read CPU flags (the ISA oneDNN uses can be capped by an environment
    variable), this runs the deployed kernel on input that would saturate: a 64-wide FC whose
    codes are all 255 (input) and 127 (weights) must give 64; saturated it gives about 32.
    """
    data = mx.sym.var("data")
    fc = mx.sym.FullyConnected(data, num_hidden=1, no_bias=True, name="probe_fc")
    arg = {"probe_fc_weight": mx.nd.ones((1, _PROBE_K))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qsym, qarg, _, col = mxq.quantize_graph(
            sym=fc.get_backend_symbol("MKLDNN_QUANTIZE"), arg_params=arg, aux_params={},
            ctx=mx.cpu(), excluded_sym_names=[], excluded_op_names=[], calib_mode="naive",
            quantized_dtype="auto", quantize_mode="full", quantize_granularity="channel-wise",
            logger=None)
        col.min_max_dict = {n: (0.0, 1.0) if n == "data" else (-2.0 * _PROBE_K, 2.0 * _PROBE_K)
                            for n in col.include_layer}
        qsym, qarg, _ = mxq.calib_graph(qsym=qsym, arg_params=arg, aux_params={}, collector=col,
                                        calib_mode="naive", quantized_dtype="auto", logger=None)
        qsym = qsym.get_backend_symbol("MKLDNN_QUANTIZE")
        ex = qsym.bind(mx.cpu(), {"data": mx.nd.ones((1, _PROBE_K)), **qarg}, grad_req="null")
        got = float(ex.forward(is_train=False)[0].asnumpy().ravel()[0])
    return bool(abs(got - _PROBE_K) > 0.05 * _PROBE_K)


# op types always left fp32: MXNet 1.9.1's quantized elemwise_mul takes int8 inputs only and
# fails at run time on the uint8 it gets after a ReLU-like op (MobileNetV3's hard-swish,
# "currently, quantized elemwise mul only support int8 inputs")
FP32_OPS = ["elemwise_mul"]


def quantize(model, thresholds, excluded=(), granularity="channel-wise", exclude_ops=()):
    """Build the calibrated int8 graph of ``model`` with the ``excluded`` layers in fp32.

    Parameters
    ----------
    model : FloatModel
    thresholds : dict
        Output name → ``(min, max)`` for every name of ``model.calib_outputs()`` (from a
        calibrator); the graph's requantize ranges are fixed from it, so a prediction does not
        depend on the rest of its batch.
    excluded : iterable of str
        Node names (original or fused) to keep in fp32.
    granularity : str
        ``channel-wise`` (a scale per output channel of each weight) or ``tensor-wise``.
    exclude_ops : iterable of str
        Further node names to keep fp32 (used to isolate one layer when measuring sensitivity).

    Returns
    -------
    QuantizedGraph
    """
    excluded = list(excluded)
    names = sorted(set(excluded) | set(exclude_ops) | set(getattr(model, "host_fp32", ())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # calib_mode='naive' only makes MXNet return the list of outputs needing thresholds
        # (collector.include_layer); the thresholds themselves come from our own calibration.
        qsym, qarg, qaux, collector = mxq.quantize_graph(
            sym=model.fused, arg_params=model.arg_params, aux_params=model.aux_params,
            ctx=mx.cpu(), excluded_sym_names=names, excluded_op_names=FP32_OPS, calib_mode="naive",
            quantized_dtype="auto", quantize_mode="full", quantize_granularity=granularity,
            logger=None)
        need = list(collector.include_layer)
        missing = [n for n in need if n not in thresholds]
        if missing:   # cannot happen with thresholds for calib_outputs(): a bug, not a user error
            raise RuntimeError(f"no calibration threshold for {missing[:5]}")
        collector.min_max_dict = {n: tuple(float(v) for v in thresholds[n]) for n in need}
        qsym, qarg, qaux = mxq.calib_graph(qsym=qsym, arg_params=model.arg_params,
                                           aux_params=model.aux_params, collector=collector,
                                           calib_mode="naive", quantized_dtype="auto", logger=None)
    qsym = qsym.get_backend_symbol("MKLDNN_QUANTIZE")     # fold requantize into the int8 convs
    used = set(qsym.list_arguments()) | set(qsym.list_auxiliary_states())
    params = {k: v for k, v in {**qarg, **qaux}.items() if k in used}
    return QuantizedGraph(qsym, params, excluded, need)


def inference_block(symbol, params, input_name="data"):
    """A frozen, hybridized SymbolBlock over an fp32 or int8 graph (:func:`distill.graphio.make_block`)."""
    return make_block(symbol, params, input_name, trainable=False, hybridize=True)
