#!/usr/bin/env python
"""Our training loop's speed vs a bare hybridized Gluon loop on the same network, batch, optimizer
and data (issue #26), for the quickstart teacher (labels only) and the quickstart's KD step.

    python bench/loop_speed.py [--epochs 2] [--rounds 2]
    python bench/loop_speed.py --smoke     # 64 images of 8×8, one epoch, a few bare steps

Ours: ``train.py`` in a subprocess, run folder in a temporary folder; images/s of its fastest
epoch (``images_per_s`` in ``metrics.json``'s history: the training steps of the epoch, without
evaluation; the first epoch also builds the graphs). Cases:

* ``teacher (labels only)``: ``recipes/teacher_mnist.yaml`` (the quickstart's ``teacher.recipe``:
  cifar_resnet20_v1, batch 64, ``nesterov``, cross-entropy only);
* ``KD step``: ``recipes/quickstart.yaml`` (mobilenetv2_0.5, KD T=4 ×0.7 + CE ×0.3) with the
  teacher just trained by the first case (speed only), pruning, int8 and export off: the step,
  not the pruning modifier, is measured.

Bare: the same network built as the run builds it (``students.build_student``, hybridized with
``static_alloc``/``static_shape``, no weight decay on BN affine and biases), MXNet's own fused
``nag`` optimizer with the recipe's lr, momentum and weight decay, numpy batches of the same data
(``distill.data.load_data``) in the same seeded order, the loss a hybridized block, one host sync
per timed run; for KD the teacher's logits computed once beforehand (as ``teacher_cache: auto``
does without augmentation). Timed over the steps of one epoch after 3 warm-up steps, in this
process, before and after each of ours (best of both: other work on a shared machine moves single
runs), ``--rounds`` times. Target: ours ≥ 0.9× bare in both cases.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import _smoke  # noqa: E402
from bench._train import train  # noqa: E402
from bench.targets import target  # noqa: E402
from distill.report import format_table  # noqa: E402

RECIPES = os.path.join(ROOT, "recipes")
TARGET = 0.9
WARMUP = 3


def _train(recipe, sets, run_dir):
    return train(recipe, sets, run_dir, "loop_speed.py")


def _resolved(run_dir):
    from distill.recipe import load_recipe
    return load_recipe(os.path.join(run_dir, "recipe.yaml"))


class _Loss(gluon.HybridBlock):
    """The recipe's loss as one block: cross-entropy × ``w_ce`` (+ KD at ``temperature`` ×
    ``w_kd``, Hinton et al., 2015, when a teacher's logits are given), mean over the batch."""

    def __init__(self, w_ce=1.0, w_kd=0.0, temperature=1.0):
        super().__init__()
        self.w_ce, self.w_kd, self.t = w_ce, w_kd, temperature

    def hybrid_forward(self, F, s, y, teacher=None):
        loss = -self.w_ce * F.pick(F.log_softmax(s, axis=-1), y, axis=-1)
        if teacher is not None:
            log_ps = F.log_softmax(s / self.t, axis=-1)
            log_pt = F.log_softmax(teacher / self.t, axis=-1)
            loss = loss + self.w_kd * self.t ** 2 * F.sum(F.exp(log_pt) * (log_pt - log_ps), axis=-1)
        return F.mean(loss)


def bare_loop(recipe, teacher_prefix=None):
    """A bare hybridized Gluon loop on ``recipe``'s network, data, batch and optimizer settings:
    a function ``run(steps) → images/s`` over the steps of one epoch (its warm-up done), and
    the number of steps of an epoch."""
    from distill.data import load_data
    from distill.graphio import load_symbol_block
    from students import build_student

    cfg = recipe.trainer
    data = load_data(recipe.data, seed=cfg.seed)
    net = build_student(recipe.student.model, data.channels, data.num_classes, tuple(data.image_size),
                        max_stride=recipe.student.max_stride, seed=cfg.seed)
    net.hybridize(static_alloc=True, static_shape=True)
    for name, p in net.collect_params().items():
        if name.endswith(("gamma", "beta", "bias")):
            p.wd_mult = 0.0
    trainer = gluon.Trainer(net.collect_params(), "nag",
                            {"learning_rate": cfg.lr, "wd": cfg.weight_decay, "momentum": cfg.momentum})
    x_all, y_all = data.train.x, data.train.y
    terms = {t.loss: t for t in recipe.distillation}
    t_all = None
    if teacher_prefix:
        loss_fn = _Loss(terms["ce"].weight, terms["kd"].weight, float(terms["kd"].options.get("temperature", 4.0)))
        teacher = load_symbol_block(teacher_prefix)
        t_all = np.concatenate([teacher(mx.nd.array(x_all[i:i + 256])).asnumpy()
                                for i in range(0, len(x_all), 256)])
    else:
        loss_fn = _Loss(terms["ce"].weight)
    loss_fn.hybridize(static_alloc=True)
    bs = cfg.batch_size
    n = len(x_all)
    steps = max(1, n // bs if n > bs else 1)
    order = np.random.RandomState(cfg.seed).permutation(n)

    def step(k):
        idx = order[(k % steps) * bs:(k % steps) * bs + bs]
        x, y = mx.nd.array(x_all[idx]), mx.nd.array(y_all[idx])
        t = mx.nd.array(t_all[idx]) if t_all is not None else None
        with autograd.record():
            loss = loss_fn(net(x), y, t) if t is not None else loss_fn(net(x), y)
        loss.backward()
        trainer.step(1)
        return len(idx)

    for k in range(WARMUP):
        step(k)
    mx.nd.waitall()

    def run():
        t0, seen = time.perf_counter(), 0
        for k in range(steps):
            seen += step(k)
        mx.nd.waitall()
        return seen / (time.perf_counter() - t0)
    return run, steps


def _ours_ips(metrics):
    return max(h["images_per_s"] for h in metrics["history"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2, help="epochs of each of our runs (the fastest counts)")
    ap.add_argument("--rounds", type=int, default=2, help="ours and bare, alternating, this many times")
    _smoke.add_arguments(ap)
    args = ap.parse_args(argv)
    base = ["trainer.progress=false", "output.latency=false"]
    if args.smoke:
        work = _smoke.workdir(args, "loop_speed")
        base, args.epochs, args.rounds = _smoke.shrink_sets(), 1, 1
    else:
        work = tempfile.mkdtemp(prefix="bench-loop-speed-")
    base = base + [f"trainer.epochs={args.epochs}"]
    rows, ratios = [], {}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        # (a) the quickstart teacher, labels only
        t_dir = os.path.join(tmp, "teacher")
        ours = [_train(os.path.join(RECIPES, "teacher_mnist.yaml"), base, t_dir)]
        t_recipe = _resolved(t_dir)
        teacher_yaml = os.path.join(tmp, "teacher.yaml")
        with open(teacher_yaml, "w") as f:
            f.write(open(os.path.join(t_dir, "recipe.yaml")).read())
        cases = {"teacher (labels only)": (t_recipe, None, ours, os.path.join(RECIPES, "teacher_mnist.yaml"), base, t_dir)}
        # (b) the quickstart's KD step, its teacher the run above
        kd_sets = base + [f"teacher.recipe={json.dumps(teacher_yaml)}", "pruning.enabled=false",
                          "quantization.enabled=false", "export.enabled=false"]
        kd_dir = os.path.join(tmp, "kd")
        kd_ours = [_train(os.path.join(RECIPES, "quickstart.yaml"), kd_sets, kd_dir)]
        cases["KD step (quickstart)"] = (_resolved(kd_dir), os.path.join(t_dir, "model"), kd_ours,
                                          os.path.join(RECIPES, "quickstart.yaml"), kd_sets, kd_dir)
        for label, (recipe, tprefix, ours, path, sets, run_dir) in cases.items():
            run, steps = bare_loop(recipe, tprefix)
            bare = [run()]
            for r in range(args.rounds):
                if r:       # the first of ours ran above (it also made the teacher)
                    ours.append(_train(path, sets, run_dir + f"-{r}"))
                bare.append(run())
            o, b = max(_ours_ips(m) for m in ours), max(bare)
            ratios[label] = o / b
            rows.append([label, recipe.student.model, recipe.trainer.batch_size, steps,
                         f"{o:.0f}", f"{b:.0f}", f"{o / b:.2f}×", "PASS" if o / b >= TARGET else "FAIL"])
    print(format_table(["case", "network", "batch", "steps/epoch", "ours img/s", "bare img/s",
                        "ours/bare", f"≥ {TARGET}×"], rows,
                       title=f"\nloop speed: train.py vs a bare hybridized Gluon loop (fused nag), "
                             f"best of {args.rounds} round(s); OMP_NUM_THREADS="
                             f"{os.environ.get('OMP_NUM_THREADS', 'unset')}"))
    for label, ratio in ratios.items():
        target(f"loop img/s vs bare Gluon loop, {label}", f"≥ {TARGET}×", f"{ratio:.2f}×", ratio >= TARGET)
    out_dir = work if args.smoke else os.path.join(ROOT, "runs", "bench_loop_speed")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"smoke": bool(args.smoke), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                   "rounds": args.rounds, "target": TARGET,
                   "rows": [dict(zip(["case", "network", "batch", "steps_per_epoch", "ours_img_s",
                                      "bare_img_s", "ratio", "verdict"], r)) for r in rows]}, f, indent=1)
    print(f"results: {os.path.join(out_dir, 'results.json')}")
    if not args.smoke:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
