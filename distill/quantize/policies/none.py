"""``none``: full int8, every layer quantized (the baseline the others are judged against)."""
from .base import POLICIES, Selection

__all__ = ["NoExclusion"]


@POLICIES.register("none")
class NoExclusion:
    """Keep nothing in fp32."""
    name = "none"

    def select(self, scorer):
        return Selection(excluded=[], notes=["full int8: no layer kept in fp32"])
