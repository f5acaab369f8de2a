"""The calibrator registry and interface."""
from ...registry import Registry

__all__ = ["CALIBRATORS", "Calibrator"]

CALIBRATORS = Registry("calibration mode")


class Calibrator:
    """Accumulates statistics of named fp32 tensors, then gives each an int8 range.

    ``update(name, array)`` is called once per output per calibration batch, in a fixed order;
    ``thresholds()`` returns ``{name: (min, max)}``. A range with ``min >= 0`` is quantized to
    uint8 by MXNet (``quantized_dtype='auto'``), others to int8, symmetric.
    """

    def update(self, name, array):
        """Add ``array`` (np.ndarray, any shape) to the statistics of ``name``."""
        raise NotImplementedError

    def thresholds(self):
        """``{name: (min, max)}`` for every name seen."""
        raise NotImplementedError
