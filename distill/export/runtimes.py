"""Run an exported model in onnxruntime or ncnn, and time batch-1 latency the same way.

MXNet's own latency is :func:`distill.modelinfo.measure_latency` (oneDNN-fused); here the
other runtimes are timed like it: after warm-up, several calls per repeat, best of repeats.
The export's checks call these inside :mod:`~distill.export.ncnn_worker`'s child process (a
crash in a runtime must not kill the export); nothing here imports MXNet at module level, so
that child starts light.
"""
import logging
import os
import re

import numpy as np

from ..timing import best_of_ms


__all__ = ["package_versions", "default_threads", "output_lines", "best_of_ms", "ort_session", "ort_predict", "ort_latency",
           "ncnn_cpu_net", "ncnn_net", "ncnn_extract"]
_LOGGER = logging.getLogger(__name__)


def package_versions(*names):
    """``{package: installed version or None}`` (from the installed distributions' metadata)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in names:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def output_lines(text):
    """A tool's output as lines worth quoting: colour codes stripped, blank lines and
    onnxruntime's warnings (``[W:onnxruntime...]``, e.g. "Unknown CPU vendor") dropped."""
    lines = (_ANSI.sub("", l).strip() for l in text.splitlines())
    return [l for l in lines if l and "[W:onnxruntime" not in l]


def default_threads():
    """``OMP_NUM_THREADS`` (what MXNet uses) or all cores."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return os.cpu_count() or 1


# -- onnxruntime ---------------------------------------------------------------------------------

def ort_session(path, threads):
    """A CPU onnxruntime session with full graph optimisation and ``threads`` intra-op threads."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 4       # fatal only: an error is raised as an exception anyway (its log
                                    # line would repeat it), warnings about the CPU vendor are noise
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_predict(sess, x, batch_size=256):
    """Logits ``(N, K)`` of the session on ``x`` ``(N, C, H, W)``."""
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs).astype(np.float32)


def ort_latency(sess, x1, repeats):
    """Batch-1 latency (ms) of the session on one image ``x1`` ``(1, C, H, W)``."""
    name = sess.get_inputs()[0].name
    return best_of_ms(lambda: sess.run(None, {name: x1}), repeats)


# -- ncnn ----------------------------------------------------------------------------------------

def ncnn_cpu_net(fp16=False, threads=1, int8=False):
    """An empty ``ncnn.Net`` with the CPU options of :func:`ncnn_net`, before anything is loaded."""
    import ncnn
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = threads
    if not fp16:
        net.opt.use_fp16_storage = False
        net.opt.use_fp16_packed = False
        net.opt.use_fp16_arithmetic = False
    net.opt.use_int8_inference = bool(int8)
    return net


def ncnn_net(param, bin_, fp16=False, threads=1, int8=False):
    """Load an ncnn model on the CPU.

    With ``fp16=False`` every fp16 path is off (storage, packing, arithmetic), so ncnn computes
    in fp32 and can be compared with MXNet logit by logit; ncnn's defaults use fp16 where the
    CPU allows (measured: max abs logit difference 1.8e-5 in fp32 vs 0.11 with fp16).
    ``int8``: ``opt.use_int8_inference`` (an int8 model loaded without it computes NaN).
    """
    net = ncnn_cpu_net(fp16, threads, int8)
    for path, ret in ((param, net.load_param(param)), (bin_, net.load_model(bin_))):
        if ret != 0:
            raise RuntimeError(f"ncnn could not load {path} (code {ret})")
    return net


def ncnn_extract(net, image, names):
    """Values of the blobs ``names`` for one ``(C, H, W)`` image, each flattened (NumPy copies)."""
    import ncnn
    # ncnn.Mat(array) borrows the NumPy buffer; a first layer that runs in place (a BatchNorm
    # on the input, a scalar mean subtraction) then writes into it, and ncnn crashes (seen:
    # exit 255 in the parity pass). clone() gives ncnn a Mat it owns.
    image = np.ascontiguousarray(image, dtype=np.float32)
    borrowed = ncnn.Mat(image)
    mat = borrowed.clone()
    del borrowed
    ex = net.create_extractor()
    if len(names) > 1:
        ex.set_light_mode(False)        # keep every intermediate blob: several are extracted
    ex.input(net.input_names()[0], mat)
    outs = []
    for n in names:
        ret, m = ex.extract(n)
        if ret != 0:
            raise RuntimeError(f"ncnn extract({n!r}) failed with code {ret}")
        outs.append(np.array(m, dtype=np.float32).reshape(-1))
    return outs
