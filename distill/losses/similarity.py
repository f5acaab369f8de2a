"""Similarity-preserving distillation (Tung & Mori, 2019)."""
from .base import LOSSES, LossTermBlock

__all__ = ["SimilarityLoss", "similarity_matrix"]


def similarity_matrix(F, x):
    """(N, ...) → (N, N): ``Q Qᵀ`` of the flattened features, each row L2-normalized."""
    q = x.reshape((0, -1))
    g = F.dot(q, q, transpose_b=True)
    return F.L2Normalization(g, mode="instance")


@LOSSES.register("similarity")
class SimilarityLoss(LossTermBlock):
    """``‖G_s − G_t‖_F² / N²`` between the batch similarity matrices of student and teacher.

    Only relations between samples are compared, so the two tapped layers may have any shapes.

    Recipe example::

        distillation:
          - {loss: similarity, weight: 3000, teacher_layer: stage3_activation0, student_layer: features_conv1_fwd}
    """

    needs_teacher = True

    def __init__(self, student_shape=None, teacher_shape=None, **kwargs):
        super().__init__(**kwargs)

    def hybrid_forward(self, F, student, label, teacher):
        """``student``, ``teacher``: (N, ...) → (N,) (each sample's row of the matrix difference)."""
        d = F.square(similarity_matrix(F, student) - similarity_matrix(F, teacher))
        # sum over a row / N² summed over rows gives ‖·‖_F²/N²; the loop averages over N,
        # so each row contributes sum_row / N.
        return F.sum(d, axis=1) / F.sum(F.ones_like(d), axis=1)
