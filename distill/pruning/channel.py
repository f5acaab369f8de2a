"""Channel pruning while training: whole channels of coupled groups, then a smaller network.

At each of the schedule's epochs the criterion scores every prunable unit of the dependency
analysis (:mod:`distill.pruning.graph`) and :func:`~distill.pruning.plan.choose_removed` picks the
units to remove. With ``pruning.shrink: each_update`` (the default) the student is then rebuilt
physically smaller at once (:func:`distill.pruning.apply.shrink`), checked against the masked
network at that step, and training goes on with the smaller one (the loop swaps it in:
:meth:`ChannelPruningModifier.take_rebuild`, :mod:`distill.rebuild`), so a step costs what the
current widths cost. With ``shrink: end`` the keeper zeroes the removed slices and the student is
rebuilt once, at the end. Either way the plan is written to the run folder.

The scores always read the parameters at the analysed (dense) shapes: a cut student's arrays are
scattered back into zeros (:func:`~distill.pruning.apply.expand_array`), exactly what the masked
student holds, so both modes choose the same channels from the same weights.

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
      shrink: each_update         # rebuild smaller at every update (or: end)
      optimizer_state: slice      # momentum of the kept channels carried over (or: reset)
"""
import logging

import mxnet as mx
import numpy as np

from ..graphio import AUX_SUFFIXES, count_param_dict, count_params
from ..modelinfo import total_macs
from ..replicas import contexts, first
from ..runfolder import PLAN_FILE
from .apply import (channel_masks, cut_array, expand_array, param_keeps, relative_keeps, shrink,
                    shrunk_block)
from .base import PRUNERS
from .blocks import rounding
from .graph import analyze
from .plan import Plan, choose_removed, plan_from_removed, removed_units, unit_scores
from .regularize import ChannelRegularizer
from .pruner import PruningModifier
from .shrinking import SHRINK_RTOL, Rebuild, checked_shrink, tensor_keeper

__all__ = ["ChannelPruningModifier", "Rebuild", "SHRINK_RTOL"]
_LOGGER = logging.getLogger(__name__)

@PRUNERS.register("channel")
class ChannelPruningModifier(PruningModifier):
    """Removes whole channels, group by group (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.removed = set()           # removed unit ids
        self.graph = None
        self.shrink_diff = None        # max |Δlogit| shrunk vs masked, once rebuilt
        self.rebuilds = self.cfg.shrink_mode() == "each_update"
        self.cut = set()               # units already cut out of the student (shrink: each_update)
        self._cut_keeps = {}
        self._cut_saved = False        # a resumed checkpoint holds a student cut to `removed`
        self._rebuild = None
        self._announce = None
        self.rebuild_log = []          # [{"update", "macs", "max_diff"}] per rebuild
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
            if self._cut_saved and self.rebuilds and self.removed:
                # the checkpoint's arrays have the cut shapes: rebuild them before it is loaded
                self._rebuild = self._make_rebuild(resumed=True)
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

    # -- the student rebuilt smaller at every update ---------------------------------------------
    def take_rebuild(self):
        """The :class:`Rebuild` made by the last update (once), else None."""
        rb, self._rebuild = self._rebuild, None
        return rb

    def rebind(self, net, trainer):
        """Continue on the rebuilt ``net`` and its ``trainer``."""
        self.net, self.trainer = net, trainer
        self.params = net.collect_params()
        if self._announce:
            self.log(self._announce)
            self._announce = None
        for n in list(self._grad):
            w = first(self.params[n])
            self._grad[n] = mx.nd.zeros(w.shape, ctx=w.context)
        if self.regularizer is not None:
            self.regularizer.factors = {}

    def dense_shape(self, name):
        return tuple(self.graph.param_shapes.get(name) or first(self.params[name]).shape)

    def _np_params(self, names):
        """Current values at the analysed shapes (a cut student's arrays scattered into zeros)."""
        out = super()._np_params(names)
        return {n: self._dense(n, a) for n, a in out.items()}

    def _dense(self, name, a):
        keeps = self._cut_keeps.get(name)
        return expand_array(a, keeps, self.graph.param_shapes[name]) if keeps else a

    def to_current(self, name, a):
        """A dense-shaped array ``a`` of parameter ``name`` cut to the student's current shape."""
        return cut_array(a, self._cut_keeps.get(name, []))

    def _mean_grads(self, *args, **kwargs):
        return {n: self._dense(n, a) for n, a in super()._mean_grads(*args, **kwargs).items()}

    def _make_rebuild(self, resumed=False):
        """Cut ``removed`` out of the current student (checked ≡ the masked one unless
        ``resumed``, whose values are placeholders until the checkpoint is loaded)."""
        g = self.graph
        dense = self._np_params(sorted(g.param_shapes))
        if resumed:
            sym, small_params = shrink(g, dense, self.removed)
            small = shrunk_block(sym, small_params, self.input_name)
            self.log(f"pruning: resumed with the student cut to the checkpoint's widths "
                     f"({count_param_dict(small_params)} params)")
        else:
            x = mx.nd.array(self.data.val.x[:32])
            small, sym, small_params, diff = checked_shrink(g, self.symbol, dense, self.removed,
                                                            self.input_name, x, self.folder.plan_path)
            self.shrink_diff = max(diff, self.shrink_diff or 0.0)
            macs = total_macs(sym, self.input_shape, self.input_name)
            self.rebuild_log.append({"update": len(self.done) + 1, "macs": int(macs), "max_diff": diff})
            self._announce = (f"pruning: rebuilt smaller: {count_param_dict(small_params)} params; "
                              f"shrunk ≡ masked (max diff {diff:.1e}); training goes on with it")
            self.params = small.collect_params()     # what the update's log line reports
        new = param_keeps(g, self.removed)
        rb = Rebuild(small, {} if resumed else relative_keeps(self._cut_keeps, new),
                     tensor_keeper(g, self.removed, self.cut), resumed,
                     self.cfg.optimizer_state or "slice")
        self.cut = set(self.removed)
        self._cut_keeps = {n: k for n, k in new.items() if not all(kk.all() for _, kk in k)}
        return rb

    def before_step(self, epoch, step):
        if self.regularizer is not None:
            self.regularizer.before_step(epoch, step)

    def state_dict(self):
        state = super().state_dict()
        state["cut"] = bool(self.cut)
        if self.rebuild_log:
            state["rebuild_log"] = list(self.rebuild_log)
        if self.regularizer is not None:
            state["regularize"] = self.regularizer.state_dict()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state:
            self._cut_saved = bool(state.get("cut", False))
            self.rebuild_log = list(state.get("rebuild_log", []))
            diffs = [r["max_diff"] for r in self.rebuild_log]
            self.shrink_diff = max(diffs) if diffs else None
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
        if not self.rebuilds:
            self.keeper.set_masks(channel_masks(g, self.removed))
        elif self.removed != self.cut:       # nothing to mask: the removed channels are cut out
            self._rebuild = self._make_rebuild()

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
            size = float(np.prod(self.dense_shape(n)))
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
        pending = self.take_rebuild()          # made by an update no loop swapped in
        if pending is not None:
            student = pending.student
        if self.cut == self.removed:           # rebuilt at every update: already the small one
            macs = total_macs(student(mx.sym.var(self.input_name)), self.input_shape, self.input_name)
            log(f"pruning: trained smaller since the last update: MACs {self.dense_macs / 1e6:.2f}M → "
                f"{macs / 1e6:.2f}M ({self.dense_macs / max(macs, 1):.2f}× fewer), params "
                f"{self.dense_params} → {count_params(student)}; shrunk ≡ masked "
                f"at each of {len(self.rebuild_log)} rebuilds (max diff {self.shrink_diff or 0:.1e}); "
                f"plan: {path}")
            return student
        params = {n: first(p) for n, p in student.collect_params().items()}
        x = mx.nd.array(data.val.x[:32])
        # the masked student on replica 0's device (the replicas are identical), compared on the CPU
        small, sym, new_params, diff = checked_shrink(
            self.graph, self.symbol, params, self.removed, self.input_name, x, path,
            reference=lambda x: student(x.as_in_context(contexts(student)[0])).as_in_context(x.context))
        self.shrink_diff = diff
        macs = total_macs(sym, self.input_shape, self.input_name)
        n_params = count_param_dict(new_params)
        log(f"pruning: rebuilt smaller: MACs {self.dense_macs / 1e6:.2f}M → {macs / 1e6:.2f}M "
            f"({self.dense_macs / max(macs, 1):.2f}× fewer), params {self.dense_params} → {n_params}; "
            f"shrunk ≡ masked (max diff {diff:.1e}); plan: {path}")
        return small

    def metrics(self, student):
        out = super().metrics(student)
        out["pruning"].update(physically_smaller=bool(self.removed), plan=PLAN_FILE,
                              groups=len(self.graph.groups), intact=self.graph.intact,
                              removed_units=len(self.removed))
        if self.shrink_diff is not None:
            out["pruning"]["shrink_vs_mask_max_diff"] = self.shrink_diff
        out["pruning"]["shrink"] = "each_update" if self.rebuilds else "end"   # as the run went
        if self.rebuild_log:
            out["pruning"]["rebuilds"] = self.rebuild_log
        return out
