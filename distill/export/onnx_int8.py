"""``onnx-int8``: MXNet's int8 model as a QDQ ONNX model, run and checked in onnxruntime.

MXNet's oneDNN int8 graph has no ONNX converter (``mxnet.onnx`` knows no quantized op), so the
int8 variant is rebuilt on the ONNX side with **MXNet's own calibration**: the same images (the
fixed, seeded sample ``distill quantize`` uses, :func:`~distill.export.calib.calibration_indices`,
also written to ``calib/`` for ncnn's ``ncnn2table``), the same method (``quantization.calib_mode``),
the same thresholds (MXNet's calibrator runs on the clean pair and its ``(min, max)`` per fused
node output become onnxruntime ``TensorQuantOverrides`` on the ONNX tensor of the same name), and
the same layers kept in fp32 (``metrics.json`` ``int8.excluded`` plus ``--int8-exclude``; MXNet
layer names are the ONNX node names the exporter writes). Weights are int8 per output channel
(as MXNet scales every calibrated convolution), activations uint8: a non-negative range ``[0, max]`` as in MXNet,
a signed one as ``[-t, t]`` with ``t = max(|min|, |max|)``, MXNet's symmetric int8 range.

Checked twice on the test split: against MXNet's int8 model built from the same thresholds
(top-1 within ``--int8-max-diff`` points, prediction agreement reported), and against fp32 MXNet
(top-1 at most ``--int8-max-drop`` points lower).
"""
import contextlib
import io
import json
import logging
import os

import numpy as np

from ..errors import UserError
from ..quantize.calibrators import calibrate
from ..quantize.graph import FloatModel, inference_block, quantize
from ..trainer import predict
from .formats import FORMATS, ExportFormat, check_result, files_bytes
from .parity import check_top1_drop, compare_logits

__all__ = ["OnnxInt8Format", "excluded_layers", "match_nodes", "onnx_ranges", "mxnet_int8_reference"]
_LOGGER = logging.getLogger(__name__)


def excluded_layers(int8_section, extra=()):
    """MXNet layer names to keep in fp32: ``distill quantize``'s ``excluded`` + ``extra``."""
    names = list(int8_section.get("excluded") or []) if isinstance(int8_section, dict) else []
    return list(dict.fromkeys(names + list(extra)))


def match_nodes(layer_names, node_names):
    """ONNX nodes for MXNet layer names: the node of the same name or ones named ``layer_*``.

    Returns
    -------
    (list of str, list of str)
        Matched node names; layer names without a node.
    """
    matched, missing = [], []
    for layer in layer_names:
        hits = [n for n in node_names if n == layer or n.startswith(layer + "_")]
        if hits:
            matched.extend(hits)
        else:
            missing.append(layer)
    return list(dict.fromkeys(matched)), missing


def onnx_ranges(model, thresholds):
    """MXNet's calibration table keyed by ONNX tensor name.

    A threshold of the fused fp32 graph belongs to a fused node's output
    (``sg_mkldnn_conv_bn_act_3_output``), which is the output of the last op inside it (the
    ReLU6 ``..._relu60_relu6``); ``mxnet.onnx`` names each tensor after the MXNet node that
    writes it, so that op's name is the ONNX tensor. Plain nodes map to their own name, the
    input to itself.

    Returns
    -------
    dict
        ONNX tensor name → ``(rmin, rmax)``: ``(0, max)`` for a non-negative range, ``(-t, t)``
        otherwise (MXNet quantizes signed tensors symmetrically).
    """
    out = {}
    for node in json.loads(model.fused.tojson())["nodes"]:
        if node["op"] == "null":
            continue
        key = node["name"] + "_output"
        if key not in thresholds:
            continue
        tensor = node["name"]
        if node.get("subgraphs"):
            sub = node["subgraphs"][0]
            tensor = sub["nodes"][sub["heads"][0][0]]["name"]
        out[tensor] = thresholds[key]
    if model.input_name in thresholds:
        out[model.input_name] = thresholds[model.input_name]
    ranges = {}
    for tensor, (lo, hi) in out.items():
        lo, hi = float(lo), float(hi)
        if lo >= 0:
            ranges[tensor] = (0.0, max(hi, 1e-8))
        else:
            t = max(abs(lo), abs(hi), 1e-8)
            ranges[tensor] = (-t, t)
    return ranges


def mxnet_int8_reference(job, calib, excluded):
    """MXNet's int8 model of the clean pair, built as ``distill quantize`` builds it, calibrated
    on the images ``calib`` ``(N, C, H, W)``.

    Returns
    -------
    (FloatModel, dict, np.ndarray)
        The fp32 model, its calibration thresholds, and the int8 model's logits on the test split.
    """
    q = job.recipe.quantization
    model = FloatModel.from_prefix(job.prefix, job.input_shape)    # the clean pair reads "data"
    thresholds = calibrate(model, calib, job.calib_mode, q.calib_batch_size)
    thresholds.update(_qat_ranges(job, model))
    known = set(model.layer_names)
    g = quantize(model, thresholds, [n for n in excluded if n in known], q.granularity)
    logits = predict(inference_block(g.symbol, g.params, model.input_name), job.x_test,
                     job.options.eval_batch_size)
    return model, thresholds, logits


def _qat_ranges(job, model):
    """After ``distill quantize --qat``: the learned ranges, keyed as the thresholds are (the
    fused node outputs), which replace the calibrated ones; ``{}`` for a PTQ model."""
    qat = job.int8_section().get("qat") or {}
    path = qat.get("thresholds_file")
    if job.int8_section().get("method") != "qat" or not path or not os.path.isfile(path):
        return {}
    from ..quantize.qat.train import fused_output_names
    with open(path) as f:
        learned = json.load(f)["by_node"]
    names = fused_output_names(model)
    return {names[n]: tuple(v) for n, v in learned.items() if n in names}


def host_has_vnni():
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI), or is not x86: without it,
    onnxruntime's u8 × s8 int8 kernels add pairs of products in 16 bits and saturate (its
    quantization docs: use ``reduce_range``, 7-bit weights, on such machines)."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return True
    return any(flag in text for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


class _Reader:
    """onnxruntime's CalibrationDataReader over an array, in batches."""

    def __init__(self, x, input_name, batch_size=32):
        self.x, self.input_name, self.batch_size, self.i = x, input_name, batch_size, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        batch = {self.input_name: self.x[self.i:self.i + self.batch_size]}
        self.i += self.batch_size
        return batch

    def rewind(self):
        self.i = 0


@FORMATS.register("onnx-int8")
class OnnxInt8Format(ExportFormat):
    """int8 ONNX (QDQ), checked in onnxruntime by top-1."""
    order = 20
    files = ("model.int8.onnx",)

    def missing(self):
        try:
            from onnxruntime.quantization import quantize_static  # noqa: F401
            from onnx import mapping  # noqa: F401
        except Exception as e:        # ≥ 1.19 needs onnx ≥ 1.16 (TensorProto.INT4), mxnet needs 1.15
            return (f"onnxruntime.quantization does not import ({type(e).__name__}: {e}); with "
                    f"onnx 1.15 (needed by mxnet.onnx) it needs onnxruntime<1.19")
        return None

    def blocker(self, job):
        if FORMATS.get("onnx")().blocker(job):
            return "it starts from the ONNX model, which this graph cannot become (see onnx)"
        return None

    def export(self, job):
        import onnx
        import onnxruntime as ort
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from .ncnn_worker import NcnnWorkerError, run_on_images
        from .onnx_fp32 import runtime_failure
        src = job.onnx_path()
        pre = os.path.join(job.work_dir, "model.pre.onnx")
        try:                 # shape inference + fusions first, as onnxruntime recommends
            from onnxruntime.quantization.shape_inference import quant_pre_process
            quant_pre_process(src, pre)
        except Exception as e:      # optional step: quantize the plain model instead
            _LOGGER.warning("onnx-int8: pre-processing skipped (%s: %s)", type(e).__name__, e)
            pre = src
        nodes = [n.name for n in onnx.load(pre).graph.node]
        wanted = excluded_layers(job.int8_section(), job.options.int8_exclude)
        exclude, not_found = match_nodes(wanted, nodes)
        if not_found:
            _LOGGER.warning("onnx-int8: no ONNX node for excluded layer(s) %s", ", ".join(not_found))
        idx = job.calibration()
        calib = job.calibration_images()
        model, thresholds, mx_int8 = mxnet_int8_reference(job, calib, wanted)
        tensors = {t for n in onnx.load(pre).graph.node for t in list(n.input) + list(n.output)}
        ranges = {t: r for t, r in onnx_ranges(model, thresholds).items() if t in tensors}
        overrides = {t: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for t, (lo, hi) in ranges.items()}
        dst = os.path.join(job.out_dir, "model.int8.onnx")
        # Tensors without an MXNet threshold (none on the graphs tried) get onnxruntime's own
        # calibration of the same images, by the same method.
        method = {"naive": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}[job.calib_mode]
        # MXNet 1.9 scales a calibrated convolution's weights per output channel whatever
        # `granularity` says (it only switches FullyConnected), so ONNX is per channel too.
        per_channel = True
        bits = str(getattr(job.options, "onnx_weight_bits", "auto"))
        if bits == "auto":
            reduce_range = not host_has_vnni()
            why = "this CPU has no VNNI" if reduce_range else "this CPU has VNNI"
        else:
            reduce_range, why = bits == "7", f"--onnx-weight-bits {bits}"
        _LOGGER.info("onnx-int8: weights quantized to %d bits (%s%s)", 7 if reduce_range else 8, why,
                     "; onnxruntime's reduce_range: its u8s8 kernels saturate without VNNI"
                     if reduce_range else "")
        with contextlib.redirect_stdout(io.StringIO()):      # it prints its progress
            quantize_static(pre, dst, _Reader(calib, "data"), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=method,
                            nodes_to_exclude=exclude, reduce_range=reduce_range,
                            extra_options={"TensorQuantOverrides": overrides})
        # In a child process, as for fp32: a crash in an int8 kernel is a failed check.
        base = {"runtime": "onnxruntime", "model": dst, "threads": job.threads}
        tasks = [dict(base, task="predict", x="test", batch_size=job.options.eval_batch_size)]
        if job.options.latency:
            tasks.append(dict(base, task="latency", x="test", repeats=job.repeats))
        try:
            res = run_on_images(tasks, "test", job.x_test, job.work_dir,
                                batch_size=job.options.eval_batch_size)
        except NcnnWorkerError as e:
            raise UserError(runtime_failure(str(e), dst)) from None
        logits = res[0]["arrays"]["logits"]
        stats = compare_logits(job.ref, logits, job.y_test)
        vs_int8 = compare_logits(mx_int8, logits, job.y_test)
        latency = {"b1": res[1]["meta"]["ms"]} if job.options.latency else None
        max_diff = job.options.int8_max_diff
        diff = abs(vs_int8["top1"] - vs_int8["top1_mxnet"])
        problem = None
        if not diff <= max_diff + 1e-9:        # top-1 is a multiple of 100/N: no float noise
            problem = (f"onnxruntime int8 top-1 {vs_int8['top1']:.2f}% differs from MXNet int8 "
                       f"({vs_int8['top1_mxnet']:.2f}%, same thresholds) by {diff:.2f} points, more "
                       f"than the allowed {max_diff:g} (--int8-max-diff); predictions agree on "
                       f"{vs_int8['top1_agreement']:.2f}% of {vs_int8['images']} test images")
        problem = problem or check_top1_drop(stats, job.options.int8_max_drop)
        return {"files": list(self.files), "bytes": files_bytes(job.out_dir, self.files),
                "runtime": f"onnxruntime {ort.__version__}", "input": "data", "output": "logits",
                "parity": stats, "latency_ms": latency, "threads": job.threads,
                "mxnet_int8": {"top1": vs_int8["top1_mxnet"], "top1_agreement": vs_int8["top1_agreement"],
                               "max_abs_diff": vs_int8["max_abs_diff"],
                               "mean_abs_diff": vs_int8["mean_abs_diff"],
                               "distill_quantize_top1": job.int8_section().get("top1")},
                "quantization": {"format": "QDQ",
                                 "weights": "int8 per channel",
                                 "weight_bits": 7 if reduce_range else 8,
                                 "weight_bits_why": why,
                                 "activations": "uint8",
                                 "calibration": f"{job.calib_mode}: MXNet's thresholds",
                                 "calibration_images": int(len(idx)),
                                 "mxnet_ranges": len(ranges),
                                 "excluded_layers": wanted, "excluded_nodes": exclude,
                                 "excluded_not_found": not_found},
                "check": check_result(problem,
                                      f"onnxruntime int8 top-1 within {max_diff:g} points of MXNet "
                                      f"int8 and at most {job.options.int8_max_drop:g} below fp32 "
                                      f"MXNet on the test split")}
