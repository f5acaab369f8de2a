"""``recordio``: MXNet ``.rec`` files as written by ``im2rec.py`` (with or without ``.idx``).

Where the files are, in order of precedence:

- ``data.train`` (and optionally ``data.val``): ``.rec`` files (or prefixes without ``.rec``);
- ``data.root`` a folder holding ``train.rec`` and optionally ``val.rec``;
- ``data.root`` a prefix ``PREFIX`` (``PREFIX.rec``).

The ``.idx`` next to a ``.rec`` gives the record order and offsets. Without one, the ``.rec`` is
indexed by one sequential pass over its record headers (offsets kept in memory, nothing
written; logged). At start only the record headers are read (labels, offsets), never the
images.

Labels are the first value of each record header (float in the file, must be a whole number
≥ 0); the number of classes is the largest label + 1. Records without an image payload whose
header has ``flag > 0`` are metadata (insightface's header record 0 and its identity records):
they are left out, and logged once with their count; they are not unreadable images.
Without a val file the train records are split by ``data.val_split`` (stratified, ``seed``).

Streamed (the default, ``data.stream`` unset or true): the splits are
:class:`~distill.data.stream.StreamedImages` over the records. With ``data.grayscale`` or
``data.image_size`` unset, the loader decodes a *probe*: the first readable record of each
class in each file (at most 8 tries per class). The channels are 1 when every probed image is
gray, and the probed images must have one size (else the error asks for ``data.image_size``);
a later image of another colour type is converted, one of another size is resized (a warning
names it). An unreadable record reads as zeros and is counted once (``data.skip_corrupt``).
``data.stream: false`` decodes every record into memory as before (unreadable records are
left out).

In a ``dist_*`` run, worker ``part_index`` of ``num_parts`` keeps its part of the train records:
the ``part_index``-th of ``num_parts`` contiguous runs of image records, the sharding MXNet's
record readers do (``ImageRecordIter(part_index=..., num_parts=...)``), here by record rather
than by byte. Without a val file the stratified split is made over every record's label first
(the same on every worker), then each worker keeps its part of the train side.

Recipe example::

    data: {name: recordio, root: data/cifar_rec, mean: [0.49, 0.48, 0.45], std: [0.25, 0.24, 0.26]}
"""
import logging
import os
import struct
import threading
import time

import cv2
import numpy as np

from ..errors import UserError
from .base import DATASETS, SourceData, stratified_split
from .images import assemble, decode_all, parse_image_size, target_channels
from .stream import ImageSource, StreamedImages, TransformSpec

__all__ = ["load_recordio", "read_records", "RecordFile", "RecordSource"]
_LOGGER = logging.getLogger(__name__)

_MAGIC = 0xCED7230A                    # dmlc-core recordio.h kMagic
_IR = struct.Struct("IfQQ")            # mx.recordio._IR_FORMAT: flag, label, id, id2
_FIX = "Re-pack it with im2rec.py (records must hold encoded images)."
_PROBE_TRIES = 8


def _rec_pair(path, key):
    """``(rec, idx or None)`` for a ``.rec`` path or a prefix; UserError if the .rec is missing."""
    rec = path if path.endswith(".rec") else path + ".rec"
    idx = rec[:-len(".rec")] + ".idx"
    if not os.path.isfile(rec):
        raise UserError(f"recordio: `{key}` names {rec}, which does not exist (looked in "
                        f"{os.path.abspath(rec)}).")
    return rec, (idx if os.path.isfile(idx) else None)


def _resolve(cfg):
    """``((train_rec, train_idx), (val_rec, val_idx) or None)``; an idx is None when missing."""
    if cfg.train:
        return _rec_pair(cfg.train, "data.train"), (_rec_pair(cfg.val, "data.val") if cfg.val else None)
    if not cfg.root:
        raise UserError("recordio: set `data.root` (a folder with train.rec and optionally "
                        "val.rec, or a PREFIX of PREFIX.rec), or `data.train` (and `data.val`) "
                        "to .rec files.")
    root = cfg.root
    if os.path.isdir(root):
        train = os.path.join(root, "train.rec")
        if not os.path.isfile(train):
            found = sorted(f for f in os.listdir(root) if f.endswith(".rec"))
            listing = f" It holds: {', '.join(found)}." if found else " It holds no .rec files."
            raise UserError(f"recordio: `data.root` {root} is a folder without train.rec.{listing} "
                            f"Name the files train.rec/val.rec, or set `data.train`/`data.val`.")
        val = os.path.join(root, "val.rec")
        return (_rec_pair(train, "data.root"),
                _rec_pair(val, "data.root") if os.path.isfile(val) else None)
    return _rec_pair(root, "data.root"), None


def _decode(payload):
    """cv2-decode an encoded image: ``(H, W)`` gray or ``(H, W, 3)`` RGB, native bit depth."""
    if not payload:
        return None
    img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        return None
    if img.ndim == 3:
        if img.shape[2] == 1:
            return img[:, :, 0]
        code = cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB
        return cv2.cvtColor(img, code)
    return img


def _read_idx(idx):
    """Keys and offsets of an ``.idx`` (``key<TAB>offset`` lines, as MXIndexedRecordIO reads)."""
    keys, offsets = [], []
    with open(idx) as f:
        for n, line in enumerate(f, 1):
            parts = line.strip().split("\t")
            if parts == [""]:
                continue
            try:
                keys.append(int(parts[0]))
                offsets.append(int(parts[1]))
            except (ValueError, IndexError):
                raise UserError(f"recordio: {idx} line {n} is not `key<TAB>offset` ({line.strip()!r}); "
                                f"rebuild it with MXNet's tools/rec2idx.py, or delete it (the .rec "
                                f"is then indexed by a scan).") from None
    return keys, offsets


class RecordFile:
    """The records of one ``.rec``: keys, offsets and labels read once; images read on demand.

    Parameters
    ----------
    rec : str
        The ``.rec`` path.
    idx : str or None
        Its ``.idx``; None: the file is indexed by scanning its record headers (nothing is
        written).

    Attributes
    ----------
    keys : np.ndarray
        int64 record keys of the image records (the ``.idx`` keys; file order numbers when
        scanned), in ``.idx`` (or file) order.
    labels : np.ndarray
        float64 first header value of each image record.
    n_meta : int
        Records left out as metadata (``flag > 0``, no payload).
    """

    def __init__(self, rec, idx=None):
        self.rec, self.idx = rec, idx
        t0 = time.time()
        if idx:
            keys, offsets = _read_idx(idx)
        else:
            keys, offsets = None, None
        k, off, lab, ln, flg, multi = self._scan(keys, offsets)
        meta = (flg > 0) & (ln == 0)
        self.n_meta = int(meta.sum())
        keep = ~meta
        self.keys, self.offsets, self.labels = k[keep], off[keep], lab[keep]
        self._lengths, self._flags, self._multi = ln[keep], flg[keep], multi[keep]
        self._lock = threading.Lock()
        self._fd, self._pid, self._reader = None, None, None
        if not idx:
            _LOGGER.info("recordio: %s has no .idx: indexed its %d records by a scan of their "
                         "headers in %.1f s (offsets kept in memory, nothing written)",
                         rec, len(k), time.time() - t0)
        if self.n_meta:
            _LOGGER.info("recordio: %s: left out %d metadata record(s) without an image (header "
                         "flag > 0, empty payload: e.g. insightface's header and identity "
                         "records); %d image records", rec, self.n_meta, len(self.keys))

    def __len__(self):
        return len(self.keys)

    def name(self, i):
        """``"<rec> record <key>"`` of image record ``i``."""
        return f"{self.rec} record {int(self.keys[i])}"

    def _scan(self, keys, offsets):
        """Walk the record headers (at ``offsets``, or every record in file order)."""
        rec = self.rec
        size = os.path.getsize(rec)
        out_k, out_off, out_lab, out_len, out_flag, out_multi = [], [], [], [], [], []
        with open(rec, "rb") as f:
            pos, i = 0, 0
            while True:
                if offsets is None:
                    if pos >= size:
                        break
                    at = pos
                else:
                    if i >= len(offsets):
                        break
                    at = offsets[i]
                where = f"record {keys[i]}" if keys is not None else f"the record at byte {at}"
                f.seek(at)
                head = f.read(8 + _IR.size + 4)
                if len(head) < 8 or struct.unpack("<I", head[:4])[0] != _MAGIC:
                    raise UserError(
                        f"recordio: {rec} is damaged or not a RecordIO file: {where} does not "
                        f"start with the RecordIO magic number"
                        + (f" (is {self.idx} the index of this .rec? rebuild it with MXNet's "
                           f"tools/rec2idx.py or delete it)" if self.idx else "") + ".")
                lrec = struct.unpack("<I", head[4:8])[0]
                cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
                nxt = at + 8 + ((length + 3) & ~3)
                if length < _IR.size:
                    raise UserError(f"recordio: {rec} {where} has {length} bytes, too few for "
                                    f"an image record header; {_FIX}")
                flag, label = _IR.unpack(head[8:8 + _IR.size])[:2]
                if flag > 0:
                    label = (struct.unpack("<f", head[8 + _IR.size:12 + _IR.size])[0]
                             if length >= _IR.size + 4 else float("nan"))
                total = length
                while cflag in (1, 2):               # a record split where its data held the magic
                    f.seek(nxt)
                    h2 = f.read(8)
                    if len(h2) < 8:
                        raise UserError(f"recordio: {rec} ends inside {where}; the file is truncated.")
                    l2 = struct.unpack("<I", h2[4:8])[0]
                    cflag, part = l2 >> 29, l2 & ((1 << 29) - 1)
                    total += 4 + part                # the reader puts the magic back between parts
                    nxt += 8 + ((part + 3) & ~3)
                out_k.append(keys[i] if keys is not None else i)
                out_off.append(at)
                out_lab.append(label)
                out_len.append(total - _IR.size - 4 * flag)
                out_flag.append(flag)
                out_multi.append(total != length)
                pos, i = nxt, i + 1
        return (np.array(out_k, np.int64), np.array(out_off, np.int64),
                np.array(out_lab, np.float64), np.array(out_len, np.int64),
                np.array(out_flag, np.int64), np.array(out_multi, bool))

    def payload(self, i):
        """The encoded image bytes of image record ``i`` (thread-safe)."""
        if os.getpid() != self._pid:                 # opened lazily, again after a fork
            with self._lock:
                if os.getpid() != self._pid:
                    self._fd, self._reader, self._pid = os.open(self.rec, os.O_RDONLY), None, os.getpid()
        skip = _IR.size + 4 * int(self._flags[i])
        if not self._multi[i]:
            # pread: positional, no shared file pointer, so threads need no lock
            length = int(self._lengths[i]) + skip
            return os.pread(self._fd, length, int(self.offsets[i]) + 8)[skip:]
        with self._lock:                             # MXNet's reader re-joins the parts
            if self._reader is None:
                import mxnet as mx
                self._reader = mx.recordio.MXRecordIO(self.rec, "r")
            import ctypes
            from mxnet.base import _LIB, check_call
            check_call(_LIB.MXRecordIOReaderSeek(self._reader.handle,
                                                 ctypes.c_size_t(int(self.offsets[i]))))
            return self._reader.read()[skip:]

    def __getstate__(self):                      # picklable: the reader is reopened lazily
        d = dict(self.__dict__)
        d.update(_lock=None, _fd=None, _pid=None, _reader=None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def __del__(self):
        try:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
        except Exception:   # interpreter shutdown  # noqa: BLE001
            pass


class RecordSource(ImageSource):
    """:class:`~distill.data.stream.ImageSource` over the image records of a :class:`RecordFile`."""

    def __init__(self, rf, skip_corrupt=True):
        super().__init__("recordio", rf.keys, skip_corrupt, _FIX)
        self.rf = rf

    def name(self, i):
        return self.rf.name(i)

    def decode(self, i):
        return _decode(self.rf.payload(i))


def read_records(rf, select=None):
    """Yield ``(name, label, payload)`` for every image record of a :class:`RecordFile`.

    ``label`` is the first header value as a float; ``name`` is ``"<rec> record <key>"``.
    ``select``: a set of record positions (0-based, image records in order) whose payload is
    read; the others yield ``None`` as payload.
    """
    for i in range(len(rf)):
        keep = select is None or i in select
        yield rf.name(i), float(rf.labels[i]), (rf.payload(i) if keep else None)


def _labels(raw, names):
    out = np.empty(len(raw), np.int32)
    for i, (lab, name) in enumerate(zip(raw, names)):
        if not (np.isfinite(lab) and lab >= 0 and abs(lab - round(lab)) < 1e-6):
            raise UserError(f"recordio: {name} has label {lab}; class labels must be whole "
                            f"numbers ≥ 0 (0 .. num_classes-1).")
        out[i] = int(round(lab))
    return out


def _file_labels(rf):
    return _labels(rf.labels, [rf.name(i) for i in range(len(rf))])


def _open(cfg):
    """``(train RecordFile, val RecordFile or None)``."""
    (train_rec, train_idx), val = _resolve(cfg)
    tf = RecordFile(train_rec, train_idx)
    if len(tf) == 0:
        raise UserError(f"recordio: {train_rec} holds no image records.")
    return tf, (RecordFile(*val) if val else None)


@DATASETS.register("recordio")
def load_recordio(cfg, seed, part_index=0, num_parts=1):
    """Load a ``recordio`` dataset.

    Parameters
    ----------
    cfg : DataConfig
        Uses ``root``/``train``/``val``, ``val_split``, ``grayscale``, ``image_size``,
        ``skip_corrupt``, ``stream`` and the decoding keys (``val_resize``, ``workers``, ...).
    seed : int
        Seed of the stratified split when there is no val file.
    part_index, num_parts : int
        Keep only train part ``part_index`` of ``num_parts`` (see the module docstring).

    Returns
    -------
    SourceData
        Channels and size already as the config asks; ``sharded`` when ``num_parts > 1``;
        ``x_train``/``x_val`` are :class:`~distill.data.stream.StreamedImages` unless
        ``data.stream`` is false.
    """
    tf, vf = _open(cfg)
    if cfg.stream is False:
        if num_parts > 1:
            return _load_part(cfg, seed, tf, vf, part_index, num_parts)
        return _load_memory(cfg, seed, tf, vf)
    return _load_streamed(cfg, seed, tf, vf, part_index, num_parts)


# load_data passes part_index / num_parts to this loader instead of slicing its result
load_recordio.reads_parts = True
# and leaves the images on disk (StreamedImages) unless data.stream is false
load_recordio.streams = True


def _probe(sides, grayscale, image_size):
    """Decode the first readable record of each class on each side (``[(source, positions,
    labels)]``) → ``(channels, size)``; see the module docstring."""
    probed = []
    for src, pos, labels in sides:
        for c in np.unique(labels):
            for p in pos[labels == c][:_PROBE_TRIES]:
                img = src.load(int(p))
                if img is not None:
                    probed.append((src.name(int(p)), img))
                    break
    if not probed:
        raise UserError(f"recordio: no record of {sides[0][0].rf.rec} could be decoded as an "
                        f"image (tried the first {_PROBE_TRIES} of each class). {_FIX}")
    size = parse_image_size(image_size)
    if size is None:
        first_name, first = probed[0]
        size = tuple(first.shape[:2])
        for name, im in probed:
            if tuple(im.shape[:2]) != size:
                raise UserError(
                    f"recordio: images have different sizes ({first_name} is {size[0]}×{size[1]}, "
                    f"{name} is {im.shape[0]}×{im.shape[1]}, height×width) and `data.image_size` "
                    f"is not set: set `data.image_size` to an integer or [height, width] so every "
                    f"image is resized to it.")
        for src, _, _ in sides:
            src.expect_size = size
    channels = target_channels(grayscale, all(im.ndim == 2 for _, im in probed))
    if grayscale is None or image_size is None:
        _LOGGER.info("recordio: %d probed image(s) (the first readable record of each class): "
                     "%d channel(s), %d×%d", len(probed), channels, size[0], size[1])
    return channels, size


def _load_streamed(cfg, seed, tf, vf, part_index, num_parts):
    """The streamed dataset: labels and positions in memory, images decoded on demand."""
    y_all = _file_labels(tf)
    src_t = RecordSource(tf, cfg.skip_corrupt)
    if vf is not None:
        y_val = _file_labels(vf)
        src_v = RecordSource(vf, cfg.skip_corrupt)
        tr, va = np.arange(len(tf)), np.arange(len(vf))
        where = tf.rec
    else:
        y_val, src_v = y_all, src_t
        tr, va = stratified_split(y_all, cfg.val_split, seed)
        where = f"{tf.rec} (stratified split, seed {seed})"
    if cfg.grayscale is None or cfg.image_size is None:
        sides = [(src_t, tr, y_all[tr]), (src_v, va, y_val[va])]
        channels, size = _probe(sides, cfg.grayscale, cfg.image_size)
    else:
        channels, size = (1 if cfg.grayscale else 3), parse_image_size(cfg.image_size)
    num_classes = int(max(y_all.max(), y_val.max() if len(y_val) else 0)) + 1
    if num_parts > 1:
        n = len(tf)
        lo, hi = n * part_index // num_parts, n * (part_index + 1) // num_parts
        tr = tr[(tr >= lo) & (tr < hi)]
        where = where.replace(tf.rec, f"{tf.rec} part {part_index + 1} of {num_parts} "
                                      f"(records {lo}..{hi - 1})", 1)
    spec = TransformSpec(channels=channels, size=size, val_resize=cfg.val_resize,
                         min_random_area=cfg.min_random_area, jitter=cfg.jitter,
                         pca_noise=cfg.pca_noise, workers=cfg.workers)
    return SourceData(x_train=StreamedImages(src_t, tr, spec), y_train=y_all[tr],
                      x_val=StreamedImages(src_v, va, spec), y_val=y_val[va],
                      class_names=[str(i) for i in range(num_classes)], skipped=0,
                      source=f"recordio: {len(tr)} images from {where}", sharded=num_parts > 1)


def _load_memory(cfg, seed, tf, vf):
    """``data.stream: false``: decode every record into one array (unreadable ones left out)."""
    what = "recordio"
    items = [(n, (lab, False), p) for n, lab, p in read_records(tf)]
    if vf is not None:
        items += [(n, (lab, True), p) for n, lab, p in read_records(vf)]
    images, names, tagged, bad = decode_all(items, _decode, cfg.skip_corrupt, what, _FIX)
    if not images:
        raise UserError(f"recordio: no record of {tf.rec} could be decoded as an image.")
    labels = _labels([lab for lab, _ in tagged], names)
    is_val = np.array([v for _, v in tagged], bool)
    x = assemble(images, names, cfg.grayscale, parse_image_size(cfg.image_size), what,
                 cfg.val_resize)
    num_classes = int(labels.max()) + 1
    if vf is not None:
        tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
        where = tf.rec
    else:
        tr, va = stratified_split(labels, cfg.val_split, seed)
        where = f"{tf.rec} (stratified split, seed {seed})"
    if len(tr) == 0:
        raise UserError(f"recordio: {tf.rec} has no readable image records.")
    return SourceData(x_train=x[tr], y_train=labels[tr], x_val=x[va], y_val=labels[va],
                      class_names=[str(i) for i in range(num_classes)], skipped=len(bad),
                      source=f"recordio: {len(tr)} images from {where}")


def _load_part(cfg, seed, tf, vf, part_index, num_parts):
    """:func:`_load_memory` for one worker: its contiguous part of the train records."""
    what = "recordio"
    n = len(tf)
    lo, hi = n * part_index // num_parts, n * (part_index + 1) // num_parts
    train_labels = _file_labels(tf)
    if vf is not None:
        mine, val_items = set(range(lo, hi)), list(read_records(vf))
        all_labels = np.concatenate([train_labels, _file_labels(vf)])
        where = f"{tf.rec} part {part_index + 1} of {num_parts} (records {lo}..{hi - 1})"
    else:
        all_labels = train_labels
        tr, va = stratified_split(all_labels, cfg.val_split, seed)
        mine = {int(i) for i in tr if lo <= i < hi}
        val_set = {int(i) for i in va}
        val_items = [(nm, lab, p) for i, (nm, lab, p) in
                     enumerate(read_records(tf, select=val_set)) if i in val_set]
        where = (f"{tf.rec} part {part_index + 1} of {num_parts} (records {lo}..{hi - 1}, "
                 f"stratified split, seed {seed})")
    items = [(nm, (lab, False), p) for i, (nm, lab, p) in
             enumerate(read_records(tf, select=mine)) if i in mine]
    items += [(nm, (lab, True), p) for nm, lab, p in val_items]
    images, names, tagged, bad = decode_all(items, _decode, cfg.skip_corrupt, what, _FIX)
    if not images:
        raise UserError(f"recordio: no record of {where} could be decoded as an image.")
    labels = _labels([lab for lab, _ in tagged], names)
    is_val = np.array([v for _, v in tagged], bool)
    x = assemble(images, names, cfg.grayscale, parse_image_size(cfg.image_size), what,
                 cfg.val_resize)
    tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(tr) == 0:
        raise UserError(f"recordio: {where} has no readable image records; use fewer workers.")
    num_classes = int(all_labels.max()) + 1          # from every record: the same on every worker
    return SourceData(x_train=x[tr], y_train=labels[tr], x_val=x[va], y_val=labels[va],
                      class_names=[str(i) for i in range(num_classes)], skipped=len(bad),
                      source=f"recordio: {len(tr)} images from {where}", sharded=True)
