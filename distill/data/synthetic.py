"""``synthetic``: generated images for fast tests, deterministic from ``seed``.

Each class has a fixed smooth random prototype (a coarse 4×4 random pattern upsampled
bilinearly); a sample is its class prototype with a random contrast and brightness plus
pixel noise, clipped to [0, 1]. Classes are balanced and well separated, so a small network
learns them in a few epochs.

Recipe example::

    data: {name: synthetic, num_samples: 512, num_classes: 4, channels: 3, image_size: 16}
"""
import logging

import numpy as np

from .base import DATASETS, SourceData, stratified_split
from .images import parse_image_size, resize

__all__ = ["load_synthetic", "make_synthetic", "DEFAULT_SIZE"]
_LOGGER = logging.getLogger(__name__)

DEFAULT_SIZE = (16, 16)
_NOISE = 0.1


def make_synthetic(num_samples, num_classes, channels, size, seed):
    """Generate ``(x, y)``: x float32 ``(N, C, H, W)`` in [0, 1], y int32 ``(N,)`` balanced."""
    rng = np.random.RandomState(seed)
    coarse = rng.uniform(0.0, 1.0, size=(num_classes, channels, 4, 4)).astype(np.float32)
    protos = np.stack([resize(p, size) for p in coarse])               # (K, C, H, W)
    y = (np.arange(num_samples) % num_classes).astype(np.int32)
    y = y[rng.permutation(num_samples)]
    contrast = rng.uniform(0.8, 1.2, size=(num_samples, 1, 1, 1)).astype(np.float32)
    shift = rng.uniform(-0.1, 0.1, size=(num_samples, 1, 1, 1)).astype(np.float32)
    noise = rng.normal(0.0, _NOISE, size=(num_samples, channels) + tuple(size)).astype(np.float32)
    x = np.clip((protos[y] - 0.5) * contrast + 0.5 + shift + noise, 0.0, 1.0)
    return x.astype(np.float32), y


@DATASETS.register("synthetic")
def load_synthetic(cfg, seed):
    """Load ``synthetic``: ``cfg.num_samples`` images, ``cfg.channels`` channels,
    ``cfg.num_classes`` classes, ``cfg.image_size`` (default 16×16), split by ``cfg.val_split``.

    Parameters
    ----------
    cfg : DataConfig
    seed : int
        Same seed, same images and same split.

    Returns
    -------
    SourceData
    """
    size = parse_image_size(cfg.image_size) or DEFAULT_SIZE
    x, y = make_synthetic(cfg.num_samples, cfg.num_classes, cfg.channels, size, seed)
    tr, va = stratified_split(y, cfg.val_split, seed)
    return SourceData(x_train=x[tr], y_train=y[tr], x_val=x[va], y_val=y[va],
                      class_names=[f"class{i}" for i in range(cfg.num_classes)],
                      source=f"synthetic: {len(tr)} generated images (seed {seed})")
