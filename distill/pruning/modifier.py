"""The pruning modifiers: a schedule that updates masks, and a keeper that holds them.

:class:`PruningModifier` decides, at the start of the schedule's epochs, which weights
(``unstructured``) or which channels (``channel``, through the dependency analysis of
:mod:`distill.pruning.graph`) are removed, and hands the masks to :class:`MaskKeeper`, which
multiplies them into the parameters right after every optimizer step, so momentum and weight
decay never regrow a pruned weight. Both save their state in every checkpoint, so ``--resume``
continues with the same masks. At the end, a channel-pruned student is rebuilt physically
smaller (:func:`distill.pruning.apply.shrink`) and its plan is written to
``pruning-plan.json``; an unstructured one stays a masked dense network.

Recipe example::

    student: {from: teacher}
    pruning:
      enabled: true
      granularity: channel        # or unstructured
      criterion: l1               # l1 | l2 | bn_scale | taylor | random
      scope: layer                # or global
      schedule: agp               # oneshot | iterative | agp
      start_epoch: 0
      end_epoch: 4
      frequency: 1
      final_sparsity: 0.5
      round_to: 8
      exclude: [first, last]
      overrides:
        - {layers: "*stage3*", final_sparsity: 0.3}
"""
import fnmatch
import logging
import os
import zlib

import mxnet as mx
import numpy as np
from mxnet import autograd

from ..errors import UserError, closest
from ..trainer import Modifier
from .base import CRITERIA, SCHEDULES

__all__ = ["PruningModifier", "MaskKeeper", "build_modifiers", "prunable_layers",
           "resolve_patterns"]
_LOGGER = logging.getLogger(__name__)

_LAYER_OPS = ("Convolution", "FullyConnected", "Deconvolution")


class MaskKeeper(Modifier):
    """Holds elementwise masks and multiplies them into the parameters after every step.

    Masks are bool arrays by parameter name; ``True`` keeps a weight. They are saved in every
    checkpoint (``state_dict``), packed to bits, and re-applied on ``--resume``.

    Recipe example::

        pruning: {enabled: true}      # the keeper comes with every pruning recipe
    """

    name = "masks"

    def __init__(self):
        self.masks = {}
        self._nd = {}
        self.params = None

    def initialize(self, net, trainer, data):
        self.params = net.collect_params()
        self.apply()

    def set_masks(self, masks):
        """Replace the masks (``{param: bool array}``) and apply them at once."""
        self.masks = {k: np.asarray(v, dtype=bool) for k, v in masks.items()}
        self._nd = {}
        self.apply()

    def apply(self):
        """Zero the masked weights (in place: a hybridized, static-alloc graph sees them)."""
        if self.params is None:
            return
        for name, m in self.masks.items():
            p = self.params[name]
            nd = self._nd.get(name)
            if nd is None:
                nd = self._nd[name] = mx.nd.array(m, dtype=p.dtype)
            d = p.data()
            d *= nd

    def after_step(self, epoch, step, steps_per_epoch):
        self.apply()

    def state_dict(self):
        return {"masks": {k: {"shape": list(m.shape), "bits": np.packbits(m.ravel())}
                          for k, m in self.masks.items()}}

    def load_state_dict(self, state):
        masks = {}
        for k, v in (state or {}).get("masks", {}).items():
            n = int(np.prod(v["shape"]))
            masks[k] = np.unpackbits(v["bits"])[:n].astype(bool).reshape(v["shape"])
        self.masks, self._nd = masks, {}


def prunable_layers(symbol):
    """``[(layer name, weight name, op)]`` of every conv / dense layer, in graph order."""
    import json
    g = json.loads(symbol.tojson())
    nodes = g["nodes"]
    out = []
    for n in nodes:
        if n["op"] in _LAYER_OPS and len(n["inputs"]) > 1:
            w = nodes[n["inputs"][1][0]]
            if w["op"] == "null":
                out.append((n["name"], w["name"], n["op"]))
    return out


def resolve_patterns(patterns, layers, key):
    """Layers matching each pattern; a pattern that matches nothing is a :class:`UserError`.

    ``first`` and ``last`` name the first and last conv/dense layer; other patterns are globs
    matched against layer names and their weight names.
    """
    names = [l for l, _, _ in layers]
    matched = {}
    for pat in patterns:
        if pat == "first":
            hits = names[:1]
        elif pat == "last":
            hits = names[-1:]
        else:
            hits = [l for l, w, _ in layers if fnmatch.fnmatchcase(l, pat) or fnmatch.fnmatchcase(w, pat)]
        if not hits:
            near = closest(pat, names)
            raise UserError(f"recipe key `{key}`: pattern {pat!r} matches no layer of the student. "
                            f"{'Closest: ' + ', '.join(near) + '. ' if near else ''}Layer names look "
                            f"like {', '.join(names[:3])} (`distill inspect` lists them all); globs "
                            f"such as '*stage3*' work, and `first` / `last` name the first and last layer.")
        matched[pat] = hits
    return matched


class PruningModifier(Modifier):
    """Schedule + criterion: updates the masks at the schedule's epochs (see module docstring).

    Parameters
    ----------
    cfg : PruningConfig
    criterion : Criterion
    schedule : Schedule
    keeper : MaskKeeper
    input_name : str
    run_dir : str
        Where ``pruning-plan.json`` goes.
    seed : int
    teacher : Teacher or None
        Gives soft targets for the Taylor calibration when the data have no labels.
    log : callable
    """

    name = "pruning"

    def __init__(self, cfg, criterion, schedule, keeper, input_name="data", run_dir=".", seed=0,
                 teacher=None, log=print):
        self.cfg, self.criterion, self.schedule, self.keeper = cfg, criterion, schedule, keeper
        self.input_name, self.run_dir, self.seed = input_name, run_dir, seed
        self.teacher, self.log = teacher, log
        self.done = []                 # epochs whose mask update has happened
        self.removed = set()           # channel: removed unit ids
        self.sparsity = 0.0            # target in force
        self._grad_np = {}             # restored accumulators (numpy)
        self._grad = {}
        self._grad_steps = 0
        self._plan_keep = None
        self.graph = None

    # -- set-up ---------------------------------------------------------------------------------
    def initialize(self, net, trainer, data):
        from ..modelinfo import layer_table
        self.net, self.data = net, data
        self.params = net.collect_params()
        self.input_shape = (1,) + tuple(data.train.x.shape[1:])
        self.symbol = net(mx.sym.var(self.input_name))
        self.layers = prunable_layers(self.symbol)
        cfg = self.cfg
        excluded = resolve_patterns(cfg.exclude, self.layers, "pruning.exclude")
        overrides = resolve_patterns([o.layers for o in cfg.overrides], self.layers, "pruning.overrides")
        self.excluded = sorted({l for hits in excluded.values() for l in hits})
        self.override_of = {}
        for n, o in enumerate(cfg.overrides):          # later overrides win
            for l in overrides[o.layers]:
                self.override_of[l] = (n, o.final_sparsity)
        self.layer_ratio = {}
        for l, _, _ in self.layers:
            self.layer_ratio[l] = 0.0 if l in self.excluded else \
                self.override_of.get(l, (-1, cfg.final_sparsity))[1]
        table = layer_table(self.symbol, self.input_shape, self.input_name)
        self.layer_macs = {r["name"]: r["macs"] for r in table}
        self.dense_macs = sum(self.layer_macs.values())
        self.dense_params = sum(int(np.prod(p.data().shape)) for n, p in self.params.items()
                                if not n.endswith(("running_mean", "running_var", "moving_mean", "moving_var")))
        self.weight_of = {l: w for l, w, _ in self.layers}
        if cfg.granularity == "channel":
            from .graph import analyze
            self.graph = analyze(self.symbol, self.input_shape, self.input_name)
            self.group_ratio = {grp.id: self._group_ratio(grp) for grp in self.graph.groups}
            if self._plan_keep:                        # resumed: the channels removed so far
                from .plan import Plan, removed_units
                self.removed = removed_units(self.graph, Plan(self._plan_keep))
            frozen = [g.name for g in self.graph.groups if self.group_ratio[g.id] == 0]
            self.log(f"pruning: {len(self.graph.groups)} coupled channel groups, "
                     f"{len(self.graph.intact)} layers kept intact"
                     + (f" ({'; '.join(i['layer'] + ': ' + i['reason'] for i in self.graph.intact[:4])}"
                        f"{' ...' if len(self.graph.intact) > 4 else ''})" if self.graph.intact else "")
                     + (f"; not pruned (excluded or ratio 0): {', '.join(frozen)}" if frozen else ""))
            self.tracked = sorted({s.param for s in self.graph.slices if s.role in ("out", "scale")
                                   and self.params[s.param].grad_req != "null"})
        else:
            self.tracked = [self.weight_of[l] for l, _, _ in self.layers if self.layer_ratio[l] > 0]
            self.log(f"pruning: unstructured, {len(self.tracked)} layers"
                     + (f"; not pruned (exclude): {', '.join(self.excluded)}" if self.excluded else ""))
        if self.criterion.needs_grad:
            self._grad = {n: mx.nd.array(self._grad_np[n]) if n in self._grad_np
                          else mx.nd.zeros(self.params[n].data().shape) for n in self.tracked}

    def _group_ratio(self, grp):
        """A coupled group is pruned as one: excluding any of its layers keeps the whole group;
        else an override on any of its layers sets its ratio (the last one in the recipe)."""
        prods = [p for p in grp.producers if p in self.layer_ratio]
        if not prods or any(p in self.excluded for p in prods):
            return 0.0
        hits = [self.override_of[p] for p in prods if p in self.override_of]
        return max(hits)[1] if hits else self.cfg.final_sparsity

    # -- hooks ------------------------------------------------------------------------------------
    def epoch_start(self, epoch):
        events = self.schedule.events()
        if epoch not in events or epoch in self.done:
            return
        k = events.index(epoch)
        frac = self.schedule.fraction(k, len(events))
        rng = np.random.RandomState(self.seed * 7919 + epoch)
        grads = self._mean_grads() if self.criterion.needs_grad else None
        if self.cfg.granularity == "channel":
            self._update_channels(frac, grads, rng)
        else:
            self._update_unstructured(frac, grads, rng)
        self.sparsity = self.cfg.final_sparsity * frac
        self.done.append(epoch)
        self._reset_grads()
        st = self.stats()
        self.log(f"pruning: epoch {epoch + 1}: update {k + 1}/{len(events)}, target "
                 f"{self.sparsity:.1%}, weight sparsity {st['sparsity']:.1%}, "
                 f"MACs {st['macs'] / 1e6:.2f}M ({self.dense_macs / max(st['macs'], 1):.2f}× fewer)")

    def after_step(self, epoch, step, steps_per_epoch):
        if not self.criterion.needs_grad or not self._grad:
            return
        if self.done and len(self.done) == len(self.schedule.events()):
            return                              # no update left: nothing to accumulate for
        for n, acc in self._grad.items():
            acc += self.params[n].grad()
        self._grad_steps += 1

    def epoch_end(self, epoch, writer):
        st = self.stats()
        step = epoch + 1
        if writer is not None:
            writer.add_scalar("pruning/sparsity", st["sparsity"], step)
            writer.add_scalar("pruning/macs", st["macs"], step)
            writer.add_scalar("pruning/flops", 2 * st["macs"], step)
            writer.add_scalar("pruning/params", st["params"], step)
            writer.add_scalar("pruning/nonzero_params", st["nonzero_params"], step)
            for layer, s in st["layers"].items():
                writer.add_scalar(f"pruning/sparsity/{layer}", s, step)
        return {"sparsity": round(st["sparsity"], 5), "macs": int(st["macs"]),
                "nonzero_params": int(st["nonzero_params"])}

    def state_dict(self):
        grads = {n: a.asnumpy() for n, a in self._grad.items()} if self._grad else self._grad_np
        keep = None
        if self.graph is not None:                 # the plan, not graph-internal unit ids
            from .plan import plan_from_removed
            keep = plan_from_removed(self.graph, self.removed).keep
        elif self._plan_keep is not None:
            keep = self._plan_keep
        return {"done": list(self.done), "plan_keep": keep, "sparsity": self.sparsity,
                "grads": grads, "grad_steps": self._grad_steps}

    def load_state_dict(self, state):
        if not state:
            return
        self.done = list(state.get("done", []))
        self._plan_keep = state.get("plan_keep")     # resolved against the graph in initialize
        self.sparsity = state.get("sparsity", 0.0)
        self._grad_np = state.get("grads", {}) or {}
        self._grad_steps = state.get("grad_steps", 0)

    # -- mask updates -------------------------------------------------------------------------------
    def _np_params(self, names):
        return {n: self.params[n].data().asnumpy() for n in names}

    def _update_channels(self, frac, grads, rng):
        from .apply import channel_masks
        from .plan import choose_removed, unit_scores
        g = self.graph
        groups = [grp for grp in g.groups if self.group_ratio[grp.id] > 0]
        names = sorted({s.param for s in g.slices})
        scores = unit_scores(g, groups, self.criterion, self._np_params(names), grads, rng)
        ratios = {grp.id: self.group_ratio[grp.id] * frac for grp in groups}
        self.removed = choose_removed(g, scores, ratios, self.cfg.round_to, self.cfg.scope,
                                      already=self.removed)
        self.keeper.set_masks(channel_masks(g, self.removed))

    def _update_unstructured(self, frac, grads, rng):
        layers = [(l, self.weight_of[l]) for l, _, _ in self.layers if self.layer_ratio[l] > 0]
        weights = self._np_params([w for _, w in layers])
        old = self.keeper.masks
        scores = {}
        for l, w in layers:
            s = self.criterion.element_scores(weights[w], None if grads is None else grads[w], rng=rng)
            s = np.asarray(s, dtype=np.float64)
            if w in old:
                s = np.where(old[w], s, -np.inf)          # once pruned, always pruned
            scores[w] = s
        masks = {}
        if self.cfg.scope == "global":
            ratios = [self.layer_ratio[l] for l, _ in layers]
            common = max(set(ratios), key=ratios.count)
            pool = [w for l, w in layers if self.layer_ratio[l] == common]
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
        for l, w in layers:
            if w in masks:
                continue
            s = scores[w].ravel()
            n_rm = int(round(self.layer_ratio[l] * frac * s.size))
            keep = np.ones(s.size, bool)
            keep[np.argsort(s, kind="stable")[:n_rm]] = False
            masks[w] = keep.reshape(scores[w].shape)
        self.keeper.set_masks(masks)

    # -- gradients for taylor -------------------------------------------------------------------------
    def _reset_grads(self):
        for a in self._grad.values():
            a[:] = 0
        self._grad_np, self._grad_steps = {}, 0

    def _mean_grads(self, batches=8, batch_size=32):
        if self._grad_steps == 0:
            self._calibrate(batches, batch_size)
        n = max(self._grad_steps, 1)
        return {k: a.asnumpy() / n for k, a in self._grad.items()}

    def _calibrate(self, batches, batch_size):
        """Gradients on a few training batches, without an update (before the first step)."""
        x_all, y_all = self.data.train.x, self.data.train.y
        rng = np.random.RandomState(self.seed)
        order = rng.permutation(len(x_all))
        ce = mx.gluon.loss.SoftmaxCrossEntropyLoss()
        kl = mx.gluon.loss.KLDivLoss(from_logits=False)
        for b in range(batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            if len(idx) == 0:
                break
            x = mx.nd.array(x_all[idx])
            if y_all is None and self.teacher is None:
                raise UserError("pruning.criterion: taylor needs labels or a teacher to compute "
                                "gradients; use another criterion (l1) for label-free data.")
            soft = mx.nd.softmax(self.teacher(x)) if y_all is None else None
            with autograd.record(train_mode=False):   # no BatchNorm statistics update
                out = self.net(x)
                loss = ce(out, mx.nd.array(y_all[idx])) if soft is None else kl(out, soft)
            loss.backward()
            for n, acc in self._grad.items():
                acc += self.params[n].grad()
            self._grad_steps += 1

    # -- reporting -------------------------------------------------------------------------------------
    def stats(self):
        """Weight sparsity (per layer and overall), MACs, params and nonzero params now."""
        layers, zeros, total = {}, 0, 0
        for l, w, _ in self.layers:
            a = self.params[w].data().asnumpy()
            z = int((a == 0).sum())
            layers[l] = z / a.size
            zeros += z
            total += a.size
        nonzero = 0
        for n, p in self.params.items():
            if n.endswith(("running_mean", "running_var", "moving_mean", "moving_var")):
                continue
            nonzero += int(np.count_nonzero(p.data().asnumpy()))
        if self.cfg.granularity == "channel":
            macs, params = self._channel_cost()
        else:
            macs, params = self.dense_macs, self.dense_params
        return {"sparsity": zeros / max(total, 1), "layers": layers, "macs": macs,
                "params": params, "nonzero_params": nonzero}

    def _channel_cost(self):
        """MACs and parameters of the network once the removed channels are cut out."""
        from .apply import param_keeps
        keeps = param_keeps(self.graph, self.removed)
        macs = 0
        for l, w, _ in self.layers:
            frac = 1.0
            for _axis, keep in keeps.get(w, []):
                frac *= keep.mean()
            macs += self.layer_macs.get(l, 0) * frac
        params = 0
        for n, p in self.params.items():
            if n.endswith(("running_mean", "running_var", "moving_mean", "moving_var")):
                continue
            size = float(np.prod(p.data().shape))
            for _axis, keep in keeps.get(n, []):
                size *= keep.mean()
            params += size
        return int(round(macs)), int(round(params))

    # -- the end ----------------------------------------------------------------------------------------
    def finalize(self, student, data, log):
        """Channel: return the physically smaller network (checked against the masked one)."""
        _fill_shapes(student)
        if self.cfg.granularity != "channel":
            log("pruning: unstructured masks stay in the dense network (no speed-up on a dense "
                "engine; the file shrinks only when compressed)")
            return student
        from .apply import shrink, shrunk_block
        from .graph import PruningGraphError
        from .plan import plan_from_removed
        plan = plan_from_removed(self.graph, self.removed, round_to=self.cfg.round_to,
                                 criterion=self.cfg.criterion, final_sparsity=self.cfg.final_sparsity)
        path = os.path.join(self.run_dir, "pruning-plan.json")
        plan.save(path, self.graph)
        if not self.removed:
            log(f"pruning: no channel was removed (plan: {path})")
            return student
        params = {n: p.data() for n, p in student.collect_params().items()}
        sym, new_params = shrink(self.graph, params, self.removed)
        small = shrunk_block(sym, new_params, self.input_name)
        x = mx.nd.array(data.val.x[:32])
        diff = float(mx.nd.abs(student(x) - small(x)).max().asscalar())
        if not diff <= 1e-4:
            raise PruningGraphError(f"the shrunk network differs from the masked one by {diff:.3g} "
                                    f"(limit 1e-4); the masked checkpoint is kept. Please report this "
                                    f"with {path}.")
        self.shrink_diff = diff
        from ..modelinfo import total_macs
        macs = total_macs(sym, self.input_shape, self.input_name)
        n_params = sum(int(np.prod(v.shape)) for k, v in new_params.items()
                       if not k.endswith(("running_mean", "running_var", "moving_mean", "moving_var")))
        log(f"pruning: rebuilt smaller: MACs {self.dense_macs / 1e6:.2f}M → {macs / 1e6:.2f}M "
            f"({self.dense_macs / max(macs, 1):.2f}× fewer), params {self.dense_params} → {n_params}; "
            f"shrunk ≡ masked (max diff {diff:.1e}); plan: {path}")
        return small

    def metrics(self, student):
        """``nonzero_params``, ``sparsity`` (1 − nonzero / parameters before pruning) and details."""
        nonzero = sum(int(np.count_nonzero(p.data().asnumpy())) for n, p in student.collect_params().items()
                      if not n.endswith(("running_mean", "running_var", "moving_mean", "moving_var")))
        info = {"granularity": self.cfg.granularity, "criterion": self.cfg.criterion,
                "schedule": self.cfg.schedule, "scope": self.cfg.scope,
                "final_sparsity": self.cfg.final_sparsity, "params_before": int(self.dense_params),
                "macs_before": int(self.dense_macs), "excluded": self.excluded}
        if self.cfg.granularity == "channel":
            info.update(physically_smaller=bool(self.removed), plan="pruning-plan.json",
                        groups=len(self.graph.groups), intact=self.graph.intact,
                        removed_units=len(self.removed))
            if hasattr(self, "shrink_diff"):
                info["shrink_vs_mask_max_diff"] = self.shrink_diff
        else:
            pfile = os.path.join(self.run_dir, "model-0000.params")
            info.update(physically_smaller=False,
                        weight_sparsity=round(self.stats()["sparsity"], 5),
                        note="unstructured: zeros in dense tensors; MACs and latency are those of "
                             "the dense network, the file shrinks only when compressed")
            if os.path.isfile(pfile):
                with open(pfile, "rb") as f:
                    info["params_bytes_zlib"] = len(zlib.compress(f.read(), 6))
        return {"nonzero_params": int(nonzero),
                "sparsity": round(1.0 - nonzero / max(self.dense_params, 1), 5),
                "pruning": info}


def _fill_shapes(net):
    """Give every parameter its shape (``make_block``'s ``_load_init`` leaves a SymbolBlock's
    shapes unset, which ``modelinfo.count_params`` needs)."""
    for p in net.collect_params().values():
        if p.shape is None or 0 in p.shape:
            p.shape = tuple(p.data().shape)


def build_modifiers(recipe, teacher=None, log=print):
    """``[PruningModifier, MaskKeeper]`` for ``recipe.pruning``."""
    cfg = recipe.pruning
    epochs = recipe.trainer.epochs
    criterion = CRITERIA.get(cfg.criterion, where="pruning.criterion")()
    if cfg.end_epoch is not None:
        end = cfg.end_epoch
    else:
        end = cfg.start_epoch + max(0, (epochs - cfg.start_epoch) // 2 - 1)
    schedule = SCHEDULES.get(cfg.schedule, where="pruning.schedule")(cfg.start_epoch, end, cfg.frequency)
    keeper = MaskKeeper()
    input_name = recipe.teacher.input_name if recipe.student.from_ == "teacher" else "data"
    pruner = PruningModifier(cfg, criterion, schedule, keeper, input_name=input_name,
                             run_dir=recipe.run_dir, seed=recipe.trainer.seed, teacher=teacher, log=log)
    log(f"pruning: {cfg.granularity}, {cfg.criterion}, {cfg.scope} scope, {cfg.schedule} at epochs "
        f"{', '.join(str(e + 1) for e in schedule.events())} to {cfg.final_sparsity:.0%}")
    return [pruner, keeper]
