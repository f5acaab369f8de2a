"""``ncnn``: ``model.ncnn.param`` + ``model.ncnn.bin`` from the ONNX model by ``pnnx``, run in ncnn.

``pnnx`` (PyPI, installed with ``--no-deps``: its converter is a self-contained binary, the
torch it declares is only for PyTorch input) converts ``model.onnx``. By default the weights
stay fp32 (``fp16=0``; pnnx's default stores fp16) and the check runs ncnn with every fp16 path
off, so it compares logit by logit with MXNet (``--atol``). ``--fp16`` stores fp16 weights (half
the file) and lets ncnn compute in fp16 where the CPU can; it is checked by top-1 agreement.
The input blob is ``in0`` (``C×H×W``, one image, normalized as in the model card), the output
``out0`` (``K`` logits).
"""
import importlib.util
import logging
import os
import shutil
import subprocess

from ..errors import UserError
from .formats import FORMATS, ExportFormat, check_result, files_bytes
from .parity import check_agreement, check_max_abs, compare_logits
from .runtimes import package_versions

__all__ = ["NcnnFormat", "pnnx_executable", "onnx_to_ncnn"]
_LOGGER = logging.getLogger(__name__)


def pnnx_executable():
    """Path of the converter binary inside the ``pnnx`` wheel, or ``None``.

    ``import pnnx`` would import torch; the binary is found without importing the package.
    """
    try:
        spec = importlib.util.find_spec("pnnx")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for name in ("pnnx", "pnnx.exe"):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    return None


def onnx_to_ncnn(onnx_path, input_shape, out_param, out_bin, fp16=False, work_dir=None):
    """Run pnnx on ``onnx_path`` for one ``(C, H, W)`` image; write the ncnn pair.

    pnnx writes several side files (``*.pnnx.*``, ``*_pnnx.py``, ``*.pnnxsim.onnx``) next to
    its input: it runs in a scratch folder and only the ncnn pair is kept.

    Raises
    ------
    UserError
        pnnx failed (its last output lines are in the message).
    """
    exe = pnnx_executable()
    scratch = os.path.join(work_dir or os.path.dirname(out_param), "pnnx")
    os.makedirs(scratch, exist_ok=True)
    shutil.copyfile(onnx_path, os.path.join(scratch, "model.onnx"))
    shape = ",".join(str(int(s)) for s in (1,) + tuple(input_shape))
    cmd = [exe, "model.onnx", f"inputshape=[{shape}]f32", f"fp16={1 if fp16 else 0}",
           "ncnnparam=model.ncnn.param", "ncnnbin=model.ncnn.bin", "ncnnpy=model_ncnn.py",
           "pnnxparam=model.pnnx.param", "pnnxbin=model.pnnx.bin", "pnnxpy=model_pnnx.py",
           "pnnxonnx=model.pnnx.onnx"]
    proc = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True)
    made = [os.path.join(scratch, f) for f in ("model.ncnn.param", "model.ncnn.bin")]
    if proc.returncode != 0 or not all(os.path.isfile(f) and os.path.getsize(f) for f in made):
        tail = " / ".join(l.strip() for l in (proc.stdout + proc.stderr).splitlines()[-6:] if l.strip())
        raise UserError(f"pnnx could not convert {onnx_path} to ncnn (exit code {proc.returncode}): "
                        f"{tail}. An operator ncnn lacks is named above; export --format onnx "
                        f"to use onnxruntime instead.")
    shutil.move(made[0], out_param)
    shutil.move(made[1], out_bin)
    return out_param, out_bin


@FORMATS.register("ncnn")
class NcnnFormat(ExportFormat):
    """ncnn param/bin via pnnx, checked in ncnn's Python runtime."""
    order = 30
    files = ("model.ncnn.param", "model.ncnn.bin")

    def missing(self):
        try:
            import ncnn  # noqa: F401
        except ImportError:
            return "needs ncnn's Python runtime: pip install ncnn"
        if pnnx_executable() is None:
            return "needs the pnnx converter: pip install --no-deps pnnx"
        return FORMATS.get("onnx")().missing()     # ncnn starts from the ONNX model

    def blocker(self, job):
        if FORMATS.get("onnx")().blocker(job):
            return "it starts from the ONNX model, which this graph cannot become (see onnx)"
        return None

    def export(self, job):
        from .runtimes import ncnn_latency, ncnn_net, ncnn_predict
        fp16 = job.options.fp16
        param, bin_ = (os.path.join(job.out_dir, f) for f in self.files)
        onnx_to_ncnn(job.onnx_path(), job.input_shape, param, bin_, fp16=fp16, work_dir=job.work_dir)
        job.ncnn_fp32 = None if fp16 else (param, bin_)      # ncnn-int8 starts from these
        calib_list = job.write_calibration_images()
        # One thread for the parity pass: ncnn wakes its OpenMP pool on every call, which costs
        # more than a small image's compute (measured 15× slower over 300 images on 2 busy cores).
        net = ncnn_net(param, bin_, fp16=fp16, threads=1)
        stats = compare_logits(job.ref, ncnn_predict(net, job.x_test), job.y_test)
        in_name, out_name = net.input_names()[0], net.output_names()[0]
        latency = None
        if job.options.latency:
            net = ncnn_net(param, bin_, fp16=fp16, threads=job.threads)
            latency = {"b1": ncnn_latency(net, job.x_test[0], job.repeats)}
        del net
        if fp16:
            reason = check_agreement(stats, job.options.min_agreement)
            rule = (f"ncnn (fp16 weights and compute) vs MXNet on the test split: top-1 agreement "
                    f"≥ {job.options.min_agreement:g}%")
        else:
            reason = check_max_abs(stats, job.options.atol)
            rule = (f"ncnn (fp32 weights and compute) vs MXNet on the test split: max abs logit "
                    f"difference ≤ {job.options.atol:g}")
        v = package_versions("ncnn", "pnnx")
        return {"files": list(self.files), "bytes": files_bytes(job.out_dir, self.files),
                "runtime": f"ncnn {v['ncnn']} (Python), converted by pnnx {v['pnnx']}",
                "precision": "fp16" if fp16 else "fp32", "input": in_name, "output": out_name,
                "parity": stats, "latency_ms": latency, "threads": job.threads,
                "calibration_list": calib_list,
                "check": check_result(reason, rule)}

