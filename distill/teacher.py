"""The teacher: loaded from files or trained by a recipe, frozen, inference only.

Sources (``teacher:`` section, exactly one):

* ``checkpoint: PREFIX`` + ``epoch``: a Module-API checkpoint (``PREFIX-symbol.json`` +
  ``PREFIX-0000.params`` with ``arg:``/``aux:`` names) or a Gluon ``export()`` pair.
  Training-only heads (``SoftmaxOutput`` and other loss layers) are stripped to logits.
* ``recipe: OTHER.yaml``: trained from another recipe into that recipe's run folder, and reused
  from there while the recipe and the tool (version, commit) are unchanged
  (:func:`distill.runfolder.reuse_check`). The run (:func:`distill.run.teacher_recipe_prefix`)
  does that and hands this module the trained pair's prefix: the teacher does not train.
* ``model: NAME`` + ``params: FILE``: a registered model with a ``save_parameters`` file.

A loaded pair is normalised by :func:`distill.graphio.load_pair` (:mod:`distill.graphnorm`).
A graph that normalises its input itself (a leading ``_minus_scalar``/``_mul_scalar`` …, or
a BatchNorm on raw pixels) gets a warning naming the ``data.mean``/``data.std`` that feed it
what it expects, unless the recipe already uses them.
"""
import json
import logging
import os
import warnings

import mxnet as mx
from mxnet import gluon

from students import STUDENTS, build_student

from .errors import UserError
from .graphio import SYMBOL_SUFFIX, check_params, load_pair, make_block, params_file, symbol_file
from .graphnorm import format_values, input_normalisation
from .replicas import first
from .taps import resolve_tap
from .teacher_cache import digest

__all__ = ["Teacher", "load_teacher", "warn_input_normalisation", "resolve_path", "checkpoint_prefix"]
_LOGGER = logging.getLogger(__name__)


class Teacher:
    """A frozen teacher network.

    Attributes
    ----------
    net : gluon.SymbolBlock
        Logits-only graph, hybridized, all parameters ``grad_req='null'``.
    tapped : gluon.SymbolBlock
        The same graph (shared parameters) returning ``[logits] + taps``.
    symbol : mx.sym.Symbol
        The logits graph (for inspection and ``student.from: teacher``).
    params : dict
        name → NDArray (``arg`` and ``aux`` merged).
    source : str
        Where it came from (for reports).
    """

    def __init__(self, symbol, params, source, input_name="data", taps=(), where="teacher_layer"):
        self.symbol = symbol
        self.params = params
        self.source = source
        self.input_name = input_name
        self.taps = list(taps)
        self._digest = None
        self.net = make_block(symbol, params, input_name, trainable=False)
        self.net.hybridize(static_alloc=True)
        outs = [symbol] + [resolve_tap(symbol, t, where) for t in self.taps]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.tapped = gluon.SymbolBlock(mx.sym.Group(outs), mx.sym.var(input_name),
                                            params=self.net.collect_params())
        self.tapped.hybridize(static_alloc=True)

    def digest(self):
        """A hex digest of what this teacher computes: its graph, taps and parameters (the key
        of :class:`~distill.teacher_cache.SharedCache` entries)."""
        if self._digest is None:
            names = sorted(self.params)
            self._digest = digest("teacher", self.symbol.tojson(), json.dumps(self.taps),
                                  self.input_name, json.dumps(names),
                                  (self.params[n].asnumpy() for n in names))
        return self._digest

    def reset_ctx(self, ctx):
        """Place the frozen parameters on ``ctx`` (a context or a list of them), so that a
        data-parallel loop runs each slice's teacher pass on the slice's own device. The
        teacher is never updated, so its replicas stay identical."""
        self.net.collect_params().reset_ctx(ctx)        # ``tapped`` shares these parameters

    def outputs(self, x):
        """``[logits] + taps`` for the batch ``x`` (always a list), on ``x``'s device."""
        out = self.tapped(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def __call__(self, x):
        return self.net(x)


def load_teacher(cfg, data, recipe_dir=".", taps=(), trained=None):
    """Build the frozen :class:`Teacher` for the ``teacher:`` section ``cfg``.

    Parameters
    ----------
    cfg : TeacherConfig
    data : DataBundle
        Gives input shape and class count, which the teacher must match.
    recipe_dir : str
        Relative ``teacher.recipe``/``checkpoint`` paths are resolved against it first.
    taps : list of str
        Internal layers the loss terms read (``teacher_layer``).
    trained : (str, str), optional
        ``(prefix, source)`` of the pair trained from ``teacher.recipe``
        (:func:`distill.run.teacher_recipe_prefix`); required when ``cfg.recipe`` is set.
    """
    input_shape = (1, data.channels) + tuple(data.image_size)
    if cfg.input_shape and tuple(cfg.input_shape) != input_shape[1:]:
        raise UserError(f"`teacher.input_shape: {cfg.input_shape}` (what the teacher was trained on) "
                        f"differs from the data's {list(input_shape[1:])} (channels, height, width): "
                        f"set `data.grayscale` for the channels and `data.image_size` for the size.")
    if cfg.recipe:
        if trained is None:
            raise UserError(f"`teacher.recipe: {cfg.recipe}` must be trained first: run the recipe "
                            f"with `distill train` (it trains and caches the teacher), or give "
                            f"`teacher.checkpoint`.")
        prefix, source = trained
        sym, params = load_pair(prefix, 0)
    elif cfg.checkpoint:
        prefix = checkpoint_prefix(cfg.checkpoint, recipe_dir)
        sym, params = load_pair(prefix, cfg.epoch, cfg.output, hint=(
            f"`teacher.checkpoint` is a prefix: {symbol_file('PREFIX')} and "
            f"{params_file('PREFIX', cfg.epoch)} must exist (check `teacher.epoch`)."))
        source = f"checkpoint {prefix} (epoch {cfg.epoch})"
    elif cfg.model:
        sym, params, source = _teacher_from_model(cfg, data, recipe_dir)
    else:
        raise UserError("teacher: no teacher given (`teacher.recipe`, `teacher.checkpoint` or `teacher.model`).")
    out_shape = check_params(sym, params, cfg.input_name, input_shape, where=f"teacher ({source})")
    warn_input_normalisation(sym, params, data, cfg.input_name, f"teacher ({source})")
    if len(out_shape) != 2 or out_shape[1] != data.num_classes:
        raise UserError(f"teacher ({source}) outputs shape {out_shape} per batch, but the data "
                        f"`{data.name}` has {data.num_classes} classes: the teacher's head must "
                        f"have one logit per class (or name the logits layer with `teacher.output`).")
    return Teacher(sym, params, source, cfg.input_name, taps=taps,
                   where="distillation[].teacher_layer")


def warn_input_normalisation(sym, params, data, input_name="data", where="teacher"):
    """Warn when the graph normalises its input itself (``(x - 127.5) * 0.0078125``, a
    BatchNorm on raw pixels) and the data's ``mean``/``std`` would normalise a second time.

    Returns
    -------
    InputNormalisation or None
        What the graph does (``None``: nothing recognised).
    """
    norm = input_normalisation(sym, params, input_name)
    if norm is not None and not norm.matches(data.mean, data.std):
        _LOGGER.warning("%s: %s (the data `%s` now use mean %s, std %s).", where, norm.advice(),
                        data.name, format_values(data.mean), format_values(data.std))
    return norm


def checkpoint_prefix(prefix, recipe_dir):
    """A ``teacher.checkpoint`` prefix, relative ones resolved as :func:`resolve_path` resolves
    its symbol file."""
    return resolve_path(symbol_file(prefix), recipe_dir)[:-len(SYMBOL_SUFFIX)]


def resolve_path(path, recipe_dir):
    """A relative recipe path: against the recipe's folder when it exists there, else as given."""
    cand = os.path.join(recipe_dir, path)
    return cand if not os.path.isabs(path) and os.path.exists(cand) else path


def _teacher_from_model(cfg, data, recipe_dir):
    if not cfg.params:
        raise UserError(f"`teacher.model: {cfg.model}` needs `teacher.params` (a .params file "
                        f"written by save_parameters).")
    pfile = resolve_path(cfg.params, recipe_dir)
    if not os.path.isfile(pfile):
        raise UserError(f"`teacher.params: {cfg.params}` does not exist.")
    if cfg.model in STUDENTS:
        net = build_student(cfg.model, data.channels, data.num_classes, tuple(data.image_size))
    else:                      # any GluonCV model-zoo name, built as trained (no adaptation)
        from gluoncv.model_zoo import get_model
        try:
            net = get_model(cfg.model, pretrained=False, classes=data.num_classes)
        except ValueError as e:
            raise UserError(f"`teacher.model: {cfg.model}` is neither a registered student nor a "
                            f"GluonCV model-zoo name ({str(e).splitlines()[0][:200]}).") from None
    try:
        net.load_parameters(pfile, ctx=mx.cpu())
    except (AssertionError, mx.base.MXNetError) as e:
        raise UserError(f"`teacher.params: {cfg.params}` does not fit `teacher.model: {cfg.model}` "
                        f"with {data.channels} channels and {data.num_classes} classes: "
                        f"{str(e).splitlines()[0]}") from None
    net.hybridize()
    sym = net(mx.sym.var(cfg.input_name))
    params = {p.name: first(p) for p in net.collect_params().values()}
    return sym, params, f"model {cfg.model} + {cfg.params}"
