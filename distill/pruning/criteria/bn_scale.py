"""BatchNorm scale (Liu et al., 2017, "Learning Efficient Convolutional Networks through Network
Slimming")."""
import logging

import numpy as np

from ..base import CRITERIA, Criterion

__all__ = ["BNScale"]
_LOGGER = logging.getLogger(__name__)


@CRITERIA.register("bn_scale")
class BNScale(Criterion):
    """``|gamma|`` of the BatchNorm after a channel; channels without one fall back to L1 of the
    filter. Unstructured pruning has no gamma per weight: there it is plain ``|w|``.

    Recipe example::

        pruning: {enabled: true, granularity: channel, criterion: bn_scale, scope: global}
    """

    name = "bn_scale"
    channel_roles = (("scale",), ("out",))

    def element_scores(self, w, grad=None, rng=None):
        return np.abs(w)

    def row_scores(self, rows, grad_rows=None, rng=None):
        """``(K, D)`` → ``(K,)``: ``|gamma|`` for gamma rows (D = 1), mean ``|w|`` otherwise."""
        return np.abs(rows).mean(axis=1)
