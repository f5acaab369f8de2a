"""The record the dependency analysis keeps per graph output: shape and channel element ids.

Its own module so that the op-rule table (:mod:`distill.pruning.ops`) and the analysis that runs
it (:mod:`distill.pruning.graph`) both import it without importing each other.
"""
import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

__all__ = ["Tensor"]
_LOGGER = logging.getLogger(__name__)


@dataclass
class Tensor:
    """One output of one graph node.

    Attributes
    ----------
    shape : tuple
        Inferred shape (batch first).
    ids : ndarray or None
        Element ids along the channel axes ``1 .. ids.ndim`` (``None``: no channel axis).
    derived : bool
        The ids are a repetition of another tensor's (Flatten): not used to define groups.
    """
    shape: Tuple[int, ...]
    ids: Optional[np.ndarray]
    derived: bool = False
