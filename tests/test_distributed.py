"""Distributed distillation on MXNet's dist_sync KVStore through ``distill launch``: 1 server and
2 workers on loopback, a tiny channel-pruning recipe (pruned at the start of epoch 2, from the
weights trained in epoch 1 on two different shards).

Each rank dumps its final parameters and masks (``DISTILL_DEBUG_STATE_DIR``) so the test can
compare the workers; a worker killed mid-epoch must fail the launch naming its rank, and
``--resume`` of the same launch must end with the parameters of the uninterrupted run.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from distill.distributed import DUMP_ENV, create_kvstore, shard_indices
from distill.launch import add_arguments
from distill.errors import UserError
from helpers import ROOT

STEPS_PER_EPOCH = 4            # 128 images / 2 workers / batch 16


def _recipe(tmp, name):
    r = {"name": name,
         "data": {"name": "synthetic", "num_samples": 200, "num_classes": 4, "image_size": 16,
                  "limit": 128},
         "student": {"model": "cifar_resnet20_v1"},
         "distillation": [{"loss": "ce", "weight": 1.0}],
         "pruning": {"enabled": True, "granularity": "channel", "criterion": "l1",
                     "schedule": "oneshot", "start_epoch": 1, "final_sparsity": 0.5,
                     "exclude": ["last"]},
         "trainer": {"epochs": 2, "batch_size": 16, "lr": 0.05, "progress": False,
                     "kvstore": "dist_sync"},
         "output": {"dir": os.path.join(str(tmp), "runs", name), "latency": False}}
    path = os.path.join(str(tmp), name + ".yaml")
    with open(path, "w") as f:
        yaml.safe_dump(r, f)
    return path, r["output"]["dir"]


def _launch(worker_cmd, dump_dir, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **{DUMP_ENV: str(dump_dir)})
    # `python -m distill.launch` is `distill launch` without the CLI importing every subcommand
    cmd = [sys.executable, "-m", "distill.launch", "-n", "2", "-s", "1", "--", *worker_cmd]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return res, time.time() - t0


def _train_cmd(recipe, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), recipe, *extra]


def _state(dump_dir, rank):
    with np.load(os.path.join(str(dump_dir), f"rank-{rank}.npz")) as z:
        return {k: z[k] for k in z.files if k != "names"}


def _max_rel_diff(a, b):
    """max |a - b| over every array, relative to max(1, max |a|)."""
    worst = 0.0
    for k in a:
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        worst = max(worst, float(np.abs(x - y).max(initial=0)) / max(1.0, float(np.abs(x).max(initial=0))))
    return worst


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    recipe, run = _recipe(tmp, "whole")
    res, _ = _launch(_train_cmd(recipe), tmp / "dump")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    return tmp, recipe, run, res.stdout, tmp / "dump"


def test_shards_are_disjoint_equal_and_cover_all_classes():
    y = np.repeat(np.arange(4), 33)                     # sorted by class, 132 images
    parts = [shard_indices(len(y), r, 2) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 66
    assert not set(parts[0]) & set(parts[1])
    assert all(set(y[p]) == {0, 1, 2, 3} for p in parts)
    with pytest.raises(UserError, match="workers"):
        shard_indices(1, 0, 2)


def _write_rec(prefix, labels):
    import mxnet as mx
    w = mx.recordio.MXIndexedRecordIO(str(prefix) + ".idx", str(prefix) + ".rec", "w")
    for i, lab in enumerate(labels):              # image i is gray 10 * i: its identity
        img = np.full((6, 7), 10 * i, np.uint8)
        w.write_idx(i, mx.recordio.pack_img(mx.recordio.IRHeader(0, float(lab), i, 0), img, img_fmt=".png"))
    w.close()
    return str(prefix)


def test_recordio_workers_read_disjoint_parts_of_the_same_split(tmp_path):
    from distill.data import load_data
    from distill.recipe import DataConfig
    cfg = DataConfig(name="recordio", root=_write_rec(tmp_path / "r", [0, 1, 2, 3] * 6), val_split=0.25)
    ids = lambda split: {int(round(v * 255 / 10)) for v in split.x[:, 0, 0, 0]}   # noqa: E731
    whole = load_data(cfg, seed=0)
    parts = [load_data(cfg, seed=0, part_index=r, num_parts=2) for r in range(2)]
    assert not ids(parts[0].train) & ids(parts[1].train)
    assert ids(parts[0].train) | ids(parts[1].train) == ids(whole.train)
    assert all(ids(p.val) == ids(whole.val) and p.num_classes == whole.num_classes for p in parts)
    assert max(ids(parts[0].train)) < min(ids(parts[1].train))   # contiguous runs of records


def test_two_workers_end_identical_and_rank0_writes_the_run_folder(uninterrupted):
    tmp, recipe, run, out, dump = uninterrupted
    assert "[rank 0]" in out and "[rank 1]" in out and "all 2 worker(s) finished" in out
    s0, s1 = _state(dump, 0), _state(dump, 1)
    assert set(s0) == set(s1)
    masks = [k for k in s0 if k.startswith("mask:")]
    assert masks and any(not s0[k].all() for k in masks)       # pruning removed channels
    for k in masks:
        assert np.array_equal(s0[k], s1[k]), k
    assert _max_rel_diff(s0, s1) == 0.0                         # weights, BN statistics: all equal
    # each rank trained on its own shard: the per-rank losses of epoch 1 differ
    losses = {r: [l for l in out.splitlines() if l.startswith(f"[rank {r}] epoch 1/2")] for r in (0, 1)}
    assert losses[0] and losses[1] and losses[0][0].split("loss")[1] != losses[1][0].split("loss")[1]
    # rank 0's run folder is complete; the other rank wrote nothing into it
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["complete"] and len(metrics["history"]) == 2
    assert metrics["distributed"] == {"kvstore": "dist_sync", "workers": 2, "batch_per_worker": 16,
                                      "global_batch": 32}
    assert metrics["data"]["train"] == 64                       # rank 0's shard
    for name in ("recipe.yaml", "train.log", "model-symbol.json", "model-0000.params",
                 "pruning-plan.json"):
        assert os.path.isfile(os.path.join(run, name)), name
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["epoch-0000.ckpt", "epoch-0001.ckpt"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run, "tb")))
    with open(os.path.join(run, "train.log")) as f:
        log = f.read()
    assert "rank 0 of 2" in log and "rank 1 of 2" not in log
    # the servers hold every array at its first shape: masked while training, said so, rebuilt once
    assert "does not work with a dist_* kvstore" in log
    assert metrics["student"]["pruning"]["shrink"] == "end"


_KILL = """
import os, signal, sys
from mxnet import gluon
_real, _n = gluon.Trainer.step, [0]
def _step(self, *a, **k):
    _real(self, *a, **k)
    _n[0] += 1
    if self._kvstore is not None and self._kvstore.rank == 1 and _n[0] == {at}:
        os.kill(os.getpid(), signal.SIGKILL)          # mid epoch 2, after epoch 1's checkpoint
gluon.Trainer.step = _step
sys.argv = ["train.py", {recipe!r}]
from distill.cli import train_main
sys.exit(train_main())
"""


def test_killed_worker_fails_the_launch_and_resume_matches(uninterrupted):
    tmp, _, whole_run, _, whole_dump = uninterrupted
    recipe, run = _recipe(tmp, "killed")
    res, took = _launch([sys.executable, "-c", _KILL.format(at=STEPS_PER_EPOCH + 2, recipe=recipe)],
                        tmp / "dump_killed")
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-2000:]
    assert "kvstore rank 1" in res.stderr and "SIGKILL" in res.stderr and "--resume" in res.stderr
    assert took < 60                                            # no hang
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["epoch-0000.ckpt"]
    assert not os.path.exists(os.path.join(run, "metrics.json"))
    res, _ = _launch(_train_cmd(recipe, "--resume"), tmp / "dump_resumed")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "continuing at epoch 2/2" in res.stdout
    whole, resumed = _state(whole_dump, 0), _state(tmp / "dump_resumed", 0)
    assert set(whole) == set(resumed)
    assert _max_rel_diff(whole, resumed) == 0.0        # 2 workers: the server's sum is a + b = b + a
    assert _max_rel_diff(resumed, _state(tmp / "dump_resumed", 1)) == 0.0


def test_dist_kvstore_outside_a_launch_is_a_user_error(monkeypatch):
    monkeypatch.delenv("DMLC_ROLE", raising=False)
    with pytest.raises(UserError, match="distill launch"):
        create_kvstore("dist_sync")
    assert not create_kvstore("local").distributed and create_kvstore("local").trainer_kvstore() is None


def test_launch_is_a_subcommand_and_takes_the_command_after_dashes():
    import argparse
    from distill.cli import SUBCOMMANDS
    assert SUBCOMMANDS["launch"][0] == "distill.launch"
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["-n", "2", "--", "python", "train.py", "r.yaml", "--resume", "--set", "a=b"])
    assert (args.workers, args.servers) == (2, 1)
    assert args.command == ["python", "train.py", "r.yaml", "--resume", "--set", "a=b"]
