"""Streamed images: an array-like over a ``.rec`` or an image folder that decodes on demand.

``recordio`` and ``image_folder`` datasets hold 100k–1M images at 112–224 px: decoding them
all into float32 would need tens to hundreds of GB. :func:`distill.data.load_data` therefore
puts a :class:`StreamedImages` in ``Split.x`` for them (unless ``data.stream: false``). It looks
like the ``(N, C, H, W)`` float32 array it replaces (``shape``, ``ndim``, ``dtype``, ``len``,
``x[idx]``), holds only positions, and decodes what is asked for:

- ``x[key]`` (int, slice, int array, bool mask): the evaluation transform — decode, channels
  (:func:`~distill.data.images.to_channels`), geometry (:func:`~distill.data.images.eval_resize`:
  a bilinear resize to ``data.image_size``, or with ``data.val_resize`` the shorter side to it
  and a centre crop), then ``(x - mean) / std``. The same functions as the in-memory path, so
  the pixels are bit-identical to ``data.stream: false``.
- ``x.batch(idx, augment, seed)``: the same plus the per-image augmentations of
  :mod:`distill.data.augment`, drawn from a generator seeded by ``(seed, record id)`` only, so
  a batch does not depend on the number of threads or their scheduling; ``ok`` marks the rows
  whose image could not be read (zeros).
- ``x.subset(positions)``: a view (``data.limit``, ``val_split`` and worker shards are made on
  positions and labels, never on pixels); ``x.record_ids``: the record keys (``.rec``) or file
  order numbers (folder) of the positions.

An unreadable image reads as zeros and is counted once per source (shared by every view) and
logged once with its name (``data.skip_corrupt: true``); with ``skip_corrupt: false`` reading
it raises :class:`~distill.errors.UserError` naming it. ``np.asarray(x)`` works up to
:data:`MAX_IN_MEMORY` images (small test sets); above that it raises RuntimeError: a consumer
tried to hold the whole dataset.

Why our own threads and not MXNet's readers
-------------------------------------------
Every consumer needs *random access by index*: the trainer's shuffled batches seeded by
``(seed, epoch)``, ``data.limit``/``val_split``/shards chosen on record indices, the teacher
cache keyed by record index, calibration samples. ``mx.io.ImageRecordIter`` only streams a
file sequentially (its own shuffle, its own augmentation RNG, whole-file parts), so none of
that could be kept. Gluon's ``DataLoader(ImageRecordDataset, num_workers=k)`` does give random
access, but through worker *processes* that pickle every decoded batch back. A thread pool
works because ``cv2.imdecode``, Pillow's decoder, ``cv2.resize`` and the numpy steps release
the GIL. Measured on a synthetic 2000-image 112×112 JPEG ``.rec`` (12.6 MB, 3 channels,
float32 normalized output, 1024 images in batches of 64, two runs each shown as ``min–max``),
on the 2-core machine these tools are developed on, shared with other jobs (load average 5–9
during the runs, so the figures are noisy and no worker count can scale). Run A with
``OMP_NUM_THREADS=1``, run B with 2:

=====  ===========================================  ==========  ==========  ==========
run    decoder (images/s)                           1 or 0      2           4
=====  ===========================================  ==========  ==========  ==========
A      StreamedImages threads (``data.workers``)    1765–2013   1745–1764   1824–1879
A      gluon DataLoader(ImageRecordDataset)         485–754     466–633     431–449
A      mx.io.ImageRecordIter(preprocess_threads)    2320–5074   2232–5344   2378–2961
B      StreamedImages threads                       4986–5113   4954–4969   4870–4891
B      gluon DataLoader(ImageRecordDataset)         125–1550    56–70       30–33
B      mx.io.ImageRecordIter                        3797–3949   3929–4048   3739–3831
=====  ===========================================  ==========  ==========  ==========

(first column: the calling thread, ``num_workers=0``, one preprocess thread; ImageRecordIter
logged "use 1 threads for decoding" in every run here.) The threads are on a par with
``ImageRecordIter`` (within this machine's noise), while keeping random access and the
deterministic per-record augmentation; the DataLoader's worker processes lose to pickling and
to the contention. Hence: our threads over MXNet's readers. ``bench/scale.py`` prints
:func:`decode_throughput` per worker count on the real data and machine.

Recipe example::

    data: {name: recordio, root: data/imagenet_rec, image_size: 224, val_resize: 256,
           augment: [random_resized_crop, hflip, color_jitter, lighting], workers: 8}
"""
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np

from ..errors import UserError
from . import augment as aug
from .images import as_unit, eval_resize, resize, to_channels

__all__ = ["StreamedImages", "ImageSource", "TransformSpec", "decode_throughput", "default_workers", "take",
           "MAX_IN_MEMORY"]
_LOGGER = logging.getLogger(__name__)

MAX_IN_MEMORY = 4096
"""``np.asarray`` of a streamed split is refused above this many images."""


def default_workers(workers):
    """Decode threads for ``data.workers``: None → ``os.cpu_count()`` (at most 8); 0 or 1 → the
    calling thread decodes (no pool)."""
    if workers is None:
        return max(1, min(os.cpu_count() or 1, 8))
    return int(workers)


def _rng(seed, record_id):
    """A generator that depends only on ``(seed, record_id)``."""
    s, r = int(seed) & 0xFFFFFFFFFFFFFFFF, int(record_id) & 0xFFFFFFFFFFFFFFFF
    return np.random.RandomState([s & 0xFFFFFFFF, s >> 32, r & 0xFFFFFFFF, r >> 32, 0x5EED])


class ImageSource:
    """Random access to the encoded images of one file or folder; shared by all its views.

    Subclasses implement :meth:`name` and :meth:`decode`. The source counts unreadable images
    (each once, whichever view or thread read it) and owns the decode thread pools.

    Parameters
    ----------
    what : str
        Dataset name for messages (``recordio``, ``image_folder``).
    ids : array of int
        Record key / file order number of each position.
    skip_corrupt : bool
        ``data.skip_corrupt``.
    fix : str
        What the user can do about an unreadable image (appended to the error).
    """

    def __init__(self, what, ids, skip_corrupt=True, fix=""):
        self.what = what
        self.ids = np.asarray(ids, np.int64)
        self.skip_corrupt = bool(skip_corrupt)
        self.fix = fix
        self.bad = {}                      # name -> reason, each unreadable image once
        self.expect_size = None            # (H, W) the probe saw when data.image_size is unset
        self._lock = threading.Lock()
        self._pools = {}
        self._size_warned = False

    def __len__(self):
        return len(self.ids)

    def name(self, i):
        """The name of position ``i`` in messages (file path, ``"<rec> record <key>"``)."""
        raise NotImplementedError

    def decode(self, i):
        """The decoded image at position ``i``: ``(H, W)`` or ``(H, W, 3)`` RGB, native dtype;
        None or an exception when it cannot be read. Must be thread-safe."""
        raise NotImplementedError

    def load(self, i):
        """:meth:`decode` with the unreadable case handled: None (counted, logged once) or
        UserError when ``skip_corrupt`` is false."""
        try:
            img = self.decode(i)
            err = None if img is not None else "not a decodable image"
        except UserError:
            raise
        except Exception as e:   # any decoder failure means "unreadable" here  # noqa: BLE001
            img, err = None, f"{type(e).__name__}: {e}"
        if img is None:
            self._unreadable(i, err)
        return img

    def _unreadable(self, i, err):
        name = self.name(i)
        if not self.skip_corrupt:
            raise UserError(f"{self.what}: cannot read {name} as an image ({err}). {self.fix} Or "
                            f"set `data.skip_corrupt: true` to skip unreadable images (they read "
                            f"as zeros and are counted).")
        with self._lock:
            new = name not in self.bad
            self.bad[name] = err
            count = len(self.bad)
        if new:
            _LOGGER.warning("%s: skipped unreadable image %s (%s; data.skip_corrupt is true): "
                            "%d unreadable so far", self.what, name, err, count)

    def check_size(self, i, img):
        """Warn once when an image differs from the probed size (``data.image_size`` unset)."""
        if self.expect_size is None or tuple(img.shape[:2]) == self.expect_size or self._size_warned:
            return
        self._size_warned = True
        _LOGGER.warning("%s: %s is %d×%d but the first images are %d×%d and `data.image_size` is "
                        "not set: it is resized to %d×%d (set `data.image_size` to choose the size)",
                        self.what, self.name(i), img.shape[0], img.shape[1], *self.expect_size,
                        *self.expect_size)

    def pool(self, workers):
        """The thread pool of ``workers`` threads (made once per source and process)."""
        key = (os.getpid(), workers)             # a forked child cannot use its parent's threads
        with self._lock:
            p = self._pools.get(key)
            if p is None:
                p = self._pools[key] = ThreadPoolExecutor(
                    workers, thread_name_prefix=f"distill-{self.what}-decode")
            return p

    def __getstate__(self):                      # picklable (e.g. for worker processes)
        d = dict(self.__dict__)
        d["_lock"], d["_pools"] = None, {}
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()


@dataclass(frozen=True)
class TransformSpec:
    """What a view turns a decoded image into.

    Attributes
    ----------
    channels : int
        1 or 3.
    size : tuple of int
        ``(H, W)``.
    mean, std : tuple of float
        One per channel, applied last.
    val_resize : int or None
        ``data.val_resize`` (see :func:`~distill.data.images.eval_resize`).
    min_random_area, jitter, pca_noise : float
        ``data.min_random_area``, ``data.jitter``, ``data.pca_noise`` (augmentation).
    workers : int or None
        ``data.workers``.
    """
    channels: int
    size: Tuple[int, int]
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)
    val_resize: Optional[int] = None
    min_random_area: float = 0.08
    jitter: float = 0.4
    pca_noise: float = 0.1
    workers: Optional[int] = None


class StreamedImages:
    """A float32 ``(N, C, H, W)`` array-like whose images are decoded when indexed.

    Parameters
    ----------
    source : ImageSource
    positions : array of int
        Source positions of this view, in order.
    spec : TransformSpec
    """
    is_streamed = True
    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(self, source, positions, spec):
        self.source = source
        self.positions = np.asarray(positions, np.int64).reshape(-1)
        spec = replace(spec, size=tuple(int(s) for s in spec.size),
                       mean=tuple(float(m) for m in spec.mean), std=tuple(float(s) for s in spec.std))
        if len(spec.mean) == 1:
            spec = replace(spec, mean=spec.mean * spec.channels)
        if len(spec.std) == 1:
            spec = replace(spec, std=spec.std * spec.channels)
        self.spec = spec
        self._m = np.asarray(spec.mean, np.float32).reshape(-1, 1, 1)
        self._s = np.asarray(spec.std, np.float32).reshape(-1, 1, 1)

    # -- array-like ----------------------------------------------------------------------------

    @property
    def shape(self):
        """``(N, C, H, W)``."""
        return (len(self.positions), self.spec.channels) + tuple(self.spec.size)

    def __len__(self):
        return len(self.positions)

    @property
    def record_ids(self):
        """Record keys (``.rec``) or file order numbers (folder) of the positions, int64 ``(N,)``."""
        return self.source.ids[self.positions]

    @property
    def skipped(self):
        """Unreadable images of the source found so far (by any view)."""
        return len(self.source.bad)

    def names(self, key=slice(None)):
        """Names (file path, ``"<rec> record <key>"``) of the images ``key`` selects."""
        return [self.source.name(int(p)) for p in self.positions[self._rows(key)]]

    def __repr__(self):
        return (f"StreamedImages({self.source.what}, shape={self.shape}, "
                f"workers={default_workers(self.spec.workers)})")

    def _rows(self, key):
        """Row numbers of this view selected by ``key`` (slice, int array/list or bool mask)."""
        n = len(self.positions)
        if isinstance(key, slice):
            return np.arange(n)[key]
        arr = np.asarray(key)
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise IndexError(f"boolean index of shape {arr.shape} does not match {n} images")
            return np.flatnonzero(arr)
        if arr.size == 0:
            return np.zeros(0, np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise IndexError(f"StreamedImages index must be int, slice, int array or bool mask, "
                             f"got {arr.dtype}")
        arr = arr.reshape(-1).astype(np.int64)
        if arr.min() < -n or arr.max() >= n:
            raise IndexError(f"index out of range for {n} images")
        return np.where(arr < 0, arr + n, arr)

    def __getitem__(self, key):
        if isinstance(key, tuple):                 # x[rows, channel, ...]: rows first, then numpy
            head, rest = key[0], key[1:]
            out = self[head]
            return out[rest] if isinstance(head, (int, np.integer)) else out[(slice(None),) + rest]
        if isinstance(key, (int, np.integer)):
            n = len(self.positions)
            if not -n <= key < n:
                raise IndexError(f"index {key} out of range for {n} images")
            return self._decode_rows(np.array([int(key) % n]), (), 0)[0][0]
        return self._decode_rows(self._rows(key), (), 0)[0]

    def __array__(self, dtype=None, copy=None):
        if len(self) > MAX_IN_MEMORY:
            raise RuntimeError(
                f"a consumer tried to hold the whole streamed {self.source.what} split "
                f"({len(self)} images, {np.prod(self.shape) * 4 / 2**30:.1f} GiB as float32) in "
                f"memory; np.asarray of a StreamedImages is allowed up to {MAX_IN_MEMORY} images. "
                f"Read it in batches (x[idx], x.batch(idx, augment, seed)).")
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    # -- views ---------------------------------------------------------------------------------

    def subset(self, positions):
        """A view of the rows ``positions`` (int array or bool mask) of this view."""
        return StreamedImages(self.source, self.positions[self._rows(positions)], self.spec)

    def with_spec(self, **changes):
        """The same images with other :class:`TransformSpec` fields (channels, size, mean, ...)."""
        return StreamedImages(self.source, self.positions, replace(self.spec, **changes))

    # -- decoding ------------------------------------------------------------------------------

    def batch(self, idx, augment=(), seed=0):
        """Decode rows ``idx`` with per-image random augmentation.

        Parameters
        ----------
        idx : array of int, slice or bool mask
            Rows of this view.
        augment : list of str
            From ``data.augment``: ``random_resized_crop``, ``crop``, ``hflip``, ``color_jitter``,
            ``lighting`` (applied in that order, whatever the list order).
        seed : int
            With the record id, the only input of each image's randomness (vary it per epoch).

        Returns
        -------
        xb : np.ndarray
            float32 C-contiguous ``(len(idx), C, H, W)``.
        ok : np.ndarray
            bool ``(len(idx),)``: False where the image could not be read (its row is zeros).
        """
        return self._decode_rows(self._rows(idx), tuple(augment or ()), seed)

    def _decode_rows(self, rows, augment, seed):
        n = len(rows)
        out = np.zeros((n,) + self.shape[1:], np.float32)
        ok = np.zeros(n, bool)
        pos = self.positions[rows]

        def fill(js):
            for j in js:
                ok[j] = self._one(int(pos[j]), augment, seed, out[j])

        workers = default_workers(self.spec.workers)
        if workers <= 1 or n <= 1:
            fill(range(n))
        else:
            pool = self.source.pool(workers)
            chunks = [c for c in np.array_split(np.arange(n), min(n, 2 * workers)) if len(c)]
            for f in [pool.submit(fill, c) for c in chunks]:
                f.result()                         # re-raises a UserError of a worker thread
        return out, ok

    def _one(self, p, augment, seed, out):
        """Decode position ``p``, transform and normalize it into ``out`` ``(C, H, W)``; False
        when it cannot be read (``out`` left as it is)."""
        img = self.source.load(p)
        if img is None:
            return False
        self.source.check_size(p, img)
        sp = self.spec
        if not augment:
            x = eval_resize(to_channels(as_unit(img), sp.channels), sp.size, sp.val_resize)
        else:
            rng = _rng(seed, self.source.ids[p])
            if "random_resized_crop" in augment:   # crop the decoded image, then convert
                y0, x0, ch, cw = aug.random_resized_crop_box(img.shape[0], img.shape[1], rng,
                                                             sp.min_random_area, size=sp.size)
                x = resize(to_channels(as_unit(img[y0:y0 + ch, x0:x0 + cw]), sp.channels), sp.size)
            else:
                x = eval_resize(to_channels(as_unit(img), sp.channels), sp.size, sp.val_resize)
            hwc = x.transpose(1, 2, 0)
            if "crop" in augment:
                hwc = aug.pad_crop(hwc, rng)
            if "hflip" in augment:
                hwc = aug.hflip(hwc, rng)
            if "color_jitter" in augment and sp.jitter > 0:
                hwc = aug.color_jitter(hwc, rng, sp.jitter, sp.jitter, sp.jitter)
            if "lighting" in augment:
                hwc = aug.lighting(hwc, rng, sp.pca_noise)
            x = hwc.transpose(2, 0, 1)
        # (x - mean) / std as load_data's _normalize does it (float32, same two operations)
        np.subtract(x, self._m, out=out)
        out /= self._s
        return True


def take(x, idx):
    """Rows ``idx`` of ``x``: a view of them for a streamed split (no pixels read until it is
    indexed, so it can be read again batch by batch), a copy for a numpy array."""
    return x.subset(idx) if getattr(x, "is_streamed", False) else x[idx]


def decode_throughput(x, workers, n=512):
    """Images per second that ``x[idx]`` decodes with ``workers`` threads (for ``bench/scale.py``).

    Parameters
    ----------
    x : StreamedImages
    workers : int
        Decode threads (0: the calling thread).
    n : int
        How many images (the first ``n`` of ``x``), decoded in batches of 64 after a warm-up.

    Returns
    -------
    float
    """
    n = min(int(n), len(x))
    if n == 0:
        return 0.0
    view = x.with_spec(workers=workers)
    view[np.arange(min(8, n))]                    # threads started, files opened
    t0 = time.perf_counter()
    for i in range(0, n, 64):
        view[np.arange(i, min(i + 64, n))]
    return n / max(time.perf_counter() - t0, 1e-9)
