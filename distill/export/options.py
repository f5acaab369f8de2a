"""``ExportOptions``: the ``distill export`` flags as one typed object (same names).

Its own module so that the export job (:mod:`.core`) and the model card (:mod:`.card`) both
read it without importing each other.
"""
import logging
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

from ..errors import UserError
from ..quantize import CALIBRATORS

__all__ = ["ExportOptions", "options_dict"]
_LOGGER = logging.getLogger(__name__)


@dataclass
class ExportOptions:
    """Options of ``distill export`` (the command-line flags, same names)."""
    fp16: bool = False
    atol: float = 1e-3
    rtol: float = 1e-4
    min_agreement: float = 99.0
    calib_size: Optional[int] = None
    calib_mode: Optional[str] = None
    int8_exclude: Tuple[str, ...] = ()
    int8_max_drop: float = 1.0
    int8_max_diff: float = 1.0
    threads: Optional[int] = None
    repeats: Optional[int] = None
    latency: bool = True
    input_name: str = "data"
    logits: Optional[str] = None
    eval_batch_size: int = 256
    ncnn_calib: str = "mxnet"
    ncnn_policies: bool = False
    onnx_weight_bits: str = "auto"

    def validate(self):
        if not self.atol > 0:
            raise UserError(f"--atol must be > 0, got {self.atol}")
        if not self.rtol >= 0:
            raise UserError(f"--rtol must be ≥ 0 (relative to the largest MXNet logit), got {self.rtol}")
        if not 0 <= self.min_agreement <= 100:
            raise UserError(f"--min-agreement is a percentage in [0, 100], got {self.min_agreement}")
        if self.calib_size is not None and self.calib_size < 1:
            raise UserError(f"--calib-size must be ≥ 1, got {self.calib_size}")
        if self.calib_mode is not None:
            CALIBRATORS.get(self.calib_mode, where="--calib-mode")
        if not self.int8_max_diff >= 0:
            raise UserError(f"--int8-max-diff is in points of top-1, ≥ 0; got {self.int8_max_diff}")
        if self.ncnn_calib not in ("mxnet", "kl"):
            raise UserError(f"--ncnn-calib must be mxnet (MXNet's thresholds) or kl (ncnn2table's "
                            f"KL method), got {self.ncnn_calib!r}")
        if str(self.onnx_weight_bits) not in ("auto", "7", "8"):
            raise UserError(f"--onnx-weight-bits must be auto, 7 or 8, got {self.onnx_weight_bits!r}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be ≥ 1, got {self.threads}")
        if self.repeats is not None and self.repeats < 1:
            raise UserError(f"--repeats must be ≥ 1, got {self.repeats}")


def options_dict(options):
    """The options as plain data (for the model card)."""
    d = asdict(options)
    d["int8_exclude"] = list(d["int8_exclude"])
    return d
