"""The one timing loop every timing site uses (:func:`best_of_ms`).

Ground floor, importing nothing (not even MXNet): the runtimes' child process
(:mod:`distill.export.ncnn_worker`) times with it without loading MXNet for every call.
"""
import time

__all__ = ["best_of_ms"]


def best_of_ms(fn, repeats=20, warmup=5, inner=10, sync=None):
    """Best-of-``repeats`` time of one call of ``fn`` in milliseconds.

    ``warmup`` untimed calls first; each repeat times ``inner`` calls (so that a 0.1 ms model is
    not timed at clock resolution) and divides. ``sync(result)`` runs on the last result of each
    repeat before the clock stops (``lambda y: y.wait_to_read()`` for MXNet's async engine).
    """
    y = None
    for _ in range(warmup):
        y = fn()
        if sync is not None:
            sync(y)
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for _ in range(inner):
            y = fn()
        if sync is not None:
            sync(y)
        best = min(best, (time.perf_counter() - t0) / inner)
    return round(best * 1e3, 4)
