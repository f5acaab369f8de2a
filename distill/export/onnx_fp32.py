"""``onnx``: ``model.onnx`` through ``mxnet.onnx.export_model``, run in onnxruntime.

The exported graph has a dynamic batch axis, input ``data`` ``(N, C, H, W)`` float32 (already
normalized, see the model card) and output ``logits`` ``(N, K)``. Weights are initializers only
(not graph inputs), so onnxruntime can fold constants. MXNet 1.9's exporter writes opset-13
operators; the model is stamped opset 13 accordingly (``export_model`` would stamp the
installed onnx's newest opset, whose ``Reduce*`` ops take axes differently).
"""
import json
import logging
import os
import shutil

import numpy as np

from ..errors import UserError
from ..graphio import pair_files, symbol_file
from .formats import FORMATS, ExportFormat, check_result, files_bytes
from .parity import check_max_abs, compare_logits

__all__ = ["OnnxFormat", "export_onnx", "onnx_blocker", "OPSET"]
_LOGGER = logging.getLogger(__name__)

OPSET = 13


def _unsupported_ops(symbol_json):
    from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph
    supported = set()
    for table in MXNetGraph.registry_.values():
        supported |= set(table)
    ops = {n["op"] for n in json.loads(symbol_json)["nodes"] if n["op"] != "null"}
    return sorted(ops - supported)


def onnx_blocker(job):
    """Why the job's graph cannot become ONNX (operators the exporter lacks), or ``None``."""
    with open(symbol_file(job.prefix)) as f:
        bad = _unsupported_ops(f.read())
    if not bad:
        return None
    quantized = any(op.startswith(("_contrib_quantize", "_contrib_dequantize", "_contrib_quantized",
                                   "_sg_mkldnn", "_sg_onednn")) for op in bad)
    hint = (" This is a quantized (int8) MXNet graph: export its fp32 model and use --format "
            "onnx-int8 (onnxruntime's own int8) or ncnn2int8 on the device."
            if quantized else " Replace these layers or export the model without them.")
    return f"MXNet's ONNX exporter cannot convert operator(s) {', '.join(bad)}.{hint}"


def export_onnx(job, path):
    """Convert the job's clean MXNet pair to ONNX at ``path``; return ``path``.

    Raises
    ------
    UserError
        The graph has operators MXNet's ONNX exporter cannot convert (named in the message).
    """
    import onnx
    from mxnet import onnx as mx_onnx
    sym_file, params_file = pair_files(job.prefix)
    blocker = onnx_blocker(job)
    if blocker:
        raise UserError(f"{job.source.prefix}: {blocker}")
    c, h, w = job.input_shape
    tmp = path + ".raw"
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))   # the exporter logs every step on the root logger
    try:
        mx_onnx.export_model(sym_file, params_file, in_shapes=[(1, c, h, w)], in_types=[np.float32],
                             onnx_file_path=tmp, dynamic=True, dynamic_input_shapes=[(None, c, h, w)])
    except Exception as e:      # the exporter raises bare AttributeError/KeyError on odd attributes
        raise UserError(f"{job.source.prefix}: mxnet.onnx.export_model failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}. Rerun with --debug for the "
                        f"layer it stopped at.") from e
    finally:
        root.setLevel(level)
    model = onnx.load(tmp)
    os.unlink(tmp)
    graph = model.graph
    for node in graph.node:       # the exporter leaves Conv, Pooling, ... unnamed: name them as
        if not node.name:         # in MXNet (their output), so --int8-exclude can find them
            node.name = node.output[0]
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    del graph.input[:]
    graph.input.extend(inputs)
    old = graph.output[0].name
    for node in graph.node:
        node.output[:] = ["logits" if o == old else o for o in node.output]
        node.input[:] = ["logits" if i == old else i for i in node.input]
    graph.output[0].name = "logits"
    del model.opset_import[:]
    model.opset_import.extend([onnx.helper.make_opsetid("", OPSET)])
    model.producer_name = "distill export (mxnet.onnx)"
    model.doc_string = (f"{job.recipe.name}: logits of {job.data.num_classes} classes; input "
                        f"(N, {c}, {h}, {w}) float32, (pixels/255 - mean) / std")
    onnx.helper.set_model_props(model, {
        "recipe_hash": _recipe_hash(job), "mean": json.dumps(job.data.mean),
        "std": json.dumps(job.data.std), "classes": json.dumps(job.data.class_names),
        "source": os.path.basename(job.source.prefix), "source_sha256": job.source.sha256})
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _recipe_hash(job):
    from ..recipe import recipe_hash
    return recipe_hash(job.recipe)


@FORMATS.register("onnx")
class OnnxFormat(ExportFormat):
    """fp32 ONNX, checked in onnxruntime."""
    order = 10
    files = ("model.onnx",)

    def missing(self):
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            from mxnet import onnx as _  # noqa: F401
            from onnx import mapping  # noqa: F401  (mxnet.onnx needs it: onnx ≤ 1.15)
        except ImportError as e:
            return f"needs onnx==1.15 and onnxruntime ({e}); pip install 'onnx==1.15.0' onnxruntime"
        return None

    def blocker(self, job):
        return onnx_blocker(job)

    def export(self, job):
        import onnxruntime as ort
        from .runtimes import ort_latency, ort_predict, ort_session
        dst = os.path.join(job.out_dir, "model.onnx")
        shutil.copyfile(job.onnx_path(), dst)
        sess = ort_session(dst, job.threads)
        stats = compare_logits(job.ref, ort_predict(sess, job.x_test, job.options.eval_batch_size), job.y_test)
        latency = ({"b1": ort_latency(sess, job.x_test[:1], job.repeats)} if job.options.latency else None)
        return {"files": list(self.files), "bytes": files_bytes(job.out_dir, self.files),
                "runtime": f"onnxruntime {ort.__version__}", "opset": OPSET,
                "input": "data", "output": "logits", "parity": stats, "latency_ms": latency,
                "threads": job.threads,
                "check": check_result(check_max_abs(stats, job.options.atol),
                                      f"onnxruntime vs MXNet on the test split: max abs logit "
                                      f"difference ≤ {job.options.atol:g}")}
