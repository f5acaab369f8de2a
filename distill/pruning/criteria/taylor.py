"""First-order Taylor (Molchanov et al., 2017, "Pruning Convolutional Neural Networks for
Resource Efficient Inference")."""
import logging

import numpy as np

from ..base import CRITERIA, Criterion

__all__ = ["Taylor"]
_LOGGER = logging.getLogger(__name__)


@CRITERIA.register("taylor")
class Taylor(Criterion):
    """The first-order change of the loss when a weight (or a channel) is removed.

    Per weight ``|w · ḡ|``; per channel ``|Σ w · ḡ|`` over the channel's filter, the parameter
    form of Molchanov et al.'s activation criterion (their 2019 follow-up shows the two agree).
    ``ḡ`` is the gradient averaged over the training steps since the last mask update (before the
    first update: over a few calibration batches).

    Recipe example::

        pruning: {enabled: true, criterion: taylor}
    """

    name = "taylor"
    needs_grad = True

    def element_scores(self, w, grad=None, rng=None):
        if grad is None:
            raise ValueError("taylor needs gradients")
        return np.abs(w * grad)

    def row_scores(self, rows, grad_rows=None, rng=None):
        """``(K, D)`` weights and gradients → ``(K,)``."""
        if grad_rows is None:
            raise ValueError("taylor needs gradients")
        return np.abs((rows * grad_rows).sum(axis=1))
