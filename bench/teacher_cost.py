#!/usr/bin/env python
"""What the teacher costs per epoch: plain student training (labels only) vs live KD vs
cached KD, measured in one run on mnist5k, printed as ratios.

    python bench/teacher_cost.py [--epochs 2] [--student mobilenetv2_0.5]
    python bench/teacher_cost.py --smoke     # tiny data, one epoch, the teacher trained in a temporary folder

Each mode trains a fresh student for ``--epochs`` epochs (same seed, same batches); the epoch
time is the fastest epoch (the first includes graph set-up). The cache is built once before
training: its one-off cost is printed separately. Target: cached KD ≤ 1.15× plain training.
"""
import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import _smoke  # noqa: E402
from bench.targets import target  # noqa: E402
from distill.recipe import load_recipe, recipe_from_dict, recipe_to_dict  # noqa: E402
from distill.report import format_table  # noqa: E402
from distill.run import run_training  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--student", default="mobilenetv2_0.5")
    _smoke.add_arguments(ap)
    args = ap.parse_args(argv)
    sets, teacher, work = (), os.path.join(ROOT, "recipes", "teacher_mnist.yaml"), None
    if args.smoke:       # its teacher and the runs in the work folder
        work = _smoke.workdir(args, "teacher_cost")
        sets, teacher = _smoke.recipe_sets(work, "quickstart", pruned=True), _smoke.teacher_recipe(work)
        args.epochs = 1
    base = recipe_to_dict(load_recipe(os.path.join(ROOT, "recipes", "quickstart.yaml"), sets))
    base["teacher"]["recipe"] = teacher
    base["student"]["model"] = args.student
    base["trainer"].update(epochs=args.epochs, progress=False)
    base["output"] = {"latency": False}
    for step in ("pruning", "quantization", "export"):     # the training epoch alone is timed
        base[step] = {"enabled": False}
    modes = {
        "plain (labels only)": {"distillation": [{"loss": "ce", "weight": 1.0}], "teacher": {}},
        "KD, teacher live": {"trainer": {"teacher_cache": "off"}},
        "KD, teacher cached": {"trainer": {"teacher_cache": "memory"}},
    }
    out = {}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for label, change in modes.items():
            r = json.loads(json.dumps(base))
            for k, v in change.items():
                if isinstance(v, dict) and v and isinstance(r.get(k), dict):
                    r[k].update(v)
                else:
                    r[k] = v
            r["name"] = label.split()[0].strip(",")
            r["output"]["dir"] = os.path.join(tmp, r["name"] + str(len(out)))
            recipe = recipe_from_dict(r)
            recipe.source = os.path.join(ROOT, "recipes", "quickstart.yaml")
            m = run_training(recipe)
            out[label] = {"epoch_s": min(h["epoch_time_s"] for h in m["history"]),
                          "cache_s": m.get("teacher_cache_s", 0.0), "top1": m["student"]["top1"]}
    plain = out["plain (labels only)"]["epoch_s"]
    rows = [[k, f"{v['epoch_s']:.2f}", f"{v['epoch_s'] / plain:.2f}×", f"{v['cache_s']:.2f}",
             f"{v['top1']:.2f}"] for k, v in out.items()]
    print(format_table(["mode", "epoch s", "vs plain", "one-off cache s", f"top-1 after {args.epochs} ep"],
                       rows, title=f"\nteacher cost per epoch, {args.student} on mnist5k (4,000 images)"))
    live = out["KD, teacher live"]["epoch_s"] / plain
    cached = out["KD, teacher cached"]["epoch_s"] / plain
    print(f"\nlive KD overhead: {live:.2f}× plain training")
    target("cached KD epoch time vs plain training", "≤ 1.15×", f"{cached:.2f}×", cached <= 1.15)


if __name__ == "__main__":
    main()
