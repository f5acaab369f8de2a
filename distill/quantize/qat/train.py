"""Quantization-aware fine-tuning of a run's student, distilled from its fp32 teacher.

The loop is the project's one loop (:func:`distill.trainer.fit`: checkpoints every epoch,
``--resume``, a NaN stops and keeps the last good checkpoint); what QAT adds is the network it
trains and one modifier:

* :class:`QATNet`: the fake-quantized student (:mod:`.fakequant`) with BatchNorm on batch
  statistics, and the same graph with BatchNorm frozen (``use_global_stats``), sharing every
  parameter; :class:`FreezeBN` switches from the first to the second at ``freeze_bn_epoch``
  (Krishnamoorthi 2018; Jacob et al. 2018), as SparseML's ``QuantizationModifier`` does.
* the loss: the run's logit distillation terms (``kd`` + ``ce`` in the quickstart) against the
  fp32 teacher ``RUN_DIR/.teacher/model``; feature terms are left out (their taps name the fp32
  graph), KD alone when the run has no logit term.

At the end the learned steps become the calibration table and MXNet builds its int8 graph from
the fine-tuned fp32 weights and that table (:func:`distill.quantize.graph.quantize`): the graph
that trained is the graph that is deployed, which :func:`run_qat` checks (top-1 of both, and the
share of images on which they agree).

Recipe example::

    quantization:
      calib_mode: entropy
      exclude: none
      qat: {epochs: 3, lr: 0.005, freeze_bn_epoch: 1}
"""
import dataclasses
import json
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Dict

import mxnet as mx
import numpy as np
from mxnet import gluon

from ...checkpoint import atomic_write_bytes, latest_checkpoint, read_checkpoint
from ...errors import UserError
from ...graphio import load_symbol_block, make_block, save_pair, symbol_file
from ...losses import LOSSES, build_loss
from ...modifier import Modifier
from ...recipe import LossTerm
from ...recorders import Checkpointer, EpochLog
from ...replicas import first, sync_running_stats
from ...trainer import Term, TrainingDiverged, evaluate, fit, predict
from ..graph import FloatModel, QuantizedGraph, inference_block, quantize
from .fakequant import SCALE_SUFFIX, quant_plan, fake_quant_symbol

__all__ = ["QATNet", "FreezeBN", "FiniteGuard", "QATResult", "build_qat_net", "qat_terms", "run_qat",
           "fused_output_names", "QAT_DIR"]
_LOGGER = logging.getLogger(__name__)

QAT_DIR = "qat"          # RUN_DIR/qat/: checkpoints, the fine-tuned fp32 pair, thresholds.json


class QATNet(gluon.Block):
    """The fake-quantized student: ``live`` (BatchNorm on batch statistics while training) until
    :attr:`bn_frozen`, then ``frozen`` (running statistics). Only ``live`` is a child, so
    checkpoints name each shared parameter once. Inference (evaluation) is the same in both:
    BatchNorm uses its running statistics, and the graph is the deployed int8 graph's twin."""

    def __init__(self, live, frozen):
        super().__init__()
        self.live = live
        self._frozen = [frozen]
        self.bn_frozen = False

    def forward(self, x):
        return (self._frozen[0] if self.bn_frozen else self.live)(x)


class FreezeBN(Modifier):
    """BatchNorm statistics frozen from ``freeze_bn_epoch`` (0-based) on, and from then on every
    parameter's learning rate multiplied by ``lr_mult`` (``freeze_bn_lr_mult``: with BatchNorm on
    batch statistics a step's scale is normalised away; frozen, the same rate can diverge).

    Recipe example::

        quantization: {qat: {epochs: 3, freeze_bn_epoch: 1, freeze_bn_lr_mult: 0.1}}
    """

    name = "qat_freeze_bn"

    def __init__(self, net, freeze_bn_epoch, lr_mult=1.0):
        self.net, self.freeze_bn_epoch, self.lr_mult = net, int(freeze_bn_epoch), float(lr_mult)
        self._base = {k: p.lr_mult for k, p in net.live.collect_params().items()}

    def epoch_start(self, epoch):
        self.net.bn_frozen = epoch >= self.freeze_bn_epoch
        if self.net.bn_frozen:
            # frozen BatchNorm computes with the running statistics: on several devices they
            # must be the same on every replica (a no-op when the loop has just averaged them)
            sync_running_stats(self.net.live)
        mult = self.lr_mult if self.net.bn_frozen else 1.0
        for k, p in self.net.live.collect_params().items():
            p.lr_mult = self._base[k] * mult

    def epoch_end(self, epoch):
        return {"bn_frozen": bool(self.net.bn_frozen)}


class FiniteGuard(Modifier):
    """Stops the run when a weight or a learned range is no longer finite at an epoch's end,
    before that epoch's checkpoint is written (the loop checks the loss; a step can still leave
    NaN parameters behind it, e.g. when BatchNorm on batch statistics divides by a batch whose
    quantized values are all equal)."""

    name = "qat_finite"

    def __init__(self, net, lr, ckpt_dir):
        self.net, self.lr, self.ckpt_dir = net, lr, ckpt_dir

    def epoch_end(self, epoch):
        # every replica: a step that went wrong on one device must not pass unseen
        bad = [k for k, p in self.net.live.collect_params().items()
               if not all(np.isfinite(d.asnumpy()).all() for d in p.list_data())]
        if bad:
            raise TrainingDiverged(
                f"quantization-aware training diverged in epoch {epoch + 1}: {len(bad)} parameter(s) "
                f"are NaN or Inf ({', '.join(bad[:3])}). The run stopped; the last good checkpoint "
                f"in {self.ckpt_dir} is kept. Lower `quantization.qat.lr` (now {self.lr}) or freeze "
                f"BatchNorm from the start (`quantization.qat.freeze_bn_epoch: 0`).")
        return {}


def build_qat_net(model, plan, params=None):
    """The :class:`QATNet` of ``model`` under ``plan`` (scales start at the plan's thresholds).

    Parameters
    ----------
    model : FloatModel
    plan : QuantPlan
    params : dict, optional
        name → NDArray to start from (default: the model's, plus the plan's initial steps).
    """
    shape = model.input_shape
    live_sym = fake_quant_symbol(model.symbol, plan, model.input_name, False, shape)
    frozen_sym = fake_quant_symbol(model.symbol, plan, model.input_name, True, shape)
    if params is None:
        params = dict(model.params)
        params.update({k: mx.nd.array(v) for k, v in plan.initial_scales().items()})
    live = make_block(live_sym, params, model.input_name, trainable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = gluon.SymbolBlock(frozen_sym, mx.sym.var(model.input_name), params=live.collect_params())
    for name, p in live.collect_params().items():
        if name.endswith(SCALE_SUFFIX):
            p.wd_mult = 0.0           # weight decay would shrink every range towards zero
    live.hybridize()
    frozen.hybridize()
    return QATNet(live, frozen)


def qat_terms(recipe, has_teacher, labelled, log=print):
    """The run's logit distillation terms (feature terms dropped); KD when none is left. A
    term's own warm-up (``dkd``'s ``warmup_epochs``) is off: the student is already trained.

    Returns
    -------
    list of Term
    """
    kept, dropped = [], []
    for t in recipe.distillation:
        cls = LOSSES.get(t.loss)
        if t.student_layer or t.teacher_layer:
            dropped.append(t.loss)
        elif (cls.needs_teacher and not has_teacher) or (cls.needs_labels and not labelled):
            dropped.append(t.loss)
        else:
            kept.append(t)
    if not any(LOSSES.get(t.loss).needs_teacher for t in kept) and has_teacher:
        kept.append(LossTerm(loss="kd", weight=1.0, options={"temperature": 4.0}))
    if not kept:
        if not labelled:
            raise UserError("quantization.qat: the run has no teacher (RUN_DIR/.teacher/model) and "
                            "its data have no labels, so there is nothing to fine-tune against; "
                            "give the run a teacher or labelled data.")
        kept.append(LossTerm(loss="ce", weight=1.0))
    if dropped:
        log(f"qat: loss terms left out (feature taps name the fp32 graph, or no teacher/labels): "
            f"{', '.join(dropped)}")
    terms, counts = [], {}
    for t in kept:
        if "warmup_epochs" in LOSSES.get(t.loss).OPTIONS:
            t = dataclasses.replace(t, options={**t.options, "warmup_epochs": 0.0})
        block = build_loss(t)
        block.initialize(mx.init.Xavier(), ctx=mx.cpu())
        if block.hybridizable:
            block.hybridize(static_alloc=True)
        counts[t.loss] = counts.get(t.loss, 0) + 1
        name = t.loss if counts[t.loss] == 1 else f"{t.loss}{counts[t.loss]}"
        terms.append(Term(name, t.weight, block))
    return terms


class _TeacherLogits:
    """``(idx, x) → [logits]`` of the frozen fp32 teacher: cached once over the train split when
    batches are not augmented, live otherwise."""

    def __init__(self, prefix, train_x, augmented, batch_size=256):
        self.net = load_symbol_block(prefix)
        for p in self.net.collect_params().values():
            p.grad_req = "null"
        self.net.hybridize(static_alloc=True)
        # (N, K) logits, the train split read batch_size images at a time (it may be streamed)
        self.cache = None if augmented else predict(self.net, train_x, batch_size)
        # what the loop reads of a teacher-output cache (distill.teacher_cache.TeacherOutputs):
        # no ``arrays`` means live, and then the loop moves ``teacher.net`` to its devices
        self.arrays = None if self.cache is None else [self.cache]
        self.teacher = self

    def __call__(self, idx, x):
        if self.cache is not None:
            return [mx.nd.array(self.cache[idx])]
        return [self.net(x)]


def fused_output_names(model):
    """Original node name → the name its output has in ``model``'s threshold table (each
    :class:`FloatModel` numbers its fused nodes itself, so tables move between models by the
    original names)."""
    out = {model.input_name: model.input_name}
    for node in json.loads(model.fused.tojson())["nodes"]:
        if node["op"] == "null":
            continue
        subs = node.get("subgraphs") or []
        ops = [n for n in subs[0]["nodes"] if n["op"] != "null"] if subs else []
        out[ops[-1]["name"] if ops else node["name"]] = node["name"] + "_output"
    return out


@dataclass
class QATResult:
    """What :func:`run_qat` gives back: the int8 graph, the fine-tuned fp32 model, and figures."""
    graph: QuantizedGraph
    model: FloatModel
    thresholds: Dict[str, tuple]
    section: dict


def _signature(qcfg, excluded, calib):
    """What a resumed QAT run must share with the one that wrote its checkpoints."""
    q = qcfg.qat
    return {"epochs": q.epochs, "lr": q.lr, "freeze_bn_epoch": q.freeze_bn_epoch,
            "freeze_bn_lr_mult": q.freeze_bn_lr_mult,
            "observer": q.observer, "calib_mode": qcfg.calib_mode, "granularity": qcfg.granularity,
            "excluded": sorted(excluded), "calib": calib}


def _check_resume(ckpt_dir, signature, trust=False):
    """The newest QAT checkpoint's signature must be ``signature`` (read from its JSON; an old
    pickle checkpoint only with ``trust``: :func:`distill.checkpoint.read_checkpoint`)."""
    path = latest_checkpoint(ckpt_dir)
    if not path:
        return
    old = read_checkpoint(path, trust=trust).get("recipe")
    if old != signature:
        diff = sorted(k for k in set(old or {}) | set(signature) if (old or {}).get(k) != signature.get(k))
        raise UserError(f"--resume: the QAT checkpoints in {ckpt_dir} were written with other "
                        f"settings ({', '.join(diff)} differ). Resume with the same options, or "
                        f"start again without --resume.")


def run_qat(model, thresholds, excluded, data, recipe, work_dir, teacher_prefix=None,
            resume=False, log=print, trust_checkpoint=False):
    """Fine-tune ``model`` fake-quantized, distilled from the teacher; build its int8 graph.

    Parameters
    ----------
    model : FloatModel
        The run's fp32 student.
    thresholds : dict
        Its PTQ calibration (fused output name → ``(min, max)``): where the ranges start.
    excluded : list of str
        Layers kept fp32 (the PTQ policy's choice; ``[]`` for full int8).
    data : DataBundle
    recipe : Recipe
        ``quantization`` (with ``qat``), ``trainer`` (batch size, optimizer, seed),
        ``distillation`` and ``data.augment`` are read.
    work_dir : str
        ``RUN_DIR/qat``: checkpoints, the fine-tuned fp32 pair, ``thresholds.json``.
    teacher_prefix : str, optional
        The fp32 teacher (``RUN_DIR/.teacher/model``); None: labels only.
    resume : bool
        Continue from the newest checkpoint in ``work_dir/checkpoints``.
    trust_checkpoint : bool
        With ``resume``: also load a checkpoint of the old pickle format (``--trust-checkpoint``;
        unpickling runs any code the file holds).

    Returns
    -------
    QATResult
    """
    q, qat = recipe.quantization, recipe.quantization.qat
    plan = quant_plan(model, thresholds, excluded, q.granularity)
    net = build_qat_net(model, plan)
    sim_before = evaluate(net, data.val, recipe.trainer.eval_batch_size)
    log(f"qat: {len(plan.points)} fake-quantized tensors ({sum(p.unsigned for p in plan.points.values())} "
        f"uint8), {len(plan.weights)} int8 weight layers, {len(plan.excluded)} fp32; simulated "
        f"top-1 before fine-tuning {sim_before:.2f}%")
    labelled = data.train.y is not None
    teacher = None
    if teacher_prefix and os.path.isfile(symbol_file(teacher_prefix)):
        teacher = _TeacherLogits(teacher_prefix, data.train.x, bool(recipe.data.augment),
                                 recipe.trainer.eval_batch_size)
    terms = qat_terms(recipe, teacher is not None, labelled, log)
    log(f"qat: {qat.epochs} epoch(s) at lr {qat.lr}, BatchNorm frozen from epoch "
        f"{qat.freeze_bn_epoch + 1} (lr × {qat.freeze_bn_lr_mult:g} from then), loss {' + '.join(f'{t.weight:g}·{t.name}' for t in terms)}"
        f"{' against the fp32 teacher' if teacher is not None else ''}")
    cfg = dataclasses.replace(recipe.trainer, epochs=qat.epochs, lr=qat.lr, warmup_epochs=0.0,
                              kvstore="local", lr_steps=[s for s in recipe.trainer.lr_steps if s < qat.epochs])
    ckpt_dir = os.path.join(work_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    signature = _signature(q, excluded, {"images": int(len(thresholds))})
    if resume:
        _check_resume(ckpt_dir, signature, trust_checkpoint)
    else:
        for f in os.listdir(ckpt_dir):            # a fresh QAT run: never resume old ones by accident
            if f.endswith(".ckpt"):
                os.unlink(os.path.join(ckpt_dir, f))
    mods = [FreezeBN(net, qat.freeze_bn_epoch, qat.freeze_bn_lr_mult), FiniteGuard(net, qat.lr, ckpt_dir),
            Checkpointer(ckpt_dir, signature), EpochLog(log)]
    result = fit(net, net, teacher, data, terms, cfg, checkpoints=ckpt_dir, resume=resume, log=log,
                 modifiers=mods, augment=recipe.data.augment, trust_checkpoint=trust_checkpoint)
    net.bn_frozen = True
    # the fine-tuned fp32 weights and the learned steps → MXNet's own int8 graph
    trained = {k: first(p) for k, p in net.live.collect_params().items()}   # replicas identical
    fp32 = {k: v for k, v in trained.items() if not k.endswith(SCALE_SUFFIX)}
    tuned = FloatModel(model.symbol, fp32, model.input_shape, model.input_name,
                       source=os.path.join(work_dir, "model"))
    learned = plan.thresholds({k: v for k, v in trained.items() if k.endswith(SCALE_SUFFIX)})
    old_names, new_names = fused_output_names(model), fused_output_names(tuned)
    by_node = {n: f for n, f in old_names.items()}
    rename = {f: new_names[n] for n, f in by_node.items() if n in new_names}
    table = {rename.get(k, k): v for k, v in {**thresholds, **learned}.items()}
    graph = quantize(tuned, table, excluded, q.granularity)
    bs = recipe.trainer.eval_batch_size
    sim_logits = predict(net, data.val.x, bs)
    real_logits = predict(inference_block(graph.symbol, graph.params, model.input_name), data.val.x, bs)
    y = data.val.y
    sim_top1 = float((sim_logits.argmax(1) == y).mean() * 100.0)
    real_top1 = float((real_logits.argmax(1) == y).mean() * 100.0)
    agree = float((sim_logits.argmax(1) == real_logits.argmax(1)).mean() * 100.0)
    scale = float(np.abs(real_logits).max()) or 1.0
    rel = float(np.abs(sim_logits - real_logits).max() / scale)
    fp32_top1 = evaluate(inference_block(tuned.fused, tuned.params, model.input_name), data.val, bs)
    prefix = os.path.join(work_dir, "model")
    save_pair(prefix, model.symbol, fp32)
    by_node_learned = {n: list(learned[f]) for n, f in by_node.items() if f in learned}
    atomic_write_bytes(os.path.join(work_dir, "thresholds.json"), json.dumps(
        {"thresholds": {k: list(v) for k, v in table.items()}, "by_node": by_node_learned,
         "plan": plan.to_dict()}, indent=1).encode())
    hist = result["history"]
    section = {
        "method": "qat", "epochs": qat.epochs, "lr": qat.lr, "freeze_bn_epoch": qat.freeze_bn_epoch,
        "freeze_bn_lr_mult": qat.freeze_bn_lr_mult,
        "observer": qat.observer, "losses": [t.name for t in terms],
        "teacher": teacher_prefix if teacher is not None else None,
        "simulated_top1_before": round(sim_before, 3), "simulated_top1": round(sim_top1, 3),
        "int8_top1": round(real_top1, 3), "sim_int8_agreement": round(agree, 3),
        "sim_int8_max_rel_diff": round(rel, 5), "fp32_finetuned_top1": round(fp32_top1, 3),
        "quantized_tensors": len(plan.points), "int8_weight_layers": len(plan.weights),
        "history": [{k: r.get(k) for k in ("epoch", "lr", "loss", "val_top1", "bn_frozen")} for r in hist],
        "train_time_s": round(result["train_time_s"], 2),
        "fp32_prefix": prefix, "thresholds_file": os.path.join(work_dir, "thresholds.json"),
    }
    log(f"qat: simulated int8 {sim_top1:.2f}%, MXNet int8 graph {real_top1:.2f}% (agree on "
        f"{agree:.1f}% of images), fine-tuned fp32 {fp32_top1:.2f}%")
    return QATResult(graph, tuned, table, section)
