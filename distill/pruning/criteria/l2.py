"""L2 magnitude (He et al., 2018, "Soft Filter Pruning", filter norm)."""
import logging

import numpy as np

from ..base import CRITERIA, Criterion

__all__ = ["L2"]
_LOGGER = logging.getLogger(__name__)


@CRITERIA.register("l2")
class L2(Criterion):
    """``w²`` per weight; the root-mean-square of a channel's filter per channel.

    Recipe example::

        pruning: {enabled: true, criterion: l2}
    """

    name = "l2"

    def element_scores(self, w, grad=None, rng=None):
        return np.square(w)

    def row_scores(self, rows, grad_rows=None, rng=None):
        """``(K, D)`` → ``(K,)`` root mean square."""
        return np.sqrt(np.square(rows).mean(axis=1))
