"""The quickstart pipeline's promise (``make demo``): the int8 student within 1 point of the fp32
teacher with at least 8× fewer MACs, and every export checked in its runtime.

Reads ``runs/quickstart/metrics.json``; trains it first (``python train.py recipes/quickstart.yaml``,
about 8 minutes on 2 cores) when it is missing, incomplete, or stale (another recipe or another
commit of the tool: ``runfolder.reuse_check``). Prints the run's closing table.
``--smoke``: the same ``train.py`` run on tiny data in a temporary folder (``bench/_smoke.py``).

    .venv/bin/python bench/pipeline.py [--smoke [--out DIR]]
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import _smoke  # noqa: E402
from bench.targets import target  # noqa: E402

RUN = os.path.join(ROOT, "runs", "quickstart")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _smoke.add_arguments(p)
    args = p.parse_args(argv)
    from distill.runfolder import RunFolder
    from distill.stages import pipeline_table
    sets = []
    if args.smoke:            # always trained afresh, in the work folder
        work = _smoke.workdir(args, "pipeline")
        sets = _smoke.cli_sets(_smoke.quickstart_sets(work))
        folder = RunFolder(os.path.join(work, "runs", "quickstart"))
    else:
        folder = RunFolder(RUN)
    from distill.recipe import load_recipe, recipe_hash, recipe_to_dict
    from distill.runfolder import reuse_check
    recipe = load_recipe(os.path.join(ROOT, "recipes", "quickstart.yaml"), sets[1::2])
    ok, why = reuse_check(folder.path, recipe_hash(recipe), recipe_to_dict(recipe))
    m = folder.read_metrics() if ok else {}
    if not (ok and m.get("int8") and m.get("export")):
        print(f"pipeline: {why if not ok else f'{folder.path} has no int8/export results'}: "
              f"training it", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                        os.path.join(ROOT, "recipes", "quickstart.yaml"), *sets], cwd=ROOT, check=True)
        m = folder.read_metrics()
    print(pipeline_table(m))
    t, s, q = m["teacher"], m["student"], m["int8"]
    target("quickstart int8 student vs fp32 teacher, top-1", "≥ −1.0 points",
           f"{q['top1'] - t['top1']:+.2f}", q["top1"] >= t["top1"] - 1.0)
    target("quickstart student vs teacher, MACs", "≥ 8× fewer", f"{t['macs'] / s['macs']:.1f}×",
           t["macs"] >= 8 * s["macs"])
    fmts = m["export"]["formats"]
    failed = [n for n, f in fmts.items() if not f["passed"]]
    target("quickstart exports checked in their runtimes", f"{len(fmts)} of {len(fmts)} pass",
           f"{len(fmts) - len(failed)} pass" + (f" ({', '.join(failed)} failed)" if failed else ""), not failed)
    print(json.dumps({"top1": {"teacher": t["top1"], "student": s["top1"], "int8": q["top1"]},
                      "macs": {"teacher": t["macs"], "student": s["macs"]}}, indent=1))


if __name__ == "__main__":
    main()
