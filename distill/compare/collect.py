"""Rows of a comparison from run folders: one :class:`Record` per run, one :class:`Row` per variant.

Everything is read through :class:`~distill.runfolder.RunFolder`: the student's top-1, params,
MACs, bytes and training time from ``metrics.json``; the int8 top-1 from its ``int8`` section
(``distill quantize``); nonzero parameters counted in the params file (an unstructured-pruned
network keeps its zeros dense); the ncnn int8 pair from the run's export folder. Latencies are
left empty here: :mod:`distill.compare.timing` measures them all in one process.
"""
import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import UserError
from ..graphio import AUX_SUFFIXES, load_pair, pair_exists, pair_files, pair_size
from ..recipe import recipe_from_dict, recipe_hash
from ..runfolder import RunFolder

__all__ = ["Record", "Row", "read_run", "group_records", "count_nonzero", "ncnn_int8_pair",
           "has_int8", "LATENCY_KEYS"]
_LOGGER = logging.getLogger(__name__)

# Filled by distill.compare.timing: MXNet fp32 and int8 at batch 1 and 32, ncnn int8 at batch 1
# (ncnn has no batch axis).
LATENCY_KEYS = ("ms_b1", "ms_b32", "int8_ms_b1", "int8_ms_b32", "ncnn_int8_ms_b1")


def count_nonzero(prefix):
    """Nonzero learnable parameters of the pair at ``prefix`` (BN running statistics excluded)."""
    _, params = load_pair(prefix, what="model")
    return int(sum(int(np.count_nonzero(v.asnumpy())) for k, v in params.items()
                   if not k.endswith(AUX_SUFFIXES)))


def ncnn_int8_pair(folder):
    """``(param, bin)`` of the run's ncnn int8 export, or ``None`` (absent, or older than the
    model: an export of an earlier training must not be timed for this one)."""
    from ..export.ncnn_int8 import FILES        # the format owns its file names
    param, bin_ = (os.path.join(folder.export_dir, f) for f in FILES[:2])
    if not (os.path.isfile(param) and os.path.isfile(bin_)):
        return None
    if os.path.getmtime(bin_) < os.path.getmtime(folder.model_params_path):
        return None
    return param, bin_


def has_int8(folder):
    """The run has an int8 pair from ``distill quantize`` at least as new as its fp32 model."""
    if not pair_exists(folder.int8_prefix) or "int8" not in folder.read_metrics():
        return False
    return os.path.getmtime(pair_files(folder.int8_prefix)[1]) >= \
        os.path.getmtime(folder.model_params_path)


@dataclass
class Record:
    """One run folder's numbers.

    Attributes
    ----------
    folder : RunFolder
    label : str
        The row it belongs to (the variant's name, or the recipe's).
    group : str
        Runs with the same group are seeds of one variant.
    seed : int
    input_shape : tuple
        ``(C, H, W)``.
    values : dict
        Column key → number (``None`` when the run has no such model).
    """
    folder: RunFolder
    label: str
    group: str
    seed: int
    input_shape: Tuple[int, ...]
    values: Dict[str, Optional[float]] = field(default_factory=dict)

    @property
    def int8_prefix(self):
        return self.folder.int8_prefix if has_int8(self.folder) else None

    @property
    def ncnn_int8(self):
        return ncnn_int8_pair(self.folder)


def read_run(path, label=None):
    """A :class:`Record` of the complete run folder at ``path``.

    Parameters
    ----------
    label : str, optional
        The row's name (default: the recipe's ``name``).
    """
    folder = RunFolder(path)
    if not folder.exists():
        raise UserError(f"{path} does not exist: give run folders that `distill train` wrote "
                        f"(runs/<name>/ or the recipe's output.dir).")
    metrics = folder.read_metrics()
    if not folder.has_model() or not metrics.get("complete"):
        raise UserError(f"{path} is not a complete run (no finished model or metrics marked "
                        f"complete): finish it with `distill train {folder.recipe_path} --resume`, "
                        f"or leave it out of the comparison.")
    recipe = recipe_from_dict(folder.read_recipe_dict(), folder.recipe_path)
    seed = recipe.trainer.seed
    unseeded = dataclasses.replace(recipe, trainer=dataclasses.replace(recipe.trainer, seed=0))
    s = metrics["student"]
    int8 = has_int8(folder)
    values = {
        "top1": s.get("top1"),
        "top1_int8": metrics["int8"].get("top1") if int8 else None,
        "params": s.get("params"),
        "nonzero": count_nonzero(folder.model_prefix),
        "macs": s.get("macs"),
        "bytes": s.get("bytes") or pair_size(folder.model_prefix),
        "bytes_int8": pair_size(folder.int8_prefix) if int8 else None,
        "train_s": metrics.get("train_time_s"),
    }
    values.update({k: None for k in LATENCY_KEYS})
    shape = tuple(metrics.get("data", {}).get("input_shape") or ())
    return Record(folder, label or metrics.get("name") or os.path.basename(path.rstrip("/")),
                  recipe_hash(unseeded), seed, shape, values)


def _stats(vals):
    vals = [float(v) for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    mean = float(np.mean(vals))
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return mean, std


@dataclass
class Row:
    """One variant: its runs (seeds) and, per column, mean and sample std over them."""
    label: str
    records: List[Record]

    @property
    def seeds(self):
        return [r.seed for r in self.records]

    @property
    def folders(self):
        return [r.folder.path for r in self.records]

    def mean(self, key):
        return _stats(r.values.get(key) for r in self.records)[0]

    def std(self, key):
        """Sample standard deviation (``None`` with fewer than two runs)."""
        return _stats(r.values.get(key) for r in self.records)[1]


def group_records(records):
    """Rows in order of first appearance: records with the same label and group go together.

    In a comparison recipe the label is the variant; collected folders are grouped by their
    recipe with the seed left out (so seeds of one recipe form one row).
    """
    rows, index = [], {}
    for r in records:
        key = (r.label, r.group)
        if key not in index:
            index[key] = len(rows)
            rows.append(Row(r.label, []))
        rows[index[key]].records.append(r)
    labels = [row.label for row in rows]
    for row in rows:                # two different recipes under one name: tell them apart
        if labels.count(row.label) > 1:
            row.label = f"{row.label} ({os.path.basename(row.records[0].folder.path.rstrip('/'))})"
    return rows
