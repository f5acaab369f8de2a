"""MobileNet v1/v2/v3 students (GluonCV model zoo).

Adaptation: all three use deferred ``in_channels`` in their stem conv, so any channel count works
unchanged; every downsampling is one strided 3x3 (v3: 3x3 or 5x5, "same" padding) conv, so
:mod:`students.adapt` removes the stem conv's stride first, then each stage's first depthwise conv.

V2 and V3 residual blocks end in a BatchNorm that starts at gamma = 0
(:func:`students.adapt.zero_init_gamma`), so each block starts as the identity.
"""
import logging

from gluoncv.model_zoo.mobilenet import LinearBottleneck
from gluoncv.model_zoo.mobilenetv3 import _ResUnit

from .adapt import walk, zero_init_gamma
from .registry import register_zoo

__all__ = ["MOBILENETS", "zero_init_residual"]

_LOGGER = logging.getLogger(__name__)

MOBILENETS = (
    "mobilenet1.0", "mobilenet0.75", "mobilenet0.5", "mobilenet0.25",
    "mobilenetv2_1.0", "mobilenetv2_0.75", "mobilenetv2_0.5", "mobilenetv2_0.25",
    "mobilenetv3_small", "mobilenetv3_large",
)


def zero_init_residual(net):
    """Zero-init the last BatchNorm gamma of every MobileNetV2/V3 block with a shortcut."""
    last_bns = []
    for _, block in walk(net):
        if isinstance(block, LinearBottleneck) and block.use_shortcut:
            last_bns.append(block.out[-1])          # conv, BatchNorm (no activation)
        elif isinstance(block, _ResUnit) and block.use_short_cut_conv:
            last_bns.append(block.conv2.bn)         # the linear 1x1 projection's BatchNorm
    zero_init_gamma(last_bns)
    return net


for _name in MOBILENETS:
    register_zoo(_name, fix=zero_init_residual if "v2" in _name or "v3" in _name else None)
