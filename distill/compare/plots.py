"""The comparison's plots (PNG, matplotlib's Agg backend: no display needed).

* top-1 vs latency at batch 32, fp32 and int8 points, the Pareto front marked: the models no
  other model beats on both (at least as accurate *and* at least as fast, better in one);
* top-1 vs MACs (log scale).
"""
import io
import logging

__all__ = ["pareto_front", "points", "latency_plot", "macs_plot"]
_LOGGER = logging.getLogger(__name__)


def pareto_front(pts):
    """Indices of the points no other point dominates, by increasing cost.

    Parameters
    ----------
    pts : list of (cost, top1)
        Lower cost and higher top-1 are better.
    """
    front = []
    for i, (c, a) in enumerate(pts):
        dominated = any((c2 <= c and a2 >= a) and (c2 < c or a2 > a)
                        for j, (c2, a2) in enumerate(pts) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: pts[i])


def points(rows, cost_fp32, cost_int8=None):
    """``[(label, cost, top1, is_int8)]``: each row's fp32 point and, where the row has an int8
    model and ``cost_int8`` is given, its int8 point (rows without the cost are left out)."""
    out = []
    for r in rows:
        c, a = r.mean(cost_fp32), r.mean("top1")
        if c is not None and a is not None:
            out.append((r.label, c, a, False))
        if cost_int8:
            c, a = r.mean(cost_int8), r.mean("top1_int8")
        else:
            c, a = r.mean(cost_fp32), r.mean("top1_int8")
        if c is not None and a is not None:
            out.append((r.label + " int8", c, a, True))
    return out


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=100)
    return plt, fig, ax


def _scatter(ax, pts):
    for label, c, a, int8 in pts:
        ax.scatter([c], [a], marker="s" if int8 else "o", s=36,
                   color="tab:orange" if int8 else "tab:blue", zorder=3)
        ax.annotate(label, (c, a), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.scatter([], [], marker="o", color="tab:blue", label="fp32 (MXNet)")
    ax.scatter([], [], marker="s", color="tab:orange", label="int8 (MXNet)")


def _png(plt, fig):
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def latency_plot(rows, title=""):
    """PNG bytes: top-1 vs batch-32 latency, Pareto front as a step line through its points."""
    pts = points(rows, "ms_b32", "int8_ms_b32")
    plt, fig, ax = _figure()
    _scatter(ax, pts)
    front = pareto_front([(c, a) for _, c, a, _ in pts])
    if front:
        xs, ys = [pts[i][1] for i in front], [pts[i][2] for i in front]
        ax.step(xs, ys, where="post", color="tab:green", linewidth=1.5, zorder=2,
                label="Pareto front")
        ax.scatter(xs, ys, s=140, facecolors="none", edgecolors="tab:green", zorder=4)
    ax.set_xlabel("latency, batch 32 (ms, MXNet oneDNN, timed together)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title or "top-1 vs latency")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _png(plt, fig)


def macs_plot(rows, title=""):
    """PNG bytes: top-1 vs MACs per image (log x)."""
    pts = points(rows, "macs")
    plt, fig, ax = _figure()
    _scatter(ax, pts)
    if pts:
        ax.set_xscale("log")
    ax.set_xlabel("MACs per image")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title or "top-1 vs MACs")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    return _png(plt, fig)
