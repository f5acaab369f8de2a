"""The student swapped for a rebuilt, smaller one while it trains.

Channel pruning with ``pruning.shrink: each_update`` cuts the removed channels out of the
student at every update (:class:`~distill.pruning.channel.Rebuild`). The loop then goes on with
the smaller network (:func:`distill.trainer.fit` calls :func:`swap_parts`):

- the student's settings per parameter (``grad_req``, ``lr_mult``, ``wd_mult``) carry over by
  name, and its feature taps are attached again (:func:`distill.taps.retap`);
- a loss term that reads a cut layer follows it
  (:meth:`~distill.losses.base.LossTermBlock.keep_student_channels`: a hint adapter loses the
  same input columns);
- a new :class:`gluon.Trainer` takes over, with the optimizer state carried by
  :func:`transplant_optimizer`: ``pruning.optimizer_state: slice`` cuts every state array like
  its parameter, so the kept channels' momentum is exactly what it was; ``reset`` starts the
  optimizer afresh.

Recipe example::

    pruning: {enabled: true, granularity: channel, shrink: each_update, optimizer_state: slice}
"""
import logging

import mxnet as mx

from .checkpoint import optimizer_state, restore_optimizer
from .pruning.apply import cut_array
from .taps import retap, tap_nodes

__all__ = ["param_keys", "swap_parts", "transplant_optimizer"]
_LOGGER = logging.getLogger(__name__)


def param_keys(owner, student):
    """``{id(Parameter): key}`` with keys that survive a rebuild: the student's parameters by
    name (a zoo student rebuilt is a SymbolBlock with the same names), the loss terms' by
    structural name (``term0.adapter.weight``)."""
    mine = {id(p) for p in student.collect_params().values()}
    return {id(p): ("student", p.name) if id(p) in mine else ("term", struct)
            for struct, p in owner._collect_params_with_prefix().items()}


def swap_parts(rb, student, train_net, terms):
    """The rebuilt student's parts: ``(student, train_net, keeps)``.

    ``keeps`` maps a :func:`param_keys` key to ``[(axis, keep)]``: how the old arrays (and their
    optimizer state) are cut to the new shapes. Loss terms are changed in place."""
    new = rb.student
    old = dict(student.collect_params().items())
    for name, p in new.collect_params().items():
        q = old.get(name)
        if q is not None:
            p.grad_req, p.lr_mult, p.wd_mult = q.grad_req, q.lr_mult, q.wd_mult
    keeps = {("student", n): k for n, k in rb.keeps.items()}
    if train_net is student:
        return new, new, keeps
    nodes = tap_nodes(train_net)
    for i, t in enumerate(terms):
        if t.s_idx == 0:
            continue
        keep = rb.tensor_keep(nodes[t.s_idx - 1])
        if keep is not None:
            for struct, k in t.block.keep_student_channels(keep).items():
                keeps[("term", f"term{i}.{struct}")] = k
    return new, retap(train_net, new), keeps


def _cut_state(state, keeps):
    if isinstance(state, mx.nd.NDArray):
        return mx.nd.array(cut_array(state.asnumpy(), keeps), ctx=state.context, dtype=state.dtype)
    if isinstance(state, (list, tuple)):
        return type(state)(_cut_state(s, keeps) for s in state)
    return state


def transplant_optimizer(old_trainer, old_keys, new_trainer, new_keys, keeps):
    """Give ``new_trainer`` ``old_trainer``'s optimizer state, each array cut like its
    parameter (``keeps``: :func:`param_keys` key → ``[(axis, keep)]``), and its update counts.

    Parameters without an old counterpart (a new frozen adapter) start without state."""
    st = optimizer_state(old_trainer)
    if st is None:              # on parameter servers (dist_async): nothing to carry
        return
    key_of = {i: old_keys[id(p)] for i, p in enumerate(old_trainer._params)}
    new_index = {new_keys[id(p)]: j for j, p in enumerate(new_trainer._params)}
    move = {i: new_index[k] for i, k in key_of.items() if k in new_index}
    st = dict(st)
    st["states"] = [{move[i]: _cut_state(s, keeps.get(key_of[i], [])) for i, s in per.items()
                     if i in move} for per in st["states"]]
    st["index_update_counts"] = {d: {move[i]: c for i, c in counts.items() if i in move}
                                 for d, counts in st["index_update_counts"].items()}
    restore_optimizer(new_trainer, st, "the rebuilt student")
