"""Attention transfer (Zagoruyko & Komodakis, 2017)."""
from .base import LOSSES, LossTermBlock

__all__ = ["AttentionLoss", "attention_map"]


def attention_map(F, x, p):
    """(N, C, H, W) → (N, H*W): channel-mean of ``|x|^p``, L2-normalized per sample."""
    a = F.mean(F.power(F.abs(x), p), axis=1).reshape((0, -1))
    return F.L2Normalization(a, mode="instance")


@LOSSES.register("attention")
class AttentionLoss(LossTermBlock):
    """Mean squared difference of normalized spatial attention maps.

    ``A(x) = normalize(mean_c |x_c|^p)``; loss per sample ``mean_hw (A_s - A_t)^2``. Channel
    counts may differ (the map has none); spatial sizes are matched by average pooling or
    bilinear upsampling of the student map.

    Parameters
    ----------
    p : float
        Exponent (2 in the paper).

    Recipe example::

        distillation:
          - {loss: attention, weight: 1000, p: 2, teacher_layer: stage2_activation0, student_layer: features_linearbottleneck6_elemwise_add0}
    """

    needs_teacher = True
    OPTIONS = {"p": 2.0}

    @classmethod
    def check(cls, options):
        return None if options["p"] > 0 else ("p", f"must be > 0, got {options['p']}")

    def __init__(self, student_shape, teacher_shape, p=2.0, **kwargs):
        super().__init__(**kwargs)
        self.p = float(p)
        self.t_size = tuple(teacher_shape[2:])
        self.s_size = tuple(student_shape[2:])

    def hybrid_forward(self, F, student, label, teacher):
        """``student``: (N, C_s, H_s, W_s), ``teacher``: (N, C_t, H_t, W_t) → (N,)."""
        x = student
        if self.s_size != self.t_size:
            if self.s_size[0] >= self.t_size[0]:
                x = F.contrib.AdaptiveAvgPooling2D(x, output_size=self.t_size)
            else:
                x = F.contrib.BilinearResize2D(x, height=self.t_size[0], width=self.t_size[1])
        return F.mean(F.square(attention_map(F, x, self.p) - attention_map(F, teacher, self.p)), axis=1)
