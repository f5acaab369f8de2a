"""Atomic checkpoints: a crash while writing leaves the previous checkpoint intact.

A checkpoint is one pickle file ``checkpoints/epoch-NNNN.ckpt`` holding the student's
parameters (by structural name), the optimizer state, the epoch, RNG state, the metrics
history and the resolved recipe. It is written to a temporary file in the same folder,
flushed to disk, then renamed over the final name (``os.replace`` is atomic on POSIX).
"""
import glob
import logging
import os
import pickle
import random
import re
import tempfile

import mxnet as mx
import numpy as np

from .errors import UserError

__all__ = ["atomic_write_bytes", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "net_state", "load_net_state"]
_LOGGER = logging.getLogger(__name__)
_PATTERN = re.compile(r"epoch-(\d+)\.ckpt$")
KEEP = 2


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` via a temporary file + fsync + rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def net_state(net):
    """Parameters of a Gluon block by structural name (independent of name-scope counters)."""
    return {k: v.data().asnumpy() for k, v in net._collect_params_with_prefix().items()}


def load_net_state(net, state, where="checkpoint"):
    """Load :func:`net_state` output back into ``net``; names and shapes must match."""
    params = net._collect_params_with_prefix()
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise UserError(f"{where}: parameters do not match the network (missing: {missing[:5]}, "
                        f"unexpected: {extra[:5]}). Was it written by a different recipe?")
    for k, p in params.items():
        if tuple(p.shape) != tuple(state[k].shape):
            raise UserError(f"{where}: parameter {k!r} has shape {state[k].shape}, the network "
                            f"expects {p.shape}.")
        p.set_data(mx.nd.array(state[k], dtype=state[k].dtype))


def save_checkpoint(folder, epoch, net, trainer, extra):
    """Write ``epoch-NNNN.ckpt`` atomically and keep the newest :data:`KEEP` checkpoints."""
    os.makedirs(folder, exist_ok=True)
    states = None
    if not _states_on_servers(trainer):
        fd, tmp_states = tempfile.mkstemp(prefix=".states-", dir=folder)
        os.close(fd)
        try:
            trainer.save_states(tmp_states)
            with open(tmp_states, "rb") as f:
                states = f.read()
        finally:
            os.unlink(tmp_states)
    payload = {
        "epoch": epoch,
        "params": net_state(net),
        "trainer_states": states,
        "rng": {"python": random.getstate(), "numpy": np.random.get_state()},
        **extra,
    }
    path = os.path.join(folder, f"epoch-{epoch:04d}.ckpt")
    atomic_write_bytes(path, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    for old in sorted(_list(folder))[:-KEEP]:
        os.unlink(old[1])
    return path


def _list(folder):
    out = []
    for p in glob.glob(os.path.join(folder, "epoch-*.ckpt")):
        m = _PATTERN.search(p)
        if m:
            out.append((int(m.group(1)), p))
    return out


def _states_on_servers(trainer):
    """``dist_async``: the optimizer state lives on the parameter servers, which cannot save it
    (MXNet: "Cannot save states for distributed training"); a resumed run restarts it."""
    kv = getattr(trainer, "_kvstore", None)
    return bool(kv is not None and "dist" in kv.type and getattr(trainer, "_update_on_kvstore", False))


def latest_checkpoint(folder, clean=True):
    """Path of the newest complete checkpoint in ``folder``, or ``None``.

    Temporary files of a write that was cut off (``.tmp-*``) are removed: only renamed,
    complete files count. ``clean=False`` only looks (a ``dist_*`` worker other than rank 0:
    the folder is rank 0's)."""
    stale = glob.glob(os.path.join(folder, ".tmp-*")) + glob.glob(os.path.join(folder, ".states-*"))
    for path in stale if clean else ():
        os.unlink(path)
    found = sorted(_list(folder))
    return found[-1][1] if found else None


def load_checkpoint(path, net, trainer, before_states=None):
    """Restore ``net`` and ``trainer`` from ``path``; return the payload (epoch, history, ...).

    ``before_states()`` runs between the parameters and the optimizer state (a ``dist_*`` run
    puts the loaded parameters into its KVStore there: :meth:`Cluster.init_trainer`)."""
    try:
        with open(path, "rb") as f:
            payload = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise UserError(f"checkpoint {path} cannot be read ({e}). Delete it to resume from the "
                        f"one before, or start again without --resume.") from None
    load_net_state(net, payload["params"], where=path)
    if before_states is not None:
        before_states()
    if payload["trainer_states"] is None:
        _LOGGER.warning("%s holds no optimizer state (dist_async keeps it on the servers): "
                        "momentum restarts from zero", path)
    else:
        _load_states(trainer, payload["trainer_states"], path)
    random.setstate(payload["rng"]["python"])
    np.random.set_state(payload["rng"]["numpy"])
    return payload


def _load_states(trainer, states, path):
    # MXNet loads optimizer state from a file only. Not in the checkpoints folder: there, rank 0
    # of a dist job removes stale `.states-*` files while the other ranks load theirs.
    fd, tmp_states = tempfile.mkstemp(prefix="distill-states-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(states)
        trainer.load_states(tmp_states)
    finally:
        os.unlink(tmp_states)
