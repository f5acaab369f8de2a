"""Random scores: the baseline every criterion must beat (Mittal et al., 2018, "Recovering from
Random Pruning")."""
import logging

import numpy as np

from ..base import CRITERIA, Criterion

__all__ = ["RandomCriterion"]
_LOGGER = logging.getLogger(__name__)


@CRITERIA.register("random")
class RandomCriterion(Criterion):
    """Uniform random importance, drawn from the generator the caller passes (seeded by the
    recipe's seed and the epoch, so a resumed run draws the same).

    Recipe example::

        pruning: {enabled: true, criterion: random}
    """

    name = "random"

    def element_scores(self, w, grad=None, rng=None):
        rng = rng if rng is not None else np.random.RandomState(0)
        return rng.uniform(size=np.shape(w))

    def row_scores(self, rows, grad_rows=None, rng=None):
        rng = rng if rng is not None else np.random.RandomState(0)
        return rng.uniform(size=len(rows))
