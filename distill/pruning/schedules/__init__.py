"""Pruning schedules, one file each, registered on :data:`distill.pruning.base.SCHEDULES`."""
from . import agp, iterative, oneshot  # noqa: F401  (registration)
