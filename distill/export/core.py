"""``export_run``: a run folder's model → the requested formats, each checked, plus a model card.

Steps: read the run's recipe (the data and test split come from it) → load the model and write
its clean inference pair (:mod:`~distill.export.source`) → MXNet's reference logits on the test
split and batch-1 latency → each format writes its files, runs them in its own runtime and
compares with the reference → ``MODEL_CARD.md`` + ``model_card.json``.
"""
import logging
import os
import shutil
import tempfile
import time

from ..data import load_data
from ..errors import UserError
from ..graphio import check_params, load_symbol_block, symbol_file
from ..modelinfo import measure_latency
from ..recipe import recipe_from_dict
from ..runfolder import MODEL, RunFolder, read_json
from ..trainer import predict
from .calib import calibration_indices, gather_images, write_calibration_images
from .card import build_card, write_card
from .formats import FORMATS, check_result, files_bytes, ordered_formats
from .options import ExportOptions
from .parity import ExportMismatch
from .runtimes import default_threads
from .source import load_source, resolve_prefix, write_inference_pair
# Importing the format modules registers them on FORMATS.
from . import mxnet_pair, ncnn_int8, ncnn_pnnx, onnx_fp32, onnx_int8  # noqa: F401  (registration)

__all__ = ["ExportOptions", "ExportJob", "export_run", "default_out_dir", "available_formats"]
_LOGGER = logging.getLogger(__name__)


class ExportJob:
    """What every format needs, built once per export.

    Attributes
    ----------
    recipe, data, metrics : Recipe, DataBundle, dict
        The run's recipe, its data (``data.val`` is the test split) and ``metrics.json`` ({}
        when absent).
    source : Source
        The model being exported.
    prefix : str
        The clean inference pair (in ``work_dir``): what every format converts.
    x_test, y_test : array-like, np.ndarray
        The test split (``data.val``): its images, possibly a lazy array of streamed images,
        are only ever read a batch (or a bounded chunk, :func:`~.ncnn_worker.run_on_images`)
        at a time.
    ref : np.ndarray
        MXNet's logits of the clean pair on the test split, ``(N, K)``.
    out_dir, work_dir : str
        Where the files go; scratch space removed at the end.
    """

    def __init__(self, recipe, data, metrics, source, out_dir, work_dir, options):
        self.recipe, self.data, self.metrics, self.source = recipe, data, metrics, source
        self.out_dir, self.work_dir, self.options = out_dir, work_dir, options
        self.input_shape = (data.channels,) + tuple(data.image_size)
        self.threads = options.threads or default_threads()
        self.repeats = options.repeats or recipe.output.latency_repeats
        where = symbol_file(source.prefix)
        out_shape = check_params(source.symbol, source.params, source.input_name,
                                 (1,) + self.input_shape, where=where)
        if len(out_shape) != 2 or out_shape[1] != data.num_classes:
            raise UserError(f"{where}: the graph outputs shape {out_shape} per image, but the run's "
                            f"data ({data.name}) has {data.num_classes} classes: export a classifier "
                            f"for these classes, or name its logits layer with --logits.")
        self.prefix = write_inference_pair(source, os.path.join(work_dir, MODEL))
        self.x_test, self.y_test = data.val.x, data.val.y
        self.ref = predict(load_symbol_block(self.prefix), self.x_test, options.eval_batch_size)
        self.checks = {}          # format → its check, as the formats finish (ncnn reads onnx's)
        self._onnx = None
        self._calib = None
        self._calib_x = None
        self._calib_list = None

    @property
    def calib_size(self):
        """``--calib-size``, else the recipe's ``calib_batches × calib_batch_size`` (as ``distill quantize``)."""
        q = self.recipe.quantization
        default = getattr(q, "calib_batches", 8) * getattr(q, "calib_batch_size", 32)
        return self.options.calib_size or default

    @property
    def calib_mode(self):
        """``--calib-mode``, else the recipe's ``quantization.calib_mode`` (naive = min/max, entropy = KL)."""
        return self.options.calib_mode or getattr(self.recipe.quantization, "calib_mode", "naive")

    def calibration(self):
        """Indices into ``data.train`` of the int8 calibration sample (fixed, seeded)."""
        if self._calib is None:
            self._calib = calibration_indices(len(self.data.train.x), self.calib_size,
                                              self.recipe.trainer.seed)
        return self._calib

    def calibration_images(self):
        """The calibration sample's pixels ``(calib_size, C, H, W)`` float32, read from the train
        split ``calib_batch_size`` images at a time, un-augmented (once; onnx-int8 and
        ncnn-int8 share it)."""
        if self._calib_x is None:
            bs = getattr(self.recipe.quantization, "calib_batch_size", 32)
            self._calib_x = gather_images(self.data.train.x, self.calibration(), bs)
        return self._calib_x

    def int8_section(self):
        """``metrics.json``'s ``int8`` section for this model (``distill quantize``), or {}."""
        section = self.metrics.get("int8") or {}
        if self.source.kind == "teacher":
            return section.get("teacher") or {}
        return section if self.source.kind == "student" else {}

    def write_calibration_images(self):
        """Write the calibration sample as ``calib/*.png`` + ``calib/images.txt`` (once)."""
        if self._calib_list is None:
            path = write_calibration_images(self.data.train.x, self.calibration(), self.data.mean,
                                            self.data.std, os.path.join(self.out_dir, "calib"))
            self._calib_list = os.path.relpath(path, self.out_dir)
        return self._calib_list

    def onnx_path(self):
        """Path of the fp32 ONNX model (built once in ``work_dir``; ncnn and int8 start from it)."""
        if self._onnx is None:
            from .onnx_fp32 import export_onnx
            self._onnx = export_onnx(self, os.path.join(self.work_dir, "model.onnx"))
        return self._onnx


def available_formats():
    """``{name: None or what is missing}`` for every registered format."""
    return {n: FORMATS.get(n)().missing() for n in ordered_formats()}


def _choose_formats(requested):
    """``(formats, skipped, explicit)``: the requested formats (each must be installed), or every
    installed one with ``skipped`` saying why the others are not (``explicit`` False)."""
    avail = available_formats()
    if not requested or "all" in requested:
        skipped = {n: miss for n, miss in avail.items() if miss is not None}
        for n, miss in skipped.items():
            _LOGGER.warning("export: skipping %s (%s)", n, miss)
        return [n for n in avail if n not in skipped], skipped, False
    for n in requested:
        FORMATS.get(n, where="--format")            # unknown name: lists the valid ones
        if avail[n] is not None:
            raise UserError(f"--format {n}: {avail[n]}")
    return [n for n in ordered_formats() if n in requested], {}, True


def default_out_dir(run_dir, kind, prefix):
    """``RUN_DIR/export`` for the student, ``.../export/teacher``, ``.../export/<name>`` for --model."""
    base = RunFolder(run_dir).export_dir
    if kind == "student":
        return base
    if kind == "teacher":
        return os.path.join(base, "teacher")
    rel = os.path.relpath(os.path.abspath(prefix), os.path.abspath(run_dir))
    name = rel if not rel.startswith("..") else os.path.basename(prefix)
    name = name.replace(os.sep, "-").lstrip(".-") or "model"
    return os.path.join(base, name)


def _read_run(run_dir):
    folder = RunFolder(run_dir)
    if not folder.exists():
        raise UserError(f"run folder {run_dir} does not exist. Give the folder a run wrote "
                        f"(runs/<name>/ or the recipe's output.dir).")
    recipe = recipe_from_dict(folder.read_recipe_dict(), folder.recipe_path)
    return recipe, folder.read_metrics()


def _previous_card(out_dir, source, keep_formats):
    """Entries of an earlier card in ``out_dir`` worth keeping; stale files of another model removed."""
    try:
        old = read_json(os.path.join(out_dir, "model_card.json"))
    except (OSError, UserError):
        return {}
    if not old:
        return {}
    entries = old.get("exports", {})
    if old.get("model", {}).get("sha256") == source.sha256:
        return {k: v for k, v in entries.items() if k not in keep_formats}
    for name, e in entries.items():       # another model: its files must not pass for this one's
        if name in keep_formats:
            continue
        for f in e.get("files", []):
            p = os.path.join(out_dir, f)
            if os.path.isfile(p):
                os.unlink(p)
        if e.get("calibration_list") and "ncnn" not in keep_formats:
            shutil.rmtree(os.path.join(out_dir, os.path.dirname(e["calibration_list"])), ignore_errors=True)
    return {}


def export_run(run_dir, formats=None, model=None, epoch=0, out_dir=None, options=None,
               raise_on_failure=True):
    """Export a run folder's model and check every format in its runtime.

    Parameters
    ----------
    run_dir : str
        A run folder (``recipe.yaml`` is required: the test split comes from its data).
    formats : list of str or None
        Registered format names (``mxnet``, ``onnx``, ``onnx-int8``, ``ncnn``); ``None`` or
        ``["all"]``: every format whose converter and runtime are installed.
    model : str or None
        ``None`` (the run's student), ``"teacher"``, or a prefix of any MXNet pair.
    epoch : int
        ``PREFIX-%04d.params`` of ``model``.
    out_dir : str or None
        Default :func:`default_out_dir`.
    options : ExportOptions
    raise_on_failure : bool
        Raise :class:`~distill.export.parity.ExportMismatch` when a check fails (after the
        files and the model card are written).

    Returns
    -------
    dict
        The model card (also in ``out_dir/model_card.json``).
    """
    t_start = time.time()
    options = options or ExportOptions()
    options.validate()
    recipe, metrics = _read_run(run_dir)
    chosen, skipped, explicit = _choose_formats(list(formats) if formats else None)
    prefix, kind = resolve_prefix(run_dir, model)
    if kind == "student":
        prefix = _qat_student(metrics, prefix)
    source = load_source(prefix, epoch, kind, options.logits, options.input_name)
    out_dir = out_dir or default_out_dir(run_dir, kind, prefix)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"export folder {out_dir} cannot be created ({e.strerror}); pass --out.") from None
    data = load_data(recipe.data, seed=recipe.trainer.seed)
    previous = _previous_card(out_dir, source, chosen)
    work_dir = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    try:
        job = ExportJob(recipe, data, metrics, source, out_dir, work_dir, options)
        for name in list(chosen):
            why = FORMATS.get(name)().blocker(job)
            if why and explicit:
                raise UserError(f"--format {name}: {source.prefix}: {why}")
            if why:
                _LOGGER.warning("export: skipping %s: %s", name, why)
                skipped[name] = why
                chosen.remove(name)
        _LOGGER.info("export %s (%s) → %s: %s; test split %d images", source.prefix, kind, out_dir,
                     ", ".join(chosen), len(job.x_test))
        _LOGGER.info("export: reference logits ready (%.1f s)", time.time() - t_start)
        reference = {"runtime": "mxnet", "top1": _top1(job.ref, job.y_test), "images": len(job.x_test)}
        if options.latency:
            reference["latency_ms"] = {"b1": measure_latency(job.prefix, job.input_shape, (1,),
                                                             repeats=job.repeats)["b1"]}
        results = {}
        for name in chosen:
            t0 = time.time()
            results[name] = _export_one(name, job)
            results[name]["time_s"] = round(time.time() - t0, 2)
            job.checks[name] = results[name]["check"]
            _LOGGER.info("export: %s %s in %.1f s", name,
                         "passed" if results[name]["check"]["passed"] else "FAILED", time.time() - t0)
        card = build_card(job, reference, results, previous, run_dir)
        card["export_run"]["skipped"] = skipped
        write_card(out_dir, card)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    failed = [f"{n}: {r['check']['message']}" for n, r in results.items() if not r["check"]["passed"]]
    if failed and raise_on_failure:
        raise ExportMismatch(f"export check failed for {out_dir} (files kept for inspection, marked "
                             f"failed in model_card.json): " + " | ".join(failed))
    return card


def _export_one(name, job):
    """One format's result; a conversion it cannot make is a failed check with the reason, so
    the other formats still run and the model card says what happened."""
    fmt = FORMATS.get(name)()
    try:
        return fmt.export(job)
    except ExportMismatch:
        raise
    except UserError as e:
        _LOGGER.warning("export: %s failed: %s", name, e)
        files = [f for f in fmt.files if os.path.isfile(os.path.join(job.out_dir, f))]
        return {"files": files, "bytes": files_bytes(job.out_dir, files), "parity": None,
                "latency_ms": None, "check": check_result(str(e), f"{name}: converted and run in its runtime")}


def _qat_student(metrics, prefix):
    """The student to export: after ``distill quantize --qat``, the fine-tuned fp32 weights the
    int8 ranges were learned on (so every format, int8 ones included, ships what was trained)."""
    int8 = metrics.get("int8") or {}
    qat = int8.get("qat") or {}
    fp32 = qat.get("fp32_prefix")
    if int8.get("method") != "qat" or not fp32:
        return prefix
    if not os.path.isfile(symbol_file(fp32)):
        _LOGGER.warning("export: the run's int8 model was trained with QAT, but its fine-tuned fp32 "
                        "pair %s is missing: exporting %s, whose int8 exports will not match the "
                        "QAT model", fp32, prefix)
        return prefix
    _LOGGER.info("export: the run's int8 model is QAT: exporting its fine-tuned fp32 weights %s "
                 "with the learned int8 ranges", fp32)
    return fp32


def _top1(logits, labels):
    if labels is None or not len(labels):
        return float("nan")
    return round(float((logits.argmax(1) == labels).mean() * 100.0), 3)
