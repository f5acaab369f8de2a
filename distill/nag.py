"""Optimizers that MXNet 1.9.1 does not get right for us.

``nesterov`` uses :class:`DeterministicNAG`. MXNet 1.9.1's fused ``nag_mom_update`` is neither
the update its docstring states nor deterministic in a training loop:

* it keeps ``v = momentum * v - lr * (g + wd * w)`` (the learning rate inside the state) and reads
  ``w`` for the weight decay *after* writing the new weight into it (``out=weight``, in place);
* with weight decay its result depends on scheduling (cifar_resnet20_v1, mnist5k, 12 steps, the
  same seed, data and weights: two fresh processes ended at loss 2.21719 and 2.21664; one value
  twice with ``OMP_NUM_THREADS=1``; a third value with ``MXNET_ENGINE_TYPE=NaiveEngine`` and the
  same third value with ``mx.nd.waitall()`` before every ``trainer.step``: the in-place op is not
  ordered after the backward pass's pending reads of the weights). Without weight decay it
  repeated exactly.

A non-deterministic update would break "a resumed run equals an uninterrupted one". This is the
update below written with plain NDArray ops, each writing a new array (none reads and writes
the same array), deterministic run to run.
"""
import mxnet as mx

__all__ = ["DeterministicNAG"]
# Registered with MXNet as "deterministicnag"; the recipe name is `nesterov` (distill.optim).


@mx.optimizer.register
class DeterministicNAG(mx.optimizer.Optimizer):
    """Nesterov momentum SGD (Sutskever et al., 2013), deterministic run to run::

        g = rescale * grad (+ clip) + wd * w
        m = momentum * m + g
        w = w - lr * (g + momentum * m)

    The state is ``m``, one array per parameter of the weight's shape.

    All parameters of a step are updated by one cached graph (``aggregate_num``: the Updater
    hands them over as one list): the same operations in the same order as the per-parameter
    NDArray code, so the same bits, but one call from Python instead of ten per parameter
    (measured on mobilenet0.25, 83 parameters: the optimizer was ~25 ms of Python per step, a
    sixth of a 112-px KD step). Each new weight and state is a fresh output of the graph, copied
    into place afterwards: no operation reads and writes the same array.
    """

    def __init__(self, momentum=0.9, **kwargs):
        super().__init__(**kwargs)
        self.momentum = momentum
        self.aggregate_num = 1 << 20          # every parameter of a step in one update() call
        self._graphs = {}

    def __getstate__(self):                   # cached graphs are not picklable (save_states)
        state = dict(self.__dict__)
        state["_graphs"] = {}
        return state

    def create_state(self, index, weight):
        return mx.nd.zeros(weight.shape, weight.context, dtype=weight.dtype)

    def update(self, index, weight, grad, state):
        if not isinstance(index, (list, tuple)):
            index, weight, grad, state = [index], [weight], [grad], [state]
        self._update_count(index)
        # Wait for the backward pass to finish writing the gradients. Without it, the first
        # steps after Trainer.load_states went one of two ways at random (tests/test_nag.py,
        # ~1 run in 3: the same digest only with a wait on the gradients or the weights here);
        # the engine should order these by itself, and the cause inside MXNet is not found.
        for g in grad:
            g.wait_to_read()
        lrs, wds = self._get_lrs(index), self._get_wds(index)
        slots, values = [], []                # one lr input per distinct lr (lr_mult groups)
        for lr in lrs:
            if lr not in values:
                values.append(lr)
            slots.append(values.index(lr))
        key = (tuple(w.shape for w in weight), tuple(str(w.dtype) for w in weight), tuple(wds),
               tuple(slots), len(values), self.rescale_grad, self.clip_gradient, self.momentum)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._build(weight, wds, slots, len(values))
        op, order = graph
        ctx, dtype = weight[0].context, weight[0].dtype
        arrays = {"lr": [mx.nd.array([v], ctx=ctx, dtype=dtype) for v in values],
                  "w": weight, "g": grad, "m": state}
        outs = op(*[arrays[kind][i] for kind, i in order])   # the graph's own input order
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for i, (w, m) in enumerate(zip(weight, state)):
            outs[2 * i + 1].copyto(m)
            outs[2 * i].copyto(w)

    def _build(self, weights, wds, slots, n_lr):
        """``(CachedOp, input order)``: inputs ``w_i, g_i, m_i`` for every parameter and the lr
        values (``lr_j``), in the graph's order of ``list_inputs()``; outputs ``w_i', m_i'``. The operations are those of the per-parameter NDArray code
        (``x * s`` → ``_mul_scalar``, ``a + b`` → ``broadcast_add``, ``lr * x`` with ``lr`` a
        one-element input: the same float32 product)."""
        sym = mx.sym
        lr_vars = [sym.var(f"lr{j}", shape=(1,)) for j in range(n_lr)]
        outs = []
        for i, (w0, wd) in enumerate(zip(weights, wds)):
            w, g, m = sym.var(f"w{i}"), sym.var(f"g{i}"), sym.var(f"m{i}")
            if self.rescale_grad != 1.0:
                g = g * self.rescale_grad
            if self.clip_gradient is not None:
                g = sym.clip(g, -self.clip_gradient, self.clip_gradient)
            if wd:
                g = sym.broadcast_add(g, w * wd)
            m_new = sym.broadcast_add(m * self.momentum, g)
            step = sym.broadcast_mul(sym.broadcast_add(g, m_new * self.momentum), lr_vars[slots[i]])
            outs += [sym.broadcast_sub(w, step), m_new]
        group = sym.Group(outs)
        order = [(name[:2], int(name[2:])) if name.startswith("lr") else (name[0], int(name[1:]))
                 for name in group.list_inputs()]
        return mx.nd.CachedOp(group), order
