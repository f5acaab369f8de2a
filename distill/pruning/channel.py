"""Channel pruning while training: whole channels of coupled groups, then a smaller network.

At each of the schedule's epochs the criterion scores every prunable unit of the dependency
analysis (:mod:`distill.pruning.graph`), :func:`~distill.pruning.plan.choose_removed` picks the
units to remove and the keeper zeroes their slices. At the end the student is rebuilt physically
smaller (:func:`distill.pruning.apply.shrink`), checked against the masked network, and the plan
is written to the run folder.

Recipe example::

    student: {from: teacher}
    pruning:
      enabled: true
      granularity: channel
      criterion: l1               # l1 | l2 | bn_scale | taylor | random
      scope: layer                # or global
      schedule: agp
      final_sparsity: 0.5
      round_to: 8
      exclude: [last]             # keeps the classifier's input and output widths
      # or, instead of one final_sparsity: per-group ratios allocated at the start of the run
      # (distill.pruning.target) to meet a latency / MACs fraction, AGP toward them
      target: {latency: 0.4, backend: mxnet, batch: 32}
"""
import logging

import mxnet as mx
import numpy as np

from ..graphio import AUX_SUFFIXES, count_param_dict
from ..modelinfo import total_macs
from ..replicas import contexts, first
from ..runfolder import PLAN_FILE
from .apply import channel_masks, first_divergence, param_keeps, shrink, shrunk_block
from .base import PRUNERS
from .blocks import rounding
from .graph import PruningGraphError, analyze
from .plan import Plan, choose_removed, plan_from_removed, removed_units, unit_scores
from .regularize import ChannelRegularizer
from .pruner import PruningModifier

__all__ = ["ChannelPruningModifier", "SHRINK_RTOL"]
_LOGGER = logging.getLogger(__name__)

# shrunk ≡ masked: max |Δlogit| ≤ SHRINK_RTOL · max(1, max |logit|). Relative, because float32
# sums in another order differ by ~1e-7 of the logits' scale, and logits can be in the hundreds.
SHRINK_RTOL = 1e-4


@PRUNERS.register("channel")
class ChannelPruningModifier(PruningModifier):
    """Removes whole channels, group by group (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.removed = set()           # removed unit ids
        self.graph = None
        self.shrink_diff = None        # max |Δlogit| shrunk vs masked, once rebuilt
        self.regularizer = ChannelRegularizer(self.cfg.regularize, self) if self.cfg.regularize else None

    def setup(self):
        self.graph = analyze(self.symbol, self.input_shape, self.input_name)
        self.block = rounding(self.cfg)
        self.log(f"pruning: kept widths are multiples of {int(self.block)} channels, rounded "
                 f"{self.block.mode} ({self.block.why})")
        self.group_ratio = {grp.id: self._group_ratio(grp) for grp in self.graph.groups}
        if self.cfg.target is not None:            # prune to a target: ratios allocated now
            from .probe import target_ratios        # lazy: timing and evaluation code
            self.group_ratio = target_ratios(self)
        if self._plan_keep:                        # resumed: the channels removed so far
            self.removed = removed_units(self.graph, Plan(self._plan_keep))
        g = self.graph
        frozen = [grp.name for grp in g.groups if self.group_ratio[grp.id] == 0]
        self.log(f"pruning: {len(g.groups)} coupled channel groups, {len(g.intact)} layers kept intact"
                 + (f" ({'; '.join(i['layer'] + ': ' + i['reason'] for i in g.intact[:4])}"
                    f"{' ...' if len(g.intact) > 4 else ''})" if g.intact else "")
                 + (f"; not pruned (excluded or ratio 0): {', '.join(frozen)}" if frozen else ""))
        roles = {"out", "scale"} | {r for level in self.criterion.channel_roles for r in level}
        return sorted({s.param for s in g.slices if s.role in roles
                       and self.params[s.param].grad_req != "null"})

    def prunable(self, grp):
        """False for a group that no prunable layer produces, that an excluded layer produces
        or reads (an excluded layer keeps its input and output widths), or that a
        ``keep_outputs`` layer produces (it keeps its output width; its inputs may shrink)."""
        prods = [p for p in grp.producers if p in self.layer_ratio]
        return bool(prods) and not any(l in self.excluded for l in grp.layers) \
            and not any(p in getattr(self, "outputs_kept", ()) for p in grp.producers)

    def _group_ratio(self, grp):
        """A coupled group is pruned as one: a group that any excluded layer produces or reads
        is kept whole; else an override on any of its producers sets its ratio (the last one in
        the recipe)."""
        prods = [p for p in grp.producers if p in self.layer_ratio]
        if not self.prunable(grp):
            return 0.0
        hits = [self.override_of[p] for p in prods if p in self.override_of]
        return max(hits)[1] if hits else self.cfg.final_sparsity

    def before_step(self, epoch, step):
        if self.regularizer is not None:
            self.regularizer.before_step(epoch, step)

    def state_dict(self):
        state = super().state_dict()
        if self.regularizer is not None:
            state["regularize"] = self.regularizer.state_dict()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if self.regularizer is not None and state:
            self.regularizer.load_state_dict(state.get("regularize"))

    def update(self, frac, grads, rng):
        g = self.graph
        groups = [grp for grp in g.groups if self.group_ratio[grp.id] > 0]
        names = sorted({s.param for s in g.slices})
        scores = unit_scores(g, groups, self.criterion, self._np_params(names), grads, rng)
        ratios = {grp.id: self.group_ratio[grp.id] * frac for grp in groups}
        self.removed = choose_removed(g, scores, ratios, self.block, self.cfg.scope,
                                      already=self.removed)
        self.keeper.set_masks(channel_masks(g, self.removed))

    def plan_keep(self):
        if self.graph is not None:                 # the plan, not graph-internal unit ids
            return plan_from_removed(self.graph, self.removed).keep
        return self._plan_keep

    def cost(self):
        """MACs and parameters of the network once the removed channels are cut out."""
        keeps = param_keeps(self.graph, self.removed)
        macs = 0
        for l, w, _ in self.layers:
            frac = 1.0
            for _axis, keep in keeps.get(w, []):
                frac *= keep.mean()
            macs += self.layer_macs.get(l, 0) * frac
        params = 0
        for n, p in self.params.items():
            if n.endswith(AUX_SUFFIXES):
                continue
            size = float(np.prod(first(p).shape))
            for _axis, keep in keeps.get(n, []):
                size *= keep.mean()
            params += size
        return int(round(macs)), int(round(params))

    def finalize(self, student, data, log):
        """Return the physically smaller network, checked against the masked one."""
        student = super().finalize(student, data, log)
        plan = plan_from_removed(self.graph, self.removed, round_to=int(self.block), round_mode=self.block.mode,
                                 round_why=self.block.why,
                                 criterion=self.cfg.criterion, final_sparsity=self.cfg.final_sparsity)
        path = self.folder.plan_path
        plan.save(path, self.graph)
        if not self.removed:
            log(f"pruning: no channel was removed (plan: {path})")
            return student
        params = {n: first(p) for n, p in student.collect_params().items()}
        sym, new_params = shrink(self.graph, params, self.removed)
        small = shrunk_block(sym, new_params, self.input_name)      # on the CPU
        x = mx.nd.array(data.val.x[:32])
        # the masked student on replica 0's device (the replicas are identical), compared on the CPU
        ref = student(x.as_in_context(contexts(student)[0])).as_in_context(x.context)
        diff = float(mx.nd.abs(ref - small(x)).max().asscalar())
        scale = max(1.0, float(mx.nd.abs(ref).max().asscalar()))
        if not diff <= SHRINK_RTOL * scale:
            raise self._mismatch(diff, scale, params, sym, new_params, x, path)
        self.shrink_diff = diff
        macs = total_macs(sym, self.input_shape, self.input_name)
        n_params = count_param_dict(new_params)
        log(f"pruning: rebuilt smaller: MACs {self.dense_macs / 1e6:.2f}M → {macs / 1e6:.2f}M "
            f"({self.dense_macs / max(macs, 1):.2f}× fewer), params {self.dense_params} → {n_params}; "
            f"shrunk ≡ masked (max diff {diff:.1e}); plan: {path}")
        return small

    def _mismatch(self, diff, scale, params, sym, new_params, x, path):
        """The one-paragraph error for a shrunk network that does not compute the masked one's
        function, naming the first layer (and its group) that differs."""
        where = ""
        try:
            found = first_divergence(self.graph, self.symbol, params, sym, new_params, x,
                                     self.removed, SHRINK_RTOL)
        except Exception as e:          # the diagnosis must not hide the error it explains
            found, where = None, f" (locating the layer failed: {type(e).__name__}: {e})"
        if found is not None:
            layer, ldiff, lscale = found
            groups = [grp.id for grp in self.graph.groups if layer in grp.layers]
            where = (f" The first layer that differs is {layer}"
                     + (f" (coupled group {', '.join(groups)})" if groups else "")
                     + f", by {ldiff:.3g} at scale {lscale:.3g}: exclude it "
                       f"(`pruning.exclude: [{layer}]`) to go on.")
        return PruningGraphError(
            f"pruning: the shrunk network differs from the masked one by {diff:.3g} on the logits "
            f"(allowed {SHRINK_RTOL:g} × max(1, max |logit|) = {SHRINK_RTOL * scale:.3g}), so the "
            f"dependency analysis got an operator wrong; the smaller network was not used and no "
            f"model was written.{where} Please report it with the plan {path}.")

    def metrics(self, student):
        out = super().metrics(student)
        out["pruning"].update(physically_smaller=bool(self.removed), plan=PLAN_FILE,
                              groups=len(self.graph.groups), intact=self.graph.intact,
                              removed_units=len(self.removed))
        if self.shrink_diff is not None:
            out["pruning"]["shrink_vs_mask_max_diff"] = self.shrink_diff
        return out
