"""Cross-entropy with the ground-truth labels."""
from .base import LOSSES, LossTermBlock

__all__ = ["CELoss"]


@LOSSES.register("ce")
class CELoss(LossTermBlock):
    """Softmax cross-entropy against integer labels.

    Recipe example::

        distillation:
          - {loss: ce, weight: 0.1}
    """

    needs_labels = True
    layers = "logits"

    def __init__(self, student_shape=None, teacher_shape=None, **kwargs):
        super().__init__(**kwargs)

    def hybrid_forward(self, F, student, label, teacher):
        """``student``: (N, K) logits, ``label``: (N,) → (N,) loss."""
        log_p = F.log_softmax(student, axis=-1)
        return -F.pick(log_p, label, axis=-1)
