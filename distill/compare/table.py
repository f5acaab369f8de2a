"""The comparison table: its columns, and the terminal, Markdown and CSV forms of it.

One row per variant; a value over several seeds is ``mean ± std`` (sample std). CSV keeps every
number at full precision with ``<key>`` (mean) and ``<key>_std`` columns.
"""
import csv
import io
import logging
from dataclasses import dataclass
from typing import Callable

from ..report import format_table, human

__all__ = ["Column", "COLUMNS", "terminal_table", "markdown_table", "csv_text", "cells"]
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
