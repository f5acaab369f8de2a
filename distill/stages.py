"""The stages after training that ``distill train`` runs when the recipe asks for them, and the
one table that closes a whole pipeline run.

``run_training`` trains (teacher, then student); then, in this order, ``quantization.enabled``
calibrates int8 (:func:`distill.quantize.pipeline.quantize_target`) and ``export.enabled``
exports every format and checks each in its runtime (:func:`export_stage`). :func:`pipeline_table`
puts teacher fp32, student fp32, student int8 (MXNet) and the ncnn fp32/int8 files side by side.

Recipe example::

    quantization: {enabled: true, exclude: auto}
    export: {formats: [mxnet, onnx, onnx-int8, ncnn, ncnn-int8]}
"""
import logging
import os
import time

from .report import format_table, human
from .runfolder import merge_json

__all__ = ["Stage", "export_stage", "export_section", "pipeline_table"]
_LOGGER = logging.getLogger(__name__)


class Stage:
    """``with Stage("int8 calibration", log):`` prints what runs, then how long it took."""

    def __init__(self, what, log=print):
        self.what, self.log = what, log

    def __enter__(self):
        self.t0 = time.time()
        self.log(f"\n== {self.what}")
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.log(f"== {self.what}: done in {time.time() - self.t0:.0f} s")
        return False


def export_section(card):
    """The ``export`` section of ``metrics.json`` from an export's model card: per format, whether
    its check passed, its top-1, agreement with MXNet, size and batch-1 latency."""
    out = {"out_dir": card["export_run"].get("out_dir"), "formats": {}}
    for name in card["export_run"]["formats"]:
        e = card["exports"][name]
        p = e.get("parity") or {}
        out["formats"][name] = {
            "passed": bool(e["check"]["passed"]), "message": e["check"]["message"],
            "top1": p.get("top1"), "top1_agreement": p.get("top1_agreement"),
            "max_abs_diff": p.get("max_abs_diff"), "bytes": e.get("bytes"),
            "latency_ms": e.get("latency_ms"), "files": list(e.get("files") or [])}
    out["skipped"] = dict(card["export_run"].get("skipped") or {})
    out["passed"] = all(f["passed"] for f in out["formats"].values())
    return out


def export_stage(run_dir, cfg, metrics_path, log=print):
    """Export the run's student in ``cfg.formats`` (an :class:`~distill.recipe.ExportConfig`),
    print the export table and merge the ``export`` section into ``metrics_path``.

    A failed check is reported, not raised: the files are kept and the section says which
    format failed and why (the run itself is complete)."""
    from .export.core import export_run
    from .export.report import export_table
    formats = None if cfg.formats == ["all"] else list(cfg.formats)
    card = export_run(run_dir, formats=formats, raise_on_failure=False)
    log(export_table(card))
    section = export_section(card)
    failed = [n for n, f in section["formats"].items() if not f["passed"]]
    if failed:
        log(f"export: check FAILED for {', '.join(failed)} (files kept; see "
            f"{os.path.basename(metrics_path)} `export`)")
    merge_json(metrics_path, export=section)
    return section


def _lat(d, key):
    v = d.get(key) if isinstance(d, dict) else None
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def _mib(n):
    return f"{n / 2**20:.2f}" if n else "-"


def pipeline_table(metrics):
    """One row per deployed form: teacher fp32, student fp32, student int8 (MXNet), ncnn fp32 and
    ncnn int8: top-1, params, MACs, MiB on disk, latency at batch 1 and 32 (ms).

    MXNet rows are oneDNN-fused, best of repeats; ncnn rows are ncnn's runtime, one image per
    call (its batch 32 is 32 calls, so only batch 1 is shown)."""
    rows = []
    t, s = metrics.get("teacher"), metrics["student"]
    if t:
        rows.append(["teacher fp32 (MXNet)", f"{t['top1']:.2f}", human(t.get("params")), human(t.get("macs")),
                     _mib(t.get("bytes")), _lat(t.get("latency_ms"), "b1"), _lat(t.get("latency_ms"), "b32")])
    rows.append(["student fp32 (MXNet)", f"{s['top1']:.2f}", human(s.get("params")), human(s.get("macs")),
                 _mib(s.get("bytes")), _lat(s.get("latency_ms"), "b1"), _lat(s.get("latency_ms"), "b32")])
    q = metrics.get("int8")
    if q:
        rows.append([f"student int8 (MXNet, {q.get('policy', '')})", f"{q['top1']:.2f}",
                     human(s.get("params")), human(s.get("macs")), _mib(q.get("bytes")),
                     _lat(q.get("latency_ms"), "b1"), _lat(q.get("latency_ms"), "b32")])
    formats = (metrics.get("export") or {}).get("formats", {})
    for name, label in (("ncnn", "student fp32 (ncnn)"), ("ncnn-int8", "student int8 (ncnn)")):
        f = formats.get(name)
        if f:
            top1 = f"{f['top1']:.2f}" if isinstance(f.get("top1"), (int, float)) else "-"
            rows.append([label + ("" if f["passed"] else " FAILED"), top1, human(s.get("params")),
                         human(s.get("macs")), _mib(f.get("bytes")), _lat(f.get("latency_ms"), "b1"), "-"])
    title = (f"\n{metrics['name']}: the whole pipeline on {metrics['data']['name']} val "
             f"({metrics['data']['val']} images); MXNet oneDNN-fused, ncnn one image per call")
    lines = [format_table(["model", "top-1 %", "params", "MACs", "MiB", "ms b1", "ms b32"], rows, title)]
    if t and q and t.get("macs") and s.get("macs"):
        lines.append(f"int8 student vs fp32 teacher: {q['top1'] - t['top1']:+.2f} points of top-1, "
                     f"{t['macs'] / s['macs']:.1f}× fewer MACs")
    return "\n".join(lines)
