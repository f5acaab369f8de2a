"""Score int8 variants of one model against its fp32 self on one labelled split.

A :class:`Scorer` holds a model, its calibration thresholds and the split it measures on (the
held-out split of the recipe); ``score(excluded)`` builds that int8 variant, runs it, and
returns top-1 and how far its outputs moved from fp32. Results are cached by exclusion set, so
the policies can ask freely.

Sensitivity of a layer (:meth:`Scorer.sensitivity`) is measured by quantizing **only that
layer**, everything else fp32: the damage each layer does on its own, independent of the
others. The alternative, quantizing all but that layer, measures what keeping it fp32 recovers
in the full int8 graph; with dozens of layers each adding noise, one layer's share is within
the noise of a 1,000-image split, so its ranking is mostly noise. The isolated measure ranks
cleanly; interactions are then handled by checking every candidate set on the real graph
(:mod:`distill.quantize.policies.auto`).
"""
import logging
from dataclasses import dataclass

import mxnet as mx
import numpy as np

from ..errors import UserError
from ..graphio import mxnet_reason
from ..trainer import predict
from .graph import inference_block, quantize

__all__ = ["Score", "Scorer", "output_shift"]
_LOGGER = logging.getLogger(__name__)


@dataclass
class Score:
    """How an int8 variant does on the measured split.

    Attributes
    ----------
    top1 : float
        Top-1 accuracy in percent.
    kl : float
        Mean KL divergence ``KL(softmax(fp32) || softmax(int8))`` per image, in nats.
    changed : float
        Percent of images whose predicted class differs from fp32's.
    """
    top1: float
    kl: float
    changed: float


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def output_shift(ref_logits, logits):
    """Mean ``KL(softmax(ref) || softmax(logits))`` over rows, and the % of changed argmaxes.

    Parameters
    ----------
    ref_logits, logits : np.ndarray
        ``(N, K)``.

    Returns
    -------
    (float, float)
    """
    lp, lq = _log_softmax(ref_logits.astype(np.float64)), _log_softmax(logits.astype(np.float64))
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))
    changed = float(np.mean(ref_logits.argmax(1) != logits.argmax(1)) * 100.0)
    return max(kl, 0.0), changed


class Scorer:
    """Builds and scores int8 variants of ``model``.

    Parameters
    ----------
    model : FloatModel
    thresholds : dict
        From :func:`distill.quantize.calibrators.calibrate`.
    split : Split
        Labelled images the variants are measured on.
    granularity : str
        ``channel-wise`` or ``tensor-wise``.
    batch_size : int
        Images per forward pass.
    """

    def __init__(self, model, thresholds, split, granularity="channel-wise", batch_size=256):
        self.model = model
        self.thresholds = thresholds
        self.split = split
        self.granularity = granularity
        self.batch_size = batch_size
        self._cache = {}
        self._sensitivity = None
        fp32 = inference_block(model.fused, model.params, model.input_name)
        self.fp32_logits = predict(fp32, split.x, batch_size)
        self.fp32_top1 = self._top1(self.fp32_logits)

    def _top1(self, logits):
        return float((logits.argmax(1) == self.split.y).mean() * 100.0)

    def build(self, excluded=(), exclude_ops=()):
        """The :class:`~distill.quantize.graph.QuantizedGraph` with ``excluded`` in fp32."""
        return quantize(self.model, self.thresholds, excluded, self.granularity, exclude_ops)

    def score(self, excluded=(), exclude_ops=()):
        """:class:`Score` of the variant with ``excluded`` (and ``exclude_ops``) in fp32."""
        key = (frozenset(excluded), frozenset(exclude_ops))
        if key not in self._cache:
            g = self.build(excluded, exclude_ops)
            try:
                logits = predict(inference_block(g.symbol, g.params, self.model.input_name),
                                 self.split.x, self.batch_size)
            except mx.base.MXNetError as e:
                # MXNet 1.9.1's int8 operators reject some layer combinations at run time
                # (seen: MobileNetV3's hard-swish / squeeze-excite blocks, "Expected: unsigned
                # char v.s. given char"); a traceback would tell the user nothing
                n_fp32 = len(excluded) + len(exclude_ops)
                raise UserError(
                    f"int8 calibration: MXNet's oneDNN int8 graph fails when it runs with "
                    f"{n_fp32} layer(s) kept in fp32 ({mxnet_reason(e)}). This is a limit of MXNet "
                    f"1.9.1's int8 operators on some layer types (seen on MobileNetV3's hard-swish "
                    f"and squeeze-excite blocks), not of the calibration. Keep those layers in "
                    f"fp32 with `--exclude` patterns (e.g. \"*hswish*,*se*\"; `distill inspect` "
                    f"lists the names), or quantize a student without them (MobileNetV2, "
                    f"ShuffleNet).") from None
            kl, changed = output_shift(self.fp32_logits, logits)
            self._cache[key] = Score(self._top1(logits), kl, changed)
        return self._cache[key]

    def within(self, score, budget):
        """True when ``score`` loses at most ``budget`` points of top-1 against fp32."""
        return self.fp32_top1 - score.top1 <= budget + 1e-9

    @property
    def sensitivity_rows(self):
        """What :meth:`sensitivity` measured so far (empty if it was not asked for)."""
        return self._sensitivity or []

    def sensitivity(self):
        """Per weight layer, the :class:`Score` when only that layer is int8.

        Returns
        -------
        list of (Layer, Score)
            In graph order.
        """
        if self._sensitivity is None:
            all_nodes = self.model.fused_op_names
            rows = []
            for layer in self.model.layers:
                others = [n for n in all_nodes if n != layer.fused]
                rows.append((layer, self.score(exclude_ops=others)))
            self._sensitivity = rows
        return self._sensitivity
