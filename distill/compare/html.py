"""``compare.html``: the table, the paired comparisons and the plots in one self-contained file.

Plots are inlined as base64 PNG ``data:`` URIs and the style sheet is inline: the file opens
offline, from a mail attachment or a CI artifact, with nothing to fetch.
"""
import base64
import html
import logging

from .table import HEADER, PAIR_HEADER, cells, pair_cells

__all__ = ["render_html", "data_uri"]
_LOGGER = logging.getLogger(__name__)

_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; }
td:first-child, th:first-child, td:last-child, th:last-child { text-align: left; }
td:last-child { font-family: monospace; font-size: 11px; }
table.pairs td:last-child { font-family: sans-serif; font-size: 13px; }
h2 { font-size: 18px; margin-top: 24px; }
.plots img { max-width: 48%; margin: 8px 1% 0 0; border: 1px solid #ddd; }
.notes { font-size: 13px; color: #555; }
"""


def data_uri(png):
    """``data:image/png;base64,...`` of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table(header, lines, cls=None):
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in line) + "</tr>\n"
                   for line in lines)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>\n"


def render_html(rows, title, notes, plots, pairs=(), pair_notes=()):
    """The page.

    Parameters
    ----------
    rows : list of Row
    title : str
    notes : list of str
        Conditions and caveats (one paragraph each).
    plots : list of (caption, png bytes)
    pairs : list of PairResult
        The paired comparisons (a second table when there are any).
    pair_notes : list of str
        What the paired tests are (paragraphs under their table).
    """
    esc = html.escape
    paired = ""
    if pairs:
        paired = ("<h2>Paired comparisons</h2>\n"
                  + _table(PAIR_HEADER, [pair_cells(p) for p in pairs], "pairs")
                  + "<div class=\"notes\">" + "".join(f"<p>{esc(n)}</p>" for n in pair_notes)
                  + "</div>\n")
    imgs = "".join(f'<img alt="{esc(cap)}" title="{esc(cap)}" src="{data_uri(png)}">'
                   for cap, png in plots)
    notes_html = "".join(f"<p>{esc(n)}</p>" for n in notes)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            f"<h1>{esc(title)}</h1>\n{_table(HEADER, [cells(r) for r in rows])}{paired}"
            f"<div class=\"plots\">{imgs}</div>\n"
            f"<div class=\"notes\">{notes_html}</div>\n</body></html>\n")
