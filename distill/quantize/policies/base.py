"""The exclusion-policy registry and the :class:`Selection` a policy returns."""
from dataclasses import dataclass, field
from typing import List

from ...registry import Registry

__all__ = ["POLICIES", "Selection"]

POLICIES = Registry("exclusion policy")


@dataclass
class Selection:
    """What a policy chose.

    Attributes
    ----------
    excluded : list of str
        Weight layers kept in fp32, by original name.
    exclude_ops : list of str
        Further nodes kept fp32 (only when nothing int8 holds the budget: then all of them).
    notes : list of str
        One line each, for the report (how the choice was made).
    """
    excluded: List[str]
    exclude_ops: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
