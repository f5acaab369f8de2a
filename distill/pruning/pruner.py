"""What the channel and the unstructured pruning modifiers share: the schedule, the layer ratios
(``exclude``, ``overrides``), Taylor gradients, checkpointed state and the reports.

:class:`PruningModifier` is the base; :class:`~distill.pruning.channel.ChannelPruningModifier`
and :class:`~distill.pruning.unstructured.UnstructuredPruningModifier` override what differs:
the set-up (:meth:`~PruningModifier.setup`), the mask update (:meth:`~PruningModifier.update`),
the cost (:meth:`~PruningModifier.cost`), :meth:`~PruningModifier.finalize` and
:meth:`~PruningModifier.metrics`.
"""
import fnmatch
import json
import logging

import mxnet as mx
import numpy as np

from ..errors import UserError, closest
from ..graphio import AUX_SUFFIXES
from ..modelinfo import layer_table
from ..modifier import Modifier
from ..replicas import first, grad_after_step
from ..runfolder import RunFolder
from .gradients import accumulate_grads

__all__ = ["PruningModifier", "prunable_layers", "resolve_patterns", "fill_shapes", "nonzero_params"]
_LOGGER = logging.getLogger(__name__)

_LAYER_OPS = ("Convolution", "FullyConnected", "Deconvolution")


def prunable_layers(symbol):
    """``[(layer name, weight name, op)]`` of every conv / dense layer, in graph order."""
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


def fill_shapes(net):
    """Give every parameter its shape (``make_block``'s ``_load_init`` leaves a SymbolBlock's
    shapes unset, which :func:`distill.graphio.count_params` needs)."""
    for p in net.collect_params().values():
        if p.shape is None or 0 in p.shape:
            p.shape = tuple(first(p).shape)


def nonzero_params(params):
    """Nonzero learnable values in a name → Parameter dict (BN running statistics excluded)."""
    return sum(int(np.count_nonzero(first(p).asnumpy())) for n, p in params.items()
               if not n.endswith(AUX_SUFFIXES))


class PruningModifier(Modifier):
    """Schedule + criterion: updates the masks at the schedule's epochs (the shared base).

    Parameters
    ----------
    cfg : PruningConfig
    criterion : Criterion
    schedule : Schedule
    keeper : MaskKeeper
    input_name : str
    run_dir : str
        The run folder (the plan and the params file are found through :class:`RunFolder`).
    seed : int
    teacher : Teacher or None
        Gives soft targets for the Taylor calibration when the data have no labels.
    log : callable

    Recipe example::

        pruning: {enabled: true, granularity: channel, criterion: l1, schedule: agp,
                  final_sparsity: 0.5, exclude: [last]}
    """

    name = "pruning"

    def __init__(self, cfg, criterion, schedule, keeper, input_name="data", run_dir=".", seed=0,
                 teacher=None, log=print):
        self.cfg, self.criterion, self.schedule, self.keeper = cfg, criterion, schedule, keeper
        self.input_name, self.seed = input_name, seed
        self.folder = RunFolder(run_dir)
        self.teacher, self.log = teacher, log
        self.done = []                 # epochs whose mask update has happened
        self.sparsity = 0.0            # target in force
        self._grad_np = {}             # restored accumulators (numpy)
        self._grad = {}
        self._grad_steps = 0
        self._plan_keep = None
        self._stats = None             # (epoch, stats) of the last epoch_end

    # -- set-up ---------------------------------------------------------------------------------
    def initialize(self, net, trainer, data):
        self.net, self.data, self.trainer = net, data, trainer
        self.params = net.collect_params()
        self.input_shape = (1,) + tuple(data.train.x.shape[1:])
        self.symbol = net(mx.sym.var(self.input_name))
        self.layers = prunable_layers(self.symbol)
        cfg = self.cfg
        excluded = resolve_patterns(cfg.exclude, self.layers, "pruning.exclude")
        overrides = resolve_patterns([o.layers for o in cfg.overrides], self.layers, "pruning.overrides")
        self.excluded = sorted({l for hits in excluded.values() for l in hits})
        kept = resolve_patterns(cfg.keep_outputs, self.layers, "pruning.keep_outputs")
        self.outputs_kept = sorted({l for hits in kept.values() for l in hits} - set(self.excluded))
        if cfg.granularity == "unstructured" and self.outputs_kept:
            # single weights never change a width: there keep_outputs means exclude
            self.excluded = sorted(set(self.excluded) | set(self.outputs_kept))
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
        self.dense_params = sum(int(np.prod(first(p).shape)) for n, p in self.params.items()
                                if not n.endswith(AUX_SUFFIXES))
        self.weight_of = {l: w for l, w, _ in self.layers}
        self.tracked = self.setup()
        if self.criterion.needs_grad:         # accumulators on replica 0's device
            self._grad = {}
            for n in self.tracked:
                w = first(self.params[n])
                self._grad[n] = mx.nd.array(self._grad_np[n], ctx=w.context) if n in self._grad_np \
                    else mx.nd.zeros(w.shape, ctx=w.context)

    def setup(self):
        """Granularity-specific set-up after the layer ratios are known; returns the names of
        the parameters whose gradients the Taylor criterion needs."""
        raise NotImplementedError

    # -- hooks ------------------------------------------------------------------------------------
    def epoch_start(self, epoch):
        events = self.schedule.events()
        if epoch not in events or epoch in self.done:
            return
        k = events.index(epoch)
        frac = self.schedule.fraction(k, len(events))
        rng = np.random.RandomState(self.seed * 7919 + epoch)
        grads = self._mean_grads() if self.criterion.needs_grad else None
        self.update(frac, grads, rng)
        self.sparsity = self.cfg.final_sparsity * frac
        self.done.append(epoch)
        self._reset_grads()
        st = self.stats()
        self.log(f"pruning: epoch {epoch + 1}: update {k + 1}/{len(events)}, target "
                 f"{self.sparsity:.1%}, weight sparsity {st['sparsity']:.1%}, "
                 f"MACs {st['macs'] / 1e6:.2f}M ({self.dense_macs / max(st['macs'], 1):.2f}× fewer)")

    def update(self, frac, grads, rng):
        """Set the keeper's masks for ``frac`` of the final sparsity (``grads``: mean
        gradients by parameter name, for criteria that need them; ``rng``: this update's)."""
        raise NotImplementedError

    def after_step(self, epoch, step, steps_per_epoch):
        if not self.criterion.needs_grad or not self._grad:
            return
        if self.done and len(self.done) == len(self.schedule.events()):
            return                              # no update left: nothing to accumulate for
        # the whole batch's gradient: on several devices each replica may hold only its slice's
        # (see distill.replicas.grad_after_step for what trainer.step leaves in each replica)
        for n, acc in self._grad.items():
            acc += grad_after_step(self.params[n], self.trainer)
        self._grad_steps += 1

    def epoch_end(self, epoch):
        st = self._epoch_stats(epoch)
        return {"sparsity": round(st["sparsity"], 5), "macs": int(st["macs"]),
                "nonzero_params": int(st["nonzero_params"])}

    def scalars(self, epoch):
        st = self._epoch_stats(epoch)
        out = {"pruning/sparsity": st["sparsity"], "pruning/macs": st["macs"],
               "pruning/flops": 2 * st["macs"], "pruning/params": st["params"],
               "pruning/nonzero_params": st["nonzero_params"]}
        for layer, s in st["layers"].items():
            out[f"pruning/sparsity/{layer}"] = s
        return out

    def _epoch_stats(self, epoch):
        # epoch_end and scalars report the same state: compute it once per epoch
        if self._stats is None or self._stats[0] != epoch:
            self._stats = (epoch, self.stats())
        return self._stats[1]

    def plan_keep(self):
        """The plan's ``keep`` (group id → kept units) to checkpoint, or ``None``."""
        return self._plan_keep

    def state_dict(self):
        grads = {n: a.asnumpy() for n, a in self._grad.items()} if self._grad else self._grad_np
        return {"done": list(self.done), "plan_keep": self.plan_keep(), "sparsity": self.sparsity,
                "grads": grads, "grad_steps": self._grad_steps}

    def load_state_dict(self, state):
        if not state:
            return
        self.done = list(state.get("done", []))
        self._plan_keep = state.get("plan_keep")     # resolved against the graph in initialize
        self.sparsity = state.get("sparsity", 0.0)
        self._grad_np = state.get("grads", {}) or {}
        self._grad_steps = state.get("grad_steps", 0)

    # -- gradients for taylor -------------------------------------------------------------------------
    def _np_params(self, names):
        return {n: first(self.params[n]).asnumpy() for n in names}

    def _reset_grads(self):
        for a in self._grad.values():
            a[:] = 0
        self._grad_np, self._grad_steps = {}, 0

    def _mean_grads(self, batches=8, batch_size=32):
        if self._grad_steps == 0:              # an update before any step: a calibration pass
            if self.data.train.y is None and self.teacher is None:
                raise UserError("pruning.criterion: taylor needs labels or a teacher to compute "
                                "gradients; use another criterion (l1) for label-free data.")
            self._grad_steps += accumulate_grads(self.net, self.data.train.x, self.data.train.y,
                                                 self._grad, self.seed, self.teacher, batches,
                                                 batch_size)
        n = max(self._grad_steps, 1)
        return {k: a.asnumpy() / n for k, a in self._grad.items()}

    # -- reporting -------------------------------------------------------------------------------------
    def stats(self):
        """Weight sparsity (per layer and overall), MACs, params and nonzero params now (a weight
        cut out of a rebuilt student counts as zero: sparsity is over the starting shapes)."""
        layers, zeros, total = {}, 0, 0
        for l, w, _ in self.layers:
            a = first(self.params[w]).asnumpy()
            size = int(np.prod(self.dense_shape(w)))
            z = int((a == 0).sum()) + size - a.size
            layers[l] = z / size
            zeros += z
            total += size
        nonzero = nonzero_params(self.params)
        macs, params = self.cost()
        return {"sparsity": zeros / max(total, 1), "layers": layers, "macs": macs,
                "params": params, "nonzero_params": nonzero}

    def dense_shape(self, name):
        """The shape parameter ``name`` had when pruning started."""
        return tuple(first(self.params[name]).shape)

    def cost(self):
        """``(MACs, parameters)`` of the network as deployed now."""
        return self.dense_macs, self.dense_params

    def finalize(self, student, data, log):
        fill_shapes(student)
        return student

    def metrics(self, student):
        """``nonzero_params``, ``sparsity`` (1 − nonzero / parameters before pruning) and details."""
        nonzero = nonzero_params(student.collect_params())
        info = {"granularity": self.cfg.granularity, "criterion": self.cfg.criterion,
                "schedule": self.cfg.schedule, "scope": self.cfg.scope,
                "final_sparsity": self.cfg.final_sparsity, "params_before": int(self.dense_params),
                "macs_before": int(self.dense_macs), "excluded": self.excluded}
        return {"nonzero_params": int(nonzero),
                "sparsity": round(1.0 - nonzero / max(self.dense_params, 1), 5),
                "pruning": info}
