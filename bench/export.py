"""Export benchmark: the quickstart student (and its teacher) in every format, one thread each.

Reproduces the README's deployment table: ``distill export`` of ``runs/quickstart`` with one
thread in every runtime (``OMP_NUM_THREADS=1`` for MXNet, ``--threads 1`` for onnxruntime and
ncnn: a multi-threaded ncnn is timed badly on a busy machine, its OpenMP pool spins), then the
``--fp16`` ncnn variant, then the teacher. Each row is checked in its runtime against MXNet on
the mnist5k test split; the figures are printed and kept in ``runs/bench_export/*/model_card.json``.
The quickstart run is trained (``python train.py recipes/quickstart.yaml``, minutes) only when
``runs/quickstart`` holds no complete run of that recipe by this tool (``runfolder.reuse_check``).
``--smoke``: a tiny quickstart run trained in a temporary folder, then the same exports from it
(``bench/_smoke.py``).

Usage::

    .venv/bin/python bench/export.py [--repeats 50] [--smoke [--out DIR]]
"""
import argparse
import os
import sys

os.environ["OMP_NUM_THREADS"] = "1"      # before mxnet is imported: MXNet's threads follow it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import _smoke  # noqa: E402
from bench.targets import target  # noqa: E402

RUN = os.path.join("runs", "quickstart")
OUT = os.path.join("runs", "bench_export")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=50)
    _smoke.add_arguments(p)
    args = p.parse_args(argv)
    os.chdir(ROOT)
    run, out, sets = RUN, OUT, []
    if args.smoke:        # trained afresh in the work folder; exporting it is this bench's job
        work = _smoke.workdir(args, "export")
        run, out = os.path.join(work, "runs", "quickstart"), os.path.join(work, "bench_export")
        sets = _smoke.quickstart_sets(work, int8=False) + ["export.enabled=false"]
        args.repeats = _smoke.REPEATS
        _smoke.skipped("the run's own int8 calibration (the int8 formats calibrate on the same "
                       "images; only its fp32-kept layers would carry over)")
    from distill.export import ExportOptions, export_run
    from distill.export.report import export_table
    from distill.recipe import load_recipe, recipe_hash, recipe_to_dict
    from distill.runfolder import reuse_check
    recipe = load_recipe(os.path.join("recipes", "quickstart.yaml"), sets)
    ok, why = reuse_check(run, recipe_hash(recipe), recipe_to_dict(recipe))
    if not ok:
        from distill.run import run_training
        print(f"export bench: {why}: training it (recipes/quickstart.yaml)", flush=True)
        run_training(recipe)
    for name, model, fp16, formats in (("student", None, False, None),
                                       ("student-fp16", None, True, ["ncnn"]),
                                       ("teacher", "teacher", False, None)):
        card = export_run(run, formats=formats, model=model, out_dir=os.path.join(out, name),
                          options=ExportOptions(fp16=fp16, threads=1, repeats=args.repeats),
                          raise_on_failure=False)
        print(export_table(card))
        for fmt in card["export_run"]["formats"]:
            chk = card["exports"][fmt]["check"]
            target(f"{name} {fmt}: check in its runtime", "passes", chk["message"][:60], chk["passed"])


if __name__ == "__main__":
    main()
