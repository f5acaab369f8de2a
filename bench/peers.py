"""``make bench-peers``: Torch-Pruning + KD against ours on Fashion-MNIST, every result timed in ncnn.

Same networks, same data, same teachers, same schedule, same seeds, same runtime:

1. **Data and teachers.** Fashion-MNIST (``apt-get install dataset-fashion-mnist``): every
   pruned network learns from the class-balanced 4,000 training images of
   ``recipes/prune_channel_fashion.yaml`` and is reported on the 10,000 test images at its last
   epoch. ResNet-20 is the benchmark's teacher (``recipes/teacher_fashion.yaml``: 57,000 images,
   18 epochs, ``runs/teacher_fashion``, trained when missing). MobileNetV2-0.5 (28×28: the stem
   at stride 1) is ``recipes/student_fashion.yaml`` without pruning (``OUT/recipes/mbv2-dense.yaml``:
   KD from that teacher). Each dense network is what both tools prune, and the teacher both
   distil from.
2. **Ours** (``OUT/recipes/ours-MODEL-PCT-sSEED.yaml``): ``prune_channel_fashion.yaml`` with the
   defaults of issue 28 (``criterion: group_l2``, the student rebuilt smaller at every update,
   ``keep_outputs: [last]``, ``round_to: 4``; ``round_mode: down``, as Torch-Pruning rounds), at
   50%, 75% and 90% of the channels; trained by
   ``python train.py`` and exported by ``distill export RUN --format ncnn``.
3. **Torch-Pruning** (``.venv-peers``, :mod:`bench.peers_torch`): the same architecture in
   PyTorch, the dense MXNet weights copied in (checked: same logits within 1e-4), the teacher's
   logits on the training images computed once by MXNet; the loop of ``distill.trainer`` read
   from our resolved recipe (loss terms, optimizer, lr per step, epochs, batch order, seed). Two
   settings: ``plain`` (``BasePruner`` + ``GroupMagnitudeImportance(p=2)``, its README's) and
   ``groupnorm-sparse`` (``GroupNormPruner``, DepGraph's sparse training, reg 5e-4 and no weight
   decay while it regularizes, as its CIFAR benchmark script), both ``round_to`` 4, the
   classifier ignored, stepping at our pruning epochs to our AGP ratios. ``torch.onnx.export``
   then our ONNX → pnnx → ncnn conversion.
4. **The schedule** of every run: 5 epochs, epoch 0 at full width (sparse training where the
   setting has it), pruning updates at the start of epochs 1 and 2 (AGP), then 2 epochs of
   fine-tuning. Seeds 0, 1, 2 for every setting (the seed sets the batch order on both sides).
5. **ncnn** for all alike (:func:`distill.export.ncnn_worker.run_tasks`, a child process): top-1
   on the 10,000 test images and logit parity with the framework that trained the model, then
   batch-1 latency with one thread, best of repeats, in rounds that alternate the models (the
   order reversed every other round). MACs and parameters are counted the same way on both sides.

**Equal latency.** At one ratio both tools mostly cut every coupled group to the same kept width
(the same layer-wise ratio, ``round_to`` rounded down, the classifier's outputs kept). Where
Torch-Pruning's rounding leaves a kept width of 0 channels it prunes nothing in that group, so at
high ratios its network is wider and slower than ours. Each of its points is therefore compared
with the least-pruned of our runs of that model whose measured ncnn time is ≤ 1.02× its own
(chosen by latency, not by top-1): :func:`equal_latency`.

Training runs one OpenMP thread per process, two processes side by side (``--jobs 2``). Each
finished run is reused while its recipe (ours: the recipe hash) or config (Torch-Pruning: config,
inputs and code) is unchanged, so a killed bench resumes where it stopped; ``--fresh`` retrains.
The dense networks (the ResNet-20 teacher, the dense MobileNetV2) are inputs: trained once, then
handed to our runs as ``teacher.checkpoint`` and reused whatever the tool's version, since the
Torch-Pruning runs identify them by their arrays (delete their folders to retrain them).

    .venv/bin/python bench/peers.py                         # what make bench-peers runs
    .venv/bin/python bench/peers.py --epochs 2 --limit 400 --out /tmp/peers --models resnet20 --ratios 0.5 --seeds 0 1

Output: the table, the paired comparisons, ``OUT/results.json`` (``{"data": "fashion_mnist",
"rows": [...]}``, one row per tool, config, model and ratio with ``top1`` the mean over seeds,
``top1_std``, ``seeds``, ``ncnn_ms_b1``, ``macs``, ``params``, ``train_s``; ``dense`` rows are the
unpruned starts; ours' rows carry ``vs`` with the paired difference and p-value against each
Torch-Pruning setting), ``OUT/runs.json`` (every run), logs per run in ``OUT/logs/``.
"""
import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.targets import target  # noqa: E402

import numpy as np  # noqa: E402

from distill.export.ncnn_pnnx import onnx_to_ncnn  # noqa: E402
from distill.export.ncnn_worker import run_tasks  # noqa: E402
from distill.export.parity import check_close, compare_logits  # noqa: E402
from distill.pruning.base import SCHEDULES  # noqa: E402
from distill.recipe import load_recipe, recipe_hash, recipe_to_dict  # noqa: E402
from distill.report import format_table, human  # noqa: E402
from distill.runfolder import RunFolder, read_json, write_json  # noqa: E402

OUT = os.path.join("runs", "bench_peers")
DATA = "fashion_mnist"
MODELS = ("resnet20", "mobilenetv2")
RATIOS = (0.5, 0.75, 0.9)
SEEDS = (0, 1, 2)
CONFIGS = (("ours", "defaults"), ("torch-pruning", "plain"), ("torch-pruning", "groupnorm-sparse"))
TP_REG = 5e-4                     # GroupNormPruner's reg: Torch-Pruning's CIFAR benchmark default
SCHEDULE = {"start_epoch": 1, "end_epoch": 2}     # epoch 0 at full width, updates at 1 and 2
TEACHER_RECIPE = os.path.join(ROOT, "recipes", "teacher_fashion.yaml")
PRUNE_RECIPE = os.path.join(ROOT, "recipes", "prune_channel_fashion.yaml")
DENSE_MBV2_RECIPE = os.path.join(ROOT, "recipes", "student_fashion.yaml")
PEERS_PYTHON = os.path.join(ROOT, os.environ.get("PEERS_PYTHON", os.path.join(".venv-peers", "bin", "python")))
INPUT_SHAPE = (1, 28, 28)
ATOL, RTOL = 1e-3, 1e-4           # distill export's fp32 parity rule (--atol / --rtol defaults)
LATENCY_SLACK = 1.02              # issue 28: ours at ≤ 1.02× Torch-Pruning's ncnn batch-1 latency
WALL_TARGET_MIN = 180


def _say(msg):
    print(msg, flush=True)


def _rel(path):
    """``path`` relative to the repository when inside it (what recipes and logs show)."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def _child_env():
    # one OpenMP thread per process: two processes share the two cores, and OpenMP's threads on
    # a busy machine cost far more than they give (measured: a PyTorch ResNet-20 step 12× slower
    # with 2 threads while another job ran)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(cmd, log_path):
    """Run ``cmd`` with its output in ``log_path``; raise with the log's tail when it fails."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}); {_rel(log_path)} ends:\n{tail}")


# -- recipes ------------------------------------------------------------------------------------

def _tag(model, ratio, seed=None):
    return f"{model}-{int(round(ratio * 100))}" + ("" if seed is None else f"-s{seed}")


def schedule(epochs=None):
    """The pruning updates' epochs (``start_epoch``, ``end_epoch``) for ``epochs`` epochs: the
    bench's (one full-width epoch, updates at 1 and 2) or, for a shorter development run, what
    fits (two epochs: one update at epoch 0)."""
    if not epochs:
        return dict(SCHEDULE)
    start = 1 if epochs >= 3 else 0
    return {"start_epoch": start, "end_epoch": max(start, min(SCHEDULE["end_epoch"], epochs - 2))}


def write_recipes(out, models, ratios, seeds, teacher_prefix, epochs=None, limit=None):
    """The recipes of ours, under ``OUT/recipes/`` (``extends:`` the bundled ones): the dense
    MobileNetV2 and one per (model, ratio, seed). ``teacher_prefix``: the trained ResNet-20
    teacher (:func:`dense_input`), handed to every recipe as ``teacher.checkpoint``, as the dense
    MobileNetV2 is to its runs. ``epochs`` / ``limit``: shorter runs for development (both tools
    read the same resolved recipe)."""
    rdir = os.path.join(out, "recipes")
    os.makedirs(rdir, exist_ok=True)
    rel = lambda p: os.path.relpath(os.path.abspath(p), rdir)  # noqa: E731
    mbv2_dir = os.path.join(out, "mbv2-dense")
    by_checkpoint = lambda prefix: {"teacher": {"recipe": None, "checkpoint": rel(prefix)}}  # noqa: E731
    extra = {}
    if epochs:
        extra["trainer"] = {"epochs": int(epochs)}
    if limit:
        extra["data"] = {"limit": int(limit)}

    def write(name, text, sections):
        for key, value in extra.items():
            sections.setdefault(key, {}).update(value)
        body = "".join(f"{k}: {json.dumps(v)}\n" for k, v in sections.items())
        path = os.path.join(rdir, name + ".yaml")
        with open(path, "w") as f:
            f.write(text + body)
        return path

    paths = {"mobilenetv2-dense": write(
        "mbv2-dense",
        "# bench/peers.py: the dense MobileNetV2-0.5 both tools prune (and distil from):\n"
        "# recipes/student_fashion.yaml (KD from the ResNet-20 teacher) without pruning.\n"
        f"extends: {rel(DENSE_MBV2_RECIPE)}\nname: bench_peers_mbv2_dense\n",
        {**by_checkpoint(teacher_prefix),
         "pruning": {"enabled": False}, "quantization": {"enabled": False}, "export": {"enabled": False},
         "trainer": {"progress": False},
         "output": {"dir": _rel(mbv2_dir), "latency": False}})}
    for model in models:
        for ratio in ratios:
            for seed in seeds:
                tag = _tag(model, ratio, seed)
                sections = {"pruning": {"final_sparsity": ratio, "criterion": "group_l2", "round_mode": "down",
                                        **schedule(epochs)},
                            "trainer": {"progress": False, "seed": int(seed)},
                            "output": {"dir": _rel(os.path.join(out, "ours-" + tag)), "latency": False}}
                sections = {**by_checkpoint(RunFolder(mbv2_dir).model_prefix if model == "mobilenetv2"
                                            else teacher_prefix), **sections}
                paths[("ours", model, ratio, seed)] = write(
                    "ours-" + tag,
                    f"# bench/peers.py: ours, {model}, {ratio:.0%} of the channels, seed {seed}:\n"
                    "# prune_channel_fashion.yaml with issue 28's criterion (group_l2), kept widths rounded\n"
                    "# down (as Torch-Pruning rounds), pruned at epochs 1-2\n"
                    + ("# on the dense MobileNetV2-0.5 (the teacher: student.from: teacher)\n"
                       if model == "mobilenetv2" else "")
                    + f"extends: {rel(PRUNE_RECIPE)}\nname: bench_peers_ours_{tag.replace('-', '_')}\n",
                    sections)
    return paths


def is_fresh(recipe_path):
    """True when the recipe's run folder holds a complete run of this very recipe by this very
    tool (:func:`distill.runfolder.reuse_check`, the rule ``teacher.recipe`` reuses a trained
    teacher by); a stale one is named with what changed."""
    from distill.runfolder import reuse_check
    recipe = load_recipe(recipe_path)
    ok, why = reuse_check(recipe.run_dir, recipe_hash(recipe), recipe_to_dict(recipe))
    if not ok and RunFolder(recipe.run_dir).is_complete():
        print(f"peers: {why}: training it again", flush=True)
    return ok


def train(recipe_path, log_path, fresh=False):
    """``python train.py RECIPE`` unless a complete run of it is there; returns (run dir, seconds
    or None when reused)."""
    recipe = load_recipe(recipe_path)
    if not fresh and is_fresh(recipe_path):
        return recipe.run_dir, None
    t0 = time.time()
    _run([sys.executable, os.path.join(ROOT, "train.py"), recipe_path], log_path)
    return recipe.run_dir, time.time() - t0


def dense_input(recipe_path, log_path, fresh=False):
    """A dense network of the bench (the ResNet-20 teacher, the dense MobileNetV2): the model
    prefix of its run folder, trained by ``python train.py RECIPE`` only when the folder holds
    no complete run. It is an input both tools start from, identified by its arrays (the
    Torch-Pruning runs hash them), so a later version of our tool does not retrain it: delete
    the folder to. Returns (prefix, seconds or None when reused)."""
    recipe = load_recipe(recipe_path)
    folder = RunFolder(recipe.run_dir)
    if folder.is_complete() and not fresh:
        return folder.model_prefix, None
    _, secs = train(recipe_path, log_path, fresh=True)
    return folder.model_prefix, secs


# -- what the PyTorch side is handed ------------------------------------------------------------

def _save_npz(path, batch=256, **arrays):
    """``np.savez(path, **arrays)``, each array written ``batch`` rows at a time: an image split
    may be a lazy array of streamed images (recordio, image folders), never read whole."""
    import zipfile
    with zipfile.ZipFile(path, "w", allowZip64=True) as zf:
        for name, a in arrays.items():
            shape, dtype = tuple(a.shape), np.dtype(getattr(a, "dtype", np.float32))
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(
                    f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
                for i in range(0, shape[0], batch):
                    f.write(np.ascontiguousarray(a[i:i + batch], dtype=dtype).tobytes())


def prepare(model, recipe_path, out):
    """Write, once per dense network: the data (``data.npz``), the teacher's logits on the train
    images (``MODEL-teacher-logits.npy``: MXNet, computed once), and the dense pair with its val
    logits (``MODEL-dense.npz``). Returns their paths."""
    import mxnet as mx
    from distill.data import load_data
    from distill.graphio import load_pair, load_symbol_block
    from distill.run import recipe_dir_of
    from distill.teacher import checkpoint_prefix
    from distill.trainer import predict

    recipe = load_recipe(recipe_path)
    prefix = checkpoint_prefix(recipe.teacher.checkpoint, recipe_dir_of(recipe))
    data = load_data(recipe.data, seed=recipe.trainer.seed)
    paths = {"data": os.path.join(out, "data.npz"),
             "teacher_logits": os.path.join(out, f"{model}-teacher-logits.npy"),
             "dense": os.path.join(out, f"{model}-dense.npz")}
    _save_npz(paths["data"], x_train=data.train.x, y_train=data.train.y.astype(np.int64),
              x_val=data.val.x, y_val=data.val.y.astype(np.int64))
    net = load_symbol_block(prefix)
    np.save(paths["teacher_logits"], predict(net, data.train.x).astype(np.float32))
    sym, params = load_pair(prefix, input_shape=(1,) + INPUT_SHAPE)
    np.savez(paths["dense"], symbol_json=np.array(sym.tojson()), val_logits=predict(net, data.val.x),
             **{f"param:{k}": v.asnumpy() for k, v in params.items()})
    mx.nd.waitall()
    return paths, prefix


def peer_config(model, ratio, seed, method, recipe_path, inputs, out):
    """One Torch-Pruning run's config: everything it trains by comes from our resolved recipe
    (the one of the same model, ratio and seed)."""
    recipe = load_recipe(recipe_path)
    r = recipe_to_dict(recipe)
    r["trainer"].pop("teacher_cache_shared", None)   # where our runs keep teacher outputs: not
    p = recipe.pruning                               # what a run trains by (and keeps TP's hashes)
    end = p.end_epoch if p.end_epoch is not None else p.start_epoch + max(0, (recipe.trainer.epochs - p.start_epoch) // 2 - 1)
    events = SCHEDULES.get(p.schedule)(p.start_epoch, end, p.frequency).events()
    return {"model": model, "ratio": ratio, "method": method, "reg": TP_REG, "round_to": p.round_to,
            "prune_epochs": events, "recipe": {"trainer": r["trainer"], "distillation": r["distillation"]},
            "data": inputs["data"], "teacher_logits": inputs["teacher_logits"], "dense": inputs["dense"],
            "out": os.path.join(out, f"tp-{method}-{_tag(model, ratio, seed)}")}


def _config_hash(cfg):
    """Config + the inputs' arrays + the PyTorch code: a change in any retrains (arrays, not
    ``.npz`` bytes: a zip member carries the time it was written)."""
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for path in (cfg["data"], cfg["teacher_logits"], cfg["dense"]):
        loaded = np.load(path)
        arrays = {"": loaded} if isinstance(loaded, np.ndarray) else loaded
        for k in sorted(arrays):
            h.update(k.encode() + np.ascontiguousarray(arrays[k]).tobytes())
    with open(os.path.join(ROOT, "bench", "peers_torch.py"), "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:12]


# -- one (tool, model, ratio) -------------------------------------------------------------------

_TIMES_LOCK = threading.Lock()


def _train_seconds(out, key, secs=None):
    """The wall time of run ``key``'s training process: recorded in ``OUT/timings.json`` when it
    trained (``secs``), read back when the run is reused."""
    path = os.path.join(out, "timings.json")
    with _TIMES_LOCK:
        times = read_json(path, {})
        if secs is not None:
            times[key] = round(secs, 2)
            write_json(path, times)
        return times.get(key)


def run_ours(model, ratio, seed, recipe_path, out, fresh):
    """Train (or reuse) and export to ncnn. Returns the run's facts so far."""
    tag = _tag(model, ratio, seed)
    log_path = os.path.join(out, "logs", f"ours-{tag}.log")
    run_dir, secs = train(recipe_path, log_path, fresh)
    folder = RunFolder(run_dir)
    param = os.path.join(folder.export_dir, "model.ncnn.param")
    if secs is not None or not os.path.isfile(param):
        _run([sys.executable, "-m", "distill.cli", "export", run_dir, "--format", "ncnn",
              "--threads", "1", "--no-latency"], log_path)
    m = folder.read_metrics()
    return {"tool": "ours", "config": "defaults", "model": model, "ratio": ratio, "seed": seed,
            "run_dir": run_dir, "top1_framework": m["student"]["top1"], "macs": m["student"]["macs"],
            "params": m["student"]["params"], "param": param,
            "bin": os.path.join(folder.export_dir, "model.ncnn.bin"),
            "train_s": _train_seconds(out, "ours-" + tag, secs), "reused": secs is None}


def run_peer(model, ratio, seed, cfg, out, fresh):
    """Torch-Pruning + KD in ``.venv-peers`` (or reuse), then ONNX → ncnn by our converter."""
    out_dir = cfg["out"]
    key = os.path.basename(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out, "logs", f"{key}.log")
    h = _config_hash(cfg)
    res_path = os.path.join(out_dir, "result.json")
    old = read_json(res_path, {})
    secs = None
    if fresh or old.get("config_hash") != h:
        if os.path.exists(res_path):
            os.unlink(res_path)
        cfg_path = os.path.join(out_dir, "config.json")
        write_json(cfg_path, cfg)
        t0 = time.time()
        _run([PEERS_PYTHON, os.path.join(ROOT, "bench", "peers_torch.py"), "run", cfg_path], log_path)
        secs = time.time() - t0
        res = read_json(res_path)
        res["config_hash"] = h
        param, bin_ = (os.path.join(out_dir, f) for f in ("model.ncnn.param", "model.ncnn.bin"))
        onnx_to_ncnn(res["onnx"], INPUT_SHAPE, param, bin_, work_dir=out_dir)
        shutil.rmtree(os.path.join(out_dir, "pnnx"), ignore_errors=True)
        write_json(res_path, res)
    res = read_json(res_path)
    return {"tool": "torch-pruning", "config": cfg["method"], "model": model, "ratio": ratio, "seed": seed,
            "run_dir": out_dir, "top1_framework": round(res["top1_torch"], 3), "macs": res["macs"],
            "params": res["params"], "param": os.path.join(out_dir, "model.ncnn.param"),
            "bin": os.path.join(out_dir, "model.ncnn.bin"),
            "val_logits": os.path.join(out_dir, "val_logits.npy"), "copy": res["copy"],
            "train_s": _train_seconds(out, key, secs), "reused": secs is None}


def export_dense(model, ours_recipe, out, fresh):
    """The dense start in ncnn (``distill export RUN --model teacher``: the ours run's teacher is
    the dense network), for the table's reference rows."""
    recipe = load_recipe(ours_recipe)
    run_dir = recipe.run_dir
    dest = os.path.join(out, f"dense-{model}")
    param = os.path.join(dest, "model.ncnn.param")
    if fresh or not os.path.isfile(param):
        _run([sys.executable, "-m", "distill.cli", "export", run_dir, "--model", "teacher", "--format", "ncnn",
              "--threads", "1", "--no-latency", "--out", dest], os.path.join(out, "logs", f"dense-{model}.log"))
    t = RunFolder(run_dir).read_metrics()["teacher"]
    return {"tool": "dense", "config": "-", "model": model, "ratio": 0.0, "seed": None, "run_dir": dest, "top1_framework": t["top1"],
            "macs": t["macs"], "params": t["params"], "param": param,
            "bin": os.path.join(dest, "model.ncnn.bin"), "teacher_prefix": RunFolder(run_dir).teacher_prefix}


# -- ncnn: top-1 and latency for every row alike ------------------------------------------------

def framework_logits(row, x_val):
    """The val logits of the framework that made the row's model (MXNet or PyTorch)."""
    if row["tool"] == "torch-pruning":
        return np.load(row["val_logits"])
    from distill.graphio import load_symbol_block
    from distill.trainer import predict
    prefix = row["teacher_prefix"] if row["tool"] == "dense" else RunFolder(row["run_dir"]).model_prefix
    return predict(load_symbol_block(prefix), x_val)


def measure_ncnn(rows, x_val, y_val, work_dir, rounds, repeats):
    """Top-1 and parity in ncnn (one thread), then batch-1 latency: ``rounds`` rounds over every
    model, tools alternating, the order reversed every other round; best of all."""
    one = np.ascontiguousarray(x_val[:1], dtype=np.float32)
    tasks = [{"task": "predict", "x": "val", "threads": 1, "param": r["param"], "bin": r["bin"]} for r in rows]
    res = run_tasks(tasks, {"val": np.ascontiguousarray(x_val, dtype=np.float32)}, work_dir)
    for r, got in zip(rows, res):
        stats = compare_logits(framework_logits(r, x_val), got["arrays"]["logits"], y_val)
        r["top1"] = round(stats["top1"], 3)
        r["ncnn_parity"] = {"max_abs_diff": stats["max_abs_diff"], "ref_max_abs": stats["ref_max_abs"],
                            "top1_agreement": stats["top1_agreement"],
                            "failed": check_close(stats, ATOL, RTOL)}
    order = list(range(len(rows)))
    tasks, owners = [], []
    for k in range(rounds):
        for i in (order if k % 2 == 0 else order[::-1]):
            tasks.append({"task": "latency", "x": "one", "threads": 1, "repeats": repeats,
                          "param": rows[i]["param"], "bin": rows[i]["bin"]})
            owners.append(i)
    res = run_tasks(tasks, {"one": one}, work_dir)
    best = {}
    for i, got in zip(owners, res):
        best.setdefault(i, []).append(got["meta"]["ms"])
    for i, r in enumerate(rows):
        r["ncnn_ms_b1"] = min(best[i])
        r["ncnn_ms_rounds"] = best[i]


_SETTING_ORDER = {c: i for i, c in enumerate((("dense", "-"),) + CONFIGS)}


def _model_order(model):
    return MODELS.index(model) if model in MODELS else 0


def _interleave(runs):
    """Runs in timing order: per (model, ratio) the dense start first, then each setting's seeds."""
    return sorted(runs, key=lambda r: (_model_order(r["model"]), r["ratio"], r["seed"] or 0,
                                       _SETTING_ORDER[(r["tool"], r["config"])]))


def paired(a, b):
    """``a`` − ``b`` over the seeds both rows ran: ``seeds``, ``diff`` (mean), ``diff_std``
    (sample), ``p`` (Student's paired t, two-sided; None below two seeds)."""
    from distill.compare.stats import paired_t_test
    theirs = dict(zip(b["seeds"], b["top1_per_seed"]))
    d = np.array([x - theirs[s] for s, x in zip(a["seeds"], a["top1_per_seed"]) if s in theirs], np.float64)
    _, p = paired_t_test(d)
    return {"seeds": len(d), "diff": round(float(d.mean()), 3) if len(d) else None,
            "diff_std": round(float(d.std(ddof=1)), 3) if len(d) > 1 else None,
            "p": None if p is None else round(p, 4)}


def aggregate(runs):
    """One row per (tool, config, model, ratio) from the per-seed runs: ``top1`` the mean over
    seeds, ``top1_std`` (sample, n − 1; 0 for one seed), ``seeds``, ``ncnn_ms_b1`` (the median
    over seeds of each model's best), ``macs``/``params`` (the first seed's; ``widths_differ``
    when seeds built different networks), ``train_s`` (mean over the runs with a recorded wall
    time: ``OUT/timings.json`` keeps it for reused runs).
    Ours' rows get ``vs``: per Torch-Pruning setting at the same (model, ratio), the paired
    difference ours − theirs over the seeds both ran (mean, std), Student's paired t p-value,
    and the latency ratio ours / theirs."""
    groups = {}
    for r in runs:
        groups.setdefault((r["tool"], r["config"], r["model"], r["ratio"]), []).append(r)
    rows = []
    for (tool, config, model, ratio), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"] or 0)
        top1 = np.array([r["top1"] for r in rs], np.float64)
        secs = [r["train_s"] for r in rs if r.get("train_s") is not None]
        row = {"tool": tool, "config": config, "model": model, "ratio": ratio,
               "top1": round(float(top1.mean()), 3),
               "top1_std": round(float(top1.std(ddof=1)), 3) if len(top1) > 1 else 0.0,
               "seeds": [r["seed"] for r in rs], "top1_per_seed": [r["top1"] for r in rs],
               "ncnn_ms_b1": round(float(np.median([r["ncnn_ms_b1"] for r in rs])), 4),
               "macs": rs[0]["macs"], "params": rs[0]["params"],
               "train_s": round(float(np.mean(secs)), 1) if secs else None}
        if len({(r["macs"], r["params"]) for r in rs}) > 1:
            row["widths_differ"] = [(r["macs"], r["params"]) for r in rs]
        rows.append(row)
    by_key = {(r["tool"], r["config"], r["model"], r["ratio"]): r for r in rows}
    for row in rows:
        if row["tool"] != "ours":
            continue
        row["vs"] = {}
        for tool, config in CONFIGS:
            peer = by_key.get((tool, config, row["model"], row["ratio"]))
            if tool == "ours" or peer is None:
                continue
            row["vs"][config] = {
                **paired(row, peer), "ms_ratio": round(row["ncnn_ms_b1"] / peer["ncnn_ms_b1"], 4),
                "train_s_ratio": (round(row["train_s"] / peer["train_s"], 3)
                                  if row["train_s"] and peer["train_s"] else None)}
    return sorted(rows, key=lambda r: (_model_order(r["model"]), r["ratio"],
                                       _SETTING_ORDER.get((r["tool"], r["config"]), 9)))


def equal_latency(rows):
    """Per (model, ratio) of Torch-Pruning: its better setting against ours at equal latency, the
    least-pruned of our rows of that model whose ncnn batch-1 time is ≤ 1.02× its own (chosen by
    latency alone, not by accuracy). Torch-Pruning rounds a kept width down to a multiple of
    ``round_to`` and leaves the group whole when that is 0, so at high ratios its networks can be
    wider than ours at the same ratio: then ours at a lower ratio is the equal-latency point."""
    out = []
    for model, ratio in sorted({(r["model"], r["ratio"]) for r in rows if r["tool"] == "torch-pruning"},
                               key=lambda k: (_model_order(k[0]), k[1])):
        best = best_peer(rows, model, ratio)
        fits = [r for r in rows if r["tool"] == "ours" and r["model"] == model
                and r["ncnn_ms_b1"] <= LATENCY_SLACK * best["ncnn_ms_b1"]]
        entry = {"model": model, "ratio": ratio, "tp_config": best["config"], "tp_top1": best["top1"],
                 "tp_ms": best["ncnn_ms_b1"], "tp_train_s": best.get("train_s")}
        if fits:
            ours = min(fits, key=lambda r: r["ratio"])
            entry.update({"ours_ratio": ours["ratio"], "ours_top1": ours["top1"], "ours_ms": ours["ncnn_ms_b1"],
                          "ms_ratio": round(ours["ncnn_ms_b1"] / best["ncnn_ms_b1"], 4), **paired(ours, best)})
            entry["holds"] = bool(ours["top1"] >= best["top1"])
        else:
            entry.update({"ours_ratio": None, "holds": False})
        out.append(entry)
    return out


def best_peer(rows, model, ratio):
    """The Torch-Pruning row with the higher mean top-1 at (model, ratio), or None."""
    peers = [r for r in rows if r["tool"] == "torch-pruning" and r["model"] == model and r["ratio"] == ratio]
    return max(peers, key=lambda r: r["top1"]) if peers else None


def table(rows):
    """Per model and ratio, each setting: top-1 (mean ± std over seeds), size, ncnn time and its
    ratio to the better Torch-Pruning setting, training time."""
    out = []
    for r in rows:
        best = best_peer(rows, r["model"], r["ratio"])
        rel = f"{r['ncnn_ms_b1'] / best['ncnn_ms_b1']:.3f}×" if best and r["tool"] != "dense" else "-"
        n = len(r["seeds"])
        out.append([r["model"], "-" if r["tool"] == "dense" else f"{r['ratio']:.0%}", r["tool"], r["config"],
                    str(n) if r["tool"] != "dense" else "-",
                    f"{r['top1']:.2f}" + (f" ± {r['top1_std']:.2f}" if n > 1 else ""), human(r["macs"]),
                    human(r["params"]), f"{r['ncnn_ms_b1']:.3f}", rel,
                    "-" if r.get("train_s") is None else f"{r['train_s']:.0f}"])
    return format_table(["model", "ratio", "tool", "config", "seeds", "top-1 %", "MACs", "params",
                         "ncnn ms b1", "ms vs best TP", "train s"], out)


def _paired_cells(v):
    """``[ours − theirs (± std), p, verdict]`` of a :func:`paired` result (α = 0.05)."""
    if v["diff"] is None:
        return ["-", "-", "-"]
    diff = f"{v['diff']:+.2f}" + (f" ± {v['diff_std']:.2f}" if v["diff_std"] is not None else "")
    if v["p"] is None:
        return [diff, "-", "-"]
    verdict = ("ours better" if v["diff"] > 0 else "Torch-Pruning better") if v["p"] < 0.05 else "noise"
    return [diff, f"{v['p']:.3f}", verdict]


def pairs_table(rows):
    """Ours − each Torch-Pruning setting, paired by seed."""
    out = []
    for r in rows:
        for config, v in r.get("vs", {}).items():
            peer = next(x for x in rows if x["tool"] == "torch-pruning" and x["config"] == config
                        and x["model"] == r["model"] and x["ratio"] == r["ratio"])
            out.append([r["model"], f"{r['ratio']:.0%}", config, str(v["seeds"]), f"{r['top1']:.2f}",
                        f"{peer['top1']:.2f}", *_paired_cells(v), f"{v['ms_ratio']:.3f}×",
                        "-" if v["train_s_ratio"] is None else f"{v['train_s_ratio']:.2f}×"])
    return format_table(["model", "ratio", "vs Torch-Pruning", "seeds", "ours %", "theirs %",
                         "ours − theirs", "p (paired t)", "verdict", "ms ours/theirs", "train s ours/theirs"], out)


def equal_latency_table(entries):
    out = []
    for e in entries:
        if e["ours_ratio"] is None:
            out.append([e["model"], f"{e['ratio']:.0%}", e["tp_config"], f"{e['tp_top1']:.2f}", f"{e['tp_ms']:.3f}",
                        "none as fast", "-", "-", "-", "-", "-"])
            continue
        out.append([e["model"], f"{e['ratio']:.0%}", e["tp_config"], f"{e['tp_top1']:.2f}", f"{e['tp_ms']:.3f}",
                    f"{e['ours_ratio']:.0%}", f"{e['ours_top1']:.2f}", f"{e['ms_ratio']:.3f}×", *_paired_cells(e)])
    return format_table(["model", "TP ratio", "better TP setting", "TP %", "TP ms", "ours at", "ours %",
                         "ms ours/TP", "ours − TP", "p (paired t)", "verdict"], out)


def acceptance(rows, entries=None):
    """Issue 28's lines, per (model, ratio): our mean top-1 ≥ the better Torch-Pruning setting's
    at ≤ 1.02× its ncnn latency (``entries``: :func:`equal_latency` of ``rows``, computed when not
    given); at 75% and 90%, our mean training wall time ≤ that of Torch-Pruning's faster-trained
    setting (same ratio). Returns ``[(what, goal, measured, holds)]``."""
    lines = []
    for e in equal_latency(rows) if entries is None else entries:
        measured = (f"no run of ours as fast as its {e['tp_ms']:.3f} ms" if e["ours_ratio"] is None else
                    f"ours at {e['ours_ratio']:.0%}: {e['ours_top1']:.2f} vs {e['tp_top1']:.2f} "
                    f"({e['diff']:+.2f}, p {e['p']}), latency {e['ms_ratio']:.3f}×")
        lines.append((f"{e['model']} {e['ratio']:.0%}: our mean top-1 vs Torch-Pruning {e['tp_config']} "
                      "(the better setting)", f"≥, at ≤ {LATENCY_SLACK:.2f}× its ncnn b1 latency",
                      measured, e["holds"]))
    for r in rows:
        if r["tool"] != "ours" or r["ratio"] < 0.75 - 1e-9 or not r.get("train_s"):
            continue
        peers = [x for x in rows if x["tool"] == "torch-pruning" and x["model"] == r["model"]
                 and x["ratio"] == r["ratio"] and x.get("train_s")]
        if peers:
            fastest = min(x["train_s"] for x in peers)
            lines.append((f"{r['model']} {r['ratio']:.0%}: our training wall time vs Torch-Pruning's",
                          "≤ (its faster setting)", f"{r['train_s']:.0f} s vs {fastest:.0f} s",
                          r["train_s"] <= fastest))
    return lines


# -- main ---------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--configs", nargs="+", default=[c for _, c in CONFIGS], choices=[c for _, c in CONFIGS],
                   help="settings to run (default: all three)")
    p.add_argument("--out", default=OUT, help=f"output folder (default {OUT})")
    p.add_argument("--epochs", type=int, help="development: trainer.epochs of every run, both tools")
    p.add_argument("--limit", type=int, help="development: data.limit (train images) of every run")
    p.add_argument("--jobs", type=int, default=2, help="training processes side by side (default 2)")
    p.add_argument("--rounds", type=int, default=10, help="ncnn latency rounds (default 10)")
    p.add_argument("--repeats", type=int, default=20, help="ncnn latency: best of this many per round")
    p.add_argument("--teacher-recipe", default=TEACHER_RECIPE,
                   help="development: the ResNet-20 teacher's recipe (default recipes/teacher_fashion.yaml)")
    p.add_argument("--fresh", action="store_true", help="retrain and re-export everything")
    args = p.parse_args(argv)
    t_start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    if not os.path.isfile(PEERS_PYTHON):
        _say(f"error: no {PEERS_PYTHON}: the PyTorch side runs in .venv-peers; `make bench-peers` builds it")
        return 2
    ratios, models, seeds = tuple(args.ratios), tuple(args.models), tuple(args.seeds)
    configs = [c for c in CONFIGS if c[1] in args.configs]
    teacher = os.path.abspath(args.teacher_recipe)
    n_runs = len(models) * len(ratios) * len(seeds) * len(configs)
    steps = 2 + len(models) + n_runs + 2
    step = [0]

    def done(what, secs, extra="", skipped=False):
        step[0] += 1
        how = "skipped" if skipped else "reused (unchanged)" if secs is None else f"{secs:.0f} s"
        eta = ""
        if 2 + len(models) < step[0] <= 2 + len(models) + n_runs and not skipped:
            k = step[0] - 2 - len(models)
            spent = time.time() - t_runs[0]
            eta = f"  [runs {k}/{n_runs}, ETA {spent / k * (n_runs - k) / 60:.0f} min]"
        _say(f"[{step[0]}/{steps}] {what}: {how}{'; ' + extra if extra else ''}{eta}")

    _say(f"bench peers → {_rel(out)}: {DATA}, {', '.join(models)} at {', '.join(f'{r:.0%}' for r in ratios)} of "
         f"the channels, seeds {', '.join(map(str, seeds))}, {', '.join(f'{t} {c}' for t, c in configs)}; "
         f"{args.jobs} training process(es) side by side, one thread each")
    teacher_prefix, secs = dense_input(teacher, os.path.join(out, "logs", "teacher-resnet20.log"))
    done(f"ResNet-20 teacher ({_rel(teacher)} → {_rel(load_recipe(teacher).run_dir)})", secs)
    recipes = write_recipes(out, models, ratios, seeds, teacher_prefix, args.epochs, args.limit)
    secs = None
    if "mobilenetv2" in models:
        _, secs = dense_input(recipes["mobilenetv2-dense"], os.path.join(out, "logs", "dense-mobilenetv2.log"),
                              args.fresh)
    done(f"dense MobileNetV2-0.5 ({_rel(recipes['mobilenetv2-dense'])})", secs,
         skipped="mobilenetv2" not in models)

    inputs = {}
    first = {m: recipes[("ours", m, ratios[0], seeds[0])] for m in models}
    for model in models:
        t0 = time.time()
        inputs[model], _ = prepare(model, first[model], out)
        done(f"{model}: data, the teacher's train logits (MXNet) and the dense pair for PyTorch",
             time.time() - t0)

    jobs = []
    for model in models:                 # ResNet-20 first: a partial run already answers for it
        for ratio in ratios:
            for seed in seeds:
                rp = recipes[("ours", model, ratio, seed)]
                for tool, config in configs:
                    if tool == "ours":
                        fn = (lambda m=model, r=ratio, s=seed, rp=rp: run_ours(m, r, s, rp, out, args.fresh))
                    else:
                        cfg = peer_config(model, ratio, seed, config, rp, inputs[model], out)
                        fn = (lambda m=model, r=ratio, s=seed, c=cfg: run_peer(m, r, s, c, out, args.fresh))
                    jobs.append((tool, config, model, ratio, seed, fn))
    runs = []
    t_runs = [time.time()]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(fn): (tool, config, model, ratio, seed)
                   for tool, config, model, ratio, seed, fn in jobs}
        for fut in concurrent.futures.as_completed(futures):
            tool, config, model, ratio, seed = futures[fut]
            row = fut.result()
            runs.append(row)
            done(f"{tool} {config} {model} {ratio:.0%} seed {seed}: "
                 f"{'trained' if tool == 'ours' else 'pruned + KD'} and converted to ncnn",
                 None if row["reused"] else row["train_s"],
                 f"top-1 {row['top1_framework']:.2f} ({'MXNet' if tool == 'ours' else 'PyTorch'}), "
                 f"MACs {human(row['macs'])}, params {human(row['params'])}")

    t0 = time.time()
    for model in models:
        runs.append(export_dense(model, first[model], out, args.fresh))
    done("the dense starts in ncnn (distill export --model teacher)", time.time() - t0)

    runs = _interleave(runs)
    with np.load(inputs[models[0]]["data"]) as z:
        x_val, y_val = z["x_val"], z["y_val"]
    t0 = time.time()
    measure_ncnn(runs, x_val, y_val, out, args.rounds, args.repeats)
    done(f"ncnn: top-1 and parity of {len(runs)} models on {len(y_val):,} test images, then batch-1 latency, "
         f"one thread, {args.rounds} alternating rounds of best of {args.repeats}", time.time() - t0)

    keep = ("tool", "config", "model", "ratio", "seed", "top1", "macs", "params", "ncnn_ms_b1", "top1_framework",
            "ncnn_parity", "ncnn_ms_rounds", "copy", "train_s", "run_dir")
    write_json(os.path.join(out, "runs.json"),
               [{k: (_rel(r[k]) if k == "run_dir" else r[k]) for k in keep if k in r} for r in runs])
    rows = aggregate(runs)
    entries = equal_latency(rows)
    wall = time.time() - t_start
    write_json(os.path.join(out, "results.json"),
               {"data": DATA, "test_images": int(len(y_val)), "epochs": load_recipe(first[models[0]]).trainer.epochs,
                "wall_min": round(wall / 60, 1), "rows": rows, "equal_latency": entries})
    _say(f"\nbench peers: {DATA}, {len(y_val):,} test images, top-1 in ncnn at the last epoch (mean ± std over "
         f"seeds); latency in ncnn (fp32, one thread, batch 1, best of {args.rounds} alternating rounds, "
         f"median over seeds); MACs and params counted alike; 'dense' = the unpruned start")
    _say(table(rows))
    _say("\nours − Torch-Pruning at the same ratio, paired by seed (p: Student's paired t over the seeds; "
         "≥ 0.05 is noise)")
    _say(pairs_table(rows))
    _say("\nat equal latency: the better Torch-Pruning setting vs the least-pruned run of ours at ≤ "
         f"{LATENCY_SLACK:.2f}× its ncnn time")
    _say(equal_latency_table(entries))
    _say(f"results: {_rel(os.path.join(out, 'results.json'))}; wall time {wall / 60:.1f} min")

    bad = [f"{r['tool']} {r['config']} {r['model']} {r['ratio']:.0%} s{r['seed']}: {r['ncnn_parity']['failed']}"
           for r in runs if r["ncnn_parity"]["failed"]]
    target("every model in ncnn computes its framework's logits", f"max |Δ| ≤ {ATOL:g} + {RTOL:g} × max |logit|",
           "all" if not bad else "; ".join(bad), not bad)
    copies = [r["copy"] for r in runs if "copy" in r]
    target("PyTorch copy of each dense network vs MXNet (val logits)", "≤ 1e-4 × max(1, max |logit|)",
           f"max {max(c['max_abs_diff'] for c in copies):.1e} over {len(copies)} runs" if copies else "none",
           bool(copies) and all(c["max_abs_diff"] <= 1e-4 * max(1.0, c["scale"]) for c in copies))
    for what, goal, measured, holds in acceptance(rows, entries):
        target(what, goal, measured, holds)
    full = (not args.epochs and not args.limit and len(seeds) >= 3 and set(ratios) == set(RATIOS)
            and teacher == TEACHER_RECIPE)
    if full:
        target("make bench-peers wall time (the bench, after the virtualenvs)", f"≤ {WALL_TARGET_MIN} min",
               f"{wall / 60:.1f} min", wall <= WALL_TARGET_MIN * 60)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
