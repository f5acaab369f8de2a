"""PTQ vs QAT on the quickstart student, full int8 (issue 13's acceptance).

The student is the quickstart recipe without pruning (a fixed target, ``runs/qat_student``):

    python train.py recipes/quickstart.yaml --set pruning.enabled=false \\
        --set quantization.enabled=false --set export.enabled=false --set output.dir=runs/qat_student

then ``distill quantize runs/qat_student --qat --calib-mode entropy --exclude none`` (PTQ with KL
calibration, then QAT from it). Both are run when their results are missing (``--epochs N``:
QAT epochs, default 3; ``--run DIR``: another run folder). Reads ``int8`` of the run's
``metrics.json`` and prints PTQ (none / first_last) beside QAT, then the checked figures.

The second case is one where plain ``naive`` (min/max) PTQ itself loses: the compare recipe's
``pruned 85% + labels`` student (a ResNet-20 copy with 15% of its channels, fine-tuned on 1,000
labels, ``runs/qat_pruned``), full int8 from ``naive`` calibration, then QAT from it.

    .venv/bin/python bench/qat.py [--run runs/qat_student] [--epochs 3] [--no-naive-case]
    .venv/bin/python bench/qat.py --smoke [--out DIR]   # both cases on tiny data, one QAT epoch, in a temporary folder
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

RUN = os.path.join(ROOT, "runs", "qat_student")
TRAIN = ["--set", "pruning.enabled=false", "--set", "quantization.enabled=false",
         "--set", "export.enabled=false", "--set", "output.dir=runs/qat_student"]


def _metrics(run):
    path = os.path.join(run, "metrics.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


PRUNED_RUN = os.path.join(ROOT, "runs", "qat_pruned")
PRUNED_TRAIN = ["--set", "data.limit=1000", "--set", "pruning.final_sparsity=0.85",
                "--set", "distillation=[{loss: ce, weight: 1.0}]", "--set", "output.dir=runs/qat_pruned"]


def naive_case(epochs, env, run=PRUNED_RUN, train=PRUNED_TRAIN):
    """Naive PTQ that loses, and QAT from it: ``runs/qat_pruned`` (trained when missing)."""
    from distill.recipe import load_recipe, recipe_hash, recipe_to_dict
    from distill.runfolder import reuse_check
    recipe = load_recipe(os.path.join(ROOT, "recipes", "prune_channel_mnist.yaml"), train[1::2])
    ok, why = reuse_check(run, recipe_hash(recipe), recipe_to_dict(recipe))
    m = _metrics(run)
    if not ok:
        print(f"qat bench: {why}: training it", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                        os.path.join(ROOT, "recipes", "prune_channel_mnist.yaml"), *train],
                       cwd=ROOT, env=env, check=True)
        m = _metrics(run)
    q = m.get("int8") or {}
    if q.get("method") != "qat" or q.get("calib_mode") != "naive" or q.get("excluded"):
        subprocess.run([sys.executable, "-m", "distill.cli", "quantize", run, "--qat",
                        "--qat-epochs", str(epochs), "--calib-mode", "naive", "--exclude", "none",
                        "--no-layer-latency", "--no-sensitivity", "--no-teacher"], cwd=ROOT, env=env,
                       check=True)
        q = _metrics(run)["int8"]
    from distill.quantize.report import qat_table
    print(qat_table(q))
    fp32, qat, ptq = q["fp32"]["top1"], q["top1"], q["ptq"]["policies"]["none"]["top1"]
    print(f"\n{run}: fp32 {fp32:.2f}%, PTQ full int8 (naive) {ptq:.2f}%, QAT "
          f"({q['qat']['epochs']} epochs) simulated {q['simulated_top1']:.2f}% / MXNet int8 {qat:.2f}% "
          f"(agree on {q['sim_int8_agreement']:.1f}%), on {q['split_images']} images")
    target("naive PTQ full int8 loses ≥ 0.5 point, QAT recovers (pruned 85% copy)",
           "PTQ ≤ fp32 − 0.5 and QAT ≥ fp32 − 0.5", f"PTQ {ptq - fp32:+.2f}, QAT {qat - fp32:+.2f}",
           ptq <= fp32 - 0.5 + 1e-9 and qat >= fp32 - 0.5)


def ncnn_from_qat(run, log=print):
    """ncnn-int8 of the QAT model, through ``distill export``'s own path (after ``--qat`` it
    exports the fine-tuned weights with the learned ranges), checked in ncnn's runtime.
    Returns the ``ncnn-int8`` section of the export (``top1``: ncnn's top-1 on the test split)."""
    from distill.export.core import export_run
    from distill.stages import export_section
    out = os.path.join(run, "qat", "export")
    card = export_run(run, formats=["onnx", "ncnn", "ncnn-int8"], out_dir=out, raise_on_failure=False)
    sec = export_section(card)["formats"]["ncnn-int8"]
    log(f"ncnn-int8 of the QAT model ({out}): top-1 {sec['top1']:.2f}% in ncnn; check passed: "
        f"{sec['passed']}")
    return sec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=RUN)
    ap.add_argument("--epochs", type=int, default=3, help="QAT epochs when QAT has to run")
    ap.add_argument("--no-ncnn", action="store_true", help="skip the ncnn-int8 export of the QAT ranges")
    ap.add_argument("--no-naive-case", action="store_true",
                    help="skip the second case (naive PTQ of a pruned copy, then QAT)")
    ap.add_argument("--naive-case-in-smoke", action="store_true",
                    help="with --smoke: run the second case too (left out of the suite's smoke run)")
    _smoke.add_arguments(ap)
    args = ap.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    train, pruned, calib = TRAIN, {}, "entropy"
    if args.smoke:        # both runs trained afresh in the work folder, one QAT epoch each
        work = _smoke.workdir(args, "qat")
        calib = "naive"
        _smoke.skipped("entropy calibration of the first case, naive instead (MXNet's KL threshold "
                       "search, ~0.4 s per tensor whatever the data: half a minute for this student)")
        args.run, args.epochs = os.path.join(work, "runs", "qat_student"), 1
        train = TRAIN + _smoke.cli_sets(_smoke.quickstart_sets(work, "qat_student", int8=False))
        teacher = f"teacher.recipe={json.dumps(_smoke.teacher_recipe(work))}"
        pruned = {"run": os.path.join(work, "runs", "qat_pruned"),
                  "train": PRUNED_TRAIN + _smoke.cli_sets(
                      _smoke.recipe_sets(work, "qat_pruned", pruned=True) + [teacher])}
        if not (args.no_naive_case or args.naive_case_in_smoke):   # make test's smoke budget
            _smoke.skipped("the second case (a pruned copy: naive PTQ, then QAT); add "
                           "--naive-case-in-smoke to run it too")
            args.no_naive_case = True
    from distill.recipe import load_recipe, recipe_hash, recipe_to_dict
    from distill.runfolder import reuse_check
    recipe = load_recipe(os.path.join(ROOT, "recipes", "quickstart.yaml"), train[1::2])
    ok, why = reuse_check(args.run, recipe_hash(recipe), recipe_to_dict(recipe))
    m = _metrics(args.run)
    if not ok:
        print(f"qat bench: {why}: training it", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                        os.path.join(ROOT, "recipes", "quickstart.yaml"), *train], cwd=ROOT, env=env, check=True)
        m = _metrics(args.run)
    q = m.get("int8") or {}
    if q.get("method") != "qat" or q.get("calib_mode") != calib or q.get("excluded"):
        subprocess.run([sys.executable, "-m", "distill.cli", "quantize", args.run, "--qat",
                        "--qat-epochs", str(args.epochs), "--calib-mode", calib, "--exclude", "none",
                        "--no-layer-latency", "--no-sensitivity", "--no-teacher"], cwd=ROOT, env=env, check=True)
        q = _metrics(args.run)["int8"]
    from distill.quantize.report import qat_table
    print(qat_table(q))
    fp32, qat, ptq = q["fp32"]["top1"], q["top1"], q["ptq"]["policies"]["none"]["top1"]
    sim = q["simulated_top1"]
    n = q["split_images"]
    print(f"\n{args.run}: fp32 {fp32:.2f}%, PTQ full int8 ({q['calib_mode']}) {ptq:.2f}%, "
          f"QAT ({q['qat']['epochs']} epochs) simulated {sim:.2f}% / MXNet int8 {qat:.2f}%, on {n} images")
    target("QAT full int8 (MXNet graph) vs fp32, top-1", "within 0.5 point", f"{qat - fp32:+.2f}",
           qat >= fp32 - 0.5)
    target("QAT simulated vs MXNet int8, top-1", "within 0.3 point", f"{sim - qat:+.2f}",
           abs(sim - qat) <= 0.3 + 1e-9)
    target("QAT simulated vs MXNet int8, same prediction", "≥ 99%", f"{q['sim_int8_agreement']:.1f}%",
           q["sim_int8_agreement"] >= 99.0)
    target("PTQ full int8 loses, QAT recovers", "PTQ ≤ fp32 − 0.5 and QAT ≥ fp32 − 0.5",
           f"PTQ {ptq - fp32:+.2f}, QAT {qat - fp32:+.2f}", ptq <= fp32 - 0.5 and qat >= fp32 - 0.5)
    if not args.no_ncnn:
        top1 = ncnn_from_qat(args.run)["top1"]
        target("ncnn-int8 from the QAT ranges vs fp32 (MXNet), top-1", "within 0.5 point",
               f"{top1 - fp32:+.2f}", top1 >= fp32 - 0.5)
    if not args.no_naive_case:
        naive_case(args.epochs, env, **pruned)


if __name__ == "__main__":
    main()
