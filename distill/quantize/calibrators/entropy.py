"""``entropy``: the clipping threshold that minimizes the KL divergence between the fp32
histogram and its int8 version (Migacz 2017, "8-bit Inference with TensorRT")."""
import numpy as np

from .base import CALIBRATORS, Calibrator

__all__ = ["EntropyCalibrator"]


@CALIBRATORS.register("entropy")
class EntropyCalibrator(Calibrator):
    """KL calibration, as MXNet's ``calib_mode='entropy'`` computes it: a symmetric histogram of
    ``num_bins`` bins per tensor (widened when a later batch exceeds it), then
    ``mx.nd.contrib.calibrate_entropy`` picks the threshold. A non-negative tensor (after ReLU)
    gets ``(0, th)`` and uint8's 255 levels; others ``(-th, th)``.

    Parameters
    ----------
    num_bins : int
        Histogram bins (odd); MXNet's default.
    """

    def __init__(self, num_bins=8001):
        self.num_bins = num_bins
        self._hist = {}

    def update(self, name, array):
        lo, hi = float(np.min(array)), float(np.max(array))
        th = max(abs(lo), abs(hi))
        if name in self._hist:
            # MXNet loads lazily: the recipe checks calib_mode against CALIBRATORS without it
            from mxnet.contrib.quantization import combine_histogram
            self._hist[name] = combine_histogram(self._hist[name], array, lo, hi, th)
        else:
            hist, edges = np.histogram(array, bins=self.num_bins, range=(-th, th))
            self._hist[name] = (hist, edges, lo, hi, th)

    def thresholds(self):
        import mxnet as mx    # lazily, as in update()
        out = {}
        for name, (hist, edges, lo, hi, th) in self._hist.items():
            if th == 0.0:                       # an all-zero tensor: any range is exact
                out[name] = (0.0, 1e-6) if lo >= 0 else (-1e-6, 1e-6)
                continue
            unsigned = lo >= 0
            bins = 255 * 2 + 1 if unsigned else 255   # uint8 uses both halves' levels
            t, _ = mx.nd.contrib.calibrate_entropy(hist=mx.nd.array(hist), hist_edges=mx.nd.array(edges),
                                                   num_quantized_bins=bins)
            t = float(t.asscalar())
            out[name] = (0.0, t) if unsigned else (-t, t)
        return out
