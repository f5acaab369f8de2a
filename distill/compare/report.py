"""Write a comparison: re-time, group into rows, then the terminal table and the files.

Files in the output folder::

    compare.md          the table (Markdown), the paired comparisons, conditions, the plots
    compare.csv         one line per variant: mean and std of every column, run folders
    compare-pairs.csv   one line per pair (``pairs:``): every figure of the paired tests
    compare.html        self-contained: tables, plots inlined (base64), conditions
    compare.json        every run's numbers (per seed), every pair's figures, the conditions
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
from .stats import ALPHA
from .table import (csv_text, markdown_table, pairs_csv_text, pairs_markdown, pairs_terminal,
                    terminal_table)
from .timing import retime

__all__ = ["write_report", "OUTPUT_FILES", "pairs_note"]
_LOGGER = logging.getLogger(__name__)

OUTPUT_FILES = {"md": "compare.md", "csv": "compare.csv", "html": "compare.html",
                "json": "compare.json", "latency_png": "compare-latency.png",
                "macs_png": "compare-macs.png", "pairs_csv": "compare-pairs.csv"}
PAIRS_TITLE = "Paired comparisons"


def pairs_note(alpha=ALPHA):
    """What the paired table shows, one paragraph."""
    return (f"Paired comparisons: A − B in top-1 points over the seeds both ran (runs with the "
            f"same seed paired), mean ± sample std of the per-seed differences; p (seeds) is the "
            f"two-sided paired t-test over seeds (n/a with one seed); McNemar b/c counts the "
            f"images A classifies right and B wrong / A wrong and B right, pooled over the seeds, "
            f"and p (McNemar) is its exact two-sided binomial test. The verdict names a side "
            f"better only when both p < {alpha:g}; a difference only McNemar supports is a "
            f"difference between these trained models on these images, not one another training "
            f"would repeat. Predictions are cached in predictions/.")


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


def write_report(records, out_dir, title, repeats=20, threads=None, log=print, pairs=None):
    """Time, tabulate and write every output file; return the rows.

    Parameters
    ----------
    records : list of Record
        One per run (seeds of a variant share its label).
    out_dir : str
    title : str
    repeats : int
        Latency repeats.
    pairs : list of PairResult, optional
        The paired comparisons (:func:`distill.compare.predictions.pair_comparisons`): a
        section after the table in every form, and ``compare-pairs.csv``.
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
    pairs = list(pairs or [])
    pair_notes = [pairs_note()] + [n for p in pairs for n in p.notes] if pairs else []
    write("csv", csv_text(rows))
    if pairs:
        write("pairs_csv", pairs_csv_text(pairs))
    elif os.path.isfile(path["pairs_csv"]):      # an earlier run's pairs: not this table's
        os.remove(path["pairs_csv"])
    write("html", render_html(rows, title, notes, plots, pairs, pair_notes))
    md = [f"# {title}", "", markdown_table(rows)]
    if pairs:
        md += [f"## {PAIRS_TITLE}", "", pairs_markdown(pairs)] + [n + "\n" for n in pair_notes]
    md += [n + "\n" for n in notes] + [
        f"![top-1 vs latency]({OUTPUT_FILES['latency_png']})",
        f"![top-1 vs MACs]({OUTPUT_FILES['macs_png']})", ""]
    write("md", "\n".join(md))
    runs = [{"variant": r.label, "folder": r.folder.path, "seed": r.seed,
             "input_shape": list(r.input_shape), "values": r.values} for r in records]
    doc = {"title": title, "notes": notes, "runs": runs}
    if pairs:
        doc["pairs"] = [p.to_dict() for p in pairs]
    write("json", json.dumps(doc, indent=2))
    log(terminal_table(rows, f"\n{title}"))
    if pairs:
        log(pairs_terminal(pairs, f"\n{PAIRS_TITLE}"))
        for n in pair_notes:
            log(n)
    for n in notes:
        log(n)
    files = ("md", "csv", "pairs_csv", "html") if pairs else ("md", "csv", "html")
    log(f"compare: {', '.join(path[k] for k in files)}")
    return rows
