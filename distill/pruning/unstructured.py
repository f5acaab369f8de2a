"""Unstructured pruning while training: single weights, the network stays dense and masked.

At each of the schedule's epochs the criterion scores every weight of the pruned layers and
:func:`~distill.pruning.plan.element_masks` removes the lowest-scored ones (per layer, or ranked
across layers with ``scope: global``). Zeros in dense tensors make no dense engine faster; the
params file shrinks only when compressed (reported as ``params_bytes_zlib``).

Recipe example::

    student: {from: teacher}
    pruning:
      enabled: true
      granularity: unstructured
      criterion: l1
      scope: global
      schedule: agp
      final_sparsity: 0.9
      exclude: [first, last]
      overrides:
        - {layers: "*stage3*", final_sparsity: 0.5}
"""
import logging
import os
import zlib

from .base import PRUNERS
from .plan import element_masks, element_scores
from .pruner import PruningModifier

__all__ = ["UnstructuredPruningModifier"]
_LOGGER = logging.getLogger(__name__)


@PRUNERS.register("unstructured")
class UnstructuredPruningModifier(PruningModifier):
    """Removes single weights, layer by layer or ranked globally (see the module docstring)."""

    def setup(self):
        tracked = [self.weight_of[l] for l, _, _ in self.layers if self.layer_ratio[l] > 0]
        self.log(f"pruning: unstructured, {len(tracked)} layers"
                 + (f"; not pruned (exclude): {', '.join(self.excluded)}" if self.excluded else ""))
        return tracked

    def update(self, frac, grads, rng):
        layers = [(l, self.weight_of[l]) for l, _, _ in self.layers if self.layer_ratio[l] > 0]
        names = [w for _, w in layers]
        scores = element_scores(self.criterion, names, self._np_params(names), grads,
                                self.keeper.masks, rng)
        ratios = [(w, self.layer_ratio[l]) for l, w in layers]
        self.keeper.set_masks(element_masks(scores, ratios, frac, self.cfg.scope))

    def finalize(self, student, data, log):
        student = super().finalize(student, data, log)
        log("pruning: unstructured masks stay in the dense network (no speed-up on a dense "
            "engine; the file shrinks only when compressed)")
        return student

    def metrics(self, student):
        out = super().metrics(student)
        pfile = self.folder.model_params_path
        info = out["pruning"]
        info.update(physically_smaller=False, weight_sparsity=round(self.stats()["sparsity"], 5),
                    note="unstructured: zeros in dense tensors; MACs and latency are those of "
                         "the dense network, the file shrinks only when compressed")
        if os.path.isfile(pfile):
            with open(pfile, "rb") as f:
                info["params_bytes_zlib"] = len(zlib.compress(f.read(), 6))
        return out
