"""``onnx``: ``model.onnx`` through ``mxnet.onnx.export_model``, run in onnxruntime.

The exported graph has a dynamic batch axis, input ``data`` ``(N, C, H, W)`` float32 (already
normalized, see the model card) and output ``logits`` ``(N, K)``. Weights are initializers only
(not graph inputs), so onnxruntime can fold constants. MXNet 1.9's exporter writes opset-13
operators; the model is stamped opset 13 accordingly (``export_model`` would stamp the
installed onnx's newest opset, whose ``Reduce*`` ops take axes differently).

Two exporter mistakes are corrected (measured on a PReLU conv net: onnxruntime could not run
it at all, and is within 3e-5 of MXNet after both):

* a ``FullyConnected`` without a ``flatten`` attribute is exported as unflattened (a Gemm on
  the last axis of a 4-D tensor), though MXNet's default is to flatten and symbol-API graphs
  never write the attribute: the exporter is given the graph with ``flatten`` written out;
* PReLU's slope is written ``(C,)``, which ONNX broadcasts against the *last* axis (W of an
  ``(N, C, H, W)`` input): it is reshaped to ``(C, 1, 1)`` (one 1 per axis after C).

onnxruntime runs in a child process (:mod:`~distill.export.ncnn_worker`): an error or a crash
in it is a failed check naming the layer. When the logits disagree, the check names the first
layer whose output differs from MXNet's (:func:`first_divergence`).
"""
import json
import logging
import os
import re
import shutil

import numpy as np

from ..errors import UserError
from ..graphio import pair_files, symbol_file
from .formats import FORMATS, ExportFormat, check_result, files_bytes
from .parity import check_close, close_rule, compare_logits

__all__ = ["OnnxFormat", "export_onnx", "onnx_blocker", "explicit_flatten", "fix_prelu_slopes",
           "first_divergence", "runtime_failure", "OPSET"]
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


def explicit_flatten(symbol_json):
    """The symbol JSON with ``flatten: "True"`` written on every ``FullyConnected`` lacking it.

    MXNet flattens by default; ``mxnet.onnx`` reads a missing attribute as false and exports a
    Gemm over the last axis only, which pnnx then cannot shape and onnxruntime rejects.

    Returns
    -------
    (str, list of str)
        The JSON and the names of the layers changed.
    """
    graph = json.loads(symbol_json)
    changed = []
    for n in graph["nodes"]:
        if n["op"] == "FullyConnected":
            attrs = n.setdefault("attrs", {})
            if "flatten" not in attrs:
                attrs["flatten"] = "True"
                changed.append(n["name"])
    return json.dumps(graph), changed


def fix_prelu_slopes(model):
    """Reshape each PRelu slope initializer ``(C,)`` to ``(C, 1, …)`` for its input's rank.

    ONNX aligns shapes from the last axis, so a ``(C,)`` slope on ``(N, C, H, W)`` is matched
    against W. The input rank comes from ONNX shape inference (the batch axis is dynamic, the
    rank is not). Returns the names of the PRelu nodes changed.
    """
    import onnx
    from onnx import numpy_helper
    inferred = onnx.shape_inference.infer_shapes(model)
    rank = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if v.type.tensor_type.HasField("shape"):
            rank[v.name] = len(v.type.tensor_type.shape.dim)
    inits = {i.name: i for i in model.graph.initializer}
    users = {}
    for node in model.graph.node:
        for i in node.input:
            users.setdefault(i, []).append(node)
    changed = []
    for node in model.graph.node:
        if node.op_type != "PRelu" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        slope = numpy_helper.to_array(inits[node.input[1]])
        r = rank.get(node.input[0])
        if slope.ndim != 1 or slope.size == 1 or r is None or r <= 2:
            continue                     # (1,) broadcasts anywhere; (C,) is right for (N, C)
        new = numpy_helper.from_array(slope.reshape((slope.size,) + (1,) * (r - 2)), node.input[1])
        if len(users[node.input[1]]) > 1:          # shared with another node: give this one its own
            new.name = f"{node.name}_slope_c11"
            node.input[1] = new.name
            model.graph.initializer.append(new)
        else:
            inits[node.input[1]].CopyFrom(new)
        changed.append(node.name)
    return changed


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
    with open(sym_file) as f:
        text, flattened = explicit_flatten(f.read())
    if flattened:
        _LOGGER.info("onnx: FullyConnected %s: flatten=True written out (MXNet's default, which "
                     "the ONNX exporter reads as false)", ", ".join(flattened))
        # the exporter reads PREFIX-symbol.json + PREFIX-0000.params: a pair next to `path`
        src_params = params_file
        sym_file, params_file = pair_files(os.path.join(os.path.dirname(path), "onnx-source"))
        with open(sym_file, "w") as f:
            f.write(text)
        shutil.copyfile(src_params, params_file)
    tmp = path + ".raw"
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))   # the exporter logs every step on the root logger
    try:
        mx_onnx.export_model(sym_file, params_file, in_shapes=[(1, c, h, w)], in_types=[np.float32],
                             onnx_file_path=tmp, dynamic=True, dynamic_input_shapes=[(None, c, h, w)])
    except Exception as e:      # the exporter raises bare AttributeError/KeyError on odd attributes
        raise UserError(f"{job.source.prefix}: mxnet.onnx.export_model failed: {type(e).__name__}: "
                        f"{_last_line(e)}. Rerun with --debug for the layer it stopped at.") from e
    finally:
        root.setLevel(level)
    model = onnx.load(tmp)
    os.unlink(tmp)
    prelu = fix_prelu_slopes(model)
    if prelu:
        _LOGGER.info("onnx: PRelu %s: slope reshaped (C,) → (C, 1, 1) for ONNX broadcasting", ", ".join(prelu))
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


def _last_line(e):
    """The message of an exception without MXNet's C++ traceback (its first line is "Traceback")."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return lines[-1] if lines else ""


def _recipe_hash(job):
    """The hash the run recorded (``metrics.json``): the export reads the run folder, it does
    not re-derive the recipe (which would import the recipe layer from the export floor)."""
    return str((getattr(job, "metrics", None) or {}).get("recipe_hash", ""))


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
        from .ncnn_worker import NcnnWorkerError, run_on_images
        dst = os.path.join(job.out_dir, "model.onnx")
        shutil.copyfile(job.onnx_path(), dst)
        atol, rtol = job.options.atol, job.options.rtol
        result = {"files": list(self.files), "bytes": files_bytes(job.out_dir, self.files),
                  "runtime": f"onnxruntime {ort.__version__}", "opset": OPSET,
                  "input": "data", "output": "logits", "parity": None, "latency_ms": None,
                  "threads": job.threads}
        rule = f"onnxruntime vs MXNet on the test split: {close_rule(atol, rtol)}"
        base = {"runtime": "onnxruntime", "model": dst}
        tasks = [dict(base, task="predict", x="test", threads=job.threads,
                      batch_size=job.options.eval_batch_size)]
        if job.options.latency:
            tasks.append(dict(base, task="latency", x="test", threads=job.threads, repeats=job.repeats))
        try:
            res = run_on_images(tasks, "test", job.x_test, job.work_dir,
                                batch_size=job.options.eval_batch_size)
        except NcnnWorkerError as e:
            result["check"] = check_result(runtime_failure(str(e), dst), rule)
            return result
        stats = compare_logits(job.ref, res[0]["arrays"]["logits"], job.y_test)
        result["parity"] = stats
        if job.options.latency:
            result["latency_ms"] = {"b1": res[1]["meta"]["ms"]}
        reason = check_close(stats, atol, rtol)
        if reason:
            where = first_divergence(job, dst)
            reason = f"{reason}. {where}" if where else reason
        result["check"] = check_result(reason, rule)
        return result


def runtime_failure(error, path):
    """A one-paragraph reason for onnxruntime failing on ``path``, naming the node when it says.

    onnxruntime's message carries its source location and the failed condition before the
    sentence meant for people ("Attempting to broadcast an axis by a dimension other than 1"):
    that sentence is quoted, and the whole error when there is no such structure.
    """
    run = re.search(r"while running (\w+) node\. Name:\s*'([^']+)'(?: Status Message: (.*))?", error)
    if not run:
        return (f"onnxruntime could not run {os.path.basename(path)}: {error}. Export --format "
                f"mxnet and report the model's layers to onnxruntime or MXNet's ONNX exporter.")
    detail = (run.group(3) or "").strip()
    if detail.startswith("/") and " was false. " in detail:     # "file.h:540 fn(...) cond was false. Why"
        detail = detail.split(" was false. ", 1)[1]
    how = re.search(r"(was killed by signal \d+|exited with code -?\d+)", error)
    return (f"onnxruntime could not run {os.path.basename(path)} at layer {run.group(2)!r} "
            f"({run.group(1)}){': ' + detail if detail else ''}"
            f"{' (onnxruntime ' + how.group(1) + ')' if how else ''}. MXNet's ONNX exporter wrote "
            f"that layer in a form onnxruntime rejects; export --format mxnet and report the "
            f"layer's type and attributes.")


def _mxnet_internals(prefix, names, x):
    """``{layer: MXNet's output on x}`` for the layers in ``names`` with one output."""
    import mxnet as mx
    sym, arg, aux = mx.model.load_checkpoint(prefix, 0)
    internals = sym.get_internals()
    have = set(internals.list_outputs())
    names = [n for n in names if f"{n}_output" in have]      # multi-output layers are skipped
    group = mx.sym.Group([internals[f"{n}_output"] for n in names])
    mod = mx.mod.Module(group, data_names=["data"], label_names=None, context=mx.cpu())
    mod.bind(data_shapes=[("data", x.shape)], for_training=False)
    mod.set_params(arg, aux, allow_missing=False, allow_extra=True)
    mod.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
    return dict(zip(names, (o.asnumpy() for o in mod.get_outputs())))


def first_divergence(job, onnx_path, images=8):
    """The first layer whose onnxruntime output differs from MXNet's, as a sentence (or ``None``).

    Every MXNet layer whose name is also a tensor of the ONNX graph (the exporter names a
    layer's last node after it) becomes an extra graph output of a probe copy; both runtimes
    run ``images`` test images and the layers are compared in graph order, relative to each
    output's scale (``max |Δ| > 1e-3 · max |MXNet| + 1e-6`` is a divergence: float32 rounding
    of one layer is ~1e-6 relative).
    """
    import onnx
    from .ncnn_worker import NcnnWorkerError, run_tasks
    model = onnx.load(onnx_path)
    tensors = {o for node in model.graph.node for o in node.output}
    with open(symbol_file(job.prefix)) as f:
        graph = json.loads(f.read())
    nodes, head = graph["nodes"], graph["heads"][0][0]
    # (MXNet layer, its ONNX tensor, op): the logits layer's tensor was renamed `logits`
    layers = [(n["name"], "logits" if i == head else n["name"], n["op"]) for i, n in enumerate(nodes)
              if n["op"] != "null" and (n["name"] in tensors or i == head)]
    if not layers:
        return None
    x = np.ascontiguousarray(job.x_test[:images], dtype=np.float32)
    try:
        ref = _mxnet_internals(job.prefix, [n for n, _, _ in layers], x)
    except Exception as e:         # a diagnosis only: the failed check stands without it
        _LOGGER.warning("onnx: cannot compare layer by layer in MXNet (%s)", e)
        return None
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for _, t, _ in layers if t not in known)
    probe = os.path.join(job.work_dir, "probe.onnx")
    onnx.save(model, probe)
    try:
        res = run_tasks([{"runtime": "onnxruntime", "model": probe, "task": "outputs", "x": "x",
                          "threads": job.threads}], {"x": x}, job.work_dir)[0]
    except NcnnWorkerError as e:
        _LOGGER.warning("onnx: cannot compare layer by layer in onnxruntime (%s)", e)
        return None
    finally:
        os.unlink(probe)
    got = {name: res["arrays"][str(k)] for k, name in enumerate(res["meta"]["names"])}
    for name, tensor, op in layers:
        out, want = got.get(tensor), ref.get(name)
        if out is None or want is None:
            continue
        if out.size != want.size:
            return (f"First layer at fault: {name} ({op}), whose output has shape {list(out.shape)} in "
                    f"onnxruntime but {list(want.shape)} in MXNet")
        out = out.reshape(want.shape)
        diff = float(np.abs(out.astype(np.float64) - want).max())
        scale = float(np.abs(want).max())
        if not np.isfinite(diff) or diff > 1e-3 * scale + 1e-6:
            return (f"First layer at fault: {name} ({op}): max |Δ| {diff:.3g} against outputs up to "
                    f"{scale:.3g} on {len(x)} images (every layer before it agrees within 1e-3 of "
                    f"its scale)")
    return ("No single layer stands out (each agrees within 1e-3 of its scale on "
            f"{len(x)} images): the difference accumulates through the graph; if the logits agree "
            f"on top-1, raise --rtol")
