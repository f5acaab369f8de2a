"""CIFAR ResNet v1/v2 students (GluonCV model zoo).

Adaptation: the stem is a stride-1 3x3 conv with deferred ``in_channels``; the native stride is
only 4 (stages 2 and 3 each stride 2 in the body's first 3x3 conv *and* the 1x1 shortcut conv,
which :mod:`students.adapt` changes together). So at 8x8 and larger the stock net is kept as is.
"""
import logging

from .registry import register_zoo

__all__ = ["CIFAR_RESNETS"]

_LOGGER = logging.getLogger(__name__)

CIFAR_RESNETS = ("cifar_resnet20_v1", "cifar_resnet56_v1", "cifar_resnet20_v2", "cifar_resnet56_v2")

for _name in CIFAR_RESNETS:
    register_zoo(_name)
