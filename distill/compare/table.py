"""The comparison table: its columns, and the terminal, Markdown and CSV forms of it.

One row per variant; a value over several seeds is ``mean ± std`` (sample std). CSV keeps every
number at full precision with ``<key>`` (mean) and ``<key>_std`` columns.

The paired comparisons (``pairs:``, :mod:`distill.compare.stats`) are a second table in the same
three forms, one row per pair (``compare-pairs.csv`` for the CSV).
"""
import csv
import io
import logging
from dataclasses import dataclass
from typing import Callable

from ..report import format_table, human
from .stats import format_p

__all__ = ["Column", "COLUMNS", "terminal_table", "markdown_table", "csv_text", "cells",
           "PAIR_HEADER", "pair_cells", "pairs_terminal", "pairs_markdown", "pairs_csv_text",
           "PAIR_CSV_KEYS"]
_LOGGER = logging.getLogger(__name__)


def _fixed(digits):
    return lambda v: f"{v:.{digits}f}"


def _kib(v):
    return f"{v / 1024:.0f}"


@dataclass(frozen=True)
class Column:
    """A numeric column: its key in :attr:`Record.values`, header, format and whether seeds
    spread it (``mean ± std`` is shown)."""
    key: str
    header: str
    fmt: Callable
    spread: bool = False


COLUMNS = (
    Column("top1", "top-1 %", _fixed(2), True),
    Column("top1_int8", "top-1 int8 %", _fixed(2), True),
    Column("params", "params", human),
    Column("nonzero", "nonzero", human),
    Column("macs", "MACs", human),
    Column("bytes", "KiB", _kib),
    Column("bytes_int8", "KiB int8", _kib),
    Column("ms_b1", "ms b1", _fixed(3), True),
    Column("ms_b32", "ms b32", _fixed(2), True),
    Column("int8_ms_b1", "int8 b1", _fixed(3), True),
    Column("int8_ms_b32", "int8 b32", _fixed(2), True),
    Column("ncnn_int8_ms_b1", "ncnn int8 b1", _fixed(3), True),
    Column("train_s", "train s", _fixed(0), True),
)
HEADER = ["variant", "seeds"] + [c.header for c in COLUMNS] + ["run folder"]


def _cell(row, col):
    mean, std = row.mean(col.key), row.std(col.key)
    if mean is None:
        return "-"
    text = col.fmt(mean)
    if col.spread and std is not None:
        text += f" ± {col.fmt(std)}"
    return text


def cells(row):
    """The row's cells as text, in :data:`HEADER` order."""
    return ([row.label, str(len(row.records))] + [_cell(row, c) for c in COLUMNS]
            + [", ".join(row.folders)])


def terminal_table(rows, title=None):
    """The plain-text table (aligned columns)."""
    return format_table(HEADER, [cells(r) for r in rows], title)


def markdown_table(rows):
    """A GitHub Markdown table."""
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(HEADER) + " |",
             "|" + "|".join([":--", "--:"] + ["--:"] * len(COLUMNS) + [":--"]) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows):
    """CSV: ``variant, seeds, <key>, <key>_std, ..., run_folders`` (folders ``;``-separated)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "seeds"] + [k for c in COLUMNS for k in (c.key, c.key + "_std")]
               + ["run_folders"])
    num = lambda v: "" if v is None else repr(float(v))  # noqa: E731
    for r in rows:
        w.writerow([r.label, " ".join(str(s) for s in r.seeds)]
                   + [v for c in COLUMNS for v in (num(r.mean(c.key)), num(r.std(c.key)))]
                   + [";".join(r.folders)])
    return buf.getvalue()


PAIR_HEADER = ["pair (A − B)", "seeds", "A top-1 %", "B top-1 %", "A − B points", "p (seeds)",
               "McNemar b/c", "p (McNemar)", "verdict"]


def pair_cells(res):
    """A :class:`~distill.compare.stats.PairResult` as text, in :data:`PAIR_HEADER` order."""
    diff = f"{res.diff_mean:+.2f}" + (f" ± {res.diff_std:.2f}" if res.diff_std is not None else "")
    return [res.label, str(len(res.seeds)), f"{res.a_mean:.2f}", f"{res.b_mean:.2f}", diff,
            format_p(res.p_seeds, len(res.seeds)), f"{res.b_count}/{res.c_count}",
            format_p(res.p_mcnemar), res.verdict]


def pairs_terminal(results, title=None):
    """The paired comparisons as a plain-text table."""
    return format_table(PAIR_HEADER, [pair_cells(r) for r in results], title)


def pairs_markdown(results):
    """The paired comparisons as a GitHub Markdown table."""
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(PAIR_HEADER) + " |",
             "|" + "|".join([":--"] + ["--:"] * (len(PAIR_HEADER) - 2) + [":--"]) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in pair_cells(r)) + " |" for r in results]
    return "\n".join(lines) + "\n"


PAIR_CSV_KEYS = ("a", "b", "seeds", "a_top1_mean", "b_top1_mean", "diff_mean", "diff_std", "t",
                 "p_seeds", "images", "mcnemar_b", "mcnemar_c", "p_mcnemar", "verdict", "a_top1",
                 "b_top1", "diffs")


def pairs_csv_text(results):
    """CSV of the pairs (``compare-pairs.csv``): one line per pair, every figure at full
    precision; per-seed lists are space-separated, empty cells where a figure does not exist."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PAIR_CSV_KEYS)
    num = lambda v: "" if v is None else repr(float(v))  # noqa: E731
    nums = lambda vs: " ".join(repr(float(v)) for v in vs)  # noqa: E731
    for r in results:
        w.writerow([r.a, r.b, " ".join(str(s) for s in r.seeds), num(r.a_mean), num(r.b_mean),
                    num(r.diff_mean), num(r.diff_std), num(r.t), num(r.p_seeds), r.images,
                    r.b_count, r.c_count, num(r.p_mcnemar), r.verdict, nums(r.a_top1),
                    nums(r.b_top1), nums(r.diffs)])
    return buf.getvalue()
