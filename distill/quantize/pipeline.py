"""Int8 calibration of a run folder (or a model prefix), end to end.

For each model (the run's student ``RUN_DIR/model``, and the dense teacher
``RUN_DIR/.teacher/model`` when the run has one):

1. calibration images: ``calib_batches × calib_batch_size`` images of the recipe's train split,
   chosen by ``trainer.seed`` (:func:`~distill.quantize.calibrators.calibration_indices`), read
   one calibration batch at a time, without augmentation;
2. thresholds: one pass of the oneDNN-fused fp32 graph over them (``naive`` or ``entropy``);
3. the exclusion policy picks the fp32 layers, scoring variants on the held-out split;
4. export ``model-int8-symbol.json`` + ``model-int8-0000.params`` next to the fp32 model, reload
   it alone, and measure its top-1 and its latency against the fused fp32 graph;
   then, with ``layer_latency``, every weight layer alone (:mod:`.layer_speed`);
5. ``metrics.json`` gets an ``int8`` section (the teacher's under ``int8.teacher``), written
   atomically;
6. with ``quantization.qat`` (``--qat``), the student is then fine-tuned fake-quantized from that
   calibration, distilled from the fp32 teacher (:mod:`.qat`), and ``model-int8-*`` becomes the
   QAT model; the section gets ``method: qat`` with the PTQ figures beside it (``int8.ptq``).
"""
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, Optional

from ..data import load_data
from ..errors import UserError
from ..graphio import best_of_ms, load_symbol_block, pair_files, pair_size, \
    save_pair, strip_prefix, symbol_file
from ..modelinfo import random_batch
from ..recipe import load_recipe, recipe_from_dict, recipe_to_dict
from ..runfolder import METRICS_FILE, RunFolder, int8_prefix, merge_json
from ..trainer import evaluate
from .calibrators import calibrate, calibration_indices
from .graph import FloatModel, QuantizedGraph, inference_block
from .layer_speed import layer_latency, slower_layers
from .policies import Selection, resolve_policy
from .report import comparison_table, model_report, qat_table
from .scoring import Score, Scorer

__all__ = ["Outcome", "prepare", "run_policy", "quantize_target", "paired_latency", "layer_section",
           "resolve_target", "Target", "int8_prefix", "qat_section"]
_LOGGER = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One model quantized under one policy.

    Attributes
    ----------
    scorer : Scorer
        Holds the model, thresholds, split and every score computed.
    policy : str
        The ``exclude`` spec as given.
    selection : Selection
    graph : QuantizedGraph
        The chosen int8 graph.
    score : Score
        Its score on the measured split.
    full : Score
        Full int8 (``none``), for the report's "full-int8 drop".
    budget : float
        The budget the policy was given (used by ``auto`` only).
    """
    scorer: Scorer
    policy: str
    selection: Selection
    graph: QuantizedGraph
    score: Score
    full: Score
    budget: float


def prepare(model, data, qcfg, seed, batch_size=256):
    """Calibrate ``model`` on the recipe's train split and return a :class:`Scorer` on val.

    Parameters
    ----------
    model : FloatModel
    data : DataBundle
    qcfg : QuantizationConfig
    seed : int
        Fixes which training images calibrate (``trainer.seed``).
    batch_size : int
        Evaluation batch size.
    """
    if data.val.y is None or len(data.val) == 0:
        raise UserError(f"data `{data.name}`: the held-out split has no labels, so int8 top-1 "
                        f"cannot be measured; use data with a labelled val split.")
    idx = calibration_indices(len(data.train), qcfg.calib_batches * qcfg.calib_batch_size, seed)
    # read calib_batch_size images at a time (un-augmented): a streamed train split is never whole
    thresholds = calibrate(model, data.train.x, qcfg.calib_mode, qcfg.calib_batch_size, idx=idx)
    # choices (auto, first_last, sensitivity) read data.selection: a holdout of the training
    # images when val is a test set (fashion_mnist), else val; the figures are val's either way
    scorer = Scorer(model, thresholds, data.selection, qcfg.granularity, batch_size)
    scorer.calib = {"mode": qcfg.calib_mode, "images": len(idx), "seed": seed}
    scorer.report_split = data.val if data.select is not None else None
    return scorer


def run_policy(scorer, spec, budget):
    """Apply the exclusion policy ``spec`` to a prepared ``scorer``; return an :class:`Outcome`."""
    policy = resolve_policy(spec, budget)
    sel = policy.select(scorer)
    graph = scorer.build(sel.excluded, sel.exclude_ops)
    score = scorer.score(sel.excluded, sel.exclude_ops)
    spec_s = spec if isinstance(spec, str) else ",".join(spec)
    return Outcome(scorer, spec_s, sel, graph, score, scorer.score([]), float(budget))


def paired_latency(prefixes, input_shape, batch_sizes=(1, 32), repeats=20, warmup=5):
    """Best-of-``repeats`` latency in ms of several exported models, timed alternately.

    Each model is loaded and hybridized exactly as :func:`distill.modelinfo.measure_latency`
    does (``backend='MKLDNN'``, static alloc and shape: the fused fp32 graph for an fp32
    export); repeats alternate between the models so that a load change on a shared machine
    hits both sides of a ratio alike.

    Returns
    -------
    list of dict
        ``{"b1": ms, "b32": ms}`` per prefix.
    """
    out = [{} for _ in prefixes]
    sync = lambda y: y.wait_to_read()  # noqa: E731
    for bs in batch_sizes:
        x = random_batch(bs, input_shape)
        nets = []
        for p in prefixes:
            net = load_symbol_block(p)
            net.hybridize(backend="MKLDNN", static_alloc=True, static_shape=True)
            for _ in range(warmup):
                net(x).wait_to_read()
            nets.append(net)
        inner = 10 if bs == 1 else 3        # a 0.1 ms model is not timed at clock resolution
        best = [float("inf")] * len(nets)
        for _ in range(repeats):            # one repeat of each model in turn
            for i, net in enumerate(nets):
                best[i] = min(best[i], best_of_ms(lambda: net(x), 1, 0, inner, sync))
        for i, b in enumerate(best):
            out[i][f"b{bs}"] = b
    return out


def _bytes(prefix):
    return pair_size(prefix)


def export_outcome(outcome, fp32_prefix, repeats=20, batch_size=256):
    """Write the int8 export next to ``fp32_prefix``, reload it, measure it; return the section.

    Returns
    -------
    dict
        The ``int8`` metrics section (``top1``, ``latency_ms``, ``bytes``, ``excluded``,
        ``calib_mode`` and the rest).
    """
    sc = outcome.scorer
    qprefix = int8_prefix(fp32_prefix)
    save_pair(qprefix, outcome.graph.symbol, outcome.graph.params)
    reloaded = load_symbol_block(qprefix, input_name=sc.model.input_name)
    reloaded.hybridize(static_alloc=True, static_shape=True)
    top1 = evaluate(reloaded, sc.split, batch_size)
    if abs(top1 - outcome.score.top1) > 1e-6:        # the export must be the model we scored
        raise RuntimeError(f"{qprefix}: reloaded top-1 {top1} != in-memory {outcome.score.top1}")
    report = getattr(sc, "report_split", None)
    fp32_top1, full_top1, selected_on = sc.fp32_top1, outcome.full.top1, None
    if report is not None:            # chosen on the holdout, reported on the test set
        selected_on = {"split": "select", "images": len(sc.split), "top1": round(top1, 3),
                       "fp32_top1": round(sc.fp32_top1, 3),
                       "full_int8_top1": round(outcome.full.top1, 3)}
        top1 = evaluate(reloaded, report, batch_size)
        fp32_top1 = evaluate(inference_block(sc.model.fused, sc.model.params, sc.model.input_name),
                             report, batch_size)
        full = sc.build([])
        full_top1 = evaluate(inference_block(full.symbol, full.params, sc.model.input_name),
                             report, batch_size)
    fp32_lat, int8_lat = paired_latency([fp32_prefix, qprefix], sc.model.input_shape, repeats=repeats)
    speedup = {k: round(fp32_lat[k] / int8_lat[k], 3) for k in int8_lat}
    sens = [{"layer": l.name, "op": l.op, "macs": l.macs, "top1": round(s.top1, 3),
             "kl": round(s.kl, 6), "changed": round(s.changed, 3)}
            for l, s in sc.sensitivity_rows]
    return {
        "top1": round(top1, 3),
        "latency_ms": int8_lat,
        "bytes": _bytes(qprefix),
        "excluded": list(outcome.selection.excluded),
        # fp32 whatever the policy: this CPU's int8 kernel for them overflows (graph.py)
        "host_fp32": list(sc.model.host_fp32),
        "calib_mode": sc.calib["mode"],
        "granularity": sc.granularity,
        "policy": outcome.policy,
        "budget": outcome.budget,
        "notes": list(outcome.selection.notes),
        "all_fp32": bool(outcome.selection.exclude_ops),
        "split": "val",
        "split_images": len(report if report is not None else sc.split),
        "selected_on": selected_on,
        "calib_images": sc.calib["images"],
        "calib_seed": sc.calib["seed"],
        "full_int8_top1": round(full_top1, 3),
        "fp32": {"top1": round(fp32_top1, 3), "latency_ms": fp32_lat, "bytes": _bytes(fp32_prefix)},
        "speedup": speedup,
        "slower_than_fp32": [k for k, v in speedup.items() if v < 1.0],
        "files": [os.path.basename(f) for f in pair_files(qprefix)],
        "sensitivity": sens,
    }


def layer_section(scorer, repeats=20, log=print):
    """``layer_latency`` (per weight layer, fused fp32 vs int8 alone) and
    ``layers_slower_than_fp32`` (per batch size, the layers int8 makes slower)."""
    t0 = time.time()
    rows = layer_latency(scorer.model, scorer.thresholds, scorer.granularity, repeats=repeats)
    slow = slower_layers(rows)
    log(f"per-layer latency: {len(rows)} layers timed alone in fp32 and int8 "
        f"({time.time() - t0:.1f} s)")
    return {"layer_latency": rows,
            "layers_slower_than_fp32": {k: [name for name, _, _ in v] for k, v in slow.items()}}


@dataclass
class Target:
    """What ``distill quantize`` works on: models (role → fp32 prefix), the recipe, and where
    the metrics go."""
    models: Dict[str, str]
    recipe_path: str
    metrics_path: str
    run_dir: Optional[str] = None


def resolve_target(target, recipe_path=None, teacher=True):
    """A run folder (``RUN_DIR/model`` + ``RUN_DIR/.teacher/model`` + ``recipe.yaml``) or a model
    prefix (``PREFIX-symbol.json``; needs ``--recipe`` for its data)."""
    if os.path.isdir(target):
        folder = RunFolder(target)
        prefix = folder.model_prefix
        if not os.path.isfile(symbol_file(prefix)):
            raise UserError(f"{target} is a folder without {os.path.basename(symbol_file(prefix))}: "
                            f"give a finished run folder (python train.py RECIPE.yaml writes one) "
                            f"or a model prefix.")
        recipe_path = recipe_path or folder.recipe_path
        if not os.path.isfile(recipe_path):
            raise UserError(f"{target} has no {os.path.basename(folder.recipe_path)}: pass the recipe "
                            f"it was trained with (--recipe RECIPE.yaml) so its data can calibrate.")
        models = {"student": prefix}
        if teacher and os.path.isfile(symbol_file(folder.teacher_prefix)):
            models["teacher"] = folder.teacher_prefix
        return Target(models, recipe_path, folder.metrics_path, target)
    prefix = strip_prefix(target)
    if not os.path.isfile(symbol_file(prefix)):
        raise UserError(f"{target}: neither a run folder nor a model prefix (no "
                        f"{symbol_file(prefix)}). Give runs/NAME or PREFIX of {symbol_file('PREFIX')}.")
    if not recipe_path:
        raise UserError(f"{target} is a model prefix: pass --recipe RECIPE.yaml so its `data:` "
                        f"section gives the calibration and evaluation images.")
    return Target({"model": prefix}, recipe_path, int8_prefix(prefix) + "-" + METRICS_FILE)


def load_with_overrides(recipe_path, overrides):
    """The recipe at ``recipe_path`` with ``quantization`` keys replaced by ``overrides``
    (command-line values; ``None`` means "as the recipe says")."""
    recipe = load_recipe(recipe_path)
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return recipe
    raw = recipe_to_dict(recipe)
    qraw = raw.setdefault("quantization", {})
    for k, v in given.items():
        if isinstance(v, dict):          # quantization.qat: merge the keys given, keep the rest
            qraw[k] = {**(qraw.get(k) or {}), **{a: b for a, b in v.items() if b is not None}}
        else:
            qraw[k] = v
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items() if not isinstance(v, dict))
    flags += "".join(f" --{k}-{a.replace('_', '-')} {b}" for k, v in given.items() if isinstance(v, dict)
                     for a, b in v.items() if b is not None)
    out = recipe_from_dict(raw, f"{recipe_path} with {flags}")
    out.source = recipe.source
    return out


def quantize_target(target, recipe_path=None, overrides=None, teacher=True, sensitivity=True,
                    repeats=None, log=print, resume=False, trust_checkpoint=False):
    """``distill quantize``: calibrate, select, export, measure, write ``int8`` metrics.

    Parameters
    ----------
    target : str
        A run folder or a model prefix.
    recipe_path : str, optional
        Recipe giving the data (default: the run folder's ``recipe.yaml``).
    overrides : dict, optional
        ``quantization`` keys from the command line (``calib_mode``, ``exclude``, ``budget``,
        ``calib_batches``, ...); ``None`` values are ignored.
    teacher : bool
        Also quantize the run's dense teacher, when it has one.
    sensitivity : bool
        Measure the per-layer table even when the policy does not need it.
    repeats : int, optional
        Latency repeats (default ``output.latency_repeats``).
    resume : bool
        With ``quantization.qat``: continue a killed QAT run from its last checkpoint.
    trust_checkpoint : bool
        With ``resume``: also load a QAT checkpoint of the old pickle format (``--trust-checkpoint``).

    Returns
    -------
    dict
        The ``int8`` section written to the metrics file.
    """
    t0 = time.time()
    tgt = resolve_target(target, recipe_path, teacher)
    recipe = load_with_overrides(tgt.recipe_path, overrides or {})
    q = recipe.quantization
    seed = recipe.trainer.seed
    data = load_data(recipe.data, seed=seed)
    input_shape = (data.channels,) + tuple(data.image_size)
    repeats = repeats or recipe.output.latency_repeats
    sections = {}
    for role, prefix in tgt.models.items():
        spec = q.exclude
        if role == "teacher" and hasattr(resolve_policy(spec), "check"):
            spec = "auto"           # patterns name the student's layers, not the teacher's
        log(f"\n== int8 {role}: {prefix} ({q.calib_mode} calibration, exclude {spec}, "
            f"{q.granularity} weights)")
        model = FloatModel.from_prefix(prefix, input_shape)
        policy = resolve_policy(spec, q.budget)
        if hasattr(policy, "check"):          # a pattern typo fails before any calibration
            policy.check(model)
        scorer = prepare(model, data, q, seed, recipe.trainer.eval_batch_size)
        outcome = run_policy(scorer, spec, q.budget)
        if sensitivity:
            scorer.sensitivity()
        section = export_outcome(outcome, prefix, repeats, recipe.trainer.eval_batch_size)
        if q.layer_latency:
            section.update(layer_section(scorer, repeats, log))
        if role != "teacher" and q.qat.enabled:
            log(model_report(role + " (PTQ)", prefix, model, section, data))
            section = qat_section(outcome, section, prefix, data, recipe, tgt, repeats, resume, log,
                                      trust_checkpoint)
            log(qat_table(section))
        else:
            log(model_report(role, prefix, model, section, data))
        sections[role] = section
    main_role = "student" if "student" in sections else "model"
    out = dict(sections[main_role])
    if "teacher" in sections:
        out["teacher"] = sections["teacher"]
        log(comparison_table(sections))
    out["time_s"] = round(time.time() - t0, 2)
    _write_metrics(tgt.metrics_path, out)
    log(f"int8 export: {', '.join(symbol_file(int8_prefix(p)) for p in tgt.models.values())}; "
        f"metrics: {tgt.metrics_path} (key int8)")
    return out


def qat_section(outcome, ptq, prefix, data, recipe, tgt, repeats=20, resume=False, log=print,
                trust_checkpoint=False):
    """Fine-tune the student fake-quantized from ``outcome``'s calibration (:func:`.qat.run_qat`),
    export its int8 graph over the PTQ one, and return the ``int8`` section: the QAT model's
    figures on top, the PTQ section under ``ptq``, the training under ``qat``.

    The PTQ policies are scored beside it on the same thresholds and split: ``none`` and
    ``first_last`` always (one int8 graph each), ``auto`` when it was the policy that ran.
    """
    from .qat import QAT_DIR, run_qat
    sc = outcome.scorer
    work = os.path.join(tgt.run_dir, QAT_DIR) if tgt.run_dir else int8_prefix(prefix) + "-qat"
    teacher = RunFolder(tgt.run_dir).teacher_prefix if tgt.run_dir else None
    log(f"\n== quantization-aware training of the student from its {sc.calib['mode']} calibration "
        f"({'full int8' if not outcome.selection.excluded else f'{len(outcome.selection.excluded)} layers fp32'})")
    res = run_qat(sc.model, sc.thresholds, list(outcome.selection.excluded), data, recipe, work,
                  teacher, resume=resume, log=log, trust_checkpoint=trust_checkpoint)
    policies = {"none": {"top1": round(sc.score([]).top1, 3), "excluded": []}}
    fl = run_policy(sc, "first_last", outcome.budget)
    policies["first_last"] = {"top1": round(fl.score.top1, 3), "excluded": list(fl.selection.excluded)}
    if outcome.policy not in policies:
        policies[outcome.policy] = {"top1": round(outcome.score.top1, 3),
                                    "excluded": list(outcome.selection.excluded)}
    qprefix, qat_prefix = int8_prefix(prefix), os.path.join(work, "model-int8")
    save_pair(qat_prefix, res.graph.symbol, res.graph.params)
    reloaded = load_symbol_block(qat_prefix, input_name=sc.model.input_name)
    reloaded.hybridize(static_alloc=True, static_shape=True)
    top1 = evaluate(reloaded, sc.split, recipe.trainer.eval_batch_size)
    if abs(top1 - res.section["int8_top1"]) > 1e-6:      # the export must be the model trained
        raise RuntimeError(f"{qat_prefix}: reloaded top-1 {top1} != QAT int8 {res.section['int8_top1']}")
    # fp32, the PTQ export and the QAT export timed in turn: one load level for all three ratios
    fp32_lat, ptq_lat, int8_lat = paired_latency([prefix, qprefix, qat_prefix], sc.model.input_shape,
                                                 repeats=repeats)
    policies[outcome.policy]["latency_ms"] = ptq_lat
    save_pair(qprefix, res.graph.symbol, res.graph.params)    # model-int8-* is now the QAT model
    ptq_keys = ("top1", "latency_ms", "excluded", "policy", "budget", "calib_mode", "full_int8_top1",
                "speedup", "notes", "all_fp32")
    out = dict(ptq)
    out.update({
        "method": "qat", "top1": round(top1, 3), "latency_ms": int8_lat, "bytes": _bytes(qprefix),
        "simulated_top1": res.section["simulated_top1"],
        "sim_int8_agreement": res.section["sim_int8_agreement"],
        "speedup": {k: round(fp32_lat[k] / int8_lat[k], 3) for k in int8_lat},
        "ptq": {**{k: ptq[k] for k in ptq_keys if k in ptq}, "policies": policies},
        "qat": res.section,
    })
    out["fp32"] = dict(ptq["fp32"], latency_ms=fp32_lat)
    out["slower_than_fp32"] = [k for k, v in out["speedup"].items() if v < 1.0]
    return out


def _write_metrics(path, section):
    merge_json(path, int8=section)
