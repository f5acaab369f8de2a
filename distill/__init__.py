"""distill: turn a trained fp32 MXNet network into a small, fast, int8-ready model."""
import os

# MXNet logs "Subgraph backend MKLDNN is activated" once per fused graph it builds: dozens of
# lines during int8 calibration and per-layer timing. Set before MXNet is imported (a user's own
# setting wins).
os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")

__version__ = "0.1.0"
__all__ = ["__version__"]
