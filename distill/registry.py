"""Name → factory registries (datasets, losses, students, ...).

Adding a unit is one file plus one decorator line::

    @LOSSES.register("kd")
    class KDLoss(...): ...

``get`` on an unknown name raises :class:`~distill.errors.UserError` listing the closest and
all valid names, as GluonCV's ``get_model`` does.
"""
from .errors import UserError, closest

__all__ = ["Registry"]


class Registry:
    """A named table of factories.

    Parameters
    ----------
    kind : str
        What the entries are ("loss", "dataset", "student"): used in error messages.
    """

    def __init__(self, kind):
        self.kind = kind
        self._entries = {}

    def register(self, name):
        """Decorator: register ``obj`` under ``name``."""
        def deco(obj):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = obj
            return obj
        return deco

    def get(self, name, where=None):
        """Return the entry named ``name``; ``where`` (e.g. ``student.model``) goes into the error."""
        try:
            return self._entries[name]
        except KeyError:
            near = closest(name, self._entries)
            hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            at = f"{where}: " if where else ""
            raise UserError(
                f"{at}unknown {self.kind} {name!r}.{hint} Valid {self.kind} names: "
                f"{', '.join(sorted(self._entries))}.") from None

    def names(self):
        """All registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name):
        return name in self._entries
