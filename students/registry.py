"""The student registry and the helper that registers a GluonCV model-zoo name.

A builder is a function ``builder(num_classes) -> HybridBlock`` returning a stock, uninitialized
net whose downsampling is all visible as ``Conv2D``/``MaxPool2D``/``AvgPool2D`` layers (see
:mod:`students.adapt`); :func:`students.build_student` initializes and adapts it.
"""
import logging

from gluoncv.model_zoo import get_model

from distill.registry import Registry

__all__ = ["STUDENTS", "register_zoo"]

_LOGGER = logging.getLogger(__name__)

STUDENTS = Registry("student")


def register_zoo(name, fix=None):
    """Register GluonCV's ``get_model(name, pretrained=False, classes=num_classes)`` under ``name``.

    Parameters
    ----------
    name : str
        A GluonCV model-zoo name; also the name a recipe writes under ``student.model``.
    fix : callable, optional
        ``fix(net) -> net`` applied to the stock net (e.g. exposing a functional pooling op).

    Returns
    -------
    callable
        The registered builder.
    """
    def build(num_classes):
        net = get_model(name, pretrained=False, classes=num_classes)
        return fix(net) if fix is not None else net

    build.__name__ = f"build_{name.replace('.', '_')}"
    build.__doc__ = f"GluonCV ``{name}`` (pretrained=False) with ``classes=num_classes``."
    return STUDENTS.register(name)(build)
