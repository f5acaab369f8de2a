"""Export benchmark: the quickstart student (and its teacher) in every format, one thread each.

Reproduces the README's deployment table: ``distill export`` of ``runs/quickstart`` with one
thread in every runtime (``OMP_NUM_THREADS=1`` for MXNet, ``--threads 1`` for onnxruntime and
ncnn: a multi-threaded ncnn is timed badly on a busy machine, its OpenMP pool spins), then the
``--fp16`` ncnn variant, then the teacher. Each row is checked in its runtime against MXNet on
the mnist5k test split; the figures are printed and kept in ``runs/bench_export/*/model_card.json``.
The quickstart run is trained (``python train.py recipes/quickstart.yaml``, minutes) only when
``runs/quickstart/metrics.json`` is missing.

Usage::

    .venv/bin/python bench/export.py [--repeats 50]
"""
import argparse
import json
import os
import sys

os.environ["OMP_NUM_THREADS"] = "1"      # before mxnet is imported: MXNet's threads follow it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.targets import target  # noqa: E402

RUN = os.path.join("runs", "quickstart")
OUT = os.path.join("runs", "bench_export")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    os.chdir(ROOT)
    from distill.export import ExportOptions, export_run
    from distill.export.report import export_table
    metrics = os.path.join(RUN, "metrics.json")
    if not (os.path.isfile(metrics) and json.load(open(metrics)).get("complete")):
        from distill.recipe import load_recipe
        from distill.run import run_training
        run_training(load_recipe(os.path.join("recipes", "quickstart.yaml")))
    for name, model, fp16, formats in (("student", None, False, None),
                                       ("student-fp16", None, True, ["ncnn"]),
                                       ("teacher", "teacher", False, None)):
        card = export_run(RUN, formats=formats, model=model, out_dir=os.path.join(OUT, name),
                          options=ExportOptions(fp16=fp16, threads=1, repeats=args.repeats),
                          raise_on_failure=False)
        print(export_table(card))
        for fmt in card["export_run"]["formats"]:
            chk = card["exports"][fmt]["check"]
            target(f"{name} {fmt}: check in its runtime", "passes", chk["message"][:60], chk["passed"])


if __name__ == "__main__":
    main()
