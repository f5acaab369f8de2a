"""Distillation from a stronger teacher by correlation (Huang et al., 2022)."""
from .base import LOSSES, LossTermBlock

__all__ = ["DISTLoss", "pearson"]

EPS = 1e-8        # in the Pearson denominator, as the authors' DIST_KD code


def pearson(F, a, b, axis):
    """Pearson correlation of ``a`` and ``b`` along ``axis`` of (N, K) → (K,) for axis 0 or
    (N,) for axis 1: the cosine of the centred vectors, ``ε`` = 1e-8 in the denominator."""
    a = F.broadcast_sub(a, F.mean(a, axis=axis, keepdims=True))
    b = F.broadcast_sub(b, F.mean(b, axis=axis, keepdims=True))
    # ε² under each root: a constant column (one sample per batch) gives ρ = 0 and a zero
    # gradient, where √0 would give 0 · ∞ = NaN; the value moves by less than float rounding
    norm_a = F.sqrt(F.sum(F.square(a), axis=axis) + EPS * EPS)
    norm_b = F.sqrt(F.sum(F.square(b), axis=axis) + EPS * EPS)
    return F.sum(a * b, axis=axis) / (norm_a * norm_b + EPS)


@LOSSES.register("dist")
class DISTLoss(LossTermBlock):
    """DIST: ``τ² (β · mean_i(1 − ρ(p_i^s, p_i^t)) + γ · mean_k(1 − ρ(p_:k^s, p_:k^t)))``,
    ``p = softmax(z / τ)``, ρ the Pearson correlation (Huang et al., NeurIPS 2022).

    The inter-class relation compares each sample's class probabilities (rows), the intra-class
    relation each class's probabilities across the batch (columns). Only correlations are
    matched, not the values, which tolerates a much stronger teacher. The paper uses τ = 1 on
    ImageNet (the default here, with β = γ = 1) and τ = 4 on CIFAR-100.

    The loop averages the per-sample vector a term returns. Sample ``i``'s entry is
    ``τ² (β (1 − ρ_i) + γ · intra)``: the inter-class part is its own, the intra-class part is a
    batch quantity and every sample carries all of it, so the mean is exactly the batch loss and
    so is its gradient. Per-sample values therefore depend on the batch; with one sample per
    batch the intra-class correlation is undefined (0 here, a constant γ τ² with no gradient).

    Parameters
    ----------
    beta, gamma : float
        Weights of the inter- and intra-class relations, ≥ 0.
    tau : float
        Softening temperature τ > 0.

    Recipe example::

        distillation:
          - {loss: dist, weight: 1.0, beta: 1, gamma: 1, tau: 4}
          - {loss: ce, weight: 1.0}
    """

    OPTIONS = {"beta": 1.0, "gamma": 1.0, "tau": 1.0}
    needs_teacher = True
    layers = "logits"

    @classmethod
    def check(cls, options):
        if not options["tau"] > 0:
            return "tau", f"must be > 0, got {options['tau']}"
        for k in ("beta", "gamma"):
            if not options[k] >= 0:
                return k, f"must be ≥ 0, got {options[k]}"
        return None

    def __init__(self, beta=1.0, gamma=1.0, tau=1.0, student_shape=None, teacher_shape=None, **kwargs):
        super().__init__(**kwargs)
        self.beta, self.gamma, self.tau = float(beta), float(gamma), float(tau)

    def hybrid_forward(self, F, student, label, teacher):
        """``student``, ``teacher``: (N, K) logits → (N,) loss (see above for the batch term)."""
        ps = F.softmax(student / self.tau, axis=-1)
        pt = F.softmax(teacher / self.tau, axis=-1)
        inter = 1 - pearson(F, ps, pt, axis=1)                      # (N,)
        intra = F.mean(1 - pearson(F, ps, pt, axis=0))              # (1,)
        return F.broadcast_add(self.beta * inter, self.gamma * intra) * (self.tau ** 2)
