"""The export-format registry: one class per format, one file each, registered by name.

Adding a format = one file with::

    @FORMATS.register("name")
    class MyFormat(ExportFormat):
        files = ("model.ext",)
        def missing(self): ...          # None, or what to install
        def blocker(self, job): ...     # None, or why this model cannot take this format
        def export(self, job): ...      # write files, run them in their runtime, return a result

A result is a dict: ``files`` (names in the export folder), ``bytes``, ``parity``
(:func:`~distill.export.parity.compare_logits`), ``latency_ms`` (``{"b1": ms}``), ``check``
(:func:`check_result`), plus anything format-specific.
"""
import logging
import os

from ..registry import Registry

__all__ = ["FORMATS", "ExportFormat", "check_result", "ordered_formats"]
_LOGGER = logging.getLogger(__name__)

FORMATS = Registry("export format")


class ExportFormat:
    """Base class of a registered export format.

    Attributes
    ----------
    order : int
        Position in reports (mxnet, onnx, onnx-int8, ncnn).
    files : tuple of str
        What the format writes into the export folder.
    """
    order = 100
    files = ()

    def missing(self):
        """``None`` when the format's converter and runtime are installed, else how to install them."""
        return None

    def blocker(self, job):
        """``None`` when this model can take this format, else why not (e.g. unsupported ops)."""
        return None

    def export(self, job):
        """Write the files into ``job.out_dir``, run them, compare with ``job.ref``; return a result."""
        raise NotImplementedError


def check_result(reason, rule):
    """The ``check`` entry of a result: ``reason`` is ``None`` (passed) or why it failed."""
    return {"passed": reason is None, "rule": rule, "message": reason or "ok"}


def ordered_formats():
    """Registered format names in report order."""
    return sorted(FORMATS.names(), key=lambda n: (FORMATS.get(n).order, n))


def files_bytes(folder, names):
    """Total size of ``names`` inside ``folder``."""
    return sum(os.path.getsize(os.path.join(folder, n)) for n in names)
