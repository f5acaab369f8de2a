"""``auto``: keep in fp32 the fewest layers that hold top-1 within a budget.

1. Sensitivity: each weight layer is quantized alone (everything else fp32) and scored on the
   measured split (:meth:`~distill.quantize.scoring.Scorer.sensitivity`); layers are ranked by
   how far that moves the outputs from fp32 (KL divergence, then top-1 lost), which still
   separates layers when top-1 on 1,000 images does not move.
2. Greedy: full int8 first; then the 1, 2, 3, ... most sensitive layers kept fp32, until the
   real graph's top-1 is within ``budget`` points of fp32.
3. Prune: each kept layer, least sensitive first, is tried back in int8; it goes back when the
   budget still holds. No single kept layer can then be quantized without breaking the budget.

Every set the policy returns was scored on the split, so the result is within budget on it by
construction. If even all weight layers in fp32 do not hold it, every node stays fp32 (the int8
export is then the fp32 graph) and the report says so.
"""
import logging

from .base import POLICIES, Selection

__all__ = ["AutoExclusion", "rank_layers"]
_LOGGER = logging.getLogger(__name__)


def rank_layers(sensitivity):
    """Layer names, most sensitive first: by KL divergence, then by top-1 (lower first)."""
    return [l.name for l, s in sorted(sensitivity, key=lambda r: (-r[1].kl, r[1].top1))]


@POLICIES.register("auto")
class AutoExclusion:
    """Sensitivity-ranked greedy search, then pruning of the kept set.

    Parameters
    ----------
    budget : float
        Points of top-1 the int8 model may lose against fp32 on the measured split.
    """
    name = "auto"

    def __init__(self, budget=0.5):
        self.budget = float(budget)

    def select(self, scorer):
        within = lambda names: scorer.within(scorer.score(names), self.budget)  # noqa: E731
        if within([]):
            return Selection([], notes=[f"full int8 already within {self.budget:g} point(s)"])
        ranked = rank_layers(scorer.sensitivity())
        kept = None
        for k in range(1, len(ranked) + 1):
            if within(ranked[:k]):
                kept = ranked[:k]
                break
        if kept is None:
            return Selection(list(scorer.model.layer_names), list(scorer.model.fused_op_names),
                             notes=[f"no int8 variant holds {self.budget:g} point(s), even with "
                                    f"every weight layer fp32: the model stays fp32"])
        greedy = len(kept)
        for name in reversed(list(kept)):
            trial = [n for n in kept if n != name]
            if within(trial):
                kept = trial
        order = {n: i for i, n in enumerate(scorer.model.layer_names)}
        notes = [f"{greedy} most sensitive layer(s) needed by the ranking, "
                 f"{len(kept)} after trying each back in int8"]
        return Selection(sorted(kept, key=order.get), notes=notes)
