"""Run ncnn or onnxruntime in a child process: a crash inside a runtime becomes an error
message, not a dead export.

ncnn's runtime can segfault on a malformed or unexpected model (an int8 layer without scales,
a blob layout it does not expect, an input it writes into), and onnxruntime can abort inside
a kernel; either would kill the Python process that loaded it, leaving no report and the
export's scratch folder behind. Every check that runs a foreign runtime goes through here
(:func:`run_tasks`): the parent writes the job (``spec`` JSON + arrays) to an ``.npz``, runs
``python -m distill.export.ncnn_worker IN OUT``, and reads the results back; a non-zero exit
(or a signal) is raised as :class:`NcnnWorkerError` with the child's last lines (an exception
in the child is printed as one line, so the runtime's own message ends the error).

Tasks (each on one net or session, loaded once per task); ncnn (the default, ``param`` +
``bin``, ``int8`` and ``fp16`` flags, default off)::

    {"task": "blobs", "names": [...], "x": "key"}           # values per image, flattened
    {"task": "calibrate", "names": [...], "x": "key", "mode": "naive"|"entropy"|"kl"}
    {"task": "predict", "x": "key"}                          # logits of the output blob
    {"task": "latency", "x": "key", "repeats": 20}           # batch-1 ms, best of repeats
    {"task": "layers", "nets": [{"param": TEXT, "shape": [C, H, W]}, ...],
     "rounds": 2, "repeats": 10}                             # ms and output shape of each
                                                             # net, its weights empty

onnxruntime (``"runtime": "onnxruntime"``, ``model``: the ``.onnx`` path)::

    {"task": "predict", "x": "key", "batch_size": 256}      # the first output, batched
    {"task": "outputs", "x": "key"}                          # every graph output, in order
    {"task": "latency", "x": "key", "repeats": 20}

Every task has ``threads``.
"""
import json
import logging
import os
import subprocess
import sys
import tempfile

import numpy as np

from .runtimes import output_lines

__all__ = ["NcnnWorkerError", "run_tasks", "run_ncnn", "run_on_images", "CHUNK_BYTES"]
_LOGGER = logging.getLogger(__name__)

#: pixels of one split sent to a child process at once (:func:`run_on_images`)
CHUNK_BYTES = 256 * 2**20


class NcnnWorkerError(RuntimeError):
    """A runtime (ncnn or onnxruntime) failed or crashed in the child process."""


def _runtime_names(tasks):
    names = {"onnxruntime" if t.get("runtime") == "onnxruntime" else "ncnn's runtime" for t in tasks}
    return " / ".join(sorted(names))


def run_tasks(tasks, arrays, work_dir, timeout=1800):
    """Run ``tasks`` in a child process.

    Parameters
    ----------
    tasks : list of dict
        Each with ``task``, ``threads`` and the task's keys; ncnn tasks have ``param``, ``bin``,
        ``int8`` (bool), onnxruntime tasks ``"runtime": "onnxruntime"`` and ``model``.
    arrays : dict
        Name → np.ndarray referenced by the tasks' ``x``.
    work_dir : str
        Where the exchange files go.

    Returns
    -------
    list of dict
        One per task: ``{"arrays": {...}, "meta": {...}}``.
    """
    fd, inp = tempfile.mkstemp(prefix="ncnn-in-", suffix=".npz", dir=work_dir)
    os.close(fd)
    out = inp.replace("ncnn-in-", "ncnn-out-")
    try:
        np.savez(inp, __spec__=np.array(json.dumps(tasks)), **arrays)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        try:
            proc = subprocess.run([sys.executable, "-m", "distill.export.ncnn_worker", inp, out],
                                  capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise NcnnWorkerError(f"{_runtime_names(tasks)} did not finish "
                                  f"{', '.join(sorted({t['task'] for t in tasks}))} in {timeout:g} s "
                                  f"(stopped); it may hang on this model") from None
        if proc.returncode != 0 or not os.path.isfile(out):
            how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
                   else f"exited with code {proc.returncode}")
            tail = " / ".join(output_lines(proc.stderr)[-3:])
            raise NcnnWorkerError(f"{_runtime_names(tasks)} {how} while running "
                                  f"{', '.join(sorted({t['task'] for t in tasks}))}"
                                  + (f": {tail}" if tail else ""))
        with np.load(out, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            results = []
            for i, m in enumerate(meta):
                keys = [k for k in z.files if k.startswith(f"{i}:")]
                results.append({"meta": m, "arrays": {k.split(":", 1)[1]: z[k] for k in keys}})
        return results
    finally:
        for f in (inp, out):
            if os.path.exists(f):
                os.unlink(f)


# Kept for the ncnn-int8 callers and their tests: the route is the same for every runtime.
run_ncnn = run_tasks


def run_on_images(tasks, key, x, work_dir, arrays=None, batch_size=256, chunk_bytes=None):
    """:func:`run_tasks` with ``arrays[key]`` = the images ``x`` ``(N, C, H, W)``, sent in chunks.

    ``x`` may be a lazy array of streamed images (a recordio or image-folder test split): it is
    read ``batch_size`` images at a time into chunks of at most ``chunk_bytes`` (default
    :data:`CHUNK_BYTES`), so the whole split is never one array here or in the child. The first
    chunk runs every task (a ``latency`` task on ``key`` times its first image); the later ones
    run only the ``predict`` tasks on ``key``, whose ``logits`` are joined in order. An in-memory
    test split of a few hundred MiB is one chunk: one child, as before.

    Returns
    -------
    list of dict
        As :func:`run_tasks`.
    """
    from ..quantize.calibrators import gather_images
    arrays = dict(arrays or {})
    per_image = max(1, int(np.prod(x.shape[1:])) * 4)
    per = max(1, int(chunk_bytes or CHUNK_BYTES) // per_image)
    n = len(x)
    predicting = [i for i, t in enumerate(tasks) if t["task"] == "predict" and t.get("x") == key]
    results, logits = None, {i: [] for i in predicting}
    for start in range(0, max(n, 1), per):
        chunk = gather_images(x, np.arange(start, min(n, start + per)), batch_size)
        if results is None:
            results = run_tasks(tasks, dict(arrays, **{key: chunk}), work_dir)
            for i in predicting:
                logits[i].append(results[i]["arrays"]["logits"])
            if not predicting:
                break
            continue
        more = run_tasks([tasks[i] for i in predicting], {key: chunk}, work_dir)
        for i, r in zip(predicting, more):
            logits[i].append(r["arrays"]["logits"])
    for i, parts in logits.items():
        if len(parts) > 1:
            results[i]["arrays"]["logits"] = np.concatenate(parts)
    return results


# -- the child ----------------------------------------------------------------------------------

def _net(t):
    from .runtimes import ncnn_net
    return ncnn_net(t["param"], t["bin"], fp16=bool(t.get("fp16", False)), threads=int(t.get("threads", 1)),
                    int8=bool(t.get("int8", False)))


def _extract(net, image, names):
    from .runtimes import ncnn_extract
    return ncnn_extract(net, image, names)


def _calibrate(net, x, names, mode, batch_size):
    from .ncnn_calib import abs_histogram, ncnn_kl_threshold
    absmax = np.zeros(len(names))
    if mode in ("kl", "naive"):                    # naive: the largest |x| (MXNet's min/max)
        for img in x:
            absmax = np.maximum(absmax, [np.abs(v).max() for v in _extract(net, img, names)])
        if mode == "naive":
            return {n: float(absmax[k]) for k, n in enumerate(names)}
    if mode == "kl":                               # ncnn2table: absmax pass, then histograms
        hist = np.zeros((len(names), 2048), np.int64)
        for img in x:
            for k, v in enumerate(_extract(net, img, names)):
                hist[k] += abs_histogram(v, absmax[k])
        return {n: ncnn_kl_threshold(hist[k], absmax[k]) for k, n in enumerate(names)}
    from ..quantize.calibrators import CALIBRATORS      # MXNet's method, on ncnn's values
    cal = CALIBRATORS.get(mode)()
    for i in range(0, len(x), batch_size):
        vals = [_extract(net, img, names) for img in x[i:i + batch_size]]
        for k, n in enumerate(names):
            cal.update(n, np.stack([v[k] for v in vals]))
    return {n: max(abs(lo), abs(hi)) for n, (lo, hi) in cal.thresholds().items()}


def _run_ort_task(t, x):
    from .runtimes import ort_latency, ort_predict, ort_session
    sess = ort_session(t["model"], int(t.get("threads", 1)))
    if t["task"] == "predict":
        return {"logits": ort_predict(sess, x, int(t.get("batch_size", 256)))}, {}
    if t["task"] == "outputs":
        names = [o.name for o in sess.get_outputs()]
        outs = sess.run(names, {sess.get_inputs()[0].name: x})
        return {str(k): np.asarray(v) for k, v in enumerate(outs)}, {"names": names}
    if t["task"] == "latency":
        return {}, {"ms": ort_latency(sess, x[:1], int(t.get("repeats", 20)))}
    raise ValueError(f"unknown onnxruntime task {t['task']!r}")


def _time_nets(t):
    """Best ms of each net in ``t["nets"]`` (param text, weights empty, a random input of its
    shape), timed round-robin for ``rounds`` rounds: a busy moment slows every net alike. The
    output is taken as the layer leaves it (``type=1``: no unpacking, which a layer inside a
    network does not pay either)."""
    import ncnn
    from ..timing import best_of_ms
    from .runtimes import ncnn_cpu_net
    rng = np.random.RandomState(0)
    loaded = []
    for n in t["nets"]:
        net = ncnn_cpu_net(threads=int(t.get("threads", 1)))
        if net.load_param_mem(n["param"]) != 0 or net.load_model(ncnn.DataReaderFromEmpty()) != 0:
            raise RuntimeError(f"ncnn could not load the one-layer net: {n['param']!r}")
        x = rng.uniform(-1, 1, size=n["shape"]).astype(np.float32)
        loaded.append((net, ncnn.Mat(x).clone()))       # a Mat ncnn owns (see runtimes.ncnn_extract)

    def run(net, mat, kind=1):
        ex = net.create_extractor()
        ex.input("data", mat)
        ret, y = ex.extract("out", kind)
        if ret != 0:
            raise RuntimeError(f"ncnn extract failed with code {ret}")
        return y

    # what each net computes, unpacked (the caller checks it)
    shapes = [list(np.array(run(net, mat, 0)).shape) for net, mat in loaded]
    best = [float("inf")] * len(loaded)
    for _ in range(max(1, int(t.get("rounds", 2)))):
        for i, (net, mat) in enumerate(loaded):
            best[i] = min(best[i], best_of_ms(lambda: run(net, mat), int(t.get("repeats", 10)),
                                              warmup=2, inner=5))
    return best, shapes


def _run_task(t, arrays):
    x = arrays[t["x"]] if t.get("x") else None
    if t.get("runtime") == "onnxruntime":
        return _run_ort_task(t, x)
    if t["task"] == "layers":
        ms, shapes = _time_nets(t)
        return {}, {"ms": ms, "shapes": shapes}
    net = _net(t)
    if t["task"] == "blobs":
        vals = [_extract(net, img, t["names"]) for img in x]
        return {str(k): np.stack([v[k] for v in vals]) for k in range(len(t["names"]))}, {}
    if t["task"] == "calibrate":
        return {}, {"thresholds": _calibrate(net, x, t["names"], t["mode"], int(t.get("batch_size", 32)))}
    if t["task"] == "predict":
        out = net.output_names()[0]
        return ({"logits": np.stack([_extract(net, img, [out])[0] for img in x])},
                {"input": net.input_names()[0], "output": out})
    if t["task"] == "latency":
        from .runtimes import best_of_ms
        out, img = net.output_names()[0], x[0]
        return {}, {"ms": best_of_ms(lambda: _extract(net, img, [out]), int(t.get("repeats", 20)))}
    raise ValueError(f"unknown task {t['task']!r}")


def main(argv):
    inp, out = argv
    with np.load(inp, allow_pickle=False) as z:
        tasks = json.loads(str(z["__spec__"]))
        arrays = {k: z[k] for k in z.files if k != "__spec__"}
    saved, meta = {}, []
    for i, t in enumerate(tasks):
        try:
            arr, m = _run_task(t, arrays)
        except Exception as e:     # one line the parent can quote: the runtime's own message
            msg = " ".join(str(e).split())
            print(f"{t['task']} failed: {type(e).__name__}: {msg}", file=sys.stderr)
            return 1
        saved.update({f"{i}:{k}": v for k, v in arr.items()})
        meta.append(m)
    tmp = out + ".part.npz"
    np.savez(tmp, __meta__=np.array(json.dumps(meta)), **saved)
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
