"""The project's one error type for user mistakes.

A :class:`UserError` is raised at the boundary (recipe, files, data, model load) with a message
that names the file, key or layer at fault and what would be valid. The CLI prints it as one
paragraph without a traceback (``--debug`` shows it).
"""
import difflib

__all__ = ["UserError", "closest"]


class UserError(Exception):
    """A mistake in the user's input: printed as one paragraph, exit code 2."""


def closest(name, candidates, n=3):
    """Return up to ``n`` names from ``candidates`` that look like ``name`` (best first)."""
    candidates = [str(c) for c in candidates]
    found = difflib.get_close_matches(str(name), candidates, n=n, cutoff=0.5)
    if not found:
        low = str(name).lower()
        found = [c for c in candidates if low in c.lower() or c.lower() in low][:n]
    return found
