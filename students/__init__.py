"""Student networks: GluonCV model-zoo nets adapted to the data's channels, size and classes.

>>> net = build_student("mobilenetv2_0.5", channels=1, num_classes=10, image_size=(28, 28), seed=0)
>>> student_info(net)["stride"]
16

Adding a student is one builder plus one registration line (see :mod:`students.registry`);
every registered name is then built and trained by ``tests/test_students.py``.
"""
import copy
import logging
from typing import List, Optional, Tuple

import mxnet as mx
import numpy as np
from mxnet import gluon

from distill.errors import UserError
from . import mobilenet, resnet, shufflenet  # noqa: F401  (registers the families)
from .adapt import adapt_strides, target_stride, unfreeze_input_batchnorm
from .registry import STUDENTS

__all__ = ["STUDENTS", "build_student", "list_students", "student_info", "target_stride"]

_LOGGER = logging.getLogger(__name__)

_INFO_ATTR = "_distill_student_info"


def build_student(name: str, channels: int, num_classes: int, image_size: Tuple[int, int],
                  max_stride: Optional[int] = None, seed: Optional[int] = None,
                  ctx=mx.cpu()) -> gluon.HybridBlock:
    """Build, initialize and adapt the student ``name``.

    Parameters
    ----------
    name : str
        A registered name (:func:`list_students`); recipe key ``student.model``.
    channels : int
        Input channels (1 for MNIST, 3 for RGB).
    num_classes : int
        Width of the logits.
    image_size : (int, int)
        ``(H, W)`` of the inputs; the earliest downsampling is removed until the total stride is
        the largest power of two below ``min(H, W)`` (see :func:`students.adapt.target_stride`).
    max_stride : int, optional
        A further cap on the total stride.
    seed : int, optional
        Seeds MXNet and NumPy before initialization, so two builds have identical weights.
    ctx : mxnet.Context
        Where the parameters live.

    Returns
    -------
    mxnet.gluon.HybridBlock
        Initialized (Xavier for weights, the layers' own init for BatchNorm and biases; the last
        BatchNorm of residual branches starts at gamma = 0, see the family modules), not
        hybridized; maps ``(N, channels, H, W)`` float32 to ``(N, num_classes)`` logits.
        :func:`student_info` describes the adaptation. Parameter structure (``save_parameters``
        names) depends only on ``name`` and ``num_classes``, so a student saved at one image size
        loads into one built at another.

    Raises
    ------
    UserError
        Unknown ``name`` (the message lists the valid names) or invalid sizes.
    """
    builder = STUDENTS.get(name, where="student.model")
    if int(num_classes) < 1:
        raise UserError(f"student: num_classes must be >= 1, got {num_classes!r}.")
    net = builder(num_classes=int(num_classes))
    unfrozen = unfreeze_input_batchnorm(net)
    if seed is not None:
        mx.random.seed(seed)
        np.random.seed(seed)
    net.initialize(mx.init.Xavier(), ctx=ctx)
    info = adapt_strides(net, int(channels), image_size, int(num_classes), max_stride, ctx)
    info.update(name=name, channels=int(channels), num_classes=int(num_classes),
                image_size=tuple(int(v) for v in image_size), unfrozen_batchnorm=unfrozen)
    setattr(net, _INFO_ATTR, info)
    _LOGGER.info("student %s: stride %d (native %d), features %s, %d layers at stride 1",
                 name, info["stride"], info["native_stride"], info["feature_size"],
                 len(info["changed"]))
    return net


def list_students() -> List[str]:
    """All registered student names, sorted."""
    return STUDENTS.names()


def student_info(net) -> dict:
    """Describe how :func:`build_student` adapted ``net``.

    Parameters
    ----------
    net : mxnet.gluon.HybridBlock
        A net returned by :func:`build_student`.

    Returns
    -------
    dict
        ``name``, ``channels``, ``num_classes``, ``image_size``, ``native_stride``,
        ``target_stride``, ``stride`` (kept), ``changed`` (layer paths such as ``"features.0"``
        set to stride 1), ``changed_names`` (their Gluon/symbol names), ``feature_size`` (the
        ``(h, w)`` entering global pooling) and ``events``. A copy: editing it changes nothing.
    """
    info = getattr(net, _INFO_ATTR, None)
    if info is None:
        raise ValueError(f"{type(net).__name__} was not built by students.build_student")
    return copy.deepcopy(info)
