"""One run, end to end: recipe → data → teacher → student → loop → export → metrics.

The run folder (``output.dir`` or ``runs/<name>``) is the interface every other command reads::

    recipe.yaml            the resolved recipe (extends and --set applied)
    checkpoints/           epoch-NNNN.ckpt, written atomically
    tb/                    tensorboardX event files
    model-symbol.json      the exported student (inference graph, logits)
    model-0000.params
    metrics.json           teacher/student top-1, params, MACs, latency, history
    train.log              what was printed
"""
import datetime
import json
import logging
import os
import platform
import shutil
import sys
import time

import mxnet as mx
import numpy as np
import yaml

from .checkpoint import atomic_write_bytes
from .errors import UserError
from .recipe import recipe_hash, recipe_to_dict

__all__ = ["run_training", "versions"]
_LOGGER = logging.getLogger(__name__)


def versions():
    """Library versions, for metrics and model cards."""
    import gluoncv
    import distill
    return {"python": platform.python_version(), "mxnet": mx.__version__, "numpy": np.__version__,
            "gluoncv": gluoncv.__version__, "distill": getattr(distill, "__version__", "0")}


def _check_writable(run_dir):
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, ".write-test")
        with open(probe, "wb") as f:
            f.write(b"0" * 1024)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"output folder {run_dir} is not writable ({e.strerror}). Set `output.dir` "
                        f"to a folder you can write to, or free disk space.") from None
    free = shutil.disk_usage(run_dir).free
    if free < 50 * 2**20:
        raise UserError(f"output folder {run_dir} has only {free // 2**20} MiB free; a run needs "
                        f"at least 50 MiB for checkpoints and exports. Free space or set `output.dir`.")


class _Log:
    """Print to the terminal and append to ``train.log``."""

    def __init__(self, path):
        self.path = path

    def __call__(self, msg):
        print(msg, flush=True)
        with open(self.path, "a") as f:
            f.write(msg + "\n")


def _build_student(recipe, data, teacher):
    from students import build_student
    from .teacher import make_block
    if recipe.student.from_ == "teacher":
        net = make_block(teacher.symbol, teacher.params, teacher.input_name, trainable=True)
        return net, "copy of the teacher"
    net = build_student(recipe.student.model, data.channels, data.num_classes,
                        tuple(data.image_size), max_stride=recipe.student.max_stride,
                        seed=recipe.trainer.seed)
    return net, recipe.student.model


def _model_summary(prefix, net_params, input_shape, latency_cfg):
    from .modelinfo import file_size, measure_latency, total_macs
    sym = mx.sym.load(prefix + "-symbol.json")
    macs = total_macs(sym, (1,) + tuple(input_shape))
    out = {"params": int(net_params), "macs": int(macs), "flops": int(2 * macs),
           "bytes": file_size(prefix + "-symbol.json", prefix + "-0000.params")}
    if latency_cfg.latency:
        out["latency_ms"] = measure_latency(prefix, input_shape, repeats=latency_cfg.latency_repeats)
    return out


def run_training(recipe, resume=False, role="student"):
    """Run ``recipe`` end to end and return its metrics dict (also written to ``metrics.json``).

    Parameters
    ----------
    recipe : Recipe
    resume : bool or "auto"
        Continue from the newest checkpoint in the run folder, if any; ``"auto"`` resumes only
        when the folder was started with the same recipe (else starts fresh).
    role : str
        ``"teacher"`` when this run trains a teacher for another recipe (only changes messages).
    """
    from tensorboardX import SummaryWriter
    from .data import load_data
    from .modelinfo import count_params
    from .report import summary_table
    from .teacher import load_teacher
    from .trainer import evaluate, fit

    t_start = time.time()
    run_dir = recipe.run_dir
    _check_writable(run_dir)
    rdict = recipe_to_dict(recipe)
    h = recipe_hash(recipe)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if resume == "auto":        # a teacher trained for another recipe: resume only the same recipe
        try:
            _check_same_recipe(run_dir, rdict)
            resume = True
        except UserError:
            resume = False
    if not resume and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        shutil.rmtree(ckpt_dir)          # a fresh run: old checkpoints must not be resumed by accident
        shutil.rmtree(os.path.join(run_dir, "tb"), ignore_errors=True)
        for f in ("train.log", "metrics.json"):
            if os.path.exists(os.path.join(run_dir, f)):
                os.unlink(os.path.join(run_dir, f))
    if resume:
        _check_same_recipe(run_dir, rdict)
    atomic_write_bytes(os.path.join(run_dir, "recipe.yaml"),
                       yaml.safe_dump(rdict, sort_keys=False).encode())
    log = _Log(os.path.join(run_dir, "train.log"))
    what = "teacher run" if role == "teacher" else "run"
    log(f"== {what} {recipe.name!r} → {run_dir} ({datetime.datetime.now():%Y-%m-%d %H:%M:%S})")

    mx.random.seed(recipe.trainer.seed)
    np.random.seed(recipe.trainer.seed)
    data = load_data(recipe.data, seed=recipe.trainer.seed)
    log(f"data {data.name}: {len(data.train.x)} train / {len(data.val.x)} val, "
        f"{data.channels}×{data.image_size[0]}×{data.image_size[1]}, {data.num_classes} classes")

    teacher = None
    t_taps = _unique(t.teacher_layer for t in recipe.distillation)
    s_taps = _unique(t.student_layer for t in recipe.distillation)
    if recipe.teacher.given:
        recipe_dir = os.path.dirname(getattr(recipe, "source", "")) or "."
        teacher = load_teacher(recipe.teacher, data, recipe_dir, taps=t_taps)
        log(f"teacher: {teacher.source}")

    student, student_desc = _build_student(recipe, data, teacher)
    student.hybridize(static_alloc=True, static_shape=True)
    train_net = student
    if s_taps:
        from .taps import tapped_block
        train_net = tapped_block(student, s_taps, where="distillation[].student_layer")
        train_net.hybridize(static_alloc=True, static_shape=True)
    terms = _build_terms(recipe, data, teacher, train_net, s_taps, t_taps)
    teacher_outputs, teacher_cache_s = None, 0.0
    if teacher is not None and any(t.block.needs_teacher for t in terms):
        from .teacher_cache import TeacherOutputs
        t_cache = time.time()
        teacher_outputs = TeacherOutputs(
            teacher, data.train.x, recipe.trainer.teacher_cache, bool(recipe.data.augment),
            os.path.join(run_dir, ".cache"), recipe.trainer.teacher_cache_max_mb,
            recipe.trainer.eval_batch_size, recipe.trainer.progress)
        teacher_cache_s = time.time() - t_cache
        log(f"teacher outputs: {'computed live every batch' if teacher_outputs.mode == 'off' else f'cached once ({teacher_outputs.mode}, {teacher_outputs.megabytes:.1f} MiB)'}")

    modifiers = _build_modifiers(recipe, teacher, log)
    writer = SummaryWriter(os.path.join(run_dir, "tb"))
    try:
        result = fit(student, train_net, teacher_outputs, data, terms, recipe.trainer, run_dir,
                     writer, resume=resume, recipe_dict=rdict, log=log, modifiers=modifiers,
                     augment=recipe.data.augment)
    finally:
        writer.close()
    # a modifier may replace the trained net at the end (channel pruning: the physically
    # smaller network, rebuilt from the masked one)
    for m in modifiers:
        if hasattr(m, "finalize"):
            student = m.finalize(student, data, log)

    # export the student's inference graph (logits only) next to the metrics
    prefix = os.path.join(run_dir, "model")
    student(mx.nd.array(data.val.x[:1]))
    student.export(prefix, epoch=0)
    input_shape = (data.channels,) + tuple(data.image_size)
    metrics = {"name": recipe.name, "recipe_hash": h, "complete": False,
               "data": {"name": data.name, "train": len(data.train.x), "val": len(data.val.x),
                        "classes": data.num_classes, "input_shape": list(input_shape)}}
    if teacher is not None:
        metrics["teacher"] = {"source": teacher.source,
                              "top1": round(evaluate(teacher.net, data.val, recipe.trainer.eval_batch_size), 3)}
        tprefix = os.path.join(run_dir, ".teacher", "model")
        os.makedirs(os.path.dirname(tprefix), exist_ok=True)
        teacher.net.export(tprefix, epoch=0)
        metrics["teacher"].update(_model_summary(tprefix, _n_params(teacher.params),
                                                 input_shape, recipe.output))
    from .modelinfo import load_symbol_block
    exported = load_symbol_block(prefix)
    top1 = evaluate(exported, data.val, recipe.trainer.eval_batch_size)
    metrics["student"] = {"model": student_desc, "top1": round(top1, 3)}
    metrics["student"].update(_model_summary(prefix, count_params(student), input_shape, recipe.output))
    for m in modifiers:
        if hasattr(m, "metrics"):
            metrics["student"].update(m.metrics(student))
    metrics["history"] = result["history"]
    metrics["train_time_s"] = round(result["train_time_s"], 2)
    metrics["teacher_cache_s"] = round(teacher_cache_s, 2)
    metrics["time_s"] = round(time.time() - t_start, 2)
    metrics["versions"] = versions()
    metrics["complete"] = True
    atomic_write_bytes(os.path.join(run_dir, "metrics.json"),
                       json.dumps(metrics, indent=2, allow_nan=True).encode())
    log(summary_table(metrics))
    if recipe.quantization.enabled and role != "teacher":
        from .quantize.pipeline import quantize_target
        log("\n== int8 calibration (quantization.enabled)")
        metrics["int8"] = quantize_target(run_dir, log=log)
    log(f"run folder: {run_dir}  (metrics.json, model-symbol.json + model-0000.params, tb/)")
    return metrics


def _unique(names):
    out = []
    for n in names:
        if n and n not in out:
            out.append(n)
    return out


def _build_terms(recipe, data, teacher, train_net, s_taps, t_taps):
    """One :class:`~distill.trainer.Term` per recipe loss, wired to its student/teacher outputs."""
    from .losses import build_loss
    from .trainer import Term
    x = mx.nd.array(data.train.x[:2])
    s_outs = train_net(x)
    s_shapes = [o.shape for o in (s_outs if isinstance(s_outs, (list, tuple)) else [s_outs])]
    t_shapes = [o.shape for o in teacher.outputs(x)] if teacher is not None else []
    counts = {}
    for t in recipe.distillation:
        counts[t.loss] = counts.get(t.loss, 0) + 1
    terms, seen = [], {}
    for i, t in enumerate(recipe.distillation):
        s_idx = 1 + s_taps.index(t.student_layer) if t.student_layer else 0
        t_idx = 1 + t_taps.index(t.teacher_layer) if t.teacher_layer else 0
        block = build_loss(t, s_shapes[s_idx], t_shapes[t_idx] if t_shapes else None)
        block.initialize(mx.init.Xavier(), ctx=mx.cpu())
        seen[t.loss] = seen.get(t.loss, 0) + 1
        name = t.loss if counts[t.loss] == 1 else f"{t.loss}{seen[t.loss]}"
        terms.append(Term(name, t.weight, block, s_idx, t_idx))
    return terms


def _build_modifiers(recipe, teacher, log):
    """Modifiers from the recipe's sections (pruning schedules and mask keeping)."""
    if not recipe.pruning.enabled:
        return []
    from .pruning import build_modifiers
    return build_modifiers(recipe, teacher=teacher, log=log)


def _n_params(params):
    from .modelinfo import _AUX_SUFFIXES
    return sum(int(np.prod(v.shape)) for k, v in params.items() if not k.endswith(_AUX_SUFFIXES))


def _check_same_recipe(run_dir, rdict):
    """``--resume`` only continues a run started with the same recipe (same hash)."""
    from .recipe import recipe_from_dict
    saved = os.path.join(run_dir, "recipe.yaml")
    if not os.path.isfile(saved):
        return
    with open(saved) as f:
        old = recipe_from_dict(yaml.safe_load(f), saved)
    new = recipe_from_dict(rdict)
    if recipe_hash(old) != recipe_hash(new):
        od, nd = recipe_to_dict(old), recipe_to_dict(new)
        diff = sorted(k for k in set(od) | set(nd) if k != "output" and od.get(k) != nd.get(k))
        raise UserError(f"--resume: the recipe differs from the one this run folder ({run_dir}) was "
                        f"started with (sections: {', '.join(diff)}). Resume with the same recipe, or "
                        f"start a fresh run without --resume (or with another `output.dir`).")
