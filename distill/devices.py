"""Device names of a recipe (``trainer.devices``, ``--devices``) as MXNet contexts, and how a
batch is split over them.

``cpu`` is ``mx.cpu(0)``; ``cpuN`` is ``mx.cpu(N)`` (MXNet treats ``cpu(0)`` and ``cpu(1)`` as
distinct devices, which is how the data-parallel path is tested on a machine without GPUs);
``gpu`` is ``mx.gpu(0)`` and ``gpuN`` is ``mx.gpu(N)``. Training is data parallel, as GluonCV's
``train_imagenet.py`` does it: every batch is cut into one slice per device, each device runs
its replica of the student (and of the teacher) on its slice, and the gradients are summed.

Recipe example::

    trainer: {devices: [gpu0, gpu1], batch_size: 256}    # 128 images per GPU per step
"""
import logging
import re

import mxnet as mx
import numpy as np

from .errors import UserError

__all__ = ["contexts", "describe", "slices", "is_plain_cpu"]
_LOGGER = logging.getLogger(__name__)

_NAME = re.compile(r"(cpu|gpu)(\d*)")


def contexts(names, where="trainer.devices"):
    """``["cpu"]`` → ``[mx.cpu(0)]``; ``["gpu0", "gpu1"]`` → ``[mx.gpu(0), mx.gpu(1)]``.

    Raises
    ------
    UserError
        A name that is not ``cpu``/``cpuN``/``gpu``/``gpuN``, a device named twice, or a GPU
        that this MXNet build or machine does not have (the message says how many there are).
    """
    names = [names] if isinstance(names, str) else list(names or ["cpu"])
    out = []
    for name in names:
        m = _NAME.fullmatch(str(name).strip().lower())
        if not m:
            raise UserError(f"`{where}`: {name!r} is not a device; write cpu, cpu0, cpu1, ... or "
                            f"gpu0, gpu1, ... (for example [gpu0, gpu1]).")
        kind, num = m.group(1), int(m.group(2) or 0)
        out.append(mx.cpu(num) if kind == "cpu" else mx.gpu(num))
    if len(set(map(str, out))) != len(out):
        raise UserError(f"`{where}` names a device twice: {names}.")
    gpus = [c for c in out if c.device_type == "gpu"]
    if gpus:
        try:
            have = mx.context.num_gpus()
        except mx.base.MXNetError:
            have = 0
        missing = [c for c in gpus if c.device_id >= have]
        if missing:
            raise UserError(
                f"`{where}` asks for {', '.join(map(str, missing))} but this machine (or this "
                f"MXNet build, {mx.__version__}) has {have} GPU(s). Install the CUDA build of MXNet that "
                f"matches your CUDA (e.g. mxnet-cu112) on a GPU machine, or train on `[cpu]`.")
    return out


def describe(ctxs):
    """``"cpu(0)"`` or ``"2 devices: cpu(0), cpu(1)"``."""
    if len(ctxs) == 1:
        return str(ctxs[0])
    return f"{len(ctxs)} devices: {', '.join(map(str, ctxs))}"


def is_plain_cpu(ctxs):
    """True for ``[cpu(0)]``: the single-device path, bit for bit what ran before devices."""
    return len(ctxs) == 1 and ctxs[0] == mx.cpu(0)


def slices(n, k):
    """Cut a batch of ``n`` into at most ``k`` contiguous, non-empty ``slice`` objects whose
    sizes differ by at most one (``np.array_split``); fewer slices when ``n < k``."""
    bounds = np.linspace(0, n, min(k, n) + 1).round().astype(int) if n else np.zeros(1, int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
