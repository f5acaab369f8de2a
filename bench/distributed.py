#!/usr/bin/env python
"""Training throughput on MXNet's dist_sync KVStore: one process, then 1 and 2 workers through
``distill launch`` (1 server each), on this machine.

    python bench/distributed.py [--images 1024] [--epochs 3] [--repeats 2] [--student cifar_resnet20_v1]
    python bench/distributed.py --smoke     # 64 images of 8×8, one epoch, one round of the target's two modes

The same recipe (synthetic 32×32 images, ``trainer.batch_size`` 64 per worker, no teacher, no
pruning) runs three ways: ``kvstore: local`` in one process, ``dist_sync`` with 1 worker (the
cost of the parameter-server round trip alone), ``dist_sync`` with 2 workers (each on half the
images), and ``local`` with one OpenMP thread per core: two one-thread workers use two cores, so
that, not the one-thread process, is what distributing has to beat on one machine. Throughput is images of all workers per second of the fastest epoch (the first one
also builds the graphs), from rank 0's ``metrics.json``, best over ``--repeats`` rounds of the
three modes in turn (other work on a shared machine moves single runs by 2×). Every process gets
OMP_NUM_THREADS=1. Each run is its own session (Linux autogroup: one CPU share per session on a
busy machine; ``distill launch`` keeps its processes in the launcher's session).

On a 2-core machine shared with other work no real speedup is expected from 2 workers: they,
the server and the scheduler share the cores a multi-threaded process would use. The figures
are printed as measured. Target:
the KVStore round trip costs at most 30% (1 worker ≥ 0.7× the local process).
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import _smoke  # noqa: E402
from bench.targets import target  # noqa: E402
from distill.report import format_table  # noqa: E402


def _recipe(tmp, name, images, epochs, student, kvstore, image_size=32):
    r = {"name": name,
         "data": {"name": "synthetic", "num_samples": int(images / 0.8) + 8, "num_classes": 10,
                  "image_size": image_size, "limit": images},
         "student": {"model": student},
         "distillation": [{"loss": "ce", "weight": 1.0}],
         "trainer": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "progress": False,
                     "kvstore": kvstore},
         "output": {"dir": os.path.join(tmp, "runs", name), "latency": False}}
    path = os.path.join(tmp, name + ".yaml")
    with open(path, "w") as f:
        yaml.safe_dump(r, f)
    return path, r["output"]["dir"]


def _run(cmd, threads=1):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    # one session per run: with Linux's autogroup scheduling a session's processes share one
    # CPU share, so every mode competes with the machine's other work on the same terms
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, start_new_session=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
        raise SystemExit(f"bench/distributed.py: `{' '.join(cmd)}` failed ({res.returncode})")


def _throughput(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        m = json.load(f)
    workers = m.get("distributed", {}).get("workers", 1)
    rows = m["history"][1:] or m["history"]
    fastest = min(r["epoch_time_s"] for r in rows)
    per_worker = m["data"]["train"]          # rank 0's shard; every shard has the same size
    return workers, per_worker * workers / fastest, m["student"]["top1"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024, help="train images in total")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the three modes; best kept")
    ap.add_argument("--student", default="cifar_resnet20_v1")
    ap.add_argument("--image-size", type=int, default=32, help="synthetic images of this many pixels square")
    _smoke.add_arguments(ap)
    args = ap.parse_args(argv)
    work = None
    if args.smoke:
        work = _smoke.workdir(args, "distributed")
        args.images, args.epochs, args.repeats, args.image_size = 64, 1, 1, 8
    train = [sys.executable, os.path.join(ROOT, "train.py")]
    launch = [sys.executable, "-m", "distill.launch", "-s", "1"]
    cores = os.cpu_count() or 1
    modes = [("local, 1 process", "local", None), ("dist_sync, 1 worker", "dist_sync", 1),
             ("dist_sync, 2 workers", "dist_sync", 2)]
    if args.smoke:       # the two modes of the target; each launch is 3-4 MXNet processes
        modes = modes[:2]
        _smoke.skipped("the 2-worker run and the all-cores local baseline (no target: printed "
                       "beside the target's two modes)")
    elif cores > 1:      # the fair baseline for 2 one-thread workers: one process on every core
        modes.append((f"local, 1 process, {cores} threads", "local", 0))
    speed, seen, top1 = {}, {}, {}
    # --smoke: the runs stay in its work folder (removed at exit unless --out named it)
    with (contextlib.nullcontext(work) if work else tempfile.TemporaryDirectory()) as tmp:
        for k in range(args.repeats):
            for label, kv, n in modes:
                path, run = _recipe(tmp, f"{kv}{n if n is not None else ''}-{k}", args.images,
                                    args.epochs, args.student, kv, args.image_size)
                print(f"== round {k + 1}/{args.repeats}: {label}", flush=True)
                if not n:
                    _run(train + [path], threads=1 if n is None else cores)
                else:
                    _run(launch + ["-n", str(n), "--"] + train + [path])
                workers, ips, acc = _throughput(run)
                seen.setdefault(label, []).append(ips)
                speed[label], top1[label] = max(seen[label]), acc
                print(f"   {ips:.0f} images/s", flush=True)
    rows = [[label, n or 1, 64 * (n or 1), f"{speed[label]:.0f}",
             " / ".join(f"{v:.0f}" for v in seen[label]),
             f"{speed[label] / speed[modes[0][0]]:.2f}×", f"{top1[label]:.1f}"] for label, _, n in modes]
    print(f"\n{args.student}, {args.images} synthetic {args.image_size}×{args.image_size} images, "
          f"{args.epochs} epochs, {cores} cores, OMP_NUM_THREADS=1 per process unless said; fastest epoch")
    print(format_table(["mode", "workers", "global batch", "images/s", "each round", "vs local",
                        "val top-1 %"], rows))
    one, two = speed["dist_sync, 1 worker"], speed.get("dist_sync, 2 workers")
    if two is not None:
        print(f"2 workers vs 1 worker: {two / one:.2f}× ({two:.0f} vs {one:.0f} images/s)")
    if f"local, 1 process, {cores} threads" in speed:
        full = speed[f"local, 1 process, {cores} threads"]
        print(f"2 workers vs 1 process on all {cores} cores: {two / full:.2f}× ({two:.0f} vs {full:.0f} "
              f"images/s): what distributing buys on this machine")
    ratio = one / speed["local, 1 process"]
    target("dist_sync 1 worker vs the local process (KVStore round-trip cost)", "≥ 0.7×",
           f"{ratio:.2f}×", ratio >= 0.7)
    return 0


if __name__ == "__main__":
    sys.exit(main())
