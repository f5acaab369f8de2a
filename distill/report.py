"""Readable tables for the terminal."""
__all__ = ["format_table", "summary_table", "human"]


def human(n, unit=""):
    """1234567 → '1.23M'."""
    if n is None:
        return "-"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suf}{unit}"
    return f"{n:g}{unit}"


def format_table(header, rows, title=None):
    """A plain-text table with aligned columns (first column left, others right)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    line = "-" * (sum(widths) + 2 * (len(widths) - 1))
    out = ([title] if title else []) + [fmt(cells[0]), line] + [fmt(r) for r in cells[1:]]
    return "\n".join(out)


def _row(label, m):
    lat = m.get("latency_ms", {})
    return [label, f"{m['top1']:.2f}", human(m.get("params")), human(m.get("macs")),
            f"{m.get('bytes', 0) / 2**20:.2f}", f"{lat.get('b1', float('nan')):.3f}",
            f"{lat.get('b32', float('nan')):.3f}"]


def summary_table(metrics):
    """The end-of-run table: teacher vs student, with the student/teacher ratios."""
    header = ["model", "top-1 %", "params", "MACs", "MiB", "ms b1", "ms b32"]
    rows = []
    t, s = metrics.get("teacher"), metrics["student"]
    if t:
        rows.append(_row("teacher", t))
    rows.append(_row(f"student ({s.get('model', '')})", s))
    if t:
        ratio = lambda a, b: f"{a / b:.2f}×" if a and b else "-"  # noqa: E731
        tl, sl = t.get("latency_ms", {}), s.get("latency_ms", {})
        rows.append(["teacher / student", f"{s['top1'] - t['top1']:+.2f}", ratio(t["params"], s["params"]),
                     ratio(t["macs"], s["macs"]), ratio(t.get("bytes"), s.get("bytes")),
                     ratio(tl.get("b1"), sl.get("b1")), ratio(tl.get("b32"), sl.get("b32"))])
    title = (f"\n{metrics['name']}: {metrics['data']['name']} val ({metrics['data']['val']} images), "
             f"latency oneDNN-fused fp32, best of repeats; time {metrics['time_s']:.0f} s")
    return format_table(header, rows, title)
