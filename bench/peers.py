"""``make bench-peers``: Torch-Pruning + KD against ours on the same work, every result timed in ncnn.

Same networks, same data, same teacher, same schedule, same runtime:

1. The teachers. ResNet-20 (``cifar_resnet20_v1``) is the mnist5k teacher of
   ``recipes/teacher_mnist.yaml`` (``runs/teacher_mnist``, trained when missing). MobileNetV2-0.5
   (28×28: the stem at stride 1, as :mod:`students.adapt` adapts it) is trained by a short recipe
   of ours (``OUT/recipes/mbv2-dense.yaml``: the quickstart student, KD from the ResNet-20
   teacher, no pruning). Each dense network is what both tools prune, and the teacher both
   distil from: ``recipes/prune_channel_mnist.yaml`` prunes a copy of its own teacher.
2. Ours: ``recipes/prune_channel_mnist.yaml`` (l1, AGP over epochs 1-4, ``round_to: 8`` rounded
   down, ``keep_outputs: [last]``, the student rebuilt smaller at every update, KD 0.9 at T = 4 +
   CE 0.1, 10 epochs of Nesterov SGD at lr 0.02, cosine),
   extended to 50% and 75% of the channels (``OUT/recipes/ours-*.yaml``), trained by
   ``python train.py`` and exported by ``distill export RUN --format ncnn``.
3. Torch-Pruning (in ``.venv-peers``, :mod:`bench.peers_torch`): the same architecture written
   in PyTorch, the dense MXNet weights copied in (checked: same logits within 1e-4), the
   teacher's logits on the training images computed once by MXNet and handed over; its
   recommended pruner (``BasePruner`` + ``GroupMagnitudeImportance(p=2)``, ``round_to=8``, the
   classifier ignored) stepping at the same epochs to the same AGP ratios, and the loop of
   ``distill.trainer`` read from our resolved recipe: loss terms, optimizer (no decay on
   BatchNorm and biases), lr per step, epochs, batch order. ``torch.onnx.export`` (opset 13, as
   ours), then our ONNX → pnnx → ncnn conversion (:func:`distill.export.ncnn_pnnx.onnx_to_ncnn`).
4. ncnn, for all of them alike (:func:`distill.export.ncnn_worker.run_tasks`, a child process):
   top-1 on the 1,000 held-out digits and logit parity with the framework that trained the
   model, then batch-1 latency with one thread, best of repeats, in rounds that alternate the
   tools (the order reversed every other round). MACs and parameters are counted the same way
   on both sides (:mod:`distill.modelinfo`; :func:`bench.peers_torch.count_macs_params`).

Training runs one OpenMP thread per process and, by default, ours and Torch-Pruning's run of the
same (model, ratio) side by side (``--jobs 2``: two cores). Finished runs are reused while their
recipe (ours: the recipe hash, as ``teacher.recipe`` does) or config (Torch-Pruning) is
unchanged; ``--fresh`` retrains everything.

    .venv/bin/python bench/peers.py                         # what make bench-peers runs
    .venv/bin/python bench/peers.py --epochs 2 --limit 400 --out /tmp/peers --models resnet20

Output: the table, ``OUT/results.json`` (one row per tool, model and ratio; ``dense`` rows
are the unpruned start), logs per step in ``OUT/logs/``.
"""
import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
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
MODELS = ("resnet20", "mobilenetv2")
RATIOS = (0.5, 0.75)
TOOLS = ("ours", "torch-pruning")
TEACHER_RECIPE = os.path.join(ROOT, "recipes", "teacher_mnist.yaml")
PRUNE_RECIPE = os.path.join(ROOT, "recipes", "prune_channel_mnist.yaml")
QUICKSTART = os.path.join(ROOT, "recipes", "quickstart.yaml")
PEERS_PYTHON = os.path.join(ROOT, os.environ.get("PEERS_PYTHON", os.path.join(".venv-peers", "bin", "python")))
INPUT_SHAPE = (1, 28, 28)
ATOL, RTOL = 1e-3, 1e-4           # distill export's fp32 parity rule (--atol / --rtol defaults)


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

def write_recipes(out, models, ratios, epochs=None, limit=None):
    """The recipes of ours, under ``OUT/recipes/`` (``extends:`` the bundled ones). ``epochs`` /
    ``limit``: shorter runs for development (both tools read the same resolved recipe)."""
    rdir = os.path.join(out, "recipes")
    os.makedirs(rdir, exist_ok=True)
    rel = lambda p: os.path.relpath(p, rdir)  # noqa: E731
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
        "# bench/peers.py: the dense MobileNetV2-0.5 both tools prune (and distil from): the\n"
        "# quickstart student, distilled from the ResNet-20 teacher, without pruning, int8 or export.\n"
        f"extends: {rel(QUICKSTART)}\nname: bench_peers_mbv2_dense\n",
        {"pruning": {"enabled": False}, "quantization": {"enabled": False}, "export": {"enabled": False},
         "trainer": {"progress": False},
         "output": {"dir": _rel(os.path.join(out, "mbv2-dense")), "latency": False}})}
    for model in models:
        for ratio in ratios:
            tag = f"{model}-{int(round(ratio * 100))}"
            sections = {"pruning": {"final_sparsity": ratio}, "trainer": {"progress": False},
                        "output": {"dir": _rel(os.path.join(out, "ours-" + tag)), "latency": False}}
            if model == "mobilenetv2":
                sections = {"teacher": {"recipe": "mbv2-dense.yaml"}, **sections}
            if epochs:          # the AGP updates must fit in the shorter run
                sections["pruning"]["end_epoch"] = min(3, max(0, int(epochs) - 2))
            paths[("ours", model, ratio)] = write(
                "ours-" + tag,
                f"# bench/peers.py: ours, {model}, {ratio:.0%} of the channels: prune_channel_mnist.yaml\n"
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
    from distill.run import recipe_dir_of, teacher_recipe_prefix
    from distill.trainer import predict

    recipe = load_recipe(recipe_path)
    prefix, _ = teacher_recipe_prefix(recipe.teacher.recipe, recipe_dir_of(recipe))
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


def peer_config(model, ratio, recipe_path, inputs, out):
    """The Torch-Pruning run's config: everything it trains by comes from our resolved recipe."""
    recipe = load_recipe(recipe_path)
    r = recipe_to_dict(recipe)
    p = recipe.pruning
    end = p.end_epoch if p.end_epoch is not None else p.start_epoch + max(0, (recipe.trainer.epochs - p.start_epoch) // 2 - 1)
    events = SCHEDULES.get(p.schedule)(p.start_epoch, end, p.frequency).events()
    return {"model": model, "ratio": ratio, "round_to": p.round_to, "prune_epochs": events,
            "recipe": {"trainer": r["trainer"], "distillation": r["distillation"]},
            "data": inputs["data"], "teacher_logits": inputs["teacher_logits"], "dense": inputs["dense"],
            "out": os.path.join(out, f"tp-{model}-{int(round(ratio * 100))}")}


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

def run_ours(model, ratio, recipe_path, out, fresh):
    """Train (or reuse) and export to ncnn. Returns the row's facts so far."""
    log_path = os.path.join(out, "logs", f"ours-{model}-{int(round(ratio * 100))}.log")
    run_dir, secs = train(recipe_path, log_path, fresh)
    folder = RunFolder(run_dir)
    param = os.path.join(folder.export_dir, "model.ncnn.param")
    if secs is not None or not os.path.isfile(param):
        _run([sys.executable, "-m", "distill.cli", "export", run_dir, "--format", "ncnn",
              "--threads", "1", "--no-latency"], log_path)
    m = folder.read_metrics()
    return {"tool": "ours", "model": model, "ratio": ratio, "run_dir": run_dir,
            "top1_framework": m["student"]["top1"], "macs": m["student"]["macs"],
            "params": m["student"]["params"], "param": param,
            "bin": os.path.join(folder.export_dir, "model.ncnn.bin"),
            "train_s": secs, "reused": secs is None}


def run_peer(model, ratio, cfg, fresh):
    """Torch-Pruning + KD in ``.venv-peers`` (or reuse), then ONNX → ncnn by our converter."""
    out_dir = cfg["out"]
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(os.path.dirname(out_dir), "logs", f"tp-{model}-{int(round(ratio * 100))}.log")
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
    return {"tool": "torch-pruning", "model": model, "ratio": ratio, "run_dir": out_dir,
            "top1_framework": round(res["top1_torch"], 3), "macs": res["macs"], "params": res["params"],
            "param": os.path.join(out_dir, "model.ncnn.param"), "bin": os.path.join(out_dir, "model.ncnn.bin"),
            "val_logits": os.path.join(out_dir, "val_logits.npy"), "copy": res["copy"],
            "train_s": secs, "reused": secs is None}


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
    return {"tool": "dense", "model": model, "ratio": 0.0, "run_dir": dest, "top1_framework": t["top1"],
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


def _interleave(rows):
    """Rows in timing order: per (model, ratio) ours then Torch-Pruning, the dense start first."""
    key = {t: i for i, t in enumerate(("dense",) + TOOLS)}
    return sorted(rows, key=lambda r: (MODELS.index(r["model"]), r["ratio"], key[r["tool"]]))


def table(rows):
    """The closing table: per model and ratio, each tool, and its ncnn time relative to ours."""
    ours = {(r["model"], r["ratio"]): r for r in rows if r["tool"] == "ours"}
    out = []
    for r in rows:
        ref = ours.get((r["model"], r["ratio"]))
        rel = f"{r['ncnn_ms_b1'] / ref['ncnn_ms_b1']:.2f}×" if ref else "-"
        out.append([r["model"], "-" if r["tool"] == "dense" else f"{r['ratio']:.0%}", r["tool"],
                    f"{r['top1']:.2f}", human(r["macs"]), human(r["params"]), f"{r['ncnn_ms_b1']:.3f}", rel])
    return format_table(["model", "ratio", "tool", "top-1 %", "MACs", "params", "ncnn ms b1", "ms vs ours"], out)


# -- main ---------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    p.add_argument("--out", default=OUT, help=f"output folder (default {OUT})")
    p.add_argument("--epochs", type=int, help="development: trainer.epochs of every run, both tools")
    p.add_argument("--limit", type=int, help="development: data.limit (train images) of every run")
    p.add_argument("--jobs", type=int, default=2, help="training processes side by side (default 2)")
    p.add_argument("--rounds", type=int, default=10, help="ncnn latency rounds (default 10)")
    p.add_argument("--repeats", type=int, default=20, help="ncnn latency: best of this many per round")
    p.add_argument("--fresh", action="store_true", help="retrain and re-export everything")
    args = p.parse_args(argv)
    t_start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    if not os.path.isfile(PEERS_PYTHON):
        _say(f"error: no {PEERS_PYTHON}: the PyTorch side runs in .venv-peers; `make bench-peers` builds it")
        return 2
    ratios, models = tuple(args.ratios), tuple(args.models)
    recipes = write_recipes(out, models, ratios, args.epochs, args.limit)
    steps = 2 + len(models) + 2 * len(models) * len(ratios) + 2
    step = [0]

    def done(what, secs, extra="", skipped=False):
        step[0] += 1
        how = "skipped" if skipped else "reused (unchanged)" if secs is None else f"{secs:.0f} s"
        _say(f"[{step[0]}/{steps}] {what}: {how}{'; ' + extra if extra else ''}")

    _say(f"bench peers → {_rel(out)}: {', '.join(models)} at {', '.join(f'{r:.0%}' for r in ratios)} of the "
         f"channels, ours vs Torch-Pruning, {args.jobs} training process(es) side by side, one thread each")
    _, secs = train(TEACHER_RECIPE, os.path.join(out, "logs", "teacher-resnet20.log"), fresh=False)
    done("ResNet-20 teacher (recipes/teacher_mnist.yaml → runs/teacher_mnist)", secs)
    secs = None
    if "mobilenetv2" in models:
        _, secs = train(recipes["mobilenetv2-dense"], os.path.join(out, "logs", "dense-mobilenetv2.log"), args.fresh)
    done(f"dense MobileNetV2-0.5 ({_rel(recipes['mobilenetv2-dense'])})", secs,
         skipped="mobilenetv2" not in models)

    inputs = {}
    for model in models:
        t0 = time.time()
        inputs[model], _ = prepare(model, recipes[("ours", model, ratios[0])], out)
        done(f"{model}: data, the teacher's train logits (MXNet) and the dense pair for PyTorch",
             time.time() - t0)

    jobs = []
    for model in models:
        for ratio in ratios:
            cfg = peer_config(model, ratio, recipes[("ours", model, ratio)], inputs[model], out)
            jobs.append(("ours", model, ratio, lambda m=model, r=ratio: run_ours(m, r, recipes[("ours", m, r)], out, args.fresh)))
            jobs.append(("torch-pruning", model, ratio, lambda m=model, r=ratio, c=cfg: run_peer(m, r, c, args.fresh)))
    rows = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        def start(tool, model, ratio, fn):
            _say(f"      {tool} {model} {ratio:.0%}: started")
            return fn()

        futures = {pool.submit(start, tool, model, ratio, fn): (tool, model, ratio)
                   for tool, model, ratio, fn in jobs}
        for fut in concurrent.futures.as_completed(futures):
            tool, model, ratio = futures[fut]
            row = fut.result()
            rows.append(row)
            done(f"{tool} {model} {ratio:.0%}: {'trained' if tool == 'ours' else 'pruned + KD'} and "
                 f"converted to ncnn", row["train_s"],
                 f"top-1 {row['top1_framework']:.2f} ({'MXNet' if tool == 'ours' else 'PyTorch'}), "
                 f"MACs {human(row['macs'])}, params {human(row['params'])}")

    t0 = time.time()
    for model in models:
        rows.append(export_dense(model, recipes[("ours", model, ratios[0])], out, args.fresh))
    done("the dense starts in ncnn (distill export --model teacher)", time.time() - t0)

    rows = _interleave(rows)
    with np.load(inputs[models[0]]["data"]) as z:
        x_val, y_val = z["x_val"], z["y_val"]
    t0 = time.time()
    measure_ncnn(rows, x_val, y_val, out, args.rounds, args.repeats)
    done(f"ncnn: top-1 and parity of {len(rows)} models, then batch-1 latency, one thread, "
         f"{args.rounds} alternating rounds of best of {args.repeats}", time.time() - t0)

    keep = ("tool", "model", "ratio", "top1", "macs", "params", "ncnn_ms_b1", "top1_framework",
            "ncnn_parity", "ncnn_ms_rounds", "copy", "train_s", "run_dir")
    results = [{k: (_rel(r[k]) if k == "run_dir" else r[k]) for k in keep if k in r} for r in rows]
    write_json(os.path.join(out, "results.json"), results)
    wall = time.time() - t_start
    _say(f"\nbench peers: mnist5k val (1,000 images), top-1 and latency in ncnn (fp32, one thread, batch 1, "
         f"best of {args.rounds} alternating rounds); MACs and params counted alike; 'dense' = the unpruned start")
    _say(table(rows))
    _say(f"results: {_rel(os.path.join(out, 'results.json'))}; wall time {wall / 60:.1f} min")

    bad = [f"{r['tool']} {r['model']} {r['ratio']:.0%}: {r['ncnn_parity']['failed']}" for r in rows
           if r["ncnn_parity"]["failed"]]
    target("every model in ncnn computes its framework's logits", f"max |Δ| ≤ {ATOL:g} + {RTOL:g} × max |logit|",
           "all" if not bad else "; ".join(bad), not bad)
    copies = [r["copy"] for r in rows if "copy" in r]
    target("PyTorch copy of each dense network vs MXNet (val logits)", "≤ 1e-4 × max(1, max |logit|)",
           ", ".join(f"{c['max_abs_diff']:.1e} at scale {c['scale']:.1f}" for c in copies),
           bool(copies) and all(c["max_abs_diff"] <= 1e-4 * max(1.0, c["scale"]) for c in copies))
    if not args.epochs and not args.limit:
        target("make bench-peers wall time (the bench, after the virtualenvs)", "≤ 60 min", f"{wall / 60:.1f} min",
               wall <= 3600)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
