"""Sparse training before removal (``pruning.regularize``): a penalty on whole channels, added
to the gradients between the backward pass and the optimizer step.

``group_l2`` is the group lasso λ·Σ_u ‖w_u‖₂ over each channel's coupled group (its filters,
the consumers' input columns, BatchNorm gamma: Torch-Pruning's ``GroupNormPruner``; Fang et al.,
2023), whose gradient is λ·w/‖w_u‖; ``bn_l1`` is λ·Σ|γ| on BatchNorm gamma (network slimming;
Liu et al., 2017), gradient λ·sign(γ). λ grows by ``growth`` every epoch (growing
regularisation; Wang et al., 2021). ``targeted: true`` pushes down only the channels the next
pruning update would remove, which masks make easy: the rest of the network trains unpenalised.

The per-channel norms are read back every :data:`REFRESH` steps (and kept in the checkpoint, so a
resumed run applies the same factors); each step then costs two device ops per parameter. On
several devices every replica adds its share (λ / devices), so the summed gradient carries λ
once.

Recipe example::

    pruning: {enabled: true, granularity: channel, start_epoch: 3,
              regularize: {kind: group_l2, strength: 1.0e-4, growth: 1.0e-4, epochs: 3}}
"""
import logging

import mxnet as mx
import numpy as np

from .base import CRITERIA
from .plan import choose_removed, unit_scores, unit_totals

__all__ = ["ChannelRegularizer", "REFRESH"]
_LOGGER = logging.getLogger(__name__)

#: steps between two reads of the channel norms
REFRESH = 25
_ROLES = {"group_l2": ("out", "in", "scale"), "bn_l1": ("scale",)}


class ChannelRegularizer:
    """The penalty of one ``pruning.regularize`` section on a channel pruner's graph."""

    def __init__(self, cfg, pruner):
        self.cfg, self.pruner = cfg, pruner
        self.norms = None              # unit id → ‖w_u‖ (group_l2) or 1 (bn_l1), last refresh
        self.units = None              # the units penalised at the last refresh
        self.factors = {}              # param name → [NDArray per replica]
        self.strength = 0.0

    def last_epoch(self):
        """The first epoch without the penalty: ``epochs``, else the last pruning update."""
        if self.cfg.epochs is not None:
            return self.cfg.epochs
        events = self.pruner.schedule.events()
        return events[-1] if events else 0

    def active(self, epoch):
        return epoch < self.last_epoch()

    def state_dict(self):
        if self.norms is None:
            return {}
        return {"norms": {str(k): float(v) for k, v in self.norms.items()},
                "units": sorted(int(u) for u in self.units), "strength": self.strength}

    def load_state_dict(self, state):
        if state:
            self.norms = {int(k): v for k, v in state["norms"].items()}
            self.units = set(state["units"])
            self.strength = state["strength"]
            self.factors = {}          # rebuilt from the saved norms at the next step

    def before_step(self, epoch, step):
        """Add the penalty's gradient to every replica's gradient."""
        if not self.active(epoch):
            return
        if step % REFRESH == 0 or self.norms is None:
            self._refresh(epoch)
        if not self.factors:
            self._build_factors()
        kind = self.cfg.kind
        for name, facs in self.factors.items():
            p = self.pruner.params[name]
            for w, g, f in zip(p.list_data(), p.list_grad(), facs):
                g += (mx.nd.sign(w) if kind == "bn_l1" else w) * f

    # -- the factors ---------------------------------------------------------------------------
    def _refresh(self, epoch):
        pr, g = self.pruner, self.pruner.graph
        groups = [grp for grp in g.groups if pr.group_ratio.get(grp.id, 0) > 0]
        units = {int(u) for grp in groups for u in grp.unit_ids} - set(pr.removed)
        if self.cfg.targeted:
            units &= self._next_removal(groups, epoch)
        roles = _ROLES[self.cfg.kind]
        # in float64, as the penalty's factors are computed (group_l2's row scores: sums of squares)
        names = sorted({s.param for s in g.slices if s.role in roles})
        params = {n: a.astype(np.float64) for n, a in pr._np_params(names).items()}
        sq = unit_totals(g, roles, units, CRITERIA.get("group_l2")(), params)
        self.norms = {u: float(np.sqrt(v)) for u, v in sq.items()}
        self.units = units
        self.strength = self.cfg.strength + self.cfg.growth * epoch
        self.factors = {}

    def _next_removal(self, groups, epoch):
        """The units the next pruning update would remove (its fraction, today's scores)."""
        pr = self.pruner
        events = [e for e in pr.schedule.events() if e > epoch or (e == epoch and e not in pr.done)]
        if not events:
            return set()
        all_events = pr.schedule.events()
        k = all_events.index(events[0])
        frac = pr.schedule.fraction(k, len(all_events))
        crit = pr.criterion if not pr.criterion.needs_grad else CRITERIA.get("group_l2")()
        names = sorted({s.param for s in pr.graph.slices})
        scores = unit_scores(pr.graph, groups, crit, pr._np_params(names), None,
                             np.random.RandomState(0))
        ratios = {grp.id: pr.group_ratio[grp.id] * frac for grp in groups}
        nxt = choose_removed(pr.graph, scores, ratios, pr.block, pr.cfg.scope, already=pr.removed)
        return set(nxt) - set(pr.removed)

    def _build_factors(self):
        """Per parameter, a factor array of its shape: λ/devices × (1/‖w_u‖ for group_l2, 1 for
        bn_l1) on the indices of penalised units along each slice's axis, 0 elsewhere."""
        pr, g = self.pruner, self.pruner.graph
        host = {}
        for s in g.slices:
            if s.role not in _ROLES[self.cfg.kind]:
                continue
            p = pr.params.get(s.param)
            if p is None or p.grad_req == "null":
                continue
            inv = np.array([(1.0 if self.cfg.kind == "bn_l1" else
                             (1.0 / self.norms[c] if self.norms.get(c, 0.0) > 0 else 0.0))
                            if c in self.units else 0.0 for c in s.classes.tolist()], np.float64)
            shape = pr.dense_shape(s.param)       # a rebuilt student's arrays are cut below
            b = [1] * len(shape)
            b[s.axis] = -1
            f = host.setdefault(s.param, np.zeros(shape, np.float64))
            f += np.broadcast_to(inv.reshape(b), shape) if len(inv) == shape[s.axis] else 0.0
        self.factors = {}
        for name, f in host.items():
            f = pr.to_current(name, f)
            p = pr.params[name]
            n = len(p.list_ctx())
            scaled = (f * self.strength / n).astype(np.float32)
            if not scaled.any():
                continue
            self.factors[name] = [mx.nd.array(scaled, ctx=c, dtype=p.dtype) for c in p.list_ctx()]
