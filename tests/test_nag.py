"""DeterministicNAG (recipe optimizer ``nesterov``): the update is the formulas, repeats exactly
in two fresh processes, and a Trainer resumed from saved states continues exactly as the
uninterrupted one (BatchNorm running statistics included)."""
import hashlib
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from distill.nag import DeterministicNAG  # noqa: E402

SHAPES = [(8, 1, 3, 3), (8,), (8,), (16, 8, 3, 3), (10, 16), (10,)]


def _formulas(w, g, m, lr, wd, mom, rescale, clip):
    """The update in numpy float32, as the docstring states it."""
    f = np.float32
    g = g * f(rescale)
    if clip is not None:
        g = np.clip(g, f(-clip), f(clip))
    g = g + f(wd) * w
    m = f(mom) * m + g
    return w - f(lr) * (g + f(mom) * m), m


@pytest.mark.parametrize("rescale,clip", [(1.0, None), (1 / 64, None), (0.5, 0.3)])
def test_update_is_the_formulas(rescale, clip):
    rng = np.random.RandomState(0)
    opt = DeterministicNAG(momentum=0.9, learning_rate=0.1, wd=1e-3, rescale_grad=rescale,
                           clip_gradient=clip)
    wd_mult, lr_mult = {1: 0.0, 2: 0.0, 5: 0.0}, {5: 2.0}      # BN/bias without decay, one lr_mult
    opt.set_wd_mult(wd_mult)
    opt.set_lr_mult(lr_mult)
    w0 = [rng.randn(*s).astype("float32") for s in SHAPES]
    wa = [mx.nd.array(w) for w in w0]
    sa = [opt.create_state(i, w) for i, w in enumerate(wa)]
    wn, mn = [w.copy() for w in w0], [np.zeros_like(w) for w in w0]
    for step in range(5):
        lr = 0.1 * (1 + np.cos(step)) / 2 + 0.01            # changes every step, as the loop's
        opt.lr = lr
        grads = [rng.randn(*s).astype("float32") for s in SHAPES]
        for i in range(len(SHAPES)):
            opt.update(i, wa[i], mx.nd.array(grads[i]), sa[i])
            wn[i], mn[i] = _formulas(wn[i], grads[i], mn[i], lr * lr_mult.get(i, 1.0),
                                     1e-3 * wd_mult.get(i, 1.0), 0.9, rescale, clip)
    for a, n in zip(wa + sa, wn + mn):      # numpy's float32 order of operations: rounding only
        scale = max(1.0, float(np.abs(n).max()))
        assert float(np.abs(a.asnumpy() - n).max()) <= 1e-5 * scale
    assert opt.num_update == 5


def _net(seed=0):
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(8, 3, padding=1), gluon.nn.BatchNorm(), gluon.nn.Activation("relu"),
            gluon.nn.Conv2D(8, 3, padding=1), gluon.nn.BatchNorm(), gluon.nn.Activation("relu"),
            gluon.nn.GlobalAvgPool2D(), gluon.nn.Dense(4))
    mx.random.seed(seed)
    net.initialize(mx.init.Xavier())
    net.hybridize(static_alloc=True, static_shape=True)
    net(mx.nd.zeros((2, 1, 8, 8)))
    for name, p in net.collect_params().items():
        if name.endswith(("gamma", "beta", "bias")):
            p.wd_mult = 0.0
    return net


def _steps(net, trainer, start, stop):
    rng = np.random.RandomState(1)
    xs, ys = rng.randn(8, 16, 1, 8, 8).astype("float32"), rng.randint(0, 4, (8, 16))
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for k in range(start, stop):
        trainer.set_learning_rate(0.1 / (1 + k))
        with autograd.record():
            loss = loss_fn(net(mx.nd.array(xs[k])), mx.nd.array(ys[k])).mean()
        loss.backward()
        trainer.step(1)     # no host sync before the update: it must wait for backward itself


def _trainer(net):
    return gluon.Trainer(net.collect_params(), "deterministicnag",
                         {"learning_rate": 0.1, "wd": 1e-3, "momentum": 0.9})


def _digest(net):
    h = hashlib.sha256()
    for p in net.collect_params().values():      # definition order: names carry a global counter
        h.update(p.data().asnumpy().tobytes())
    return h.hexdigest()


def test_resumed_trainer_continues_exactly(tmp_path):
    full = _net()
    _steps(full, _trainer(full), 0, 8)
    half = _net()
    tr = _trainer(half)
    _steps(half, tr, 0, 4)
    half.save_parameters(str(tmp_path / "p.params"))
    tr.save_states(str(tmp_path / "t.states"))       # momentum and the pickled optimizer
    resumed = _net(seed=1)
    resumed.load_parameters(str(tmp_path / "p.params"))
    tr2 = _trainer(resumed)
    tr2.load_states(str(tmp_path / "t.states"))
    _steps(resumed, tr2, 4, 8)
    assert _digest(resumed) == _digest(full)


_CHILD = """
import sys; sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import test_nag as t
net = t._net()
t._steps(net, t._trainer(net), 0, 6)
print(t._digest(net))
"""


def test_two_fresh_processes_give_the_same_bits():
    code = _CHILD.format(root=ROOT, tests=os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="2")      # several threads: where a race would show
    out = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120) for _ in range(2)]
    for o in out:
        assert o.returncode == 0, o.stderr[-2000:]
    digests = [o.stdout.strip().splitlines()[-1] for o in out]
    # (not compared with this process: oneDNN's convolution gradients depend on the thread count)
    assert digests[0] == digests[1]
