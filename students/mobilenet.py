"""MobileNet v1/v2/v3 students (GluonCV model zoo).

Adaptation: all three use deferred ``in_channels`` in their stem conv, so any channel count works
unchanged; every downsampling is one strided 3x3 (v3: 3x3 or 5x5, "same" padding) conv, so
:mod:`students.adapt` removes the stem conv's stride first, then each stage's first depthwise conv.
"""
import logging

from .registry import register_zoo

__all__ = ["MOBILENETS"]

_LOGGER = logging.getLogger(__name__)

MOBILENETS = (
    "mobilenet1.0", "mobilenet0.75", "mobilenet0.5", "mobilenet0.25",
    "mobilenetv2_1.0", "mobilenetv2_0.75", "mobilenetv2_0.5", "mobilenetv2_0.25",
    "mobilenetv3_small", "mobilenetv3_large",
)

for _name in MOBILENETS:
    register_zoo(_name)
