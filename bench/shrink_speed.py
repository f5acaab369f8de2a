#!/usr/bin/env python
"""Training cost of channel pruning: the student rebuilt smaller at every update
(``pruning.shrink: each_update``) vs trained masked at full width until the end (``shrink:
end``, how every channel-pruned run trained before issue #28), on the same recipe, back to back.

    python bench/shrink_speed.py [--sparsity 0.75] [--rounds 1]
    python bench/shrink_speed.py --smoke     # 64 images of 8×8, one epoch

Both runs are ``recipes/prune_channel_mnist.yaml`` with ``pruning.final_sparsity`` set (75% by
default), the same epochs, seed and teacher (trained first, once, not timed), in alternating
order for ``--rounds`` rounds; each run's ``train_time_s`` (``metrics.json``: the whole loop,
pruning updates, rebuilds and evaluation included) counts, the best per mode. The table also shows
each epoch's images/s, the final MACs and top-1, and the largest difference between the rebuilt
and the masked network's logits over the updates (the check each rebuild passes). Target: masked /
each_update ≥ 1.8× (issue #28).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import _smoke  # noqa: E402
from bench._train import train  # noqa: E402
from bench.targets import target  # noqa: E402
from distill.report import format_table  # noqa: E402

RECIPE = os.path.join(ROOT, "recipes", "prune_channel_mnist.yaml")
TARGET = 1.8
MODES = ("end", "each_update")


def _train(sets, run_dir):
    return train(RECIPE, sets, run_dir, "shrink_speed.py")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.75, help="pruning.final_sparsity")
    ap.add_argument("--rounds", type=int, default=1, help="both modes, alternating, this many times")
    _smoke.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.smoke:
        work = _smoke.workdir(args, "shrink_speed")
        base = _smoke.shrink_sets(pruned=True) + [
            f"teacher.recipe={json.dumps(_smoke.teacher_recipe(work))}"]
        args.rounds = 1
    else:
        work = tempfile.mkdtemp(prefix="bench-shrink-speed-")
        base = ["trainer.progress=false", "output.latency=false"]
    base = base + [f"pruning.final_sparsity={args.sparsity}"]
    best = {}
    for r in range(args.rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for mode in order:
            m = _train(base + [f"pruning.shrink={mode}"], os.path.join(work, f"{mode}-{r}"))
            if mode not in best or m["train_time_s"] < best[mode]["train_time_s"]:
                best[mode] = m
    rows = []
    for mode in MODES:
        m = best[mode]
        p = m["student"]["pruning"]
        ips = " ".join(f"{h['images_per_s']:.0f}" for h in m["history"])
        rows.append([mode, f"{m['train_time_s']:.1f}", ips, f"{m['student']['macs'] / 1e6:.2f}M",
                     f"{m['student']['top1']:.2f}", len(p.get("rebuilds", [])) or 1,
                     f"{p.get('shrink_vs_mask_max_diff', float('nan')):.1e}"])
    ratio = best["end"]["train_time_s"] / max(best["each_update"]["train_time_s"], 1e-9)
    print(format_table(["shrink", "train s", "img/s per epoch", "MACs", "top-1 %", "rebuilds",
                        "max |Δlogit| vs masked"], rows,
                       title=f"\n{os.path.basename(RECIPE)} at {args.sparsity:.0%} of the channels, "
                             f"{len(best['end']['history'])} epochs, best of {args.rounds} round(s); "
                             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"))
    print(f"masked / each_update training time: {ratio:.2f}×")
    target(f"training time at {args.sparsity:.0%} channels, masked / rebuilt at each update",
           f"≥ {TARGET}×", f"{ratio:.2f}×", ratio >= TARGET)
    out_dir = work if args.smoke else os.path.join(ROOT, "runs", "bench_shrink_speed")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"smoke": bool(args.smoke), "sparsity": args.sparsity, "rounds": args.rounds,
                   "ratio": ratio, "target": TARGET,
                   "rows": [dict(zip(["shrink", "train_s", "img_s_per_epoch", "macs", "top1",
                                      "rebuilds", "max_diff"], r)) for r in rows]}, f, indent=1)
    print(f"results: {os.path.join(out_dir, 'results.json')}")
    if not args.smoke:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
