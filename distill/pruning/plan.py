"""Plan: which channels of each coupled group stay, as plain data (saved as JSON in the run folder).

A plan is computed from unit scores (a criterion) and per-group ratios, rounded so that every
pruned group keeps a multiple of ``round_to`` channels (odd channel counts can make a pruned
network *slower* on a CPU engine), and applied by :mod:`distill.pruning.apply`.

File format (``pruning-plan.json``)::

    {"version": 1, "granularity": "channel", "input_name": "data", "input_shape": [1, 1, 28, 28],
     "round_to": 8,
     "groups": [{"id": "g3", "name": "..._conv1_fwd", "channels": 32, "units": 32, "kept": 16,
                 "keep": [0, 3, ...], "producers": [...], "layers": [...]}],
     "intact": [{"layer": "...", "reason": "the network output"}],
     "unsafe": [{"layer": "...", "op": "LRN", "reason": "it mixes neighbouring channels"}]}

``keep`` lists the kept units of each group: for a group with one unit per channel (most), the
kept output channels of its first layer ``name``. ``units`` < ``channels`` means channels tied in
blocks (grouped convolutions, channel shuffles); units are ordered by their first channel in
``name``'s output.
"""
import json
import logging
import math

import numpy as np

from ..checkpoint import atomic_write_bytes
from ..errors import UserError

__all__ = ["Plan", "removed_units", "plan_from_removed", "choose_removed", "round_keep",
           "unit_scores"]
_LOGGER = logging.getLogger(__name__)


class Plan:
    """Per coupled group, the units (channels) that stay.

    Parameters
    ----------
    keep : dict
        group id → sorted list of kept unit indices (groups not listed keep everything).
    meta : dict
        Everything else in the file (input, round_to, intact/unsafe lists, group details).
    """

    def __init__(self, keep, meta=None):
        self.keep = {k: sorted(int(p) for p in v) for k, v in keep.items()}
        self.meta = dict(meta or {})

    def to_dict(self, graph=None):
        d = {"version": 1, "granularity": "channel", **self.meta}
        groups = []
        if graph is not None:
            d.update({"input_name": graph.input_name,
                      "input_shape": [1] + list(graph.input_shape[1:])})
            for g in graph.groups:
                keep = self.keep.get(g.id, list(range(len(g.units))))
                groups.append({"id": g.id, "name": g.name, "channels": g.channels,
                               "units": len(g.units), "kept": len(keep), "keep": list(keep),
                               "producers": g.producers, "layers": g.layers})
            d["intact"] = graph.intact
            d["unsafe"] = graph.unsafe
        else:
            groups = [{"id": k, "keep": v} for k, v in self.keep.items()]
        d["groups"] = groups
        return d

    @classmethod
    def from_dict(cls, d):
        meta = {k: v for k, v in d.items()
                if k not in ("groups", "version", "granularity", "intact", "unsafe")}
        keep = {}
        for g in d.get("groups", []):
            if "units" not in g or len(g["keep"]) < g["units"]:
                keep[g["id"]] = g["keep"]
        return cls(keep, meta)

    def save(self, path, graph=None):
        atomic_write_bytes(path, json.dumps(self.to_dict(graph), indent=1).encode())

    @classmethod
    def load(cls, path):
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"pruning plan {path} cannot be read ({e}).") from None


def removed_units(graph, plan):
    """The unit ids a plan removes (``keep`` lists unit indices of each group)."""
    removed = set()
    for gid, keep in plan.keep.items():
        try:
            g = graph.group(gid)
        except KeyError:
            raise UserError(f"pruning plan: group {gid!r} is not in this network's analysis "
                            f"(groups g0..g{len(graph.groups) - 1}): was the plan made for "
                            f"another network?") from None
        n = len(g.units)
        bad = [k for k in keep if not 0 <= k < n]
        if bad:
            raise UserError(f"pruning plan: group {gid} ({g.name}) has {n} channels (units); "
                            f"keep lists {bad[:5]}.")
        if not keep:
            raise UserError(f"pruning plan: group {gid} ({g.name}) keeps no channel.")
        mask = np.ones(n, bool)
        mask[list(keep)] = False
        removed |= set(g.units[mask].tolist())
    return removed


def plan_from_removed(graph, removed, **meta):
    """The :class:`Plan` that removes the unit ids ``removed``."""
    removed = set(int(u) for u in removed)
    keep = {}
    for g in graph.groups:
        mask = ~np.isin(g.units, list(removed)) if removed else np.ones(len(g.units), bool)
        if not mask.all():
            keep[g.id] = np.nonzero(mask)[0].tolist()
    return Plan(keep, meta)


def round_keep(n_units, n_keep, multiplicity, round_to):
    """Round a kept unit count up so that ``n_keep * multiplicity`` is a multiple of ``round_to``.

    Returns ``n_units`` (no pruning) when no such count below ``n_units`` exists.
    """
    q = round_to // math.gcd(round_to, multiplicity) if round_to > 1 else 1
    k = max(q, int(math.ceil(n_keep / q)) * q)
    return n_units if k >= n_units else k


def unit_scores(graph, groups, criterion, params, grads=None, rng=None):
    """Score every unit of ``groups`` with a channel criterion.

    A unit's score is the mean, over the parameter slices it owns with the criterion's roles
    (``out``: filters; ``scale``: BatchNorm gamma), of the criterion's per-row score. Roles are
    tried in the criterion's order of preference (``bn_scale`` falls back to filters when a
    group has no BatchNorm).

    Parameters
    ----------
    params, grads : dict
        name → ndarray (``grads``: accumulated gradients, for criteria that need them).

    Returns
    -------
    dict
        unit id → score (higher = more important).
    """
    unit_ids = {int(u) for g in groups for u in g.unit_ids}
    per_role = [dict() for _ in criterion.channel_roles]
    for s in graph.slices:
        level = next((n for n, roles in enumerate(criterion.channel_roles) if s.role in roles), None)
        if level is None:
            continue
        mine = np.isin(s.classes, list(unit_ids))
        if not mine.any():
            continue
        w = np.moveaxis(np.asarray(params[s.param]), s.axis, 0)
        w = w.reshape(w.shape[0], -1)
        gr = None
        if criterion.needs_grad:
            if grads is None or s.param not in grads:
                continue
            gr = np.moveaxis(np.asarray(grads[s.param]), s.axis, 0).reshape(w.shape[0], -1)
        scores = np.asarray(criterion.row_scores(w, gr, rng=rng), dtype=np.float64)
        units, inverse = np.unique(s.classes, return_inverse=True)
        means = np.bincount(inverse, weights=scores) / np.bincount(inverse)
        for c, v in zip(units.tolist(), means.tolist()):
            if c in unit_ids:
                per_role[level].setdefault(c, []).append(v)
    out = {}
    for g in groups:
        for u in g.unit_ids.tolist():
            vals = next((d[u] for d in per_role if u in d), None)
            out[u] = float(np.mean(vals)) if vals else 0.0
    return out


def choose_removed(graph, scores, ratios, round_to=8, scope="layer", already=()):
    """The units to remove: per group ``ratios[gid]`` of its units, lowest scores first.

    Parameters
    ----------
    scores : dict
        unit id → importance.
    ratios : dict
        group id → fraction of units to remove (groups absent: none).
    round_to : int
        Every pruned group keeps a multiple of this many anchor channels.
    scope : str
        ``layer``: each group on its own. ``global``: the groups at the most common ratio are
        ranked together, so the lowest-scored units anywhere go first (groups with an override
        ratio are pruned on their own); each group still keeps at least ``round_to`` channels.
    already : iterable of int
        Units removed earlier: they stay removed (pruning is monotone).

    Returns
    -------
    set of int
    """
    already = set(int(u) for u in already)
    removed = set()
    groups = [g for g in graph.groups
              if ratios.get(g.id, 0) > 0 or already & set(g.unit_ids.tolist())]

    def order(g):
        return sorted(g.unit_ids.tolist(), key=lambda u: (u not in already, scores.get(u, 0.0), u))

    pool, budget = [], {}
    if scope == "global" and groups:
        values = [ratios[g.id] for g in groups if ratios.get(g.id, 0) > 0]
        common = max(set(values), key=values.count) if values else 0
        pool = [g for g in groups if ratios.get(g.id) == common]
        cands = sorted((u not in already, scores.get(u, 0.0), u, g.id)
                       for g in pool for u in g.unit_ids.tolist())
        n_remove = int(round(common * sum(len(g.unit_ids) for g in pool)))
        for _, _, _, gid in cands[:n_remove]:
            budget[gid] = budget.get(gid, 0) + 1
    pool_ids = {g.id for g in pool}
    alive = {k: len(v) for k, v in graph.tensor_units.items()}
    for u in already:
        for k in graph.unit_tensors.get(u, ()):
            alive[k] -= 1
    for g in groups:
        units = order(g)
        n = len(units)
        mine_before = [u for u in units if u in already]
        n_rm = budget.get(g.id, 0) if g.id in pool_ids else int(round(ratios.get(g.id, 0) * n))
        n_rm = max(n_rm, len(mine_before))
        n_rm = n - round_keep(n, n - n_rm, g.multiplicity, round_to)
        chosen = list(mine_before)
        for u in units:
            if len(chosen) >= n_rm:
                break
            if u in already:
                continue
            # never empty a tensor (a late ShuffleNet unit's output is one tied unit)
            if any(alive[k] <= 1 for k in graph.unit_tensors.get(u, ())):
                continue
            chosen.append(u)
            for k in graph.unit_tensors.get(u, ()):
                alive[k] -= 1
        keep = round_keep(n, n - len(chosen), g.multiplicity, round_to)
        while n - len(chosen) < keep and len(chosen) > len(mine_before):
            u = chosen.pop()                     # the best-scored removal goes back
            for k in graph.unit_tensors.get(u, ()):
                alive[k] += 1
        removed |= set(chosen)
    return removed
