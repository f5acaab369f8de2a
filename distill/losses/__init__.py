"""Loss terms, one file each, registered by the name a recipe uses."""
from .base import LOSSES, LossTermBlock
from . import ce, kd  # noqa: F401  (registration)

__all__ = ["LOSSES", "LossTermBlock", "build_loss"]


def build_loss(term):
    """Build the block for one recipe :class:`~distill.recipe.LossTerm`."""
    cls = LOSSES.get(term.loss, where="distillation[].loss")
    if term.loss == "kd":
        return cls(temperature=term.temperature)
    return cls()
