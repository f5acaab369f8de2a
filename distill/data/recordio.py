"""``recordio``: MXNet ``.rec`` + ``.idx`` files as written by ``im2rec.py``.

Where the files are, in order of precedence:

- ``data.train`` (and optionally ``data.val``): ``.rec`` files (or prefixes without ``.rec``);
- ``data.root`` a folder holding ``train.rec``/``train.idx`` and optionally ``val.rec``/``val.idx``;
- ``data.root`` a prefix ``PREFIX`` (``PREFIX.rec`` + ``PREFIX.idx``).

Without a val file the train records are split by ``data.val_split`` (stratified, ``seed``).
Labels are the first value of each record header (float in the file, must be a whole number
≥ 0); the number of classes is the largest label + 1.

In a ``dist_*`` run, worker ``part_index`` of ``num_parts`` decodes only its part of the train
records: the ``part_index``-th of ``num_parts`` contiguous runs of records, the sharding MXNet's
record readers do (``ImageRecordIter(part_index=..., num_parts=...)``), here by record rather
than by byte. Without a val file the stratified split is made over every record's label first
(the same on every worker), then each worker keeps its part of the train side.

Recipe example::

    data: {name: recordio, root: data/cifar_rec, mean: [0.49, 0.48, 0.45], std: [0.25, 0.24, 0.26]}
"""
import logging
import os

import cv2
import numpy as np

from ..errors import UserError
from .base import DATASETS, SourceData, stratified_split
from .images import assemble, decode_all, parse_image_size

__all__ = ["load_recordio", "read_records"]
_LOGGER = logging.getLogger(__name__)


def _rec_pair(path, key):
    """``(rec, idx)`` for a ``.rec`` path or a prefix; UserError if either file is missing."""
    rec = path if path.endswith(".rec") else path + ".rec"
    idx = rec[:-len(".rec")] + ".idx"
    if not os.path.isfile(rec):
        raise UserError(f"recordio: `{key}` names {rec}, which does not exist (looked in "
                        f"{os.path.abspath(rec)}).")
    if not os.path.isfile(idx):
        raise UserError(
            f"recordio: {rec} has no index file {idx}; random access needs it. im2rec.py writes "
            f"the .idx next to the .rec when it packs images (`python im2rec.py PREFIX ROOT` after "
            f"`--list`; add `--pack-label` for multi-value labels); for an existing .rec, build it "
            f"with MXNet's tools/rec2idx.py: `python tools/rec2idx.py {rec} {idx}`.")
    return rec, idx


def _resolve(cfg):
    """``(train_rec, train_idx, val_pair or None)``."""
    if cfg.train:
        return _rec_pair(cfg.train, "data.train"), (_rec_pair(cfg.val, "data.val") if cfg.val else None)
    if not cfg.root:
        raise UserError("recordio: set `data.root` (a folder with train.rec/train.idx and "
                        "val.rec/val.idx, or a PREFIX of PREFIX.rec/PREFIX.idx), or `data.train` "
                        "(and `data.val`) to .rec files.")
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
    img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        return None
    if img.ndim == 3:
        if img.shape[2] == 1:
            return img[:, :, 0]
        code = cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB
        return cv2.cvtColor(img, code)
    return img


def read_records(rec, idx, select=None):
    """Yield ``(name, label, payload)`` for every record of an indexed ``.rec``.

    ``label`` is the first header value as a float; ``name`` is ``"<rec> record <key>"``.
    ``select``: a set of record positions (0-based, file order) whose payload is kept; the
    others yield ``None`` as payload (their labels are still read).
    """
    import mxnet as mx
    reader = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
    try:
        for i, key in enumerate(reader.keys):
            header, payload = mx.recordio.unpack(reader.read_idx(key))
            label = np.asarray(header.label, np.float64).reshape(-1)
            keep = select is None or i in select
            yield (f"{rec} record {key}", (float(label[0]) if label.size else float("nan")),
                   payload if keep else None)
    finally:
        reader.close()


def _labels(raw, names):
    out = np.empty(len(raw), np.int32)
    for i, (lab, name) in enumerate(zip(raw, names)):
        if not (np.isfinite(lab) and lab >= 0 and abs(lab - round(lab)) < 1e-6):
            raise UserError(f"recordio: {name} has label {lab}; class labels must be whole "
                            f"numbers ≥ 0 (0 .. num_classes-1).")
        out[i] = int(round(lab))
    return out


@DATASETS.register("recordio")
def load_recordio(cfg, seed, part_index=0, num_parts=1):
    """Load a ``recordio`` dataset.

    Parameters
    ----------
    cfg : DataConfig
        Uses ``root``/``train``/``val``, ``val_split``, ``grayscale``, ``image_size``,
        ``skip_corrupt``.
    seed : int
        Seed of the stratified split when there is no val file.
    part_index, num_parts : int
        Decode only train part ``part_index`` of ``num_parts`` (see the module docstring).

    Returns
    -------
    SourceData
        Channels and size already as the config asks; ``sharded`` when ``num_parts > 1``.
    """
    what = "recordio"
    (train_rec, train_idx), val = _resolve(cfg)
    if num_parts > 1:
        return _load_part(cfg, seed, train_rec, train_idx, val, part_index, num_parts)
    items = [(n, (lab, False), p) for n, lab, p in read_records(train_rec, train_idx)]
    if val:
        items += [(n, (lab, True), p) for n, lab, p in read_records(*val)]
    if not items:
        raise UserError(f"recordio: {train_rec} holds no records.")
    images, names, tagged, bad = decode_all(
        items, _decode, cfg.skip_corrupt, what,
        "Re-pack it with im2rec.py (records must hold encoded images).")
    if not images:
        raise UserError(f"recordio: no record of {train_rec} could be decoded as an image.")
    labels = _labels([lab for lab, _ in tagged], names)
    is_val = np.array([v for _, v in tagged], bool)
    x = assemble(images, names, cfg.grayscale, parse_image_size(cfg.image_size), what)
    num_classes = int(labels.max()) + 1
    if val:
        tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
        where = train_rec
    else:
        tr, va = stratified_split(labels, cfg.val_split, seed)
        where = f"{train_rec} (stratified split, seed {seed})"
    if len(tr) == 0:
        raise UserError(f"recordio: {train_rec} has no readable image records.")
    return SourceData(x_train=x[tr], y_train=labels[tr], x_val=x[va], y_val=labels[va],
                      class_names=[str(i) for i in range(num_classes)], skipped=len(bad),
                      source=f"recordio: {len(tr)} images from {where}")


# load_data passes part_index / num_parts to this loader instead of slicing its result
load_recordio.reads_parts = True


def _load_part(cfg, seed, train_rec, train_idx, val, part_index, num_parts):
    """:func:`load_recordio` for one worker: its contiguous part of the train records."""
    what = "recordio"
    heads = [(n, lab) for n, lab, _ in read_records(train_rec, train_idx, select=set())]
    if not heads:
        raise UserError(f"recordio: {train_rec} holds no records.")
    n = len(heads)
    lo, hi = n * part_index // num_parts, n * (part_index + 1) // num_parts
    if val:
        mine, val_items = set(range(lo, hi)), list(read_records(*val))
        all_labels = _labels([lab for _, lab in heads] + [lab for _, lab, _ in val_items],
                             [nm for nm, _ in heads] + [nm for nm, _, _ in val_items])
        where = f"{train_rec} part {part_index + 1} of {num_parts} (records {lo}..{hi - 1})"
    else:
        all_labels = _labels([lab for _, lab in heads], [nm for nm, _ in heads])
        tr, va = stratified_split(all_labels, cfg.val_split, seed)
        mine = {int(i) for i in tr if lo <= i < hi}
        val_set = {int(i) for i in va}
        val_items = [(nm, lab, p) for i, (nm, lab, p) in
                     enumerate(read_records(train_rec, train_idx, select=val_set)) if i in val_set]
        where = (f"{train_rec} part {part_index + 1} of {num_parts} (records {lo}..{hi - 1}, "
                 f"stratified split, seed {seed})")
    items = [(nm, (lab, False), p) for i, (nm, lab, p) in
             enumerate(read_records(train_rec, train_idx, select=mine)) if i in mine]
    items += [(nm, (lab, True), p) for nm, lab, p in val_items]
    images, names, tagged, bad = decode_all(
        items, _decode, cfg.skip_corrupt, what,
        "Re-pack it with im2rec.py (records must hold encoded images).")
    if not images:
        raise UserError(f"recordio: no record of {where} could be decoded as an image.")
    labels = _labels([lab for lab, _ in tagged], names)
    is_val = np.array([v for _, v in tagged], bool)
    x = assemble(images, names, cfg.grayscale, parse_image_size(cfg.image_size), what)
    tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(tr) == 0:
        raise UserError(f"recordio: {where} has no readable image records; use fewer workers.")
    num_classes = int(all_labels.max()) + 1          # from every record: the same on every worker
    return SourceData(x_train=x[tr], y_train=labels[tr], x_val=x[va], y_val=labels[va],
                      class_names=[str(i) for i in range(num_classes)], skipped=len(bad),
                      source=f"recordio: {len(tr)} images from {where}", sharded=True)
