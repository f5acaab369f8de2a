"""Run ncnn in a child process: a crash inside ncnn becomes an error message, not a dead export.

ncnn's runtime can segfault on a malformed or unexpected model (an int8 layer without scales,
a blob layout it does not expect), which would kill the Python process that loaded it. The
parent writes the job (``spec`` JSON + arrays) to an ``.npz``, runs ``python -m
distill.export.ncnn_worker IN OUT``, and reads the results back; a non-zero exit (or a signal)
is raised as :class:`NcnnWorkerError` with the child's last lines.

Tasks (each on one net, loaded once per task)::

    {"task": "blobs", "names": [...], "x": "key"}           # values per image, flattened
    {"task": "calibrate", "names": [...], "x": "key", "mode": "naive"|"entropy"|"kl"}
    {"task": "predict", "x": "key"}                          # logits of the output blob
    {"task": "latency", "x": "key", "repeats": 20}           # batch-1 ms, best of repeats
"""
import json
import logging
import os
import subprocess
import sys
import tempfile

import numpy as np

__all__ = ["NcnnWorkerError", "run_ncnn"]
_LOGGER = logging.getLogger(__name__)


class NcnnWorkerError(RuntimeError):
    """ncnn failed or crashed in the child process."""


def run_ncnn(tasks, arrays, work_dir, timeout=1800):
    """Run ``tasks`` in a child process.

    Parameters
    ----------
    tasks : list of dict
        Each with ``task``, ``param``, ``bin``, ``int8`` (bool), ``threads`` and the task's keys.
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
        proc = subprocess.run([sys.executable, "-m", "distill.export.ncnn_worker", inp, out],
                              capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 or not os.path.isfile(out):
            how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
                   else f"exited with code {proc.returncode}")
            tail = " / ".join(l.strip() for l in proc.stderr.splitlines()[-4:] if l.strip())
            raise NcnnWorkerError(f"ncnn's runtime {how} while running "
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


# -- the child ----------------------------------------------------------------------------------

def _net(t):
    import ncnn
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = int(t.get("threads", 1))
    net.opt.use_fp16_storage = net.opt.use_fp16_packed = net.opt.use_fp16_arithmetic = False
    net.opt.use_int8_inference = bool(t.get("int8", False))
    if net.load_param(t["param"]) != 0:
        raise RuntimeError(f"ncnn could not load {t['param']}")
    if net.load_model(t["bin"]) != 0:
        raise RuntimeError(f"ncnn could not load {t['bin']}")
    return net


def _extract(net, image, names):
    import ncnn
    # ncnn.Mat(array) borrows the NumPy buffer: clone it so ncnn owns its input.
    mat = ncnn.Mat(np.ascontiguousarray(image, dtype=np.float32)).clone()
    ex = net.create_extractor()
    if len(names) > 1:
        ex.set_light_mode(False)        # keep every intermediate blob: several are extracted
    ex.input(net.input_names()[0], mat)
    outs = []
    for n in names:
        ret, m = ex.extract(n)
        if ret != 0:
            raise RuntimeError(f"ncnn extract({n!r}) failed with code {ret}")
        outs.append(np.array(m, dtype=np.float32).reshape(-1))
    return outs


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


def _run_task(t, arrays):
    net = _net(t)
    x = arrays[t["x"]] if t.get("x") else None
    if t["task"] == "blobs":
        vals = [_extract(net, img, t["names"]) for img in x]
        return {str(k): np.stack([v[k] for v in vals]) for k in range(len(t["names"]))}, {}
    if t["task"] == "calibrate":
        return {}, {"thresholds": _calibrate(net, x, t["names"], t["mode"], int(t.get("batch_size", 32)))}
    if t["task"] == "predict":
        out = net.output_names()[0]
        return {"logits": np.stack([_extract(net, img, [out])[0] for img in x])}, {}
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
        arr, m = _run_task(t, arrays)
        saved.update({f"{i}:{k}": v for k, v in arr.items()})
        meta.append(m)
    tmp = out + ".part.npz"
    np.savez(tmp, __meta__=np.array(json.dumps(meta)), **saved)
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
