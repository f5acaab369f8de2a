"""Loss terms, one file each, registered by the name a recipe uses.

Logit terms (``kd``, ``ce``) see the logits; feature terms (``hint``, ``attention``,
``similarity``, ``rkd``) see the outputs named by ``teacher_layer``/``student_layer`` (the
logits when a layer is not given) and get both shapes at construction.
"""
import inspect

from .base import LOSSES, LossTermBlock
from . import attention, ce, hint, kd, rkd, similarity  # noqa: F401  (registration)

__all__ = ["LOSSES", "LossTermBlock", "build_loss"]

# recipe keys of a LossTerm that a loss may take as constructor arguments
_OPTIONS = ("temperature", "p", "distance_weight", "angle_weight")


def build_loss(term, student_shape=None, teacher_shape=None):
    """Build the block for one recipe :class:`~distill.recipe.LossTerm`.

    Parameters
    ----------
    term : LossTerm
    student_shape, teacher_shape : tuple, optional
        Shapes of what the term will see (feature terms need them, e.g. for the hint adapter).
    """
    cls = LOSSES.get(term.loss, where="distillation[].loss")
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: getattr(term, k) for k in _OPTIONS if k in accepted and getattr(term, k, None) is not None}
    if "student_shape" in accepted:
        kwargs.update(student_shape=student_shape, teacher_shape=teacher_shape)
    return cls(**kwargs)
