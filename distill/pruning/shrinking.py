"""The masked student cut to a physically smaller one, checked to compute the same function.

:func:`checked_shrink` is used at the end of a channel-pruned run (``pruning.shrink: end``) and
at every pruning update (``each_update``, the default); a :class:`Rebuild` carries the smaller
student to the loop (:mod:`distill.rebuild`), with what the optimizer state and the loss terms'
own parameters need to follow it.
"""
import logging

import mxnet as mx

from ..graphio import make_block
from .apply import first_divergence, mask_params, shrink, shrunk_block
from .graph import PruningGraphError

__all__ = ["Rebuild", "checked_shrink", "tensor_keeper", "SHRINK_RTOL"]
_LOGGER = logging.getLogger(__name__)

# shrunk ≡ masked: max |Δlogit| ≤ SHRINK_RTOL · max(1, max |logit|). Relative, because float32
# sums in another order differ by ~1e-7 of the logits' scale, and logits can be in the hundreds.
SHRINK_RTOL = 1e-4


class Rebuild:
    """A smaller student to continue training with, and how the old arrays map onto it.

    Attributes
    ----------
    student : gluon.SymbolBlock
        Hybridized, on the CPU, with the current values of the kept channels.
    keeps : dict
        Parameter name → ``[(axis, keep)]``: which indices of the current arrays stay
        (:func:`~distill.pruning.apply.relative_keeps`; a parameter not listed keeps all).
    resumed : bool
        Built for a resumed run's shapes only: the values come from the checkpoint.
    optimizer_state : str
        ``slice`` (carry the kept channels' state over) or ``reset``.
    """

    def __init__(self, student, keeps, tensor_keeps, resumed=False, optimizer_state="slice"):
        self.student, self.keeps, self.resumed = student, keeps, resumed
        self.optimizer_state = optimizer_state
        self._tensor_keeps = tensor_keeps

    def tensor_keep(self, node):
        """Which channels of graph node ``node``'s output stay (1-D bool over the current
        channels), or None when it keeps them all."""
        return self._tensor_keeps(node)


def tensor_keeper(graph, removed, cut):
    """``node name → keep`` (1-D bool over the channels still there after ``cut``, None when
    all stay) for the output of a graph node once ``removed`` is cut too."""
    index = {n["name"]: i for i, n in enumerate(graph.nodes)}
    removed, cut = set(removed), set(cut)

    def keep_of(node):
        t = graph.tensors.get((index.get(node, -1), 0))
        if t is None or t.ids is None or t.ids.ndim != 1:
            return None
        keep = graph.keep_mask(t.ids, removed)[graph.keep_mask(t.ids, cut)]
        return None if keep.all() else keep
    return keep_of


def checked_shrink(graph, symbol, params, removed, input_name, x, plan_path, reference=None):
    """Cut ``removed`` out of ``(symbol, params)`` and check the result on the images ``x``.

    Parameters
    ----------
    params : dict
        Name → array at the analysed shapes (removed slices may hold anything: masked here).
    reference : callable or None
        The masked network's logits on ``x`` (the trained student); None: built from ``params``.

    Returns
    -------
    (SymbolBlock, mx.sym.Symbol, dict, float)
        The smaller network (hybridized, on the CPU), its graph and parameters, and the max
        |Δlogit| against the masked one; a :class:`PruningGraphError` naming the first layer that
        differs when that exceeds :data:`SHRINK_RTOL` of the logits' scale.
    """
    masked = mask_params(graph, params, removed)
    sym, new_params = shrink(graph, masked, removed)
    small = shrunk_block(sym, new_params, input_name)
    ref = reference(x) if reference is not None else \
        make_block(symbol, masked, input_name, trainable=False)(x)
    diff = float(mx.nd.abs(ref - small(x)).max().asscalar())
    scale = max(1.0, float(mx.nd.abs(ref).max().asscalar()))
    if not diff <= SHRINK_RTOL * scale:
        raise _mismatch(graph, symbol, removed, diff, scale, masked, sym, new_params, x, plan_path)
    return small, sym, new_params, diff


def _mismatch(graph, symbol, removed, diff, scale, params, sym, new_params, x, path):
    """The one-paragraph error for a shrunk network that does not compute the masked one's
    function, naming the first layer (and its group) that differs."""
    where = ""
    try:
        found = first_divergence(graph, symbol, params, sym, new_params, x, removed, SHRINK_RTOL)
    except Exception as e:          # the diagnosis must not hide the error it explains
        found, where = None, f" (locating the layer failed: {type(e).__name__}: {e})"
    if found is not None:
        layer, ldiff, lscale = found
        groups = [grp.id for grp in graph.groups if layer in grp.layers]
        where = (f" The first layer that differs is {layer}"
                 + (f" (coupled group {', '.join(groups)})" if groups else "")
                 + f", by {ldiff:.3g} at scale {lscale:.3g}: exclude it "
                   f"(`pruning.exclude: [{layer}]`) to go on.")
    return PruningGraphError(
        f"pruning: the shrunk network differs from the masked one by {diff:.3g} on the logits "
        f"(allowed {SHRINK_RTOL:g} × max(1, max |logit|) = {SHRINK_RTOL * scale:.3g}), so the "
        f"dependency analysis got an operator wrong; the smaller network was not used and no "
        f"model was written.{where} Please report it with the plan {path}.")
