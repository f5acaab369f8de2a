"""Loss terms, one file each, registered by the name a recipe uses.

Logit terms (``kd``, ``dkd``, ``dist``, ``ce``) see the logits; feature terms (``hint``,
``attention``, ``similarity``, ``rkd``) see the outputs named by ``teacher_layer``/
``student_layer`` (the logits when a layer is not given) and get both shapes at construction.
"""
from .base import LOSSES, LossTermBlock
from . import attention, ce, dist, dkd, hint, kd, rkd, similarity  # noqa: F401  (registration)

__all__ = ["LOSSES", "LossTermBlock", "build_loss"]


def build_loss(term, student_shape=None, teacher_shape=None, where="distillation[]"):
    """Build the block for one recipe :class:`~distill.recipe.LossTerm`.

    Parameters
    ----------
    term : LossTerm
    student_shape, teacher_shape : tuple, optional
        Shapes of what the term will see (feature terms need them, e.g. for the hint adapter).
    """
    cls = LOSSES.get(term.loss, where=f"{where}.loss")
    options = cls.validate_term(term, where)
    return cls(student_shape=student_shape, teacher_shape=teacher_shape, **options)
