"""``ncnn-int8``: an int8 ncnn model written by the tool from MXNet's calibration, checked in ncnn.

From the fp32 ``model.ncnn.*`` pnnx wrote (the ``ncnn`` format's files, or its own conversion
when that one is fp16): ``model-int8.ncnn.param`` + ``model-int8.ncnn.bin`` (int8 weights,
ncnn's int8 layout, :mod:`~distill.export.ncnn_bin`) and ``model.table`` (the scales, as
``ncnn2table`` writes them: ``ncnn2int8`` rebuilds the same model from it).

Blob scales are MXNet's: the same calibration images and method as ``distill quantize`` and
``onnx-int8``; each ncnn input blob of a Convolution, ConvolutionDepthWise or InnerProduct is
matched by value with the MXNet tensor it equals and takes that tensor's threshold; a blob
that matches nothing is calibrated on ncnn's own values by the same method
(:mod:`~distill.export.ncnn_calib`). ``--ncnn-calib kl`` runs ncnn's KL method
(``ncnn2table method=kl``) on every blob instead. Weight scales are ncnn2table's. Layers
``distill quantize`` kept fp32 (``int8.excluded``) and ``--int8-exclude`` stay fp32: they get
no blob scale, which is how ncnn keeps a layer fp32.

The check runs ncnn's runtime (``opt.use_int8_inference``) in a child process on the test
split: top-1 at most ``--int8-max-drop`` points below fp32 MXNet; agreement with MXNet's int8
model (same thresholds, same fp32 layers) is reported, and so are size and batch-1 latency of
ncnn fp32 vs int8. ``--policies`` adds rows for full int8, ``first_last`` and ``auto``.
"""
import logging
import os

import numpy as np

from ..checkpoint import atomic_write_bytes
from ..errors import UserError
from .formats import FORMATS, ExportFormat, check_result, files_bytes
from .ncnn_bin import INT8_TYPES, parse_param, write_int8, write_param, write_table
from .ncnn_calib import blob_scale, match_tensors, mxnet_tensors, tensor_layers
from .parity import check_top1_drop, compare_logits
from .runtimes import package_versions

__all__ = ["NcnnInt8Format", "write_int8_files", "ncnn_layer_map", "latency_note"]
_LOGGER = logging.getLogger(__name__)

FILES = ("model-int8.ncnn.param", "model-int8.ncnn.bin", "model.table")


def latency_note(lat32, lat8, threads=None):
    """What the batch-1 timings of this model say, and what they do not (the target device).

    ``lat32``/``lat8``: ncnn fp32 and int8 ms at batch 1 on this machine (None: not timed)."""
    where = "this machine's CPU" + (f", {threads} thread(s)" if threads else "")
    if lat32 is None or lat8 is None or lat8 <= 0:
        return (f"latency not measured here ({where}); ncnn's int8 kernels differ per CPU "
                f"architecture, so time the int8 model on the target device")
    ratio = lat32 / lat8
    how = (f"int8 ran {ratio:.2f}× faster than fp32" if ratio >= 1.0
           else f"int8 ran {1 / ratio:.2f}× SLOWER than fp32")
    return (f"on {where}, this model's {how} ({lat32:.3f} → {lat8:.3f} ms at batch 1); ncnn's "
            f"int8 kernels differ per CPU architecture (x86 and ARM), so time it on the target "
            f"device before choosing int8 for speed")


def write_int8_files(src_param, src_bin, blob_scales, dst_param, dst_bin, dst_table):
    """Read the fp32 ncnn pair, write its int8 version and ``model.table``.

    Every file is written to a temporary name and renamed when complete, after the whole model
    has been walked and written in memory: an unknown layer type (a :class:`UserError` naming
    the layer and its type) leaves nothing behind, and the fp32 files are only read.

    Parameters
    ----------
    blob_scales : dict
        ncnn layer name → the scale of its input blob; layers without one stay fp32.

    Returns
    -------
    dict
        ``int8_layers`` (names), ``weight_scales`` (name → array), ``candidates`` (names of the
        Convolution/ConvolutionDepthWise/InnerProduct layers).
    """
    with open(src_param) as f:
        model = parse_param(f.read(), where=src_param)
    with open(src_bin, "rb") as f:
        data = f.read()
    int8_model, int8_bin, wscales = write_int8(model, data, blob_scales, where=src_bin)
    table = write_table(wscales, blob_scales)
    for path, payload in ((dst_table, table.encode()), (dst_bin, int8_bin),
                          (dst_param, write_param(int8_model).encode())):
        atomic_write_bytes(path, payload)
        os.chmod(path, 0o644)
    return {"int8_layers": list(wscales), "weight_scales": wscales,
            "candidates": [l.name for l in model.layers if l.type in INT8_TYPES]}


def ncnn_layer_map(model, blob_values, mx_fused, mx_plain, thresholds, owners):
    """Which MXNet threshold belongs to each candidate layer's input, and which MXNet weight
    layer each candidate layer is.

    Parameters
    ----------
    model : NcnnModel
    blob_values : dict
        ncnn blob → ``(N, size)`` values on N calibration images.
    mx_fused, mx_plain : dict
        MXNet tensor → ``(N, size)`` values on the same images (fused graph, original graph).
    thresholds : dict
        MXNet's calibration: fused-graph tensor → ``(min, max)``.
    owners : dict
        MXNet tensor → weight layer (:func:`~distill.export.ncnn_calib.tensor_layers`).

    Returns
    -------
    (dict, dict)
        ncnn layer → MXNet threshold tensor of its input (or ``None``); ncnn layer → MXNet
        weight layer (or ``None``).
    """
    cands = [l for l in model.layers if l.type in INT8_TYPES]
    fused = {k: v for k, v in mx_fused.items() if k in thresholds}
    inputs = match_tensors({l.bottoms[0]: blob_values[l.bottoms[0]] for l in cands}, fused)
    tops = {l.tops[0]: blob_values[l.tops[0]] for l in cands}
    plain = match_tensors(tops, {k: v for k, v in mx_plain.items() if k in owners})
    fused_tops = match_tensors(tops, {k: v for k, v in mx_fused.items() if k in owners})
    layer_of = {}
    for l in cands:
        t = plain.get(l.tops[0]) or fused_tops.get(l.tops[0])
        layer_of[l.name] = owners.get(t) if t else None
    return {l.name: inputs[l.bottoms[0]] for l in cands}, layer_of


def _top1(logits, y):
    return float((logits.argmax(1) == y).mean() * 100.0) if y is not None and len(y) else float("nan")


class _Calibrated:
    """The calibration of one export, shared by the policy rows."""

    def __init__(self, job, src_param, src_bin, excluded_mxnet):
        from .ncnn_worker import run_ncnn
        from .onnx_int8 import mxnet_int8_reference
        self.job, self.src_param, self.src_bin = job, src_param, src_bin
        with open(src_param) as f:
            self.model = parse_param(f.read(), where=src_param)
        with open(src_bin, "rb") as f:
            write_int8(self.model, f.read(), {}, where=src_bin)    # walk it now: unknown types stop here
        self.cands = [l for l in self.model.layers if l.type in INT8_TYPES]
        self.calib = job.calibration_images()
        self.mx_model, self.thresholds, self.mx_int8 = mxnet_int8_reference(job, self.calib, excluded_mxnet)
        probe = self.calib[:2]
        blobs = sorted({b for l in self.cands for b in (l.bottoms[0], l.tops[0])})
        base = {"param": src_param, "bin": src_bin, "int8": False, "threads": 1}
        res = run_ncnn([dict(base, task="blobs", names=blobs, x="probe")], {"probe": probe}, job.work_dir)
        values = {b: res[0]["arrays"][str(k)] for k, b in enumerate(blobs)}
        mx_fused = mxnet_tensors(self.mx_model, probe, fused=True)
        mx_plain = mxnet_tensors(self.mx_model, probe, fused=False)
        self.input_tensor, self.layer_of = ncnn_layer_map(
            self.model, values, mx_fused, mx_plain, self.thresholds, tensor_layers(self.mx_model))
        method = getattr(job.options, "ncnn_calib", "mxnet")
        self.method = method
        if method == "kl":
            names = sorted({l.bottoms[0] for l in self.cands})
            own = self._ncnn_thresholds(names, "kl")
            self.scales = {l.name: blob_scale(own[l.bottoms[0]]) for l in self.cands}
            self.from_mxnet, self.from_ncnn = 0, len(names)
        else:
            missing = sorted({l.bottoms[0] for l in self.cands if self.input_tensor[l.name] is None})
            own = self._ncnn_thresholds(missing, job.calib_mode) if missing else {}
            self.scales = {}
            for l in self.cands:
                t = self.input_tensor[l.name]
                self.scales[l.name] = blob_scale(self.thresholds[t] if t else own[l.bottoms[0]])
            self.from_ncnn = len(missing)
            self.from_mxnet = len({l.bottoms[0] for l in self.cands}) - len(missing)

    def _ncnn_thresholds(self, names, mode):
        from .ncnn_worker import run_ncnn
        base = {"param": self.src_param, "bin": self.src_bin, "int8": False, "threads": 1}
        q = self.job.recipe.quantization
        res = run_ncnn([dict(base, task="calibrate", names=names, x="calib", mode=mode,
                             batch_size=getattr(q, "calib_batch_size", 32))],
                       {"calib": self.calib}, self.job.work_dir)
        return res[0]["meta"]["thresholds"]

    def fp32_layers(self, excluded_mxnet, extra_ncnn=()):
        """ncnn layers to keep fp32 for MXNet layer names (or ncnn layer names); names not found."""
        wanted = set(excluded_mxnet) | set(extra_ncnn)
        keep = [l.name for l in self.cands if l.name in wanted or self.layer_of.get(l.name) in wanted]
        known = set(self.layer_of.values()) | {l.name for l in self.cands}
        return keep, sorted(n for n in wanted if n not in known)

    def write(self, fp32_ncnn, dst_param, dst_bin, dst_table):
        scales = {k: v for k, v in self.scales.items() if k not in set(fp32_ncnn)}
        return write_int8_files(self.src_param, self.src_bin, scales, dst_param, dst_bin, dst_table)

    def run(self, param, bin_, latency=True, fp32_latency=False):
        """Top-1 logits on the test split (one thread) and batch-1 latency (job threads)."""
        from .ncnn_worker import run_on_images
        job = self.job
        int8 = {"param": param, "bin": bin_, "int8": True}
        tasks = [dict(int8, task="predict", x="test", threads=1)]
        if latency:
            tasks.append(dict(int8, task="latency", x="one", threads=job.threads, repeats=job.repeats))
        if fp32_latency:
            tasks.append({"param": self.src_param, "bin": self.src_bin, "int8": False, "task": "latency",
                          "x": "one", "threads": job.threads, "repeats": job.repeats})
        res = run_on_images(tasks, "test", job.x_test, job.work_dir,
                            {"one": np.ascontiguousarray(job.x_test[:1], dtype=np.float32)},
                            batch_size=job.options.eval_batch_size)
        lat = res[1]["meta"]["ms"] if latency else None
        lat32 = res[2]["meta"]["ms"] if fp32_latency else None
        return res[0]["arrays"]["logits"], lat, lat32


def _auto_layers(job, cal):
    """MXNet layers ``auto`` keeps fp32: ``distill quantize``'s choice when it ran ``auto``,
    else the ``auto`` policy run now on the same thresholds and test split."""
    section = job.int8_section()
    if section.get("policy") == "auto" and section.get("excluded") is not None:
        return list(section["excluded"]), "distill quantize's auto choice"
    from ..quantize.policies import resolve_policy
    from ..quantize.scoring import Scorer
    q = job.recipe.quantization
    scorer = Scorer(cal.mx_model, cal.thresholds, job.data.val, q.granularity, job.options.eval_batch_size)
    sel = resolve_policy("auto", q.budget).select(scorer)
    return list(sel.excluded), f"auto (budget {q.budget:g}) run now in MXNet"


def _policy_rows(job, cal, main_row):
    """Full int8, ``first_last`` and ``auto``, each written to ``work_dir`` and run in ncnn."""
    from ..quantize.policies.first_last import first_last_layers
    rows = []
    for policy in ("none", "first_last", "auto"):
        if policy == "none":
            names, how = [], "every candidate layer int8"
        elif policy == "first_last":
            names, how = first_last_layers(cal.mx_model.layers), "first convolution and classifier fp32"
        else:
            names, how = _auto_layers(job, cal)
        keep, _ = cal.fp32_layers(names)
        if keep == main_row["ncnn_layers_fp32"]:          # the exported model itself
            rows.append(dict(main_row, policy=policy, how=how, mxnet_layers_fp32=names))
            continue
        stem = os.path.join(job.work_dir, f"policy-{policy}")
        info = cal.write(keep, stem + ".param", stem + ".bin", stem + ".table")
        logits, lat, _ = cal.run(stem + ".param", stem + ".bin", latency=job.options.latency)
        rows.append({"policy": policy, "how": how, "mxnet_layers_fp32": names, "ncnn_layers_fp32": keep,
                     "int8_layers": len(info["int8_layers"]), "layers": len(info["candidates"]),
                     "top1": _top1(logits, job.y_test), "bin_bytes": os.path.getsize(stem + ".bin"),
                     "latency_ms": lat})
    return rows


@FORMATS.register("ncnn-int8")
class NcnnInt8Format(ExportFormat):
    """int8 ncnn param/bin + model.table from MXNet's calibration, checked in ncnn's runtime."""
    order = 35
    files = FILES

    def missing(self):
        return FORMATS.get("ncnn")().missing()

    def blocker(self, job):
        return FORMATS.get("ncnn")().blocker(job)

    def _fp32_pair(self, job):
        pair = getattr(job, "ncnn_fp32", None)          # the ncnn format's files, when fp32
        if pair and all(os.path.isfile(p) for p in pair):
            return pair
        from .ncnn_pnnx import onnx_to_ncnn
        param, bin_ = (os.path.join(job.work_dir, f) for f in ("fp32.ncnn.param", "fp32.ncnn.bin"))
        onnx_to_ncnn(job.onnx_path(), job.input_shape, param, bin_, fp16=False, work_dir=job.work_dir)
        job.ncnn_fp32 = (param, bin_)
        return job.ncnn_fp32

    def export(self, job):
        from .onnx_int8 import excluded_layers
        from .ncnn_worker import NcnnWorkerError
        fp32 = getattr(job, "checks", {}).get("ncnn")
        if fp32 is not None and not fp32["passed"] and not job.options.fp16:
            raise UserError(f"ncnn-int8 starts from the fp32 ncnn model, which failed its check "
                            f"({fp32['message']}); fix that first.")
        src_param, src_bin = self._fp32_pair(job)
        wanted = excluded_layers(job.int8_section(), job.options.int8_exclude)
        try:
            cal = _Calibrated(job, src_param, src_bin, wanted)
        except NcnnWorkerError as e:          # before any int8 file exists: stop, say why
            raise UserError(f"ncnn-int8: calibrating on the fp32 ncnn model failed: {e}. The fp32 "
                            f"model.ncnn.* files are unchanged; export without ncnn-int8, or make "
                            f"int8 with ncnn's own ncnn2table/ncnn2int8.") from None
        keep, not_found = cal.fp32_layers(wanted)
        if not_found:
            _LOGGER.warning("ncnn-int8: no ncnn layer for excluded layer(s) %s", ", ".join(not_found))
        dst = [os.path.join(job.out_dir, f) for f in FILES]
        info = cal.write(keep, *dst)
        calib_list = job.write_calibration_images()
        problem, logits, lat, lat32 = None, None, None, None
        try:
            logits, lat, lat32 = cal.run(dst[0], dst[1], latency=job.options.latency,
                                         fp32_latency=job.options.latency)
        except NcnnWorkerError as e:
            problem = f"{e} (model {FILES[0]} + {FILES[1]})"
        stats = (compare_logits(job.ref, logits, job.y_test) if logits is not None else
                 {"images": int(len(job.x_test)), "top1": float("nan"), "top1_mxnet": _top1(job.ref, job.y_test),
                  "max_abs_diff": float("nan"), "mean_abs_diff": float("nan"), "top1_agreement": float("nan")})
        vs_int8 = compare_logits(cal.mx_int8, logits, job.y_test) if logits is not None else None
        problem = problem or check_top1_drop(stats, job.options.int8_max_drop)
        n_int8, n_all = len(info["int8_layers"]), len(info["candidates"])
        bin32, bin8 = os.path.getsize(src_bin), os.path.getsize(dst[1])
        result = {
            "files": list(FILES), "bytes": files_bytes(job.out_dir, FILES),
            "runtime": f"ncnn {package_versions('ncnn')['ncnn']} (Python, use_int8_inference), written by distill",
            "precision": "int8", "input": "in0", "output": "out0",
            "parity": stats, "latency_ms": {"b1": lat} if lat is not None else None, "threads": job.threads,
            "calibration_list": calib_list,
            "ncnn_fp32": {"bin_bytes": bin32, "bytes": bin32 + os.path.getsize(src_param),
                          "latency_ms": {"b1": lat32} if lat32 is not None else None},
            "bin_bytes": bin8, "bin_ratio": round(bin8 / bin32, 4),
            "int8_layers": {"int8": n_int8, "total": n_all, "fp32": [n for n in info["candidates"]
                                                                      if n not in info["int8_layers"]]},
            "mxnet_int8": ({"top1": vs_int8["top1_mxnet"], "top1_agreement": vs_int8["top1_agreement"],
                            "max_abs_diff": vs_int8["max_abs_diff"],
                            "distill_quantize_top1": job.int8_section().get("top1")} if vs_int8 else None),
            "quantization": {"weights": "int8 per output channel (depthwise/grouped: per group); 6-bit "
                                        "range for 3×3 stride-1 convolutions, as ncnn2table",
                             "activations": "int8 symmetric, one scale per input blob",
                             "calibration": (f"{job.calib_mode}: MXNet's thresholds" if cal.method != "kl"
                                             else "ncnn2table's KL method on ncnn's blobs"),
                             "calibration_images": int(len(cal.calib)),
                             "blobs_from_mxnet": cal.from_mxnet, "blobs_calibrated_in_ncnn": cal.from_ncnn,
                             "excluded_layers": wanted, "excluded_ncnn_layers": keep,
                             "excluded_not_found": not_found,
                             "layer_map": cal.layer_of},
            "note": latency_note(lat32, lat, job.threads),
        }
        if getattr(job.options, "ncnn_policies", False) and problem is None:
            result["policies"] = _policy_rows(job, cal, {
                "int8_layers": n_int8, "layers": n_all, "top1": stats["top1"], "bin_bytes": bin8,
                "latency_ms": lat, "ncnn_layers_fp32": keep})
        result["report_notes"] = report_notes(result)
        result["card_notes"] = card_notes(result)
        result["check"] = check_result(problem, f"ncnn int8 (use_int8_inference) top-1 at most "
                                                f"{job.options.int8_max_drop:g} points below fp32 MXNet "
                                                f"on the test split")
        return result


def _ms(v):
    return "-" if v is None else f"{v:.3f}"


def report_notes(e):
    """Lines for the terminal report."""
    q, f32 = e["quantization"], e["ncnn_fp32"]
    lat32, lat8 = (f32.get("latency_ms") or {}).get("b1"), (e.get("latency_ms") or {}).get("b1")
    lines = [f"ncnn fp32 vs int8: .bin {f32['bin_bytes'] / 2**20:.2f} → {e['bin_bytes'] / 2**20:.2f} MiB "
             f"({e['bin_ratio']:.2f}×), ms b1 {_ms(lat32)} → {_ms(lat8)}; "
             f"{e['int8_layers']['int8']}/{e['int8_layers']['total']} Convolution/DepthWise/InnerProduct "
             f"layers int8; blob scales: {q['blobs_from_mxnet']} from MXNet's thresholds, "
             f"{q['blobs_calibrated_in_ncnn']} calibrated in ncnn ({q['calibration']})"]
    m = e.get("mxnet_int8")
    if m:
        same = "same thresholds" if q["blobs_from_mxnet"] else "MXNet's thresholds, ncnn's KL here"
        lines.append(f"ncnn-int8 top-1 {e['parity']['top1']:.2f}% vs MXNet int8 {m['top1']:.2f}% "
                     f"({same}, same fp32 layers; predictions agree on {m['top1_agreement']:.2f}%)")
    for r in e.get("policies") or []:
        lines.append(f"ncnn int8 policy {r['policy']:<10}  top-1 {r['top1']:6.2f}%  .bin "
                     f"{r['bin_bytes'] / 2**20:.2f} MiB  ms b1 {_ms(r['latency_ms'])}  "
                     f"{r['int8_layers']}/{r['layers']} layers int8 ({r['how']})")
    lines.append("note: " + e["note"])
    return lines


def card_notes(e):
    """Markdown lines for ``MODEL_CARD.md``."""
    q, f32 = e["quantization"], e["ncnn_fp32"]
    lat32, lat8 = (f32.get("latency_ms") or {}).get("b1"), (e.get("latency_ms") or {}).get("b1")
    lines = ["", "## ncnn int8", "",
             "| ncnn | .bin MiB | ms b1 |", "|---|---|---|",
             f"| fp32 (`model.ncnn.bin`) | {f32['bin_bytes'] / 2**20:.3f} | {_ms(lat32)} |",
             f"| int8 (`model-int8.ncnn.bin`) | {e['bin_bytes'] / 2**20:.3f} | {_ms(lat8)} |", "",
             f"{e['int8_layers']['int8']} of {e['int8_layers']['total']} Convolution/ConvolutionDepthWise/"
             f"InnerProduct layers are int8 (fp32: {', '.join(e['int8_layers']['fp32']) or 'none'}). "
             f"Weights: {q['weights']}; activations: {q['activations']}. Blob scales: "
             f"{q['blobs_from_mxnet']} from MXNet's thresholds ({q['calibration']}, "
             f"{q['calibration_images']} images), {q['blobs_calibrated_in_ncnn']} calibrated on ncnn's "
             f"own blobs. Load it with `net.opt.use_int8_inference = true` (ncnn's default); "
             f"`model.table` rebuilds it with ncnn's `ncnn2int8 model.ncnn.param model.ncnn.bin "
             f"model-int8.ncnn.param model-int8.ncnn.bin model.table`.", "",
             f"Note: {e['note']}."]
    if e.get("policies"):
        lines += ["", "| policy | top-1 % | .bin MiB | ms b1 | int8 layers |", "|---|---|---|---|---|"]
        lines += [f"| {r['policy']} | {r['top1']:.2f} | {r['bin_bytes'] / 2**20:.3f} | {_ms(r['latency_ms'])} "
                  f"| {r['int8_layers']}/{r['layers']} |" for r in e["policies"]]
    return lines
