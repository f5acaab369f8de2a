"""Calibrators: the per-output statistics that fix each int8 tensor's range.

A calibrator is a small class registered on :data:`CALIBRATORS` under the name a recipe writes in
``quantization.calib_mode``::

    @CALIBRATORS.register("naive")
    class NaiveCalibrator(Calibrator): ...

:func:`calibrate` runs the fp32 (oneDNN-fused) graph over the calibration batches once, feeds
every node output to the calibrator, and returns its thresholds: ``{output name: (min, max)}``.
Same model, same batches in the same order → the same thresholds (nothing random inside).

Recipe example::

    quantization: {calib_mode: entropy, calib_batches: 10, calib_batch_size: 32}
"""
import logging

import numpy as np

from .base import CALIBRATORS, Calibrator
from . import entropy, naive  # noqa: F401  (registration)

__all__ = ["CALIBRATORS", "Calibrator", "calibrate", "calibration_indices", "gather_images"]
_LOGGER = logging.getLogger(__name__)


def calibration_indices(n, count, seed):
    """Which training images calibrate: ``min(count, n)`` indices, fixed by ``seed``.

    Parameters
    ----------
    n : int
        Size of the train split.
    count : int
        ``calib_batches × calib_batch_size``.
    seed : int
        ``trainer.seed`` of the recipe.

    Returns
    -------
    np.ndarray
        int64 indices, in the order they are fed (the order matters to ``entropy``).
    """
    return np.random.RandomState(seed).permutation(n)[:min(count, n)].astype(np.int64)


def gather_images(x, idx, batch_size=256):
    """``x[idx]`` as one C-contiguous float32 array, read ``batch_size`` images at a time.

    ``x`` may be a lazy array of streamed images (``distill.data``'s recordio and image folders:
    each read decodes), which is only ever asked for a batch; the caller bounds ``len(idx)``.

    Parameters
    ----------
    x : np.ndarray or array-like
        ``(N, C, H, W)``, indexable by an integer array.
    idx : sequence of int
    batch_size : int

    Returns
    -------
    np.ndarray
        float32 ``(len(idx), C, H, W)``.
    """
    idx = np.asarray(idx, np.int64)
    parts = [np.asarray(x[idx[i:i + batch_size]], np.float32) for i in range(0, len(idx), batch_size)]
    if not parts:
        return np.zeros((0,) + tuple(x.shape[1:]), np.float32)
    return np.ascontiguousarray(np.concatenate(parts) if len(parts) > 1 else parts[0])


def calibrate(model, x, mode, batch_size=32, idx=None):
    """Thresholds of every output of ``model.fused`` over the images ``x`` (or ``x[idx]``).

    Parameters
    ----------
    model : FloatModel
    x : np.ndarray or array-like
        float32 ``(N, C, H, W)`` calibration images, in the order they are fed; with ``idx``,
        the split they are drawn from (a lazy array of streamed images is fine: it is read one
        batch at a time).
    mode : str
        A registered calibrator (``naive``, ``entropy``).
    batch_size : int
        Images per forward pass; the last batch may be smaller.
    idx : sequence of int, optional
        The calibration images' indices into ``x``, in the order they are fed
        (:func:`calibration_indices`); default: all of ``x``.

    Returns
    -------
    dict
        Output name → ``(min, max)`` as Python floats.
    """
    import mxnet as mx    # lazily: the recipe checks calib_mode against CALIBRATORS without MXNet
    calibrator = CALIBRATORS.get(mode, where="quantization.calib_mode")()
    names = model.calib_outputs()
    internals = model.fused.get_internals()
    group = mx.sym.Group([internals[n] for n in names])
    executors = {}
    n = len(x) if idx is None else len(idx)
    for i in range(0, n, batch_size):
        xb = np.asarray(x[i:i + batch_size] if idx is None else x[np.asarray(idx[i:i + batch_size], np.int64)],
                        np.float32)
        ex = executors.get(len(xb))
        if ex is None:
            ex = executors[len(xb)] = group.simple_bind(
                mx.cpu(), grad_req="null", **{model.input_name: xb.shape})
            ex.copy_params_from(model.arg_params, model.aux_params, allow_extra_params=True)
        outs = ex.forward(is_train=False, **{model.input_name: mx.nd.array(xb)})
        for name, arr in zip(names, outs):
            calibrator.update(name, arr.asnumpy())
    return {k: (float(lo), float(hi)) for k, (lo, hi) in calibrator.thresholds().items()}
