"""The loss registry and the interface every loss term follows.

A loss term is a Gluon ``HybridBlock`` called as ``term(student, label, teacher)`` that
returns one loss per sample, shape ``(N,)``. ``student``/``teacher`` are logits ``(N, K)``;
``label`` is ``(N,)``. Which tensors a term sees is decided by the recipe, never by the loop.
"""
from mxnet import gluon

from ..registry import Registry

__all__ = ["LOSSES", "LossTermBlock"]

LOSSES = Registry("loss")


class LossTermBlock(gluon.HybridBlock):
    """Base class: declares what a term needs, so the loop can skip the teacher or labels."""

    needs_teacher = False
    needs_labels = False

    def __init__(self, cfg=None, **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg
