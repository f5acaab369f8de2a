"""The dataset registry, the containers a loader returns, and the split helpers.

A loader is a function ``loader(cfg, seed) -> SourceData`` registered under the name a recipe
writes in ``data.name``::

    @DATASETS.register("mnist5k")
    def load_mnist5k(cfg, seed): ...

It returns pixels scaled to [0, 1]; :func:`distill.data.load_data` does the rest (channels,
resize, ``limit``, ``mean``/``std``, ``labels``) the same way for every dataset.
"""
import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from ..registry import Registry

__all__ = ["DATASETS", "Split", "DataBundle", "SourceData", "stratified_split", "balanced_subset"]
_LOGGER = logging.getLogger(__name__)

DATASETS = Registry("dataset")


@dataclass
class Split:
    """One side of a dataset (train or val).

    Attributes
    ----------
    x : np.ndarray or StreamedImages
        float32, C-contiguous, shape ``(N, C, H, W)``: pixels scaled to [0, 1], then
        ``(x - mean) / std`` per channel. For ``recordio``/``image_folder`` a
        :class:`~distill.data.stream.StreamedImages` (``x.is_streamed``) that decodes the rows
        it is indexed with (``x[idx]``, ``x.batch(idx, augment, seed)``).
    y : np.ndarray or None
        int32, shape ``(N,)``; ``None`` when labels are not used (label-free distillation).
    """
    x: np.ndarray
    y: Optional[np.ndarray]

    def __len__(self):
        return int(self.x.shape[0])


class _SkippedCount:
    """``DataBundle.skipped``: the count from loading plus what streamed splits found since.

    A data descriptor as a dataclass default: ``__init__`` sets it through ``__set__``."""

    def __get__(self, obj, owner=None):
        if obj is None:
            return 0                                   # the dataclass default
        sources = {}
        for split in (obj.__dict__.get("train"), obj.__dict__.get("val"), obj.__dict__.get("select")):
            src = getattr(getattr(split, "x", None), "source", None)
            if getattr(getattr(split, "x", None), "is_streamed", False):
                sources[id(src)] = src
        return obj.__dict__.get("_skipped_at_load", 0) + sum(len(s.bad) for s in sources.values())

    def __set__(self, obj, value):
        obj.__dict__["_skipped_at_load"] = int(value)


@dataclass
class DataBundle:
    """Everything the trainer, the calibrator and the reports need to know about the data.

    Attributes
    ----------
    name : str
        The registered dataset name (``data.name``).
    train, val : Split
        Training images (also the int8 calibration source) and held-out images.
    num_classes : int
        Number of classes (``len(class_names)``).
    channels : int
        ``C`` of ``(N, C, H, W)``.
    image_size : tuple of int
        ``(H, W)``.
    select : Split or None
        A holdout of the training data for choices (see :attr:`selection`); None when ``val``
        serves for both.
    class_names : list of str
        Index ``i`` is the name of label ``i``.
    mean, std : list of float
        What was applied, one value per channel.
    augment_options : dict or None
        ``min_random_area``, ``jitter``, ``pca_noise`` of the recipe: what the loop's per-image
        augmentations of an in-memory set use (a streamed set carries them itself).
    calib_source : str
        Short human description of where the train images came from (for reports).
    skipped : int
        Unreadable files or records skipped (``data.skip_corrupt``). For a streamed dataset
        the count grows while images are read (each unreadable image counted once, by any
        split or thread): reading the attribute (or :meth:`skipped_count`) gives the count so
        far. Setting it sets the count found while loading.
    """
    name: str
    train: Split
    val: Split
    num_classes: int
    channels: int
    image_size: Tuple[int, int]
    class_names: List[str]
    mean: List[float]
    std: List[float]
    calib_source: str
    skipped: int = _SkippedCount()
    select: Optional[Split] = None
    augment_options: Optional[dict] = None

    def skipped_count(self):
        """Unreadable images so far: those left out while loading plus those the streamed
        splits met since (each source counted once)."""
        return self.skipped

    @property
    def selection(self):
        """The split that choices read (int8 ``auto`` policies, sensitivity): a holdout of the
        training data when the dataset has a separate test set as ``val`` (``fashion_mnist``),
        else ``val``."""
        return self.select if self.select is not None else self.val


@dataclass
class SourceData:
    """What a registered loader returns, before the common steps of :func:`load_data`.

    ``x_train``/``x_val`` are float32 ``(N, C, H, W)`` in [0, 1]; they may already have the
    channels and size the config asks for (file loaders must resize while decoding, since their
    images can differ in size), or be :class:`~distill.data.stream.StreamedImages` (a loader
    marked ``streams``); ``y_train``/``y_val`` are int32 ``(N,)``. ``sharded``: the train side
    is already this worker's part (a loader that reads ``part_index``/``num_parts``).
    """
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    class_names: List[str]
    source: str
    skipped: int = 0
    sharded: bool = False
    x_select: Optional[np.ndarray] = None
    y_select: Optional[np.ndarray] = None


def stratified_split(y, val_fraction, seed):
    """Split indices per class: ``round(n_c * val_fraction)`` of each class go to val.

    Deterministic for a given ``seed``. A class with a single sample stays in train; every
    class with two or more samples keeps at least one in each side. So val is empty when no
    class has two samples (:func:`distill.data.load_data` refuses that).

    Parameters
    ----------
    y : np.ndarray
        Integer labels, shape ``(N,)``.
    val_fraction : float
        In (0, 1).
    seed : int
        Seed of the permutation inside each class.

    Returns
    -------
    train_idx, val_idx : np.ndarray
        Sorted int64 indices into ``y``.
    """
    y = np.asarray(y)
    rng = np.random.RandomState(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        n_val = 0 if n < 2 else min(max(int(round(n * val_fraction)), 1), n - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    empty = np.zeros(0, np.int64)          # no labels at all: two empty sides, not a crash
    return np.sort(np.concatenate(train + [empty])), np.sort(np.concatenate(val + [empty]))


def balanced_subset(y, limit):
    """The first ``limit`` indices taken round-robin over classes (deterministic, balanced).

    Sample ``k`` of every class comes before sample ``k + 1`` of any class, so each class gets
    ``limit // num_classes`` samples (give or take one) while it has them.

    Parameters
    ----------
    y : np.ndarray
        Integer labels, shape ``(N,)``.
    limit : int
        How many indices to keep.

    Returns
    -------
    np.ndarray
        Sorted indices (original order kept), ``min(limit, N)`` of them.
    """
    y = np.asarray(y)
    if limit >= len(y):
        return np.arange(len(y))
    rank = np.empty(len(y), np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rank[idx] = np.arange(len(idx))
    order = np.lexsort((y, rank))          # by rank within class, then by class
    return np.sort(order[:limit])
