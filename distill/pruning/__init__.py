"""Pruning: channel-structured and unstructured, on any MXNet symbol graph.

Analyse → plan → apply (Torch-Pruning's route): :func:`~distill.pruning.graph.analyze` builds the
channel dependency graph of a symbol; :mod:`~distill.pruning.plan` chooses, per coupled group,
which channels stay (plain data, saved as JSON); :mod:`~distill.pruning.apply` turns a plan into
masks or into a physically smaller (symbol, params). During training, the
:class:`~distill.pruning.modifier.PruningModifier` (schedule + criterion) and the
:class:`~distill.pruning.modifier.MaskKeeper` act on the loop.

This module imports numpy only; MXNet is loaded by the parts that need it.
"""
from .base import CRITERIA, SCHEDULES, Criterion, Schedule
from . import criteria, schedules  # noqa: F401  (registration)

__all__ = ["CRITERIA", "SCHEDULES", "Criterion", "Schedule", "build_modifiers"]


def build_modifiers(recipe, teacher=None, log=print):
    """The modifiers for ``recipe.pruning`` (called by :func:`distill.run.run_training`)."""
    from .modifier import build_modifiers as _build
    return _build(recipe, teacher=teacher, log=log)
