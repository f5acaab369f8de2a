"""``naive``: each tensor's range is the min and max seen on the calibration images."""
import numpy as np

from .base import CALIBRATORS, Calibrator

__all__ = ["NaiveCalibrator"]


@CALIBRATORS.register("naive")
class NaiveCalibrator(Calibrator):
    """Min/max calibration (MXNet's ``calib_mode='naive'``): no value is ever clipped, so one
    outlier widens the step of every other value."""

    def __init__(self):
        self._ranges = {}

    def update(self, name, array):
        lo, hi = float(np.min(array)), float(np.max(array))
        old = self._ranges.get(name)
        self._ranges[name] = (min(lo, old[0]), max(hi, old[1])) if old else (lo, hi)

    def thresholds(self):
        return dict(self._ranges)
