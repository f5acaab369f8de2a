"""Exclusion policies: which layers stay fp32 in the int8 model.

A policy is a small class registered on :data:`POLICIES` under the word a recipe writes in
``quantization.exclude`` (``none``, ``first_last``, ``auto``); anything else is read as layer
name patterns (:class:`~distill.quantize.policies.patterns.PatternPolicy`). ``select(scorer)``
returns a :class:`Selection`.

Recipe example::

    quantization: {exclude: auto, budget: 0.5}      # or: exclude: "*conv0_fwd,*output_pred*"
"""
from .base import POLICIES, Selection
from . import auto, first_last, none, patterns  # noqa: F401  (registration)

__all__ = ["POLICIES", "Selection", "resolve_policy"]


def resolve_policy(spec, budget=0.5):
    """The policy for ``quantization.exclude`` / ``--exclude``.

    Parameters
    ----------
    spec : str or list of str
        ``none``, ``first_last``, ``auto``, or patterns (a list, or one string ``a,b``).
    budget : float
        Points of top-1 ``auto`` may lose.
    """
    items = spec if isinstance(spec, list) else [s.strip() for s in str(spec).split(",")]
    items = [s for s in items if s]
    if len(items) == 1 and items[0] in POLICIES:
        cls = POLICIES.get(items[0])
        return cls(budget=budget) if items[0] == "auto" else cls()
    return patterns.PatternPolicy(items)
