"""Parameters on several devices: read one replica, write every replica, sum the gradients.

Data-parallel training (``net.initialize(ctx=[mx.gpu(0), mx.gpu(1)])``, each batch split with
``gluon.utils.split_and_load``, the gradients summed by a ``device`` KVStore) keeps one copy of
every parameter per device. ``param.data()`` returns only the copy on the *current* context (and
raises when that context holds none, e.g. ``cpu(0)`` for a GPU list), so code that writes through
it (``p.data()[:] = v``, ``p.data() *= mask``) changes one replica and silently lets the others
drift apart, and code that reads ``p.grad()`` sees one slice's gradient. Every parameter-touching
modifier goes through this module instead:

* reads of weights take replica 0 (:func:`first`): the optimizer keeps the replicas identical;
* writes reach every replica (:func:`set_all`, :func:`apply_mask`);
* gradients are summed over replicas (:func:`grad_sum`, :func:`grad_after_step`);
* BatchNorm running statistics, which each replica updates from its own slice, are averaged and
  written back to all (:func:`sync_running_stats`, called by the loop at every epoch end and
  before evaluation and checkpoints);
* :func:`differing` / :func:`assert_replicas_equal` check that the replicas agree.

What a replica's gradient holds (measured with MXNet 1.9.1, two CPU contexts, ``device`` KVStore):

* after ``backward`` and before ``trainer.step``: its own slice's gradient;
* after ``trainer.step`` with ``update_on_kvstore=False``: the sum over all replicas (the KVStore
  reduces into every replica's gradient buffer in place, then each device updates its copy);
* after ``trainer.step`` with ``update_on_kvstore=True`` (MXNet's default for ``device``): still
  its own slice's gradient (the KVStore sums into its own buffer, updates its own copy of the
  weights and pulls the weights back into every replica).

``update_on_kvstore=True`` has two more consequences for writers. The KVStore keeps its own copy of
every trainable weight and pulls it back into the replicas at each step, so an in-place write to
the replicas lasts until the next step only (the masks: re-applied after every step, so every
forward pass sees them; the values under a mask keep evolving in the KVStore's copy, unseen).
And ``Parameter.set_data`` on any parameter of such a trainer resets its KVStore, optimizer state
included (MXNet's ``Trainer._reset_kvstore``). :func:`set_all` therefore writes parameters that
no gradient updates (``grad_req='null'``: running statistics, schedules) in place, which the
KVStore never pulls over, and trainable ones through ``set_data``, the only write the KVStore
keeps. ``update_on_kvstore=False`` has none of this: the weights live only in the replicas.

This module is on the ground floor: it imports only MXNet and NumPy.
"""
import logging

import mxnet as mx
import numpy as np

__all__ = ["contexts", "first", "set_all", "mask_arrays", "apply_mask", "grad_sum",
           "grad_after_step", "sync_running_stats", "differing", "assert_replicas_equal",
           "ReplicaMismatch"]
_LOGGER = logging.getLogger(__name__)


def _params(params):
    """``name → Parameter`` from a Block, a ParameterDict or a dict."""
    if hasattr(params, "collect_params"):
        params = params.collect_params()
    return dict(params.items())


def contexts(params):
    """The context list the parameters live on (replica order), from a Block, a ParameterDict,
    a dict of Parameters or one Parameter; ``[mx.cpu()]`` when there are none."""
    if isinstance(params, mx.gluon.Parameter):
        return list(params.list_ctx())
    for p in _params(params).values():
        return list(p.list_ctx())
    return [mx.cpu()]


def first(p):
    """Replica 0 of ``p`` (an NDArray on ``p.list_ctx()[0]``): the value to read, since the
    optimizer keeps every replica identical."""
    return p.data(p.list_ctx()[0])


def _nd(value, dtype=None):
    if isinstance(value, mx.nd.NDArray):
        return value
    a = np.asarray(value)
    return mx.nd.array(a, dtype=dtype or a.dtype)


def set_all(p, value):
    """Write ``value`` (NDArray or array-like, ``p``'s shape) into every replica of ``p``.

    Parameters no gradient updates (``grad_req='null'``) are written in place; trainable ones
    through ``set_data`` (see the module docstring: with ``update_on_kvstore=True`` that is the
    only write the KVStore keeps, and it resets the KVStore's optimizer state)."""
    value = _nd(value, p.dtype)
    if p.grad_req != "null":
        p.set_data(value)
        return
    for d in p.list_data():
        d[:] = value.as_in_context(d.context)


def mask_arrays(p, mask):
    """``mask`` (bool or 0/1, ``p``'s shape) as one NDArray of ``p``'s dtype per replica, to
    pass to :func:`apply_mask` step after step without copying it to the devices again."""
    host = mx.nd.array(np.asarray(mask.asnumpy() if isinstance(mask, mx.nd.NDArray) else mask),
                       dtype=p.dtype)
    return [host.as_in_context(c) for c in p.list_ctx()]


def apply_mask(p, mask):
    """Multiply every replica of ``p`` by ``mask`` in place (a hybridized, static-alloc graph
    keeps reading the same buffers).

    ``mask`` is an array-like or NDArray of ``p``'s shape, or the list :func:`mask_arrays` made."""
    masks = mask if isinstance(mask, (list, tuple)) else mask_arrays(p, mask)
    data = p.list_data()
    if len(masks) != len(data):
        raise ValueError(f"{p.name}: {len(masks)} mask arrays for {len(data)} replicas")
    for d, m in zip(data, masks):
        d *= m


def grad_sum(p, ctx=None):
    """The sum of every replica's gradient, on replica 0's context (``ctx``: only the replicas
    on these contexts, e.g. those a batch smaller than the device count reached).

    Before ``trainer.step`` each replica holds its own slice's gradient, so this is the
    gradient of the whole batch (what one device would hold for the same batch)."""
    grads = p.list_grad() if ctx is None else [p.grad(c) for c in ctx]
    if len(grads) == 1:
        return grads[0].copy()
    ctx = grads[0].context
    return mx.nd.add_n(*[g.as_in_context(ctx) for g in grads])


def grad_after_step(p, trainer=None):
    """The whole batch's gradient of ``p`` right after ``trainer.step`` (an ``after_step`` hook).

    With a KVStore that reduces in place (``update_on_kvstore=False``: ``device``/``local`` with
    that flag, ``dist_sync`` here) every replica already holds the sum: replica 0's is taken.
    Otherwise (no KVStore: one device; ``update_on_kvstore=True``) each replica still holds its own
    slice's gradient: they are summed. ``trainer=None``: summed (no step has reduced them)."""
    kv = getattr(trainer, "_kvstore", None) if trainer is not None else None
    if kv is not None and getattr(trainer, "_update_on_kvstore", None) is False:
        return p.grad(p.list_ctx()[0]).copy()
    return grad_sum(p)


def sync_running_stats(net):
    """Average every ``grad_req='null'`` parameter (BatchNorm running mean and variance) over its
    replicas and write the mean back to all of them; returns the names that had several replicas.

    Each replica updates its running statistics from its own slice of the batch, so they drift
    apart; the loop calls this at every epoch end, and before evaluating or checkpointing. The
    mean is computed as ``r0 + Σ(r_i − r0) / n``: replicas that already agree are left exactly as
    they are (no rounding), e.g. frozen parameters."""
    synced = []
    for name, p in _params(net).items():
        if p.grad_req != "null" or p._data is None:
            continue
        data = p.list_data()
        if len(data) < 2:
            continue
        r0 = data[0]
        ctx = r0.context
        mean = r0 + mx.nd.add_n(*[d.as_in_context(ctx) - r0 for d in data[1:]]) / len(data)
        for d in data:
            d[:] = mean.as_in_context(d.context)
        synced.append(name)
    return synced


def differing(params, rtol=1e-6):
    """Names of the parameters whose replicas differ: ``max |r_i − r_0| > rtol · max(|r_0|, |r_i|)``
    (relative to the values' scale; all-zero replicas agree only when equal)."""
    out = []
    for name, p in _params(params).items():
        if p._data is None:
            continue
        data = p.list_data()
        if len(data) < 2:
            continue
        a = data[0].asnumpy().astype(np.float64)
        for d in data[1:]:
            b = d.asnumpy().astype(np.float64)
            scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
            diff = float(np.abs(a - b).max(initial=0.0))
            if not diff <= rtol * scale:          # NaN differs too
                out.append(name)
                break
    return sorted(out)


class ReplicaMismatch(AssertionError):
    """Replicas of some parameters differ; ``names`` lists them."""

    def __init__(self, names, rtol):
        self.names = list(names)
        super().__init__(f"{len(self.names)} parameter(s) differ between replicas beyond rtol "
                         f"{rtol:g}: {', '.join(self.names[:8])}{' ...' if len(self.names) > 8 else ''}")


def assert_replicas_equal(params, rtol=1e-6):
    """Raise :class:`ReplicaMismatch` naming the parameters whose replicas differ (see
    :func:`differing`); return the (empty) list otherwise."""
    names = differing(params, rtol)
    if names:
        raise ReplicaMismatch(names, rtol)
    return names
