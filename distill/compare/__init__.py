"""``distill compare``: students side by side, from a comparison recipe or from run folders.

``distill compare COMPARE.yaml [--seeds N]`` runs every variant of a comparison recipe
(:mod:`~distill.compare.spec`; trained, int8-calibrated and exported as it says; complete runs
reused); ``distill compare RUN [RUN ...]`` collects finished run folders. Either way every
latency is re-timed together (:mod:`~distill.compare.timing`) and the table is printed and
written as ``compare.md``, ``compare.csv`` and a self-contained ``compare.html`` with plots
(:mod:`~distill.compare.report`). A recipe's ``pairs`` add paired tests, over seeds and over
per-image predictions (:mod:`~distill.compare.stats`, :mod:`~distill.compare.predictions`), as a
second table in every form and ``compare-pairs.csv``.

This module is the command line only (the CLI imports it to list subcommands; MXNet is
imported when the command runs).
"""
import logging
import os

__all__ = ["add_arguments", "main", "compare"]
_LOGGER = logging.getLogger(__name__)


def add_arguments(p):
    """The ``distill compare`` arguments."""
    p.add_argument("targets", nargs="+", metavar="COMPARE.yaml | RUN",
                   help="a comparison recipe (YAML) to run, or run folders to collect")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where compare.md/.csv/.html go (default: the recipe's `out`, runs/<name>; "
                        "runs/compare for run folders)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="comparison recipe: run each variant with trainer.seed 0..N-1 and report "
                        "mean ± std, and for the recipe's `pairs` paired tests (default 1)")
    p.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="latency: best of N repeats (default: the recipe's `repeats`, else 20)")


def compare(targets, out=None, seeds=1, repeats=None, log=print):
    """Run or collect a comparison and write its files; return the rows.

    Parameters
    ----------
    targets : list of str
        One comparison recipe (``.yaml``/``.yml``), or run folders.
    out : str, optional
    seeds : int
        Seeds per variant (comparison recipe only).
    repeats : int, optional
        Latency repeats.
    """
    from ..errors import UserError
    from .collect import read_run
    from .report import write_report
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: give at least 1 (each variant runs with seeds 0..N-1).")
    if repeats is not None and repeats < 1:
        raise UserError(f"--repeats {repeats}: give at least 1.")
    recipes = [t for t in targets if t.endswith((".yaml", ".yml")) and not os.path.isdir(t)]
    if recipes:
        if len(targets) > 1:
            raise UserError(f"distill compare takes one comparison recipe or run folders, not both "
                            f"(got {', '.join(targets)}): run the recipe, then collect its folders "
                            f"with the others.")
        from .predictions import pair_comparisons
        from .runner import run_comparison
        from .spec import load_comparison
        comp = load_comparison(recipes[0], out)
        records = run_comparison(comp, seeds, log)
        pairs = pair_comparisons(comp, records, log)
        title = f"{comp.name}: {len(comp.variants)} variants × {seeds} seed(s)"
        return write_report(records, comp.out, title, repeats or comp.repeats or 20, log=log,
                            pairs=pairs)
    records = [read_run(t) for t in targets]
    return write_report(records, out or os.path.join("runs", "compare"),
                        f"comparison of {len(records)} runs", repeats or 20, log=log)


def main(args):
    """Run ``distill compare``; 0 on success."""
    compare(args.targets, args.out, args.seeds, args.repeats)
    return 0
