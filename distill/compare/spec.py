"""Comparison recipes: a base recipe and a list of variants, each a set of recipe overrides.

A comparison recipe is strict like a run recipe: every key below is the one users write, an
unknown key raises :class:`~distill.errors.UserError` naming it and the closest valid one.

Recipe example::

    name: compare_mnist
    base: prune_channel_mnist.yaml        # every variant starts from it (relative to this file)
    out: runs/compare_mnist               # default runs/<name>
    set: [trainer.epochs=8]               # overrides for every variant, before its own
    variants:
      - name: teacher
        recipe: teacher_mnist.yaml        # this variant starts from another recipe
        seeds: 1                          # at most one seed, whatever --seeds says
        int8: true                        # distill quantize the run
        export: true                      # distill export --format ncnn,ncnn-int8
      - name: pruned + KD
        set: [pruning.final_sparsity=0.85]
      - name: pruned + labels
        set:                              # a mapping works too (values are YAML)
          distillation: [{loss: ce, weight: 1.0}]
        int8: true
    pairs:                                # paired tests, reported as A − B (top-1 points)
      - [pruned + KD, pruned + labels]    # KD vs labels at the same ratio
      - [pruned + labels:int8, pruned + labels]   # `:int8`: the variant's int8 model

``set`` items are exactly ``--set KEY=VALUE`` (:func:`distill.recipe.apply_overrides`); each run
of a variant adds ``trainer.seed=<seed>`` and ``output.dir=<out>/<variant>-s<seed>``.

``pairs`` lists the differences to test (:mod:`distill.compare.stats`): each is ``[A, B]``, two
variant names, a name ending in ``:int8`` meaning that variant's int8 model (the variant needs
``int8: true``). Runs of A and B with the same seed are paired: the mean difference over seeds
with a paired t-test, and McNemar's exact test over every image of every seed.
"""
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import yaml

from ..errors import UserError, closest
from ..recipe import load_recipe

__all__ = ["Variant", "Side", "Comparison", "load_comparison", "DEFAULT_EXPORT", "slug",
           "INT8_SIDE"]
_LOGGER = logging.getLogger(__name__)

# What `export: true` means: ncnn's fp32 pair and the int8 pair built from it.
DEFAULT_EXPORT = ("ncnn", "ncnn-int8")
_TOP_KEYS = ("name", "base", "out", "set", "repeats", "variants", "pairs")
#: a pair side ending in this names the variant's int8 model
INT8_SIDE = ":int8"
_VARIANT_KEYS = ("name", "recipe", "set", "int8", "export", "seeds")


def slug(name):
    """``"pruned + KD"`` → ``"pruned-kd"`` (a folder name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "variant"


@dataclass
class Variant:
    """One row of the comparison.

    Attributes
    ----------
    name : str
        The row's label.
    recipe : str
        Absolute path of the recipe it starts from.
    overrides : tuple of str
        ``KEY=VALUE`` items, the comparison's ``set`` first.
    int8 : bool
        Calibrate an int8 model (``distill quantize``) after training.
    export : tuple of str
        Export formats (``distill export --format``); empty: no export.
    max_seeds : int, optional
        ``seeds:`` at most this many seeds whatever ``--seeds`` says (``1`` for a reference
        trained once, such as the teacher every student learns from).
    """
    name: str
    recipe: str
    overrides: Tuple[str, ...] = ()
    int8: bool = False
    export: Tuple[str, ...] = ()
    max_seeds: Optional[int] = None

    def seeds(self, n):
        """The seeds this variant runs when the comparison runs ``n``: ``0..min(n, seeds)-1``."""
        return range(min(int(n), self.max_seeds or int(n)))

    @property
    def folder_name(self):
        return slug(self.name)

    def run_overrides(self, seed, run_dir=None):
        """The overrides of one run: the variant's, then its seed and its folder."""
        out = list(self.overrides) + [f"trainer.seed={int(seed)}"]
        return out + ([f"output.dir={json.dumps(str(run_dir))}"] if run_dir else [])

    def run_recipe(self, seed, run_dir=None):
        """The validated :class:`~distill.recipe.Recipe` of one run (``run_dir`` ``None``: in
        the folder the recipe itself names)."""
        return load_recipe(self.recipe, self.run_overrides(seed, run_dir))


@dataclass(frozen=True)
class Side:
    """One side of a pair: a variant's fp32 model, or (``int8``) its int8 model.

    Attributes
    ----------
    variant : str
        The variant's name.
    int8 : bool
        The int8 model of ``distill quantize`` (written ``NAME:int8``).
    """
    variant: str
    int8: bool = False

    def __str__(self):
        return self.variant + (INT8_SIDE if self.int8 else "")


@dataclass
class Comparison:
    """A loaded comparison recipe.

    Attributes
    ----------
    pairs : list of (Side, Side)
        ``pairs:``: the differences A − B to test over seeds and images.
    """
    name: str
    source: str
    out: str
    variants: List[Variant] = field(default_factory=list)
    repeats: Optional[int] = None
    pairs: List[Tuple[Side, Side]] = field(default_factory=list)

    def run_dir(self, variant, seed):
        """``<out>/<variant>-s<seed>``."""
        return os.path.join(self.out, f"{variant.folder_name}-s{int(seed)}")


def _unknown(keys, valid, where, path):
    for k in keys:
        if k not in valid:
            near = closest(k, valid)
            hint = f" (did you mean `{near[0]}`?)" if near else ""
            raise UserError(f"{path}: unknown key `{where}{k}`{hint}; valid keys: {', '.join(valid)}.")


def _overrides(value, where, path):
    """``set:`` as ``KEY=VALUE`` strings (a list of them, or a mapping of key → YAML value)."""
    if value is None:
        return ()
    if isinstance(value, dict):
        return tuple(f"{k}={json.dumps(v)}" for k, v in value.items())
    if isinstance(value, list) and all(isinstance(s, str) and "=" in s for s in value):
        return tuple(value)
    raise UserError(f"{path}: `{where}` must be a list of KEY=VALUE strings (as --set takes, e.g. "
                    f"[trainer.epochs=3]) or a mapping of recipe keys to values; got {value!r}.")


def _exports(value, where, path):
    from ..export.core import FORMATS                  # registers every format
    from ..export.formats import ordered_formats
    if value in (None, False):
        return ()
    if value is True:
        return DEFAULT_EXPORT
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: `{where}` must be true, false or a list of export formats "
                        f"({', '.join(ordered_formats())}); got {value!r}.")
    names = [n.strip() for n in names if n.strip()]
    for n in names:
        FORMATS.get(n, where=f"{path}: `{where}`")
    return tuple(n for n in ordered_formats() if n in names)


def _side(text, variants, where, path):
    """``NAME`` or ``NAME:int8`` → :class:`Side`, checked against the variants."""
    by_name = {v.name: v for v in variants}
    name, int8 = (text[:-len(INT8_SIDE)], True) if text.endswith(INT8_SIDE) else (text, False)
    if name not in by_name:
        near = closest(name, list(by_name))
        hint = f" (did you mean `{near[0]}`?)" if near else ""
        raise UserError(f"{path}: `{where}` names the variant {name!r}, which the comparison does "
                        f"not have{hint}; valid names: {', '.join(repr(n) for n in by_name)} (each "
                        f"may end with `{INT8_SIDE}` for its int8 model).")
    if int8 and not by_name[name].int8:
        raise UserError(f"{path}: `{where}` asks for {text!r}, the int8 model of {name!r}, but "
                        f"that variant has no int8 model: add `int8: true` to variant {name!r}, "
                        f"or pair its fp32 model ({name!r}).")
    return Side(name, int8)


def _pairs(value, variants, path):
    """``pairs:`` as ``[(Side, Side)]``; each item a list of exactly two variant names."""
    if value is None:
        return []
    form = ("a list of pairs, each a list of two variant names [A, B] (reported as A − B), e.g. "
            "pairs: [[pruned + KD, pruned + labels]]")
    if not isinstance(value, list):
        raise UserError(f"{path}: `pairs` must be {form}; got {value!r}.")
    pairs, seen = [], set()
    for i, item in enumerate(value):
        where = f"pairs[{i}]"
        if not (isinstance(item, list) and len(item) == 2
                and all(isinstance(s, str) for s in item)):
            raise UserError(f"{path}: `{where}` must be a list of exactly two variant names [A, B] "
                            f"(the difference is reported as A − B); got {item!r}.")
        a, b = (_side(s.strip(), variants, where, path) for s in item)
        if a == b:
            raise UserError(f"{path}: `{where}` pairs {str(a)!r} with itself: name two different "
                            f"models (a variant and another, or a variant and its `{INT8_SIDE}` "
                            f"model).")
        if (a, b) in seen:
            raise UserError(f"{path}: `{where}` [{a}, {b}] is listed twice: drop one.")
        seen.add((a, b))
        pairs.append((a, b))
    return pairs


def load_comparison(path, out=None):
    """Read and validate a comparison recipe; every variant's first run recipe is validated too.

    Parameters
    ----------
    path : str
        The comparison recipe (YAML).
    out : str, optional
        ``--out``: replaces the recipe's ``out``.
    """
    if not os.path.isfile(path):
        raise UserError(f"comparison recipe {path!r} does not exist (looked in {os.path.abspath(path)}).")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: YAML syntax error ({str(e).splitlines()[0]}); check the "
                            f"indentation.") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a comparison recipe is a mapping (name, base, variants, ...).")
    _unknown(raw, _TOP_KEYS, "", path)
    here = os.path.dirname(os.path.abspath(path))
    name = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, list) or not variants_raw:
        raise UserError(f"{path}: `variants` must list at least one variant, each with a `name` "
                        f"and its `set` overrides (see docs/compare.md).")
    common = _overrides(raw.get("set"), "set", path)
    repeats = raw.get("repeats")
    if repeats is not None and (not isinstance(repeats, int) or repeats < 1):
        raise UserError(f"{path}: `repeats` (latency repeats) must be an integer ≥ 1, got {repeats!r}.")
    variants, seen = [], {}
    for i, v in enumerate(variants_raw):
        where = f"variants[{i}]."
        if not isinstance(v, dict) or not v.get("name"):
            raise UserError(f"{path}: `variants[{i}]` needs a `name` (the row's label); got {v!r}.")
        _unknown(v, _VARIANT_KEYS, where, path)
        vname = str(v["name"])
        base = v.get("recipe") or raw.get("base")
        if not base:
            raise UserError(f"{path}: variant {vname!r} has no recipe: set the top-level `base` "
                            f"or the variant's `recipe`.")
        rpath = os.path.join(here, base)
        if not os.path.isfile(rpath):
            key = f"{where}recipe" if v.get("recipe") else "base"
            raise UserError(f"{path}: `{key}: {base}` does not exist ({rpath}); paths are relative "
                            f"to the comparison recipe.")
        max_seeds = v.get("seeds")
        if max_seeds is not None and (isinstance(max_seeds, bool) or not isinstance(max_seeds, int)
                                      or max_seeds < 1):
            raise UserError(f"{path}: `{where}seeds` (at most this many seeds for the variant, "
                            f"e.g. 1 for a teacher trained once) must be an integer ≥ 1, got "
                            f"{max_seeds!r}.")
        if not isinstance(v.get("int8", False), bool):
            raise UserError(f"{path}: `{where}int8` must be true or false, got {v['int8']!r}.")
        variant = Variant(vname, rpath, common + _overrides(v.get("set"), f"{where}set", path),
                          bool(v.get("int8", False)), _exports(v.get("export"), f"{where}export", path),
                          max_seeds)
        if variant.folder_name in seen:
            raise UserError(f"{path}: variants {seen[variant.folder_name]!r} and {vname!r} would share "
                            f"the folder {variant.folder_name}-s*: give them names that differ in "
                            f"letters or digits.")
        seen[variant.folder_name] = vname
        variants.append(variant)
    pairs = _pairs(raw.get("pairs"), variants, path)
    out_dir = out or raw.get("out") or os.path.join("runs", name)
    comp = Comparison(name, os.path.abspath(path), str(out_dir), variants, repeats, pairs)
    for v in variants:                  # a typo in any variant fails before the first run
        try:
            v.run_recipe(0, comp.run_dir(v, 0))
        except UserError as e:
            raise UserError(f"{path}: variant {v.name!r}: {e}") from None
    return comp
