"""One run, end to end: recipe → data → teacher → student → loop → export → metrics.

The run folder (``output.dir`` or ``runs/<name>``) is the interface every other command reads;
its layout belongs to :mod:`distill.runfolder`.

A ``teacher.recipe`` is resolved here (:func:`resolve_teacher`): trained into its own run folder
on first use, reused while that recipe and the tool that trained it are unchanged
(:func:`distill.runfolder.reuse_check`), and handed to :mod:`distill.teacher` as a checkpoint
prefix.
"""
import datetime
import logging
import os
import platform
import shutil
import time

import mxnet as mx
import numpy as np
from tensorboardX import SummaryWriter

from students import build_student

from .checkpoint import is_legacy_checkpoint, latest_checkpoint
from .data import load_data
from .distributed import create_kvstore, dump_state
from .errors import UserError
from .graphio import (count_param_dict, count_params, load_symbol_block, make_block, pair_files,
                      pair_size, symbol_file)
from .losses import build_loss
from .modelinfo import measure_latency, total_macs
from .pruning import build_modifiers
from .quantize.pipeline import quantize_target
from .recipe import load_recipe, recipe_from_dict, recipe_hash, recipe_to_dict
from .recorders import default_recorders
from .report import summary_table
from .runfolder import PROVENANCE_KEY, RunFolder, reuse_check, tool_provenance
from .stages import Stage, export_stage, pipeline_table
from .taps import tapped_block
from .teacher import load_teacher, resolve_path
from .teacher_cache import SharedCache, TeacherOutputs, digest, split_batches
from .trainer import Term, evaluate, fit

__all__ = ["run_training", "resolve_teacher", "teacher_recipe_prefix", "versions"]
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


def _print(msg):
    print(msg, flush=True)


def recipe_dir_of(recipe):
    """The folder relative paths of ``recipe`` are resolved against."""
    return os.path.dirname(getattr(recipe, "source", "")) or "."


def teacher_recipe_prefix(path, recipe_dir="."):
    """``(prefix, source)`` of the teacher trained by the recipe at ``path``.

    Trained into that recipe's run folder on first use, reused from there while the recipe and
    the tool are unchanged (:func:`~distill.runfolder.reuse_check`: recipe hash, version and
    commit in the folder's ``metrics.json``); else trained again, with one line saying why.
    """
    rpath = resolve_path(path, recipe_dir)
    if not os.path.isfile(rpath):
        raise UserError(f"`teacher.recipe: {path}` does not exist (looked in {recipe_dir} and the "
                        f"current folder).")
    trecipe = load_recipe(rpath)
    folder = RunFolder(trecipe.run_dir)
    kvstore = trecipe.trainer.kvstore
    if kvstore.startswith("dist"):
        # rank 0 trains it alone while the other workers wait: a second KVStore would hang. Set
        # before hashing: the run records the hash of the recipe it trained (kvstore local)
        trecipe.trainer.kvstore = "local"
    ok, why = reuse_check(folder.path, recipe_hash(trecipe), recipe_to_dict(trecipe))
    if ok:
        _LOGGER.info("teacher: reusing the trained teacher in %s (recipe and tool unchanged)",
                     trecipe.run_dir)
    else:
        _LOGGER.info("teacher: %s: training it from %s into %s (cached there for later runs)",
                     why, rpath, trecipe.run_dir)
        if kvstore.startswith("dist"):
            _LOGGER.warning("teacher: %s sets `trainer.kvstore: %s`; the teacher is trained by one "
                            "process (kvstore local), then shared", rpath, kvstore)
        run_training(trecipe, resume="auto", role="teacher")
    return folder.model_prefix, f"recipe {path} ({trecipe.run_dir})"


def resolve_teacher(recipe, data, taps=()):
    """The frozen :class:`~distill.teacher.Teacher` of ``recipe`` (``teacher.recipe`` trained
    first when needed)."""
    rdir = recipe_dir_of(recipe)
    trained = teacher_recipe_prefix(recipe.teacher.recipe, rdir) if recipe.teacher.recipe else None
    return load_teacher(recipe.teacher, data, rdir, taps=taps, trained=trained)


def _build_student(recipe, data, teacher):
    if recipe.student.from_ == "teacher":
        net = make_block(teacher.symbol, teacher.params, teacher.input_name, trainable=True)
        return net, "copy of the teacher"
    net = build_student(recipe.student.model, data.channels, data.num_classes,
                        tuple(data.image_size), max_stride=recipe.student.max_stride,
                        seed=recipe.trainer.seed)
    return net, recipe.student.model


def _teacher_top1(teacher, split, batch_size, shared=None):
    """The teacher's top-1 on ``split``, rounded to 3 decimals: read from ``shared`` (a
    :class:`~distill.teacher_cache.SharedCache`) when an earlier run evaluated this very teacher
    on these very images and labels (in-memory splits only), else evaluated (and stored)."""
    key = None
    if shared is not None and shared.enabled and isinstance(split.x, np.ndarray) and split.y is not None:
        key = digest("teacher-top1", teacher.digest(), split_batches(split.x), np.asarray(split.y))
        top1 = shared.get_value(key)
        if isinstance(top1, (int, float)):
            return top1
    top1 = round(evaluate(teacher.net, split, batch_size), 3)
    if key is not None and np.isfinite(top1):
        shared.put_value(key, top1)
    return top1


def _model_summary(prefix, net_params, input_shape, latency_cfg):
    sym = mx.sym.load(symbol_file(prefix))
    macs = total_macs(sym, (1,) + tuple(input_shape))
    out = {"params": int(net_params), "macs": int(macs), "flops": int(2 * macs),
           "bytes": pair_size(prefix)}
    if latency_cfg.latency:
        out["latency_ms"] = measure_latency(prefix, input_shape, repeats=latency_cfg.latency_repeats)
    return out


def run_training(recipe, resume=False, role="student", trust_checkpoint=False):
    """Run ``recipe`` end to end and return its metrics dict (also written to ``metrics.json``).

    Parameters
    ----------
    recipe : Recipe
    resume : bool or "auto"
        Continue from the newest checkpoint in the run folder, if any; ``"auto"`` resumes only
        an interrupted run started with the same recipe (else starts fresh: a complete run is
        trained again, as a caller that found it stale wants).
    role : str
        ``"teacher"`` when this run trains a teacher for another recipe (only changes messages).
    trust_checkpoint : bool
        ``--trust-checkpoint``: ``resume`` may load a checkpoint of the old pickle format
        (unpickling runs any code the file holds). ``"auto"`` never does: it starts fresh.

    With ``trainer.kvstore: dist_sync`` / ``dist_async`` this process is one worker of a
    ``distill launch`` job: it trains on its shard of the data, and only rank 0 writes the run
    folder (recipe, log, checkpoints, tb/, metrics, export); the other ranks return
    ``{"rank": r, "history": ...}`` after training.
    """
    t_start = time.time()
    run_dir = recipe.run_dir
    folder = RunFolder(run_dir)
    cluster = create_kvstore(recipe.trainer.kvstore)
    root = cluster.is_root
    rdict = recipe_to_dict(recipe)
    h = recipe_hash(recipe)
    tool = tool_provenance()    # now: the code this process imported is what trains
    if resume == "auto":        # a teacher trained for another recipe: resume only the same recipe
        try:
            _check_same_recipe(folder, rdict)
            # ... interrupted: a complete run is trained again only when it may not be reused
            # (its last checkpoint would hand back the stale weights)
            resume = not folder.is_complete()
        except UserError:
            resume = False
        if resume and is_legacy_checkpoint(latest_checkpoint(folder.checkpoints_dir, clean=False)):
            _LOGGER.warning("%s: its checkpoints are in the old pickle format, which is never "
                            "loaded unasked: training it from the start", run_dir)
            resume = False
    if root:                    # the other ranks only read the run folder (their checkpoint)
        _check_writable(run_dir)
        if not resume and os.path.isdir(folder.checkpoints_dir) and os.listdir(folder.checkpoints_dir):
            folder.clear_run_state()   # a fresh run: old checkpoints must not be resumed by accident
        if resume:
            _check_same_recipe(folder, rdict)
        folder.write_recipe_dict(rdict)
    log = _Log(folder.log_path) if root else _print
    what = "teacher run" if role == "teacher" else "run"
    log(f"== {what} {recipe.name!r} → {run_dir} ({datetime.datetime.now():%Y-%m-%d %H:%M:%S})"
        + (f", rank {cluster.rank} of {cluster.num_workers} ({cluster.kind})" if cluster.distributed else ""))

    mx.random.seed(recipe.trainer.seed)
    np.random.seed(recipe.trainer.seed)
    data = load_data(recipe.data, seed=recipe.trainer.seed, part_index=cluster.rank,
                     num_parts=cluster.num_workers)
    shard = f" (shard {cluster.rank + 1} of {cluster.num_workers})" if cluster.num_workers > 1 else ""
    log(f"data {data.name}: {len(data.train.x)} train{shard} / {len(data.val.x)} val, "
        f"{data.channels}×{data.image_size[0]}×{data.image_size[1]}, {data.num_classes} classes")

    teacher = None
    t_taps = _unique(t.teacher_layer for t in recipe.distillation)
    s_taps = _unique(t.student_layer for t in recipe.distillation)
    if recipe.teacher.given and not root:
        cluster.barrier()       # a `teacher.recipe` is trained on first use by rank 0 alone
    if recipe.teacher.given:
        with Stage("teacher (trained once from its recipe, then cached)" if recipe.teacher.recipe
                   else "teacher", log):
            teacher = resolve_teacher(recipe, data, taps=t_taps)
            log(f"teacher: {teacher.source}")

    if recipe.teacher.given and root and cluster.distributed:
        cluster.barrier()       # ... the other ranks then reuse it
    student, student_desc = _build_student(recipe, data, teacher)
    student.hybridize(static_alloc=True, static_shape=True)
    train_net = student
    if s_taps:
        train_net = tapped_block(student, s_taps, where="distillation[].student_layer")
        train_net.hybridize(static_alloc=True, static_shape=True)
    terms = _build_terms(recipe, data, teacher, train_net, s_taps, t_taps)
    teacher_outputs, teacher_cache_s = None, 0.0
    shared = SharedCache() if recipe.trainer.teacher_cache_shared and teacher is not None else None
    if teacher is not None and any(t.block.needs_teacher for t in terms):
        t_cache = time.time()
        # one cache per shard: each worker's train images are its own
        cache_dir = folder.cache_dir if cluster.num_workers == 1 else \
            os.path.join(folder.cache_dir, f"shard-{cluster.rank}-of-{cluster.num_workers}")
        teacher_outputs = TeacherOutputs(
            teacher, data.train.x, recipe.trainer.teacher_cache, bool(recipe.data.augment),
            cache_dir, recipe.trainer.teacher_cache_max_mb,
            recipe.trainer.eval_batch_size, recipe.trainer.progress, shared=shared)
        teacher_cache_s = time.time() - t_cache
        how = "computed live every batch" if teacher_outputs.mode == "off" else \
            f"cached once ({teacher_outputs.mode}, {teacher_outputs.megabytes:.1f} MiB)"
        if teacher_outputs.reused:
            how = (f"reused ({teacher_outputs.megabytes:.1f} MiB): the same teacher's outputs on the "
                   f"same train images, kept by an earlier run in {shared.path}")
        log(f"teacher outputs: {how}")

    modifiers = _build_modifiers(recipe, teacher, log)
    writer = SummaryWriter(folder.tb_dir) if root else None
    try:
        recorders = default_recorders(writer, folder.checkpoints_dir, rdict, log, root=root)
        result = fit(student, train_net, teacher_outputs, data, terms, recipe.trainer,
                     checkpoints=folder.checkpoints_dir, resume=resume, log=log,
                     trust_checkpoint=trust_checkpoint,
                     modifiers=modifiers + recorders, augment=recipe.data.augment, cluster=cluster)
    finally:
        if writer is not None:
            writer.close()
    student = result["student"]   # channel pruning (shrink: each_update) trained a smaller one
    dump_state(cluster, student, modifiers)
    if recipe.trainer.devices != ["cpu"]:
        log(f"trained on {', '.join(recipe.trainer.devices)}; the parameters are back on the CPU: "
            f"int8 calibration, latency and export run there (oneDNN, ncnn)")
    if not root:
        log(f"rank {cluster.rank}: training done; rank 0 writes the run folder {run_dir}")
        return {"rank": cluster.rank, "history": result["history"]}
    # a modifier may replace the trained net at the end (channel pruning: the physically
    # smaller network, rebuilt from the masked one)
    for m in modifiers:
        student = m.finalize(student, data, log)

    # export the student's inference graph (logits only) next to the metrics
    prefix = folder.model_prefix
    student(mx.nd.array(data.val.x[:1]))
    student.export(prefix, epoch=0)
    input_shape = (data.channels,) + tuple(data.image_size)
    metrics = {"name": recipe.name, "recipe_hash": h, "complete": False,
               "data": {"name": data.name, "train": len(data.train.x), "val": len(data.val.x),
                        "classes": data.num_classes, "input_shape": list(input_shape)}}
    if teacher is not None:
        metrics["teacher"] = {"source": teacher.source,
                              "top1": _teacher_top1(teacher, data.val, recipe.trainer.eval_batch_size, shared)}
        tprefix = folder.teacher_prefix
        os.makedirs(os.path.dirname(tprefix), exist_ok=True)
        teacher.net(mx.nd.array(data.val.x[:1]))     # a cached top-1 may leave it never run:
        teacher.net.export(tprefix, epoch=0)           # export() needs one forward first
        metrics["teacher"].update(_model_summary(tprefix, count_param_dict(teacher.params),
                                                 input_shape, recipe.output))
    exported = load_symbol_block(prefix)
    top1 = evaluate(exported, data.val, recipe.trainer.eval_batch_size, fast=True)
    metrics["student"] = {"model": student_desc, "top1": round(top1, 3)}
    metrics["student"].update(_model_summary(prefix, count_params(student), input_shape, recipe.output))
    for m in modifiers:
        metrics["student"].update(m.metrics(student))
    metrics["history"] = result["history"]
    skipped = data.skipped_count()
    if skipped:
        metrics["data"]["unreadable_skipped"] = skipped
        log(f"data {data.name}: {skipped} unreadable image(s) skipped in all (data.skip_corrupt)")
    if cluster.distributed:
        metrics["distributed"] = {"kvstore": cluster.kind, "workers": cluster.num_workers,
                                  "batch_per_worker": recipe.trainer.batch_size,
                                  "global_batch": recipe.trainer.batch_size * cluster.num_workers}
    metrics["train_time_s"] = round(result["train_time_s"], 2)
    metrics["teacher_cache_s"] = round(teacher_cache_s, 2)
    metrics["time_s"] = round(time.time() - t_start, 2)
    metrics["versions"] = versions()
    metrics[PROVENANCE_KEY] = tool   # with recipe_hash: what runfolder.reuse_check compares
    metrics["complete"] = True
    folder.write_metrics(metrics)
    log(summary_table(metrics))
    if role != "teacher" and (recipe.quantization.enabled or recipe.export.enabled):
        if recipe.quantization.enabled:
            with Stage("int8 calibration (quantization.enabled)", log):
                metrics["int8"] = quantize_target(run_dir, log=log)
        if recipe.export.enabled:
            with Stage(f"export ({', '.join(recipe.export.formats)}), each checked in its runtime", log):
                metrics["export"] = export_stage(run_dir, recipe.export, folder.metrics_path, log=log)
        log(pipeline_table(metrics))
    log(f"run folder: {run_dir}  ({os.path.basename(folder.metrics_path)}, "
        f"{' + '.join(os.path.basename(f) for f in pair_files(folder.model_prefix))}, tb/)")
    return metrics


def _unique(names):
    out = []
    for n in names:
        if n and n not in out:
            out.append(n)
    return out


def _build_terms(recipe, data, teacher, train_net, s_taps, t_taps):
    """One :class:`~distill.trainer.Term` per recipe loss, wired to its student/teacher outputs."""
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
        if block.hybridizable:          # one cached graph per term, not a handful of ops per step
            block.hybridize(static_alloc=True)
        seen[t.loss] = seen.get(t.loss, 0) + 1
        name = t.loss if counts[t.loss] == 1 else f"{t.loss}{seen[t.loss]}"
        terms.append(Term(name, t.weight, block, s_idx, t_idx))
    return terms


def _build_modifiers(recipe, teacher, log):
    """Modifiers from the recipe's sections (pruning schedules and mask keeping)."""
    if not recipe.pruning.enabled:
        return []
    return build_modifiers(recipe, teacher=teacher, log=log)


def _check_same_recipe(folder, rdict):
    """``--resume`` only continues a run started with the same recipe (same hash)."""
    if not folder.has_recipe():
        return
    old = recipe_from_dict(folder.read_recipe_dict(), folder.recipe_path)
    new = recipe_from_dict(rdict)
    if recipe_hash(old) != recipe_hash(new):
        od, nd = recipe_to_dict(old), recipe_to_dict(new)
        diff = sorted(k for k in set(od) | set(nd) if k != "output" and od.get(k) != nd.get(k))
        raise UserError(f"--resume: the recipe differs from the one this run folder ({folder.path}) was "
                        f"started with (sections: {', '.join(diff)}). Resume with the same recipe, or "
                        f"start a fresh run without --resume (or with another `output.dir`).")
