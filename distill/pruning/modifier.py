"""The pruning modifiers for a recipe: a schedule that updates masks, and a keeper that holds them.

:func:`build_modifiers` returns, for ``recipe.pruning``, the pruner registered under its
``granularity`` (:class:`~distill.pruning.channel.ChannelPruningModifier`: whole channels through
the dependency analysis, rebuilt physically smaller at the end;
:class:`~distill.pruning.unstructured.UnstructuredPruningModifier`: single weights, the network
stays a masked dense one) and the :class:`~distill.pruning.masks.MaskKeeper`, which multiplies
the masks into the parameters right after every optimizer step. Both save their state in every
checkpoint, so ``--resume`` continues with the same masks.

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
      exclude: [first]
      keep_outputs: [last]
      overrides:
        - {layers: "*stage3*", final_sparsity: 0.3}
"""
import logging

from .base import CRITERIA, PRUNERS, SCHEDULES
from .channel import ChannelPruningModifier
from .masks import MaskKeeper
from .pruner import PruningModifier, prunable_layers, resolve_patterns
from .unstructured import UnstructuredPruningModifier

__all__ = ["PruningModifier", "ChannelPruningModifier", "UnstructuredPruningModifier",
           "MaskKeeper", "build_modifiers", "prunable_layers", "resolve_patterns"]
_LOGGER = logging.getLogger(__name__)


def build_modifiers(recipe, teacher=None, log=print):
    """``[pruner, MaskKeeper]`` for ``recipe.pruning`` (the pruner by ``granularity``)."""
    cfg = recipe.pruning
    epochs = recipe.trainer.epochs
    criterion = CRITERIA.get(cfg.criterion, where="pruning.criterion")(**cfg.criterion_options())
    if cfg.end_epoch is not None:
        end = cfg.end_epoch
    else:
        end = cfg.start_epoch + max(0, (epochs - cfg.start_epoch) // 2 - 1)
    schedule = SCHEDULES.get(cfg.schedule, where="pruning.schedule")(cfg.start_epoch, end, cfg.frequency)
    keeper = MaskKeeper()
    input_name = recipe.teacher.input_name if recipe.student.from_ == "teacher" else "data"
    pruner_cls = PRUNERS.get(cfg.granularity, where="pruning.granularity")
    pruner = pruner_cls(cfg, criterion, schedule, keeper, input_name=input_name,
                        run_dir=recipe.run_dir, seed=recipe.trainer.seed, teacher=teacher, log=log)
    t = cfg.target
    goal = (f"a {'latency' if t.latency is not None else 'MACs'} target of "
            f"{(t.latency if t.latency is not None else t.macs):.2f}× the unpruned model's "
            f"({t.backend}, batch {t.batch}; per-group ratios allocated at the start)" if t
            else f"{cfg.final_sparsity:.0%}")
    log(f"pruning: {cfg.granularity}, {cfg.criterion}, {cfg.scope} scope, {cfg.schedule} at epochs "
        f"{', '.join(str(e + 1) for e in schedule.events())} to {goal}")
    return [pruner, keeper]
