"""Datasets: ``load_data(cfg, seed)`` → a :class:`DataBundle` of float32 ``(N, C, H, W)`` arrays.

Every dataset is one file registered on :data:`DATASETS` under the name a recipe writes in
``data.name`` (``mnist5k``, ``digits``, ``synthetic``, ``image_folder``, ``recordio``). A loader
returns pixels in [0, 1]; the steps below are shared, in this order:

1. channels (``data.grayscale``: True → 1, False → 3) and bilinear resize (``data.image_size``);
2. ``data.limit``: keep a class-balanced, deterministic subset of the train images;
3. ``(x - mean) / std`` per channel (``data.mean``/``data.std``; one value is broadcast);
4. ``data.labels: false`` drops the train labels (label-free distillation).

A split left without images (train, or val: a class gives val an image only when it has two or
more) is refused here, with the counts and the key to change, before anything trains: an empty
batch would otherwise reach a hybridized graph and die in MXNet (``Cannot find attribute
forward_mem_plan``). One image is enough for either split: the trainer trains a train split
smaller than ``trainer.batch_size`` as one smaller batch, and drops a last partial batch only
when there is a full one.

``recordio`` and ``image_folder`` are *streamed* (unless ``data.stream: false``): their
``Split.x`` is a :class:`~distill.data.stream.StreamedImages` that decodes the rows it is
indexed with, so the dataset is never held in memory; the steps above are then made on
positions and labels (steps 1 and 3 are part of its decoding). Labels stay in memory. The
bundled small sets (``mnist5k``, ``digits``, ``synthetic``, ``fashion_mnist``) are numpy arrays
(``data.stream: true`` on them only logs a warning). ``bundle.skipped`` counts unreadable
images, and for a streamed set it grows as images are read.

In a ``dist_*`` run (``distill launch``) worker ``part_index`` of ``num_parts`` keeps its shard of
the train split after step 2 (:func:`distill.distributed.shard_indices`: every ``num_parts``-th
image, the same count on every worker; ``data.limit`` stays the total over all workers). A
loader marked ``reads_parts`` (``recordio``) reads only its part itself. The val split is whole
on every worker.

Recipe example::

    data: {name: mnist5k, mean: [0.1307], std: [0.3081], limit: 1000}
"""
import logging

import numpy as np

from ..distributed import shard_indices
from ..errors import UserError
from .base import DATASETS, DataBundle, SourceData, Split, balanced_subset, stratified_split
from .images import conform, parse_image_size
from .stream import StreamedImages, decode_throughput, take
# Importing the loader modules registers them on DATASETS.
from . import digits, fashion_mnist, image_folder, mnist5k, recordio, synthetic  # noqa: F401  (registration)

__all__ = ["load_data", "DATASETS", "DataBundle", "Split", "SourceData", "stratified_split",
           "balanced_subset", "per_channel", "StreamedImages", "decode_throughput", "take"]
_LOGGER = logging.getLogger(__name__)


def per_channel(values, channels, key, default):
    """``values`` as ``channels`` floats: None → ``default``, one value → broadcast.

    Raises
    ------
    UserError
        When the count is neither 1 nor ``channels``; the message names ``key``.
    """
    if values is None:
        return [float(default)] * channels
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise UserError(f"`{key}` has {len(values)} values {values} but the data has {channels} "
                        f"channel(s): give one value, or one per channel.")
    return values


def _normalize(x, mean, std):
    if getattr(x, "is_streamed", False):
        return x.with_spec(mean=tuple(mean), std=tuple(std))
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x - m) / s, dtype=np.float32)


def _check_split_sizes(cfg, n_train, n_val, src, limit, part_index, num_parts):
    """Refuse a train or val split with no images (this worker's train shard in a ``dist_*`` run);
    the message gives the counts and what to change."""
    if n_train and n_val:
        return
    k = len(src.class_names)
    shard = f", worker {part_index + 1} of {num_parts}" if num_parts > 1 else ""
    counts = f"{n_train} train{shard} / {n_val} val images, {k} classes"
    if not n_val:
        ys = [np.asarray(y) for y in (src.y_train, src.y_val) if y is not None and len(y)]
        biggest = int(np.bincount(np.concatenate(ys)).max()) if ys else 0
        fix = {"synthetic": f"raise `data.num_samples` (now {cfg.num_samples}) to at least "
                            f"2 × `data.num_classes` = {2 * k}, or lower `data.num_classes`",
               "image_folder": "add images (at least 2 per class), or give a separate val folder "
                               "(`data.val`)",
               "recordio": "add records (at least 2 per class), or give a separate val file "
                           "(`data.val`)"}.get(cfg.name, "add images (at least 2 per class)")
        raise UserError(
            f"data {cfg.name}: the val split has no images ({counts}), so nothing could be "
            f"evaluated. `data.val_split` ({cfg.val_split}) sends that share of each class to val, "
            f"but only from classes with at least 2 images, and the largest class here has "
            f"{biggest}. To fix it, {fix}.")
    fixes = []
    if limit is not None:
        fixes.append(f"raise `data.limit` (now {cfg.limit})")
    if num_parts > 1:
        fixes.append("use fewer workers (`distill launch -n`)")
    fixes += [f"lower `data.val_split` (now {cfg.val_split})", "add images"]
    raise UserError(f"data {cfg.name}: the train split has no images ({counts}), so nothing "
                    f"could be trained. To fix it, {', '.join(fixes[:-1])} or {fixes[-1]}.")


def load_data(cfg, seed=0, part_index=0, num_parts=1):
    """Load the dataset ``cfg.name`` and apply the common steps.

    Parameters
    ----------
    cfg : DataConfig
        The ``data:`` section of a recipe.
    seed : int
        Seed for generated data and for splits that depend on it (``synthetic``, and
        ``image_folder``/``recordio`` without a val folder/file). ``mnist5k`` and ``digits``
        use fixed splits.
    part_index, num_parts : int
        This worker's shard of the train split (rank, workers); ``0, 1``: all of it.

    Returns
    -------
    DataBundle
        ``train.x``/``val.x`` float32 C-contiguous ``(N, C, H, W)`` (a
        :class:`~distill.data.stream.StreamedImages` for a streamed set); ``train.y``/``val.y``
        int32 ``(N,)`` (``train.y`` is None when ``cfg.labels`` is false).

    Raises
    ------
    UserError
        Unknown ``data.name``, bad ``data.mean``/``data.std`` count, a problem with the
        files (the message names the path), or a train or val split with no images.
    """
    cfg.validate("data")
    loader = DATASETS.get(cfg.name, where="data.name")
    if cfg.stream and not getattr(loader, "streams", False):
        _LOGGER.warning("data %s: `data.stream: true` has no effect here: %s is a small bundled "
                        "set, held in memory anyway", cfg.name, cfg.name)
    if num_parts > 1 and getattr(loader, "reads_parts", False):
        src = loader(cfg, seed, part_index=part_index, num_parts=num_parts)
    else:
        src = loader(cfg, seed)

    c_native = src.x_train.shape[1]
    channels = c_native if cfg.grayscale is None else (1 if cfg.grayscale else 3)
    size = parse_image_size(cfg.image_size) or tuple(src.x_train.shape[2:])
    x_tr = conform(src.x_train, channels, size)
    x_va = conform(src.x_val, channels, size)
    y_tr, y_va = src.y_train, src.y_val
    source = src.source

    limit = cfg.limit // num_parts if (cfg.limit is not None and src.sharded) else cfg.limit
    if limit is not None and limit < len(y_tr):
        keep = balanced_subset(y_tr, limit)
        x_tr, y_tr = take(x_tr, keep), y_tr[keep]
        _LOGGER.info("%s: data.limit keeps %d of %d train images (class-balanced)",
                     cfg.name, len(keep), len(src.y_train))
        source += f", limited to {len(keep)} (class-balanced)"
    if num_parts > 1 and not src.sharded:
        keep = shard_indices(len(y_tr), part_index, num_parts)
        x_tr, y_tr = take(x_tr, keep), y_tr[keep]
        source += f", shard {part_index + 1} of {num_parts} ({len(keep)} images)"

    _check_split_sizes(cfg, len(x_tr), len(x_va), src, limit, part_index, num_parts)
    mean = per_channel(cfg.mean, channels, "data.mean", 0.0)
    std = per_channel(cfg.std, channels, "data.std", 1.0)
    train = Split(x=_normalize(x_tr, mean, std),
                  y=np.ascontiguousarray(y_tr, np.int32) if cfg.labels else None)
    val = Split(x=_normalize(x_va, mean, std),
                y=np.ascontiguousarray(y_va, np.int32) if y_va is not None else None)
    select = None
    if src.x_select is not None:
        select = Split(x=_normalize(conform(src.x_select, channels, size), mean, std),
                       y=np.ascontiguousarray(src.y_select, np.int32))
    bundle = DataBundle(name=cfg.name, train=train, val=val, num_classes=len(src.class_names),
                        channels=channels, image_size=tuple(int(s) for s in size),
                        class_names=list(src.class_names), mean=mean, std=std,
                        calib_source=source, skipped=src.skipped, select=select,
                        augment_options={"min_random_area": cfg.min_random_area,
                                         "jitter": cfg.jitter, "pca_noise": cfg.pca_noise})
    # debug: each command prints its own line on the split it uses (with the shard, the test set)
    skipped = bundle.skipped_count()
    _LOGGER.debug("data %s: %d train / %d val images, %d classes, %d×%d×%d%s%s", cfg.name,
                  len(train), len(val), bundle.num_classes, channels, size[0], size[1],
                  f", {skipped} unreadable skipped" if skipped else "",
                  ", streamed" if getattr(train.x, "is_streamed", False) else "")
    return bundle
