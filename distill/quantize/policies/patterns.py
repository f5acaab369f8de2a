"""Explicit layer-name patterns: ``--exclude "*conv0_fwd,*dense*"``.

A pattern is a shell wildcard (``*``, ``?``, ``[...]``) matched against the whole layer name,
or, without wildcards, a substring of it (as MXNet's ``exclude_layers_match``). Every pattern
must match at least one weight layer: a typo would otherwise silently quantize everything.
"""
import fnmatch

from ...errors import UserError, closest
from .base import POLICIES, Selection

__all__ = ["PatternPolicy", "match_layers"]

_WILD = set("*?[")


def match_layers(pattern, names):
    """The names of ``names`` that ``pattern`` matches (wildcard, else substring)."""
    if _WILD & set(pattern):
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return [n for n in names if pattern in n]


class PatternPolicy:
    """Keep in fp32 the weight layers matching any of ``patterns``."""

    def __init__(self, patterns):
        self.patterns = list(patterns)
        self.name = ",".join(self.patterns)

    def check(self, model):
        """The matched layer names, in graph order; a pattern matching nothing raises.

        Raises
        ------
        UserError
            Names the pattern, the closest layer or policy names, and lists every layer.
        """
        names = model.layer_names
        chosen = []
        for pat in self.patterns:
            hits = match_layers(pat, names)
            if not hits:
                near = closest(pat.strip("*"), names) + closest(pat, POLICIES.names())
                hint = f" Closest: {', '.join(near)}." if near else ""
                raise UserError(
                    f"quantization.exclude: pattern {pat!r} matches no layer of "
                    f"{model.source}.{hint} Use none, first_last, auto, or patterns (shell "
                    f"wildcards, or a substring) over these {len(names)} layers: "
                    f"{', '.join(names)}.")
            chosen += [h for h in hits if h not in chosen]
        order = {n: i for i, n in enumerate(names)}
        return sorted(chosen, key=order.get)

    def select(self, scorer):
        chosen = self.check(scorer.model)
        return Selection(excluded=chosen,
                         notes=[f"patterns {', '.join(self.patterns)} match {len(chosen)} layer(s)"])
