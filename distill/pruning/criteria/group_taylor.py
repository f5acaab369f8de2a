"""Group first-order Taylor (Molchanov et al., 2019, "Importance Estimation for Neural Network
Pruning"), over the coupled group of Fang et al., 2023."""
import logging

import numpy as np

from ..base import CRITERIA, GroupCriterion

__all__ = ["GroupTaylor"]
_LOGGER = logging.getLogger(__name__)


@CRITERIA.register("group_taylor")
class GroupTaylor(GroupCriterion):
    """``|Σ w · ḡ|`` over every slice of a channel's coupled group (its filters, the consumers'
    input columns, BatchNorm gamma): the first-order change of the training loss (the
    distillation loss when the recipe distils) if the whole channel is removed, divided by the
    mean over the group like ``group_l2``. ``ḡ`` is the gradient averaged over the steps since
    the last mask update (before the first: a few calibration batches), as for ``taylor``.

    Recipe example::

        pruning: {enabled: true, granularity: channel, criterion: group_taylor}
    """

    name = "group_taylor"
    needs_grad = True

    def element_scores(self, w, grad=None, rng=None):
        if grad is None:
            raise ValueError("group_taylor needs gradients")
        return np.abs(w * grad)

    def row_scores(self, rows, grad_rows=None, rng=None):
        """``(K, D)`` weights and gradients → ``(K,)`` signed ``Σ w·ḡ`` (the absolute value is
        taken once the unit's slices are summed: :meth:`finish`)."""
        if grad_rows is None:
            raise ValueError("group_taylor needs gradients")
        return (rows * grad_rows).sum(axis=1)

    def finish(self, totals):
        return np.abs(totals)
