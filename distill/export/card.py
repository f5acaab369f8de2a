"""The model card next to every export: ``model_card.json`` (complete) + ``MODEL_CARD.md`` (to read).

It says what the files are, how to feed them (input layout and normalization), how each runtime
agreed with MXNet on the test split and how fast it ran, where the model came from (recipe and
its hash, data, teacher, student, sparsity, layers kept in fp32 by int8), how the int8
calibration images were chosen, and the tool and library versions.
"""
import datetime
import json
import logging
import os
import sys

import numpy as np

from ..checkpoint import atomic_write_bytes
from ..runfolder import METRICS_FILE, RECIPE_FILE
from .options import options_dict

__all__ = ["build_card", "write_card", "render_markdown", "weight_sparsity"]
_LOGGER = logging.getLogger(__name__)

_WEIGHT_OPS = ("Convolution", "FullyConnected", "Deconvolution")


def weight_sparsity(symbol, params):
    """Measured zeros in the weights of convolutions and dense layers.

    Returns
    -------
    dict
        ``weights`` (count), ``zeros`` (count), ``fraction`` (zeros / weights).
    """
    graph = json.loads(symbol.tojson())
    nodes = graph["nodes"]
    names = set()
    for n in nodes:
        if n["op"] in _WEIGHT_OPS and len(n["inputs"]) > 1:
            names.add(nodes[n["inputs"][1][0]]["name"])
    total = zeros = 0
    for name in names:
        if name in params:
            w = params[name].asnumpy()
            total += w.size
            zeros += int((w == 0).sum())
    return {"weights": int(total), "zeros": int(zeros), "fraction": round(zeros / total, 6) if total else 0.0}


def _library_versions():
    # From the installed distributions, not distill.run.versions(): the run command drives
    # export (distill.stages), so importing it from here would close an import cycle.
    import platform
    from .. import __version__
    from .runtimes import package_versions
    found = package_versions("mxnet", "numpy", "gluoncv", "distill", "onnx", "onnxruntime", "ncnn", "pnnx")
    return {"python": platform.python_version(), **found, "distill": found["distill"] or __version__}


def _sparsity(metrics, source):
    """The pruning record of the run (``student.sparsity``, ``student.pruning`` without its long
    lists) when the run's student is exported, and the zeros measured in the exported weights."""
    found = {}
    if source.kind == "student":
        s = metrics.get("student") or {}
        if s.get("sparsity") is not None:
            found["sparsity"] = s["sparsity"]
        if isinstance(s.get("pruning"), dict):
            found["pruning"] = {k: v for k, v in s["pruning"].items() if not isinstance(v, (list, dict))}
    found["measured"] = weight_sparsity(source.symbol, source.params)
    return found


def build_card(job, reference, results, previous, run_dir):
    """The model card as plain data.

    Parameters
    ----------
    job : ExportJob
    reference : dict
        MXNet on the test split: ``top1``, ``latency_ms``.
    results : dict
        Format name → result of this export.
    previous : dict
        Format name → result kept from an earlier export of the same model into this folder.
    run_dir : str
    """
    from ..recipe import recipe_hash, recipe_to_dict
    from .calib import ncnn_int8_commands
    d, m, src = job.data, job.metrics, job.source
    c, h, w = job.input_shape
    role = {"student": "student", "teacher": "teacher", "model": "model"}[src.kind]
    exports = dict(previous)
    exports.update(results)
    calib = None
    if any(n in results for n in ("ncnn", "ncnn-int8", "onnx-int8")):
        idx = job.calibration()
        list_file = (results.get("ncnn", {}).get("calibration_list")
                     or results.get("ncnn-int8", {}).get("calibration_list"))
        calib = {"split": "train", "images": int(len(idx)), "seed": job.recipe.trainer.seed,
                 "rule": "first N of numpy RandomState(trainer.seed).permutation(len(train)) "
                         "(the sample distill quantize calibrates with)",
                 "indices": [int(i) for i in idx], "mode": job.calib_mode}
        if list_file:
            calib.update({"folder": os.path.dirname(list_file), "list": list_file,
                          "ncnn_int8_commands": ncnn_int8_commands(list_file, d.mean, d.std,
                                                                   d.image_size, d.channels)})
    int8 = job.int8_section()
    card = {
        "name": job.recipe.name,
        "run_dir": run_dir,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": {"role": role, "source": src.prefix, "epoch": src.epoch, "sha256": src.sha256,
                  "removed_head": src.removed_head, "removed_params": src.removed_params,
                  "logits_layer": src.symbol.list_outputs()[0]},
        "input": {"name": "data", "shape": [1, c, h, w], "layout": "NCHW", "dtype": "float32",
                  "channels": "gray" if c == 1 else "RGB",
                  "normalization": "(pixels / 255 - mean) / std, per channel",
                  "mean": d.mean, "std": d.std},
        "output": {"name": "logits", "shape": [1, d.num_classes], "classes": d.class_names,
                   "meaning": "unnormalized class scores (apply softmax for probabilities)"},
        "recipe": recipe_to_dict(job.recipe), "recipe_hash": recipe_hash(job.recipe),
        "data": {"name": d.name, "source": d.calib_source, "train": int(len(d.train.x)),
                 "test": int(len(d.val.x)), "classes": d.num_classes,
                 "image_size": list(d.image_size), "channels": d.channels},
        "teacher": m.get("teacher") or ({"source": src.prefix} if role == "teacher" else None),
        "student": m.get("student"),
        "sparsity": _sparsity(m, src),
        "int8": ({k: int8.get(k) for k in ("top1", "excluded", "calib_mode", "calib_images",
                                           "calib_seed", "policy", "granularity", "latency_ms")}
                 if int8 else None),
        "metrics": {k: m[k] for k in ("recipe_hash", "complete", "train_time_s") if k in m},
        "test_split": {"images": int(len(job.x_test)), "what": f"{d.name} held-out split"},
        "reference": reference,
        "exports": exports,
        "export_run": {"formats": list(results), "out_dir": job.out_dir, "threads": job.threads,
                       "repeats": job.repeats,
                       "options": options_dict(job.options), "command": " ".join(sys.argv)},
        "calibration": calib,
        "versions": _library_versions(),
    }
    if m.get("teacher"):
        card["metrics"]["teacher_top1"] = m["teacher"].get("top1")
    if m.get("student"):
        card["metrics"]["student_top1"] = m["student"].get("top1")
    if m.get("recipe_hash") and m["recipe_hash"] != card["recipe_hash"]:
        card["metrics"]["note"] = (f"{METRICS_FILE} records recipe hash {m['recipe_hash']}; {RECIPE_FILE} "
                                   f"as read now hashes to {card['recipe_hash']} (an edited recipe, or "
                                   f"keys added to the recipe format since the run)")
    return card


def _f(v, fmt="{:.2f}"):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return fmt.format(v)


def render_markdown(card):
    """``MODEL_CARD.md``: the card for people."""
    inp, out, ref = card["input"], card["output"], card["reference"]
    lines = [f"# Model card: {card['name']} ({card['model']['role']})", "",
             f"Exported {card['created']} by `distill export` from `{card['model']['source']}` "
             f"(params sha256 `{card['model']['sha256'][:16]}…`), recipe hash `{card['recipe_hash']}`.",
             "", "## Input and output", "",
             f"* input `data`: float32 {inp['layout']} {inp['shape']} ({inp['channels']}), "
             f"normalized as {inp['normalization']}: mean {inp['mean']}, std {inp['std']}.",
             f"* output `logits`: {out['shape']}, {out['meaning']}; classes {out['classes']}.",
             "* ncnn: input blob `in0` (one C×H×W image, no batch axis), output blob `out0`.", "",
             "## Files, agreement with MXNet and speed", "",
             f"Test split: {card['test_split']['images']} images ({card['test_split']['what']}). "
             f"MXNet (reference, oneDNN-fused fp32): top-1 {_f(ref.get('top1'))}%, batch-1 latency "
             f"{_f((ref.get('latency_ms') or {}).get('b1'), '{:.3f}')} ms. Threads: "
             f"{card['export_run']['threads']}.", "",
             "| format | files | MiB | runtime | top-1 % | max abs Δ vs MXNet | top-1 agreement % | ms b1 | check |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, e in card["exports"].items():
        p = e.get("parity") or {}
        lat = (e.get("latency_ms") or {}).get("b1")
        if name == "mxnet":
            lat = (ref.get("latency_ms") or {}).get("b1")
        check = "passed" if e["check"]["passed"] else f"**FAILED**: {e['check']['message']}"
        lines.append(f"| {name} | {', '.join(e['files'])} | {e['bytes'] / 2**20:.2f} | {e.get('runtime', '')} "
                     f"| {_f(p.get('top1'))} | {_f(p.get('max_abs_diff'), '{:.2e}')} "
                     f"| {_f(p.get('top1_agreement'))} | {_f(lat, '{:.3f}')} | {check} |")
    lines.append("")
    for name, e in card["exports"].items():
        lines.append(f"* **{name}**: {e['check']['rule']}.")
    for name, e in card["exports"].items():
        lines += e.get("card_notes") or []          # a format's own section (ncnn-int8)
    lines += ["", "## Where it came from", ""]
    d = card["data"]
    lines.append(f"* data: `{d['name']}`: {d['source']}; {d['train']} train / {d['test']} test images, "
                 f"{d['classes']} classes, {d['channels']}×{d['image_size'][0]}×{d['image_size'][1]}.")
    if card.get("teacher"):
        t = card["teacher"]
        lines.append(f"* teacher: {t.get('source', '-')}, top-1 {_f(t.get('top1'))}%.")
    if card.get("student"):
        s = card["student"]
        lines.append(f"* student: {s.get('model', '-')}, top-1 {_f(s.get('top1'))}%, "
                     f"{s.get('params', '-')} parameters, {s.get('macs', '-')} MACs per image.")
    sp = card["sparsity"]
    line = (f"* sparsity: {sp['measured']['fraction'] * 100:.2f}% of conv/dense weights are zero "
            f"(measured in the exported weights)")
    if sp.get("sparsity") is not None:
        line += f"; pruning removed {sp['sparsity'] * 100:.1f}% of the parameters"
    p = sp.get("pruning") or {}
    if p:
        line += (f" ({p.get('granularity', '?')} pruning, {p.get('criterion', '?')}, "
                 f"{'physically smaller' if p.get('physically_smaller') else 'masked, dense size'}; "
                 f"{p.get('params_before', '?')} parameters and {p.get('macs_before', '?')} MACs before)")
    lines.append(line + ".")
    if card["model"]["removed_head"] or card["model"]["removed_params"]:
        lines.append(f"* removed for inference: head {card['model']['removed_head'] or 'none'}, "
                     f"{len(card['model']['removed_params'])} unused parameters.")
    if card.get("int8"):
        q = card["int8"]
        lines.append(f"* MXNet int8 (`distill quantize`): top-1 {_f(q.get('top1'))}%, layers kept in fp32: "
                     f"{', '.join(q.get('excluded') or []) or 'none'}; calibration {q.get('calib_mode')} on "
                     f"{q.get('calib_images')} train images.")
    lines.append(f"* recipe: hash `{card['recipe_hash']}`; the full resolved recipe is in model_card.json.")
    cal = card.get("calibration")
    if cal:
        lines += ["", "## int8 calibration images", "",
                  f"{cal['images']} train images ({cal['rule']}, seed {cal['seed']}); onnxruntime int8 "
                  f"used them with {cal['mode']} calibration."]
        if cal.get("list"):
            lines += [f"They are in `{cal['folder']}/` (PNG, before normalization) and listed in "
                      f"`{cal['list']}`. To build an int8 ncnn model with ncnn's own tools (from an ncnn "
                      f"release or build, not the Python wheel), run in this folder:", "", "```sh"]
            lines += cal["ncnn_int8_commands"] + ["```"]
    lines += ["", "## Versions", "",
              ", ".join(f"{k} {v}" for k, v in card["versions"].items() if v), ""]
    return "\n".join(lines)


def write_card(out_dir, card):
    """Write ``model_card.json`` and ``MODEL_CARD.md`` into ``out_dir`` (atomically)."""
    for name, text in (("model_card.json", json.dumps(card, indent=2, allow_nan=True, default=_jsonable)),
                       ("MODEL_CARD.md", render_markdown(card))):
        path = os.path.join(out_dir, name)
        atomic_write_bytes(path, text.encode())
        os.chmod(path, 0o644)                 # shipped with the model: readable like the model files


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
