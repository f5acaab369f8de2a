"""Pruning criteria, one file each, registered on :data:`distill.pruning.base.CRITERIA`."""
from . import bn_scale, l1, l2, random, taylor  # noqa: F401  (registration)
