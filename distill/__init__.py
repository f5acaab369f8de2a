"""distill: turn a trained fp32 MXNet network into a small, fast, int8-ready model."""
__version__ = "0.1.0"
__all__ = ["__version__"]
