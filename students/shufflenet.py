"""ShuffleNet v1/v2 students (GluonCV model zoo).

Adaptation: both stems use deferred ``in_channels``. ShuffleNetV2's down unit strides in both
branches' depthwise convs (one event for :mod:`students.adapt`). ShuffleNetV1's down unit strides
in its depthwise conv *and* in an average pooling of the shortcut that GluonCV writes as
``F.Pooling`` inside ``hybrid_forward``; a forward hook cannot see that op, so
:func:`expose_shortcut_pool` turns it into an ``AvgPool2D`` child layer (same kernel, stride,
padding and ``count_include_pad``, so the stock output is unchanged) that the adapter can set to
stride 1 together with the conv.

ShuffleNetV1's "add" units end their residual branch in a BatchNorm that starts at gamma = 0
(:func:`students.adapt.zero_init_gamma`): GluonCV's V1 has no BatchNorm after the stem, and with
gamma = 1 the sum of thirteen residual branches blew the loss up from 4 to 100 in the first steps
on digits (21% accuracy after 2 epochs; 97-98% with gamma = 0).
"""
import logging

from mxnet.gluon import nn
from gluoncv.model_zoo.shufflenet import shuffleUnit

from .adapt import walk, zero_init_gamma
from .registry import register_zoo

__all__ = ["ShuffleUnitV1", "expose_shortcut_pool", "prepare_v1"]

_LOGGER = logging.getLogger(__name__)


class ShuffleUnitV1(shuffleUnit):
    """GluonCV's ShuffleNetV1 unit with the shortcut pooling as a layer (``shortcut_pool``)."""

    def hybrid_forward(self, F, x):  # pylint: disable=arguments-differ
        res = x
        x = self.conv_beforshuffle(x)
        if self.grouped_conv:
            x = self.channel_shuffle(F, x, groups=self.groups)
        x = self.conv_aftershuffle(x)
        if self.combine_type == "concat":
            res = self.shortcut_pool(res)
        return self.combine(F, res, x, combine=self.combine_type)


def expose_shortcut_pool(net):
    """Give every ShuffleNetV1 down unit of ``net`` a ``shortcut_pool`` layer, in place.

    Parameters
    ----------
    net : mxnet.gluon.HybridBlock
        A stock GluonCV ShuffleNetV1, before initialization or hybridization.

    Returns
    -------
    mxnet.gluon.HybridBlock
        ``net``.
    """
    stack = [net]
    while stack:
        block = stack.pop()
        stack.extend(block._children.values())
        if type(block) is shuffleUnit:  # pylint: disable=unidiomatic-typecheck
            if block.combine_type == "concat":
                with block.name_scope():
                    # Matches F.Pooling(kernel=3, pool_type='avg', stride=2, pad=1) in GluonCV.
                    block.shortcut_pool = nn.AvgPool2D(pool_size=3, strides=2, padding=1)
            # Same attributes and children; only hybrid_forward differs.
            block.__class__ = ShuffleUnitV1
    return net


def prepare_v1(net):
    """Expose the shortcut pooling and zero-init the residual branches of a ShuffleNetV1."""
    expose_shortcut_pool(net)
    zero_init_gamma(unit.conv_aftershuffle[1][1] for _, unit in walk(net)
                    if isinstance(unit, ShuffleUnitV1) and unit.combine_type == "add")
    return net


register_zoo("shufflenet_v1", fix=prepare_v1)
register_zoo("shufflenet_v2")
