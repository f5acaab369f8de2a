"""Teacher outputs for a training batch: computed live, or once and reused every epoch.

When the train transform is deterministic (no ``data.augment``), the frozen teacher gives the
same logits and tapped features for an image every epoch, so they are computed once over the
train split and sliced per batch: in memory, or in a bounded on-disk memmap when they are
large. With random augmentation the teacher must see each augmented batch: it runs live.

Recipe switch: ``trainer.teacher_cache: auto | memory | disk | off``.
"""
import logging
import os
import shutil

import mxnet as mx
import numpy as np
from tqdm import tqdm

from .errors import UserError

__all__ = ["TeacherOutputs"]
_LOGGER = logging.getLogger(__name__)


class TeacherOutputs:
    """Per-batch teacher outputs ``[logits, tap_1, ...]`` as NDArrays.

    Parameters
    ----------
    teacher : Teacher
        Its ``tapped`` block returns ``[logits] + taps``.
    train_x : np.ndarray or array-like
        ``(N, C, H, W)`` train images (un-augmented); a lazy array of streamed images is read
        ``batch_size`` images at a time (``train_x[i:i + batch_size]``), never whole.
    mode : str
        ``auto``, ``memory``, ``disk`` or ``off``.
    augmented : bool
        Whether batches are randomly augmented (forces ``off``).
    cache_dir : str
        Where ``disk`` mode writes its memmaps.
    max_memory_mb : float
        ``auto`` keeps outputs in memory up to this size, on disk above it.
    """

    def __init__(self, teacher, train_x, mode="auto", augmented=False, cache_dir=None,
                 max_memory_mb=2048, batch_size=256, progress=True):
        self.teacher = teacher
        if augmented and mode in ("memory", "disk"):
            raise UserError(f"`trainer.teacher_cache: {mode}` cannot be used with `data.augment`: "
                            f"augmented batches differ every epoch, so the teacher must run live. "
                            f"Set `trainer.teacher_cache: auto` (or off), or drop `data.augment`.")
        if mode == "auto":
            mode = "off" if augmented else "memory"
        self.arrays = None
        self.mode = mode
        if mode == "off":
            return
        shapes = [tuple(o.shape[1:]) for o in teacher.outputs(mx.nd.array(train_x[:2]))]
        n = len(train_x)
        total_mb = sum(n * int(np.prod(s)) * 4 for s in shapes) / 2**20
        if self.mode == "memory" and total_mb > max_memory_mb:
            _LOGGER.info("teacher outputs need %.0f MiB > %.0f MiB in memory: caching on disk",
                         total_mb, max_memory_mb)
            self.mode = "disk"
        if self.mode == "disk":
            if cache_dir is None:
                raise UserError("teacher cache on disk needs a folder (the run folder)")
            shutil.rmtree(cache_dir, ignore_errors=True)
            os.makedirs(cache_dir, exist_ok=True)
            free = shutil.disk_usage(cache_dir).free / 2**20
            if free < total_mb * 1.1:
                raise UserError(f"the teacher-output cache needs {total_mb:.0f} MiB in {cache_dir} "
                                f"but only {free:.0f} MiB are free: free space, or set "
                                f"`trainer.teacher_cache: off` to run the teacher live.")
            self.arrays = [np.lib.format.open_memmap(os.path.join(cache_dir, f"out{i}.npy"), "w+",
                                                     np.float32, (n,) + s)
                           for i, s in enumerate(shapes)]
        else:
            self.arrays = [np.empty((n,) + s, np.float32) for s in shapes]
        for i in tqdm(range(0, n, batch_size), desc="teacher outputs (cached once)", leave=False,
                      disable=None if progress else True):
            outs = teacher.outputs(mx.nd.array(train_x[i:i + batch_size]))
            for arr, o in zip(self.arrays, outs):
                arr[i:i + batch_size] = o.asnumpy()
        self.megabytes = total_mb

    def __call__(self, idx, x):
        """Outputs for the train images ``idx`` (already in the NDArray ``x`` when live)."""
        if self.arrays is None:
            return self.teacher.outputs(x)
        if self.mode == "memory":
            return [mx.nd.array(a[idx]) for a in self.arrays]
        order = np.sort(idx)          # memmaps read faster in order; restore the batch order after
        inv = np.argsort(np.argsort(idx))
        return [mx.nd.array(a[order][inv]) for a in self.arrays]
