"""Parameters on several devices (issue #26 item 3): the replica helpers, pruning masks, QAT ranges
and BatchNorm statistics identical on every replica, and checkpoints that move between device
lists. ``[cpu(0), cpu(1)]`` are two devices to MXNet (each its own replica), as two GPUs are."""
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from helpers import random_params
from distill import replicas as R
from distill import checkpoint as C
from distill.graphio import make_block
from distill.pruning.gradients import accumulate_grads
from distill.pruning.modifier import build_modifiers
from distill.recipe import recipe_from_dict

TWO = [mx.cpu(0), mx.cpu(1)]
ONE = [mx.cpu(0)]
# as on [gpu(0), gpu(1)]: no replica on the current context, where ``param.data()`` looks (and fails)
OFF = [mx.cpu(1), mx.cpu(2)]


def _net(ctx, seed=0, global_stats=False):
    """Conv-BN-ReLU-Dense. ``global_stats``: BatchNorm on its running statistics in backward too
    (MXNet 1.9's BatchNorm backward under ``train_mode=False`` still uses the batch's statistics,
    so a slice's gradient would depend on the slice: not what these tests are about)."""
    mx.random.seed(seed)
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=2),
            gluon.nn.BatchNorm(in_channels=4, use_global_stats=global_stats),
            gluon.nn.Activation("relu"), gluon.nn.Dense(3, in_units=4 * 4 * 4))
    net.initialize(mx.init.Xavier(), ctx=ctx)
    net.hybridize()
    return net


def _batch(seed, n=8, shape=(2, 6, 6)):
    rs = np.random.RandomState(seed)
    x = rs.normal(size=(n,) + shape).astype("float32")
    x[n // 2:] *= 3.0                     # the two slices see different statistics
    return mx.nd.array(x), mx.nd.array(rs.randint(0, 3, n))


def _backward(net, x, y, ctx, train_mode=True):
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    xs, ys = gluon.utils.split_and_load(x, ctx), gluon.utils.split_and_load(y, ctx)
    with autograd.record(train_mode=train_mode):
        losses = [loss_fn(net(a), b) for a, b in zip(xs, ys)]
    autograd.backward(losses)


def _replicas(p):
    return [d.asnumpy() for d in p.list_data()]


# -- the helpers -----------------------------------------------------------------------------------

def test_helpers_read_one_replica_and_write_all():
    net = _net(TWO)
    pd = net.collect_params()
    w, rm = pd[net[0].weight.name], pd[net[1].running_mean.name]
    assert R.contexts(net) == TWO and R.first(w).context == mx.cpu(0)
    R.set_all(w, np.full(w.shape, 0.5, "float32"))          # trainable: through set_data
    R.set_all(rm, mx.nd.full(rm.shape, 2.0))                # running statistic: in place
    assert all((a == 0.5).all() for a in _replicas(w)) and all((a == 2.0).all() for a in _replicas(rm))
    mask = np.arange(w.data().size).reshape(w.shape) % 3 > 0
    R.apply_mask(w, mask)
    R.apply_mask(w, R.mask_arrays(w, mask))                 # the per-device copies, again
    for a in _replicas(w):
        assert (a[~mask] == 0).all() and (a[mask] == 0.5).all()
    assert R.differing(net) == [] and R.assert_replicas_equal(net) == []
    # a difference relative to the values' scale: 1e-7 of 0.5 passes at 1e-6, 1e-3 does not
    w.data(mx.cpu(1))[:] += 5e-8 * mx.nd.array(mask, ctx=mx.cpu(1))
    assert R.differing(net, rtol=1e-6) == []
    w.data(mx.cpu(1))[:] += 1e-3
    assert R.differing(net, rtol=1e-6) == [w.name]
    with pytest.raises(R.ReplicaMismatch) as e:
        R.assert_replicas_equal(net)
    assert e.value.names == [w.name] and w.name in str(e.value)


def test_grad_sum_is_the_whole_batch_gradient_and_what_a_step_leaves():
    """Each replica holds its slice's gradient; their sum is one device's gradient of the whole
    batch. After ``trainer.step`` with the ``device`` KVStore: still the slice's with
    ``update_on_kvstore`` (MXNet's default), the sum with it off (distill.replicas' docstring)."""
    x, y = _batch(1)
    one = _net(ONE, global_stats=True)
    _backward(one, x, y, ONE, train_mode=False)
    ref = {n: p.grad().asnumpy() for n, p in one._collect_params_with_prefix().items()
           if p.grad_req != "null"}
    names = sorted(ref)
    for uok in (None, False):
        two = _net(TWO, global_stats=True)
        kw = {} if uok is None else {"update_on_kvstore": uok}
        trainer = gluon.Trainer(two.collect_params(), "sgd", {"learning_rate": 0.1, "momentum": 0.9},
                                kvstore="device", **kw)
        _backward(two, x, y, TWO, train_mode=False)
        pd = two._collect_params_with_prefix()
        slices = {n: [g.asnumpy() for g in pd[n].list_grad()] for n in names}
        for n in names:
            assert not np.allclose(slices[n][0], slices[n][1])
            np.testing.assert_allclose(R.grad_sum(pd[n]).asnumpy(), ref[n], rtol=1e-4, atol=1e-6)
        trainer.step(len(x))
        for n in names:
            after = [g.asnumpy() for g in pd[n].list_grad()]
            if trainer._update_on_kvstore:
                np.testing.assert_array_equal(after[0], slices[n][0])
            else:
                np.testing.assert_allclose(after[1], slices[n][0] + slices[n][1], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(R.grad_after_step(pd[n], trainer).asnumpy(), ref[n],
                                       rtol=1e-4, atol=1e-6)
        assert R.differing(two) == []                      # the update itself keeps them equal


def test_running_stats_drift_and_sync_to_their_mean():
    net = _net(TWO)
    x, y = _batch(2)
    for _ in range(2):
        _backward(net, x, y, TWO)          # MXNet updates the running statistics in backward
    stats = [p for p in net.collect_params().values() if p.grad_req == "null"]
    drifted = R.differing(net)
    assert drifted and set(drifted) == {p.name for p in stats}
    weights = {p.name: _replicas(p) for p in net.collect_params().values() if p.grad_req != "null"}
    means = {p.name: np.mean(_replicas(p), axis=0) for p in stats}
    assert sorted(R.sync_running_stats(net)) == sorted(means)
    assert R.differing(net, rtol=0.0) == []
    for p in stats:
        np.testing.assert_allclose(R.first(p).asnumpy(), means[p.name], rtol=1e-6)
    for n, reps in weights.items():                        # trainable parameters untouched
        for a, b in zip(reps, _replicas(net.collect_params()[n])):
            np.testing.assert_array_equal(a, b)
    before = {p.name: _replicas(p) for p in stats}
    R.sync_running_stats(net)                              # agreeing replicas stay bit for bit
    for p in stats:
        for a, b in zip(before[p.name], _replicas(p)):
            np.testing.assert_array_equal(a, b)


# -- pruning masks -----------------------------------------------------------------------------------

def _graph(global_stats=False):
    data = mx.sym.var("data")
    bn = dict(fix_gamma=False, use_global_stats=global_stats)
    x = mx.sym.Convolution(data, num_filter=8, kernel=(3, 3), pad=(1, 1), name="c0")
    x = mx.sym.Activation(mx.sym.BatchNorm(x, name="bn0", **bn), act_type="relu")
    x = mx.sym.Convolution(x, num_filter=8, kernel=(3, 3), pad=(1, 1), name="c1")
    x = mx.sym.Activation(mx.sym.BatchNorm(x, name="bn1", **bn), act_type="relu")
    x = mx.sym.Pooling(x, global_pool=True, kernel=(1, 1), pool_type="avg")
    return mx.sym.FullyConnected(mx.sym.Flatten(x), num_hidden=4, name="fc")


def _sym_net(ctx, global_stats=False):
    sym = _graph(global_stats)
    params = random_params(sym)
    net = make_block(sym, params)
    net.collect_params().reset_ctx(ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    return net


class _Split:
    def __init__(self, x, y):
        self.x, self.y = x, y


class _Data:
    def __init__(self, n=40):
        rs = np.random.RandomState(0)
        self.train = _Split(rs.normal(size=(n, 3, 8, 8)).astype("float32"), rs.randint(0, 4, n))
        self.val = _Split(rs.normal(size=(16, 3, 8, 8)).astype("float32"), rs.randint(0, 4, 16))


@pytest.mark.parametrize("devices", [TWO, OFF], ids=["cpu01", "cpu12"])
@pytest.mark.parametrize("granularity,criterion", [("unstructured", "l1"), ("channel", "taylor")])
def test_pruning_masks_every_replica_alike(tmp_path, granularity, criterion, devices):
    r = recipe_from_dict({"pruning": {"enabled": True, "granularity": granularity, "criterion": criterion,
                                      "schedule": "oneshot", "start_epoch": 0, "round_to": 1,
                                      "final_sparsity": 0.5, "exclude": ["last"],
                                      **({"shrink": "end"} if granularity == "channel" else {})},
                          "trainer": {"epochs": 2}, "output": {"dir": str(tmp_path)}})
    net, data = _sym_net(devices), _Data()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-3},
                            kvstore="device")
    pruner, keeper = build_modifiers(r, log=lambda *a: None)
    for m in (pruner, keeper):
        m.initialize(net, trainer, data)
    pruner.epoch_start(0)                  # the mask update (taylor: a calibration pass first)
    pd = net.collect_params()
    assert keeper.masks and R.differing(net) == []

    def masked():
        for name, m in keeper.masks.items():
            for a in _replicas(pd[name]):
                assert (a[~m] == 0).all(), name
        return sum(int((~m).sum()) for m in keeper.masks.values())

    assert masked() > 0
    x, y = mx.nd.array(data.train.x[:8]), mx.nd.array(data.train.y[:8])
    for step in range(2):                  # momentum and weight decay act on every replica
        _backward(net, x, y, devices)
        trainer.step(8)
        for m in (pruner, keeper):
            m.after_step(0, step, 2)
        masked()
        R.sync_running_stats(net)
        assert R.differing(net) == []
    if granularity == "channel":           # rebuilt smaller from replica 0, checked vs the masked net
        small = pruner.finalize(net, data, lambda *a: None)
        assert small.collect_params()["c0_weight"].shape[0] < 8


def test_taylor_calibration_gradients_do_not_depend_on_the_devices():
    data = _Data()
    out = []
    for ctx in (ONE, TWO):
        net = _sym_net(ctx, global_stats=True)      # see _net
        acc = {n: mx.nd.zeros(p.shape) for n, p in net.collect_params().items() if p.grad_req != "null"}
        # 40 images in batches of 16: the last one (8) is split too
        assert accumulate_grads(net, data.train.x, data.train.y, acc, seed=0, batches=3, batch_size=16) == 3
        out.append({n: a.asnumpy() for n, a in acc.items()})
    for n, a in out[0].items():
        np.testing.assert_allclose(out[1][n], a, rtol=1e-4, atol=1e-5 * np.abs(a).max(), err_msg=n)


# -- QAT ranges ------------------------------------------------------------------------------------

@pytest.mark.isa
def test_qat_ranges_and_statistics_identical_on_every_replica(tmp_path):
    from distill.quantize.calibrators import calibrate
    from distill.quantize.graph import FloatModel
    from distill.quantize.qat import build_qat_net, quant_plan
    from distill.quantize.qat.fakequant import SCALE_SUFFIX
    from distill.quantize.qat.train import FreezeBN
    rs = np.random.RandomState(0)
    x = rs.uniform(0, 1, size=(32, 1, 8, 8)).astype("float32")
    y = rs.randint(0, 4, 32)
    mx.random.seed(0)
    fp = gluon.nn.HybridSequential()
    fp.add(gluon.nn.Conv2D(8, 3, padding=1, use_bias=False), gluon.nn.BatchNorm(), gluon.nn.Activation("relu"),
           gluon.nn.GlobalAvgPool2D(), gluon.nn.Dense(4))
    fp.initialize(mx.init.Xavier())
    fp.hybridize()
    fp(mx.nd.array(x[:2]))
    prefix = os.path.join(str(tmp_path), "model")
    fp.export(prefix, 0)
    model = FloatModel.from_prefix(prefix, (1, 8, 8))
    plan = quant_plan(model, calibrate(model, x, "naive", 16), [])
    net = build_qat_net(model, plan)
    live = net.live.collect_params()         # the frozen twin shares them
    live.reset_ctx(TWO)
    scales = [p for n, p in live.items() if n.endswith(SCALE_SUFFIX)]
    start = {p.name: R.first(p).asnumpy().copy() for p in scales}
    trainer = gluon.Trainer(live, "sgd", {"learning_rate": 0.5, "momentum": 0.9}, kvstore="device")
    freeze = FreezeBN(net, freeze_bn_epoch=1)
    for epoch in range(2):
        freeze.epoch_start(epoch)
        for i in range(0, 32, 16):
            _backward(net, mx.nd.array(x[i:i + 16]), mx.nd.array(y[i:i + 16]), TWO)
            trainer.step(16)
        if epoch == 0:                      # batch statistics: each replica's running stats drift
            assert R.differing(live) and all(n.endswith(("mean", "var")) for n in R.differing(live))
    assert R.differing(live) == []          # FreezeBN averaged them before freezing
    moved = [p.name for p in scales if not np.allclose(R.first(p).asnumpy(), start[p.name])]
    assert moved                            # the ranges did learn ...
    for p in scales:                        # ... alike on both devices: the same int8 table
        a, b = _replicas(p)
        np.testing.assert_array_equal(a, b)
    assert plan.thresholds({p.name: p.data(mx.cpu(1)) for p in scales}) == \
        plan.thresholds({p.name: R.first(p) for p in scales})


# -- checkpoints between device lists ----------------------------------------------------------------

def _trainer(net, optimizer, uok=None):
    kw = {} if uok is None else {"update_on_kvstore": uok}
    args = {"learning_rate": 0.1, "wd": 1e-4, **({"momentum": 0.9} if optimizer == "sgd" else {})}
    return gluon.Trainer(net.collect_params(), optimizer, args, kvstore="device", **kw)


def _train(net, trainer, ctx, steps, seed):
    for s in range(steps):
        x, y = _batch(seed + s)
        _backward(net, x, y, ctx, train_mode=False)     # BN on running stats: slices sum exactly
        trainer.step(len(x))


def _states(trainer):
    return [{i: np.concatenate([a.asnumpy().ravel() for a in (s if isinstance(s, (list, tuple)) else [s])])
             for i, s in u.states.items() if s is not None} for u in C._updaters(trainer)]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("src,dst,uok", [(TWO, ONE, None), (ONE, TWO, None), (ONE, TWO, False),
                                         (TWO, TWO, False), (OFF, ONE, False)])
def test_checkpoint_moves_between_device_lists(tmp_path, optimizer, src, dst, uok):
    """Saved on one device list, loaded on another: the same parameters on every replica, the same
    optimizer state (momentum, Adam's moments and update counts) on every device, and the next
    step is the step the saving run would have taken."""
    a = _net(src, seed=1, global_stats=True)
    ta = _trainer(a, optimizer, uok if len(src) > 1 else None)
    _train(a, ta, src, 3, seed=10)
    R.sync_running_stats(a)
    path = C.save_checkpoint(str(tmp_path), 0, a, ta, {"history": []})
    saved = _states(ta)[0]
    b = _net(dst, seed=2, global_stats=True)
    tb = _trainer(b, optimizer, uok if len(dst) > 1 else None)
    # a trainer that has stepped already: its KVStore no longer copies replica 0 to the others
    # when it starts, so only a load that writes every replica gives them all the checkpoint
    _train(b, tb, dst, 1, seed=5)
    C.load_checkpoint(path, b, tb)
    pa, pb = a._collect_params_with_prefix(), b._collect_params_with_prefix()
    for k in pa:
        for rep in _replicas(pb[k]):
            np.testing.assert_array_equal(rep, R.first(pa[k]).asnumpy(), err_msg=k)
    for per_device in _states(tb):          # every updater gets the saved momentum / moments
        assert sorted(per_device) == sorted(saved)
        for i in saved:
            np.testing.assert_array_equal(per_device[i], saved[i])
    _train(a, ta, src, 2, seed=20)
    _train(b, tb, dst, 2, seed=20)
    assert R.differing(b) == []             # Adam's per-device step counts came along too
    for k in pa:
        np.testing.assert_allclose(R.first(pb[k]).asnumpy(), R.first(pa[k]).asnumpy(),
                                   rtol=1e-4, atol=1e-6, err_msg=k)
