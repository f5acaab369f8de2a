"""Variants of one network, shrunk, optionally recovered, evaluated and timed; and the search
that turns their sensitivity curves into per-group ratios for a target.

:class:`Probe` is what ``distill sensitivity`` measures with: it cuts units out
(:func:`~distill.pruning.apply.shrink`), optionally fine-tunes the variant for a few steps with
the unpruned network's soft targets (``recover_steps``: so that the curves rank what
fine-tuning cannot fix, not what a few epochs of distillation give back), and measures top-1,
MACs and latency on the backend the user deploys on (``mxnet``: oneDNN-fused; ``ncnn``: its
runtime, one thread, batch 1, in a child process through
:func:`distill.export.ncnn_worker.run_tasks`, so a crash in it cannot kill this one).

:func:`search_target` allocates ratios with :func:`distill.pruning.target.allocate` over the
per-layer latency model (:class:`~distill.pruning.latency_model.LayerLatencyModel`) or exact
MACs into several candidate allocations, builds and measures each (KL divergence to the
unpruned network after BatchNorm re-estimation, latency against the unpruned network in
alternating rounds), takes the best one that lands on the target, and refits the model and
corrects the goal when none does.
"""
import json
import logging
import os
from types import SimpleNamespace

import mxnet as mx
import numpy as np

from ..data.stream import take as take_rows
from ..errors import UserError
from ..graphio import make_block, pair_files
from ..modelinfo import layer_table, measure_latency, total_macs
from ..replicas import first
from .apply import internal_outputs, shrink, shrunk_block
from .blocks import rounding
from .latency_model import LayerLatencyModel, NcnnLayerTimer
from .plan import choose_removed, removal_cache
from .pruner import prunable_layers
from .target import allocate, candidate_allocations, curves_from_rows, group_levels, macs_cost, unreachable_error

__all__ = ["Probe", "search_target", "measure_curves", "target_ratios", "TOLERANCE"]
_LOGGER = logging.getLogger(__name__)

#: a measured proposal further than this (relative) from the target is re-allocated
TOLERANCE = 0.05
#: ... and a candidate faster than the target by more than this is not taken (it is logged)
BELOW = 0.10
#: allocations measured per search attempt, the best taken (:func:`search_target`)
CANDIDATES = 12
#: training images a candidate allocation's fidelity to the unpruned network is measured on
FIDELITY_IMAGES = 1024


class Probe:
    """Shrinks, (recovers,) evaluates and times variants of one network.

    Parameters
    ----------
    graph : ChannelGraph
    params : dict
        name → NDArray of the unpruned network.
    input_name : str
    data : DataBundle
    batch_size : int
        Latency batch (ncnn: always 1 image).
    repeats : int
    eval_batch_size : int
    tmp : str
        Scratch folder for the exported variants.
    backend : str
        ``mxnet`` or ``ncnn``.
    recover_steps : int
        KD steps on each variant before it is evaluated (0: none).
    bn_batches : int
        ``64 × bn_batches`` training images whose statistics replace every BatchNorm's running
        mean and variance in each variant before it is evaluated (0: keep the unpruned network's). Cutting a
        layer's inputs shifts the statistics of its output: without this, a variant's drop is
        mostly stale BatchNorm, which a fine-tune fixes in a few steps (EagleEye's adaptive BN,
        Li et al. 2020).
    recipe : Recipe, optional
        For the ncnn export's metadata.
    eval_limit : int, optional
        Evaluate on the first this many held-out images only.
    seed : int
    symbol : mx.sym.Symbol, optional
        The unpruned network (the soft targets of ``recover_steps``).
    """

    def __init__(self, graph, params, input_name, data, batch_size, repeats, eval_batch_size, tmp,
                 backend="mxnet", recover_steps=0, recipe=None, eval_limit=None, seed=0, symbol=None,
                 bn_batches=0):
        self.graph, self.params, self.input_name, self.data = graph, params, input_name, data
        self.batch_size, self.repeats, self.eval_batch_size = batch_size, repeats, eval_batch_size
        self.tmp, self.backend, self.recover_steps = tmp, backend, recover_steps
        self.bn_batches = int(bn_batches)
        self.recipe, self.seed, self.symbol = recipe, seed, symbol
        # sensitivity drops rank the cuts: a choice, so they read data.selection (a holdout of
        # the training images when val is a test set, as fashion_mnist's is; else val)
        sel = data.selection
        self.val = sel
        if eval_limit and len(sel.x) > eval_limit:
            self.val = SimpleNamespace(x=take_rows(sel.x, np.arange(eval_limit)), y=None if sel.y is None
                                       else sel.y[:eval_limit])
        self.n = 0
        self._teacher = None
        self._ncnn = {}
        self.shape = tuple(data.val.x.shape[1:])

    # -- variants ---------------------------------------------------------------------------------
    def export(self, removed):
        sym, params = shrink(self.graph, self.params, removed)
        if self.bn_batches and removed:
            params = recalibrate_bn(sym, params, self.input_name, self._bn_images())
        net = shrunk_block(sym, params, self.input_name)
        if self.recover_steps and removed:
            self._recover(net)
        self.n += 1
        prefix = os.path.join(self.tmp, f"v{self.n}")
        net(mx.nd.array(self.data.val.x[:1]))
        net.export(prefix, epoch=0)
        return sym, net, prefix

    def _bn_images(self):
        """The ``64 × bn_batches`` training images every variant's BatchNorm is re-estimated on
        (drawn once: the same images for every variant)."""
        if getattr(self, "_bn_x", None) is None:
            n = len(self.data.train.x)
            idx = np.random.RandomState(self.seed).choice(n, min(n, 64 * self.bn_batches), replace=False)
            from ..quantize.calibrators import gather_images    # lazy: quantize imports the trainer
            # one forward pass over all of them (recalibrate_bn), read 64 at a time
            self._bn_idx, self._bn_x = idx, gather_images(self.data.train.x, idx, 64)
        return self._bn_x

    def _recover(self, net, temperature=4.0, batch=32, lr=1e-3):
        """A short KD fine-tune of ``net`` toward the unpruned network's soft targets."""
        if self._teacher is None:
            self._teacher = make_block(self.symbol, self.params, self.input_name)
        x_all = self.data.train.x
        rng = np.random.RandomState(self.seed)
        trainer = mx.gluon.Trainer(net.collect_params(), "adam", {"learning_rate": lr})
        for _ in range(self.recover_steps):
            x = mx.nd.array(x_all[rng.randint(0, len(x_all), batch)])
            p_t = mx.nd.softmax(self._teacher(x) / temperature)
            # BatchNorm in inference mode: a few noisy batches must not overwrite its statistics
            with mx.autograd.record(train_mode=False):
                loss = -(p_t * mx.nd.log_softmax(net(x) / temperature)).sum(axis=1).mean()
            loss.backward()
            trainer.step(1)

    def latency(self, prefix):
        """Best-of-``repeats`` ms of the exported pair at ``prefix`` on the backend."""
        if self.backend == "ncnn":
            return self._ncnn_latency(prefix)
        lat = measure_latency(prefix, self.shape, batch_sizes=(self.batch_size,), repeats=self.repeats)
        return lat[f"b{self.batch_size}"]

    def _ncnn_latency(self, prefix):
        from ..export.ncnn_pnnx import onnx_to_ncnn
        from ..export.ncnn_worker import NcnnWorkerError, run_tasks
        from ..export.onnx_fp32 import export_onnx
        if prefix not in self._ncnn:
            recipe = self.recipe
            if recipe is None:              # only the ONNX file's metadata reads its name
                recipe = SimpleNamespace(name="sensitivity")
            job = SimpleNamespace(prefix=prefix, source=SimpleNamespace(prefix=prefix, sha256=""),
                                  input_shape=self.shape, recipe=recipe, data=self.data)
            onnx_path = export_onnx(job, prefix + ".onnx")
            self._ncnn[prefix] = onnx_to_ncnn(onnx_path, self.shape, prefix + ".ncnn.param",
                                              prefix + ".ncnn.bin", work_dir=self.tmp)
        param, bin_ = self._ncnn[prefix]
        task = {"task": "latency", "param": param, "bin": bin_, "x": "x", "repeats": self.repeats,
                "threads": 1}
        try:
            res = run_tasks([task], {"x": self.data.val.x[:1].astype(np.float32)}, self.tmp)
        except NcnnWorkerError as e:
            raise UserError(f"sensitivity --backend ncnn: ncnn's runtime failed on the variant "
                            f"{prefix}: {e}. Use --backend mxnet, or export the unpruned model "
                            f"(`distill export --format ncnn`) to see the failing layer.") from None
        return float(res[0]["meta"]["ms"])

    def _fidelity_images(self):
        """Up to ``FIDELITY_IMAGES`` training images, none of those BatchNorm is re-estimated on
        (drawn once)."""
        if getattr(self, "_fid_x", None) is None:
            x = self.data.train.x
            rest = np.arange(len(x))
            if self.bn_batches:
                self._bn_images()
                rest = np.setdiff1d(rest, self._bn_idx)
            if len(rest) == 0:
                rest = np.arange(len(x))
            rng = np.random.RandomState(self.seed + 1)
            self._fid_x = take_rows(x, np.sort(rng.choice(rest, min(len(rest), FIDELITY_IMAGES), replace=False)))
        return self._fid_x

    def fidelity(self, net):
        """``(kl, agree)`` of ``net`` against the unpruned network on training images: the mean
        KL divergence of its softmax from the unpruned network's, and the fraction of images
        where both give the same class (:func:`distill.quantize.scoring.output_shift`). A
        candidate is chosen by this, not by the held-out top-1 that reports the result."""
        from ..quantize.scoring import output_shift     # lazy: both import the trainer
        from ..trainer import predict
        x = self._fidelity_images()
        if getattr(self, "_ref_logits", None) is None:
            sym, params = shrink(self.graph, self.params, set())
            self._ref_logits = predict(shrunk_block(sym, params, self.input_name), x, self.eval_batch_size)
        kl, changed = output_shift(self._ref_logits, predict(net, x, self.eval_batch_size))
        return kl, 1.0 - changed / 100.0

    def measure(self, removed, keep_files=False, time=True, fidelity=False):
        sym, net, prefix = self.export(removed)
        from ..trainer import evaluate            # lazy: the trainer imports the pruning package
        top1 = evaluate(net, self.val, self.eval_batch_size)
        out = {"top1": round(top1, 3), "macs": int(total_macs(sym, (1,) + self.shape, self.input_name)),
               "latency_ms": self.latency(prefix) if time else None}
        if fidelity:
            out["kl"], out["agree"] = self.fidelity(net)
        if keep_files:
            out["prefix"] = prefix
        else:
            for f in pair_files(prefix):
                os.unlink(f)
        return out

    def compare(self, a, b, rounds=3):
        """Best latency of two exported variants timed in alternating rounds (a busy machine
        slows both alike)."""
        la, lb = [], []
        for _ in range(rounds):
            la.append(self.latency(a))
            lb.append(self.latency(b))
        return min(la), min(lb)


def recalibrate_bn(sym, params, input_name, x):
    """``params`` with every BatchNorm's running mean and variance replaced by the statistics of
    the images ``x``, the layers before each BatchNorm already re-estimated: one forward pass in
    training mode, where each BatchNorm normalises with the statistics of its own input, gives
    every BatchNorm's input as the recalibrated network computes it. Returns a new dict;
    ``params`` is not changed."""
    nodes = json.loads(sym.tojson())["nodes"]
    bns = [n for n in nodes if n["op"] == "BatchNorm"]
    if not bns:
        return dict(params)
    srcs = []
    for n in bns:
        src = nodes[n["inputs"][0][0]]
        srcs.append(src["name"] if src["op"] == "null" else f"{src['name']}_output")
    out = dict(params)
    for n, h in zip(bns, internal_outputs(sym, params, input_name, srcs, x, train_mode=True)):
        h = h.astype(np.float64)
        axis = int(n.get("attrs", {}).get("axis", 1))
        axes = tuple(a for a in range(h.ndim) if a != axis % h.ndim)
        mean_name, var_name = nodes[n["inputs"][3][0]]["name"], nodes[n["inputs"][4][0]]["name"]
        out[mean_name] = mx.nd.array(h.mean(axis=axes).astype(np.float32))
        out[var_name] = mx.nd.array(h.var(axis=axes).astype(np.float32))
    return out


def measure_curves(probe, graph, scores, groups, ratios, round_to, base_top1, log=print, time=True):
    """Sensitivity rows: each group in ``groups`` pruned alone at each ratio."""
    rows = []
    for g in groups:
        seen = set()
        for r in ratios:
            removed = choose_removed(graph, scores, {g.id: r}, round_to)
            key = frozenset(removed)
            if not removed or key in seen:      # rounding left nothing, or a repeat
                continue
            seen.add(key)
            m = probe.measure(removed, time=time)
            kept = len(g.units) - len(removed & set(g.units.tolist()))
            row = {"group": g.id, "name": g.name, "layers": len(g.producers),
                   "channels": g.channels, "units": len(g.units), "ratio": r, "kept": kept,
                   "top1": m["top1"], "drop": round(base_top1 - m["top1"], 3),
                   "macs": m["macs"], "latency_ms": m["latency_ms"]}
            rows.append(row)
            lat = f"{m['latency_ms']:8.3f} ms" if m["latency_ms"] is not None else ""
            log(f"  {g.id:>4} {g.name[:44]:44} {r:4.2f} kept {kept:4d}/{len(g.units):<4d} "
                f"top-1 {m['top1']:6.2f} ({0.0 - row['drop']:+.2f})  MACs {m['macs'] / 1e6:7.2f}M  {lat}")
    return rows


def _timed_against_base(probe, base, removed):
    """``(unpruned ms, variant ms)``: the variant without ``removed`` exported and timed in
    alternating rounds against the unpruned network (``base["prefix"]``); its files removed."""
    v = probe.measure(removed, keep_files=True, time=False)
    try:
        return probe.compare(base["prefix"], v["prefix"])
    finally:
        _drop_files(v)


def search_target(probe, symbol, graph, scores, rows, round_to, what, fraction, base, names,
                  excluded=(), max_ratio=0.75, model_repeats=10, corrections=2, log=print,
                  latency_model=None, time_macs=True, candidates=CANDIDATES):
    """Allocate ratios for ``what`` (``latency`` or ``macs``) ``fraction`` and check them.

    Parameters
    ----------
    probe : Probe
    symbol : mx.sym.Symbol
        The unpruned network.
    rows : list of dict
        Sensitivity rows (:func:`measure_curves`).
    base : dict
        The unpruned network's measurement, with ``prefix`` (kept files).
    latency_model : LayerLatencyModel, optional
        Built here when not given.
    time_macs : bool
        For a MACs target, also time the proposal against the unpruned network.
    candidates : int
        Allocations measured per attempt (:func:`~distill.pruning.target.candidate_allocations`):
        each combined network is built, its BatchNorm re-estimated, timed against the unpruned
        one, and scored by its KL divergence to the unpruned network on training images
        (:meth:`Probe.fidelity`); the closest to the unpruned network whose measured resource is
        within ``-BELOW``/``+TOLERANCE`` of the target is taken. 1: the greedy allocation alone.
        When none lands, the latency model is refitted through every timed variant (least
        squares) and the goal corrected, up to ``corrections`` times.

    Returns
    -------
    dict
        ``ratios`` (group id → ratio), ``kind`` (how the allocation was made), ``predicted``
        (fraction), ``measured`` (fraction), ``predicted_ms``/``measured_ms``/``base_ms``
        (latency), ``model_error`` (relative), ``model_errors`` (over every candidate timed),
        ``coverage``, ``macs``, ``top1``, ``kl``/``agree``, ``candidates`` (each measured one)
        and ``prefix`` of the proposal.
    """
    curves = curves_from_rows(rows)
    levels = group_levels(graph, round_to, curves, max_ratio)
    shape = (1,) + probe.shape
    info = {}
    points = []          # (removed units, measured fraction) of every timed variant: the model's refit
    if what == "macs":
        table = layer_table(symbol, shape, probe.input_name)
        layer_macs = {r["name"]: r["macs"] for r in table}
        weight_of = {l: w for l, w, _ in prunable_layers(symbol)}
        cost = macs_cost(graph, layer_macs, weight_of, scores, round_to)
    else:
        mx_batch = 1 if probe.backend == "ncnn" else probe.batch_size
        # each layer timed alone where the network will run: oneDNN-fused MXNet, or ncnn's
        # runtime (one thread), where fixed per-layer costs weigh far more than in MXNet
        model = latency_model
        if model is None:
            timer = NcnnLayerTimer(probe.tmp, repeats=model_repeats) if probe.backend == "ncnn" else None
            model = LayerLatencyModel(graph, symbol, shape, probe.input_name, batch=mx_batch,
                                      repeats=model_repeats, timer=timer)
            if timer is not None:
                n = model.prefetch(choose_removed(graph, scores, {g: r}, round_to)
                                   for g, lv in levels.items() for r in lv)
                log(f"latency model: {n} layer widths timed alone in ncnn's runtime (one thread)")
        # the second calibration point: every allowed group at half its channels
        half = choose_removed(graph, scores, {g: 0.5 for g in levels}, round_to)
        b_ms, v_ms = _timed_against_base(probe, base, half)
        a, c = model.calibrate(b_ms, (half, v_ms))
        points.append((half, v_ms / max(b_ms, 1e-9)))
        info["coverage"] = round(model.coverage(), 4)
        info["calibration"] = {"base_ms": b_ms, "half_ms": v_ms, "scale": round(a, 4),
                               "rest_ms": round(c, 4)}
        where = "ncnn, one thread" if isinstance(getattr(model, "timer", None), NcnnLayerTimer) else "MXNet"
        log(f"latency model: Σ of {len(model.specs)} layers timed alone ({where}, batch {mx_batch}) = "
            f"{model.base_layers_ms:.3f} ms, {model.coverage():.0%} of the measured {b_ms:.3f} ms "
            f"{probe.backend} graph; fitted to it and to every group at half width ({v_ms:.3f} ms): "
            f"{a:.3f} × Σ layers + {c:.3f} ms")

        removed_of = removal_cache(graph, scores, round_to)     # asked for many times

        def cost(ratios):
            return model.predict(removed_of(ratios))
    goal = fraction
    result = None
    if what != "macs":
        try:
            allocate(levels, curves, cost, goal, what, names, excluded)
        except UserError as e:
            # the model's floor is a prediction: time the deepest cut itself, and refit the
            # model through it when it is closer to the target than the model says
            deepest = choose_removed(graph, scores, {g: lv[-1] for g, lv in levels.items()}, round_to)
            b_ms, d_ms = _timed_against_base(probe, base, deepest)
            reach = d_ms / max(b_ms, 1e-9)
            log(f"latency model: its floor is {e.reachable:.3f}×; the deepest cut measured "
                f"{reach:.3f}× ({d_ms:.3f} vs {b_ms:.3f} ms)")
            if reach > fraction * (1 + TOLERANCE):
                raise unreachable_error(what, fraction, reach, e.where, f"Measured, the deepest "
                                        f"cut runs at {reach:.3f}× ({probe.backend})") from None
            a, c = model.calibrate(b_ms, (deepest, d_ms))
            points.append((deepest, reach))
            info["calibration"].update({"deepest_ms": d_ms, "scale": round(a, 4), "rest_ms": round(c, 4),
                                        "refit": "deepest"})
            log(f"latency model: refitted to the unpruned graph and the deepest cut: "
                f"{a:.3f} × Σ layers + {c:.3f} ms")
    lo, hi = fraction * (1 - BELOW), fraction * (1 + TOLERANCE)

    def in_band(r):         # a MACs target has no lower bound: fewer MACs are never slower
        return r["measured"] <= hi + 1e-9 and (what == "macs" or r["measured"] >= lo)
    everything, refined = [], False          # every candidate measured; one refinement at most
    seen_nets = set()
    for attempt in range(corrections + 1):
        try:
            cands = _candidates(levels, curves, cost, goal, what, names, excluded, candidates, attempt)
        except UserError as e:
            if result is None:
                raise
            # the corrected goal is out of the model's reach: try the deepest cuts once
            reach = getattr(e, "reachable", None)
            if reach is None or reach >= result["predicted"] - 1e-6:
                break
            goal = reach
            cands = _candidates(levels, curves, cost, goal, what, names, excluded, candidates, attempt)
        tried = []
        for i, (kind, alloc) in enumerate(cands):
            removed = choose_removed(graph, scores, dict(alloc), round_to) if alloc else set()
            if frozenset(removed) in seen_nets:     # the same network as an earlier candidate
                continue
            seen_nets.add(frozenset(removed))
            m = probe.measure(removed, keep_files=True, time=False, fidelity=len(cands) > 1)
            b_ms = p_ms = pred_ms = None
            if what == "macs":
                measured = m["macs"] / max(base["macs"], 1)
            else:
                b_ms, p_ms = probe.compare(base["prefix"], m["prefix"])
                b_ms = min(b_ms, base["latency_ms"])
                measured = p_ms / max(b_ms, 1e-9)
                pred_ms = alloc.cost * b_ms / max(alloc.base, 1e-9)
                points.append((removed, measured))
            row = {"kind": kind, "ratios": dict(alloc), "predicted": round(alloc.fraction, 4),
                   "measured": round(measured, 4), "goal": round(goal, 4), "top1": m["top1"],
                   "macs": m["macs"], "base_ms": b_ms, "measured_ms": p_ms,
                   "predicted_ms": None if pred_ms is None else round(pred_ms, 4),
                   "predicted_drop": round(alloc.drop, 3), "kl": m.get("kl"), "agree": m.get("agree"),
                   "attempts": attempt + 1, "prefix": m["prefix"]}
            if pred_ms is not None:
                row["model_error"] = round((pred_ms - p_ms) / max(p_ms, 1e-9), 4)
            tried.append(row)
            log(f"  allocation {attempt + 1}, candidate {i + 1}/{len(cands)} ({kind}): {len(alloc)} groups "
                f"pruned, predicted {alloc.fraction:.3f}× {what}, measured {measured:.3f}×"
                + (f" ({p_ms:.3f} vs {b_ms:.3f} ms, model error {row['model_error']:+.1%})"
                   if p_ms is not None else "")
                + (f", KL {row['kl']:.4f} to the unpruned network" if row["kl"] is not None else "")
                + (f" (same class on {row['agree']:.1%})" if row["agree"] is not None else "")
                + f", top-1 {m['top1']:.2f}% before fine-tuning")
        if not tried:                               # nothing new to measure
            break
        inside = [r for r in tried if in_band(r)]
        pick = min(inside, key=_fidelity_key) if inside else None
        closest = min(tried, key=lambda r: abs(r["measured"] - fraction))
        everything += tried
        landed = result is not None and in_band(result)
        if pick is not None:
            take = not landed or _fidelity_key(pick) < _fidelity_key(result)
        else:
            take = not landed and (result is None or
                                   abs(closest["measured"] - fraction) < abs(result["measured"] - fraction))
        if take:
            if result is not None:
                _drop_files(result)
            result = dict(pick or closest, **info)
        for r in tried:
            if r["prefix"] != result["prefix"]:
                _drop_files(r)
        result["candidates"] = [{k: v for k, v in r.items() if k != "prefix"} for r in everything]
        errs = [abs(r["model_error"]) for r in everything if "model_error" in r]
        if errs:
            result["model_errors"] = {"n": len(errs), "mean_abs": round(float(np.mean(errs)), 4),
                                      "max_abs": round(float(np.max(errs)), 4)}
        if pick is not None:
            faster = [r for r in tried if r["measured"] < lo and _fidelity_key(r) < _fidelity_key(result)]
            slower = [r for r in tried if r["measured"] > hi + 1e-9 and _fidelity_key(r) < _fidelity_key(result)]
            if len(everything) > 1:
                where = (f"candidate {tried.index(pick) + 1} ({pick['kind']})" if result["prefix"] == pick["prefix"]
                         else f"the {result['kind']} candidate of allocation {result['attempts']}")
                log(f"  chosen: {where}, the closest to the unpruned network of the "
                    f"{sum(1 for r in everything if in_band(r))} within {-BELOW:+.0%}/{TOLERANCE:+.0%} of the target")
            for r in faster:
                log(f"  note: candidate {tried.index(r) + 1} ({r['kind']}) runs at {r['measured']:.3f}×, "
                    f"beyond the target, and scores better: ask for {what} {r['measured']:.2f} to get it")
            # a candidate closer to the unpruned network missed the band on the slow side: the
            # model is biased there (its candidates all measure slower than predicted, say);
            # refit it through every timed candidate and measure one more set, aimed anew
            if not slower or refined or what == "macs" or attempt >= corrections:
                break
            refined = True
            a, c = model.refit(points)
            info["calibration"].update({"scale": round(a, 4), "rest_ms": round(c, 4), "refit_points": len(points)})
            r = min(slower, key=_fidelity_key)
            log(f"  candidate {tried.index(r) + 1} ({r['kind']}) scores better but runs at {r['measured']:.3f}×, "
                f"over the target: refitted the latency model through {len(points)} timed variants "
                f"({a:.3f} × Σ layers + {c:.3f} ms); measuring a second set of candidates")
            continue
        if what == "macs":
            break
        # none landed: refit the model through every timed candidate and aim the prediction
        # where the closest one's measurement says the target lies
        a, c = model.refit(points)
        info["calibration"].update({"scale": round(a, 4), "rest_ms": round(c, 4), "refit_points": len(points)})
        pf = cost(dict(closest["ratios"])) / max(cost({}), 1e-12)
        nxt = fraction * pf / max(closest["measured"], 1e-9)
        log(f"latency model: no candidate within {-BELOW:+.0%}/{TOLERANCE:+.0%} of the target; refitted "
            f"through {len(points)} timed variants ({a:.3f} × Σ layers + {c:.3f} ms), aiming at {nxt:.3f}×")
        if not 0 < nxt < 1 or abs(nxt / goal - 1) < 1e-3:
            break
        goal = nxt
    if what != "macs" and not in_band(result):
        result["missed"] = True
        log(f"WARNING: pruning target {what} {fraction:g}× not met: the closest allocation measured "
            f"{result['measured']:.3f}× ({probe.backend}; predicted {result['predicted']:.3f}×, the "
            f"latency model is off by {result.get('model_error', float('nan')):+.0%} there). It is "
            f"used as it is; ask for a target nearer the measured one, or use --backend mxnet.")
    if what == "macs" and time_macs and result.get("prefix"):
        result["base_ms"], result["measured_ms"] = probe.compare(base["prefix"], result["prefix"])
    return result


def _fidelity_key(row):
    """Candidates rank by their KL divergence to the unpruned network (the predicted drop when
    not measured), then by the predicted drop."""
    return (row["kl"] if row.get("kl") is not None else row["predicted_drop"], row["predicted_drop"])


def _drop_files(row):
    for f in pair_files(row["prefix"]):
        if os.path.exists(f):
            os.unlink(f)


def _candidates(levels, curves, cost, goal, what, names, excluded, n, seed):
    """The allocations a search attempt measures: one (the greedy search with its uniform floor)
    or ``n`` (:func:`~distill.pruning.target.candidate_allocations`)."""
    if n <= 1:
        return [("greedy", allocate(levels, curves, cost, goal, what, names, excluded))]
    return candidate_allocations(levels, curves, cost, goal, n, seed, what, names, excluded)



def target_ratios(pruner, ratios=(0.25, 0.5, 0.75, 0.875), eval_limit=1000, repeats=5, log=None):
    """``pruning.target`` at the start of a run: group id → ratio allocated for the target.

    Measures the sensitivity curves of the pruner's network as it starts (the student copied
    from the teacher, or its initialisation), allocates with :func:`search_target` and writes
    the result to the run folder (``pruning-target.json``); a resumed run reads it back.

    Parameters
    ----------
    pruner : ChannelPruningModifier
        After its graph analysis (``pruner.graph``, ``symbol``, ``params``, ``data``).
    """
    import json
    import shutil
    import tempfile
    from .base import CRITERIA
    from .plan import unit_scores
    log = log or pruner.log
    cfg, t = pruner.cfg, pruner.cfg.target
    what, fraction = ("latency", t.latency) if t.latency is not None else ("macs", t.macs)
    key = {"target": {what: fraction, "backend": t.backend, "batch": t.batch, "bn_batches": t.bn_batches,
                      "candidates": t.candidates},
           "round_to": int(rounding(cfg)), "round_mode": rounding(cfg).mode, "exclude": list(cfg.exclude),
           "groups": [g.id for g in pruner.graph.groups]}
    path = pruner.folder.target_path
    if os.path.isfile(path):
        try:
            with open(path) as f:
                saved = json.load(f)
            if all(saved.get(k) == v for k, v in key.items()):
                log(f"pruning: target {what} {fraction:g}×: allocation of {path} (made at the start)")
                return {g.id: float(saved["ratios"].get(g.id, 0.0)) for g in pruner.graph.groups}
        except (OSError, ValueError):
            pass
    graph = pruner.graph
    params = {n: first(p) for n, p in pruner.params.items()}     # replica 0: all are identical
    # the allocation ranks channels as the schedule will; taylor's gradients are not at hand
    # before training, so it ranks them by their filters' L1 norm
    crit = pruner.criterion if not pruner.criterion.needs_grad else CRITERIA.get("l1")()
    np_params = {k: v.asnumpy() for k, v in params.items()}
    scores = unit_scores(graph, graph.groups, crit, np_params, None,
                         rng=np.random.RandomState(pruner.seed))
    groups = [g for g in graph.groups if pruner.prunable(g)]
    names = {g.id: g.name for g in graph.groups}
    batch = 1 if t.backend == "ncnn" else t.batch
    os.makedirs(pruner.folder.path, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="target-", dir=pruner.folder.path)
    try:
        probe = Probe(graph, params, pruner.input_name, pruner.data, batch, repeats, 256, tmp,
                      backend=t.backend, eval_limit=eval_limit, seed=pruner.seed,
                      symbol=pruner.symbol, recipe=getattr(pruner, "recipe", None),
                      bn_batches=t.bn_batches)
        base = probe.measure(set(), keep_files=True, time=what != "macs")
        log(f"pruning: target {what} {fraction:g}× ({t.backend}, batch {batch}): measuring "
            f"{len(groups)} groups at ratios {list(ratios)} (top-1 {base['top1']:.2f}% on "
            f"{len(probe.val.x)} held-out images unpruned)")
        rows = measure_curves(probe, graph, scores, groups, ratios, rounding(cfg), base["top1"],
                              log=_LOGGER.info, time=False)
        res = search_target(probe, pruner.symbol, graph, scores, rows, rounding(cfg), what, fraction,
                            base, names, excluded=pruner.excluded, max_ratio=max(ratios),
                            model_repeats=repeats, log=log, time_macs=False,
                            candidates=t.candidates)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res.pop("prefix", None)
    out = {g.id: float(res["ratios"].get(g.id, 0.0)) for g in graph.groups}
    with open(path, "w") as f:
        json.dump({**key, "ratios": res["ratios"], "result": res, "rows": rows}, f, indent=1)
    log(f"pruning: target {what} {fraction:g}×: {len(res['ratios'])} groups pruned, "
        f"{what} {res['measured']:.3f}× measured ({res['predicted']:.3f}× predicted): "
        + ", ".join(f"{gid} {r:.2f}" for gid, r in res["ratios"].items()) + f" ({path})")
    return out
