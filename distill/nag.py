"""Optimizers that MXNet 1.9.1 does not get right for us.

``nesterov`` uses :class:`DeterministicNAG`: MXNet's fused ``nag_mom_update`` gives results that
vary from process to process when weight decay is on (measured: the same seed, data and
weights gave loss 0.06488 or 0.06046 after 12 steps on cifar_resnet20_v1), which would break
"a resumed run equals an uninterrupted one". This is the same update written with plain
NDArray ops, deterministic run to run.
"""
import mxnet as mx

__all__ = ["DeterministicNAG"]
# Registered with MXNet as "deterministicnag"; the recipe name is `nesterov` (distill.optim).


@mx.optimizer.register
class DeterministicNAG(mx.optimizer.Optimizer):
    """Nesterov momentum SGD (Sutskever et al., 2013), as MXNet's ``nag`` computes it::

        g = rescale * grad (+ clip) + wd * w
        m = momentum * m + g
        w = w - lr * (g + momentum * m)
    """

    def __init__(self, momentum=0.9, **kwargs):
        super().__init__(**kwargs)
        self.momentum = momentum

    def create_state(self, index, weight):
        return mx.nd.zeros(weight.shape, weight.context, dtype=weight.dtype)

    def update(self, index, weight, grad, state):
        self._update_count(index)
        lr = self._get_lr(index)
        wd = self._get_wd(index)
        g = grad * self.rescale_grad
        if self.clip_gradient is not None:
            g = mx.nd.clip(g, -self.clip_gradient, self.clip_gradient)
        if wd:
            g = g + wd * weight
        state[:] = self.momentum * state + g
        weight[:] = weight - lr * (g + self.momentum * state)
