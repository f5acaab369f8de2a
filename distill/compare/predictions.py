"""Per-image predictions of a comparison's runs, cached, and the paired figures of its ``pairs``.

For each run of a paired variant, the model (fp32 ``model`` pair, or with ``:int8`` the
``model-int8`` pair of ``distill quantize``) classifies the run's validation split (``data.val``,
loaded from the run's resolved recipe: for ``fashion_mnist`` the 10,000 test images), batch by
batch, the way the run measured its own top-1 (fp32 as ``train`` evaluates the exported pair,
int8 hybridized as ``distill quantize`` evaluates its export, both at
``trainer.eval_batch_size``). The predicted classes are cached in the comparison's folder::

    <out>/predictions/<run-folder>.npz         pred (int16/int32), labels, stamp
    <out>/predictions/<run-folder>-int8.npz

``stamp`` is the size and modification time (ns) of the model's params file: a retrained or
re-quantized run is predicted again, anything else is read back.

The statistics themselves are :mod:`distill.compare.stats`.
"""
import dataclasses
import io
import json
import logging
import os

import numpy as np

from ..checkpoint import atomic_write_bytes
from ..errors import UserError
from ..graphio import pair_exists, pair_files
from ..recipe import recipe_from_dict
from ..runfolder import INT8_SUFFIX, METRICS_FILE
from .stats import pair_result

__all__ = ["PREDICTIONS_DIR", "prediction_path", "params_stamp", "read_cached", "predict_classes",
           "run_predictions", "pair_comparisons"]
_LOGGER = logging.getLogger(__name__)

PREDICTIONS_DIR = "predictions"
# DataConfig keys that change only the train split: runs that differ in them share val
_TRAIN_ONLY_KEYS = ("limit", "augment", "labels")


def prediction_path(out_dir, folder, int8=False):
    """``<out>/predictions/<run-folder>[-int8].npz``."""
    name = os.path.basename(os.path.normpath(folder.path)) + (INT8_SUFFIX if int8 else "")
    return os.path.join(out_dir, PREDICTIONS_DIR, name + ".npz")


def params_stamp(prefix):
    """``[size, mtime_ns]`` of the pair's params file (int64)."""
    st = os.stat(pair_files(prefix)[1])
    return np.array([st.st_size, st.st_mtime_ns], np.int64)


def read_cached(path, stamp):
    """``(pred, labels)`` from the cache file at ``path`` when its stamp is ``stamp``, else
    ``None`` (absent, stale or unreadable: predicted again)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as z:
            if not np.array_equal(z["stamp"], stamp):
                return None
            return z["pred"], z["labels"]
    except (OSError, ValueError, KeyError) as e:
        _LOGGER.warning("compare: %s is unreadable (%s); predicting again", path, e)
        return None


def _write_cache(path, pred, labels, stamp):
    buf = io.BytesIO()
    np.savez(buf, pred=pred, labels=labels, stamp=stamp)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def predict_classes(net, x, batch_size):
    """The predicted class of every image, batch by batch (only ``(batch, K)`` logits at a time).

    Parameters
    ----------
    net : gluon.Block
    x : np.ndarray, shape ``(N, C, H, W)``
    batch_size : int

    Returns
    -------
    np.ndarray, shape ``(N,)``, int32
    """
    from ..trainer import predict
    out = np.empty(len(x), np.int32)
    for i in range(0, len(x), batch_size):
        out[i:i + batch_size] = predict(net, x[i:i + batch_size], batch_size).argmax(1)
    return out


def _data_key(recipe):
    d = dataclasses.asdict(recipe.data)
    for k in _TRAIN_ONLY_KEYS:
        d.pop(k, None)
    # the seed stays in the key: synthetic data, and splits without a val folder, depend on it
    return json.dumps(d, sort_keys=True, default=str), int(recipe.trainer.seed)


class _ValSplits:
    """The val split of each data config (train-only keys left out) and seed, loaded once; only
    the newest is held (runs are visited grouped by it)."""

    def __init__(self):
        self.key, self.split = None, None

    def get(self, recipe):
        from ..data import load_data
        key = _data_key(recipe)
        if key != self.key:
            self.key, self.split = None, None         # free the previous one first
            bundle = load_data(recipe.data, seed=recipe.trainer.seed)
            if bundle.val.y is None:
                raise UserError(f"data {recipe.data.name}: the val split has no labels, so the "
                                f"paired tests have nothing to count; pair variants whose data has "
                                f"labelled val images.")
            self.key, self.split = key, bundle.val
        return self.split


def _recipe_of(folder):
    return recipe_from_dict(folder.read_recipe_dict(), folder.recipe_path)


def run_predictions(folder, int8, out_dir, vals=None, log=print):
    """``(pred, labels)`` of one run's fp32 (or int8) model on its val split, from the cache in
    ``out_dir`` when its stamp is the model's, else predicted and cached.

    Parameters
    ----------
    folder : RunFolder
    int8 : bool
        The run's ``model-int8`` pair instead of ``model``.
    out_dir : str
        The comparison's folder.
    vals : _ValSplits, optional
        Loaded val splits shared between calls.
    """
    from ..graphio import load_symbol_block
    prefix = folder.int8_prefix if int8 else folder.model_prefix
    if not pair_exists(prefix):
        fix = (f"run `distill quantize {folder.path}` (or give the variant `int8: true`)" if int8
               else f"finish the run (`distill train {folder.recipe_path} --resume`)")
        raise UserError(f"{folder.path} has no {'int8' if int8 else 'fp32'} model "
                        f"({pair_files(prefix)[1]}), which a pair needs: {fix}.")
    stamp = params_stamp(prefix)
    path = prediction_path(out_dir, folder, int8)
    cached = read_cached(path, stamp)
    if cached is not None:
        return cached
    recipe = _recipe_of(folder)
    split = (vals or _ValSplits()).get(recipe)
    log(f"compare: predicting {len(split)} images with {prefix}{' (int8)' if int8 else ''}")
    net = load_symbol_block(prefix)
    if int8:                 # as distill quantize evaluates its export: hybridized, static shapes
        net.hybridize(static_alloc=True, static_shape=True)
    pred = predict_classes(net, split.x, recipe.trainer.eval_batch_size)
    pred = pred.astype(np.int16 if pred.max(initial=0) < 2 ** 15 else np.int32)
    labels = np.asarray(split.y, np.int32)
    _write_cache(path, pred, labels, stamp)
    return pred, labels


def _by_variant(records):
    out = {}
    for r in records:
        out.setdefault(r.label, {})[r.seed] = r
    return out


def pair_comparisons(comp, records, log=print):
    """The :class:`~distill.compare.stats.PairResult` of every ``pairs:`` item of ``comp``.

    Parameters
    ----------
    comp : Comparison
    records : list of Record
        The comparison's runs (``label`` the variant's name), as
        :func:`~distill.compare.runner.run_comparison` returns them.
    """
    if not comp.pairs:
        return []
    runs = _by_variant(records)
    # (record, int8) of every side run, each once, visited grouped by val split
    needed = {}
    for a, b in comp.pairs:
        for side in (a, b):
            for rec in runs.get(side.variant, {}).values():
                needed[(rec.folder.path, side.int8)] = rec
    preds, vals = {}, _ValSplits()
    for k in sorted(needed, key=lambda k: _data_key(_recipe_of(needed[k].folder))):
        preds[k] = run_predictions(needed[k].folder, k[1], comp.out, vals, log)
    results = []
    for a, b in comp.pairs:
        ra, rb = runs.get(a.variant, {}), runs.get(b.variant, {})
        seeds = sorted(set(ra) & set(rb))
        if not seeds:
            raise UserError(f"{comp.source}: pair [{a}, {b}] has no seed that both variants ran "
                            f"(seeds {sorted(ra)} and {sorted(rb)}): check the variants' `seeds`.")
        per_seed, notes = {}, []
        for s in seeds:
            pa, ya = preds[(ra[s].folder.path, a.int8)]
            pb, yb = preds[(rb[s].folder.path, b.int8)]
            if len(ya) != len(yb) or not np.array_equal(ya, yb):
                raise UserError(f"{comp.source}: pair [{a}, {b}], seed {s}: the two runs were "
                                f"evaluated on different images (val splits of {len(ya)} and "
                                f"{len(yb)} images whose labels differ; see the `data` sections "
                                f"of {ra[s].folder.recipe_path} and {rb[s].folder.recipe_path}): "
                                f"pair only variants with the same val split.")
            per_seed[s] = (pa, pb, ya)
            for side, rec, p in ((a, ra[s], pa), (b, rb[s], pb)):
                notes += _check_top1(side, rec, p, ya)
        res = pair_result(str(a), str(b), per_seed)
        res.notes = notes
        for n in notes:
            _LOGGER.warning("compare: %s", n)
        results.append(res)
    return results


def _check_top1(side, rec, pred, labels):
    """A note when the top-1 of the predictions is not the run's metrics top-1 (within
    its rounding to 3 decimals): the tests would then be about other numbers than the table's."""
    reported = rec.values.get("top1_int8" if side.int8 else "top1")
    if reported is None or not len(labels):
        return []
    mine = float(np.mean(pred == labels) * 100.0)
    if abs(mine - reported) <= 5e-4 + 1e-9:
        return []
    return [f"{rec.folder.path}: top-1 of its {'int8' if side.int8 else 'fp32'} predictions "
            f"({mine:.3f}) differs from its {METRICS_FILE} ({reported:.3f}); the paired tests "
            f"use the predictions"]
