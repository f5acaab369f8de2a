"""The batches of one training epoch, produced ahead of the loop on a background thread.

The order and the augmentation of every batch follow from ``(trainer.seed, epoch)`` alone, so
a run resumed mid-epoch (``trainer.checkpoint_every``) sees exactly the batches the
uninterrupted run saw from that step on:

- in-memory data (``mnist5k``, ``digits``, ``synthetic``, ``fashion_mnist``): a permutation
  from ``RandomState(seed * 100003 + epoch)``, then ``crop``/``hflip`` drawn from the same
  generator batch after batch (what the loop always did; a resumed epoch replays the draws of
  the batches it skips without touching pixels); GluonCV's ``random_resized_crop``,
  ``color_jitter`` and ``lighting`` per image, seeded like a streamed image by ``(seed, epoch)``
  and its index, on the pixels in [0, 1] (``mean``/``std`` undone, then redone);
- streamed data (``recordio``, ``image_folder``: a :class:`~distill.data.stream.StreamedImages`):
  the same permutation, and each image's augmentation seeded by ``(seed, epoch)`` and its
  record (:meth:`StreamedImages.batch`), whatever thread decodes it. A corrupt record is
  dropped from its batch (``data.skip_corrupt``).

While the loop trains on batch ``k``, the thread already gathers (or decodes) batches
``k + 1 .. k + prefetch``: at most ``prefetch + 1`` batches exist at a time.
"""
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .data import augment as _aug
from .data.stream import _rng as _image_rng

__all__ = ["Batch", "EpochFeed", "augment_batch", "epoch_seed", "batch_order"]
_LOGGER = logging.getLogger(__name__)


def epoch_seed(seed, epoch):
    """The seed of an epoch's order and augmentation (the loop's rule since its first version)."""
    return seed * 100003 + epoch


def batch_order(n, batch_size, rng):
    """The index batches of an epoch: ``rng.permutation(n)`` cut into ``batch_size`` pieces, the
    last partial one dropped when there is a full one."""
    order = rng.permutation(n)
    stop = n - n % batch_size if n > batch_size else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def _draw(ops, n, h, w, rng):
    """The random numbers :func:`augment_batch` draws for a batch of ``n``, in its order."""
    out = {}
    if "crop" in ops:
        ph, pw = max(1, h // 8), max(1, w // 8)
        out["crop"] = (ph, pw, rng.randint(0, 2 * ph + 1, n), rng.randint(0, 2 * pw + 1, n))
    if "hflip" in ops:
        out["hflip"] = rng.rand(n) < 0.5
    return out


# the per-image augmentations of GluonCV's ImageNet training set (crop/hflip: whole batches)
PER_IMAGE = ("random_resized_crop", "color_jitter", "lighting")


def augment_images(x, idx, ops, seed, mean, std, options):
    """``random_resized_crop``, ``color_jitter`` and ``lighting`` of normalized (N, C, H, W)
    images, image ``i`` seeded by ``(seed, idx[i])``; returns a new float32 array."""
    m = np.asarray(mean, np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, np.float32).reshape(-1, 1, 1)
    out = np.empty_like(x, dtype=np.float32)
    size = tuple(x.shape[2:])
    for i in range(len(x)):
        rng = _image_rng(seed, int(idx[i]))
        hwc = (x[i] * s + m).transpose(1, 2, 0)
        if "random_resized_crop" in ops:
            hwc = _aug.random_resized_crop(np.ascontiguousarray(hwc), size, rng, options["min_random_area"])
            hwc = hwc.reshape(size + (x.shape[1],))
        if "color_jitter" in ops and options["jitter"] > 0:
            j = options["jitter"]
            hwc = _aug.color_jitter(np.clip(hwc, 0, 1), rng, j, j, j)
        if "lighting" in ops:
            hwc = _aug.lighting(hwc, rng, options["pca_noise"])
        out[i] = (hwc.transpose(2, 0, 1) - m) / s
    return out


def augment_batch(x, ops, rng):
    """Random ``crop`` (pad by 1/8 of the size, reflect, crop back) and ``hflip`` of (N, C, H, W)."""
    n, _, h, w = x.shape
    draws = _draw(ops, n, h, w, rng)
    if "crop" in draws:
        ph, pw, dy, dx = draws["crop"]
        padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode="reflect")
        x = np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if "hflip" in draws:
        flip = draws["hflip"]
        x = x.copy()
        x[flip] = x[flip, :, :, ::-1]
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass
class Batch:
    """One step's images: ``idx`` positions in the train split, ``x`` float32 (n, C, H, W),
    ``y`` int32 (n,) or None; ``dropped`` corrupt records left out of it."""
    step: int
    idx: np.ndarray
    x: np.ndarray
    y: Optional[np.ndarray]
    dropped: int = 0


class EpochFeed:
    """Iterate the batches of one epoch from ``start_step`` on.

    Parameters
    ----------
    split : Split
        The train split (numpy ``x`` or a streamed one).
    batch_size, steps : int
        Images per step and steps in the epoch (the last partial batch is dropped when there is
        a full one).
    seed, epoch : int
        ``trainer.seed`` and the 0-based epoch.
    augment : list of str
        ``data.augment``.
    mean, std, options
        In-memory sets with a per-image augmentation: the normalization to undo and the
        recipe's ``min_random_area``/``jitter``/``pca_noise`` (``DataBundle.augment_options``).
    start_step : int
        Steps already done in this epoch (a resumed run).
    prefetch : int
        Batches prepared ahead on a background thread; 0: in the calling thread.
    """

    def __init__(self, split, batch_size, steps, seed, epoch, augment=(), start_step=0, prefetch=2,
                 mean=None, std=None, options=None):
        self.split, self.batch_size, self.steps = split, batch_size, steps
        self.mean, self.std, self.options = mean, std, options
        self.augment, self.start_step, self.prefetch = list(augment), start_step, prefetch
        self.seed = epoch_seed(seed, epoch)
        self.streamed = bool(getattr(split.x, "is_streamed", False))
        self._stop = threading.Event()
        self._thread = None

    def _order(self, rng):
        return batch_order(len(self.split.x), self.batch_size, rng)[:self.steps]

    def _produce(self):
        rng = np.random.RandomState(self.seed)
        x, y = self.split.x, self.split.y
        _, _, h, w = x.shape
        for step, idx in enumerate(self._order(rng)):
            if self._stop.is_set():
                return
            if step < self.start_step:
                if self.augment and not self.streamed:
                    _draw(self.augment, len(idx), h, w, rng)     # keep the generator in step
                continue
            dropped = 0
            if self.streamed:
                xb, ok = x.batch(idx, self.augment, self.seed)
                if not ok.all():
                    dropped = int((~ok).sum())
                    idx, xb = idx[ok], xb[ok]
            else:
                xb = x[idx]
                if self.augment:
                    xb = augment_batch(xb, self.augment, rng)
                if any(op in PER_IMAGE for op in self.augment):
                    xb = augment_images(xb, idx, self.augment, self.seed, self.mean, self.std,
                                        self.options)
            yield Batch(step, idx, np.ascontiguousarray(xb, np.float32),
                        None if y is None else y[idx], dropped)

    def __iter__(self):
        if self.prefetch <= 0:
            yield from self._produce()
            return
        q = queue.Queue(maxsize=self.prefetch)
        done = object()

        def work():
            try:
                for b in self._produce():
                    while not self._stop.is_set():
                        try:
                            q.put(b, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
                q.put(done)
            except BaseException as e:            # the loop re-raises it (UserError included)
                q.put(e)

        self._thread = threading.Thread(target=work, name="distill-feed", daemon=True)
        self._thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self):
        """Stop the background thread (a step raised, or the loop left early)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
