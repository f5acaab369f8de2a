"""``onnx-int8``: onnxruntime's static int8 quantization (QDQ) of ``model.onnx``.

Calibrated like MXNet's int8 model (``distill quantize``): the same images (a fixed, seeded
sample of the recipe's train split, :func:`~distill.export.calib.calibration_indices`, also
written to ``calib/`` for ncnn's ``ncnn2table``), the same method (``quantization.calib_mode``:
``naive`` → min/max, ``entropy`` → KL), and the same layers kept in fp32 (``metrics.json``
``int8.excluded``, plus ``--int8-exclude``; MXNet layer names are the ONNX node names the
exporter writes). Weights are int8 per output channel, activations uint8 (onnxruntime's
recommended x86 combination). Checked by top-1 against fp32 MXNet.
"""
import contextlib
import io
import logging
import os

import numpy as np

from .formats import FORMATS, ExportFormat, check_result, files_bytes
from .parity import check_top1_drop, compare_logits

__all__ = ["OnnxInt8Format", "excluded_layers", "match_nodes"]
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
        from .runtimes import ort_latency, ort_predict, ort_session
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
        calib = np.ascontiguousarray(job.data.train.x[idx])
        dst = os.path.join(job.out_dir, "model.int8.onnx")
        method = {"naive": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}[job.calib_mode]
        with contextlib.redirect_stdout(io.StringIO()):      # it prints its progress
            quantize_static(pre, dst, _Reader(calib, "data"), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=method,
                            nodes_to_exclude=exclude)
        sess = ort_session(dst, job.threads)
        stats = compare_logits(job.ref, ort_predict(sess, job.x_test, job.options.eval_batch_size), job.y_test)
        latency = ({"b1": ort_latency(sess, job.x_test[:1], job.repeats)} if job.options.latency else None)
        return {"files": list(self.files), "bytes": files_bytes(job.out_dir, self.files),
                "runtime": f"onnxruntime {ort.__version__}", "input": "data", "output": "logits",
                "parity": stats, "latency_ms": latency, "threads": job.threads,
                "mxnet_int8_top1": job.int8_section().get("top1"),
                "quantization": {"format": "QDQ", "weights": "int8 per channel",
                                 "activations": "uint8",
                                 "calibration": f"{job.calib_mode} ({method.name})",
                                 "calibration_images": int(len(idx)),
                                 "excluded_layers": wanted, "excluded_nodes": exclude,
                                 "excluded_not_found": not_found},
                "check": check_result(check_top1_drop(stats, job.options.int8_max_drop),
                                      f"onnxruntime int8 top-1 at most {job.options.int8_max_drop:g} "
                                      f"points below fp32 MXNet on the test split")}
