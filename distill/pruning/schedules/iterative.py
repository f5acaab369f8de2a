"""Iterative pruning in equal steps (Han et al., 2015, "Learning both Weights and Connections")."""
import logging

from ..base import SCHEDULES, Schedule

__all__ = ["Iterative"]
_LOGGER = logging.getLogger(__name__)


@SCHEDULES.register("iterative")
class Iterative(Schedule):
    """Sparsity rises linearly: ``final · (k + 1) / n`` at update ``k`` of ``n``.

    Recipe example::

        pruning: {enabled: true, schedule: iterative, start_epoch: 0, end_epoch: 4, frequency: 1}
    """

    name = "iterative"

    def fraction(self, k, n):
        return (k + 1) / n
