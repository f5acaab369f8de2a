#!/usr/bin/env python
"""Memory and speed at scale: one KD epoch on synthetic RecordIO of 2,000 and 20,000 images.

    python bench/scale.py [--sizes 2000 20000] [--workers N] [--keep] [--out DIR]
    python bench/scale.py --smoke     # 200 and 600 images: the same code path in seconds

Issue #26's acceptance. Synthetic RecordIO (10 classes of 112×112 RGB JPEGs whose colour and
stripes depend on the class; a few hundred distinct JPEGs encoded once, their bytes reused under
new record headers) is written into a temporary folder at each size. A small teacher (three
stride-2 conv/BN/ReLU blocks and a dense head, *random init*: this bench measures memory and
speed, not accuracy) is exported there as symbol + params. For each size, ``train.py`` runs one
KD epoch of a ``mobilenet0.25`` student (``data.name: recordio``, KD + CE, teacher live every
batch, no latency, int8 or export) in a fresh child process; its peak RSS is that child's
``ru_maxrss`` (``os.wait4``) and its img/s the epoch row's ``images_per_s`` in ``metrics.json``.

The baseline is a bare MXNet Gluon loop in another child, over the largest size: the same
student (GluonCV ``mobilenet0.25``, hybridized), the same teacher (``SymbolBlock.imports``), the
same SGD-Nesterov settings (lr, momentum, weight decay; MXNet's stock ``nag``), KD + CE in one
hybridized block, and the same data iterator the tool uses (``distill.feed.EpochFeed`` over
``distill.data.load_data`` of the same recipe: streamed ``x.batch(idx, augment, seed)``
prepared ahead on a thread). Without ``distill.feed`` it reads the same ``.rec`` through
``mx.io.ImageRecordIter`` instead, marked FALLBACK in the table. It is timed over as many
batches as the tool's epoch, after a few warm-up batches; the tool's epoch time includes its
first batch (graph set-up). Decode throughput is measured with 0, 1 and 2 decode threads
(``distill.data.stream.decode_throughput``; when the split is not streamed, FALLBACK:
``cv2.imdecode`` of the records on a thread pool).

Targets: peak RSS at the largest size ≤ 1.15× the smallest; both under 3 GiB; our img/s ≥ 0.9×
the bare loop's. Timings on a shared 2-core machine are noisy: the two loops run one after the
other, not alternated. Results: a table, the target lines, ``OUT/results.json`` (default
``runs/bench_scale/``; ``--smoke``: inside its work folder). Exit 1 when a target does not hold
(never with ``--smoke``).
"""
import argparse
import atexit
import colorsys
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import _smoke  # noqa: E402
from bench.targets import target  # noqa: E402
from distill.report import format_table  # noqa: E402

OUT = os.path.join(ROOT, "runs", "bench_scale")
CLASSES = 10
IMAGE = 112
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
AUGMENT = ["random_resized_crop", "hflip"]
STUDENT = "mobilenet0.25"
#: trainer settings shared by the tool's recipe and the bare loop
LR, MOMENTUM, WD, BATCH, TEMPERATURE, KD_WEIGHT = 0.05, 0.9, 4e-5, 64, 4.0, 0.9
RSS_RATIO, RSS_CAP, SPEED_RATIO = 1.15, 3 * 2**30, 0.9
DECODE_WORKERS = (0, 1, 2)
#: the module of the streaming data layer; without it the bare loop and the decode figure fall back
STREAM = "distill.data.stream"
#: the loop's batch iterator (prefetching thread); without it the bare loop uses ImageRecordIter
FEED = "distill.feed"
#: bare loop: steps between two reads of the loss (the tool's loop: distill.trainer.SYNC_EVERY)
SYNC_EVERY = 25


def has_module(name):
    """Whether the module ``name`` (:data:`STREAM`, :data:`FEED`) is in the tree."""
    return importlib.util.find_spec(name) is not None



# -- synthetic data and teacher ------------------------------------------------------------------

def jpeg_pool(per_class, size=IMAGE, classes=CLASSES, seed=0):
    """``per_class`` distinct JPEGs per class: ``[(label, bytes)]``.

    Class ``c`` has its own hue and stripe direction (learnable); each image has its own stripe
    frequency and phase, a random disc and mild noise (distinct bytes, JPEG sizes like small
    natural images)."""
    import cv2
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    pool = []
    for c in range(classes):
        rgb = np.array(colorsys.hsv_to_rgb(c / classes, 0.65, 0.85), np.float32) * 255
        angle = np.pi * c / classes
        along = xx * np.cos(angle) + yy * np.sin(angle)
        for _ in range(per_class):
            stripes = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 5) * along + rng.uniform(0, 2 * np.pi))
            img = rgb * (0.45 + 0.55 * stripes[..., None])
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.2)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
            img += rng.normal(0, 3, img.shape)
            bgr = np.clip(img, 0, 255).astype(np.uint8)[:, :, ::-1]
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            pool.append((c, buf.tobytes()))
    return pool


def write_records(prefix, n, pool):
    """``PREFIX.rec`` + ``PREFIX.idx`` of ``n`` records drawn from ``pool`` (balanced classes,
    every record its own id); ``(rec path, megabytes)``."""
    import mxnet as mx
    by_class = {}
    for label, payload in pool:
        by_class.setdefault(label, []).append(payload)
    classes = sorted(by_class)
    writer = mx.recordio.MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w")
    try:
        for i in range(n):
            label = classes[i % len(classes)]
            same = by_class[label]
            payload = same[(i // len(classes)) % len(same)]
            # the bytes mx.recordio.pack_img writes, without encoding the same image again
            writer.write_idx(i, mx.recordio.pack(mx.recordio.IRHeader(0, float(label), i, 0), payload))
    finally:
        writer.close()
    return prefix + ".rec", os.path.getsize(prefix + ".rec") / 2**20


def export_teacher(prefix, size=IMAGE, classes=CLASSES, seed=0):
    """A small random-init teacher exported as ``PREFIX-symbol.json`` + ``PREFIX-0000.params``;
    its parameter count."""
    import mxnet as mx
    from mxnet.gluon import nn
    mx.random.seed(seed)
    net = nn.HybridSequential(prefix="teacher_")
    with net.name_scope():
        for ch in (16, 32, 64):
            net.add(nn.Conv2D(ch, 3, strides=2, padding=1, use_bias=False), nn.BatchNorm(),
                    nn.Activation("relu"))
        net.add(nn.GlobalAvgPool2D(), nn.Dense(classes))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((1, 3, size, size)))
    net.export(prefix, epoch=0)
    return sum(int(np.prod(p.shape)) for p in net.collect_params().values())


def write_recipe(path, name, rec, teacher, run_dir, size=IMAGE, workers=None, augment=AUGMENT):
    """The tool's recipe for one size; the bare loop reads the same file."""
    data = {"name": "recordio", "train": rec, "val_split": 0.05, "image_size": size,
            "mean": MEAN, "std": STD, "augment": list(augment)}
    if workers is not None:
        data["workers"] = workers
    r = {"name": name, "data": data,
         "teacher": {"checkpoint": teacher, "epoch": 0},
         "student": {"model": STUDENT},
         "distillation": [{"loss": "kd", "weight": KD_WEIGHT, "temperature": TEMPERATURE},
                          {"loss": "ce", "weight": round(1 - KD_WEIGHT, 6)}],
         "trainer": {"epochs": 1, "batch_size": BATCH, "lr": LR, "optimizer": "nesterov",
                     "momentum": MOMENTUM, "weight_decay": WD, "lr_schedule": "constant",
                     "progress": False, "teacher_cache": "off"},
         "quantization": {"enabled": False}, "export": {"enabled": False},
         "output": {"dir": run_dir, "latency": False}}
    with open(path, "w") as f:
        yaml.safe_dump(r, f, sort_keys=False)
    return path


# -- children ------------------------------------------------------------------------------------

def run_child(cmd, log_path):
    """Run ``cmd`` (cwd: the repository; output to ``log_path``); ``(peak RSS bytes, seconds)``.

    The peak RSS is the child's own ``ru_maxrss`` (``os.wait4``), not the maximum over every child
    this process ever waited for (``RUSAGE_CHILDREN``)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    secs = time.time() - t0
    if code != 0:
        with open(log_path) as f:
            sys.stderr.write(f.read()[-4000:])
        raise SystemExit(f"bench/scale.py: `{' '.join(cmd)}` failed (exit {code}); log: {log_path}")
    return usage.ru_maxrss * 1024, secs        # Linux: KiB


def train_ours(recipe, run_dir, logs):
    """One KD epoch through ``train.py``: peak RSS, img/s and sizes from its ``metrics.json``."""
    from distill.runfolder import METRICS_FILE
    rss, secs = run_child([sys.executable, os.path.join(ROOT, "train.py"), recipe], logs)
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
        m = json.load(f)
    row = m["history"][0]
    return {"peak_rss_bytes": rss, "images_per_s": row["images_per_s"],
            "epoch_s": row["epoch_time_s"], "wall_s": secs, "train_images": m["data"]["train"],
            "val_images": m["data"]["val"], "steps": m["data"]["train"] // BATCH if
            m["data"]["train"] > BATCH else 1, "student_params": m["student"].get("params"),
            "log": logs}


def train_bare(recipe, steps, warmup, out_json, logs):
    """:func:`bare_loop` in a fresh child; its result and peak RSS."""
    rss, secs = run_child([sys.executable, os.path.abspath(__file__), "--bare", recipe,
                           "--bare-steps", str(steps), "--bare-warmup", str(warmup),
                           "--bare-json", out_json], logs)
    with open(out_json) as f:
        res = json.load(f)
    res.update(peak_rss_bytes=rss, wall_s=secs, log=logs)
    return res


def _feed_batches(recipe):
    """The tool's own iterator: ``distill.feed.EpochFeed`` (the batches of an epoch, prepared
    ahead on a thread; streamed ``x.batch(idx, augment, seed)`` or in-memory arrays, whichever
    ``load_data`` gives for the recipe), epoch after epoch."""
    from distill.data import load_data
    from distill.feed import EpochFeed
    cfg, aug = recipe.trainer, recipe.data.augment
    split = load_data(recipe.data, seed=cfg.seed).train
    classes = int(split.y.max()) + 1
    n = len(split.x)
    steps = max(1, (n - n % cfg.batch_size if n > cfg.batch_size else n) // cfg.batch_size)
    streamed = bool(getattr(split.x, "is_streamed", False))

    def gen():
        epoch = 0
        while True:
            for b in EpochFeed(split, cfg.batch_size, steps, cfg.seed, epoch, aug):
                if len(b.idx):
                    yield b.x, b.y
            epoch += 1
    return gen(), classes, f"EpochFeed ({'streamed' if streamed else 'in-memory arrays'})"


def _record_iter_batches(recipe):
    """Fallback until :data:`STREAM` lands: ``mx.io.ImageRecordIter`` over the same ``.rec``,
    same size, normalisation and augmentation (it reads every record, val share included)."""
    import mxnet as mx
    d, cfg = recipe.data, recipe.trainer
    rec = d.train if d.train.endswith(".rec") else d.train + ".rec"
    size = d.image_size if isinstance(d.image_size, int) else d.image_size[0]
    threads = max(1, d.workers if getattr(d, "workers", None) else os.cpu_count() or 1)
    it = mx.io.ImageRecordIter(
        path_imgrec=rec, path_imgidx=rec[:-4] + ".idx", data_shape=(3, size, size),
        batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, preprocess_threads=threads,
        rand_mirror="hflip" in d.augment, random_resized_crop="random_resized_crop" in d.augment,
        min_random_area=d.min_random_area if "random_resized_crop" in d.augment else 1.0,
        mean_r=MEAN[0] * 255, mean_g=MEAN[1] * 255, mean_b=MEAN[2] * 255,
        std_r=STD[0] * 255, std_g=STD[1] * 255, std_b=STD[2] * 255, round_batch=False)

    def gen():
        while True:
            it.reset()
            for b in it:
                if b.pad:
                    continue
                yield b.data[0].as_in_context(mx.cpu()), b.label[0].as_in_context(mx.cpu())
    return gen(), CLASSES, f"FALLBACK ImageRecordIter ({threads} threads; no {FEED})"


def bare_loop(recipe_path, steps, warmup, out_json):
    """A bare MXNet Gluon KD loop (``--bare``): no recorders, modifiers, checkpoints or hooks.

    Student ``mobilenet0.25`` from GluonCV, teacher through ``SymbolBlock.imports``, MXNet's
    ``nag`` with the recipe's lr, momentum and weight decay (none on BatchNorm and biases, as
    the tool), one hybridized KD + CE block; ``warmup`` batches untimed, then ``steps`` timed.
    The loss stays on the device and is read back every :data:`SYNC_EVERY` steps (the NaN check
    any loop needs; the tool's loop reads it as often)."""
    import mxnet as mx
    from gluoncv.model_zoo import get_model
    from mxnet import autograd, gluon
    from distill.recipe import load_recipe
    recipe = load_recipe(recipe_path)
    cfg = recipe.trainer
    mx.random.seed(cfg.seed)
    if has_module(FEED):
        batches, classes, source = _feed_batches(recipe)
    else:
        batches, classes, source = _record_iter_batches(recipe)
    print(f"bare loop: data from {source}", flush=True)
    student = get_model(STUDENT, pretrained=False, classes=classes)
    student.initialize(mx.init.Xavier())
    student.hybridize(static_alloc=True, static_shape=True)
    prefix = recipe.teacher.checkpoint
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"],
                                            f"{prefix}-{recipe.teacher.epoch:04d}.params")
    for p in teacher.collect_params().values():
        p.grad_req = "null"
    teacher.hybridize(static_alloc=True, static_shape=True)
    for name, p in student.collect_params().items():
        if name.endswith(("gamma", "beta", "bias")):
            p.wd_mult = 0.0
    trainer = gluon.Trainer(student.collect_params(), "nag",
                            {"learning_rate": cfg.lr, "momentum": cfg.momentum, "wd": cfg.weight_decay})

    class KDCE(gluon.HybridBlock):
        """KD (Hinton et al., 2015) at temperature T, T²-scaled, plus weighted CE: (N,) per sample."""

        def hybrid_forward(self, F, out, label, soft):
            t = TEMPERATURE
            log_ps, log_pt = F.log_softmax(out / t, axis=-1), F.log_softmax(soft / t, axis=-1)
            kd = F.sum(F.exp(log_pt) * (log_pt - log_ps), axis=-1) * (t * t)
            ce = -F.pick(F.log_softmax(out, axis=-1), label, axis=-1)
            return KD_WEIGHT * kd + (1 - KD_WEIGHT) * ce

    loss_fn = KDCE()
    loss_fn.hybridize(static_alloc=True)
    seen, total, t0, pending = 0, 0.0, None, []
    for step, (xb, yb) in enumerate(batches):
        if step == warmup:
            mx.nd.waitall()
            t0, seen = time.time(), 0
        if step == warmup + steps:
            break
        x = xb if isinstance(xb, mx.nd.NDArray) else mx.nd.array(xb)
        y = yb if isinstance(yb, mx.nd.NDArray) else mx.nd.array(yb)
        soft = teacher(x)
        with autograd.record():
            loss = loss_fn(student(x), y, soft).mean()
        loss.backward()
        trainer.step(1)
        pending.append(loss)
        if len(pending) >= SYNC_EVERY:
            total += float(mx.nd.add_n(*pending).asscalar())
            pending = []
        seen += x.shape[0]
    total += float(mx.nd.add_n(*pending).asscalar()) if pending else 0.0
    mx.nd.waitall()
    secs = time.time() - t0
    batches.close()                 # stops the feed's thread
    res = {"images_per_s": seen / secs, "timed_steps": steps, "warmup_steps": warmup,
           "images": seen, "seconds": secs, "data_source": source, "fallback": "FALLBACK" in source,
           "optimizer": "nag (MXNet)", "mean_loss": total / max(1, warmup + steps)}
    with open(out_json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"bare loop: {res['images_per_s']:.1f} img/s over {steps} batches", flush=True)
    return 0


# -- decode throughput ---------------------------------------------------------------------------

def decode_table(recipe_path, workers=DECODE_WORKERS, n=512):
    """img/s of decoding with each number of decode threads: ``(rows, source, streamed)``.

    ``streamed``: whether ``load_data`` gives the recipe's train split as streamed images."""
    from distill.data import load_data
    from distill.recipe import load_recipe
    recipe = load_recipe(recipe_path)
    x = load_data(recipe.data, seed=recipe.trainer.seed).train.x
    if getattr(x, "is_streamed", False):
        from distill.data.stream import decode_throughput
        return ([(w, float(decode_throughput(x, w, n=n))) for w in workers],
                f"{STREAM}.decode_throughput", True)
    del x
    import cv2
    from concurrent.futures import ThreadPoolExecutor
    import mxnet as mx
    rec = recipe.data.train
    reader = mx.recordio.MXIndexedRecordIO(rec[:-4] + ".idx", rec, "r")
    try:
        payloads = [mx.recordio.unpack(reader.read_idx(k))[1] for k in reader.keys[:n]]
    finally:
        reader.close()
    size = recipe.data.image_size

    def dec(p):
        img = cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR)
        return cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (size, size))
    out = []
    for w in workers:
        t0 = time.time()
        if w == 0:
            for p in payloads:
                dec(p)
        else:
            with ThreadPoolExecutor(w) as pool:
                list(pool.map(dec, payloads))
        out.append((w, len(payloads) / (time.time() - t0)))
    return out, "FALLBACK cv2.imdecode + resize on a thread pool: the data are not streamed", False


# -- main ----------------------------------------------------------------------------------------

def _gib(b):
    return b / 2**30


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000],
                    help="dataset sizes (records); the RSS ratio is largest / smallest")
    ap.add_argument("--workers", type=int, default=None,
                    help="data.workers of the recipes (default: unset, the data layer's default)")
    ap.add_argument("--augment", nargs="*", default=AUGMENT, metavar="OP",
                    help=f"data.augment of the recipes (default: {' '.join(AUGMENT)}; none: no "
                         f"augmentation)")
    ap.add_argument("--warmup", type=int, default=5, help="bare loop: untimed batches first")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temporary folder (records, teacher, recipes, run folders, logs)")
    ap.add_argument("--smoke", action="store_true",
                    help="200 and 600 records, one short epoch, seconds: the test suite runs this "
                         "(the figures mean nothing); every file in its work folder")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help=f"folder of results.json (default {os.path.relpath(OUT, ROOT)}/; with "
                         f"--smoke: the work folder, default a new temporary folder, never under runs/)")
    ap.add_argument("--bare", metavar="RECIPE", help=argparse.SUPPRESS)
    ap.add_argument("--bare-steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--bare-warmup", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--bare-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bare:
        return bare_loop(args.bare, args.bare_steps, args.bare_warmup, args.bare_json)

    sizes = sorted(set(args.sizes))
    if args.smoke:
        if args.keep and not args.out:
            args.out = tempfile.mkdtemp(prefix="bench-smoke-scale-")
        out_dir = _smoke.workdir(args, "scale")
        sizes, args.warmup = [200, 600], 2
        _smoke.skipped("the 2,000 and 20,000 record sizes (200 and 600 instead)")
        work = tempfile.mkdtemp(prefix="data-", dir=out_dir)
    else:
        out_dir = os.path.abspath(args.out or OUT)
        os.makedirs(out_dir, exist_ok=True)
        work = tempfile.mkdtemp(prefix="bench-scale-")
    if not args.keep:
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    print(f"bench/scale.py: sizes {', '.join(f'{n:,}' for n in sizes)}; work folder {work}"
          f"{' (kept)' if args.keep else ' (removed at exit; --keep keeps it)'}; "
          f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
          flush=True)
    if not has_module(FEED):
        print(f"bench/scale.py: {FEED} is not in the tree: the bare loop reads the records "
              f"through mx.io.ImageRecordIter (marked FALLBACK)", flush=True)

    t0 = time.time()
    pool = jpeg_pool(per_class=40)
    teacher = os.path.join(work, "teacher")
    t_params = export_teacher(teacher)
    data, ours = {}, {}
    for n in sizes:
        rec, mib = write_records(os.path.join(work, f"synth{n}"), n, pool)
        data[n] = {"rec": rec, "mib": mib}
    written = ", ".join(f"{n:,} ({data[n]['mib']:.0f} MiB)" for n in sizes)
    print(f"wrote {len(pool)} distinct JPEGs ({np.mean([len(p) for _, p in pool]) / 1024:.1f} KiB "
          f"mean) into {written} records and "
          f"a {t_params:,}-parameter teacher in {time.time() - t0:.1f} s", flush=True)

    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    for n in sizes:
        run_dir = os.path.join(work, "runs", f"scale{n}")
        data[n]["recipe"] = write_recipe(os.path.join(work, f"scale{n}.yaml"), f"bench_scale_{n}",
                                         data[n]["rec"], teacher, run_dir, workers=args.workers,
                                         augment=args.augment)
        print(f"== ours: one KD epoch on {n:,} records (train.py, own process)", flush=True)
        ours[n] = train_ours(data[n]["recipe"], run_dir, os.path.join(logs, f"ours{n}.log"))
        print(f"   peak RSS {ours[n]['peak_rss_bytes'] / 2**20:.0f} MiB, "
              f"{ours[n]['images_per_s']:.1f} img/s, {ours[n]['wall_s']:.0f} s", flush=True)
    big, small = sizes[-1], sizes[0]
    print(f"== bare MXNet Gluon loop on {big:,} records: {ours[big]['steps']} batches after "
          f"{args.warmup} warm-up (own process)", flush=True)
    bare = train_bare(data[big]["recipe"], ours[big]["steps"], args.warmup,
                      os.path.join(work, "bare.json"), os.path.join(logs, "bare.log"))
    print(f"   peak RSS {bare['peak_rss_bytes'] / 2**20:.0f} MiB, {bare['images_per_s']:.1f} img/s",
          flush=True)
    decode, decode_source, streaming = decode_table(data[small]["recipe"])
    if not streaming:
        print(f"bench/scale.py: load_data does not stream data.name recordio here (no {STREAM}, "
              f"or it is not wired in): the tool holds every image in memory, so the RSS targets "
              f"cannot hold", flush=True)

    rows = [[f"{n:,}", ours[n]["train_images"], f"{data[n]['mib']:.0f}",
             f"{ours[n]['peak_rss_bytes'] / 2**20:.0f}",
             f"{ours[n]['peak_rss_bytes'] / ours[small]['peak_rss_bytes']:.2f}×",
             f"{ours[n]['images_per_s']:.1f}", f"{ours[n]['epoch_s']:.1f}", f"{ours[n]['wall_s']:.0f}"]
            for n in sizes]
    print(format_table(["records", "train images", ".rec MiB", "peak RSS MiB", f"vs {small:,}",
                        "img/s", "epoch s", "process s"], rows,
                       title=f"\none KD epoch ({STUDENT} student, small teacher, batch {BATCH}, "
                             f"{IMAGE}×{IMAGE}, augment {'+'.join(args.augment) or 'none'}; "
                             f"data: {'streamed' if streaming else 'in memory, not streamed'})"))
    speed = ours[big]["images_per_s"] / bare["images_per_s"]
    print(format_table(
        ["loop", "data", "img/s", "peak RSS MiB", "ours / bare"],
        [["ours (train.py, whole epoch)", "EpochFeed" if has_module(FEED) else "the tool's",
          f"{ours[big]['images_per_s']:.1f}", f"{ours[big]['peak_rss_bytes'] / 2**20:.0f}", f"{speed:.2f}×"],
         [f"bare Gluon ({bare['timed_steps']} batches after {bare['warmup_steps']})",
          bare["data_source"], f"{bare['images_per_s']:.1f}", f"{bare['peak_rss_bytes'] / 2**20:.0f}", "1.00×"]],
        title=f"\ntraining speed on {big:,} records, timed in this run one after the other "
              f"(noisy on a shared machine)"))
    base = decode[0][1]
    print(format_table(["decode workers", "img/s", "img/s per worker", "vs 0 workers"],
                       [[w, f"{v:.0f}", f"{v / max(w, 1):.0f}", f"{v / base:.2f}×"] for w, v in decode],
                       title=f"\ndecode throughput, {IMAGE}×{IMAGE} JPEGs ({decode_source}; "
                             f"0 workers: in the calling thread)"))

    ratio = ours[big]["peak_rss_bytes"] / ours[small]["peak_rss_bytes"]
    worst = max(ours[n]["peak_rss_bytes"] for n in sizes)
    checks = [
        (f"peak RSS of one KD epoch, {big:,} vs {small:,} records", f"≤ {RSS_RATIO}×",
         f"{ratio:.2f}×", ratio <= RSS_RATIO),
        (f"peak RSS of one KD epoch at {small:,} and {big:,} records", "< 3 GiB each",
         " / ".join(f"{_gib(ours[n]['peak_rss_bytes']):.2f}" for n in (small, big)) + " GiB",
         worst < RSS_CAP),
        (f"training img/s, our loop vs a bare Gluon loop ({big:,} records"
         + (", bare loop on ImageRecordIter: fallback)" if bare["fallback"] else ")"), f"≥ {SPEED_RATIO}×",
         f"{speed:.2f}×", speed >= SPEED_RATIO),
    ]
    print()
    for c in checks:
        target(*c)
    failed = [c[0] for c in checks if not c[3]]
    print(f"\nscale: {'PASS' if not failed else 'FAIL'} ({len(checks) - len(failed)} of {len(checks)} "
          f"targets hold){' (--smoke: the figures mean nothing)' if args.smoke else ''}")
    results = {"smoke": bool(args.smoke), "streaming": streaming, "cores": os.cpu_count(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "image_size": IMAGE,
               "batch_size": BATCH, "student": STUDENT, "teacher_params": t_params,
               "augment": args.augment, "workers": args.workers,
               "sizes": {str(n): {**{k: v for k, v in ours[n].items() if k != "log"},
                                  "rec_mib": data[n]["mib"]} for n in sizes},
               "bare": {k: v for k, v in bare.items() if k != "log"},
               "speed_ratio": speed, "rss_ratio": ratio,
               "decode": {"source": decode_source, "rows": [{"workers": w, "images_per_s": v,
                                                             "per_worker": v / max(w, 1)}
                                                            for w, v in decode]},
               "targets": [{"figure": f, "target": g, "measured": m, "holds": h} for f, g, m, h in checks],
               "work": work if args.keep else None}
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"results: {path}")
    return 0 if args.smoke or not failed else 1


if __name__ == "__main__":
    sys.exit(main())
