"""CIFAR ResNet v1/v2 students (GluonCV model zoo).

Adaptation: the stem is a stride-1 3x3 conv with deferred ``in_channels``; the native stride is
only 4 (stages 2 and 3 each stride 2 in the body's first 3x3 conv *and* the 1x1 shortcut conv,
which :mod:`students.adapt` changes together), so at 8x8 and larger the stock strides are kept.

* v1: the last BatchNorm of each residual body starts at gamma = 0
  (:func:`students.adapt.zero_init_gamma`): with gamma = 1 the 56-layer net diverged at lr 0.05.
* v2: the first layer is a BatchNorm on the input with neither scale nor center, whose running
  statistics MXNet never updates; :func:`students.adapt.unfreeze_input_batchnorm` (applied to
  every student by :func:`students.build_student`) gives it a learnable shift.
"""
import logging

from gluoncv.model_zoo.cifarresnet import CIFARBasicBlockV1

from .adapt import walk, zero_init_gamma
from .registry import register_zoo

__all__ = ["CIFAR_RESNETS", "zero_init_residual_v1"]

_LOGGER = logging.getLogger(__name__)

CIFAR_RESNETS = ("cifar_resnet20_v1", "cifar_resnet56_v1", "cifar_resnet20_v2", "cifar_resnet56_v2")


def zero_init_residual_v1(net):
    """Zero-init the last BatchNorm gamma of every ``CIFARBasicBlockV1`` body; returns ``net``."""
    zero_init_gamma(block.body[4] for _, block in walk(net)
                    if isinstance(block, CIFARBasicBlockV1))
    return net


register_zoo("cifar_resnet20_v1", fix=zero_init_residual_v1)
register_zoo("cifar_resnet56_v1", fix=zero_init_residual_v1)
register_zoo("cifar_resnet20_v2")
register_zoo("cifar_resnet56_v2")
