"""The run folder: every path and file name of a run, owned here and nowhere else.

Every command reads or writes run folders through :class:`RunFolder`; the layout below is what
``python train.py RECIPE.yaml`` writes (the README's copy is checked against :data:`LAYOUT` by a
test)::

    recipe.yaml            the resolved recipe (extends and --set applied)
    train.log              what was printed
    metrics.json           teacher/student top-1, params, MACs, latency, history; int8, export
    model-symbol.json      the student (inference graph, logits)
    model-0000.params
    model-int8-symbol.json the int8 student (distill quantize)
    model-int8-0000.params
    pruning-plan.json      channel pruning: which channels each group keeps
    pruning-target.json    pruning.target: the allocated per-group ratios
    checkpoints/           epoch-NNNN.ckpt, written atomically
    tb/                    tensorboardX event files
    export/                distill export: one file set per format, model card
    sensitivity/           distill sensitivity: per-group table, plot, proposal
    qat/                   distill quantize --qat: fine-tuned fp32 pair, ranges, checkpoints
    .teacher/              the teacher's inference pair (model-symbol.json + model-0000.params)
    .cache/                the teacher's cached outputs

Ground floor: imports only :mod:`distill.errors`, :mod:`distill.checkpoint` (atomic writes) and
:mod:`distill.graphio` (pair file names).
"""
import json
import logging
import os
import shutil

import yaml

from .checkpoint import atomic_write_bytes
from .errors import UserError
from .graphio import pair_exists, pair_files

__all__ = ["RunFolder", "LAYOUT", "RECIPE_FILE", "METRICS_FILE", "MODEL", "INT8_SUFFIX",
           "int8_prefix"]
_LOGGER = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
LOG_FILE = "train.log"
PLAN_FILE = "pruning-plan.json"
TARGET_FILE = "pruning-target.json"
MODEL = "model"
INT8_SUFFIX = "-int8"

# (name, what) in the order the README lists them; folders end with "/".
LAYOUT = (
    (RECIPE_FILE, "the resolved recipe (extends and --set applied): rerun it to repeat the run"),
    (LOG_FILE, "everything printed, per-epoch losses and accuracies"),
    (METRICS_FILE, "teacher/student top-1, params, MACs, latency, history; int8 (see below)"),
    (pair_files(MODEL)[0], "the student's inference graph (logits), loadable by MXNet and mxnet2ncnn"),
    (pair_files(MODEL)[1], ""),
    (pair_files(MODEL + INT8_SUFFIX)[0], "the int8 student (distill quantize)"),
    (pair_files(MODEL + INT8_SUFFIX)[1], ""),
    (PLAN_FILE, "channel pruning: which channels each group keeps"),
    (TARGET_FILE, "pruning.target: the per-group ratios allocated to meet it (reused by --resume)"),
    ("checkpoints/", "epoch-NNNN.ckpt (the newest two), each written atomically"),
    ("tb/", "tensorboardX: loss/<term>, loss/total, lr, top1/*, speed/images_per_s, pruning/*"),
    ("export/", "distill export: one file set per format, model card"),
    ("sensitivity/", "distill sensitivity: per-group table, plot, proposal"),
    ("qat/", "distill quantize --qat: fine-tuned fp32 pair, learned ranges, checkpoints"),
    (".teacher/", "the teacher's inference pair (model-symbol.json + model-0000.params)"),
    (".cache/", "the teacher's cached outputs"),
)


def layout_text():
    """The layout as the README shows it (one line per entry)."""
    width = max(len(n) for n, _ in LAYOUT) + 2
    return "".join(f"  {n:<{width}}{w}".rstrip() + "\n" for n, w in LAYOUT)


def int8_prefix(prefix):
    """``runs/x/model`` → ``runs/x/model-int8``."""
    return prefix + INT8_SUFFIX


class RunFolder:
    """One run folder and everything in it.

    Parameters
    ----------
    path : str
        The folder (``output.dir`` or ``runs/<name>``).
    """

    def __init__(self, path):
        self.path = str(path)

    def __repr__(self):
        return f"RunFolder({self.path!r})"

    def file(self, *parts):
        """A path inside the folder."""
        return os.path.join(self.path, *parts)

    # -- files -------------------------------------------------------------------------------
    @property
    def recipe_path(self):
        return self.file(RECIPE_FILE)

    @property
    def metrics_path(self):
        return self.file(METRICS_FILE)

    @property
    def log_path(self):
        return self.file(LOG_FILE)

    @property
    def plan_path(self):
        return self.file(PLAN_FILE)

    @property
    def target_path(self):
        """``pruning.target``'s allocation (per-group ratios)."""
        return self.file(TARGET_FILE)

    @property
    def model_prefix(self):
        """The student's pair (``model-symbol.json`` + ``model-0000.params``)."""
        return self.file(MODEL)

    @property
    def int8_prefix(self):
        """The int8 student's pair written by ``distill quantize``."""
        return int8_prefix(self.model_prefix)

    @property
    def teacher_prefix(self):
        """The teacher's inference pair (``.teacher/model``)."""
        return self.file(".teacher", MODEL)

    @property
    def model_params_path(self):
        return pair_files(self.model_prefix)[1]

    # -- folders -----------------------------------------------------------------------------
    @property
    def checkpoints_dir(self):
        return self.file("checkpoints")

    @property
    def tb_dir(self):
        return self.file("tb")

    @property
    def export_dir(self):
        return self.file("export")

    @property
    def sensitivity_dir(self):
        return self.file("sensitivity")

    @property
    def cache_dir(self):
        return self.file(".cache")

    # -- state -------------------------------------------------------------------------------
    def exists(self):
        return os.path.isdir(self.path)

    def has_model(self):
        """The run finished and wrote its student."""
        return pair_exists(self.model_prefix)

    def has_teacher(self):
        return pair_exists(self.teacher_prefix)

    def has_recipe(self):
        return os.path.isfile(self.recipe_path)

    def read_recipe_dict(self):
        """The resolved recipe as written (a dict); :class:`UserError` when absent."""
        if not self.has_recipe():
            raise UserError(f"{self.path} is not a run folder: it has no {RECIPE_FILE} (the data "
                            f"of every later command come from it). Give the folder `distill "
                            f"train` wrote.")
        with open(self.recipe_path) as f:
            return yaml.safe_load(f)

    def write_recipe_dict(self, rdict):
        atomic_write_bytes(self.recipe_path, yaml.safe_dump(rdict, sort_keys=False).encode())

    def read_metrics(self, default=None):
        """``metrics.json`` as a dict (``default``, else ``{}``, when absent)."""
        return read_json(self.metrics_path, {} if default is None else default)

    def write_metrics(self, metrics):
        """Replace ``metrics.json`` atomically."""
        write_json(self.metrics_path, metrics)

    def merge_metrics(self, **sections):
        """Set top-level sections of ``metrics.json`` (read, update, write atomically)."""
        return merge_json(self.metrics_path, **sections)

    def clear_run_state(self):
        """Remove what a fresh run must not resume from (checkpoints, tb, log, metrics)."""
        shutil.rmtree(self.checkpoints_dir, ignore_errors=True)
        shutil.rmtree(self.tb_dir, ignore_errors=True)
        for f in (self.log_path, self.metrics_path):
            if os.path.exists(f):
                os.unlink(f)


def read_json(path, default=None):
    """A JSON file as data; ``default`` when it does not exist; :class:`UserError` when broken."""
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}); move it away and rerun.") from None


def write_json(path, data):
    """Write ``data`` as indented JSON, atomically."""
    atomic_write_bytes(path, json.dumps(data, indent=2, allow_nan=True).encode())


def merge_json(path, **sections):
    """Read ``path`` (``{}`` when absent), set the given top-level keys, write atomically."""
    data = read_json(path, {})
    data.update(sections)
    write_json(path, data)
    return data
