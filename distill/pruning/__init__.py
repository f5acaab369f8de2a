"""Pruning: channel-structured and unstructured, on any MXNet symbol graph.

Analyse → plan → apply (Torch-Pruning's route): :func:`~distill.pruning.graph.analyze` builds the
channel dependency graph of a symbol; :mod:`~distill.pruning.plan` chooses, per coupled group,
which channels stay (plain data, saved as JSON); :mod:`~distill.pruning.apply` turns a plan into
masks or into a physically smaller (symbol, params). During training, a pruning modifier
(schedule + criterion: :mod:`~distill.pruning.channel` or :mod:`~distill.pruning.unstructured`,
over :mod:`~distill.pruning.pruner`) and the :class:`~distill.pruning.masks.MaskKeeper` act on
the loop; :func:`build_modifiers` picks them for a recipe.

This module imports numpy only (the recipe checks criterion and schedule names against its
registries without loading MXNet); :func:`build_modifiers` imports the MXNet parts when called.
"""
from .base import CRITERIA, SCHEDULES, Criterion, Schedule
from . import criteria, schedules  # noqa: F401  (registration)

__all__ = ["CRITERIA", "SCHEDULES", "Criterion", "Schedule", "build_modifiers"]


def build_modifiers(recipe, teacher=None, log=print):
    """The modifiers for ``recipe.pruning`` (called by :func:`distill.run.run_training`)."""
    from .modifier import build_modifiers as _build    # lazy: keeps this module numpy-only
    return _build(recipe, teacher=teacher, log=log)
