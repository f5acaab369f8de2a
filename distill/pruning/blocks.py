"""Channel blocks: how many channels a pruned layer keeps a multiple of (``pruning.round_to``)
and which way a kept width is rounded (``pruning.round_mode``).

An engine computes channels in blocks: oneDNN's fp32 convolutions in blocks of 16 on AVX-512
and 8 on AVX2; ncnn packs 4 (fp32 on ARM NEON) or 8 (int8 and fp16) channels. A cut that ends
mid-block buys nothing: measured here, ResNet-20 at half its channels has 3.99× fewer MACs but
runs only 2.21× faster at batch 32, because 8-channel cuts do nothing for a 16-channel block.
``round_to: auto`` picks the block of the backend the pruning is timed for (``pruning.target
.backend``, else MXNet's oneDNN on this CPU) and says which in the log and the plan.

Recipe example::

    pruning: {enabled: true, round_to: auto, round_mode: down}
"""
import logging
import os

__all__ = ["Rounding", "rounding", "onednn_block", "NCNN_BLOCK"]
_LOGGER = logging.getLogger(__name__)

#: ncnn's pack size on ARM for fp32 (NEON pack4); its int8 and fp16 kernels pack 8
NCNN_BLOCK = 4


class Rounding(int):
    """A channel block (an ``int``: every place that took ``round_to`` still does) that also
    carries the rounding mode (``up``, ``down``, ``nearest``) and why this block was chosen."""

    def __new__(cls, size, mode="up", why=""):
        obj = super().__new__(cls, int(size))
        obj.mode, obj.why = mode, why
        return obj

    def __repr__(self):
        return f"Rounding({int(self)}, {self.mode!r})"


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def onednn_block():
    """``(block, why)`` of MXNet's oneDNN fp32 kernels on this CPU: 16 with AVX-512 (unless
    ``DNNL_MAX_CPU_ISA`` caps it below), else 8."""
    cap = os.environ.get("DNNL_MAX_CPU_ISA", os.environ.get("MKLDNN_MAX_CPU_ISA", "")).upper()
    if "avx512f" in _cpu_flags() and not (cap and "AVX512" not in cap and cap != "ALL"):
        return 16, "oneDNN on this CPU (AVX-512: blocks of 16 channels)"
    return 8, "oneDNN on this CPU (AVX2: blocks of 8 channels)"


def rounding(cfg, backend=None):
    """The :class:`Rounding` of a ``pruning:`` section: ``round_to`` (a number, or ``auto``:
    the block of ``backend``, default ``cfg.target.backend`` or ``mxnet``) with ``round_mode``."""
    mode = getattr(cfg, "round_mode", "up")
    if cfg.round_to != "auto":
        return Rounding(cfg.round_to, mode, f"pruning.round_to: {cfg.round_to}")
    backend = backend or (cfg.target.backend if cfg.target is not None else "mxnet")
    if backend == "ncnn":
        size, why = NCNN_BLOCK, f"ncnn (ARM fp32 packs {NCNN_BLOCK} channels)"
    else:
        size, why = onednn_block()
    return Rounding(size, mode, f"round_to auto: {why}")
