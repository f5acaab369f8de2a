"""Pruning criteria, one file each, registered on :data:`distill.pruning.base.CRITERIA`."""
from . import bn_scale, group_l2, group_taylor, l1, l2, random, taylor  # noqa: F401  (registration)
