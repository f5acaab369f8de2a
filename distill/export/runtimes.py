"""Run an exported model in onnxruntime or ncnn, and time batch-1 latency the same way.

MXNet's own latency is :func:`distill.modelinfo.measure_latency` (oneDNN-fused); here the
other runtimes are timed like it: after warm-up, several calls per repeat, best of repeats.
"""
import logging
import os

import numpy as np

from ..graphio import best_of_ms

__all__ = ["package_versions", "default_threads", "best_of_ms", "ort_session", "ort_predict", "ncnn_net",
           "ncnn_predict", "ncnn_latency", "ort_latency"]
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
    so.log_severity_level = 3                   # warnings about the CPU vendor etc. are noise here
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

def ncnn_net(param, bin_, fp16=False, threads=1):
    """Load an ncnn model on the CPU.

    With ``fp16=False`` every fp16 path is off (storage, packing, arithmetic), so ncnn computes
    in fp32 and can be compared with MXNet logit by logit; ncnn's defaults use fp16 where the
    CPU allows (measured: max abs logit difference 1.8e-5 in fp32 vs 0.11 with fp16).
    """
    import ncnn
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = threads
    if not fp16:
        net.opt.use_fp16_storage = False
        net.opt.use_fp16_packed = False
        net.opt.use_fp16_arithmetic = False
    for what, ret in (("param", net.load_param(param)), ("bin", net.load_model(bin_))):
        if ret != 0:
            raise RuntimeError(f"ncnn could not load {param if what == 'param' else bin_} (code {ret})")
    return net


def _ncnn_run(net, in_name, out_name, image):
    import ncnn
    # ncnn.Mat(array) borrows the NumPy buffer: `image` must stay alive until extract() has
    # returned, or ncnn reads freed memory and the output is garbage.
    image = np.ascontiguousarray(image, dtype=np.float32)
    mat = ncnn.Mat(image)
    ex = net.create_extractor()
    ex.input(in_name, mat)
    ret, out = ex.extract(out_name)
    if ret != 0:
        raise RuntimeError(f"ncnn extract({out_name!r}) failed with code {ret}")
    result = np.array(out, dtype=np.float32).reshape(-1)    # a copy, owned by NumPy
    del ex, mat, image
    return result


def ncnn_predict(net, x):
    """Logits ``(N, K)`` of the ncnn net on ``x`` ``(N, C, H, W)``, one image at a time."""
    in_name, out_name = net.input_names()[0], net.output_names()[0]
    return np.stack([_ncnn_run(net, in_name, out_name, x[i]) for i in range(len(x))])


def ncnn_latency(net, image, repeats):
    """Latency (ms) of one ``(C, H, W)`` image through the ncnn net (ncnn has no batch axis)."""
    in_name, out_name = net.input_names()[0], net.output_names()[0]
    image = np.ascontiguousarray(image, dtype=np.float32)
    return best_of_ms(lambda: _ncnn_run(net, in_name, out_name, image), repeats)
