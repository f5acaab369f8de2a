"""Data parallel training over several devices (two CPU contexts here: MXNet treats cpu(0) and
cpu(1) as distinct devices; GPUs take the same path), and step checkpoints
(``trainer.checkpoint_every``): SIGKILL mid-epoch → ``--resume`` equals the uninterrupted run."""
import json
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

from distill import devices
from distill.data import load_data
from distill.errors import UserError
from distill.losses import build_loss
from distill.modifier import Modifier
from distill.recipe import DataConfig, LossTerm, TrainerConfig
from distill.trainer import Term, fit
from helpers import kill_when, run_cli, run_patched, same_runs, tiny_student, tiny_teacher


def test_device_names():
    assert devices.contexts(["cpu"]) == [mx.cpu(0)]
    assert devices.contexts(["cpu0", "cpu1"]) == [mx.cpu(0), mx.cpu(1)]
    assert devices.is_plain_cpu(devices.contexts(["cpu"]))
    with pytest.raises(UserError, match="tpu0"):
        devices.contexts(["tpu0"])
    with pytest.raises(UserError, match="twice"):
        devices.contexts(["cpu0", "cpu"])
    if mx.context.num_gpus() == 0:
        with pytest.raises(UserError, match="GPU"):
            devices.contexts(["gpu0"])


@pytest.mark.parametrize("n,k", [(64, 2), (7, 3), (1, 2), (5, 5), (3, 8)])
def test_slices_cover_the_batch(n, k):
    cuts = devices.slices(n, k)
    sizes = [c.stop - c.start for c in cuts]
    assert sum(sizes) == n and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert len(cuts) == min(n, k) and cuts[0].start == 0 and cuts[-1].stop == n


class _Plain(gluon.HybridBlock):
    """No BatchNorm: per-device batch statistics would make one device and two differ."""

    def __init__(self, classes):
        super().__init__()
        with self.name_scope():
            self.conv = gluon.nn.Conv2D(8, 3, padding=1, activation="relu")
            self.pool = gluon.nn.GlobalAvgPool2D()
            self.fc = gluon.nn.Dense(classes)

    def hybrid_forward(self, F, x):
        return self.fc(self.pool(self.conv(x)))


class _ReplicaWatch(Modifier):
    """Records, at every epoch end, the largest difference between the replicas of a parameter
    (relative to its scale)."""
    name = "replica_watch"

    def __init__(self):
        self.worst = []

    def initialize(self, net, trainer, data):
        self.net = net

    def epoch_end(self, epoch):
        worst = 0.0
        for p in self.net.collect_params().values():
            reps = [d.asnumpy() for d in p.list_data()]
            scale = max(1.0, float(np.abs(reps[0]).max()))
            worst = max([worst] + [float(np.abs(r - reps[0]).max()) / scale for r in reps[1:]])
        self.worst.append((len(p.list_data()), worst))


def _fit(names, bn=False, epochs=1, seed=3):
    data = load_data(DataConfig(name="synthetic", num_samples=400, num_classes=4, image_size=8), seed=0)
    mx.random.seed(seed)
    if bn:
        from students import build_student
        net = build_student("mobilenet0.25", 1, 4, (8, 8), seed=seed)
    else:
        net = _Plain(4)
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    net(mx.nd.array(data.train.x[:2]))
    net.hybridize(static_alloc=True, static_shape=True)
    block = build_loss(LossTerm(loss="ce", weight=1.0))
    block.initialize(ctx=mx.cpu())
    watch = _ReplicaWatch()
    cfg = TrainerConfig(epochs=epochs, batch_size=32, lr=0.05, seed=seed, progress=False, devices=names)
    out = fit(net, net, None, data, [Term("ce", 1.0, block)], cfg, log=lambda *_: None,
              modifiers=[watch])
    params = {k: p.data(mx.cpu()).asnumpy() for k, p in net._collect_params_with_prefix().items()}
    return params, out["history"], watch.worst


def test_two_cpu_devices_match_one_at_the_same_global_batch():
    one, h1, _ = _fit(["cpu"], epochs=2)
    two, h2, worst = _fit(["cpu0", "cpu1"], epochs=2)
    assert set(one) == set(two)
    for k in one:
        scale = max(1.0, float(np.abs(one[k]).max()))
        assert np.abs(one[k] - two[k]).max() <= 1e-4 * scale, k
    assert h2[-1]["loss"] == pytest.approx(h1[-1]["loss"], rel=1e-4)
    # both replicas held the same parameters all along
    assert [w[0] for w in worst] == [2, 2] and max(w[1] for w in worst) <= 1e-6


def test_batchnorm_statistics_are_the_same_on_every_replica():
    params, hist, worst = _fit(["cpu0", "cpu1"], bn=True)
    assert worst and worst[0][0] == 2 and worst[0][1] <= 1e-6
    assert np.isfinite(hist[-1]["loss"])
    assert all(np.isfinite(v).all() for v in params.values())   # back on the CPU, usable


def test_train_py_devices_flag_and_channel_pruning_masks_on_both_replicas(tmp_path):
    """``--devices cpu0,cpu1`` with channel pruning: at every checkpoint both replicas are equal
    and the pruned channels are zero on both (checked inside the run)."""
    t = tiny_teacher(tmp_path, epochs=1)
    s = tiny_student(tmp_path, t, name="pruned", epochs=2, model="cifar_resnet20_v1",
                     pruning={"enabled": True, "granularity": "channel", "final_sparsity": 0.5,
                              "start_epoch": 0, "end_epoch": 1, "round_to": 4})
    patch = (
        "import numpy as np\n"
        "import distill.recorders as R\n"
        "orig = R.Checkpointer.record\n"
        "def record(self, epoch, row, loop):\n"
        "    params = loop.owner.collect_params().items()\n"
        "    if len(next(iter(params))[1].list_ctx()) == 1:\n"
        "        return orig(self, epoch, row, loop)       # the teacher's own run: one device\n"
        "    for name, p in params:\n"
        "        reps = [d.asnumpy() for d in p.list_data()]\n"
        "        assert len(reps) == 2, name\n"
        "        assert np.array_equal(reps[0] == 0, reps[1] == 0), name\n"
        "        assert np.abs(reps[0] - reps[1]).max() <= 1e-6 * max(1.0, np.abs(reps[0]).max()), name\n"
        "    print('REPLICAS-CHECKED', epoch, flush=True)\n"
        "    return orig(self, epoch, row, loop)\n"
        "R.Checkpointer.record = record\n")
    res = run_patched(patch, s, "--devices", "cpu0,cpu1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("REPLICAS-CHECKED") == 2
    assert "2 devices: cpu(0), cpu(1)" in res.stdout
    metrics = json.load(open(os.path.join(tmp_path, "runs", "pruned", "metrics.json")))
    assert metrics["student"]["top1"] > 0


def test_sigkill_mid_epoch_then_resume_from_the_step_checkpoint(tmp_path):
    t = tiny_teacher(tmp_path, epochs=1)
    extra = dict(data={"num_samples": 1600, "augment": ["crop", "hflip"]},
                 trainer={"checkpoint_every": 10})
    ref = tiny_student(tmp_path, t, name="ref", epochs=2, **extra)
    res = run_cli(ref)
    assert res.returncode == 0, res.stderr[-2000:]
    killed = tiny_student(tmp_path, t, name="killed", epochs=2, **extra)
    run = os.path.join(tmp_path, "runs", "killed")
    kill_when(killed, os.path.join(run, "checkpoints", "epoch-0001-step-000010.ckpt"))  # epoch 2
    assert not os.path.exists(os.path.join(run, "metrics.json"))
    res = run_cli(killed, "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "continuing at epoch 2/2, step 11" in res.stdout
    same_runs(os.path.join(tmp_path, "runs", "ref"), run, exact=True)
