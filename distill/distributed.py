"""Who am I in a parameter-server run, which data are mine, and the few collectives the loop needs.

MXNet's own ``dist_sync`` / ``dist_async`` KVStore (ps-lite, in the pip wheel) does the
communication; this module only wraps it:

- :func:`create_kvstore` turns ``trainer.kvstore`` into a :class:`Cluster` (the KVStore, rank,
  number of workers); ``local`` and ``device`` are a one-worker cluster without a KVStore, so a
  local run takes exactly the code path it took before.
- :func:`shard_indices`: worker ``r`` of ``W`` trains on the train images ``r, r + W, ...``,
  ``N // W`` of them, the same count on every worker (a ``dist_sync`` step waits for every
  worker's push: a worker with one more batch would wait forever).
- :meth:`Cluster.init_trainer` (rank 0's parameters into the KVStore and every worker, without
  the race of the Trainer's own lazy set-up), :meth:`Cluster.average` (BatchNorm running
  statistics, which no gradient carries), :meth:`Cluster.broadcast` (rank 0's pruning masks),
  :meth:`Cluster.min_int` (steps per epoch).

Keys: the Gluon Trainer uses ``0 .. P-1``; ours start at :data:`KEY_BASE` and every collective
takes a fresh one, in the same order on every worker (the code path is the same).

Recipe example::

    trainer: {kvstore: dist_sync, batch_size: 64}   # 64 per worker; `distill launch -n 2 ...`
"""
import logging
import os

import numpy as np

from .errors import UserError

__all__ = ["Cluster", "create_kvstore", "shard_indices", "DIST_KVSTORES", "KEY_BASE",
           "DUMP_ENV", "dump_state"]
_LOGGER = logging.getLogger(__name__)

DIST_KVSTORES = ("dist_sync", "dist_async")
KEY_BASE = 1 << 24
DUMP_ENV = "DISTILL_DEBUG_STATE_DIR"       # tests: every rank writes its final state there


class Cluster:
    """The workers of one run, as this process sees them.

    Attributes
    ----------
    kind : str
        ``trainer.kvstore``.
    kv : mxnet.kvstore.KVStore or None
        The dist KVStore (None for ``local`` / ``device``).
    rank, num_workers : int
    """

    def __init__(self, kind="local", kv=None):
        self.kind, self.kv = kind, kv
        self.rank = kv.rank if kv is not None else 0
        self.num_workers = kv.num_workers if kv is not None else 1
        self._next_key = KEY_BASE

    @property
    def is_root(self):
        """Rank 0: the one worker that writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self):
        return self.kv is not None

    @property
    def synchronous(self):
        """Workers step in lockstep and hold the same weights (``dist_sync``)."""
        return self.kind == "dist_sync" and self.num_workers > 1

    def trainer_kvstore(self):
        """What ``gluon.Trainer(kvstore=...)`` gets: None for ``local`` (as before), the name for
        ``device``, the KVStore object for ``dist_*``."""
        if self.kv is not None:
            return self.kv
        return None if self.kind == "local" else self.kind

    def update_on_kvstore(self):
        """``dist_sync``: False, each worker updates with the summed gradients (the optimizer
        state stays local, so it is checkpointed like a local run's); ``dist_async`` needs True
        (MXNet refuses otherwise); None (MXNet's choice) elsewhere."""
        if self.kind == "dist_sync":
            return False
        if self.kind == "dist_async":
            return True
        return None

    def _key(self):
        self._next_key += 1
        return self._next_key

    def _sum(self, arrays):
        """Elementwise sum over workers of a list of float32 numpy arrays (dist_sync only).

        Fresh keys: init them all (rank 0 pushes zeros), let those pushes finish, a barrier,
        then push/pull (see :meth:`init_trainer` for why the waits)."""
        import mxnet as mx
        # also lets the Trainer's push/pulls of the last step finish first: a collective started
        # while they were in flight left the workers with different values of the last
        # parameters (those pushed last, at the lowest priority) in 2 of 5 two-worker runs
        mx.nd.waitall()
        nds = [mx.nd.array(a, dtype="float32") for a in arrays]
        keys = [self._key() for _ in nds]
        for k, nd in zip(keys, nds):
            self.kv.init(k, mx.nd.zeros(nd.shape))
        self.barrier()
        for k, nd in zip(keys, nds):
            self.kv.pushpull(k, nd, out=nd)
        return [nd.asnumpy() for nd in nds]

    def average(self, params):
        """Replace each Parameter's value by its mean over workers (BatchNorm running stats)."""
        if not self.synchronous or not params:
            return
        names = sorted(params)
        sums = self._sum([params[n].list_data()[0].asnumpy() for n in names])
        for n, s in zip(names, sums):
            p = params[n]
            p.set_data((s / self.num_workers).astype(p.dtype))

    def broadcast(self, arrays):
        """Rank 0's value of each array in ``arrays`` (a name → numpy dict), on every worker."""
        if not self.synchronous or not arrays:
            return arrays
        names = sorted(arrays)
        sent = [np.asarray(arrays[n], np.float32) if self.is_root
                else np.zeros(np.shape(arrays[n]), np.float32) for n in names]
        return {n: v for n, v in zip(names, self._sum(sent))}

    def min_int(self, value):
        """The smallest ``value`` over workers."""
        if not self.synchronous:
            return int(value)
        onehot = np.zeros(self.num_workers, np.float32)
        onehot[self.rank] = value
        return int(self._sum([onehot])[0].min())

    def init_trainer(self, trainer):
        """Put rank 0's parameters into the KVStore and every worker's ``trainer`` (``dist_*``).

        What ``gluon.Trainer`` does lazily at its first step, without its race: its per-key
        ``broadcast`` is init (rank 0 pushes, then a barrier) + pull, but rank 0's push is an
        engine operation that may still be queued behind others when the barrier lets the
        other workers pull (seen on --resume, after the checkpoint's values were queued:
        the server aborts with "init N first"). Here rank 0's pushes finish before anyone pulls.
        Uses the Trainer's private ``_init_kvstore``/``_params_to_init``/``_param2idx`` (MXNet
        1.9.1).
        """
        if self.kv is None:
            return
        import mxnet as mx
        mx.nd.waitall()
        if not trainer._kv_initialized:
            trainer._init_kvstore()
        ready = [p for p in trainer._params_to_init if not p._deferred_init]
        keys = [trainer._param2idx[p.name] for p in ready]
        # copies in the default layout: the KVStore cannot read an array oneDNN has reordered
        # ("We can't generate TBlob for MKLDNN data"), as a hybridized net's weights may be
        values = [mx.nd.array(p.list_data()[0].asnumpy(), dtype=p.dtype) for p in ready]
        for k, v in zip(keys, values):
            self.kv.init(k, v)
        self.barrier()                  # waits for rank 0's pushes first (waitall)
        for k, v in zip(keys, values):
            self.kv.pull(k, out=v)
        mx.nd.waitall()
        for p, v in zip(ready, values):
            p.set_data(v)
        trainer._params_to_init = [p for p in trainer._params_to_init if p._deferred_init]

    def barrier(self):
        """Wait until every worker gets here (``dist_*``; nothing otherwise)."""
        if self.kv is not None:
            import mxnet as mx
            mx.nd.waitall()
            self.kv._barrier()


def create_kvstore(kind):
    """The :class:`Cluster` of ``trainer.kvstore``; for ``dist_*`` this joins the ps-lite job.

    Raises
    ------
    UserError
        ``dist_*`` outside a launched job (no ``DMLC_ROLE=worker`` in the environment).
    """
    if kind not in DIST_KVSTORES:
        return Cluster(kind)
    role = os.environ.get("DMLC_ROLE")
    if role != "worker":
        raise UserError(
            f"`trainer.kvstore: {kind}` runs as one worker of a parameter-server job, but "
            f"DMLC_ROLE is {role!r}, not 'worker'. Start it with `distill launch -n 2 -s 1 -- "
            f"python train.py RECIPE.yaml` (or MXNet's tools/launch.py, which set DMLC_*), or set "
            f"`trainer.kvstore: local` to train in this process.")
    import mxnet as mx
    kv = mx.kv.create(kind)
    # distill.launch reads this line to prefix the worker's output with its rank
    print(f"distill: kvstore {kind}: worker rank {kv.rank} of {kv.num_workers}", flush=True)
    return Cluster(kind, kv)


def shard_indices(n, rank, num_workers):
    """Train-image indices of worker ``rank``: ``rank, rank + W, ...``, ``n // W`` of them.

    Strided rather than contiguous so that a file sorted by class still gives every worker every
    class; the last ``n % W`` images are left out so every worker has the same count.
    """
    per = n // num_workers
    if per == 0:
        raise UserError(f"data: {n} train images cannot be shared by {num_workers} workers; "
                        f"use fewer workers (`distill launch -n`) or more data (`data.limit`).")
    return np.arange(rank, per * num_workers, num_workers)[:per]


def dump_state(cluster, student, modifiers):
    """Write this rank's parameters and masks to ``$DISTILL_DEBUG_STATE_DIR/rank-R.npz``
    (tests compare workers with it); nothing when the variable is unset."""
    folder = os.environ.get(DUMP_ENV)
    if not folder:
        return None
    os.makedirs(folder, exist_ok=True)
    structural = student._collect_params_with_prefix()
    state = {f"param:{k}": v.list_data()[0].asnumpy() for k, v in structural.items()}
    state["names"] = np.array([f"{k}={v.name}" for k, v in structural.items()])
    for m in modifiers:
        for k, v in (getattr(m, "masks", None) or {}).items():
            state[f"mask:{k}"] = np.asarray(v)
    path = os.path.join(folder, f"rank-{cluster.rank}.npz")
    np.savez(path, **state)
    return path
