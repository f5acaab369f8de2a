"""FitNets hints (Romero et al., 2015): regress a teacher feature map from a student one."""
from mxnet.gluon import nn

from .base import LOSSES, LossTermBlock

__all__ = ["HintLoss"]


@LOSSES.register("hint")
class HintLoss(LossTermBlock):
    """Mean squared error between ``adapter(student)`` and ``teacher`` feature maps.

    When channel counts differ, a learned 1×1 convolution (the *adapter*) maps the student's
    ``C_s`` channels to the teacher's ``C_t``; it trains with the student and is dropped at
    export. When spatial sizes differ, the student map is average-pooled (or bilinearly
    upsampled) to the teacher's size.

    Parameters
    ----------
    student_shape, teacher_shape : tuple
        ``(N, C, H, W)`` of the two tapped maps (known before training from shape inference).

    Recipe example::

        distillation:
          - {loss: hint, weight: 1.0, teacher_layer: stage2_activation0, student_layer: features_linearbottleneck6_elemwise_add0}
    """

    needs_teacher = True
    layers = "both"

    def __init__(self, student_shape, teacher_shape, **kwargs):
        super().__init__(**kwargs)
        self.t_size = tuple(teacher_shape[2:])
        self.s_size = tuple(student_shape[2:])
        with self.name_scope():
            if student_shape[1] != teacher_shape[1]:
                self.adapter = nn.Conv2D(teacher_shape[1], 1, in_channels=student_shape[1],
                                         use_bias=False)
            else:
                self.adapter = None

    def hybrid_forward(self, F, student, label, teacher):
        """``student``: (N, C_s, H_s, W_s), ``teacher``: (N, C_t, H_t, W_t) → (N,)."""
        x = self.adapter(student) if self.adapter is not None else student
        if self.s_size != self.t_size:
            if self.s_size[0] >= self.t_size[0]:
                x = F.contrib.AdaptiveAvgPooling2D(x, output_size=self.t_size)
            else:
                x = F.contrib.BilinearResize2D(x, height=self.t_size[0], width=self.t_size[1])
        return F.mean(F.square(x - teacher), axis=(1, 2, 3))
