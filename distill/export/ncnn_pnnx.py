"""``ncnn``: ``model.ncnn.param`` + ``model.ncnn.bin`` from the ONNX model by ``pnnx``, run in ncnn.

``pnnx`` (PyPI, installed with ``--no-deps``: its converter is a self-contained binary, the
torch it declares is only for PyTorch input) converts ``model.onnx``. By default the weights
stay fp32 (``fp16=0``; pnnx's default stores fp16) and the check runs ncnn with every fp16 path
off, so it compares logit by logit with MXNet (``--atol``). ``--fp16`` stores fp16 weights (half
the file) and lets ncnn compute in fp16 where the CPU can; it is checked by top-1 agreement.
The input blob is ``in0`` (``C×H×W``, one image, normalized as in the model card), the output
``out0`` (``K`` logits). The check runs ncnn in a child process
(:mod:`~distill.export.ncnn_worker`), so a crash inside ncnn is a failed check, not a dead export.
"""
import importlib.util
import logging
import os
import re
import shutil
import subprocess

import numpy as np

from ..errors import UserError
from .formats import FORMATS, ExportFormat, check_result, files_bytes
from .parity import check_agreement, check_close, close_rule, compare_logits
from .runtimes import output_lines, package_versions

__all__ = ["NcnnFormat", "pnnx_executable", "onnx_to_ncnn", "pnnx_failure", "foreign_layers"]
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
        raise UserError(pnnx_failure(os.path.basename(onnx_path), proc.returncode, proc.stdout + proc.stderr))
    with open(made[0]) as f:
        foreign = foreign_layers(f.read())
    if foreign:
        raise UserError(f"pnnx converted {os.path.basename(onnx_path)}, but ncnn has no layer for "
                        + ", ".join(f"{name} ({op})" for name, op in foreign[:5])
                        + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                        + ": ncnn cannot run the model. Replace that operator in the MXNet graph, or "
                          "export --format onnx to use onnxruntime instead.")
    shutil.move(made[0], out_param)
    shutil.move(made[1], out_bin)
    return out_param, out_bin


def pnnx_failure(onnx_path, returncode, output):
    """The one-paragraph reason pnnx failed, from its exit code and output.

    pnnx's first pass folds constants with onnxruntime; when the graph's shapes do not agree
    (e.g. a Gemm fed an unflattened 4-D tensor) it reports a ``ShapeInferenceError`` and then
    often segfaults, which says nothing about missing operators: the message says which.
    """
    lines = output_lines(output)
    how = (f"was killed by signal {-returncode}" if returncode < 0 else f"exited with code {returncode}")
    run = next((re.search(r"while running (\w+) node\. Name:\s*'([^']+)'(?: Status Message: (.*))?", l)
                for l in lines if "while running" in l), None)
    if run:
        detail = (run.group(3) or "").split(". ", 1)[-1] if run.group(3) else ""
        return (f"pnnx could not convert {onnx_path} to ncnn: its onnxruntime pass could not run "
                f"the {run.group(1)} node {run.group(2)!r} (pnnx's own name){': ' + detail if detail else ''} "
                f"(pnnx {how}). The ONNX graph is wrong at that layer, which is not an operator ncnn "
                f"lacks: export --format onnx, whose check names the layer in MXNet's terms, and "
                f"report it.")
    shape = next((l for l in lines if re.search(r"ShapeInferenceError|shape inference|"
                                                r"Dimension mismatch|Incompatible dimensions", l, re.I)), None)
    if shape:
        node = re.search(r"Node \(([^)]+)\) Op \(([^)]+)\)", shape)
        where = f" at {node.group(2)} node {node.group(1)!r}" if node else ""
        return (f"pnnx could not convert {onnx_path} to ncnn: shape inference failed{where} ({shape}; "
                f"pnnx {how}). The ONNX graph's shapes do not agree with each other there, which "
                f"is a bug in the exported graph, not an operator ncnn lacks: check that layer in "
                f"model.onnx (export --format onnx and run it in onnxruntime), and report it.")
    unsupported = [l for l in lines if re.search(r"not supported|unsupported|not implemented", l, re.I)]
    if unsupported:
        return (f"pnnx could not convert {onnx_path} to ncnn ({how}): {' / '.join(unsupported[-3:])}. "
                f"An operator pnnx or ncnn lacks is named there; replace it in the MXNet graph, or "
                f"export --format onnx to use onnxruntime instead.")
    tail = " / ".join(lines[-6:])
    return (f"pnnx could not convert {onnx_path} to ncnn ({how}); its last output: {tail}. Export "
            f"--format onnx to use onnxruntime instead, and check model.onnx there.")


def foreign_layers(param_text):
    """``[(layer name, type)]`` of the layers in an ncnn ``.param`` that are not ncnn layers.

    pnnx writes an operator it cannot map to ncnn under its own name (``F.xxx``, ``Tensor.xxx``,
    ``torch.xxx``, ``pnnx.xxx``, ``aten::xxx``): ncnn then fails to load the model.
    """
    out = []
    for line in param_text.splitlines()[2:]:
        parts = line.split()
        if len(parts) >= 2 and ("." in parts[0] or "::" in parts[0]):
            out.append((parts[1], parts[0]))
    return out


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
        from .ncnn_worker import NcnnWorkerError, run_on_images
        fp16 = job.options.fp16
        param, bin_ = (os.path.join(job.out_dir, f) for f in self.files)
        onnx_to_ncnn(job.onnx_path(), job.input_shape, param, bin_, fp16=fp16, work_dir=job.work_dir)
        job.ncnn_fp32 = None if fp16 else (param, bin_)      # ncnn-int8 starts from these
        calib_list = job.write_calibration_images()
        # One thread for the parity pass: ncnn wakes its OpenMP pool on every call, which costs
        # more than a small image's compute (measured 15× slower over 300 images on 2 busy cores).
        base = {"param": param, "bin": bin_, "fp16": fp16}
        tasks = [dict(base, task="predict", x="test", threads=1)]
        if job.options.latency:
            tasks.append(dict(base, task="latency", x="one", threads=job.threads, repeats=job.repeats))
        atol, rtol = job.options.atol, job.options.rtol
        if fp16:
            rule = (f"ncnn (fp16 weights and compute) vs MXNet on the test split: top-1 agreement "
                    f"≥ {job.options.min_agreement:g}%")
        else:
            rule = (f"ncnn (fp32 weights and compute) vs MXNet on the test split: "
                    f"{close_rule(atol, rtol)}")
        v = package_versions("ncnn", "pnnx")
        result = {"files": list(self.files), "bytes": files_bytes(job.out_dir, self.files),
                  "runtime": f"ncnn {v['ncnn']} (Python), converted by pnnx {v['pnnx']}",
                  "precision": "fp16" if fp16 else "fp32", "input": "in0", "output": "out0",
                  "parity": None, "latency_ms": None, "threads": job.threads,
                  "calibration_list": calib_list}
        try:
            res = run_on_images(tasks, "test", job.x_test, job.work_dir,
                                {"one": np.ascontiguousarray(job.x_test[:1], dtype=np.float32)},
                                batch_size=job.options.eval_batch_size)
        except NcnnWorkerError as e:
            job.ncnn_fp32 = None                  # ncnn-int8 must not start from a model that crashes
            result["check"] = check_result(
                f"{e}. The files model.ncnn.param + model.ncnn.bin that pnnx wrote from model.onnx are "
                f"kept for inspection; {_onnx_hint(job)}", rule)
            return result
        stats = compare_logits(job.ref, res[0]["arrays"]["logits"], job.y_test)
        result.update(input=res[0]["meta"]["input"], output=res[0]["meta"]["output"], parity=stats,
                      latency_ms={"b1": res[1]["meta"]["ms"]} if job.options.latency else None)
        reason = (check_agreement(stats, job.options.min_agreement) if fp16
                  else check_close(stats, atol, rtol))
        if reason:
            reason = f"{reason}. {_onnx_hint(job)}"
        result["check"] = check_result(reason, rule)
        return result


def _onnx_hint(job):
    """Where the fault lies, as far as this export knows: the ONNX model pnnx started from."""
    onnx_check = getattr(job, "checks", {}).get("onnx")
    if onnx_check is None:
        return ("export --format onnx,ncnn to see whether onnxruntime agrees with MXNet on the "
                "model.onnx pnnx converted")
    if onnx_check["passed"]:
        return ("onnxruntime agrees with MXNet on the same model.onnx, so the fault is in pnnx's "
                "conversion or in ncnn's runtime, not in the MXNet → ONNX step")
    return ("model.onnx, which pnnx converted, fails its own check too (see onnx): the fault "
            "is already in the MXNet → ONNX step")
