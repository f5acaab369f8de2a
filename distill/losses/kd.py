"""Knowledge distillation on logits (Hinton, Vinyals & Dean, 2015)."""
from .base import LOSSES, LossTermBlock

__all__ = ["KDLoss"]


@LOSSES.register("kd")
class KDLoss(LossTermBlock):
    """KL(teacher_T ‖ student_T) between temperature-softened distributions, scaled by T².

    The T² factor keeps the gradient magnitude independent of T (Hinton et al., 2015).

    Parameters
    ----------
    temperature : float
        Softening temperature T > 0.

    Recipe example::

        distillation:
          - {loss: kd, weight: 0.9, temperature: 4}
    """

    OPTIONS = {"temperature": 4.0}
    needs_teacher = True
    layers = "logits"

    @classmethod
    def check(cls, options):
        if not options["temperature"] > 0:
            return "temperature", f"must be > 0, got {options['temperature']}"
        return None

    def __init__(self, temperature=4.0, student_shape=None, teacher_shape=None, **kwargs):
        super().__init__(**kwargs)
        self.temperature = float(temperature)

    def hybrid_forward(self, F, student, label, teacher):
        """``student``, ``teacher``: (N, K) logits → (N,) loss."""
        t = self.temperature
        log_ps = F.log_softmax(student / t, axis=-1)
        log_pt = F.log_softmax(teacher / t, axis=-1)
        pt = F.exp(log_pt)
        return F.sum(pt * (log_pt - log_ps), axis=-1) * (t * t)
