"""Relational knowledge distillation (Park, Kim, Lu & Cho, 2019)."""
from .base import LOSSES, LossTermBlock

__all__ = ["RKDLoss", "pairwise_distances", "triplet_angles"]


def pairwise_distances(F, e):
    """(N, D) → (N, N) Euclidean distances, normalized by their mean over pairs i ≠ j."""
    sq = F.sum(F.square(e), axis=1)
    prod = F.dot(e, e, transpose_b=True)
    d2 = F.relu(F.broadcast_add(sq.expand_dims(1), sq.expand_dims(0)) - 2 * prod)
    d = F.sqrt(d2 + 1e-12)                  # the diagonal is 1e-6, negligible in the mean
    n_pairs = F.sum(F.ones_like(d2)) - F.sum(F.ones_like(sq))
    return d / (F.sum(d) / F.maximum(n_pairs, 1) + 1e-12)


def triplet_angles(F, e):
    """(N, D) → (N, N, N): cos of the angle at j between i and k, ``<e_ij, e_kj>``."""
    diff = F.broadcast_sub(e.expand_dims(0), e.expand_dims(1))          # [j, i] = e_i - e_j
    norm = F.sqrt(F.sum(F.square(diff), axis=2, keepdims=True) + 1e-12)   # i = j: 0, not NaN
    unit = F.broadcast_div(diff, norm)                                    # (N_j, N_i, D)
    return F.batch_dot(unit, unit, transpose_b=True)                      # (N_j, N_i, N_k)


@LOSSES.register("rkd")
class RKDLoss(LossTermBlock):
    """Distance-wise and angle-wise relational losses (Huber), on flattened features.

    ``distance_weight · Huber(ψ_D(s), ψ_D(t)) + angle_weight · Huber(ψ_A(s), ψ_A(t))`` with
    ψ_D the mean-normalized pairwise distances and ψ_A the cosines of triplet angles.

    Parameters
    ----------
    distance_weight, angle_weight : float
        25 and 50 in the paper.

    Recipe example::

        distillation:
          - {loss: rkd, weight: 1.0}                 # on the logits
    """

    needs_teacher = True
    OPTIONS = {"distance_weight": 25.0, "angle_weight": 50.0}
    hybridizable = False       # its pairwise broadcasts need NDArray semantics

    @classmethod
    def check(cls, options):
        if options["distance_weight"] < 0 or options["angle_weight"] < 0:
            return "distance_weight", "`distance_weight` and `angle_weight` must be ≥ 0"
        return None

    def __init__(self, student_shape=None, teacher_shape=None, distance_weight=25.0,
                 angle_weight=50.0, **kwargs):
        super().__init__(**kwargs)
        self.wd, self.wa = float(distance_weight), float(angle_weight)

    def hybrid_forward(self, F, student, label, teacher):
        """``student``, ``teacher``: (N, ...) → (N,) (per-sample share of the batch loss)."""
        s, t = student.reshape((0, -1)), teacher.reshape((0, -1))
        dist = F.smooth_l1(pairwise_distances(F, s) - pairwise_distances(F, t), scalar=1.0)
        ang = F.smooth_l1(triplet_angles(F, s) - triplet_angles(F, t), scalar=1.0)
        per_i = self.wd * F.mean(dist, axis=1) + self.wa * F.mean(ang, axis=(0, 2))
        return per_i
