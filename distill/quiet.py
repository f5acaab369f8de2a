"""A clean terminal: MXNet's and Gluon's noise kept out of the user's log, ``--debug`` shows it.

Two sources reach the terminal besides the tool's own lines:

* **Gluon's Python warnings**, e.g. "The 2-th input to HybridBlock is not used by any
  computation. Is this intended?" (a loss term that ignores the label, a tapped block whose
  extra output a term does not read). They say nothing the user can act on: filtered by
  :func:`configure` for the ``mxnet`` and ``gluoncv`` modules.
* **MXNet's C++ log lines** (``[12:00:00] ../src/executor/graph_executor.cc:60:
  MXNET_SUBGRAPH_BACKEND=NONE is detected, subgraph backend is not in use``), written straight
  to file descriptor 2, where no Python filter reaches. :func:`native_stderr` captures that
  descriptor around the one call known to cause them and replays every other line.

Ground floor: imports nothing of the project. ``--debug`` (:func:`configure` with
``debug=True``) turns both filters off.
"""
import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings

__all__ = ["configure", "native_stderr", "MXNET_NOISE"]
_LOGGER = logging.getLogger(__name__)

#: MXNet C++ log lines that carry no information for the user (one regex each)
MXNET_NOISE = (
    r"MXNET_SUBGRAPH_BACKEND=NONE is detected, subgraph backend is not in use",
)
_DEBUG_LOGGER = "distill"


def configure(debug=False):
    """Set up the process's log for the CLI: the tool's lines at INFO, Python warnings from
    MXNet and GluonCV silenced unless ``debug`` (then everything, the tool at DEBUG)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("PIL").setLevel(logging.WARNING)
    if debug:
        logging.getLogger(_DEBUG_LOGGER).setLevel(logging.DEBUG)
        warnings.simplefilter("default")
        return
    for module in (r"mxnet(\..*)?", r"gluoncv(\..*)?"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


def _debugging():
    return logging.getLogger(_DEBUG_LOGGER).isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def native_stderr(noise=MXNET_NOISE):
    """Capture file descriptor 2 (C++ writes) during the block; afterwards replay every line
    that does not match one of the ``noise`` regexes. A no-op under ``--debug`` or when
    descriptor 2 cannot be duplicated (an embedding host without one)."""
    if _debugging():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    pattern = re.compile("|".join(f"(?:{n})" for n in noise))
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines(keepends=True) if not pattern.search(line)]
            if kept:
                os.write(2, "".join(kept).encode("utf-8"))
