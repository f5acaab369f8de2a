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

A finished run is reused (benches, slow tests, ``distill compare``, ``teacher.recipe``) only
when :func:`reuse_check` says so: complete, the same recipe hash, and written by the same tool
(the :func:`tool_provenance` recorded in ``metrics.json`` under :data:`PROVENANCE_KEY`).

Ground floor: imports only :mod:`distill.errors`, :mod:`distill.checkpoint` (atomic writes),
:mod:`distill.graphio` (pair file names) and the package's ``__version__``.
"""
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess

import yaml

from . import __version__
from .checkpoint import atomic_write_bytes
from .errors import UserError
from .graphio import pair_exists, pair_files

__all__ = ["RunFolder", "LAYOUT", "RECIPE_FILE", "METRICS_FILE", "MODEL", "INT8_SUFFIX",
           "PROVENANCE_KEY", "int8_prefix", "tool_provenance", "reuse_check", "source_hash"]
_LOGGER = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
LOG_FILE = "train.log"
PLAN_FILE = "pruning-plan.json"
TARGET_FILE = "pruning-target.json"
MODEL = "model"
INT8_SUFFIX = "-int8"
#: the section of ``metrics.json`` saying which tool wrote the run (:func:`tool_provenance`)
PROVENANCE_KEY = "provenance"

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

    def is_complete(self):
        """The run finished: its student is written and ``metrics.json`` is marked complete
        (whatever recipe or tool wrote it: :func:`reuse_check` says whether it may be reused)."""
        return self.has_model() and bool(self.read_metrics().get("complete"))

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


# -- provenance and reuse -------------------------------------------------------------------------
#: the tool's source, relative to its checkout: uncommitted changes here make a run's code differ
#: from its commit (tests, benches, docs and recipes do not: the recipe hash covers the recipe)
SOURCE_PATHS = ("distill", "students", "train.py")
#: inside :data:`SOURCE_PATHS`, code that decides which runs to make and reports them but does
#: not shape what a run holds: editing it keeps every run reusable
REPORT_ONLY_PATHS = ("distill/compare",)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _git(root, *args):
    """``git -C root ARGS``'s stdout (bytes), ``None`` on any failure (no git, not a checkout).
    ``GIT_OPTIONAL_LOCKS=0``: only looks, never refreshes the index of a checkout others use."""
    try:
        res = subprocess.run(("git", "-C", root) + args, capture_output=True, timeout=30,
                             stdin=subprocess.DEVNULL, env=dict(os.environ, GIT_OPTIONAL_LOCKS="0"))
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def _checkout_root(package_dir):
    """The folder above ``package_dir`` when the package is tracked in a git checkout there (not
    merely inside some checkout, as a virtualenv's site-packages in a repo), else ``None``."""
    root = os.path.dirname(package_dir)
    init = os.path.join(os.path.basename(package_dir), "__init__.py")
    return root if _git(root, "ls-files", "--error-unmatch", "--", init) is not None else None


def source_state(package_dir=_PACKAGE_DIR, paths=SOURCE_PATHS):
    """``(commit, dirty, source_diff)`` of the git checkout the package at ``package_dir`` lives in.

    ``dirty``: the tool's source (``paths``, relative to the checkout) differs from ``commit``
    (edits or untracked files); ``source_diff``: a short hash of those differences (``None`` when
    clean). All three are ``None`` outside a git checkout (an installed package, no ``git``).
    """
    root = _checkout_root(package_dir)
    if root is None:
        return None, None, None
    head = _git(root, "rev-parse", "--verify", "HEAD")
    if head is None:
        return None, None, None
    paths = [p for p in paths if os.path.exists(os.path.join(root, p))]
    diff = _git(root, "diff", "HEAD", "--binary", "--no-ext-diff", "--no-textconv", "--", *paths)
    others = _git(root, "ls-files", "-z", "--others", "--exclude-standard", "--", *paths)
    if diff is None or others is None:
        return head.decode().strip(), None, None
    if not diff and not others:
        return head.decode().strip(), False, None
    h = hashlib.sha256(diff)
    for rel in sorted(filter(None, others.decode(errors="surrogateescape").split("\0"))):
        h.update(b"\0" + rel.encode(errors="surrogateescape") + b"\0")
        try:
            with open(os.path.join(root, rel), "rb") as f:
                h.update(f.read())
        except OSError:
            pass
    return head.decode().strip(), True, h.hexdigest()[:12]


def source_hash(package_dir=_PACKAGE_DIR, paths=SOURCE_PATHS, report_only=REPORT_ONLY_PATHS):
    """A short hash of the tool's source as it is on disk: every tracked or untracked
    (not ignored) file under ``paths`` except ``report_only``, by path and git blob id. Equal
    hashes mean the same code whatever the commit, so a commit that touches only docs, tests,
    recipes or the comparison's reports keeps runs reusable. ``None`` outside a git checkout."""
    root = _checkout_root(package_dir)
    if root is None:
        return None
    paths = [p for p in paths if os.path.exists(os.path.join(root, p))]
    spec = paths + [f":(exclude){p}" for p in report_only]
    listed = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *spec)
    if listed is None:
        return None
    files = sorted({f for f in listed.decode(errors="surrogateescape").split("\0")
                    if f and os.path.isfile(os.path.join(root, f))})
    if not files:
        return None
    try:
        res = subprocess.run(("git", "-C", root, "hash-object", "--no-filters", "--stdin-paths"),
                             input="\n".join(files).encode(errors="surrogateescape"),
                             capture_output=True, timeout=60, env=dict(os.environ, GIT_OPTIONAL_LOCKS="0"))
    except (OSError, subprocess.SubprocessError):
        return None
    blobs = res.stdout.decode().split() if res.returncode == 0 else []
    if len(blobs) != len(files):
        return None
    h = hashlib.sha256()
    for f, b in zip(files, blobs):
        h.update(f.encode(errors="surrogateescape") + b"\0" + b.encode() + b"\n")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _tool_provenance():
    commit, dirty, source_diff = source_state()
    return (("version", __version__), ("commit", commit), ("dirty", dirty),
            ("source_diff", source_diff), ("source", source_hash()))


def tool_provenance():
    """What this process's tool is, as recorded in a finished run's ``metrics.json``.

    Computed once per process (four ``git`` calls, milliseconds; never fails: without git or
    outside a checkout, the version alone).

    Returns
    -------
    dict
        ``version`` (``distill.__version__``), ``commit`` (``git rev-parse HEAD`` of the
        checkout the package lives in, or ``None``), ``dirty`` (uncommitted changes to the
        tool's source, :data:`SOURCE_PATHS`), ``source_diff`` (a hash of those changes) and
        ``source`` (:func:`source_hash`, what reuse compares).
    """
    return dict(_tool_provenance())


def _short(commit):
    return commit[:12] if commit else "none (not a git checkout)"


def describe_provenance(p):
    """``distill 0.1.0, commit 0123456789ab`` (+ ``with uncommitted changes …``)."""
    text = f"distill {p.get('version')}, commit {_short(p.get('commit'))}"
    return text + (f" with uncommitted changes (source diff {p.get('source_diff')})"
                   if p.get("dirty") else "")


def provenance_change(old, now):
    """How the tool that wrote a run (``old``) differs from ``now``: a clause, ``None`` when the
    same. A commit with uncommitted changes to the tool's source matches only the very same
    changes (same ``source_diff``): within one development session an unchanged tree reuses its
    runs, an edit to the source does not.

    Where both record ``source`` (:func:`source_hash`), it alone decides after the version: the
    same code under another commit (a commit of docs, tests, recipes or reports) is the same
    tool."""
    if old.get("version") != now.get("version"):
        return f"distill {old.get('version')} (now {now.get('version')})"
    if old.get("source") and now.get("source"):
        if old["source"] == now["source"]:
            return None
        return (f"{describe_provenance(old)} whose source differs from now's (source "
                f"{old['source']}, now {now['source']}: {describe_provenance(now)})")
    if old.get("commit") != now.get("commit"):
        return f"commit {_short(old.get('commit'))} (now {_short(now.get('commit'))})"
    if bool(old.get("dirty")) != bool(now.get("dirty")) or old.get("source_diff") != now.get("source_diff"):
        c = _short(now.get("commit"))
        if not old.get("dirty"):
            return f"commit {c} without uncommitted changes (now with changes to the tool's source)"
        if not now.get("dirty"):
            return f"commit {c} with uncommitted changes to the tool's source (now without)"
        return (f"commit {c} with other uncommitted changes to the tool's source (source diff "
                f"{old.get('source_diff')}, now {now.get('source_diff')})")
    return None


def _flat(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _recipe_changes(folder, recipe_dict, limit=4):
    """``trainer.epochs 1 → 2, …``: the keys of ``recipe_dict`` that differ from the folder's
    recipe (``output`` left out: where a run goes is not what it trains)."""
    try:
        old = folder.read_recipe_dict() if folder.has_recipe() else None
    except (UserError, yaml.YAMLError):
        old = None
    if not isinstance(old, dict):
        return ""
    a, b = _flat({k: v for k, v in old.items() if k != "output"}), \
        _flat({k: v for k, v in recipe_dict.items() if k != "output"})
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]

    def val(d, k):
        return json.dumps(d[k]) if k in d else "unset"
    items = [f"{k} {val(a, k)} → {val(b, k)}" for k in keys[:limit]]
    more = f", and {len(keys) - limit} more" if len(keys) > limit else ""
    return f": {', '.join(items)}{more}" if items else ""


def reuse_check(run_dir, recipe_hash, recipe_dict=None):
    """May the run in ``run_dir`` stand for a run of the recipe hashing to ``recipe_hash``?

    The one rule every reuse follows (``distill compare``, ``teacher.recipe``, benches, slow
    tests): the folder holds a complete run (student written, ``metrics.json`` marked complete)
    of the same recipe hash, written by the same tool (:func:`provenance_change` of the
    recorded :data:`PROVENANCE_KEY` and :func:`tool_provenance` is ``None``). A run written
    before provenance was recorded is not reused.

    Parameters
    ----------
    run_dir : str
    recipe_hash : str
        :func:`distill.recipe.recipe_hash` of the recipe the caller would run.
    recipe_dict : dict, optional
        That recipe as plain data (:func:`distill.recipe.recipe_to_dict`): a refusal then names
        the keys that changed.

    Returns
    -------
    ok : bool
    reason : str
        One clause starting with the folder: why it is reused, or what changed.
    """
    folder = RunFolder(run_dir)
    path = folder.path
    m = folder.read_metrics() if folder.has_model() else {}
    if not m.get("complete"):                  # what RunFolder.is_complete says, metrics read once
        return False, f"{path} holds no complete run"
    if m.get("recipe_hash") != recipe_hash:
        changes = _recipe_changes(folder, recipe_dict) if recipe_dict is not None else ""
        return False, (f"{path} was trained from another recipe (hash {m.get('recipe_hash')}, "
                       f"now {recipe_hash}){changes}")
    old, now = m.get(PROVENANCE_KEY), tool_provenance()
    if not isinstance(old, dict):
        return False, (f"{path} records no provenance (written before runs recorded the tool's "
                       f"version and commit; now {describe_provenance(now)})")
    change = provenance_change(old, now)
    if change:
        return False, f"{path} was written by {change}"
    return True, f"{path} is complete, same recipe, same tool ({describe_provenance(now)})"
