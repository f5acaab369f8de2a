"""Faults lose nothing: a crash while writing a checkpoint leaves the previous one intact, a NaN
loss stops the run naming the step and term with the last good checkpoint kept, and an output
folder that cannot be written is reported before training starts. (SIGKILL + --resume is in
test_train.py.) Each case runs the real CLI in a subprocess; the fault is injected by a small
wrapper that patches one function before calling the same entry point as train.py."""
import os

import pytest

from distill.checkpoint import read_checkpoint
from helpers import run_cli, run_patched, tiny_student, tiny_teacher


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    t = tiny_teacher(tmp, epochs=1)
    return tmp, t


def test_crash_while_writing_checkpoint_keeps_previous(recipes):
    tmp, t = recipes
    s = tiny_student(tmp, t, name="crash", epochs=3)
    # the process dies (no cleanup, like a power cut) inside the 2nd checkpoint write, after
    # part of the bytes reached the temporary file and before the rename
    patch = """
import os, distill.checkpoint as C
_calls = {'n': 0}
_real = os.fsync
def _dying_fsync(fd):
    if '/crash/checkpoints/' in os.readlink(f'/proc/self/fd/{fd}'):
        _calls['n'] += 1
        if _calls['n'] == 2:
            os._exit(9)
    return _real(fd)
C.os.fsync = _dying_fsync
"""
    res = run_patched(patch, s)
    assert res.returncode == 9
    ckpts = os.path.join(tmp, "runs", "crash", "checkpoints")
    names = sorted(os.listdir(ckpts))
    assert [n for n in names if n.endswith(".ckpt")] == ["epoch-0000.ckpt"]
    assert [n for n in names if n.startswith(".tmp-")]     # the torn write is only a temp file
    payload = read_checkpoint(os.path.join(ckpts, "epoch-0000.ckpt"))   # intact and complete
    assert payload["epoch"] == 0 and payload["params"]
    res = run_cli(s, "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "continuing at epoch 2/3" in res.stdout
    assert not [n for n in os.listdir(ckpts) if n.startswith(".tmp-")]   # cleaned on resume


def test_nan_loss_stops_naming_step_and_term(recipes):
    tmp, t = recipes
    s = tiny_student(tmp, t, name="nan", epochs=3)
    # a NaN-producing learning rate from the second epoch on
    patch = """
import distill.trainer as T
_lr = T.lr_at
T.lr_at = lambda cfg, e: 1e30 if e >= 1 else _lr(cfg, e)
"""
    res = run_patched(patch, s)
    out = " ".join(res.stderr.split())
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert "epoch 2, step" in out and "loss term" in out and ("kd" in out or "ce" in out)
    ckpts = os.path.join(tmp, "runs", "nan", "checkpoints")
    assert sorted(n for n in os.listdir(ckpts) if n.endswith(".ckpt")) == ["epoch-0000.ckpt"]
    payload = read_checkpoint(os.path.join(ckpts, "epoch-0000.ckpt"))
    import numpy as np
    assert all(np.isfinite(v).all() for v in payload["params"].values())


def test_unwritable_output_folder_fails_before_training(recipes, tmp_path):
    tmp, t = recipes
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    s = tiny_student(tmp, t, name="unwritable", epochs=1,
                     output={"dir": str(blocker / "run")})
    res = run_cli(s)
    out = " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(blocker / "run") in out and "not writable" in out
    assert "epoch 1/" not in res.stdout


def test_full_disk_fails_before_training(recipes):
    tmp, t = recipes
    s = tiny_student(tmp, t, name="full", epochs=1)
    patch = """
import shutil, collections
_U = collections.namedtuple('usage', 'total used free')
shutil.disk_usage = lambda p: _U(10 * 2**30, 10 * 2**30 - 2**20, 2**20)
"""
    res = run_patched(patch, s)
    out = " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "MiB free" in out and "output.dir" in out
    assert "epoch 1/" not in res.stdout
