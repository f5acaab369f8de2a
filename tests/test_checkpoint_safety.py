"""Checkpoints hold no code (issue #25, item 6): parameters and optimizer state are MXNet NDArray
files, everything else JSON, and nothing from a run folder is unpickled unless the user says the
folder is theirs (``--trust-checkpoint``, for checkpoints of the old pickle format).

The unit tests round-trip a checkpoint for every registered optimizer; the CLI tests plant a
pickle whose unpickling would create a marker file, and resume a genuine old-format run (its
checkpoints written by the previous code, patched into a real training run)."""
import inspect
import json
import os
import pickle
import random
import shutil
from types import SimpleNamespace

import mxnet as mx
import numpy as np
import pytest
import yaml
from mxnet import autograd, gluon

import distill.nag  # noqa: F401  (registers deterministicnag)
from distill import checkpoint as C
from distill.errors import UserError
from distill.optim import OPTIMIZERS, optimizer_spec
from helpers import run_cli, run_patched, tiny_teacher

ND_MAGIC = (0x112).to_bytes(8, "little")


# -- helpers ---------------------------------------------------------------------------------------

def _old_save_checkpoint(folder, epoch, net, trainer, extra):
    """``save_checkpoint`` as it was before issue #25: one pickle (kept verbatim, to make
    genuine old-format checkpoints)."""
    import os
    import pickle
    import random
    import tempfile
    import numpy as np
    from distill import checkpoint as C
    os.makedirs(folder, exist_ok=True)
    fd, tmp_states = tempfile.mkstemp(prefix=".states-", dir=folder)
    os.close(fd)
    try:
        trainer.save_states(tmp_states)
        with open(tmp_states, "rb") as f:
            states = f.read()
    finally:
        os.unlink(tmp_states)
    payload = {"epoch": epoch, "params": C.net_state(net), "trainer_states": states,
               "rng": {"python": random.getstate(), "numpy": np.random.get_state()}, **extra}
    path = os.path.join(folder, f"epoch-{epoch:04d}.ckpt")
    C.atomic_write_bytes(path, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    for old in sorted(C._list(folder))[:-C.KEEP]:
        os.unlink(old[1])
    return path


class _Planted:
    """Unpickling this creates ``path``: what a hostile checkpoint could do instead."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _planted_bytes(marker):
    return pickle.dumps({"epoch": 2, "params": _Planted(marker), "trainer_states": None,
                         "history": [], "rng": None}, protocol=pickle.HIGHEST_PROTOCOL)


def _refused(res):
    out = res.stdout + res.stderr
    assert res.returncode == 2, f"exit {res.returncode}: {out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    flat = " ".join(res.stderr.split())
    for needle in ("old pickle format", "runs whatever code", "--trust-checkpoint",
                   "without --resume"):
        assert needle in flat, f"{needle!r} not in: {flat[-1500:]}"
    assert "epoch 1/" not in res.stdout and "epoch 2/" not in res.stdout


def _net_and_trainer(optimizer, seed):
    mx.random.seed(seed)
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3), gluon.nn.BatchNorm(), gluon.nn.Activation("relu"), gluon.nn.Dense(3))
    net.initialize(mx.init.Xavier())
    net(mx.nd.ones((2, 1, 6, 6)))
    name, kw = optimizer_spec(SimpleNamespace(optimizer=optimizer, momentum=0.9))
    trainer = gluon.Trainer(net.collect_params(), name, {"learning_rate": 0.1, "wd": 1e-4, **kw})
    return net, trainer


def _steps(net, trainer, n, seed):
    rs = np.random.RandomState(seed)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for _ in range(n):
        x, y = mx.nd.array(rs.rand(4, 1, 6, 6)), mx.nd.array(rs.randint(0, 3, 4))
        with autograd.record():
            loss = loss_fn(net(x), y).mean()
        loss.backward()
        trainer.step(1)


def _flat(state, prefix=""):
    """An updater state (NDArray, tuple/list of them, None) as {position: numpy array}."""
    if state is None:
        return {}
    if isinstance(state, mx.nd.NDArray):
        return {prefix: state.asnumpy()}
    out = {}
    for i, s in enumerate(state):
        out.update(_flat(s, f"{prefix}/{i}"))
    return out


def _params(net):
    return {k: p.data().asnumpy() for k, p in net._collect_params_with_prefix().items()}


MODIFIER_STATE = {
    "masks": {"masks": {"conv0_weight": {"shape": [4, 1, 3, 3],
                                         "bits": np.packbits(np.arange(36) % 3 > 0)}}},
    "pruning": {"done": [0, 1], "plan_keep": {"g0": [0, 2, 3]}, "sparsity": np.float64(0.25),
                "grads": {"conv0_weight": np.linspace(-1, 1, 36, dtype=np.float32).reshape(4, 1, 3, 3)},
                "grad_steps": 3},
    "odd": {1: (np.int64(7), None, b"\x00\xff"), "__tuple__": [np.float16(0.1)],
            "u16": np.arange(5, dtype=np.uint16), "empty": np.zeros((0, 3), np.float32),
            "scalar": np.array(2.5, np.float32), "nan": float("nan")},
}


def _same_after_steps(a, ta, b, tb, n, seed):
    """Resumed ≡ uninterrupted: ``n`` more identical steps leave the same weights, bit for bit."""
    _steps(a, ta, n, seed=seed)
    _steps(b, tb, n, seed=seed)
    for k, v in _params(a).items():
        np.testing.assert_array_equal(_params(b)[k], v, err_msg=k)


def _same(a, b, where="state"):
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype)
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}/{i}")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, (where, a, b)


# -- the format ------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", OPTIMIZERS.names())
def test_round_trip_restores_params_optimizer_and_rng(tmp_path, optimizer):
    a, ta = _net_and_trainer(optimizer, seed=1)
    _steps(a, ta, 3, seed=10)
    random.seed(5)
    np.random.seed(6)
    history = [{"epoch": 1, "val_top1": float("nan"), "loss": 0.1 + 0.2}]
    path = C.save_checkpoint(str(tmp_path), 0, a, ta, {"history": history, "modifiers": MODIFIER_STATE,
                                                       "recipe": {"trainer": {"lr": 0.1}}})
    py_next, np_next = random.random(), np.random.rand(3)

    b, tb = _net_and_trainer(optimizer, seed=2)           # other weights, fresh optimizer
    random.seed(0)
    np.random.seed(0)
    payload = C.load_checkpoint(path, b, tb)
    assert random.random() == py_next
    np.testing.assert_array_equal(np.random.rand(3), np_next)
    for k, v in _params(a).items():
        np.testing.assert_array_equal(_params(b)[k], v, err_msg=k)
    sa, sb = ta._updaters[0].states, tb._updaters[0].states
    assert sorted(sa) == sorted(sb) and sa
    for i in sa:                                         # momentum / Adam moments, bit for bit
        fa, fb = _flat(sa[i]), _flat(sb[i])
        assert sorted(fa) == sorted(fb)
        for pos in fa:
            assert fa[pos].dtype == fb[pos].dtype
            np.testing.assert_array_equal(fb[pos], fa[pos], err_msg=f"state {i}{pos}")
    oa, ob = ta._optimizer, tb._optimizer
    assert (ob.num_update, ob._index_update_count, ob.lr) == (oa.num_update, oa._index_update_count, oa.lr)
    assert ob._index_update_count is ob._all_index_update_counts[0]
    _same(MODIFIER_STATE, payload["modifiers"], "modifiers")
    _same(history, payload["history"], "history")
    assert payload["epoch"] == 0 and payload["recipe"] == {"trainer": {"lr": 0.1}}
    _same_after_steps(a, ta, b, tb, 3, seed=11)


def test_checkpoint_is_an_ndarray_file_read_without_pickle(tmp_path, monkeypatch):
    net, tr = _net_and_trainer("sgd", seed=1)
    _steps(net, tr, 2, seed=3)
    path = C.save_checkpoint(str(tmp_path), 4, net, tr, {"history": [], "modifiers": MODIFIER_STATE})
    with open(path, "rb") as f:
        assert f.read(8) == ND_MAGIC
    arrays = mx.nd.load(path)
    meta = json.loads(arrays["meta.json"].asnumpy().tobytes())
    assert meta["format"] == "distill-checkpoint" and meta["epoch"] == 4
    assert {k for k in arrays if k.startswith("params/")} == {f"params/{k}" for k in _params(net)}
    assert any(k.startswith("optimizer/states/0/") for k in arrays)
    bits = meta["modifiers"]["masks"]["masks"]["conv0_weight"]["bits"]
    assert arrays[bits["__array__"]].dtype == np.uint8

    def boom(*a, **k):
        raise AssertionError("a checkpoint was unpickled")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, boom)
    other, tr2 = _net_and_trainer("sgd", seed=2)
    assert C.load_checkpoint(path, other, tr2)["epoch"] == 4


def test_keeps_two_and_a_torn_write_leaves_the_previous(tmp_path, monkeypatch):
    net, tr = _net_and_trainer("nesterov", seed=1)
    _steps(net, tr, 1, seed=3)
    folder = str(tmp_path)
    for epoch in range(3):
        C.save_checkpoint(folder, epoch, net, tr, {"history": []})
    assert sorted(os.listdir(folder)) == ["epoch-0001.ckpt", "epoch-0002.ckpt"]
    real = os.replace
    monkeypatch.setattr(C.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        C.save_checkpoint(folder, 3, net, tr, {"history": []})
    monkeypatch.setattr(C.os, "replace", real)
    assert sorted(os.listdir(folder)) == ["epoch-0001.ckpt", "epoch-0002.ckpt"]
    # a process killed mid-write leaves a temporary (and, from the old format, .states-*)
    with open(os.path.join(folder, "epoch-0002.ckpt"), "rb") as f:
        half = f.read()[:300]
    for name in (".tmp-abc123", ".states-xyz"):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(half)
    assert C.latest_checkpoint(folder) == os.path.join(folder, "epoch-0002.ckpt")
    assert sorted(os.listdir(folder)) == ["epoch-0001.ckpt", "epoch-0002.ckpt"]
    assert C.read_checkpoint(os.path.join(folder, "epoch-0002.ckpt"))["epoch"] == 2
    # a truncated file under a final name (copied by hand, a full disk) is an error, not garbage
    with open(os.path.join(folder, "epoch-0003.ckpt"), "wb") as f:
        f.write(half)
    with pytest.raises(UserError, match="not a complete checkpoint"):
        C.read_checkpoint(os.path.join(folder, "epoch-0003.ckpt"))


def test_dist_async_checkpoint_has_no_optimizer_state(tmp_path, monkeypatch, caplog):
    net, tr = _net_and_trainer("sgd", seed=1)
    _steps(net, tr, 2, seed=3)
    monkeypatch.setattr(C, "_states_on_servers", lambda trainer: True)
    path = C.save_checkpoint(str(tmp_path), 0, net, tr, {"history": []})
    assert C.read_checkpoint(path)["optimizer"] is None
    assert not [k for k in mx.nd.load(path) if k.startswith("optimizer/")]
    other, tr2 = _net_and_trainer("sgd", seed=2)
    C.load_checkpoint(path, other, tr2)
    assert "momentum restarts from zero" in caplog.text
    for k, v in _params(net).items():
        np.testing.assert_array_equal(_params(other)[k], v)


def test_old_pickle_needs_trust_and_then_restores_exactly(tmp_path):
    a, ta = _net_and_trainer("sgd", seed=1)
    _steps(a, ta, 3, seed=10)
    path = _old_save_checkpoint(str(tmp_path), 0, a, ta, {"history": [], "modifiers": {}})
    b, tb = _net_and_trainer("sgd", seed=2)
    with pytest.raises(UserError, match=r"old pickle format.*--trust-checkpoint"):
        C.load_checkpoint(path, b, tb)
    assert C.is_legacy_checkpoint(path)
    C.load_checkpoint(path, b, tb, trust=True)
    for i, s in ta._updaters[0].states.items():
        np.testing.assert_array_equal(tb._updaters[0].states[i].asnumpy(), s.asnumpy())
    _same_after_steps(a, ta, b, tb, 2, seed=11)


def test_qat_resume_check_reads_json(tmp_path, monkeypatch):
    from distill.quantize.qat.train import _check_resume
    net, tr = _net_and_trainer("sgd", seed=1)
    sig = {"epochs": 2, "lr": 0.01, "excluded": [], "calib": {"images": 3}}
    C.save_checkpoint(str(tmp_path), 0, net, tr, {"history": [], "recipe": sig})
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    _check_resume(str(tmp_path), sig)                                    # same: fine
    with pytest.raises(UserError, match=r"other settings \(lr differ"):
        _check_resume(str(tmp_path), dict(sig, lr=0.02))
    marker = tmp_path.parent / f"{tmp_path.name}-qat-marker"
    (tmp_path / "epoch-0001.ckpt").write_bytes(_planted_bytes(str(marker)))
    with pytest.raises(UserError, match="old pickle format"):
        _check_resume(str(tmp_path), sig)
    assert not marker.exists()


# -- through the command line ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    """A 2-epoch run whose checkpoints the old code wrote (pickles), and the same recipe trained
    by the current code without interruption (the reference for resume)."""
    tmp = tmp_path_factory.mktemp("legacy")
    recipe = tiny_teacher(tmp, name="legacy", epochs=2, num_samples=320)
    patch = ("import distill.recorders as R\n" + inspect.getsource(_old_save_checkpoint)
             + "R.save_checkpoint = _old_save_checkpoint\n")
    res = run_patched(patch, recipe)
    assert res.returncode == 0, res.stderr[-3000:]
    run = os.path.join(tmp, "runs", "legacy")
    for name in ("epoch-0000.ckpt", "epoch-0001.ckpt"):
        assert C.is_legacy_checkpoint(os.path.join(run, "checkpoints", name))
    ref = tiny_teacher(tmp, name="reference", epochs=2, num_samples=320)
    res = run_cli(ref)
    assert res.returncode == 0, res.stderr[-3000:]
    return recipe, run, os.path.join(tmp, "runs", "reference")


def _clone(legacy, dst):
    """A copy of the legacy run folder and its recipe (same hash: `output` is not hashed)."""
    recipe, run, _ = legacy
    with open(recipe) as f:
        r = yaml.safe_load(f)
    r["output"]["dir"] = str(dst / "runs" / "legacy")
    shutil.copytree(run, r["output"]["dir"])
    path = dst / "legacy.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path), r["output"]["dir"]


def test_planted_pickle_is_never_unpickled(legacy, tmp_path):
    recipe, run = _clone(legacy, tmp_path)
    marker = tmp_path / "pwned"
    planted = os.path.join(run, "checkpoints", "epoch-0002.ckpt")        # the newest
    with open(planted, "wb") as f:
        f.write(_planted_bytes(str(marker)))
    control = tmp_path / "control"                # the payload is live: unpickling runs it
    pickle.loads(_planted_bytes(str(control)))
    assert control.exists()
    res = run_cli(recipe, "--resume")
    assert not marker.exists(), "--resume unpickled the planted checkpoint"
    _refused(res)
    res = run_cli("distill", "train", recipe, "--resume")
    assert not marker.exists(), "distill train --resume unpickled the planted checkpoint"
    _refused(res)
    assert os.path.exists(planted)                # refused, not silently skipped or deleted


def test_old_format_resumes_only_with_trust(legacy, tmp_path):
    recipe, run = _clone(legacy, tmp_path)
    ckpts = os.path.join(run, "checkpoints")
    os.unlink(os.path.join(ckpts, "epoch-0001.ckpt"))                   # killed in epoch 2
    os.unlink(os.path.join(run, "metrics.json"))
    _refused(run_cli(recipe, "--resume"))
    res = run_cli(recipe, "--resume", "--trust-checkpoint")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "continuing at epoch 2/2" in res.stdout
    with open(os.path.join(ckpts, "epoch-0001.ckpt"), "rb") as f:
        assert f.read(8) == ND_MAGIC                                    # written in the safe format
    assert C.read_checkpoint(os.path.join(ckpts, "epoch-0001.ckpt"))["epoch"] == 1
    # the resumed run ends where the uninterrupted one did
    ref = legacy[2]
    pa = mx.nd.load(os.path.join(ref, "model-0000.params"))
    pb = mx.nd.load(os.path.join(run, "model-0000.params"))
    assert set(pa) == set(pb)
    for k in pa:
        np.testing.assert_array_equal(pb[k].asnumpy(), pa[k].asnumpy(), err_msg=k)
    ha = json.load(open(os.path.join(ref, "metrics.json")))["history"]
    hb = json.load(open(os.path.join(run, "metrics.json")))["history"]
    assert [r["val_top1"] for r in hb] == [r["val_top1"] for r in ha]


def test_trust_flag_parses_for_quantize():
    import argparse
    from distill.quantize import cli as qcli
    p = argparse.ArgumentParser()
    qcli.add_arguments(p)
    args = p.parse_args(["runs/x", "--qat-epochs", "1", "--resume", "--trust-checkpoint"])
    assert args.resume and args.trust_checkpoint
    assert not p.parse_args(["runs/x"]).trust_checkpoint
