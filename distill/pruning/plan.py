"""Plan: which channels of each coupled group stay, as plain data (saved as JSON in the run folder).

A plan is computed from unit scores (a criterion) and per-group ratios, rounded so that every
pruned group keeps a multiple of ``round_to`` channels (odd channel counts can make a pruned
network *slower* on a CPU engine), and applied by :mod:`distill.pruning.apply`.

File format (the run folder's plan file, :data:`distill.runfolder.PLAN_FILE`)::

    {"version": 1, "granularity": "channel", "input_name": "data", "input_shape": [1, 1, 28, 28],
     "round_to": 8,
     "counts": "units: `units`, `kept` and `keep` count prunable units ...",
     "groups": [{"id": "g3", "name": "..._conv1_fwd", "channels": 32, "units": 32, "kept": 16,
                 "kept_channels": 16, "keep": [0, 3, ...], "producers": [...], "layers": [...]}],
     "intact": [{"layer": "...", "reason": "the network output"}],
     "unsafe": [{"layer": "...", "op": "LRN", "reason": "it mixes neighbouring channels"}]}

``kept`` counts *units*, ``kept_channels`` the channels they are (32-group convolutions tie
channels in blocks: ``kept: 2`` can be ``kept_channels: 64``); ``counts`` says so in the file.
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
           "unit_scores", "global_pool", "element_scores", "element_masks", "kept_channels"]
_LOGGER = logging.getLogger(__name__)

_COUNTS_NOTE = ("units: `units`, `kept` and `keep` count prunable units (channels tied together, "
                "e.g. by a grouped convolution, are one unit); `channels` and `kept_channels` count "
                "the output channels of the group's layer `name`")


def kept_channels(graph, group, keep):
    """Channels of ``group``'s anchor layer that stay when its units ``keep`` (indices) stay."""
    roots = graph.root[graph.tensors[group.anchor].ids.ravel()]
    return int(np.isin(roots, group.units[list(keep)]).sum())


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
        if graph is not None:
            d["counts"] = _COUNTS_NOTE
        groups = []
        if graph is not None:
            d.update({"input_name": graph.input_name,
                      "input_shape": [1] + list(graph.input_shape[1:])})
            for g in graph.groups:
                keep = self.keep.get(g.id, list(range(len(g.units))))
                groups.append({"id": g.id, "name": g.name, "channels": g.channels,
                               "units": len(g.units), "kept": len(keep),
                               "kept_channels": kept_channels(graph, g, keep), "keep": list(keep),
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
                if k not in ("groups", "version", "granularity", "intact", "unsafe", "counts")}
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
    """Round a kept unit count so that ``n_keep * multiplicity`` is a multiple of ``round_to``:
    up (the default), or ``down`` / ``nearest`` when ``round_to`` is a
    :class:`~distill.pruning.blocks.Rounding` with that mode. At least one block is kept.

    Returns ``n_units`` (no pruning) when no such count below ``n_units`` exists.
    """
    q = round_to // math.gcd(round_to, multiplicity) if round_to > 1 else 1
    mode = getattr(round_to, "mode", "up")
    blocks = n_keep / q
    n = math.floor(blocks) if mode == "down" else \
        math.floor(blocks + 0.5) if mode == "nearest" else math.ceil(blocks)
    k = max(q, int(n) * q)
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
    if getattr(criterion, "group_reduction", None) == "sum":
        return _group_scores(graph, groups, criterion, params, grads, rng)
    unit_ids = {int(u) for g in groups for u in g.unit_ids}
    per_role = [dict() for _ in criterion.channel_roles]
    roles = {r for level in criterion.channel_roles for r in level}
    for s, units, sums, counts in _unit_sums(graph, roles, unit_ids, criterion, params, grads, rng):
        level = next(n for n, rs in enumerate(criterion.channel_roles) if s.role in rs)
        for c, v in zip(units.tolist(), (sums / counts).tolist()):
            if c in unit_ids:
                per_role[level].setdefault(c, []).append(v)
    out = {}
    for g in groups:
        for u in g.unit_ids.tolist():
            vals = next((d[u] for d in per_role if u in d), None)
            out[u] = float(np.mean(vals)) if vals else 0.0
    return out


def _slice_scores(s, criterion, params, grads, rng):
    """The criterion's per-row scores of slice ``s`` (its axis first, one row per index), or
    None when the criterion needs a gradient the pass did not collect."""
    w = np.moveaxis(np.asarray(params[s.param]), s.axis, 0)
    w = w.reshape(w.shape[0], -1)
    gr = None
    if criterion.needs_grad:
        if grads is None or s.param not in grads:
            return None
        gr = np.moveaxis(np.asarray(grads[s.param]), s.axis, 0).reshape(w.shape[0], -1)
    return np.asarray(criterion.row_scores(w, gr, rng=rng), dtype=np.float64)


def _unit_sums(graph, roles, unit_ids, criterion, params, grads, rng):
    """Per slice with one of ``roles`` holding any of ``unit_ids``: ``(slice, units, sums of
    the criterion's row scores per unit, rows per unit)``."""
    wanted = list(unit_ids)
    skip = getattr(criterion, "skip_kinds", ())
    kinds = {graph.nodes[i]["name"]: k for i, k in graph.layer_kind.items()} if skip else {}
    for s in graph.slices:
        if s.role not in roles or not np.isin(s.classes, wanted).any():
            continue
        if skip and kinds.get(s.layer) in skip:
            continue
        scores = _slice_scores(s, criterion, params, grads, rng)
        if scores is None:
            continue
        units, inverse = np.unique(s.classes, return_inverse=True)
        yield s, units, np.bincount(inverse, weights=scores), np.bincount(inverse)


def unit_totals(graph, roles, unit_ids, criterion, params, grads=None, rng=None):
    """unit id → the criterion's row scores summed over every slice of the unit with one of
    ``roles`` (``group_l2``: the unit's squared norm over its coupled group)."""
    total = dict.fromkeys(unit_ids, 0.0)
    for _, units, sums, _ in _unit_sums(graph, roles, unit_ids, criterion, params, grads, rng):
        for c, v in zip(units.tolist(), sums.tolist()):
            if c in total:
                total[c] += v
    return total


def _group_scores(graph, groups, criterion, params, grads, rng):
    """:func:`unit_scores` of a group criterion (``group_l2``, ``group_taylor``): a unit's
    row scores summed over every slice with one of the criterion's roles, ``criterion.finish``
    of that sum, then divided by the mean over the unit's group (0 stays 0)."""
    roles = {r for level in criterion.channel_roles for r in level}
    total = unit_totals(graph, roles, {int(u) for g in groups for u in g.unit_ids}, criterion,
                        params, grads, rng)
    out = {}
    for g in groups:
        ids = g.unit_ids.tolist()
        vals = np.asarray(criterion.finish(np.array([total[u] for u in ids], np.float64)))
        mean = float(vals.mean()) if len(vals) else 0.0
        for u, v in zip(ids, vals.tolist()):
            out[u] = v / mean if mean > 0 else 0.0
    return out


def global_pool(items):
    """The items a ``scope: global`` selection ranks together: those at the most common ratio.

    Items with another (override) ratio are pruned on their own; ratio 0 is never pooled.

    Parameters
    ----------
    items : list of (key, float)
        ``(key, ratio)`` in a fixed order (graph order): ties between equally common ratios go
        the same way every run.

    Returns
    -------
    (float, list)
        The common ratio (0 when no item has a positive one) and the keys at it, in order.
    """
    values = [r for _, r in items if r > 0]
    if not values:
        return 0, []
    common = max(set(values), key=values.count)
    return common, [k for k, r in items if r == common]


def element_scores(criterion, names, weights, grads=None, masks=None, rng=None):
    """Per-weight importance of each named weight, pruned weights at ``-inf``.

    Parameters
    ----------
    criterion : Criterion
    names : list of str
        Weights to score, in graph order (the order ``rng`` is drawn in).
    weights, grads : dict
        name → ndarray (``grads``: for criteria that need them).
    masks : dict, optional
        name → bool array of the masks in force: a weight pruned once stays pruned.

    Returns
    -------
    dict
        name → float64 array shaped like the weight (higher = keep).
    """
    masks = masks or {}
    scores = {}
    for w in names:
        s = criterion.element_scores(weights[w], None if grads is None else grads[w], rng=rng)
        s = np.asarray(s, dtype=np.float64)
        if w in masks:
            s = np.where(masks[w], s, -np.inf)          # once pruned, always pruned
        scores[w] = s
    return scores


def element_masks(scores, ratios, frac, scope="layer"):
    """Unstructured masks: remove ``ratio * frac`` of each weight's elements, lowest scores first.

    Parameters
    ----------
    scores : dict
        name → float64 score array (:func:`element_scores`).
    ratios : list of (str, float)
        ``(weight name, final ratio)`` in graph order, ratios > 0.
    frac : float
        Fraction of the final ratio the schedule has reached.
    scope : str
        ``layer``: each weight on its own. ``global``: the weights at the most common ratio
        (:func:`global_pool`) are ranked together; the others on their own.

    Returns
    -------
    dict
        name → bool array (``True`` keeps), shaped like the weight.
    """
    masks = {}
    common, pool = global_pool(ratios) if scope == "global" else (0, [])
    if pool:
        flat = np.concatenate([scores[w].ravel() for w in pool])
        n_rm = int(round(common * frac * flat.size))
        order = np.argsort(flat, kind="stable")
        keep = np.ones(flat.size, bool)
        keep[order[:n_rm]] = False
        off = 0
        for w in pool:
            n = scores[w].size
            masks[w] = keep[off:off + n].reshape(scores[w].shape)
            off += n
    for w, ratio in ratios:
        if w in masks:
            continue
        s = scores[w].ravel()
        n_rm = int(round(ratio * frac * s.size))
        keep = np.ones(s.size, bool)
        keep[np.argsort(s, kind="stable")[:n_rm]] = False
        masks[w] = keep.reshape(scores[w].shape)
    return masks


def removal_cache(graph, scores, round_to=8):
    """``removed(ratios) -> frozenset``: :func:`choose_removed` (layer scope) for searches that
    ask for many allocations. When no tensor holds units of two groups, each group's choice
    depends on its own ratio alone, so the union of per-group choices (each made once) is
    exactly :func:`choose_removed`'s answer; otherwise every allocation is chosen in full."""
    group_of = {int(u): g.id for g in graph.groups for u in g.unit_ids.tolist()}
    disjoint = all(len({group_of.get(int(u)) for u in units}) <= 1
                   for units in graph.tensor_units.values())
    per_group, whole = {}, {}

    def removed(ratios):
        key = tuple(sorted((g, r) for g, r in ratios.items() if r > 0))
        if not disjoint:
            if key not in whole:
                whole[key] = frozenset(choose_removed(graph, scores, dict(key), round_to))
            return whole[key]
        out = set()
        for g, r in key:
            if (g, r) not in per_group:
                per_group[g, r] = frozenset(choose_removed(graph, scores, {g: r}, round_to))
            out |= per_group[g, r]
        return frozenset(out)
    return removed


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
        common, pool = global_pool([(g, ratios.get(g.id, 0)) for g in groups])
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
