"""Shared test helpers: tiny recipes that run in seconds, and the CLI in a subprocess."""
import os
import subprocess
import sys


import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench._smoke import write_fashion  # noqa: E402,F401  (tiny idx files; the fashion bench's smoke uses them too)


def tiny_teacher(tmp, name="tiny_teacher", epochs=2, **data):
    """Write a teacher recipe (synthetic data, cifar_resnet20_v1) into ``tmp``; return its path."""
    d = {"name": "synthetic", "num_samples": 640, "num_classes": 4, "image_size": 16, **data}
    r = {"name": name, "data": d, "student": {"model": "cifar_resnet20_v1"},
         "distillation": [{"loss": "ce", "weight": 1.0}],
         "trainer": {"epochs": epochs, "batch_size": 32, "lr": 0.1, "progress": False},
         "output": {"dir": os.path.join(str(tmp), "runs", name), "latency_repeats": 2}}
    path = os.path.join(str(tmp), name + ".yaml")
    with open(path, "w") as f:
        yaml.safe_dump(r, f)
    return path


def tiny_student(tmp, teacher_path, name="tiny_student", epochs=4, model="mobilenet0.25", **extra):
    """Write a KD student recipe next to ``teacher_path``; return its path."""
    with open(teacher_path) as f:
        data = yaml.safe_load(f)["data"]
    r = {"name": name, "data": data, "teacher": {"recipe": os.path.basename(teacher_path)},
         "student": {"model": model},
         "distillation": [{"loss": "kd", "weight": 0.7, "temperature": 4.0}, {"loss": "ce", "weight": 0.3}],
         "trainer": {"epochs": epochs, "batch_size": 32, "lr": 0.1, "progress": False},
         "output": {"dir": os.path.join(str(tmp), "runs", name), "latency_repeats": 2}}
    for k, v in extra.items():
        r.setdefault(k, {}).update(v) if isinstance(v, dict) else r.__setitem__(k, v)
    path = os.path.join(str(tmp), name + ".yaml")
    with open(path, "w") as f:
        yaml.safe_dump(r, f)
    return path


def run_cli(*args, cwd=None, timeout=600, **popen):
    """Run ``python train.py ARGS`` (or ``-m distill.cli`` with ``distill`` first) in a subprocess.

    Always with two OpenMP threads: a trained model's numerics depend on the thread count, and
    the thresholds and bit-for-bit resume checks of the tests were set on two."""
    if args and args[0] == "distill":
        cmd = [sys.executable, "-m", "distill.cli", *args[1:]]
    else:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2")
    return subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def run_patched(patch, *args):
    """``train.py ARGS`` in a subprocess that first runs the Python lines ``patch`` (a fault or
    an old code path planted for the test)."""
    code = (f"import sys\nsys.argv = ['train.py'] + {list(args)!r}\n{patch}\n"
            "from distill.cli import train_main\nsys.exit(train_main())\n")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)




def kill_when(recipe, path, after_s=0.0, timeout=300):
    """Start ``train.py recipe``, wait until ``path`` exists (a checkpoint), wait ``after_s``
    more, then SIGKILL it: a run cut off at a known point."""
    import signal
    import time
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), recipe],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None and time.time() < deadline, f"run ended before {path} existed"
        time.sleep(0.02)
    time.sleep(after_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def same_runs(ref_run, run, exact=False):
    """Assert two run folders trained the same: history (val top-1, loss) and parameters
    (bit for bit with ``exact``, else within 1e-5)."""
    import json
    import mxnet as mx
    import numpy as np
    import pytest
    hist = [json.load(open(os.path.join(r, "metrics.json")))["history"] for r in (ref_run, run)]
    assert [r["epoch"] for r in hist[1]] == [r["epoch"] for r in hist[0]]
    for ra, rb in zip(*hist):
        assert rb["val_top1"] == ra["val_top1"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6)
    pa, pb = (mx.nd.load(os.path.join(r, "model-0000.params")) for r in (ref_run, run))
    assert set(pa) == set(pb)
    for k in pa:
        if exact:
            assert np.array_equal(pa[k].asnumpy(), pb[k].asnumpy()), k
        else:
            np.testing.assert_allclose(pa[k].asnumpy(), pb[k].asnumpy(), rtol=1e-5, atol=1e-6)


def random_params(sym, data_shape=(2, 3, 8, 8), seed=0):
    """Random parameters for ``sym`` (gamma and running var in [0.5, 1.5], the rest N(0, 0.3)),
    as a name → NDArray dict for :func:`distill.graphio.make_block`."""
    import mxnet as mx
    import numpy as np
    rs = np.random.RandomState(seed)
    args, _, auxs = sym.infer_shape(data=data_shape)
    names = sym.list_arguments() + sym.list_auxiliary_states()
    return {n: mx.nd.array(rs.uniform(0.5, 1.5, s) if n.endswith(("gamma", "var")) else rs.normal(0, 0.3, s))
            for n, s in zip(names, list(args) + list(auxs)) if n != "data"}
