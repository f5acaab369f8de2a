"""Teacher outputs for a training batch: computed live, or once and reused every epoch.

When the train transform is deterministic (no ``data.augment``), the frozen teacher gives the
same logits and tapped features for an image every epoch, so they are computed once over the
train split and sliced per batch: in memory, or in a bounded on-disk memmap when they are
large. With random augmentation the teacher must see each augmented batch: it runs live.

Outputs kept in memory are also shared between runs (:class:`SharedCache`, in the system temp
folder, keyed by the teacher's and the images' content): every student of one teacher on one
train split (a sweep, ``distill compare``, a bench) pays the teacher's pass once. The teacher's
top-1 on a val split is kept there too. Only in-memory splits are keyed: a streamed split
(RecordIO, image folders) would need an extra read of every image to be looked up.

Recipe switches: ``trainer.teacher_cache: auto | memory | disk | off``,
``trainer.teacher_cache_shared: true | false``.
"""
import hashlib
import json
import logging
import os
import shutil
import tempfile

import mxnet as mx
import numpy as np
from tqdm import tqdm

from .errors import UserError

__all__ = ["TeacherOutputs", "SharedCache", "shared_dir", "digest", "split_batches"]
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
    shared : SharedCache, optional
        In memory mode with an in-memory ``train_x``: outputs are looked up there first (by the
        teacher's :meth:`~distill.teacher.Teacher.digest` and the images) and stored there
        after they are computed. ``reused`` says which happened.
    """

    def __init__(self, teacher, train_x, mode="auto", augmented=False, cache_dir=None,
                 max_memory_mb=2048, batch_size=256, progress=True, shared=None):
        self.teacher = teacher
        self.reused = False
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
        key = None
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
            if shared is not None and shared.enabled and isinstance(train_x, np.ndarray):
                key = digest("teacher-outputs", teacher.digest(), split_batches(train_x))
                stored = shared.load_arrays(key, len(shapes))
                if stored is not None and [a.shape for a in stored] == [(n,) + s for s in shapes]:
                    self.arrays, self.reused, self.megabytes = stored, True, total_mb
                    return
            self.arrays = [np.empty((n,) + s, np.float32) for s in shapes]
        for i in tqdm(range(0, n, batch_size), desc="teacher outputs (cached once)", leave=False,
                      disable=None if progress else True):
            outs = teacher.outputs(mx.nd.array(train_x[i:i + batch_size]))
            for arr, o in zip(self.arrays, outs):
                arr[i:i + batch_size] = o.asnumpy()
        if key is not None:
            shared.store_arrays(key, self.arrays)
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


# -- shared across runs: content-keyed, in the system temp folder ------------------------------

#: bump when what a cache entry holds changes meaning (a key then never matches an old entry)
CACHE_FORMAT = 1
#: the shared folder keeps at most this many MiB of entries, the least recently used go first
SHARED_MAX_MB = 4096


def shared_dir():
    """The per-user folder of :class:`SharedCache`: ``$DISTILL_CACHE_DIR`` or
    ``<system temp>/distill-cache-<uid>``, created mode 0700. ``None`` (no sharing) when it
    cannot be made or is not this user's own private folder."""
    path = os.environ.get("DISTILL_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"distill-cache-{os.getuid()}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError:
        return None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        _LOGGER.warning("teacher cache: %s is not a private folder of this user: not shared", path)
        return None
    return path


def digest(*parts):
    """A hex digest of ``parts``: strings, bytes, numpy arrays (shape, dtype and bytes) or
    iterables of arrays (a split's images read batch by batch, never whole)."""
    h = hashlib.sha256(f"distill-cache-{CACHE_FORMAT}".encode())
    for part in parts:
        if isinstance(part, str):
            part = part.encode()
        if isinstance(part, bytes):
            h.update(b"\0s" + part)
            continue
        for a in ([part] if isinstance(part, np.ndarray) else part):
            a = np.ascontiguousarray(a)
            h.update(b"\0a" + str((a.shape, a.dtype.str)).encode() + a.tobytes())
    return h.hexdigest()[:32]


def split_batches(x, batch_size=1024):
    """The images of a split ``x`` (array or lazy array), ``batch_size`` at a time."""
    for i in range(0, len(x), batch_size):
        yield np.asarray(x[i:i + batch_size], np.float32)


class SharedCache:
    """What a frozen teacher computes on given images, kept between runs: the teacher's outputs
    on a train split (``.npy`` files) and its top-1 on a val split (``evals.json``).

    Every entry is keyed by the content it was computed from (:func:`digest` of the teacher's
    graph and parameters and of the images, so a retrained teacher or an edited image never
    hits an old entry), written to a temporary name and renamed into place (two runs writing
    one key both write the same bytes), and dropped least-recently-used first beyond
    :data:`SHARED_MAX_MB`. Lives in :func:`shared_dir`; a damaged entry is recomputed."""

    def __init__(self, path=None):
        self.path = path if path is not None else shared_dir()

    @property
    def enabled(self):
        return self.path is not None

    def load_arrays(self, key, count):
        """The ``count`` arrays stored under ``key``, or ``None``."""
        d = os.path.join(self.path, "outputs-" + key)
        try:
            arrays = [np.load(os.path.join(d, f"out{i}.npy")) for i in range(count)]
            os.utime(d)
        except (OSError, ValueError) as e:
            if os.path.isdir(d):
                _LOGGER.warning("teacher cache: %s is damaged (%s): computing it again", d, e)
                shutil.rmtree(d, ignore_errors=True)
            return None
        return arrays

    def store_arrays(self, key, arrays):
        """Store ``arrays`` under ``key`` (atomically; a full disk only skips the store)."""
        final = os.path.join(self.path, "outputs-" + key)
        if os.path.isdir(final):
            return
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=self.path)
        try:
            for i, a in enumerate(arrays):
                np.save(os.path.join(tmp, f"out{i}.npy"), a)
            os.replace(tmp, final)
        except OSError as e:
            _LOGGER.info("teacher cache: not stored in %s (%s)", self.path, e)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._trim()

    def get_value(self, key):
        """The JSON value stored under ``key`` in ``evals.json``, or ``None``."""
        return _read_evals(self.path).get(key)

    def put_value(self, key, value):
        path = os.path.join(self.path, "evals.json")
        data = _read_evals(self.path)
        data.pop(key, None)
        data[key] = value                 # newest last: the oldest go first beyond 1,000
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.path)
            with os.fdopen(fd, "w") as f:
                json.dump(dict(list(data.items())[-1000:]), f)
            os.replace(tmp, path)
        except OSError as e:
            _LOGGER.info("teacher cache: not stored in %s (%s)", self.path, e)

    def _trim(self):
        entries = []
        for name in os.listdir(self.path):
            d = os.path.join(self.path, name)
            if name.startswith("outputs-") and os.path.isdir(d):
                size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
                entries.append((os.path.getmtime(d), size, d))
        total = sum(s for _, s, _ in entries)
        for _, size, d in sorted(entries):
            if total <= SHARED_MAX_MB * 2**20:
                break
            shutil.rmtree(d, ignore_errors=True)
            total -= size


def _read_evals(path):
    try:
        with open(os.path.join(path, "evals.json")) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
