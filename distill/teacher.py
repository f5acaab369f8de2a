"""The teacher: loaded from files or trained by a recipe, frozen, inference only.

Sources (``teacher:`` section, exactly one):

* ``checkpoint: PREFIX`` + ``epoch``: a Module-API checkpoint (``PREFIX-symbol.json`` +
  ``PREFIX-0000.params`` with ``arg:``/``aux:`` names) or a Gluon ``export()`` pair.
  Training-only heads (``SoftmaxOutput`` and other loss layers) are stripped to logits.
* ``recipe: OTHER.yaml``: trained from another recipe into that recipe's run folder, and reused
  from there while the recipe is unchanged (its hash is stored in the run's ``metrics.json``).
* ``model: NAME`` + ``params: FILE``: a registered model with a ``save_parameters`` file.
"""
import json
import logging
import os
import warnings

import mxnet as mx
from mxnet import gluon

from .errors import UserError, closest

__all__ = ["Teacher", "load_teacher", "strip_training_head", "load_symbol_checkpoint"]
_LOGGER = logging.getLogger(__name__)

# Output ops that exist for training only: the logits are their first input.
_HEAD_OPS = {"SoftmaxOutput", "Softmax", "SoftmaxActivation", "softmax", "log_softmax",
             "LogisticRegressionOutput", "LinearRegressionOutput", "MAERegressionOutput",
             "SVMOutput", "MakeLoss", "make_loss", "BlockGrad", "stop_gradient"}


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
        from .taps import resolve_tap
        self.symbol = symbol
        self.params = params
        self.source = source
        self.input_name = input_name
        self.taps = list(taps)
        self.net = make_block(symbol, params, input_name, trainable=False)
        self.net.hybridize(static_alloc=True)
        outs = [symbol] + [resolve_tap(symbol, t, where) for t in self.taps]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.tapped = gluon.SymbolBlock(mx.sym.Group(outs), mx.sym.var(input_name),
                                            params=self.net.collect_params())
        self.tapped.hybridize(static_alloc=True)

    def outputs(self, x):
        """``[logits] + taps`` for the batch ``x`` (always a list)."""
        out = self.tapped(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def __call__(self, x):
        return self.net(x)


def make_block(symbol, params, input_name="data", trainable=True):
    """A SymbolBlock over ``symbol`` with (a copy of) ``params``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = gluon.SymbolBlock(symbol, mx.sym.var(input_name))
    for name, p in net.collect_params().items():
        if p.shape is None:      # JSON without shapes: _load_init would leave it unset (resume, count_params)
            p.shape = tuple(params[name].shape)
        p._load_init(params[name].copy(), mx.cpu())
        if not trainable:
            p.grad_req = "null"
    return net


def _op_of_head(sym):
    graph = json.loads(sym.tojson())
    return graph["nodes"][graph["heads"][0][0]]["op"]


def strip_training_head(sym, output=None, where="teacher"):
    """Return the logits of ``sym``: the named internal ``output``, or the graph with its
    training-only head layers (``SoftmaxOutput``, loss layers) removed."""
    if output:
        internals = sym.get_internals()
        names = internals.list_outputs()
        key = output if output in names else output + "_output"
        if key not in names:
            near = closest(output, [n[:-7] if n.endswith("_output") else n for n in names])
            raise UserError(f"{where}: `teacher.output: {output}` is not a layer of the graph. "
                            f"Closest: {', '.join(near) or 'none'}.")
        return internals[key]
    if len(sym.list_outputs()) > 1:
        sym = sym[0]
    while _op_of_head(sym) in _HEAD_OPS:
        sym = sym.get_children()[0]
    return sym


def load_symbol_checkpoint(prefix, epoch=0, output=None):
    """Read ``PREFIX-symbol.json`` + ``PREFIX-%04d.params`` → (logits symbol, params dict)."""
    sym_file, params_file = f"{prefix}-symbol.json", f"{prefix}-{epoch:04d}.params"
    for f in (sym_file, params_file):
        if not os.path.isfile(f):
            raise UserError(f"teacher checkpoint file {f} does not exist. `teacher.checkpoint` is "
                            f"a prefix: PREFIX-symbol.json and PREFIX-{epoch:04d}.params must exist "
                            f"(check `teacher.epoch`).")
    try:
        sym = mx.sym.load(sym_file)
    except mx.base.MXNetError as e:
        raise UserError(f"{sym_file} is not a valid MXNet symbol file: {str(e).splitlines()[0]}") from None
    try:
        raw = mx.nd.load(params_file)
    except mx.base.MXNetError as e:
        raise UserError(f"{params_file} is not a valid MXNet params file: {str(e).splitlines()[0]}") from None
    params = {}
    for k, v in raw.items():
        params[k.split(":", 1)[1] if k.startswith(("arg:", "aux:")) else k] = v
    logits = strip_training_head(sym, output, where=sym_file)
    # parameters of the stripped part (a loss head, layers after `teacher.output`) are expected
    # leftovers; any other name in the file is an error check_params reports
    full = set(sym.list_arguments()) | set(sym.list_auxiliary_states())
    kept = set(logits.list_arguments()) | set(logits.list_auxiliary_states())
    params = {k: v for k, v in params.items() if k in kept or k not in full}
    return logits, params


def check_params(sym, params, input_name, input_shape, where):
    """Missing, extra or shape-mismatched parameters → :class:`UserError` naming them."""
    needed = [n for n in sym.list_arguments() if n != input_name] + sym.list_auxiliary_states()
    missing = [n for n in needed if n not in params]
    if missing:
        raise UserError(f"{where}: the graph needs parameters the params file does not have: "
                        f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}. Is the "
                        f"params file from the same model and epoch?")
    extra = sorted(set(params) - set(needed))
    if extra:
        raise UserError(f"{where}: the params file has parameters the graph does not use: "
                        f"{', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}. Is it the params "
                        f"file of another model? Pair PREFIX-symbol.json with its own PREFIX-NNNN.params.")
    try:
        arg_shapes, out_shapes, aux_shapes = sym.infer_shape(**{input_name: input_shape})
    except mx.base.MXNetError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"{where}: the graph does not accept input of shape {input_shape} "
                        f"(channels, size from the data): {first}. Set `data.grayscale`, "
                        f"`data.image_size` so the input matches what the teacher was trained on.") from None
    names = sym.list_arguments() + sym.list_auxiliary_states()
    for n, s in zip(names, list(arg_shapes) + list(aux_shapes)):
        if n == input_name:
            continue
        if tuple(params[n].shape) != tuple(s):
            hint = ""
            if n.endswith("weight") and len(s) == 4 and s[1] != params[n].shape[1]:
                hint = (f" The first convolution expects {params[n].shape[1]} input channels: "
                        f"set `data.grayscale` to match.")
            raise UserError(f"{where}: parameter {n!r} has shape {tuple(params[n].shape)} in the "
                            f"params file but the graph, fed {input_shape}, needs {tuple(s)}.{hint}")
    return tuple(out_shapes[0])


def load_teacher(cfg, data, recipe_dir=".", taps=()):
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
    """
    input_shape = (1, data.channels) + tuple(data.image_size)
    if cfg.input_shape and tuple(cfg.input_shape) != input_shape[1:]:
        raise UserError(f"`teacher.input_shape: {cfg.input_shape}` (what the teacher was trained on) "
                        f"differs from the data's {list(input_shape[1:])} (channels, height, width): "
                        f"set `data.grayscale` for the channels and `data.image_size` for the size.")
    if cfg.recipe:
        prefix, source = _teacher_from_recipe(cfg.recipe, recipe_dir)
        sym, params = load_symbol_checkpoint(prefix, 0)
    elif cfg.checkpoint:
        prefix = _resolve(cfg.checkpoint + "-symbol.json", recipe_dir)[:-len("-symbol.json")]
        sym, params = load_symbol_checkpoint(prefix, cfg.epoch, cfg.output)
        source = f"checkpoint {prefix} (epoch {cfg.epoch})"
    elif cfg.model:
        sym, params, source = _teacher_from_model(cfg, data, recipe_dir)
    else:
        raise UserError("teacher: no teacher given (`teacher.recipe`, `teacher.checkpoint` or `teacher.model`).")
    out_shape = check_params(sym, params, cfg.input_name, input_shape, where=f"teacher ({source})")
    if len(out_shape) != 2 or out_shape[1] != data.num_classes:
        raise UserError(f"teacher ({source}) outputs shape {out_shape} per batch, but the data "
                        f"`{data.name}` has {data.num_classes} classes: the teacher's head must "
                        f"have one logit per class (or name the logits layer with `teacher.output`).")
    return Teacher(sym, params, source, cfg.input_name, taps=taps,
                   where="distillation[].teacher_layer")


def _resolve(path, recipe_dir):
    cand = os.path.join(recipe_dir, path)
    return cand if not os.path.isabs(path) and os.path.exists(cand) else path


def _teacher_from_recipe(path, recipe_dir):
    from .recipe import load_recipe, recipe_hash
    from .run import run_training
    rpath = _resolve(path, recipe_dir)
    if not os.path.isfile(rpath):
        raise UserError(f"`teacher.recipe: {path}` does not exist (looked in {recipe_dir} and the "
                        f"current folder).")
    trecipe = load_recipe(rpath)
    prefix = os.path.join(trecipe.run_dir, "model")
    metrics_file = os.path.join(trecipe.run_dir, "metrics.json")
    h = recipe_hash(trecipe)
    cached = False
    if os.path.isfile(metrics_file) and os.path.isfile(prefix + "-0000.params"):
        with open(metrics_file) as f:
            m = json.load(f)
        cached = m.get("recipe_hash") == h and m.get("complete")
    if cached:
        _LOGGER.info("teacher: reusing the trained teacher in %s (recipe unchanged)", trecipe.run_dir)
    else:
        _LOGGER.info("teacher: training it from %s into %s (cached there for later runs)", rpath, trecipe.run_dir)
        run_training(trecipe, resume="auto", role="teacher")
    return prefix, f"recipe {path} ({trecipe.run_dir})"


def _teacher_from_model(cfg, data, recipe_dir):
    from students import build_student
    if not cfg.params:
        raise UserError(f"`teacher.model: {cfg.model}` needs `teacher.params` (a .params file "
                        f"written by save_parameters).")
    pfile = _resolve(cfg.params, recipe_dir)
    if not os.path.isfile(pfile):
        raise UserError(f"`teacher.params: {cfg.params}` does not exist.")
    from students import STUDENTS
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
    params = {p.name: p.data() for p in net.collect_params().values()}
    return sym, params, f"model {cfg.model} + {cfg.params}"
