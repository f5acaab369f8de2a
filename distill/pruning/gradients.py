"""The Taylor criterion's gradient pass: loss gradients over a few training batches, no update.

One function for both users: the pruning modifier, when a mask update comes before any training
step has accumulated gradients, and ``distill sensitivity``, which never trains.
"""
import logging

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from ..replicas import contexts, grad_sum

__all__ = ["accumulate_grads"]
_LOGGER = logging.getLogger(__name__)


def accumulate_grads(net, x, y, acc, seed, teacher=None, batches=8, batch_size=32):
    """Add the loss gradients of ``batches`` training batches to ``acc``, in place.

    Batches are drawn from ``np.random.RandomState(seed).permutation(len(x))``. The loss is the
    cross-entropy with the labels, or, without labels, the KL divergence to the teacher's
    softmax. The forward pass runs with ``train_mode=False``: BatchNorm uses (and does not
    update) its running statistics, dropout is off. On several devices each batch is split
    over the parameters' contexts and the replicas' gradients are summed (the whole batch's).

    Parameters
    ----------
    net : gluon.Block
        The network; its parameters' ``grad`` buffers are overwritten.
    x : ndarray
        ``(N, C, H, W)`` training images.
    y : ndarray or None
        ``(N,)`` labels; ``None`` needs ``teacher``.
    acc : dict
        parameter name → NDArray shaped like the parameter (on replica 0's device): the
        gradients are added to it.
    seed : int
    teacher : callable, optional
        ``teacher(x)`` → logits, for label-free data.

    Returns
    -------
    int
        The number of batches added.
    """
    if y is None and teacher is None:
        raise ValueError("accumulate_grads needs labels or a teacher")
    params = net.collect_params()
    ctx = contexts(params)
    order = np.random.RandomState(seed).permutation(len(x))
    ce = mx.gluon.loss.SoftmaxCrossEntropyLoss()
    kl = mx.gluon.loss.KLDivLoss(from_logits=False)
    n = 0
    for b in range(batches):
        idx = order[b * batch_size:(b + 1) * batch_size]
        if len(idx) == 0:
            break
        xb = mx.nd.array(x[idx])
        # each slice's target: its labels, or the teacher's softmax (the teacher runs on the
        # default device; its outputs are split like the batch)
        target = mx.nd.array(y[idx]) if y is not None else mx.nd.softmax(teacher(xb))
        used = ctx[:min(len(ctx), len(idx))]       # a last batch smaller than the device count
        xs = gluon.utils.split_and_load(xb, used, even_split=False)
        ts = gluon.utils.split_and_load(target, used, even_split=False)
        with autograd.record(train_mode=False):   # no BatchNorm statistics update
            losses = [(ce if y is not None else kl)(net(a), t) for a, t in zip(xs, ts)]
        autograd.backward(losses)
        for name, a in acc.items():
            a += grad_sum(params[name], used).as_in_context(a.context)
        n += 1
    return n
