"""Prune to a target (issue 16): ``pruning.target: {latency: 0.4}`` against uniform pruning.

For each network (the ResNet-20 mnist5k teacher ``runs/teacher_mnist`` and the MobileNetV2-0.5
student ``runs/compare_mnist/mobilenetv2-0-5-kd-s0``, each pruned as ``student.from: teacher``
of itself, with ``recipes/prune_channel_mnist.yaml``'s KD fine-tune):

1. **target**: the recipe with ``pruning.target: {latency: 0.4, backend: mxnet, batch: 32}``;
   the run allocates per-group ratios at its start (``pruning-target.json``: predicted and
   measured latency fraction, per-layer model error) and AGP prunes toward them.
2. **uniform**: one ratio for every group, the one whose measured latency (alternating rounds
   against the unpruned network) is closest to the target proposal's measured latency.

Both trained the same epochs, seeds 0 and 1 (the second seed reuses the first's allocation).
Targets: measured latency within 10% of 0.4×; per-layer model within 15% of the measured graph;
target top-1 (mean of the seeds) ≥ uniform's. ``--ncnn``: the same comparison with
``backend: ncnn`` (latency in ncnn's runtime, one thread, batch 1, the latency model's layers
timed in ncnn too; both sides trained) on the MobileNetV2-0.5 (``--ncnn-net``: the ResNet-20
cannot reach 0.4× there, its classifier's whole input group kept). Missing networks are trained first (the teacher from its recipe, the student
as ``recipes/compare_mnist.yaml``'s ``mobilenetv2_0.5 + KD`` seed 0).

    OMP_NUM_THREADS=1 .venv/bin/python bench/prune_target.py [--epochs 4] [--only resnet20] [--no-ncnn] [--ncnn-only]
    OMP_NUM_THREADS=1 .venv/bin/python bench/prune_target.py --smoke    # the ResNet-20 in ncnn, tiny data, one seed: seconds
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import _smoke  # noqa: E402
from bench.targets import target  # noqa: E402

import numpy as np  # noqa: E402

from distill.data import load_data  # noqa: E402
from distill.graphio import load_pair  # noqa: E402
from distill.pruning.base import CRITERIA  # noqa: E402
from distill.pruning.graph import analyze  # noqa: E402
from distill.pruning.plan import choose_removed, unit_scores  # noqa: E402
from distill.pruning.probe import Probe  # noqa: E402
from distill.runfolder import TARGET_FILE  # noqa: E402
from distill.pruning.sensitivity import allowed_groups  # noqa: E402
from distill.recipe import load_recipe  # noqa: E402
from distill.run import run_training  # noqa: E402

OUT = os.path.join("runs", "bench_prune_target")
NETS = {"resnet20": os.path.join("runs", "teacher_mnist", "model"),
        "mobilenetv2": os.path.join("runs", "compare_mnist", "mobilenetv2-0-5-kd-s0", "model")}
GOAL = 0.4
UNIFORM = (0.25, 0.375, 0.5, 0.625, 0.75)


def ensure_nets(nets=NETS, smoke_dir=None, student=True):
    """The two networks, trained when missing: the teacher from ``recipes/teacher_mnist.yaml``,
    the MobileNetV2-0.5 student as the compare recipe's ``mobilenetv2_0.5 + KD`` variant (seed 0;
    ``student=False``: not that one). ``smoke_dir``: both shrunk by ``--smoke``, in that folder
    (``nets`` names them there)."""
    from bench.prune import ensure_teacher
    from distill.compare.runner import _run_one
    from distill.compare.spec import load_comparison
    ensure_teacher(smoke_dir)
    if not student:
        return
    from distill.recipe import recipe_hash, recipe_to_dict
    from distill.runfolder import reuse_check
    comp = load_comparison(os.path.join("recipes", "compare_mnist.yaml"),
                           out=os.path.dirname(os.path.dirname(nets["mobilenetv2"])) if smoke_dir else None)
    # the compare variant exactly, its recipe shrunk and its runs in the work folder
    variant = next(v for v in comp.variants if v.name == "mobilenetv2_0.5 + KD")
    if smoke_dir:
        variant = dataclasses.replace(variant, overrides=tuple(variant.overrides) + tuple(
            _smoke.recipe_sets(smoke_dir, os.path.join("compare_mnist", variant.folder_name + "-s0"))
            + [f"teacher.recipe={json.dumps(_smoke.teacher_recipe(smoke_dir))}"]))
    recipe = variant.run_recipe(0, os.path.dirname(nets["mobilenetv2"]))
    ok, why = reuse_check(recipe.run_dir, recipe_hash(recipe), recipe_to_dict(recipe))
    if not ok:
        print(f"student: {why}: training it (compare_mnist.yaml, {variant.name!r}, seed 0)",
              flush=True)
        _run_one(comp, variant, 0, print)


def _recipe(prefix, out, seed, epochs, pruning, samples=None, extra=()):
    sets = ([f"data.num_samples={samples}"] if samples else []) + ["teacher.recipe=null", f"teacher.checkpoint={prefix}", f"output.dir={out}",
            f"name=bench_{os.path.basename(out)}", "trainer.progress=false", f"trainer.seed={seed}",
            "pruning.exclude=[last]"] + [f"pruning.{k}={v}" for k, v in pruning.items()] + list(extra)
    if epochs:      # AGP over the first half, then fine-tune
        sets += [f"trainer.epochs={epochs}", f"pruning.end_epoch={max(0, epochs // 2 - 1)}"]
    return load_recipe(os.path.join("recipes", "prune_channel_mnist.yaml"), sets)


def _train(prefix, out, seed, epochs, pruning, reuse=None, samples=None, extra=()):
    recipe = _recipe(prefix, out, seed, epochs, pruning, samples, extra)
    os.makedirs(out, exist_ok=True)
    if reuse and os.path.isfile(reuse):
        shutil.copyfile(reuse, os.path.join(out, TARGET_FILE))
    print(f"\n=== {out}: seed {seed}, {recipe.trainer.epochs} epochs, pruning {pruning}", flush=True)
    m = run_training(recipe)
    return {"top1": m["student"]["top1"], "macs": m["student"]["macs"],
            "latency_ms": m["student"].get("latency_ms"), "teacher_top1": m["teacher"]["top1"],
            "teacher_macs": m["teacher"]["macs"], "teacher_latency_ms": m["teacher"].get("latency_ms")}


def _teacher_analysis(prefix, sets=()):
    """The teacher pair at ``prefix`` analysed the way both measurements need it: symbol, params, the mnist5k
    data, the dependency graph, l1 unit scores, and the groups ``exclude: [last]`` allows
    (``sets``: overrides of the teacher recipe's data)."""
    sym, params = load_pair(prefix, 0)
    data = load_data(load_recipe(os.path.join("recipes", "teacher_mnist.yaml"), sets).data, seed=0)
    graph = analyze(sym, (1,) + tuple(data.val.x.shape[1:]))
    np_params = {k: v.asnumpy() for k, v in params.items()}
    scores = unit_scores(graph, graph.groups, CRITERIA.get("l1")(), np_params)
    allowed, excluded = allowed_groups(graph, sym, ["last"])
    return sym, params, data, graph, scores, allowed, excluded


def uniform_match(prefix, measured_fraction, repeats, backend="mxnet", sets=()):
    """The uniform ratio whose measured latency fraction is closest to ``measured_fraction``."""
    _, params, data, graph, scores, allowed, _ = _teacher_analysis(prefix, sets)
    tmp = tempfile.mkdtemp(prefix="bench-uniform-")
    try:
        probe = Probe(graph, params, "data", data, 1 if backend == "ncnn" else 32, repeats, 256, tmp,
                      backend=backend)
        base = probe.measure(set(), keep_files=True)
        rows = []
        for r in UNIFORM:
            removed = choose_removed(graph, scores, {g: r for g in allowed}, 8)
            m = probe.measure(removed, keep_files=True)
            b, v = probe.compare(base["prefix"], m["prefix"])
            rows.append({"ratio": r, "fraction": round(v / b, 4), "ms": v, "base_ms": b})
            print(f"  uniform {r:.3f}: {v:.3f} / {b:.3f} ms = {v / b:.3f}×", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = min(rows, key=lambda row: abs(row["fraction"] - measured_fraction))
    return best, rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (10)")
    p.add_argument("--only", nargs="*", default=None, choices=sorted(NETS), help="networks")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--repeats", type=int, default=10, help="latency: best of this many repeats")
    p.add_argument("--goal", type=float, default=GOAL,
                   help="the MXNet comparisons' latency target (default 0.4; on a 2-core AVX-512 "
                        "host the ResNet-20 cannot reach it: oneDNN blocks channels by 16 there, "
                        "and its deepest cut measures 0.45-0.50×)")
    p.add_argument("--ncnn", action="store_true", default=True,
                   help="also the comparison with latency in ncnn's runtime (1 thread, batch 1; "
                        "the default, so that `make bench` runs it)")
    p.add_argument("--no-ncnn", dest="ncnn", action="store_false", help="the MXNet comparisons only")
    p.add_argument("--ncnn-only", action="store_true", help="the ncnn comparison alone")
    p.add_argument("--ncnn-goal", type=float, default=GOAL,
                   help="the ncnn comparison's latency target (default 0.4: MobileNetV2-0.5 reaches "
                        "0.284× in ncnn at one thread on an AVX-512 host; on a 2-core AVX2 host "
                        "neither network did: 0.481×, 0.453×)")
    p.add_argument("--ncnn-net", nargs="*", default=None, choices=sorted(NETS),
                   help="the networks of the ncnn comparison (default mobilenetv2: the ResNet-20 "
                        "cannot reach 0.4× in ncnn with its classifier's group kept whole)")
    p.add_argument("--samples", type=int, default=None,
                   help="data.num_samples of the training runs (default: the recipe's, all 5,000)")
    _smoke.add_arguments(p)
    args = p.parse_args(argv)
    os.chdir(ROOT)
    out_dir, nets, extra, data_sets, spec_extra, work = OUT, NETS, [], [], "", None
    if args.smoke:       # one seed, one epoch, tiny data; the networks trained in the work folder
        work = _smoke.workdir(args, "prune_target")
        out_dir = os.path.join(work, "runs", "bench_prune_target")
        nets = {k: os.path.join(work, v) for k, v in NETS.items()}
        extra, data_sets = _smoke.shrink_sets(pruned=True), _smoke.shrink_sets()
        args.seeds, args.repeats = [0], _smoke.REPEATS
        spec_extra = ", candidates: 1, bn_batches: 1"       # the greedy allocation alone
        _smoke.skipped("the candidate search (candidates: 1, the greedy allocation alone)")
        if args.only is None and args.ncnn_net is None and not args.ncnn_only:
            # the smallest real version: one network, one backend. Every case runs the same
            # code here; ncnn's (its layers timed in ncnn's runtime) is the one with more parts
            args.ncnn_only, args.ncnn_net = True, ["resnet20"]
            _smoke.skipped("the MXNet comparisons and the MobileNetV2-0.5 (its training too: 24 "
                           "groups, in ncnn ~6,000 layer widths timed, minutes): ResNet-20 in ncnn only")
        _smoke.skipped("the second seed (--seeds 0 1: it reuses the first's allocation)")
        if args.ncnn_goal == GOAL:
            # 8×8 nets in ncnn are mostly its fixed per-layer costs: on a 2-core AVX-512 host
            # (2026-12-07) the ResNet-20's deepest cut measured 0.445-0.448×, short of 0.4×
            args.ncnn_goal = 0.6
            _smoke.skipped(f"the {GOAL}× ncnn goal: {args.ncnn_goal}× at this scale (8×8 nets in ncnn "
                           f"are mostly fixed per-layer costs)")
    os.makedirs(out_dir, exist_ok=True)
    res = {}
    cases = [] if args.ncnn_only else [(net, "mxnet") for net in args.only or sorted(NETS)]
    if args.ncnn:
        cases += [(net, "ncnn") for net in (args.ncnn_net if args.ncnn_net else ["mobilenetv2"])]
    # the full bench trains both networks whatever it compares; --smoke only those it uses
    ensure_nets(nets, work, student=not args.smoke or any(net == "mobilenetv2" for net, _ in cases))
    for net, backend in cases:
        prefix = nets[net]
        goal = args.ncnn_goal if backend == "ncnn" else args.goal
        name = net if backend == "mxnet" else f"{net}-ncnn"
        where = "mxnet b32" if backend == "mxnet" else "ncnn, 1 thread, b1"
        spec = f"{{latency: {goal}, backend: {backend}, batch: {32 if backend == 'mxnet' else 1}{spec_extra}}}"
        r = res[name] = {"target": [], "uniform": [], "backend": backend}
        first = None
        try:
            for seed in args.seeds:
                out = os.path.join(out_dir, f"{name}-target-s{seed}")
                r["target"].append(_train(prefix, out, seed, args.epochs, {"target": spec},
                                          reuse=first, samples=args.samples, extra=extra))
                first = first or os.path.join(out, TARGET_FILE)
        except Exception as e:          # an unreachable target: the other cases still run
            print(f"{name}: the target run failed: {type(e).__name__}: {e}", flush=True)
            target(f"{name}: proposal's measured latency vs {goal}× ({where})", "within 10%", "failed", False)
            continue
        with open(first) as f:
            alloc = json.load(f)["result"]
        r["allocation"] = alloc
        best, rows = uniform_match(prefix, alloc["measured"], args.repeats, backend, data_sets)
        r["uniform_search"] = rows
        r["uniform_ratio"] = best["ratio"]
        for seed in args.seeds:
            out = os.path.join(out_dir, f"{name}-uniform-s{seed}")
            r["uniform"].append(_train(prefix, out, seed, args.epochs,
                                       {"final_sparsity": best["ratio"]}, samples=args.samples, extra=extra))
        t1 = float(np.mean([x["top1"] for x in r["target"]]))
        u1 = float(np.mean([x["top1"] for x in r["uniform"]]))
        errs = alloc.get("model_errors", {})
        print(f"\n== {name}: target latency {goal}× ({where}), {len(args.seeds)} seeds")
        print(f"   allocation ({alloc.get('kind', 'greedy')}, {len(alloc.get('candidates', []))} "
              f"candidates measured): {alloc['ratios']}")
        print(f"   predicted {alloc['predicted']:.3f}×, measured {alloc['measured']:.3f}× "
              f"({alloc['measured_ms']:.3f} vs {alloc['base_ms']:.3f} ms), model error "
              f"{alloc.get('model_error', float('nan')):+.1%} (over {errs.get('n', 0)} timed candidates: "
              f"mean |error| {errs.get('mean_abs', float('nan')):.1%}, max {errs.get('max_abs', float('nan')):.1%}), "
              f"layers alone explain {alloc.get('coverage', float('nan')):.0%} of the measured graph")
        for c in alloc.get("candidates", []):
            print(f"     {c['kind']:15} predicted {c['predicted']:.3f}× measured {c['measured']:.3f}×  "
                  f"KL {c['kl'] if c['kl'] is not None else float('nan'):.4f}  top-1 {c['top1']:.2f}  "
                  f"predicted drop {c['predicted_drop']:.2f}")
        print(f"   uniform {best['ratio']}: measured {best['fraction']:.3f}×")
        print(f"   top-1 after the KD fine-tune: target {[x['top1'] for x in r['target']]} mean {t1:.2f}; "
              f"uniform {[x['top1'] for x in r['uniform']]} mean {u1:.2f}; teacher "
              f"{r['target'][0]['teacher_top1']:.2f}")
        m = alloc["measured"]
        target(f"{name}: proposal's measured latency vs {goal}× ({where})", "within 10%",
               f"{m:.3f}×", abs(m / goal - 1) <= 0.10)
        err = alloc.get("model_error")
        target(f"{name}: per-layer latency model vs measured graph (proposal)", "within 15%",
               f"{err:+.1%}" if err is not None else "n/a", err is not None and abs(err) <= 0.15)
        target(f"{name}: top-1 target vs uniform at the same measured latency "
               f"(uniform {best['ratio']}: {best['fraction']:.3f}×), mean of {len(args.seeds)} seeds",
               "≥ uniform", f"{t1:.2f} vs {u1:.2f}", t1 >= u1)
    path = os.path.join(out_dir, f"results-{'-'.join(name for name in res)}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
