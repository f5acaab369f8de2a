"""FitNets hints (Romero et al., 2015): regress a teacher feature map from a student one."""
import mxnet as mx
import numpy as np
from mxnet.gluon import nn

from .base import LOSSES, LossTermBlock

__all__ = ["HintLoss"]


@LOSSES.register("hint")
class HintLoss(LossTermBlock):
    """Mean squared error between ``adapter(student)`` and ``teacher`` feature maps.

    When channel counts differ, a learned 1×1 convolution (the *adapter*) maps the student's
    ``C_s`` channels to the teacher's ``C_t``; it trains with the student and is dropped at
    export. When channel pruning cuts channels out of the student's layer while it trains,
    the adapter loses the same input columns; a term without an adapter gets a frozen one that
    puts each kept channel back at its place, so the loss is the one the masked student had.
    When spatial sizes differ, the student map is average-pooled (or bilinearly upsampled) to
    the teacher's size.

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

    def keep_student_channels(self, keep):
        keep = np.asarray(keep, bool)
        old = self.adapter
        if old is None:             # equal widths until now: scatter the kept channels back
            w = np.zeros((len(keep), int(keep.sum()), 1, 1), np.float32)
            w[np.flatnonzero(keep), np.arange(int(keep.sum())), 0, 0] = 1.0
            grad_req, sliced = "null", {}
        else:
            w = old.weight.list_data()[0].asnumpy()[:, keep]
            grad_req, sliced = old.weight.grad_req, {"adapter.weight": [(1, keep)]}
        with self.name_scope():
            self.adapter = nn.Conv2D(w.shape[0], 1, in_channels=w.shape[1], use_bias=False)
        self.adapter.initialize(mx.init.Zero(), ctx=mx.cpu())
        self.adapter.weight.set_data(mx.nd.array(w))
        self.adapter.weight.grad_req = grad_req
        if self._active:            # a new graph: the cached one has the old shapes
            self.hybridize(True, static_alloc=True)
        return sliced

    def hybrid_forward(self, F, student, label, teacher):
        """``student``: (N, C_s, H_s, W_s), ``teacher``: (N, C_t, H_t, W_t) → (N,)."""
        x = self.adapter(student) if self.adapter is not None else student
        if self.s_size != self.t_size:
            if self.s_size[0] >= self.t_size[0]:
                x = F.contrib.AdaptiveAvgPooling2D(x, output_size=self.t_size)
            else:
                x = F.contrib.BilinearResize2D(x, height=self.t_size[0], width=self.t_size[1])
        return F.mean(F.square(x - teacher), axis=(1, 2, 3))
