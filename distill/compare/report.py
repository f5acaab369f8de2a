"""Write a comparison: re-time, group into rows, then the terminal table and the files.

Files in the output folder::

    compare.md          the table (Markdown) + conditions + the plots
    compare.csv         one line per variant: mean and std of every column, run folders
    compare.html        self-contained: table, plots inlined (base64), conditions
    compare.json        every run's numbers (per seed) and the conditions
    compare-latency.png top-1 vs latency (batch 32), Pareto front marked
    compare-macs.png    top-1 vs MACs
"""
import datetime
import json
import logging
import os
import platform

from ..checkpoint import atomic_write_bytes
from .collect import group_records
from .html import render_html
from .plots import latency_plot, macs_plot
from .table import csv_text, markdown_table, terminal_table
from .timing import retime

__all__ = ["write_report", "OUTPUT_FILES"]
_LOGGER = logging.getLogger(__name__)

OUTPUT_FILES = {"md": "compare.md", "csv": "compare.csv", "html": "compare.html",
                "json": "compare.json", "latency_png": "compare-latency.png",
                "macs_png": "compare-macs.png"}


def _conditions(repeats, threads):
    cpu = platform.processor() or platform.machine()
    return (f"Latency: every model of this table re-timed by `distill compare` in one process on "
            f"{datetime.datetime.now():%Y-%m-%d %H:%M}, best of {repeats} repeats alternating over "
            f"the rows; MXNet oneDNN-fused (fp32 and int8 of `distill quantize`), "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; ncnn int8 "
            f"(`distill export --format ncnn-int8`) at batch 1 with {threads} thread(s) in a "
            f"child process; {os.cpu_count()} cores, {cpu}. Top-1 on each run's held-out split; "
            f"a value over several seeds is mean ± sample std; train s is the training loop's "
            f"time (teacher-output caching excluded).")


def write_report(records, out_dir, title, repeats=20, threads=None, log=print):
    """Time, tabulate and write every output file; return the rows.

    Parameters
    ----------
    records : list of Record
        One per run (seeds of a variant share its label).
    out_dir : str
    title : str
    repeats : int
        Latency repeats.
    """
    from ..export.runtimes import default_threads
    threads = threads or default_threads()
    os.makedirs(out_dir, exist_ok=True)
    log(f"compare: timing {len(records)} runs' models together (best of {repeats}) ...")
    notes = retime(records, repeats, out_dir, threads)
    rows = group_records(records)
    notes = [_conditions(repeats, threads)] + notes
    path = {k: os.path.join(out_dir, f) for k, f in OUTPUT_FILES.items()}
    plots = [("top-1 vs latency (batch 32), Pareto front marked", latency_plot(rows, title)),
             ("top-1 vs MACs", macs_plot(rows, title))]
    write = lambda k, data: atomic_write_bytes(path[k], data if isinstance(data, bytes) else data.encode())  # noqa: E731
    write("latency_png", plots[0][1])
    write("macs_png", plots[1][1])
    write("csv", csv_text(rows))
    write("html", render_html(rows, title, notes, plots))
    md = [f"# {title}", "", markdown_table(rows)] + [n + "\n" for n in notes] + [
        f"![top-1 vs latency]({OUTPUT_FILES['latency_png']})",
        f"![top-1 vs MACs]({OUTPUT_FILES['macs_png']})", ""]
    write("md", "\n".join(md))
    runs = [{"variant": r.label, "folder": r.folder.path, "seed": r.seed,
             "input_shape": list(r.input_shape), "values": r.values} for r in records]
    write("json", json.dumps({"title": title, "notes": notes, "runs": runs}, indent=2))
    log(terminal_table(rows, f"\n{title}"))
    for n in notes:
        log(n)
    log(f"compare: {', '.join(path[k] for k in ('md', 'csv', 'html'))}")
    return rows
