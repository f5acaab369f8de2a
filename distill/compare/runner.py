"""Run a comparison recipe: every variant × seed trained (or reused), quantized, exported.

Each run goes to ``<out>/<variant>-s<seed>``. A run is reused when
:func:`~distill.runfolder.reuse_check` allows it: its folder is complete (``metrics.json`` marked
complete) for the same recipe (same :func:`~distill.recipe.recipe_hash`) and was written by the
same tool (version and commit), so an interrupted comparison picks up where it stopped (a run
interrupted mid-training resumes from its last checkpoint); a complete run that may not be
reused is trained again, with one line saying what changed. A variant whose run recipe is
exactly one trained elsewhere (the teacher, trained once into ``runs/teacher_mnist`` for every
KD variant) has that run copied in instead of trained twice. Teachers named by
``teacher.recipe`` are trained first.

One progress bar runs over the runs; each run's own bars (epochs, teacher outputs) show inside.
"""
import contextlib
import logging
import os
import shutil
import sys

from ..export.formats import FORMATS
from ..recipe import recipe_hash, recipe_to_dict
from ..run import recipe_dir_of, run_training, teacher_recipe_prefix
from ..runfolder import RunFolder, reuse_check
from .collect import has_int8, read_run

__all__ = ["run_comparison", "reusable_run", "exported"]
_LOGGER = logging.getLogger(__name__)


def _copy_run(src, dst, rdict):
    """Copy the finished run ``src`` into ``dst`` (model, teacher pair, metrics, log; not its
    checkpoints, event files or caches), with ``dst``'s resolved recipe."""
    skip = {os.path.basename(p) for p in (src.checkpoints_dir, src.tb_dir, src.cache_dir,
                                           src.export_dir, src.sensitivity_dir)}
    if dst.exists():
        shutil.rmtree(dst.path)
    shutil.copytree(src.path, dst.path, ignore=lambda d, names: [n for n in names if
                                                                 d == src.path and n in skip])
    dst.write_recipe_dict(rdict)


def reusable_run(recipe, own_dir=None, log=print):
    """The folder of a complete run of ``recipe`` that may be reused
    (:func:`~distill.runfolder.reuse_check`): its ``output.dir``, else (copied there)
    ``own_dir``, the folder the variant's recipe names itself (where a teacher recipe's run is
    cached); ``None`` when it must be trained. A complete run refused is named, with what
    changed, in one line."""
    h, rdict = recipe_hash(recipe), recipe_to_dict(recipe)
    target = RunFolder(recipe.run_dir)
    ok, why = reuse_check(target.path, h, rdict)
    if ok:
        log(f"compare: reusing {target.path} (complete, same recipe, same tool)")
        return target.path
    refused = [why] if target.is_complete() else []
    default = RunFolder(own_dir) if own_dir is not None else None
    if default is not None and os.path.abspath(default.path) != os.path.abspath(target.path):
        ok, own_why = reuse_check(default.path, h, rdict)
        if ok:
            log(f"compare: {default.path} is a complete run of the same recipe by the same tool: "
                f"copied to {target.path}")
            _copy_run(default, target, rdict)
            return target.path
        refused += [own_why] if default.is_complete() else []
    if refused:
        log(f"compare: {'; '.join(refused)}: training it again")
    return None


def exported(folder, formats):
    """Every file of ``formats`` is in the run's export folder and newer than its model."""
    model_time = os.path.getmtime(folder.model_params_path)
    for name in formats:
        for f in FORMATS.get(name).files:
            p = os.path.join(folder.export_dir, f)
            if not os.path.isfile(p) or os.path.getmtime(p) < model_time:
                return False
    return True


def _run_one(comp, variant, seed, log):
    """Train (or reuse), quantize, export one run; its folder."""
    recipe = variant.run_recipe(seed, comp.run_dir(variant, seed))
    path = reusable_run(recipe, variant.run_recipe(seed).run_dir, log)
    if path is None:
        run_training(recipe, resume="auto")
        path = recipe.run_dir
    folder = RunFolder(path)
    redo_export = False
    if variant.int8 and not has_int8(folder):
        from ..quantize.pipeline import quantize_target
        # per-layer timing and the sensitivity table are for `distill quantize`'s own report
        quantize_target(path, overrides={"layer_latency": False}, teacher=False,
                        sensitivity=False, log=log)
        redo_export = True            # ncnn-int8 keeps the layers this calibration kept fp32
    if variant.export and (redo_export or not exported(folder, variant.export)):
        from ..export.core import export_run
        from ..export.options import ExportOptions
        card = export_run(path, formats=list(variant.export), options=ExportOptions(latency=False),
                          raise_on_failure=False)
        for name, e in card["exports"].items():
            if not e["check"]["passed"]:
                _LOGGER.warning("compare: %s export of %s failed its check (%s); its files are "
                                "timed anyway", name, path, e["check"]["message"])
    return path


def _teachers_first(comp, seeds, log):
    done = set()
    for v in comp.variants:
        for s in v.seeds(seeds):
            recipe = v.run_recipe(s, comp.run_dir(v, s))
            key = (recipe.teacher.recipe, recipe_dir_of(recipe))
            if recipe.teacher.recipe and key not in done:
                done.add(key)
                teacher_recipe_prefix(*key)


@contextlib.contextmanager
def _bar_safe_output():
    """Prints and log lines go above the progress bars instead of through them."""
    from tqdm.contrib import DummyTqdmFile
    from tqdm.contrib.logging import logging_redirect_tqdm
    with contextlib.redirect_stdout(DummyTqdmFile(sys.stdout)), logging_redirect_tqdm():
        yield


def run_comparison(comp, seeds=1, log=print):
    """Every variant with seeds ``0..seeds-1``; the :class:`~distill.compare.collect.Record` of
    each run, in order (variant by variant)."""
    from tqdm import tqdm
    os.makedirs(comp.out, exist_ok=True)
    plan = [(v, s) for v in comp.variants for s in v.seeds(seeds)]
    records = []
    with _bar_safe_output():
        _teachers_first(comp, seeds, log)
        with tqdm(total=len(plan), desc=f"compare {comp.name}", unit="run", file=sys.stderr,
                  dynamic_ncols=True, leave=True) as bar:
            for v, s in plan:
                bar.set_postfix_str(f"{v.name}, seed {s}")
                path = _run_one(comp, v, s, log)
                records.append(read_run(path, label=v.name))
                bar.update(1)
    return records
