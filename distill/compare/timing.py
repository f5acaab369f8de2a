"""Every latency of one comparison, timed by ``compare`` itself, in one process, rows alternating.

The latencies a run wrote into its ``metrics.json`` were timed at different moments, maybe on a
busier machine; a comparison whose rows were timed under different loads compares loads, not
models. So ``compare`` times every exported graph again:

* MXNet fp32 and int8 (``distill quantize``'s pair), batch 1 and 32, each loaded and fused as
  :func:`distill.modelinfo.measure_latency` does, repeats alternating over every model of the
  table (:func:`distill.quantize.pipeline.paired_latency`);
* ncnn int8 (``distill export --format ncnn-int8``), batch 1, in a child process (ncnn can
  crash on a model it does not expect; :mod:`distill.export.ncnn_worker`), in rounds that
  alternate over the rows, best of all rounds.
"""
import logging

import numpy as np

from ..export.ncnn_worker import NcnnWorkerError, run_ncnn
from ..export.runtimes import default_threads
from ..quantize.pipeline import paired_latency

__all__ = ["retime", "NCNN_ROUNDS"]
_LOGGER = logging.getLogger(__name__)

NCNN_ROUNDS = 4         # ncnn repeats are split into this many alternating rounds


def _mxnet(records, repeats):
    by_shape = {}
    for r in records:
        by_shape.setdefault(r.input_shape, []).append(r)
    for shape, recs in by_shape.items():
        jobs = []                       # (record, key prefix, model prefix)
        for r in recs:
            jobs.append((r, "", r.folder.model_prefix))
            if r.int8_prefix:
                jobs.append((r, "int8_", r.int8_prefix))
        lat = paired_latency([p for _, _, p in jobs], shape, repeats=repeats)
        for (r, key, _), ms in zip(jobs, lat):
            r.values[f"{key}ms_b1"], r.values[f"{key}ms_b32"] = ms["b1"], ms["b32"]


def _ncnn(records, repeats, work_dir, threads):
    recs = [r for r in records if r.ncnn_int8]
    if not recs:
        return []
    shapes = sorted({r.input_shape for r in recs})
    arrays = {f"x{i}": np.random.RandomState(0).uniform(size=(1,) + s).astype(np.float32)
              for i, s in enumerate(shapes)}
    per_round = max(1, -(-repeats // NCNN_ROUNDS))
    tasks, owners = [], []
    for _ in range(NCNN_ROUNDS):
        for r in recs:
            param, bin_ = r.ncnn_int8
            tasks.append({"task": "latency", "param": param, "bin": bin_, "int8": True,
                          "threads": threads, "x": f"x{shapes.index(r.input_shape)}",
                          "repeats": per_round})
            owners.append(r)
    try:
        results = run_ncnn(tasks, arrays, work_dir)
    except NcnnWorkerError as e:
        _LOGGER.warning("compare: ncnn int8 latency not measured: %s", e)
        return [f"ncnn int8 latency not measured: {e}"]
    for r, res in zip(owners, results):
        ms = res["meta"]["ms"]
        old = r.values.get("ncnn_int8_ms_b1")
        r.values["ncnn_int8_ms_b1"] = ms if old is None else min(old, ms)
    return []


def retime(records, repeats=20, work_dir=".", threads=None):
    """Fill every record's latency values (ms); return notes on what could not be timed.

    Parameters
    ----------
    records : list of Record
    repeats : int
        Best of this many repeats per model and batch size.
    work_dir : str
        Where the ncnn child's exchange files go.
    threads : int, optional
        ncnn threads (default: ``OMP_NUM_THREADS``, which MXNet follows, or all cores).
    """
    _mxnet(records, repeats)
    return _ncnn(records, repeats, work_dir, threads or default_threads())
