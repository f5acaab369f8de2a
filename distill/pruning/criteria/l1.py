"""L1 magnitude (Li et al., 2017, "Pruning Filters for Efficient ConvNets")."""
import logging

import numpy as np

from ..base import CRITERIA, Criterion

__all__ = ["L1"]
_LOGGER = logging.getLogger(__name__)


@CRITERIA.register("l1")
class L1(Criterion):
    """``|w|`` per weight; the mean ``|w|`` of a channel's filter per channel.

    Recipe example::

        pruning: {enabled: true, criterion: l1}
    """

    name = "l1"

    def element_scores(self, w, grad=None, rng=None):
        return np.abs(w)

    def row_scores(self, rows, grad_rows=None, rng=None):
        """``(K, D)`` → ``(K,)`` mean absolute value."""
        return np.abs(rows).mean(axis=1)
