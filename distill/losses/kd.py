"""Knowledge distillation on logits (Hinton, Vinyals & Dean, 2015), optionally on standardized
logits (Sun et al., 2024)."""
from .base import LOSSES, LossTermBlock

__all__ = ["KDLoss", "standardize"]

STD_EPS = 1e-7     # the Logit Standardization authors' epsilon


def standardize(F, z):
    """Each sample's logits z-scored over the classes, ``(z − mean) / (std + ε)``: (N, K) → (N, K).

    Logit Standardization (Sun et al., CVPR 2024). As in the authors' code (``logit_std``,
    ``normalize``: ``torch.std``), the standard deviation is the unbiased one (divisor K − 1)
    and ε = 1e-7.
    """
    mean = F.mean(z, axis=1, keepdims=True)
    centred = F.broadcast_sub(z, mean)
    k = F.sum(F.ones_like(z), axis=1, keepdims=True)
    var = F.sum(F.square(centred), axis=1, keepdims=True) / (k - 1)
    return F.broadcast_div(centred, F.sqrt(var) + STD_EPS)


@LOSSES.register("kd")
class KDLoss(LossTermBlock):
    """KL(teacher_T ‖ student_T) between temperature-softened distributions, scaled by T².

    ``T² · Σ_k p_k^t (log p_k^t − log p_k^s)``, ``p = softmax(z / T)`` (Hinton et al., 2015);
    with ``standardize``, ``z`` is each sample's z-scored logits (Sun et al., 2024).

    The T² factor keeps the gradient magnitude independent of T (Hinton et al., 2015).
    ``standardize: true`` (Logit Standardization, Sun et al., CVPR 2024) z-scores teacher and
    student logits separately (:func:`standardize`) before the temperature softmax, so the
    student matches the teacher's logit *relations* rather than their scale.

    Parameters
    ----------
    temperature : float
        Softening temperature T > 0.
    standardize : bool
        Z-score each sample's logits over the classes first (default false: plain KD).

    Recipe example::

        distillation:
          - {loss: kd, weight: 0.9, temperature: 4}
          - {loss: kd, weight: 0.9, temperature: 2, standardize: true}
    """

    OPTIONS = {"temperature": 4.0, "standardize": False}
    needs_teacher = True
    layers = "logits"

    @classmethod
    def check(cls, options):
        if not options["temperature"] > 0:
            return "temperature", f"must be > 0, got {options['temperature']}"
        return None

    def __init__(self, temperature=4.0, standardize=False, student_shape=None, teacher_shape=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.temperature = float(temperature)
        self.standardize = bool(standardize)

    def hybrid_forward(self, F, student, label, teacher):
        """``student``, ``teacher``: (N, K) logits → (N,) loss."""
        t = self.temperature
        if self.standardize:
            student, teacher = standardize(F, student), standardize(F, teacher)
        log_ps = F.log_softmax(student / t, axis=-1)
        log_pt = F.log_softmax(teacher / t, axis=-1)
        pt = F.exp(log_pt)
        return F.sum(pt * (log_pt - log_ps), axis=-1) * (t * t)
