"""Int8 benchmark: fused fp32 vs oneDNN int8 on the quickstart student, in one run.

    .venv/bin/python bench/int8.py                      # runs/quickstart (python train.py recipes/quickstart.yaml)
    .venv/bin/python bench/int8.py --run runs/other --repeats 50
    .venv/bin/python bench/int8.py --smoke              # a tiny quickstart run, trained in a temporary folder

Prints latency at batch 1 and 32 (fp32 side: the oneDNN-fused fp32 graph, so the ratio credits
int8 alone; both sides timed alternately, best of repeats), top-1 on the held-out split for the
``none``, ``first_last`` and ``auto`` policies under both calibration modes, and whether the
issue's targets hold: int8 ≥ 2.5× faster than fused fp32 at batch 32 and ≥ 1.5× at batch 1,
``auto`` within 0.5 point of fp32. A missed target is printed as missed. Nothing is written to
the run folder (exports go to a temporary folder).
"""
import argparse
import os
import sys
import tempfile
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench import _smoke  # noqa: E402
from bench.targets import target  # noqa: E402
from distill.report import format_table  # noqa: E402

TARGET_B32, TARGET_B1, TARGET_AUTO = 2.5, 1.5, 0.5


def _random_student(tmp):
    """No trained run: the quickstart architecture with random weights, for latency only."""
    from students import build_student
    net = build_student("mobilenetv2_0.5", 1, 10, (28, 28), seed=0)
    net.hybridize()
    net(mx.nd.zeros((1, 1, 28, 28)))
    prefix = os.path.join(tmp, "random")
    net.export(prefix, 0)
    return prefix


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=os.path.join(ROOT, "runs", "quickstart"))
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--budget", type=float, default=TARGET_AUTO)
    p.add_argument("--modes", default="naive,entropy", help="calibration modes to compare")
    p.add_argument("--wait", type=float, default=0, help="seconds to wait for RUN to complete")
    _smoke.add_arguments(p)
    args = p.parse_args(argv)
    work = None
    if args.smoke:       # the quickstart student (pruned, distilled), trained in the work folder
        from distill.recipe import load_recipe
        from distill.run import run_training
        work = _smoke.workdir(args, "int8")
        args.run, args.repeats = os.path.join(work, "runs", "quickstart"), _smoke.REPEATS
        if "entropy" in args.modes.split(","):
            args.modes = ",".join(m for m in args.modes.split(",") if m != "entropy") or "naive"
            _smoke.skipped("entropy calibration (MXNet's KL threshold search, ~0.4 s per tensor "
                           "whatever the data: half a minute for this student)")
        run_training(load_recipe(os.path.join(ROOT, "recipes", "quickstart.yaml"),
                                 _smoke.quickstart_sets(work, int8=False) + ["export.enabled=false"]))

    from distill.data import load_data
    from distill.graphio import save_pair as save_graph
    from distill.quantize import Selection
    from distill.quantize.calibrators import calibrate
    from distill.quantize.graph import FloatModel, quantize
    from distill.quantize.pipeline import prepare, run_policy
    from distill.quantize.pipeline import paired_latency
    from distill.recipe import QuantizationConfig, load_recipe

    from distill.recipe import recipe_hash, recipe_to_dict
    from distill.runfolder import RunFolder, reuse_check

    deadline = time.time() + args.wait
    prefix = os.path.join(args.run, "model")
    run_folder = RunFolder(args.run)
    while not run_folder.is_complete() and time.time() < deadline:
        time.sleep(10)
    tmp = tempfile.mkdtemp(prefix="bench-int8-", dir=work)
    # a run of this tool only (its own recipe: the check is the version and commit that wrote it)
    trained, why = False, f"{args.run} has no complete trained run"
    if run_folder.is_complete() and run_folder.has_recipe():
        own = load_recipe(run_folder.recipe_path)
        trained, why = reuse_check(args.run, recipe_hash(own), recipe_to_dict(own))
    print(f"int8 benchmark — mxnet {mx.__version__}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start (other processes slow both sides alike; ratios are "
          f"more stable than milliseconds)")
    if not trained:
        print(f"NOTE: {why}: not used; timing a random-weight mobilenetv2_0.5 "
              f"(stride-1 stem, 28×28×1); top-1 is not measured. Run python train.py "
              f"recipes/quickstart.yaml for the accuracy half.")
        prefix = _random_student(tmp)

    t0 = time.time()
    rows, outcomes = [], {}
    if trained:
        recipe = load_recipe(os.path.join(args.run, "recipe.yaml"))
        data = load_data(recipe.data, seed=recipe.trainer.seed)
        shape = (data.channels,) + tuple(data.image_size)
        model = FloatModel.from_prefix(prefix, shape)
        for mode in args.modes.split(","):
            q = recipe.quantization.__class__(calib_mode=mode, budget=args.budget)
            t = time.time()
            sc = prepare(model, data, q, recipe.trainer.seed, recipe.trainer.eval_batch_size)
            for policy in ("none", "first_last", "auto"):
                out = run_policy(sc, policy, args.budget)
                outcomes[(mode, policy)] = out
                rows.append([mode, policy, f"{sc.fp32_top1:.2f}", f"{out.score.top1:.2f}",
                             f"{out.score.top1 - sc.fp32_top1:+.2f}", len(out.selection.excluded)])
            print(f"  {mode}: calibrated and searched in {time.time() - t:.0f} s")
        print(format_table(["calib", "policy", "fp32 top-1", "int8 top-1", "Δ", "fp32 layers"],
                           rows, f"\ntop-1 % on {data.name} val ({len(data.val)} images), "
                                 f"{sc.calib['images']} calibration images (train split, seed {sc.calib['seed']})"))
        for (mode, policy), out in outcomes.items():
            if out.selection.excluded:
                print(f"  kept fp32 by {policy} ({mode}): "
                      + ", ".join(_short(n) for n in out.selection.excluded))
    else:
        shape = (1, 28, 28)
        model = FloatModel.from_prefix(prefix, shape)
        x = np.random.RandomState(0).randn(64, *shape).astype("float32")
        graph = quantize(model, calibrate(model, x, "naive"), [])
        outcomes[("naive", "none")] = SimpleNamespace(graph=graph, selection=Selection([]))

    # time fp32 and each distinct int8 graph (different fp32 layer sets), alternately
    graphs = {}
    for (mode, policy), out in outcomes.items():
        key = tuple(out.selection.excluded) + tuple(out.selection.exclude_ops)
        if key not in graphs:
            gp = os.path.join(tmp, f"int8-{len(graphs)}")
            save_graph(gp, out.graph.symbol, out.graph.params)
            graphs[key] = (gp, f"int8 {policy} ({mode}): {len(out.selection.excluded)} fp32")
    prefixes = [prefix] + [gp for gp, _ in graphs.values()]
    names = ["fp32 (oneDNN-fused)"] + [lab for _, lab in graphs.values()]
    lat = paired_latency(prefixes, shape, repeats=args.repeats)
    f = lat[0]
    lrows = [[n, f"{l['b1']:.3f}", f"{l['b32']:.3f}", f"{f['b1'] / l['b1']:.2f}×", f"{f['b32'] / l['b32']:.2f}×"]
             for n, l in zip(names, lat)]
    print(format_table(["model", "ms b1", "ms b32", "speed-up b1", "speed-up b32"], lrows,
                       f"\nlatency, best of {args.repeats} (ms); speed-up = fused fp32 / int8"))

    # targets: the deployable int8 model is `auto` under the recipe's calibration mode
    print("\ntargets:")
    default_mode = QuantizationConfig().calib_mode
    key = (default_mode, "auto") if (default_mode, "auto") in outcomes else next(iter(outcomes))
    out = outcomes[key]
    k = tuple(out.selection.excluded) + tuple(out.selection.exclude_ops)
    i = 1 + list(graphs).index(k)
    r32, r1 = f["b32"] / lat[i]["b32"], f["b1"] / lat[i]["b1"]
    _target(f"int8 ({key[1]}, {key[0]}) ≥ {TARGET_B32}× faster than fused fp32 at batch 32", r32 >= TARGET_B32, f"{r32:.2f}×")
    _target(f"int8 ({key[1]}, {key[0]}) ≥ {TARGET_B1}× faster than fused fp32 at batch 1", r1 >= TARGET_B1, f"{r1:.2f}×")
    if trained:
        for mode in args.modes.split(","):
            o = outcomes[(mode, "auto")]
            drop = o.scorer.fp32_top1 - o.score.top1
            _target(f"auto ({mode}) within {args.budget} point of fp32", drop <= args.budget + 1e-9,
                    f"{-drop:+.2f} points, {len(o.selection.excluded)} layer(s) fp32")
            full = outcomes[(mode, "none")]
            print(f"  full int8 ({mode}): {full.score.top1 - full.scorer.fp32_top1:+.2f} points of top-1 "
                  f"against fp32 ({full.scorer.fp32_top1:.2f} → {full.score.top1:.2f})")
    else:
        print("  auto within 0.5 point: NOT MEASURED (no trained run)")
    for n, l in zip(names[1:], lat[1:]):
        for b in ("b1", "b32"):
            if l[b] > f[b]:
                print(f"  note: {n} is SLOWER than fused fp32 at batch {b[1:]} ({l[b]:.3f} vs {f[b]:.3f} ms)")
    # per layer: each fused layer alone, fp32 vs int8 (the distill quantize report's table)
    from distill.quantize.layer_speed import layer_latency, slower_layers
    sc = outcomes[key].scorer if trained else None
    th = sc.thresholds if sc else calibrate(model, np.random.RandomState(0).randn(64, *shape).astype("float32"), "naive")
    layers = [r for r in layer_latency(model, th, repeats=args.repeats) if "error" not in r]
    slow = slower_layers(layers)
    for b in ("b1", "b32"):
        fs = sum(r[b]["fp32_ms"] for r in layers)
        qs = sum(r[b]["int8_ms"] or r[b]["fp32_ms"] for r in layers)
        worst = min((r for r in layers if r[b]["speedup"]), key=lambda r: r[b]["speedup"])
        print(f"  per layer, batch {b[1:]}: {len(layers)} weight layers summed fp32 {fs:.3f} ms, int8 "
              f"{qs:.3f} ms ({fs / qs:.2f}×); smallest gain {_short(worst['layer'])} "
              f"{worst[b]['speedup']:.2f}×; int8 SLOWER for {len(slow.get(b, []))} layer(s)"
              + (": " + ", ".join(f"{_short(n)} ({a:.3f} → {q:.3f} ms)" for n, a, q in slow[b]) if slow.get(b) else ""))
    top = sorted(layers, key=lambda r: -r["b32"]["fp32_ms"])[:3]
    print("  slowest fp32 layers at batch 32: " + ", ".join(
        f"{_short(r['layer'])} {r['b32']['fp32_ms']:.3f} ms fp32 → {r['b32']['int8_ms']:.3f} ms int8" for r in top))
    print(f"\nbenchmark time {time.time() - t0:.0f} s")
    return 0


def _short(name):
    for pre in ("mobilenetv20_features_", "mobilenetv20_", "cifarresnetv10_"):
        if name.startswith(pre):
            return name[len(pre):]
    return name


def _target(what, ok, value):
    figure, _, goal = what.rpartition(" ≥ ") if " ≥ " in what else (what, "", "")
    target(figure if goal else what, ("≥ " + goal) if goal else "yes", value, ok)


if __name__ == "__main__":
    sys.exit(main())
