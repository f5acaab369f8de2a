"""Decoupled knowledge distillation (Zhao et al., 2022)."""
import mxnet as mx

from ..replicas import set_all
from .base import LOSSES, LossTermBlock
from .kd import standardize

__all__ = ["DKDLoss", "target_mask", "warmup_factor"]

MASK = 1000.0     # taken from the target logit (at temperature T) to leave it out, as mdistiller


def target_mask(F, logits, label):
    """(N, K) logits, (N,) labels → (N, K): 1 at each sample's label, 0 elsewhere."""
    classes = F.contrib.arange_like(logits, axis=1)
    return F.broadcast_equal(classes.reshape((1, -1)), label.reshape((-1, 1)))


def _logsumexp(F, x):
    """(N, K) → (N,): log Σ_k exp(x_k), stable (the row maximum taken out first)."""
    top = F.max(x, axis=1, keepdims=True)
    return F.log(F.sum(F.exp(F.broadcast_sub(x, top)), axis=1)) + top.reshape((-1,))


def _kl(F, log_p, log_q):
    """(N, K) log-probabilities → (N,): Σ_k p_k (log p_k − log q_k), ``p = exp(log_p)``."""
    return F.sum(F.exp(log_p) * (log_p - log_q), axis=-1)


def warmup_factor(epoch, warmup_epochs):
    """``min(e / warmup_epochs, 1)`` with ``e = epoch + 1`` the 1-based number of the epoch
    (``epoch`` is the loop's 0-based index), as mdistiller counts; 1 when ``warmup_epochs`` is 0."""
    if warmup_epochs <= 0:
        return 1.0
    return min((epoch + 1) / float(warmup_epochs), 1.0)


@LOSSES.register("dkd")
class DKDLoss(LossTermBlock):
    """Decoupled KD: ``w(e) · T² · (α · TCKD + β · NCKD)`` (Zhao et al., CVPR 2022).

    ``TCKD = KL([p_t, 1 − p_t]^teacher ‖ [p_t, 1 − p_t]^student)`` with ``p = softmax(z / T)``
    and ``t`` the label; ``NCKD = KL(q^teacher ‖ q^student)`` with
    ``q = softmax(z / T − 1000·1_t)``, the distribution over the non-target classes (the target
    logit pushed down by 1000, as the authors' mdistiller does, so its probability is exactly 0).
    ``w(e) = min(e / warmup_epochs, 1)`` ramps the whole term in over the first epochs, ``e``
    counted from 1 as in mdistiller (the first epoch trains at ``1 / warmup_epochs``). The
    defaults are the paper's CIFAR-100 setting (α 1, β 8, T 4, 20 warm-up epochs; on ImageNet
    mdistiller uses β 0.5, T 1, 1 warm-up epoch).

    DKD needs labels (the target class is the label). ``standardize: true`` z-scores each
    sample's logits first (Logit Standardization, Sun et al., CVPR 2024; see
    :func:`~distill.losses.kd.standardize`).

    The warm-up factor lives in a constant parameter (``grad_req`` null), not a Python float:
    a hybridized term's cached graph would keep the float it was traced with.

    Parameters
    ----------
    alpha, beta : float
        Weights of TCKD and NCKD, ≥ 0.
    temperature : float
        Softening temperature T > 0.
    warmup_epochs : float
        Epochs over which the term ramps from ``1 / warmup_epochs`` to full weight; 0: none.
        QAT fine-tuning (a trained student) runs with 0.
    standardize : bool
        Z-score each sample's logits over the classes before the softmax.

    Recipe example::

        distillation:
          - {loss: dkd, weight: 1.0, alpha: 1, beta: 8, temperature: 4, warmup_epochs: 20}
          - {loss: ce, weight: 1.0}
    """

    OPTIONS = {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20.0,
               "standardize": False}
    needs_teacher = True
    needs_labels = True
    layers = "logits"

    @classmethod
    def check(cls, options):
        if not options["temperature"] > 0:
            return "temperature", f"must be > 0, got {options['temperature']}"
        for k in ("alpha", "beta", "warmup_epochs"):
            if not options[k] >= 0:
                return k, f"must be ≥ 0, got {options[k]}"
        return None

    @classmethod
    def without_labels(cls, name):
        return (f"`{name}` (decoupled KD) needs labels, and the data have none (`data.labels: "
                f"false`): it splits the teacher's distribution into the target class and the "
                f"non-target classes, and the target class is the label. Without labels use "
                f"`kd` or `dist`, which need only the teacher's logits, or set `data.labels: true`.")

    def __init__(self, alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=20.0, standardize=False,
                 student_shape=None, teacher_shape=None, **kwargs):
        super().__init__(**kwargs)
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature = float(temperature)
        self.warmup_epochs = float(warmup_epochs)
        self.standardize = bool(standardize)
        with self.name_scope():
            self.warmup = self.params.get("warmup", shape=(1,), init=mx.init.One(),
                                          grad_req="null", differentiable=False)

    def set_epoch(self, epoch):
        # every replica, in place: set_data would reset an update-on-kvstore optimizer's state
        set_all(self.warmup, mx.nd.array([warmup_factor(epoch, self.warmup_epochs)]))

    def hybrid_forward(self, F, student, label, teacher, warmup):
        """``student``, ``teacher``: (N, K) logits, ``label``: (N,) → (N,) loss."""
        t = self.temperature
        if self.standardize:
            student, teacher = standardize(F, student), standardize(F, teacher)
        mask = target_mask(F, student, label)
        parts = []
        for z in (teacher, student):
            log_p = F.log_softmax(z / t, axis=-1)
            log_target = F.sum(log_p * mask, axis=-1)                      # log p_t
            log_rest = _logsumexp(F, log_p - MASK * mask)                  # log (1 − p_t)
            log_binary = F.stack(log_target, log_rest, axis=1)             # (N, 2)
            log_q = F.log_softmax(z / t - MASK * mask, axis=-1)            # non-target classes
            parts.append((log_binary, log_q))
        (bin_t, q_t), (bin_s, q_s) = parts
        tckd = _kl(F, bin_t, bin_s)
        nckd = _kl(F, q_t, q_s)
        loss = (self.alpha * tckd + self.beta * nckd) * (t * t)
        return F.broadcast_mul(loss, warmup)
