"""The mask keeper: holds the pruning masks and multiplies them into the parameters after every
optimizer step, so momentum and weight decay never regrow a pruned weight.

Recipe example::

    pruning: {enabled: true}      # the keeper comes with every pruning recipe
"""
import logging

import numpy as np

from ..modifier import Modifier
from ..replicas import apply_mask, mask_arrays

__all__ = ["MaskKeeper"]
_LOGGER = logging.getLogger(__name__)


class MaskKeeper(Modifier):
    """Holds elementwise masks and multiplies them into the parameters after every step.

    Masks are bool arrays by parameter name; ``True`` keeps a weight. They are saved in every
    checkpoint (``state_dict``), packed to bits, and re-applied on ``--resume``. On several
    devices every replica is masked (:func:`distill.replicas.apply_mask`), so the replicas stay
    identical; the masks are copied to each device once per mask update, not per step.

    Recipe example::

        pruning: {enabled: true}      # the keeper comes with every pruning recipe
    """

    name = "masks"

    def __init__(self):
        self.masks = {}
        self._nd = {}
        self.params = None

    def initialize(self, net, trainer, data):
        self.params = net.collect_params()
        self._nd = {}
        self.apply()

    def rebind(self, net, trainer):
        self.params = net.collect_params()
        self._nd = {}

    def set_masks(self, masks):
        """Replace the masks (``{param: bool array}``) and apply them at once."""
        self.masks = {k: np.asarray(v, dtype=bool) for k, v in masks.items()}
        self._nd = {}
        self.apply()

    def apply(self):
        """Zero the masked weights of every replica (in place: a hybridized, static-alloc graph
        sees them)."""
        if self.params is None:
            return
        for name, m in self.masks.items():
            p = self.params[name]
            per_device = self._nd.get(name)
            if per_device is None or [a.context for a in per_device] != list(p.list_ctx()):
                per_device = self._nd[name] = mask_arrays(p, m)
            apply_mask(p, per_device)

    def after_step(self, epoch, step, steps_per_epoch):
        self.apply()

    def state_dict(self):
        return {"masks": {k: {"shape": list(m.shape), "bits": np.packbits(m.ravel())}
                          for k, m in self.masks.items()}}

    def load_state_dict(self, state):
        masks = {}
        for k, v in (state or {}).get("masks", {}).items():
            n = int(np.prod(v["shape"]))
            masks[k] = np.unpackbits(v["bits"])[:n].astype(bool).reshape(v["shape"])
        self.masks, self._nd = masks, {}
