"""Automated gradual pruning (Zhu & Gupta, 2017, "To prune, or not to prune")."""
import logging

from ..base import SCHEDULES, Schedule

__all__ = ["AGP"]
_LOGGER = logging.getLogger(__name__)


@SCHEDULES.register("agp")
class AGP(Schedule):
    """The cubic schedule ``s_t = s_f · (1 − (1 − t / n)³)`` over the ``n`` updates (initial
    sparsity 0): much is pruned early, while the network can still recover, little at the end.
    Update ``k`` (0-based) uses ``t = k + 1``, so the last update reaches ``final_sparsity``.

    Recipe example::

        pruning: {enabled: true, schedule: agp, start_epoch: 0, end_epoch: 6, frequency: 1,
                  final_sparsity: 0.9}
    """

    name = "agp"

    def fraction(self, k, n):
        return 1.0 - (1.0 - (k + 1) / n) ** 3
