"""Group L2 magnitude (Fang et al., 2023, "DepGraph: Towards Any Structural Pruning")."""
import logging

import numpy as np

from ..base import CRITERIA, GroupCriterion

__all__ = ["GroupL2"]
_LOGGER = logging.getLogger(__name__)


@CRITERIA.register("group_l2")
class GroupL2(GroupCriterion):
    """A channel's sum of squares over every slice of its coupled group: the filters that
    produce it, every consumer's input columns (the classifier's too) and BatchNorm gamma
    (depthwise filters only with ``group_slices: {depthwise: true}``); then divided by the mean over the group, so ``scope: global``
    ranks groups of different sizes and scales fairly (Torch-Pruning's
    ``GroupMagnitudeImportance(p=2)`` with its ``mean`` normalizer). A filter's scale alone
    says little when a BatchNorm follows it (``l1``); the consumers' columns and gamma do not
    cancel out. Per weight (unstructured) it is ``w²``.

    Recipe example::

        pruning: {enabled: true, granularity: channel, criterion: group_l2, scope: global}
    """

    name = "group_l2"

    def element_scores(self, w, grad=None, rng=None):
        return np.square(w)

    def row_scores(self, rows, grad_rows=None, rng=None):
        """``(K, D)`` → ``(K,)`` sum of squares (summed again over the unit's slices)."""
        return np.square(rows).sum(axis=1)

    def finish(self, totals):
        return totals
