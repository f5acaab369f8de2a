"""``--smoke``: a bench script's whole code path in seconds, every file in a temporary folder.

Every script ``bench/run_all.py`` runs takes ``--smoke`` (``run_all.py --smoke`` passes it on;
``tests/test_bench.py`` runs each one): the repository's recipes with 64 synthetic 8×8 images
instead of mnist5k, one epoch, latency best of one repeat, and every run folder (the teacher's
included) under one work folder: ``--out DIR``, else a new folder in the system temp dir, removed
at exit. Nothing under the repository's ``runs/`` is read or written. The figures are computed
and checked exactly as in the full bench; at this scale they mean nothing (a target may well not
hold). What a script leaves out at this scale it says, in a line starting ``smoke: skipped``.

Not a bench itself: ``run_all`` skips files whose name starts with ``_``.
"""
import atexit
import gzip
import json
import os
import shutil
import struct
import tempfile

import numpy as np

import yaml

__all__ = ["DATA", "REPEATS", "add_arguments", "workdir", "shrink_sets", "recipe_sets",
           "teacher_recipe", "quickstart_sets", "cli_sets", "skipped", "write_fashion"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")

#: the data of every smoke run: 52 train / 12 val images, one channel like mnist5k
DATA = {"name": "synthetic", "num_samples": 64, "num_classes": 4, "image_size": 8}
#: latency: best of this many repeats
REPEATS = 1


def add_arguments(parser):
    """``--smoke`` and ``--out`` on a bench script's parser."""
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, not minutes: the same code path on a few dozen synthetic images, "
                             "one epoch, one latency repeat, every file in a temporary folder "
                             "(the figures mean nothing; the test suite runs this)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="with --smoke: the work folder (default: a new temporary folder, "
                             "removed at exit); never inside the repository's runs/")


def workdir(args, name):
    """The smoke run's work folder (``args.out``, else a new temporary one removed at exit)."""
    if args.out:
        path = os.path.realpath(args.out)
        runs = os.path.realpath(os.path.join(ROOT, "runs"))
        if path == runs or path.startswith(runs + os.sep):
            raise SystemExit(f"bench --smoke: --out {args.out} is inside the repository's runs/: "
                             f"give a scratch folder")
        os.makedirs(path, exist_ok=True)
    else:
        path = tempfile.mkdtemp(prefix=f"bench-smoke-{name}-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    print(f"smoke: bench/{name}.py at the smallest scale (its figures mean nothing); every file "
          f"under {path}", flush=True)
    return path


def shrink_sets(pruned=False):
    """``--set`` overrides that shrink a repository recipe: tiny data, one epoch (pruning, when
    ``pruned``, all in it), one latency repeat."""
    out = [f"data={json.dumps(DATA)}", "trainer.epochs=1", "trainer.progress=false",
           f"output.latency_repeats={REPEATS}"]
    return out + (["pruning.start_epoch=0", "pruning.end_epoch=0"] if pruned else [])


def recipe_sets(work, name, pruned=False):
    """:func:`shrink_sets`, and the run folder ``WORK/runs/NAME``."""
    return shrink_sets(pruned) + [f"output.dir={json.dumps(os.path.join(work, 'runs', name))}"]


def teacher_recipe(work):
    """``recipes/teacher_mnist.yaml`` shrunk (its run folder in ``WORK/runs``), written into
    ``work``; its path, for ``teacher.recipe``."""
    path = os.path.join(work, "teacher_mnist.yaml")
    if not os.path.isfile(path):
        from distill.recipe import load_recipe, recipe_to_dict
        recipe = load_recipe(os.path.join(RECIPES, "teacher_mnist.yaml"), recipe_sets(work, "teacher_mnist"))
        with open(path, "w") as f:
            yaml.safe_dump(recipe_to_dict(recipe), f)
    return path


def quickstart_sets(work, name="quickstart", int8=True):
    """Overrides of ``recipes/quickstart.yaml``: shrunk, its teacher :func:`teacher_recipe`; the
    int8 step on one calibration batch without its optional per-layer timing (``int8=False``:
    none, for benches that quantize the run themselves)."""
    sets = recipe_sets(work, name, pruned=True) + [f"teacher.recipe={json.dumps(teacher_recipe(work))}"]
    if not int8:
        return sets + ["quantization.enabled=false"]
    skipped("the per-layer int8 timing of the run's quantization step (quantization.layer_latency)")
    return sets + ["quantization.calib_batches=1", "quantization.layer_latency=false"]


def cli_sets(sets):
    """``["--set", S, ...]`` for ``train.py``."""
    return [a for s in sets for a in ("--set", s)]


def skipped(what):
    """Say that the smoke mode leaves ``what`` out (never silently)."""
    print(f"smoke: skipped {what}", flush=True)


def _idx(path, arr):
    arr = np.asarray(arr, np.uint8)
    head = struct.pack(">I", 0x800 + arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.tobytes())


def write_fashion(root, n_train=60, n_test=20, seed=0):
    """Four idx files like Zalando's Fashion-MNIST in ``root``, ``n_train``/``n_test`` images of 10
    balanced classes; the class is readable from the pixels (its index × 20 everywhere), so
    training can learn it. ``root``."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.RandomState(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        x = (y[:, None, None] * 20 + rng.randint(0, 20, size=(n, 28, 28))).astype(np.uint8)
        _idx(os.path.join(root, f"{split}-images-idx3-ubyte.gz"), x)
        _idx(os.path.join(root, f"{split}-labels-idx1-ubyte.gz"), y)
    return root
