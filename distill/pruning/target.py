"""Prune to a target: per-group ratios that meet a latency or MACs fraction with the least
predicted loss.

The sensitivity curves (top-1 drop of each coupled group pruned alone at a few ratios,
:mod:`distill.pruning.sensitivity`, optionally after a short KD recovery) predict the loss of an
allocation as the sum of its groups' interpolated drops. The resource is computed exactly for
every candidate (MACs from the layer table and the plan) or from the per-layer latency model
(:class:`~distill.pruning.latency_model.LayerLatencyModel`), so interactions between groups (a
conv between two pruned groups loses on both sides) are counted. The search is greedy on the
marginal trade, as NetAdapt (Yang et al., 2018) does: from the unpruned network, repeatedly take
the one-step deeper cut (one more multiple of ``round_to`` channels) of the group with the least
predicted drop per unit of resource saved, until the target is met; then undo the cuts the
target no longer needs (the last step may overshoot), the largest predicted gain first. The
shallowest uniform cut that meets the target is scored by the same predictions, and taken when it
is predicted to lose less.

Recipe example::

    pruning:
      enabled: true
      granularity: channel
      round_to: 8
      exclude: [last]
      target: {latency: 0.4, backend: mxnet, batch: 32}
"""
import logging

import numpy as np

from ..errors import UserError
from .apply import param_keeps
from .plan import choose_removed, removal_cache, round_keep

__all__ = ["allocate", "group_levels", "predicted_drop", "curves_from_rows", "macs_cost",
           "uniform_allocation", "unreachable_error", "candidate_allocations", "Allocation"]
_LOGGER = logging.getLogger(__name__)


class Allocation(dict):
    """group id → ratio, with ``cost`` (resource of the allocation), ``base`` (unpruned),
    ``fraction`` (cost / base) and ``drop`` (predicted Σ drop, points)."""
    cost = base = fraction = drop = 0.0


def curves_from_rows(rows):
    """group id → sorted ``[(ratio, drop)]`` from sensitivity rows (``group``, ``ratio``, ``drop``)."""
    out = {}
    for r in rows:
        out.setdefault(r["group"], []).append((float(r["ratio"]), float(r["drop"])))
    return {g: sorted(v) for g, v in out.items()}


def predicted_drop(curve, ratio):
    """Top-1 drop predicted at ``ratio``: the measured curve made monotone (a deeper cut never
    helps) and non-negative, interpolated linearly from (0, 0); beyond its last point, extended
    with its last slope."""
    if ratio <= 0 or not curve:
        return 0.0
    xs = [0.0] + [r for r, _ in curve]
    ys = list(np.maximum.accumulate([0.0] + [max(d, 0.0) for _, d in curve]))
    if ratio <= xs[-1]:
        return float(np.interp(ratio, xs, ys))
    slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-9)
    return float(ys[-1] + max(slope, 0.0) * (ratio - xs[-1]))


def group_levels(graph, round_to, allowed, max_ratio):
    """Per group, the ratios a plan can realise: each keeps a multiple of ``round_to`` anchor
    channels (:func:`~distill.pruning.plan.round_keep`), at most ``max_ratio`` removed.

    Parameters
    ----------
    allowed : iterable of str
        The group ids that may be pruned (not excluded).

    Returns
    -------
    dict
        group id → ascending list of ratios (> 0).
    """
    allowed = set(allowed)
    out = {}
    for g in graph.groups:
        if g.id not in allowed:
            continue
        n = len(g.units)
        ratios = set()
        for k in range(n - 1, 0, -1):
            kept = round_keep(n, k, g.multiplicity, round_to)
            r = 1.0 - kept / n
            if kept < n and r <= max_ratio + 1e-9:
                ratios.add(round(r, 6))
        if ratios:
            out[g.id] = sorted(ratios)
    return out


def macs_cost(graph, layer_macs, weight_of, scores, round_to):
    """``cost(ratios) -> MACs`` of the network once ``ratios`` (group id → ratio) are cut out."""
    seen = {}               # the search asks for the same allocations many times
    removed_of = removal_cache(graph, scores, round_to)

    def cost(ratios):
        key = tuple(sorted(ratios.items()))
        if key in seen:
            return seen[key]
        keeps = param_keeps(graph, removed_of(ratios))
        total = 0.0
        for layer, macs in layer_macs.items():
            frac = 1.0
            for _axis, keep in keeps.get(weight_of.get(layer, ""), []):
                frac *= keep.mean()
            total += macs * frac
        seen[key] = total
        return total
    return cost


def unreachable_error(what, target, reach, where, how_far):
    """The UserError of a target that cannot be met: ``where`` says where the deepest cuts leave
    the network (kept as the error's ``where``), ``how_far`` how far that gets (``reach``, a
    fraction, kept as ``reachable``); then what to ask for and how to get further."""
    err = UserError(
        f"pruning target {what} {target:g}× the unpruned model's cannot be met: {where} "
        f"{how_far}: ask for {what} ≥ {np.ceil(reach * 100) / 100:.2f}, or lower "
        f"`pruning.round_to`, exclude fewer layers (`pruning.exclude`), or measure deeper ratios "
        f"(--ratios).")
    err.reachable, err.where = reach, where
    return err


def allocate(levels, curves, cost, target, what="latency", names=None, excluded=(), start=None,
             uniform_floor=True, keep_start=False):
    """Greedy per-group ratios meeting ``cost(ratios) ≤ target × cost({})`` at the least
    predicted drop.

    Parameters
    ----------
    levels : dict
        group id → ascending ratios it can take (:func:`group_levels`).
    curves : dict
        group id → ``[(ratio, drop)]`` (:func:`curves_from_rows`); a group without a curve is
        predicted to lose nothing.
    cost : callable
        ``cost(ratios)`` → resource (ms, MACs) of the network pruned to ``ratios``.
    target : float
        Fraction of the unpruned cost, in (0, 1).
    what : str
        The resource, for messages.
    names : dict, optional
        group id → layer name, for messages.
    excluded : iterable of str
        Excluded layers, for the unreachable message.
    start : dict, optional
        group id → ratio (one of its levels) the search starts from instead of the unpruned
        network (its cuts can still be given back, unless ``keep_start``).
    uniform_floor : bool
        Return the shallowest uniform cut instead when it is predicted to lose less.

    Returns
    -------
    Allocation

    Raises
    ------
    UserError
        Even every group at its deepest ratio does not reach the target: says what is reachable
        (also as its ``reachable`` attribute, a fraction).
    """
    base = float(cost({}))
    goal = target * base
    deepest = {g: lv[-1] for g, lv in levels.items()}
    floor = float(cost(deepest)) if deepest else base
    if floor > goal * (1 + 1e-9):
        cut = ("no group can be pruned" if not levels
               else f"deepest ratio {max(deepest.values()):.3g}")
        raise unreachable_error(
            what, target, floor / base,
            f"with every prunable group ({len(levels)} of them) at its deepest cut, keeping "
            f"multiples of round_to channels, the network is still at {floor / base:.3f}× ({cut}"
            f"{'; excluded layers: ' + ', '.join(excluded) if excluded else ''}).",
            f"The reachable target is {floor / base:.3f}")
    state = {g: -1 for g in levels}               # index into levels; -1: unpruned
    ratios = {}
    for g, r in (start or {}).items():
        if g in levels and r in levels[g]:
            state[g], ratios[g] = levels[g].index(r), r
    least = dict(state) if keep_start else {g: -1 for g in levels}
    current = float(cost(ratios)) if ratios else base
    while current > goal * (1 + 1e-9):
        best = None
        for g, lv in levels.items():
            curve = curves.get(g, [])
            # every deeper level, not only the next: a timed layer can plateau for one step
            for k in range(state[g] + 1, len(lv)):
                trial = dict(ratios, **{g: lv[k]})
                c = float(cost(trial))
                saving = current - c
                if saving <= 0:
                    continue
                d = predicted_drop(curve, lv[k]) - predicted_drop(curve, ratios.get(g, 0.0))
                # least drop per unit saved; among free cuts, the largest saving first
                key = ((max(d, 0.0) + 1e-6) / saving, -saving)
                if best is None or key < best[0]:
                    best = (key, g, k, c)
        if best is None:        # no single cut saves any more: start from the deepest cuts
            state = {g: len(lv) - 1 for g, lv in levels.items()}
            ratios, current = dict(deepest), floor
            break
        _, g, k, current = best
        state[g] = k
        ratios[g] = levels[g][k]
    # give back the cuts the target does not need (the last step may overshoot): undo one
    # level of a group while the target still holds, the largest predicted gain first
    while True:
        best = None
        for g, k in state.items():
            if k <= least[g]:
                continue
            trial = dict(ratios)
            if k == 0:
                trial.pop(g)
            else:
                trial[g] = levels[g][k - 1]
            c = float(cost(trial))
            if c > goal * (1 + 1e-9):
                continue
            gain = predicted_drop(curves.get(g, []), ratios[g]) - \
                predicted_drop(curves.get(g, []), trial.get(g, 0.0))
            key = (gain, c)
            if best is None or key > best[0]:
                best = (key, g, trial, c)
        if best is None:
            break
        _, g, ratios, current = best
        state[g] -= 1
    out = _allocation(ratios, base, current, curves)
    uni = uniform_allocation(levels, curves, cost, target, base) if uniform_floor else None
    if uni is not None and uni.drop < out.drop - 1e-9:
        _LOGGER.info("allocation: uniform %.3g (predicted drop %.2f) beats the greedy allocation "
                     "(%.2f): taken", uni.ratio, uni.drop, out.drop)
        return uni
    return out


def _order(kv):
    return int(kv[0][1:]) if kv[0][1:].isdigit() else kv[0]


def _allocation(ratios, base, cost, curves):
    out = Allocation(sorted(ratios.items(), key=_order))
    out.base, out.cost, out.fraction = base, cost, cost / max(base, 1e-12)
    out.drop = _total_drop(ratios, curves)
    return out


def _total_drop(ratios, curves):
    """Predicted Σ drop of an allocation (group id → ratio), points."""
    return sum(predicted_drop(curves.get(g, []), r) for g, r in ratios.items())


def uniform_allocation(levels, curves, cost, target, base=None):
    """The shallowest *uniform* cut that meets ``target`` (a fraction of ``base``, the unpruned
    cost; every group at the level nearest one
    common ratio), or None: the greedy search is a heuristic on additive predictions, and the
    plain uniform allocation, scored by the same predictions, is its floor."""
    base = float(cost({})) if base is None else base
    goal = target * base
    for r in sorted({x for lv in levels.values() for x in lv}):
        ratios = _uniform(levels, r)
        c = float(cost(ratios))
        if c <= goal * (1 + 1e-9):
            out = _allocation(ratios, base, c, curves)
            out.ratio = r
            return out
    return None


def _uniform(levels, r):
    return {g: min(lv, key=lambda x: (abs(x - r), x)) for g, lv in levels.items()}


def candidate_allocations(levels, curves, cost, target, n=12, seed=0, what="latency", names=None,
                          excluded=(), spread=0.5):
    """Up to ``n`` different allocations that each meet ``target`` by ``cost``, for a choice
    among them by a measurement of each combined network: the predicted drop is a sum of groups
    pruned *alone*, which misjudges how cuts add up, so the search proposes and the network
    decides (EagleEye, Li et al. 2020, picks among sampled allocations the same way).

    In order: ``greedy`` (:func:`allocate` on the curves); ``uniform`` (the shallowest uniform
    cut that meets the target); ``uniform+greedy`` (each shallower uniform cut, finished by the
    greedy search); then, in turn, ``perturbed`` (the greedy search on curves whose drops are
    scaled per group by a random factor ``exp(N(0, spread))``) and ``random`` (a random partial
    cut the greedy search finishes and does not undo), seeded by ``seed``, until there are ``n``.

    Returns
    -------
    list of (str, Allocation)
        ``(kind, allocation)``, no two alike; every ``drop`` is predicted from the true curves.

    Raises
    ------
    UserError
        The target cannot be met (:func:`allocate`'s message).
    """
    out, seen = [], set()

    def add(kind, alloc):
        key = None if alloc is None else tuple(sorted(alloc.items()))
        if key is not None and key not in seen and len(out) < max(n, 1):
            seen.add(key)
            alloc.drop = _total_drop(alloc, curves)
            out.append((kind, alloc))

    add("greedy", allocate(levels, curves, cost, target, what, names, excluded, uniform_floor=False))
    base = float(cost({}))
    uni = uniform_allocation(levels, curves, cost, target, base)
    if uni is not None:
        add("uniform", uni)
    common = sorted({x for lv in levels.values() for x in lv})
    below = [r for r in common if uni is None or r < uni.ratio]
    for r in reversed(below):        # deepest first: the closest to uniform
        add("uniform+greedy", allocate(levels, curves, cost, target, what, names, excluded,
                                       start=_uniform(levels, r), uniform_floor=False))
        if len(out) >= min(n, 5):
            break
    rng = np.random.RandomState(seed)
    goal = target * base
    groups = sorted(levels)
    for i in range(4 * n):
        if len(out) >= n:
            break
        if i % 2 == 0:
            noisy = {g: [(r, d * float(np.exp(rng.normal(0.0, spread)))) for r, d in c]
                     for g, c in curves.items()}
            add("perturbed", allocate(levels, noisy, cost, target, what, names, excluded,
                                      uniform_floor=False))
            continue
        # a random partial cut (each group at a random level up to twice a random common
        # depth), thinned until it no longer meets the target alone, then finished greedily
        depth = rng.uniform(0.0, uni.ratio if uni is not None else max(common))
        start = {}
        for g in groups:
            lv = [x for x in levels[g] if x <= 2 * depth]
            k = rng.randint(0, len(lv) + 1)
            if k:
                start[g] = lv[k - 1]
        while start and float(cost(start)) <= goal * (1 + 1e-9):
            start.pop(groups[rng.randint(len(groups))], None)
        add("random", allocate(levels, curves, cost, target, what, names, excluded, start=start,
                               uniform_floor=False, keep_start=True))
    return out
