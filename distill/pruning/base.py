"""Registries of pruning criteria and schedules, and the interfaces they follow.

A criterion scores weights (unstructured) or the rows of a parameter that belong to one channel
(channel pruning); a schedule says when masks are updated and how sparse they are then. Both are
numpy-only, so the recipe can check names without loading MXNet.
"""
import logging

from ..registry import Registry

__all__ = ["CRITERIA", "SCHEDULES", "PRUNERS", "Criterion", "GroupCriterion", "Schedule"]
_LOGGER = logging.getLogger(__name__)

CRITERIA = Registry("pruning criterion")
SCHEDULES = Registry("pruning schedule")
# granularity -> pruning modifier class (filled by distill.pruning.channel / .unstructured)
PRUNERS = Registry("pruning granularity")


class Criterion:
    """Importance of weights: higher = keep.

    ``channel_roles`` lists, in order of preference, the parameter-slice roles a channel score is
    computed from (``out``: the filters producing the channel; ``scale``: BatchNorm gamma).
    """

    name = "criterion"
    needs_grad = False
    channel_roles = (("out",),)
    skip_kinds = ()            # layer kinds whose slices a channel score leaves out ("depthwise")

    def element_scores(self, w, grad=None, rng=None):
        """Per-weight importance of ``w`` (any shape) → same shape."""
        raise NotImplementedError

    def row_scores(self, rows, grad_rows=None, rng=None):
        """Per-row importance of ``rows`` ``(K, D)`` (one row per channel slice) → ``(K,)``."""
        raise NotImplementedError


class GroupCriterion(Criterion):
    """A criterion over every slice of a channel's coupled group (``group_l2``, ``group_taylor``):
    the producing filters, the consumers' input columns and BatchNorm gamma, summed per unit.

    ``beta``: BatchNorm's shift counts too; ``depthwise``: depthwise filters count too (off by
    default, as in Torch-Pruning's ``GroupMagnitudeImportance``) (``pruning.group_slices``)."""

    channel_roles = (("out", "in", "scale"),)
    group_reduction = "sum"

    def __init__(self, beta=False, depthwise=False):
        self.channel_roles = (("out", "in", "scale") + (("shift",) if beta else ()),)
        self.skip_kinds = () if depthwise else ("depthwise",)


class Schedule:
    """When masks are updated and to which fraction of the final sparsity.

    Parameters
    ----------
    start_epoch, end_epoch : int
        First and last epoch (0-based) at whose start the masks are updated.
    frequency : int
        Epochs between updates.
    """

    name = "schedule"

    def __init__(self, start_epoch, end_epoch, frequency):
        self.start_epoch = int(start_epoch)
        self.end_epoch = int(max(end_epoch, start_epoch))
        self.frequency = max(1, int(frequency))

    def events(self):
        """Epochs (0-based) at whose start masks are updated."""
        ev = list(range(self.start_epoch, self.end_epoch + 1, self.frequency))
        if ev[-1] != self.end_epoch:
            ev.append(self.end_epoch)
        return ev

    def fraction(self, k, n):
        """Fraction of the final sparsity reached at update ``k`` of ``n`` (0-based)."""
        raise NotImplementedError

    def sparsity_at(self, epoch, final):
        """Target sparsity in force during ``epoch`` (0 before the first update)."""
        ev = self.events()
        done = [k for k, e in enumerate(ev) if e <= epoch]
        if not done:
            return 0.0
        return float(final) * self.fraction(done[-1], len(ev))
