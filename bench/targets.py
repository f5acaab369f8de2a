"""What a bench script promises, checked and collected: ``target(figure, target, measured, holds)``.

Each bench script calls :func:`target` once per figure it checks. The line is printed as it is
measured; when ``make bench`` runs the script (``bench/run_all.py`` sets ``BENCH_RESULTS``), the
row is also appended to that file as one JSON line, and ``run_all`` prints every script's rows in
one table: figure, target, measured, holds.
"""
import json
import os
import sys

__all__ = ["target"]


def target(figure, goal, measured, holds):
    """Print and record one checked figure.

    Parameters
    ----------
    figure : str
        What is measured ("int8 vs fused fp32 at batch 32").
    goal : str
        The target, as written in the issue or the README ("≥ 2.5×").
    measured : str
        The measured value, formatted ("2.81×").
    holds : bool
        Whether the measured value meets the target.
    """
    print(f"target: {figure}: {goal}; measured {measured}: {'holds' if holds else 'DOES NOT HOLD'}",
          flush=True)
    path = os.environ.get("BENCH_RESULTS")
    if path:
        row = {"script": os.path.basename(sys.argv[0]), "figure": figure, "target": goal,
               "measured": measured, "holds": bool(holds)}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
