"""``digits``: scikit-learn's 1,797 handwritten digits, 8×8, one channel (no download).

Pixels 0..16 are scaled to [0, 1] by /16. The split is stratified with ``data.val_split``
(default 20 %) and a fixed internal seed, so it does not change with ``seed``.

Recipe example::

    data: {name: digits, image_size: 16}
"""
import logging

import numpy as np

from .base import DATASETS, SourceData, stratified_split

__all__ = ["load_digits", "SPLIT_SEED"]
_LOGGER = logging.getLogger(__name__)

SPLIT_SEED = 0


@DATASETS.register("digits")
def load_digits(cfg, seed):
    """Load ``digits`` (``seed`` is ignored: the split is fixed for a given ``val_split``).

    Parameters
    ----------
    cfg : DataConfig
    seed : int

    Returns
    -------
    SourceData
        ``x`` float32 ``(N, 1, 8, 8)`` in [0, 1].
    """
    from sklearn.datasets import load_digits as _load
    d = _load()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int32)
    tr, va = stratified_split(y, cfg.val_split, SPLIT_SEED)
    return SourceData(x_train=x[tr], y_train=y[tr], x_val=x[va], y_val=y[va],
                      class_names=[str(i) for i in range(10)],
                      source=f"digits: {len(tr)} scikit-learn 8×8 digits (fixed stratified split)")
