"""One-shot pruning: the final sparsity at once, then fine-tuning (Han et al., 2015)."""
import logging

from ..base import SCHEDULES, Schedule

__all__ = ["OneShot"]
_LOGGER = logging.getLogger(__name__)


@SCHEDULES.register("oneshot")
class OneShot(Schedule):
    """All of ``final_sparsity`` at the start of ``start_epoch``; ``end_epoch`` is ignored.

    Recipe example::

        pruning: {enabled: true, schedule: oneshot, start_epoch: 0, final_sparsity: 0.5}
    """

    name = "oneshot"

    def __init__(self, start_epoch, end_epoch, frequency):
        super().__init__(start_epoch, start_epoch, frequency)

    def fraction(self, k, n):
        return 1.0
