"""``distill sensitivity RECIPE``: how much each coupled channel group can lose.

For every coupled group of the network (the layers the dependency analysis ties together: pruning
one conv of a residual sum alone measures nothing), remove several ratios of its channels with
the recipe's criterion, re-estimate every BatchNorm's statistics on 512 training images
(``--bn-batches``; EagleEye's adaptive BN, Li et al. 2020: on the ResNet-20 teacher, half the
stem's channels cost 88.3 points with the stale statistics and 4.1 after), without fine-tuning,
and measure top-1 on the held-out split and the
deployed latency (oneDNN-fused, as :func:`distill.modelinfo.measure_latency` times it). Then
propose per-group ratios that keep the summed accuracy drop within ``--budget`` points at the
largest saving of *measured* latency (a multiple-choice knapsack over the table), check the
proposal by measuring it, and print it as ``pruning.overrides`` for the recipe.

With ``--target-latency F`` or ``--target-macs F`` (a fraction of the unpruned model's), the
curves are measured without timing each variant, and the ratios are allocated to meet the target
with the least predicted loss (:mod:`distill.pruning.target`, over the per-layer latency model of
:mod:`distill.pruning.latency_model` or exact MACs), then the combined proposal is measured
(:func:`distill.pruning.probe.search_target`). ``--backend ncnn`` times in ncnn's runtime (one
thread, batch 1); ``--recover-steps N`` fine-tunes each variant N KD steps before it is measured.

The network is the teacher for ``student.from: teacher``, else the student trained by the recipe
(its run folder's model pair, :attr:`distill.runfolder.RunFolder.model_prefix`). Output in the
run folder's :attr:`~distill.runfolder.RunFolder.sensitivity_dir`::

    sensitivity.csv     one row per (group, ratio): channels kept, top-1, drop, MACs, latency
    sensitivity.png     top-1 vs ratio, one line per group
    sensitivity.json    the same, the proposal and its measured result
    proposal.yaml       the proposal as a ``pruning:`` section

Example::

    distill sensitivity recipes/prune_channel_mnist.yaml --ratios 0.25 0.5 0.75 --budget 1.0
    distill sensitivity recipes/prune_channel_mnist.yaml --target-latency 0.4 --batch 32
"""
import csv
import json
import logging
import os
import shutil
import tempfile

import mxnet as mx
import numpy as np
import yaml

from ..data import load_data
from ..errors import UserError
from ..graphio import load_pair, make_block, pair_exists, pair_files
from ..recipe import load_recipe
from ..run import resolve_teacher
from ..runfolder import RunFolder
from .base import CRITERIA
from .blocks import rounding
from .gradients import accumulate_grads
from .graph import analyze
from .plan import choose_removed, unit_scores
from .pruner import prunable_layers, resolve_patterns
from .probe import CANDIDATES, Probe, measure_curves, search_target

__all__ = ["add_arguments", "main", "run_sensitivity", "propose", "allowed_groups"]
_LOGGER = logging.getLogger(__name__)
_NOISE = 0.02       # latency differences below 2% of the unpruned network are not counted


def add_arguments(p):
    p.add_argument("recipe", help="the recipe whose network (teacher copy or trained student) to probe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (repeatable)")
    p.add_argument("--ratios", type=float, nargs="+", default=None,
                   help="fractions of each group's channels to remove (default 0.25 0.5 0.75; "
                        "with a target also 0.875, the deepest cut it allocates)")
    p.add_argument("--budget", type=float, default=1.0,
                   help="allowed top-1 drop in points for the proposal (default 1.0)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the latency timing")
    p.add_argument("--repeats", type=int, default=10, help="latency: best of this many repeats")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/sensitivity)")
    t = p.add_argument_group("prune to a target (instead of --budget)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--target-latency", type=float, default=None, metavar="F",
                   help="latency as a fraction of the unpruned model's, e.g. 0.4")
    g.add_argument("--target-macs", type=float, default=None, metavar="F",
                   help="MACs as a fraction of the unpruned model's")
    t.add_argument("--backend", choices=("mxnet", "ncnn"), default="mxnet",
                   help="where latency counts: mxnet (oneDNN-fused) or ncnn (its runtime, 1 thread)")
    t.add_argument("--batch", type=int, choices=(1, 32), default=None,
                   help="latency batch for the target (default --batch-size; ncnn: 1)")
    t.add_argument("--recover-steps", type=int, default=0, metavar="N",
                   help="KD steps on each variant before measuring it (default 0)")
    t.add_argument("--bn-batches", type=int, default=8, metavar="N",
                   help="re-estimate each variant's BatchNorm statistics on 64×N training images "
                        "before measuring it (default 8; 0: keep the unpruned network's)")
    t.add_argument("--candidates", type=int, default=CANDIDATES, metavar="N",
                   help=f"allocations built and measured (latency, KL divergence to the unpruned "
                        f"network), the best on target taken (default {CANDIDATES}; 1: greedy only)")


def main(args):
    targeted = args.target_latency is not None or args.target_macs is not None
    args.ratios = args.ratios or ([0.25, 0.5, 0.75, 0.875] if targeted else [0.25, 0.5, 0.75])
    for r in args.ratios:
        if not 0 < r < 1:
            raise UserError(f"--ratios: each ratio must be in (0, 1), got {r}")
    if args.budget < 0:
        raise UserError(f"--budget must be ≥ 0 points, got {args.budget}")
    target = None
    for key, v in (("latency", args.target_latency), ("macs", args.target_macs)):
        if v is not None:
            if not 0 < v < 1:
                raise UserError(f"--target-{key} is a fraction of the unpruned model's, in (0, 1); "
                                f"got {v}")
            target = (key, v)
    if args.recover_steps < 0:
        raise UserError(f"--recover-steps must be ≥ 0, got {args.recover_steps}")
    if args.candidates < 1:
        raise UserError(f"--candidates must be ≥ 1 (1: the greedy allocation alone), got {args.candidates}")
    if args.bn_batches < 0:
        raise UserError(f"--bn-batches must be ≥ 0 (0: off), got {args.bn_batches}")
    recipe = load_recipe(args.recipe, args.overrides)
    batch = args.batch or args.batch_size
    if target is not None:
        run_sensitivity(recipe, ratios=args.ratios, batch_size=1 if args.backend == "ncnn" else batch,
                        repeats=args.repeats, out=args.out, target=target, backend=args.backend,
                        recover_steps=args.recover_steps, bn_batches=args.bn_batches,
                        candidates=args.candidates)
    else:
        run_sensitivity(recipe, ratios=args.ratios, budget=args.budget, batch_size=args.batch_size,
                        repeats=args.repeats, out=args.out, recover_steps=args.recover_steps,
                        bn_batches=args.bn_batches)
    return 0


def _network(recipe, data):
    """(symbol, params, input name, description) of the network to probe."""
    if recipe.student.from_ == "teacher":
        t = resolve_teacher(recipe, data)
        return t.symbol, dict(t.params), t.input_name, f"teacher ({t.source})"
    prefix = RunFolder(recipe.run_dir).model_prefix
    if not pair_exists(prefix):
        raise UserError(f"sensitivity: `student.model: {recipe.student.model}` has no trained "
                        f"weights yet ({' / '.join(pair_files(prefix))} do not exist). Train it "
                        f"first (python train.py {getattr(recipe, 'source', 'RECIPE')}), or probe a "
                        f"copy of the teacher with `--set student.from=teacher`.")
    sym, params = load_pair(prefix, 0, what="trained student")
    return sym, params, "data", f"trained student {prefix}"


def _grads(sym, params, input_name, data, names, batches=8, batch_size=32):
    """Mean gradients of the cross-entropy over a few training batches (for ``taylor``)."""
    if data.train.y is None:
        raise UserError("sensitivity: criterion taylor needs labels; set `pruning.criterion: l1`.")
    net = make_block(sym, params, input_name, trainable=True)
    pd = net.collect_params()
    acc = {k: mx.nd.zeros(pd[k].shape) for k in names if pd[k].grad_req != "null"}
    n = accumulate_grads(net, data.train.x, data.train.y, acc, seed=0, batches=batches,
                         batch_size=batch_size)
    return {k: v.asnumpy() / max(n, 1) for k, v in acc.items()}


def propose(rows, budget, base_latency, resolution=0.01, min_saving=0.0):
    """Per-group ratios maximizing the latency saving with Σ top-1 drop ≤ ``budget``.

    A multiple-choice knapsack over the measured table (each group: ratio 0 or one measured
    ratio), solved exactly by dynamic programming over the drop in steps of ``resolution``.

    Parameters
    ----------
    rows : list of dict
        ``{"group", "ratio", "drop", "latency_ms"}`` per measurement.
    budget : float
        Allowed summed drop (points).
    base_latency : float
        Latency of the unpruned network.
    min_saving : float
        Savings (ms) at or below this are timing noise, not options.

    Returns
    -------
    dict
        group id → ratio (groups left out: not pruned).
    """
    by_group = {}
    for r in rows:
        saving = base_latency - r["latency_ms"]
        if saving > min_saving and r["drop"] <= budget:
            by_group.setdefault(r["group"], []).append(
                (int(np.ceil(max(r["drop"], 0.0) / resolution - 1e-9)), saving, r["ratio"]))
    cap = int(round(budget / resolution))
    best = {0: (0.0, {})}                         # used drop units -> (saving, choice)
    for gid, options in by_group.items():
        nxt = dict(best)
        for used, (sav, choice) in best.items():
            for cost, s, ratio in options:
                u = used + cost
                if u <= cap and (u not in nxt or nxt[u][0] < sav + s):
                    nxt[u] = (sav + s, {**choice, gid: ratio})
        best = nxt
    return max(best.values(), key=lambda v: v[0])[1]


def run_sensitivity(recipe, ratios=(0.25, 0.5, 0.75), budget=1.0, batch_size=32, repeats=10,
                    out=None, log=print, target=None, backend="mxnet", recover_steps=0, bn_batches=8,
                    candidates=CANDIDATES):
    """Measure the per-group sensitivity table and the proposal (see the module docstring).

    Parameters
    ----------
    target : (str, float), optional
        ``("latency", 0.4)`` or ``("macs", 0.5)``: allocate ratios for this fraction of the
        unpruned model's cost instead of keeping within ``budget``.
    backend : str
        ``mxnet`` or ``ncnn``: where latency is measured.
    recover_steps : int
        KD steps on each variant before it is measured.
    bn_batches : int
        Each variant's BatchNorm statistics re-estimated on ``64 × bn_batches`` training
        images before it is measured (0: off).
    candidates : int
        With a target: allocations built and measured, the best one that lands on the target
        taken (:func:`~distill.pruning.probe.search_target`; 1: the greedy allocation alone).

    Returns
    -------
    dict
        What ``sensitivity.json`` holds.
    """
    out = out or RunFolder(recipe.run_dir).sensitivity_dir
    os.makedirs(out, exist_ok=True)
    data = load_data(recipe.data, seed=recipe.trainer.seed)
    sym, params, input_name, desc = _network(recipe, data)
    shape = (1,) + tuple(data.val.x.shape[1:])
    graph = analyze(sym, shape, input_name)
    cfg = recipe.pruning
    criterion = CRITERIA.get(cfg.criterion, where="pruning.criterion")(**cfg.criterion_options())
    np_params = {k: v.asnumpy() for k, v in params.items()}
    grads = _grads(sym, params, input_name, data, sorted({s.param for s in graph.slices})) \
        if criterion.needs_grad else None
    scores = unit_scores(graph, graph.groups, criterion, np_params, grads,
                         rng=np.random.RandomState(recipe.trainer.seed))
    log(f"sensitivity of {desc}: {len(graph.groups)} coupled groups, ratios {list(ratios)}, "
        f"criterion {cfg.criterion}, round_to {int(rounding(cfg))} ({rounding(cfg).mode})"
        + (f", BatchNorm re-estimated on {64 * bn_batches} training images per variant" if bn_batches else "")
        + (f", {recover_steps} KD recovery steps per variant" if recover_steps else ""))
    tmp = tempfile.mkdtemp(prefix="sens-", dir=out)
    names = {g.id: g.name for g in graph.groups}
    try:
        probe = Probe(graph, params, input_name, data, batch_size, repeats,
                      recipe.trainer.eval_batch_size, tmp, backend=backend,
                      recover_steps=recover_steps, recipe=recipe, seed=recipe.trainer.seed,
                      symbol=sym, bn_batches=bn_batches)
        base = probe.measure(set(), keep_files=True)
        log(f"unpruned: top-1 {base['top1']:.2f}%, {base['macs'] / 1e6:.2f}M MACs, "
            f"{base['latency_ms']:.3f} ms at batch {batch_size} ({backend})")
        if target is not None:
            return _run_target(recipe, probe, sym, graph, scores, base, ratios, target, names,
                               desc, out, log, candidates)
        rows = measure_curves(probe, graph, scores, graph.groups, ratios, rounding(cfg),
                              base["top1"], log)
        for row in rows:
            row["latency_saving"] = round(1 - row["latency_ms"] / base["latency_ms"], 4)
        base["latency_ms"] = min(base["latency_ms"], probe.latency(base["prefix"]))
        # timings closer than this to the unpruned network are noise, not savings
        choice = propose(rows, budget, base["latency_ms"], min_saving=_NOISE * base["latency_ms"])
        result = None
        # check the proposal by measuring it; drop the worst trade while it breaks the budget
        while True:
            removed = choose_removed(graph, scores, choice, rounding(cfg)) if choice else set()
            result = probe.measure(removed, keep_files=True) if removed else dict(base)
            if base["top1"] - result["top1"] <= budget or not choice:
                break
            worst = max(choice, key=lambda gid: next(r["drop"] / max(base["latency_ms"] - r["latency_ms"], 1e-9)
                                                     for r in rows if r["group"] == gid and r["ratio"] == choice[gid]))
            log(f"  proposal measured {base['top1'] - result['top1']:.2f} points down: "
                f"leaving {worst} unpruned")
            choice.pop(worst)
        if choice:
            base_ms, prop_ms = probe.compare(base["prefix"], result["prefix"])
            result["latency_ms"] = prop_ms
            base["latency_ms"] = min(base["latency_ms"], base_ms)
        base.pop("prefix", None)
        result.pop("prefix", None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    proposal = {"ratios": {gid: choice[gid] for gid in sorted(choice, key=lambda k: int(k[1:]))},
                "top1": result["top1"], "drop": round(base["top1"] - result["top1"], 3),
                "macs": result["macs"], "latency_ms": result["latency_ms"],
                "latency_speedup": round(base["latency_ms"] / max(result["latency_ms"], 1e-9), 3),
                "macs_ratio": round(base["macs"] / max(result["macs"], 1), 3)}
    section = _section(cfg, names, proposal["ratios"])
    report = {"network": desc, "criterion": cfg.criterion, "round_to": int(rounding(cfg)),
              "batch_size": batch_size, "budget": budget, "base": base, "rows": rows,
              "proposal": proposal, "recipe_section": {"pruning": section},
              "groups": graph.summary()["groups"], "intact": graph.intact}
    _write(out, report, rows, base, names, section,
           f"# distill sensitivity: within {budget} point(s) of top-1, measured "
           f"{proposal['latency_speedup']}x faster at batch {batch_size} (no fine-tuning yet)\n")
    log(f"proposal (budget {budget} points): {len(choice)} groups pruned → top-1 "
        f"{proposal['top1']:.2f}% ({-proposal['drop']:+.2f}), MACs {proposal['macs_ratio']}× fewer, "
        f"latency {proposal['latency_speedup']}× faster (measured, before fine-tuning)")
    log(f"table, plot and proposal: {out}/ (sensitivity.csv, sensitivity.png, proposal.yaml)")
    return report


def _section(cfg, names, ratios):
    """The ``pruning:`` section of a proposal (one override per pruned group)."""
    return {"enabled": True, "granularity": "channel", "criterion": cfg.criterion,
            "round_to": cfg.round_to, "final_sparsity": 0.0, "exclude": list(cfg.exclude),
            "overrides": [{"layers": names[gid], "final_sparsity": float(r)}
                          for gid, r in ratios.items()]}


def _write(out, report, rows, base, names, section, header):
    with open(os.path.join(out, "sensitivity.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "proposal.yaml"), "w") as f:
        f.write(header)
        yaml.safe_dump({"pruning": section}, f, sort_keys=False)
    _write_csv(os.path.join(out, "sensitivity.csv"), rows)
    _plot(os.path.join(out, "sensitivity.png"), rows, base, names)


def _run_target(recipe, probe, sym, graph, scores, base, ratios, target, names, desc, out, log,
                candidates=CANDIDATES):
    """The ``--target-*`` half of :func:`run_sensitivity` (inside its scratch folder)."""
    cfg = recipe.pruning
    what, fraction = target
    allowed, excluded = allowed_groups(graph, sym, cfg.exclude, cfg.keep_outputs)
    groups = [g for g in graph.groups if g.id in allowed]
    log(f"target: {what} {fraction:g}× the unpruned model's ({probe.backend}, batch "
        f"{probe.batch_size}); {len(groups)} of {len(graph.groups)} groups may be pruned"
        + (f" (excluded: {', '.join(excluded)})" if excluded else ""))
    # the curves rank groups by loss; each variant's own latency is not needed (the model has it)
    rows = measure_curves(probe, graph, scores, groups, ratios, rounding(cfg), base["top1"], log,
                          time=False)
    res = search_target(probe, sym, graph, scores, rows, rounding(cfg), what, fraction, base, names,
                        excluded=excluded, max_ratio=max(ratios), model_repeats=probe.repeats,
                        log=log, candidates=candidates)
    res.pop("prefix", None)
    base.pop("prefix", None)
    for row in rows:
        row["latency_saving"] = None
    chosen = {gid: res["ratios"][gid] for gid in sorted(res["ratios"], key=lambda k: int(k[1:]))}
    section = _section(cfg, names, chosen)
    proposal = dict(res, ratios=chosen, drop=round(base["top1"] - res["top1"], 3),
                    macs_ratio=round(base["macs"] / max(res["macs"], 1), 3),
                    latency_speedup=round(res["base_ms"] / max(res["measured_ms"], 1e-9), 3))
    report = {"network": desc, "criterion": cfg.criterion, "round_to": int(rounding(cfg)),
              "batch_size": probe.batch_size, "backend": probe.backend,
              "target": {what: fraction}, "recover_steps": probe.recover_steps,
              "bn_batches": probe.bn_batches, "candidates": candidates, "base": base,
              "rows": rows, "proposal": proposal, "recipe_section": {"pruning": section},
              "groups": graph.summary()["groups"], "intact": graph.intact}
    err = proposal.get("model_error")
    _write(out, report, rows, base, names, section,
           f"# distill sensitivity: target {what} {fraction:g}x ({probe.backend}, batch "
           f"{probe.batch_size}); predicted {proposal['predicted']:.3f}x, measured "
           f"{proposal['measured']:.3f}x; top-1 {proposal['top1']:.2f}% before fine-tuning\n")
    lat = (f"latency predicted {proposal['predicted_ms']:.3f} ms, measured {proposal['measured_ms']:.3f} ms "
           f"vs {proposal['base_ms']:.3f} ms unpruned (model error {err:+.1%})"
           if err is not None else
           f"latency measured {proposal['measured_ms']:.3f} ms vs {proposal['base_ms']:.3f} ms unpruned")
    log(f"proposal (target {what} {fraction:g}×): {len(chosen)} groups pruned → {what} "
        f"{proposal['measured']:.3f}× measured ({proposal['predicted']:.3f}× predicted), MACs "
        f"{proposal['macs_ratio']}× fewer, {lat}; top-1 {proposal['top1']:.2f}% "
        f"({-proposal['drop']:+.2f}) before fine-tuning (predicted drop {proposal['predicted_drop']:.2f})")
    log(f"table, plot and proposal: {out}/ (sensitivity.csv, sensitivity.png, proposal.yaml)")
    return report


def allowed_groups(graph, symbol, exclude, keep_outputs=()):
    """``(group ids that may be pruned, excluded layer names)``: a group that an excluded layer
    produces or reads is kept whole, and one a ``keep_outputs`` layer produces, as the channel
    pruner does."""
    layers = prunable_layers(symbol)
    hits = resolve_patterns(exclude, layers, "pruning.exclude")
    excluded = sorted({l for h in hits.values() for l in h})
    kept = {l for h in resolve_patterns(list(keep_outputs), layers, "pruning.keep_outputs").values()
            for l in h}
    prunable = {l for l, _, _ in layers}
    allowed = {g.id for g in graph.groups
               if any(p in prunable for p in g.producers) and not any(l in excluded for l in g.layers)
               and not any(p in kept for p in g.producers)}
    return allowed, excluded


def _write_csv(path, rows):
    cols = ["group", "name", "layers", "channels", "units", "ratio", "kept", "top1", "drop", "macs",
            "latency_ms", "latency_saving"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in cols})


def _plot(path, rows, base, names):
    import matplotlib          # lazy: only this plot needs it, and it is slow to import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors
    for n, gid in enumerate(dict.fromkeys(r["group"] for r in rows)):
        pts = [(0.0, base["top1"])] + [(r["ratio"], r["top1"]) for r in rows if r["group"] == gid]
        ax.plot(*zip(*pts), marker="o", color=colors[n % 20], linestyle=("-", "--", ":")[n // 20 % 3],
                label=f"{gid} {names[gid][-28:]}")
    ax.set_xlabel("fraction of the group's channels removed (no fine-tuning)")
    ax.set_ylabel("top-1 %")
    ax.set_title("channel-pruning sensitivity per coupled group")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
