"""``train.py`` in a subprocess for a bench script: one run folder, its ``metrics.json`` back.

Not a bench itself: ``run_all`` skips files whose name starts with ``_``.
"""
import json
import os
import subprocess
import sys

from bench import _smoke

__all__ = ["train"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(recipe, sets, run_dir, script):
    """``train.py RECIPE --set ...`` with its run folder ``run_dir``; its metrics. A failed run
    stops the bench ``script`` with the run's output."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), recipe,
           *_smoke.cli_sets(list(sets) + [f"output.dir={json.dumps(run_dir)}"])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench/{script}: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)
