"""The model to export: found, loaded, reduced to its inference graph, written as a clean pair.

Any MXNet pair exports the same way: the run's student (``RUN_DIR/model``), its teacher
(``RUN_DIR/.teacher/model``), or ``--model PREFIX`` (a pruned or int8 variant, a Module-API
checkpoint with ``arg:``/``aux:`` names). Training-only heads (``SoftmaxOutput`` and other loss
layers, see :func:`distill.graphio.strip_training_head`) and parameters the logits graph does
not use (adapters, auxiliary heads) are removed.
"""
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List

import mxnet as mx

from ..errors import UserError, closest
from ..graphio import SYMBOL_SUFFIX, load_pair, pair_files, symbol_file
from ..runfolder import RunFolder

__all__ = ["Source", "resolve_prefix", "load_source", "write_inference_pair", "file_sha256"]
_LOGGER = logging.getLogger(__name__)


@dataclass
class Source:
    """The model being exported.

    Attributes
    ----------
    prefix, epoch : str, int
        Where it was read from (``PREFIX-symbol.json``, ``PREFIX-%04d.params``).
    kind : str
        ``student`` (the run's model), ``teacher`` (the run's teacher) or ``model`` (``--model``).
    symbol : mx.sym.Symbol
        The logits graph.
    params : dict
        name → NDArray, exactly the graph's arguments and auxiliary states.
    input_name : str
        The graph's input variable (written as ``data`` in the exported pair).
    removed_head : list of str
        Ops of the training-only head layers that were stripped (outermost first).
    removed_params : list of str
        Parameters in the file that the logits graph does not use.
    sha256 : str
        Of the source params file (identifies the model in the model card).
    """
    prefix: str
    epoch: int
    kind: str
    symbol: object
    params: Dict[str, object]
    input_name: str = "data"
    removed_head: List[str] = field(default_factory=list)
    removed_params: List[str] = field(default_factory=list)
    sha256: str = ""

    @property
    def params_file(self):
        return f"{self.prefix}-{self.epoch:04d}.params"


def file_sha256(path):
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_prefix(run_dir, model=None):
    """``(prefix, kind)`` of the model to export.

    ``None`` → the run's student ``RUN_DIR/model``; ``"teacher"`` → ``RUN_DIR/.teacher/model``;
    otherwise a prefix, relative to the current folder or else to ``run_dir``.
    """
    folder = RunFolder(run_dir)
    if model is None:
        return folder.model_prefix, "student"
    if model == "teacher":
        return folder.teacher_prefix, "teacher"
    prefix = model
    m = re.match(r"^(.*?)(" + re.escape(SYMBOL_SUFFIX) + r"|-\d{4}\.params)$", prefix)
    if m:
        raise UserError(f"--model {model}: give the prefix, not a file name: --model {m.group(1)}"
                        f" (with --epoch for PREFIX-NNNN.params).")
    if not os.path.isfile(symbol_file(prefix)) and not os.path.isabs(prefix):
        cand = os.path.join(run_dir, prefix)
        if os.path.isfile(symbol_file(cand)):
            prefix = cand
    return prefix, "model"


def load_source(prefix, epoch=0, kind="model", logits=None, input_name="data"):
    """Read the pair at ``prefix`` and reduce it to its logits graph.

    Raises
    ------
    UserError
        A missing or unreadable file, or a ``--logits`` layer that is not in the graph.
    """
    what = {"student": "the run's model", "teacher": "the run's teacher", "model": "--model"}[kind]
    sym_file, params_file = pair_files(prefix, epoch)
    for f in (sym_file, params_file):
        if not os.path.isfile(f):
            hint = {"student": " Has the run finished? `distill train` writes it at the end.",
                    "teacher": " Only runs with a teacher have one (RUN_DIR/.teacher/).",
                    "model": f" --model is a prefix: {symbol_file('PREFIX')} and PREFIX-{epoch:04d}.params "
                             f"must exist (check --epoch)."}[kind]
            raise UserError(f"{what}: {f} does not exist.{hint}")
    if logits:
        names = [n[:-len("_output")] if n.endswith("_output") else n
                 for n in mx.sym.load(sym_file).get_internals().list_outputs()]
        if logits not in names:
            near = closest(logits, names)
            raise UserError(f"--logits {logits}: no such layer in {sym_file}. Closest: "
                            f"{', '.join(near) or 'none'} (`distill inspect` lists every layer).")
    symbol, params = load_pair(prefix, epoch, logits)
    removed_head = []                     # what strip_training_head took off, outermost first
    head = mx.sym.load(sym_file)
    head = head[0] if len(head.list_outputs()) > 1 else head
    target = symbol.list_outputs()[0]
    while not logits and head.list_outputs()[0] != target and head.get_children() is not None:
        removed_head.append(_op_of(head))
        head = head.get_children()[0]
    if input_name not in symbol.list_arguments():
        raise UserError(f"{what} ({sym_file}): the graph has no input variable {input_name!r}; its "
                        f"variables start with {', '.join(symbol.list_arguments()[:5])}. Pass "
                        f"--input-name.")
    needed = set(symbol.list_arguments()) | set(symbol.list_auxiliary_states())
    needed.discard(input_name)
    removed_params = sorted(set(params) - needed)
    params = {k: v for k, v in params.items() if k in needed}
    return Source(prefix=prefix, epoch=epoch, kind=kind, symbol=symbol, params=params,
                  input_name=input_name, removed_head=removed_head, removed_params=removed_params,
                  sha256=file_sha256(params_file))


def _op_of(sym):
    graph = json.loads(sym.tojson())
    return graph["nodes"][graph["heads"][0][0]]["op"]


def write_inference_pair(source, prefix):
    """Write ``prefix-symbol.json`` + ``prefix-0000.params``: logits only, input named ``data``.

    Parameter names carry ``arg:``/``aux:`` as ``HybridBlock.export`` writes them, so the pair
    loads with ``gluon.SymbolBlock.imports``, ``mx.model.load_checkpoint`` (Module API),
    ncnn's ``mxnet2ncnn`` and MXNet Model Server alike.
    """
    graph = json.loads(source.symbol.tojson())
    if source.input_name != "data":
        names = {n["name"] for n in graph["nodes"]}
        if "data" in names:
            raise UserError(f"{source.prefix}: the input is {source.input_name!r} and another node is "
                            f"already called 'data'; the exported graph needs its input named 'data'.")
        for n in graph["nodes"]:
            if n["op"] == "null" and n["name"] == source.input_name:
                n["name"] = "data"
    sym = mx.sym.load_json(json.dumps(graph))
    args = set(sym.list_arguments())
    aux = set(sym.list_auxiliary_states())
    save = {}
    for k, v in source.params.items():
        if k in aux:
            save["aux:" + k] = v.as_in_context(mx.cpu())
        elif k in args:
            save["arg:" + k] = v.as_in_context(mx.cpu())
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    sym_file, par_file = pair_files(prefix)
    sym.save(sym_file)
    mx.nd.save(par_file, save)
    return prefix
