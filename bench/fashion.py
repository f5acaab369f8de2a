"""The Fashion-MNIST benchmark: the comparison and the loss comparison, over seeds, paired tests.

1. ``distill compare recipes/compare_fashion.yaml --seeds N``: the ResNet-20 teacher
   (``recipes/teacher_fashion.yaml``, 57,000 training images, trained once), pruned copies at
   50/75/90% of the channels and MobileNetV2-0.5 / ShuffleNetV2 students, each with KD and with
   labels only, int8 (MXNet and ncnn) of the teacher and the best students.
2. ``distill compare recipes/compare_losses_fashion.yaml --seeds N``: KD, DKD, DIST, KD with
   logit standardisation and labels only on the pruned copy at 90% and MobileNetV2-0.5 (the KD
   and labels-only runs of part 1 are reused).

Every accuracy is the last epoch's on the 10,000 test images; the selection holdout is 3,000
training images. Complete runs are reused (``distill compare``'s rule: same recipe, same tool
source), so this can be run in parts and interrupted. The tables, with mean ± std over the seeds
and each pair's paired t-test over seeds and McNemar's test on pooled per-image predictions, are
``runs/compare_fashion/compare.*``.

Targets: the teacher ≥ 93.0% on the test set; the runs' training time, summed, ≤ 3 h (measured
on this machine; a reused run counts with the time it took).

The data come from Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``,
files in ``/usr/share/datasets/fashion-mnist``); nothing downloads. Without them the bench fails
with one line saying how to install them.

    .venv/bin/python bench/fashion.py                  # both parts, 3 seeds (hours on 2 cores)
    .venv/bin/python bench/fashion.py --seeds 1 --only compare
    .venv/bin/python bench/fashion.py --smoke          # the same code path on tiny idx files, seconds
"""
import argparse
import json
import os
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import _smoke  # noqa: E402
from bench.targets import target  # noqa: E402

from distill.errors import UserError  # noqa: E402

PARTS = {"compare": "compare_fashion.yaml", "losses": "compare_losses_fashion.yaml"}
BASES = ("teacher_fashion", "prune_channel_fashion", "student_fashion")
TEACHER_TARGET = 93.0
HOURS_TARGET = 3.0
#: --smoke: the variants kept (teacher, and one pair), two seeds, tiny idx files
SMOKE_VARIANTS = ("teacher", "pruned 90% + KD", "pruned 90% + labels", "pruned 90% + DKD")
SMOKE_SEEDS = 2


def data_missing(root=None):
    """``None`` when the four Fashion-MNIST files are in ``root`` (default: Debian's folder), else
    the error paragraph (path and how to install them)."""
    from distill.data.fashion_mnist import DEFAULT_ROOT, FILES, read_idx
    root = root or DEFAULT_ROOT
    try:
        for key, f in FILES.items():
            if key.endswith("labels"):         # the small files: readable and complete
                read_idx(os.path.join(root, f), 1)
            elif not os.path.isfile(os.path.join(root, f)):
                raise UserError(f"fashion_mnist: {os.path.join(root, f)} is missing. Install the "
                                f"data with `apt-get install dataset-fashion-mnist`, or put the "
                                f"four files from the Zalando repository into {root}.")
    except UserError as e:
        return str(e)
    return None


def smoke_recipes(work):
    """Shrunk copies of the benchmark's recipes in ``work``: tiny idx files as ``data.root``, one
    epoch, run folders under ``work/runs``; the comparison recipes keep :data:`SMOKE_VARIANTS`
    and the pairs among them. Their paths by part."""
    from distill.recipe import load_recipe, recipe_to_dict
    root = _smoke.write_fashion(os.path.join(work, "fashion"), n_train=240, n_test=40)
    for name in BASES:
        sets = [f"data.root={json.dumps(root)}", "data.limit=120", "trainer.epochs=1",
                "trainer.progress=false", f"output.latency_repeats={_smoke.REPEATS}",
                f"output.dir={json.dumps(os.path.join(work, 'runs', name))}"]
        if name != "teacher_fashion":
            sets.append(f"teacher.recipe={json.dumps(os.path.join(work, 'teacher_fashion.yaml'))}")
        if name == "prune_channel_fashion":
            sets += ["pruning.start_epoch=0", "pruning.end_epoch=0"]
        recipe = load_recipe(os.path.join(_smoke.RECIPES, name + ".yaml"), sets)
        with open(os.path.join(work, name + ".yaml"), "w") as f:
            yaml.safe_dump(recipe_to_dict(recipe), f)
    out = {}
    for part, fname in PARTS.items():
        with open(os.path.join(_smoke.RECIPES, fname)) as f:
            comp = yaml.safe_load(f)
        comp["variants"] = [v for v in comp["variants"] if v["name"] in SMOKE_VARIANTS]
        if not comp["variants"]:
            continue
        for v in comp["variants"]:
            v.pop("int8", None), v.pop("export", None)
        if comp.get("pairs"):
            comp["pairs"] = [p for p in comp["pairs"] if all(
                str(s).split(":")[0] in SMOKE_VARIANTS and not str(s).endswith(":int8") for s in p)]
        comp["out"] = os.path.join(work, "runs", "compare_fashion")     # one folder, as the real ones
        out[part] = os.path.join(work, fname)
        with open(out[part], "w") as f:
            yaml.safe_dump(comp, f, sort_keys=False)
    _smoke.skipped("int8 and export of the teacher and the best students (int8 and export have "
                   "their own benches); all but the teacher and the 90% KD, DKD and labels-only variants; seeds beyond 2")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    p.add_argument("--only", choices=sorted(PARTS), action="append",
                   help="one part (repeatable; default both)")
    _smoke.add_arguments(p)
    args = p.parse_args(argv)
    from distill.compare import compare
    parts = args.only or list(PARTS)
    if args.smoke:
        work = _smoke.workdir(args, "fashion")
        recipes, seeds = smoke_recipes(work), min(args.seeds, SMOKE_SEEDS)
    else:
        why = data_missing()
        if why:
            print(f"FAILED: the Fashion-MNIST files are needed and missing. {why}", flush=True)
            target("Fashion-MNIST data present", "the four idx files in /usr/share/datasets/"
                   "fashion-mnist", "missing: apt-get install dataset-fashion-mnist", False)
            return 1
        recipes, seeds = {k: os.path.join(ROOT, "recipes", v) for k, v in PARTS.items()}, args.seeds
    train_s, teacher = 0.0, None
    for part in parts:
        if part not in recipes:
            continue
        print(f"\n=== {part}: distill compare {recipes[part]} --seeds {seeds}", flush=True)
        rows = compare([recipes[part]], seeds=seeds, repeats=_smoke.REPEATS if args.smoke else None)
        for row in rows:
            if part == "compare":
                train_s += sum(r.values.get("train_s") or 0.0 for r in row.records)
            if row.label == "teacher":
                teacher = row.mean("top1")
    if teacher is not None:
        target("teacher top-1 on the 10,000 test images", f"≥ {TEACHER_TARGET:.1f}%",
               f"{teacher:.2f}%", teacher >= TEACHER_TARGET)
    if "compare" in parts:
        hours = train_s / 3600.0
        target(f"training time of compare_fashion's runs, {seeds} seed(s), summed",
               f"≤ {HOURS_TARGET:.0f} h", f"{hours:.2f} h", hours <= HOURS_TARGET)
    return 0


if __name__ == "__main__":
    sys.exit(main())
