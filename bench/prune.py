"""Pruning benchmark: one run, printed as ratios, each target checked honestly.

1. Speed: the mnist5k teacher (``cifar_resnet20_v1`` at 28×28, ``runs/teacher_mnist``) with half
   the channels of every prunable coupled group removed (l1, ``round_to: 8``), rebuilt smaller.
   MACs ratio, and fp32 latency ratio at batch 32, both graphs timed the deployed way
   (:func:`distill.modelinfo.measure_latency`: oneDNN-fused, warm-up, best of repeats; the two
   are timed in alternating rounds so a busy machine slows both alike).
   Targets: ≥ 3× fewer MACs, ≥ 1.8× faster.
2. Accuracy on mnist5k, each pruned run from a copy of the teacher, same epochs:
   channel 50% + KD (target ≥ teacher − 1.0 point), unstructured 90% + KD (target ≥ teacher −
   0.5 point), each beside the same run with plain label fine-tuning (``ce`` only).

The teacher is trained by ``python train.py recipes/teacher_mnist.yaml`` only if
``runs/teacher_mnist/model-*`` does not exist; the pruned runs load it as a checkpoint.

Usage::

    .venv/bin/python bench/prune.py                 # everything (about 15-40 min on 2 cores)
    .venv/bin/python bench/prune.py --speed-only    # part 1 (a minute)
    .venv/bin/python bench/prune.py --smoke         # both parts in seconds: tiny data, one epoch, temporary folder
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
from bench.targets import target  # noqa: E402

import mxnet as mx  # noqa: E402

from distill.data import load_data  # noqa: E402
from distill.graphio import load_pair, make_block  # noqa: E402
from distill.modelinfo import measure_latency, total_macs  # noqa: E402
from distill.pruning.apply import mask_params, shrink, shrunk_block  # noqa: E402
from distill.pruning.base import CRITERIA  # noqa: E402
from distill.pruning.graph import analyze  # noqa: E402
from distill.pruning.plan import choose_removed, plan_from_removed, unit_scores  # noqa: E402
from distill.recipe import load_recipe  # noqa: E402
from distill.run import run_training  # noqa: E402
from distill.runfolder import RunFolder  # noqa: E402
from distill.trainer import evaluate  # noqa: E402

TEACHER_RUN = RunFolder(os.path.join("runs", "teacher_mnist"))
TEACHER = TEACHER_RUN.model_prefix
OUT = os.path.join("runs", "bench_prune")


def ensure_teacher(smoke_dir=None):
    """``runs/teacher_mnist/model`` (trained from its recipe only when missing or stale); with
    ``smoke_dir``, the ``--smoke`` teacher in that folder."""
    from distill.recipe import recipe_hash, recipe_to_dict
    from distill.runfolder import reuse_check
    run, sets = TEACHER_RUN, ()
    if smoke_dir:
        sets = _smoke.recipe_sets(smoke_dir, "teacher_mnist")
        run = RunFolder(os.path.join(smoke_dir, "runs", "teacher_mnist"))
    recipe = load_recipe(os.path.join("recipes", "teacher_mnist.yaml"), sets)
    ok, why = reuse_check(run.path, recipe_hash(recipe), recipe_to_dict(recipe))
    if not ok:
        print(f"teacher: {why}: training it (recipes/teacher_mnist.yaml)")
        run_training(recipe, resume="auto", role="teacher")
    return run.model_prefix


def speed(prefix, repeats, rounds, sets=()):
    """Part 1: MACs and fused-latency ratios of the half-channel teacher (``sets``: overrides of
    the teacher recipe's data)."""
    sym, params = load_pair(prefix, 0)
    data = load_data(load_recipe(os.path.join("recipes", "teacher_mnist.yaml"), sets).data, seed=0)
    shape = (1, data.channels) + tuple(data.image_size)        # mnist5k: (1, 1, 28, 28)
    graph = analyze(sym, shape)
    np_params = {k: v.asnumpy() for k, v in params.items()}
    scores = unit_scores(graph, graph.groups, CRITERIA.get("l1")(), np_params)
    removed = choose_removed(graph, scores, {g.id: 0.5 for g in graph.groups}, round_to=8)
    ssym, sparams = shrink(graph, params, removed)
    x = mx.nd.array(data.val.x[:64])
    small = shrunk_block(ssym, sparams)
    diff = float(mx.nd.abs(make_block(sym, mask_params(graph, params, removed))(x) - small(x)).max().asscalar())
    tmp = tempfile.mkdtemp(prefix="bench-prune-")
    try:
        small.export(os.path.join(tmp, "small"), epoch=0)
        big = make_block(sym, params)
        big.hybridize()
        big(x)
        big.export(os.path.join(tmp, "big"), epoch=0)
        lat = {"big": [], "small": []}
        for _ in range(rounds):                       # alternate: load drifts hit both alike
            for k in ("big", "small"):
                lat[k].append(measure_latency(os.path.join(tmp, k), shape[1:], batch_sizes=(32,),
                                              repeats=repeats)["b32"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    macs_big, macs_small = total_macs(sym, shape), total_macs(ssym, shape)
    plan = plan_from_removed(graph, removed).to_dict(graph)
    return {"groups": len(graph.groups), "groups_pruned": sum(1 for g in plan["groups"] if g["kept"] < g["units"]),
            "channels": {g["name"]: f"{g['units']}→{g['kept']}" for g in plan["groups"]},
            "macs": [macs_big, macs_small], "macs_ratio": macs_big / macs_small,
            "latency_ms_b32": [min(lat["big"]), min(lat["small"])],
            "latency_ratio": min(lat["big"]) / min(lat["small"]),
            "top1_no_finetune": [evaluate(big, data.val), evaluate(small, data.val)],
            "shrink_vs_mask_max_diff": diff}


VARIANTS = [
    ("channel50_kd", "prune_channel_mnist.yaml", True),
    ("channel50_labels", "prune_channel_mnist.yaml", False),
    ("unstructured90_kd", "prune_unstructured_mnist.yaml", True),
    ("unstructured90_labels", "prune_unstructured_mnist.yaml", False),
]


def accuracy(prefix, epochs=None, only=None, out_dir=OUT, smoke=False):
    """Part 2: the four pruned runs (same epochs), via the recipes (``smoke``: shrunk by
    ``--smoke``)."""
    out = {}
    for name, recipe_file, kd in VARIANTS:
        if only and name not in only:
            continue
        sets = ["teacher.recipe=null", f"teacher.checkpoint={prefix}", f"output.dir={out_dir}/{name}",
                f"name=bench_{name}", "trainer.progress=false"]
        if not kd:
            sets.append("distillation=[{loss: ce, weight: 1.0}]")
        if smoke:
            sets += _smoke.shrink_sets(pruned=True)
        if epochs:
            sets.append(f"trainer.epochs={epochs}")
        recipe = load_recipe(os.path.join("recipes", recipe_file), sets)
        print(f"\n=== {name}: {recipe_file} {'(KD)' if kd else '(labels only)'}, "
              f"{recipe.trainer.epochs} epochs")
        m = run_training(recipe)
        s = m["student"]
        out[name] = {"top1": s["top1"], "teacher_top1": m["teacher"]["top1"], "params": s["params"],
                     "nonzero_params": s["nonzero_params"], "sparsity": s["sparsity"],
                     "macs": s["macs"], "teacher_macs": m["teacher"]["macs"],
                     "latency_ms": s.get("latency_ms"), "teacher_latency_ms": m["teacher"].get("latency_ms"),
                     "epochs": recipe.trainer.epochs}
    return out


def _check(ok):
    return "holds" if ok else "DOES NOT HOLD"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speed-only", action="store_true", help="only part 1 (MACs and latency)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs")
    p.add_argument("--only", nargs="*", default=None, help="accuracy variants to run (default all)")
    p.add_argument("--repeats", type=int, default=30, help="latency: best of this many repeats")
    p.add_argument("--rounds", type=int, default=3, help="latency: alternating rounds")
    _smoke.add_arguments(p)
    args = p.parse_args(argv)
    os.chdir(ROOT)
    out, work, sets = OUT, None, ()
    if args.smoke:       # the teacher and the four runs trained afresh in the work folder
        work = _smoke.workdir(args, "prune")
        out, sets = os.path.join(work, "runs", "bench_prune"), _smoke.shrink_sets()
        args.repeats = args.rounds = _smoke.REPEATS
    os.makedirs(out, exist_ok=True)
    prefix = ensure_teacher(work)
    res = {"speed": speed(prefix, args.repeats, args.rounds, sets)}
    sp = res["speed"]
    print("\n== 1. half the channels of every prunable layer of the resnet20 teacher (28×28, l1, round_to 8)")
    print(f"   coupled groups pruned: {sp['groups_pruned']}/{sp['groups']}; shrunk ≡ masked: "
          f"max diff {sp['shrink_vs_mask_max_diff']:.1e}")
    print(f"   MACs     {sp['macs'][0] / 1e6:7.2f}M → {sp['macs'][1] / 1e6:6.2f}M   "
          f"{sp['macs_ratio']:.2f}× fewer   (target ≥ 3×: {_check(sp['macs_ratio'] >= 3)})")
    print(f"   latency  {sp['latency_ms_b32'][0]:7.2f} ms → {sp['latency_ms_b32'][1]:5.2f} ms   "
          f"{sp['latency_ratio']:.2f}× faster (fp32, batch 32, oneDNN-fused both) "
          f"(target ≥ 1.8×: {_check(sp['latency_ratio'] >= 1.8)})")
    print(f"   top-1 before fine-tuning: {sp['top1_no_finetune'][0]:.2f}% → {sp['top1_no_finetune'][1]:.2f}%")
    target("resnet20, 50% channels: fewer MACs", "≥ 3×", f"{sp['macs_ratio']:.2f}×", sp["macs_ratio"] >= 3)
    target("resnet20, 50% channels: faster, fp32 b32 fused", "≥ 1.8×", f"{sp['latency_ratio']:.2f}×",
           sp["latency_ratio"] >= 1.8)
    if not args.speed_only:
        res["accuracy"] = acc = accuracy(prefix, args.epochs, args.only, out, args.smoke)
        if acc:
            t = next(iter(acc.values()))["teacher_top1"]
            print(f"\n== 2. mnist5k (1,000 held-out digits), teacher cifar_resnet20_v1 top-1 {t:.2f}%")
            print(f"   {'run':34} {'top-1':>7} {'vs teacher':>11} {'params':>8} {'nonzero':>8} {'MACs':>7}")
            targets = {"channel50_kd": 1.0, "unstructured90_kd": 0.5}
            for name, _, kd in VARIANTS:
                if name not in acc:
                    continue
                a = acc[name]
                line = (f"   {name + (' (KD)' if kd else ' (labels)'):34} {a['top1']:7.2f} "
                        f"{a['top1'] - t:+11.2f} {a['params']:8d} {a['nonzero_params']:8d} "
                        f"{a['macs'] / 1e6:6.2f}M")
                if name in targets:
                    line += f"   target ≥ teacher − {targets[name]}: {_check(a['top1'] >= t - targets[name])}"
                print(line)
                if name in targets:
                    target(f"{name}: top-1 vs teacher", f"≥ {-targets[name]:+.1f} points",
                           f"{a['top1'] - t:+.2f}", a["top1"] >= t - targets[name])
            for kind in ("channel50", "unstructured90"):
                if f"{kind}_kd" in acc and f"{kind}_labels" in acc:
                    d = acc[f"{kind}_kd"]["top1"] - acc[f"{kind}_labels"]["top1"]
                    print(f"   {kind}: KD vs labels-only fine-tuning, same {acc[f'{kind}_kd']['epochs']} "
                          f"epochs: {d:+.2f} points")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nresults: {out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
