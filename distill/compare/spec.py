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
        int8: true                        # distill quantize the run
        export: true                      # distill export --format ncnn,ncnn-int8
      - name: pruned + KD
        set: [pruning.final_sparsity=0.85]
      - name: pruned + labels
        set:                              # a mapping works too (values are YAML)
          distillation: [{loss: ce, weight: 1.0}]

``set`` items are exactly ``--set KEY=VALUE`` (:func:`distill.recipe.apply_overrides`); each run
of a variant adds ``trainer.seed=<seed>`` and ``output.dir=<out>/<variant>-s<seed>``.
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

__all__ = ["Variant", "Comparison", "load_comparison", "DEFAULT_EXPORT", "slug"]
_LOGGER = logging.getLogger(__name__)

# What `export: true` means: ncnn's fp32 pair and the int8 pair built from it.
DEFAULT_EXPORT = ("ncnn", "ncnn-int8")
_TOP_KEYS = ("name", "base", "out", "set", "repeats", "variants")
_VARIANT_KEYS = ("name", "recipe", "set", "int8", "export")


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
    """
    name: str
    recipe: str
    overrides: Tuple[str, ...] = ()
    int8: bool = False
    export: Tuple[str, ...] = ()

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


@dataclass
class Comparison:
    """A loaded comparison recipe."""
    name: str
    source: str
    out: str
    variants: List[Variant] = field(default_factory=list)
    repeats: Optional[int] = None

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
                        f"and its `set` overrides (see the README's Compare section).")
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
        if not isinstance(v.get("int8", False), bool):
            raise UserError(f"{path}: `{where}int8` must be true or false, got {v['int8']!r}.")
        variant = Variant(vname, rpath, common + _overrides(v.get("set"), f"{where}set", path),
                          bool(v.get("int8", False)), _exports(v.get("export"), f"{where}export", path))
        if variant.folder_name in seen:
            raise UserError(f"{path}: variants {seen[variant.folder_name]!r} and {vname!r} would share "
                            f"the folder {variant.folder_name}-s*: give them names that differ in "
                            f"letters or digits.")
        seen[variant.folder_name] = vname
        variants.append(variant)
    out_dir = out or raw.get("out") or os.path.join("runs", name)
    comp = Comparison(name, os.path.abspath(path), str(out_dir), variants, repeats)
    for v in variants:                  # a typo in any variant fails before the first run
        try:
            v.run_recipe(0, comp.run_dir(v, 0))
        except UserError as e:
            raise UserError(f"{path}: variant {v.name!r}: {e}") from None
    return comp
